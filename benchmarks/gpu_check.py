"""The parts of `benchmarks/gpu_check.sh`, one per subcommand; each prints one `RESULT {json}` line at its end.

    .venv/bin/python benchmarks/gpu_check.py device
    .venv/bin/python benchmarks/gpu_check.py tiny --objective mae --precision bf16 [--compile] [--device cpu]
    .venv/bin/python benchmarks/gpu_check.py fsdp [--device cpu]       # one rank: dtypes, DCP round trip, model.pt
    .venv/bin/python benchmarks/gpu_check.py lit-fsdp [--device cpu]
    .venv/bin/python benchmarks/gpu_check.py parallel [--device cpu --backend aot_eager]   # per-block compile, FSDP2, AC
    .venv/bin/python benchmarks/gpu_check.py throughput --model vit_b16 [--compile] -- LOG   # parses mae_throughput.py
    .venv/bin/python benchmarks/gpu_check.py loader [--device cpu]
    .venv/bin/python benchmarks/gpu_check.py report RESULTS.jsonl --json OUT.json

`tiny` trains 20 steps of a tiny model twice: once straight through, once stopped by SIGTERM after step 10 (the
trainer checkpoints and raises `Preempted`) and resumed; the two final models must match. `fsdp` is a one-rank FSDP2
step on NCCL (gloo with `--device cpu`) with this package's bf16 policy, printing the dtypes of the batch, the
targets, the layers' outputs, the loss and the sharded gradients; then a torch.distributed.checkpoint save and load and
a full `model.pt` export reloaded into an unsharded model. `parallel` runs the trainer's `parallelize` on one rank
(FSDP2, bf16): the MAE eager, then compiled per block with activation checkpointing none, full and selective; the
compiled losses must follow the eager ones, and on a GPU the peak memory must not rise from none to selective and must fall to full.
Run the whole check with `bash benchmarks/gpu_check.sh`.
"""
import argparse
import contextlib
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.dataset=synthetic", "model.depth=2", "model.decoder_depth=1", "train.log_every=1", "data.batch_size=8",
        "train.checkpoint_every=10", "train.keep_checkpoints=3"]


def emit(part: str, **fields) -> None:
    "The one machine-readable line a part prints (the shell script keeps the last one)."
    print("RESULT " + json.dumps({"part": part, **fields}), flush=True)


def device_of(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu (the script's --cpu-smoke) on a machine without a GPU")
    return torch.device(name)


# -- device ---------------------------------------------------------------------------------------------------

def peak_of(name: str) -> float | None:
    "The peak dense bf16 TFLOP/s that benchmarks/mae_throughput.py uses for MFU (its table, read, not copied)."
    import importlib.util
    spec = importlib.util.spec_from_file_location("mae_throughput", ROOT / "benchmarks" / "mae_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mae_throughput"] = module
    spec.loader.exec_module(module)
    return module.peak_tflops(name)


def part_device(args) -> None:
    fields = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "host": socket.gethostname()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        fields.update(device=p.name, count=torch.cuda.device_count(), memory_gib=round(p.total_memory / 2 ** 30, 1),
                      capability=f"{p.major}.{p.minor}", bf16=torch.cuda.is_bf16_supported(), peak_tflops=peak_of(p.name),
                      nccl=".".join(map(str, torch.cuda.nccl.version())))
    else:
        import platform
        fields.update(device=platform.processor() or platform.machine(), count=0, peak_tflops=None)
    print(fields)
    emit("device", name="device", ok=True, **fields)


# -- tiny runs: train, stop, resume ----------------------------------------------------------------------------

def stop_after(data, step: int):
    """Wrap a trainer data stream so that the process gets SIGTERM while the batch of step `step` (1-based) is read,
    inside `fit` only (where the trainer catches it; not while an objective's `prepare` reads batches first)."""
    class Stopping:
        def __getattr__(self, name): return getattr(data, name)
        def batches(self, start: int = 0):
            for i, batch in enumerate(data.batches(start), start=start + 1):
                if i == step and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL: os.kill(os.getpid(), signal.SIGTERM)
                yield batch
    return Stopping()


def part_tiny(args) -> None:
    from prepretrain_lit import trainer as T
    from prepretrain_lit.presets import load_config
    stage = args.objective
    overrides = [*TINY, f"train.steps={args.steps}", f"train.device={args.device}", f"train.precision={args.precision}",
                 f"train.compile={'true' if args.compile else 'false'}"]
    if stage == "splitmask": overrides += [f"splitmask.target={args.target}", "splitmask.kmeans_clusters=16", "splitmask.kmeans_samples=256"]
    cfg = load_config(preset="tiny", stage=stage, overrides=overrides)
    work = Path(tempfile.mkdtemp(prefix=f"gpu-check-{stage}-"))
    tic = time.perf_counter()
    straight = T.train(stage, cfg, work / "straight", progress=False)
    seconds = time.perf_counter() - tic
    real_build = T.build_data
    stop = args.steps // 2 + 1                                       # SIGTERM while step 11 of 20 runs: checkpoint at 11
    T.build_data = lambda *a, **k: stop_after(real_build(*a, **k), stop)
    stopped_at = None
    try: T.train(stage, cfg, work / "resumed", progress=False)
    except T.Preempted as e: stopped_at = e.step
    finally: T.build_data = real_build
    resumed = T.train(stage, cfg, work / "resumed", progress=False)
    a = torch.load(work / "straight" / "model.pt", weights_only=True)["model"]
    b = torch.load(work / "resumed" / "model.pt", weights_only=True)["model"]
    diff = max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())
    loss_diff = abs(straight["loss"] - resumed["loss"])
    ok = stopped_at == stop and diff < args.tolerance and all(
        torch.isfinite(x.float()).all() for x in a.values())
    label = stage + (f"-{args.target}" if stage == "splitmask" else "") + ("-compiled" if args.compile else "")
    print(f"{label}: {cfg.train.steps} steps in {seconds:.1f} s, loss {straight['loss']:.4f}; stopped at {stopped_at}, "
          f"resumed: final loss {resumed['loss']:.4f}, max |weight difference| {diff:.2e}")
    emit("tiny", name=f"{label} {args.precision}", ok=bool(ok), seconds=round(seconds, 2), loss=straight["loss"],
         stopped_at=stopped_at, resumed_loss=resumed["loss"], loss_diff=loss_diff, max_weight_diff=diff,
         memory_mb=straight.get("memory_mb"))


# -- FSDP2, one rank --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def one_rank_group(device: torch.device):
    "A process group of one rank (NCCL on a GPU, gloo on the CPU) on a free local port."
    import torch.distributed as dist
    from prepretrain_lit.distributed import free_port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if device.type == "cuda": torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try: yield
    finally: dist.destroy_process_group()


def shard(objective, device: torch.device, precision: str) -> None:
    "fully_shard each block, then the root, with the trainer's policies (as `Trainer._wrap` does)."
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from prepretrain_lit.distributed import fsdp_policies
    mesh = init_device_mesh(device.type, (1,))
    block_mp, root_mp = fsdp_policies(precision)
    for block in objective.blocks(): fully_shard(block, mesh=mesh, mp_policy=block_mp)
    fully_shard(objective, mesh=mesh, mp_policy=root_mp)


def part_fsdp(args) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
    from prepretrain_lit import mae as M
    from prepretrain_lit.presets import load_config
    from prepretrain_lit.trainer import SyntheticImages
    from prepretrain_lit.optim import build_optimizer
    from prepretrain_lit.objectives import mae_objective
    device = device_of(args.device)
    cfg = load_config(preset="tiny", overrides=TINY)
    seen: dict = {}
    real_loss = M.MaskedAutoencoderViT.forward_loss
    def record(self, imgs, pred, mask):
        loss = real_loss(self, imgs, pred, mask)
        seen.update(image=str(imgs.dtype), target=str(self.patchify(imgs).dtype), pred=str(pred.dtype), loss=str(loss.dtype))
        return loss
    M.MaskedAutoencoderViT.forward_loss = record
    work = Path(tempfile.mkdtemp(prefix="gpu-check-fsdp-"))
    with one_rank_group(device):
        torch.manual_seed(0)
        objective = mae_objective(cfg)
        reference = {k: v.clone() for k, v in objective.model.state_dict().items()}
        shard(objective, device, "bf16")
        optimizer = build_optimizer(objective, cfg, 1e-3, device)
        batch = {k: v.to(device) for k, v in next(SyntheticImages(8, 32, 64).batches(0)).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = objective(batch)
        loss.backward()
        grad = next(p for p in objective.parameters() if p.grad is not None).grad
        seen.update(step_loss=str(loss.dtype), param_shard=str(next(objective.parameters()).dtype), grad=str(grad.dtype))
        optimizer.step()
        dtypes_ok = (seen["image"] == seen["target"] == seen["loss"] == seen["step_loss"] == "torch.float32"
                     and seen["pred"] == "torch.bfloat16" and seen["param_shard"] == seen["grad"] == "torch.float32")
        model_sd, optim_sd = get_state_dict(objective, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(work / "dcp"))
        saved = {k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone() for k, v in model_sd.items()}
        with torch.no_grad():
            for p in objective.parameters(): p.zero_()
        model_sd, optim_sd = get_state_dict(objective, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(work / "dcp"))
        set_state_dict(objective, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        back = get_state_dict(objective, optimizer)[0]
        dcp_ok = all(torch.equal(saved[k], v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in back.items())
        full = get_model_state_dict(objective.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        torch.save({"model": full}, work / "model.pt")
    fresh = mae_objective(cfg).model
    fresh.load_state_dict(torch.load(work / "model.pt", weights_only=True)["model"])
    export_ok = fresh.state_dict().keys() == reference.keys() and any(
        not torch.equal(fresh.state_dict()[k], reference[k]) for k in reference)          # trained, and it loads
    print("FSDP2 bf16 dtypes: " + ", ".join(f"{k} {v.replace('torch.', '')}" for k, v in seen.items()))
    emit("fsdp", name=f"FSDP2 one rank ({'nccl' if device.type == 'cuda' else 'gloo'})", ok=bool(dtypes_ok and dcp_ok and export_ok),
         dtypes=seen, dtypes_ok=dtypes_ok, dcp_round_trip=dcp_ok, model_pt_reloaded=export_ok)


def part_lit_fsdp(args) -> None:
    from prepretrain_lit.presets import load_config
    from prepretrain_lit.objectives import lit_objective
    from prepretrain_lit.optim import build_optimizer
    device = device_of(args.device)
    cfg = load_config(preset="tiny", stage="lit", overrides=[
        "model.depth=2", "lit.embed_dim=32", "lit.text_width=32", "lit.text_layers=2", "lit.text_heads=4",
        "lit.context_length=16"])
    import warnings
    with one_rank_group(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # a random locked tower: this checks the sharding only
        torch.manual_seed(0)
        objective = lit_objective(cfg)
        shard(objective, device, "bf16")
        optimizer = build_optimizer(objective, cfg, 1e-3, device)
        n = 8
        batch = {"image": torch.randn(n, 3, cfg.model.img_size, cfg.model.img_size, device=device),
                 "caption": [f"a photo of shape {i}" for i in range(n)]}
        losses = []
        for _ in range(3):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, logs = objective(batch)
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            losses.append(loss.item())
    ok = all(map(lambda x: x == x and abs(x) < 1e4, losses)) and losses[-1] < losses[0]
    print(f"LiT under FSDP2: losses {', '.join(f'{x:.4f}' for x in losses)}, logit scale {float(logs['logit_scale']):.2f}")
    emit("lit-fsdp", name="LiT under FSDP2", ok=bool(ok), losses=losses)


# -- per-block compile under FSDP2, and the three activation-checkpointing modes -------------------------------------

def part_parallel(args) -> None:
    """One rank, FSDP2 through `parallelize` (as the trainer): the same MAE and batch eager, then compiled per block with
    checkpointing none, full, selective. Losses of every step (2 micro-batches each), compile seconds apart from the
    median step time after the first, and on a GPU the peak memory of each."""
    from prepretrain_lit.presets import load_config
    from prepretrain_lit.distributed import DistInfo, compile_seconds, parallelize
    from prepretrain_lit.trainer import SyntheticImages
    from prepretrain_lit.optim import build_optimizer
    from prepretrain_lit.objectives import mae_objective
    device = device_of(args.device)
    cuda = device.type == "cuda"
    cfg = load_config(preset=args.preset, overrides=[*(TINY if args.preset == "tiny" else ["data.dataset=synthetic"]),
                                                     f"data.batch_size={args.batch}"])
    m = cfg.model
    batch = {k: v.to(device) for k, v in next(SyntheticImages(args.batch, m.img_size, m.num_patches).batches(0)).items()}
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    runs = {}
    with one_rank_group(device):
        for label, mode, compiled in (("eager", "none", False), ("none", "none", True), ("full", "full", True),
                                      ("selective", "selective", True)):
            torch.manual_seed(0)
            objective = mae_objective(cfg)
            model = parallelize(objective, DistInfo(device=device), "fsdp", args.precision, mode, compiled, args.backend)
            optimizer = build_optimizer(objective, cfg, 1e-4, device)
            if cuda: torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
            before, losses, times = compile_seconds(), [], []
            for _ in range(args.steps):
                tic = time.perf_counter()
                for micro in range(2):
                    objective.set_requires_gradient_sync(micro == 1)
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        loss, _ = model(batch)
                    (loss / 2).backward()
                    if micro == 0: losses.append(loss.item())
                optimizer.step(); optimizer.zero_grad(set_to_none=True)
                if cuda: torch.cuda.synchronize(device)
                times.append(time.perf_counter() - tic)
            later = sorted(times[1:]) or times
            runs[label] = {"losses": losses, "compile_s": round(compile_seconds() - before, 2),
                           "first_step_s": round(times[0], 3), "step_s": round(later[len(later) // 2], 4),
                           "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3) if cuda else None}
            print(f"{label:>10}: losses {', '.join(f'{x:.4f}' for x in losses)}; compile {runs[label]['compile_s']} s, "
                  f"first step {runs[label]['first_step_s']} s, then {runs[label]['step_s']} s/step; peak {runs[label]['peak_gib']} GiB")
            del model, objective, optimizer
    eager = runs["eager"]["losses"]
    diffs = {label: max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["losses"], eager)) for label, r in runs.items()}
    finite = all(x == x and abs(x) < 1e4 for r in runs.values() for x in r["losses"])
    # compiled "none" already recomputes some cheap ops (inductor's partitioner), so selective may only match it
    memory_ok = not cuda or runs["full"]["peak_gib"] < runs["selective"]["peak_gib"] <= runs["none"]["peak_gib"]
    ok = finite and max(diffs.values()) <= args.tolerance and runs["none"]["compile_s"] > 0 and memory_ok
    emit("parallel", name=f"compile per block, FSDP2, AC ({args.backend})", ok=bool(ok), max_rel_loss_diff=max(diffs.values()),
         memory_ordered=memory_ok, **{f"{k}_{label}": v for label, r in runs.items() for k, v in r.items() if k != "losses"})


# -- throughput (parses benchmarks/mae_throughput.py's output) ------------------------------------------------------

def parse_throughput(text: str) -> dict:
    "images/s, TFLOP/s, MFU and peak memory from the output of `mae_throughput.py --ours-only`."
    out: dict = {}
    if m := re.search(r"^train\S*[^\n]*?\s([\d.]+)\s+-\s", text, re.M): out["images_per_s"] = float(m.group(1))
    if m := re.search(r"train step achieved: ours ([\d.]+) ([TG])FLOP/s", text):
        out["tflops"] = float(m.group(1)) / (1 if m.group(2) == "T" else 1000)
    if m := re.search(r"MFU ours ([\d.]+)%", text): out["mfu"] = float(m.group(1)) / 100
    if m := re.search(r"peak memory: ([\d.]+) GiB", text): out["peak_memory_gib"] = float(m.group(1))
    return out


def part_throughput(args) -> None:
    text = Path(args.log).read_text(errors="replace")
    found = parse_throughput(text)
    precision = m.group(1) if (m := re.search(r"batch \d+, (\w+), compile=", text)) else "?"
    name = f"MAE {args.model} {precision}" + (" compiled" if args.compile else "")
    print(f"{name}: {found}")
    emit("throughput", name=name, ok="images_per_s" in found, **found)


# -- loader with pinned memory -------------------------------------------------------------------------------------

def part_loader(args) -> None:
    import dataclasses
    from prepretrain_lit.presets import load_config
    from prepretrain_lit.data import build_shards, shapes_source
    from prepretrain_lit.decode import TRANSFORMS
    from prepretrain_lit.loader import make_loader
    device = device_of(args.device)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-loader-"))
    manifest = build_shards(shapes_source(args.images, seed=0, size=64), work / "shapes", shard_size=max(1, args.images // 8),
                            progress=False)
    cfg = load_config(preset="tiny", overrides=[f"data.dataset={manifest}"])
    data = dataclasses.replace(cfg.data, batch_size=64, num_workers=args.workers)
    pin = device.type == "cuda"
    loader = make_loader(data, TRANSFORMS["mae"](224), seed=0, rank=0, world_size=1, infinite=False, pin_memory=pin)
    seen, pinned, tic = 0, True, time.perf_counter()
    for batch in loader:
        pinned &= batch["image"].is_pinned() if pin else True
        batch["image"].to(device, non_blocking=True)
        seen += len(batch["image"])
    if device.type == "cuda": torch.cuda.synchronize(device)
    rate = seen / (time.perf_counter() - tic)
    print(f"loader: {seen} images at 224 px, {args.workers} workers, pinned {pin and pinned}: {rate:.0f} images/s")
    emit("loader", name=f"loader 224 px, {args.workers} workers, pinned", ok=bool(seen and (pinned or not pin)),
         images_per_s=rate, pinned=bool(pin and pinned))


# -- asynchronous checkpoints ----------------------------------------------------------------------------------------

def part_async_checkpoint(args) -> None:
    """The training loop's blocking per checkpoint, synchronous against asynchronous (benchmarks/checkpoint_async.py) on
    this device: on a GPU the staging copy runs GPU -> CPU beside the next step. `goal_met`: warm blocking <= 10% of the
    synchronous save (meaningless on the CPU smoke's tiny model, whose save is fixed costs only)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from checkpoint_async import report, run
    row = run(args.preset, args.rounds, args.batch, device=device_of(args.device).type)
    report(row)
    keep = ("checkpoint_gb", "sync_s", "async_blocking_warm_s", "async_blocking_cold_s", "async_background_s",
            "blocking_share", "goal_met", "train_step_s")
    emit("async-checkpoint", name=f"async checkpoint {args.preset} MAE+AdamW", ok=True,
         **{k: row[k] for k in keep})


# -- the report --------------------------------------------------------------------------------------------------

def part_report(args) -> None:
    rows = [json.loads(l) for l in Path(args.results).read_text().splitlines() if l.strip()]
    device = next((r for r in rows if r.get("part") == "device"), {})
    print(f"\ngpu_check on {device.get('device', '?')} ({device.get('host', '?')}), torch {device.get('torch', '?')}, "
          f"peak {device.get('peak_tflops') or '?'} TFLOP/s bf16")
    print(f"{'part':44} {'status':>8} {'seconds':>8}  details")
    for r in rows:
        status = "ok" if r.get("ok") else r.get("status", "FAILED")
        details = {k: v for k, v in r.items() if k not in ("part", "name", "ok", "status", "wall_s", "dtypes", "losses")}
        text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in details.items())
        print(f"{r.get('name', r.get('part')):44} {status:>8} {r.get('wall_s', 0):>8.1f}  {text[:110]}")
    failed = [r.get("name", r.get("part")) for r in rows if not r.get("ok")]
    doc = {"device": device, "parts": rows, "failed": failed}
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\n{len(rows) - len(failed)} of {len(rows)} parts ok; JSON: {args.json}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    sub.add_parser("device")
    p = sub.add_parser("tiny")
    p.add_argument("--objective", choices=("mae", "splitmask"), default="mae")
    p.add_argument("--target", choices=("pixels", "kmeans"), default="pixels")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest weight difference resumed vs straight")
    p.add_argument("--steps", type=int, default=20, help="steps of each run (stopped after half of them)")
    for name in ("fsdp", "lit-fsdp"):
        sub.add_parser(name).add_argument("--device", default="cuda")
    p = sub.add_parser("parallel")
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="vit_b16", help="the MAE's size (tiny on the CPU)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: the graphs without inductor)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=0.02, help="largest relative loss difference from eager (bf16: 2%%)")
    p = sub.add_parser("throughput")
    p.add_argument("--model", required=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("log")
    p = sub.add_parser("loader")
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--workers", type=int, default=4)
    p = sub.add_parser("async-checkpoint")
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="vit_l16", help="the MAE's size (tiny on the CPU)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p = sub.add_parser("report")
    p.add_argument("results")
    p.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    {"device": part_device, "tiny": part_tiny, "fsdp": part_fsdp, "lit-fsdp": part_lit_fsdp, "parallel": part_parallel,
     "throughput": part_throughput, "async-checkpoint": part_async_checkpoint,
     "loader": part_loader, "report": part_report}[args.part](args)


if __name__ == "__main__":
    main()
