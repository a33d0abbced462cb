"""What a first run on 8 GPUs or several nodes would meet, checked here on the CPU: device selection and process-group
set-up against faked CUDA device counts and torchrun / SLURM environments; FSDP2's bf16 policy keeping targets and
losses in fp32; every objective equal under FSDP and DDP (LiT's scale is not a 0-dim parameter); rank 0 deciding the
resume; FSDP ranks built on the meta device; evaluations written once per job; OMP threads per launched process."""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from prepretrain_lit import checkpoint as C
from prepretrain_lit import distributed as D
from prepretrain_lit import trainer as T
from prepretrain_lit.presets import load_config
from prepretrain_lit.registry import objective_factory
from prepretrain_lit.schema import UserError
from project import ROOT
from tiny_runs import TINY, tiny

TINY_TEXT = ["lit.embed_dim=32", "lit.text_width=32", "lit.text_layers=2", "lit.text_heads=4", "lit.context_length=16"]
TINY_MODEL = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]


# -- SLURM and torchrun environments -----------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, host", [
    ("rack1-[01-02]-gpu", "rack1-01-gpu"),           # a suffix after the brackets
    ("gpu[003-005,9],cpu1", "gpu003"),
    ("a[1-2]-b[07,9]", "a1-b07"),                    # two brackets in one host
    ("node7,node8", "node7"),
    ("node7", "node7"),
    ("x-[12]", "x-12"),
])
def test_first_slurm_host_reads_brackets_anywhere(nodelist, host):
    assert D.first_slurm_host(nodelist) == host


def test_first_slurm_host_refuses_a_broken_list():
    with pytest.raises(UserError, match="cannot read the SLURM node list"):
        D.first_slurm_host("gpu[01-02")


def test_the_slurm_port_is_below_the_ephemeral_range():
    ports = {D.slurm_master_port(j) for j in [0, 1, 12_345, 19_999, 20_000, 39_999, 987_654_321]}
    assert all(20_000 <= p < 32_768 for p in ports) and len(ports) > 3   # Linux hands out 32768-60999 to clients


def test_process_placement_reads_torchrun_and_slurm():
    assert D.process_placement({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}) == (9, 16, 1, 8)
    slurm = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "8",
             "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "77"}
    assert D.process_placement(slurm) == (11, 16, 3, 8)
    torchrun_in_slurm = {**slurm, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}   # torchrun inside a SLURM job wins
    assert D.process_placement(torchrun_in_slurm) == (2, 4, 2, None)
    assert D.process_placement({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == (0, 1, 0, 1)
    assert D.process_placement({}) == (0, 1, 0, 1)


def test_a_plain_python_in_a_batch_script_with_several_tasks_is_refused():
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "77"}   # no job step
    with pytest.raises(UserError, match=r"batch script of SLURM job 77.*8 tasks.*srun python"):
        D.process_placement(batch)


@pytest.fixture
def fake_gpus(monkeypatch):
    "Pretend torch sees `n` CUDA devices (set_device is a no-op)."
    def set_count(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    return set_count


def test_device_selection_with_faked_gpu_counts(fake_gpus, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    fake_gpus(8)
    assert D.select_device("auto", 3, 8) == torch.device("cuda:3")
    assert D.select_device("cpu", 3, 8) == torch.device("cpu")
    with pytest.raises(UserError, match=r"8 processes on this node but 4 visible GPU\(s\).*launch\(nprocs=4\)"):
        fake_gpus(4); D.select_device("auto", 1, 8)                # every rank refuses, rank 1 too
    with pytest.raises(UserError, match="5 processes on this node but 4"):
        D.select_device("auto", 4, None)                           # the local world unknown: the rank alone tells
    fake_gpus(1)                                                   # SLURM --gpus-per-task=1: each task sees its own GPU
    assert D.select_device("auto", 5, 8) == torch.device("cuda:0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")                   # torchrun's 2 processes on a one-GPU machine
    with pytest.raises(UserError, match="2 processes on this node but 1 visible"):
        D.select_device("auto", 1, 2)
    fake_gpus(0)
    assert D.select_device("auto", 0, 1) == torch.device("cpu")
    with pytest.raises(UserError, match="sees no CUDA device"):
        D.select_device("cuda", 0, 1)


def test_setup_refuses_too_many_processes_before_any_process_group(fake_gpus, monkeypatch):
    fake_gpus(2)
    monkeypatch.setattr(T.dist, "init_process_group", lambda *a, **k: pytest.fail("a process group was started"))
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}.items(): monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match="4 processes on this node but 2 visible"):
        T.setup_distributed("auto")


def test_ranks_sharing_a_gpu_are_named():
    placements = [("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a"), ("n1", "GPU-a")]
    assert D.shared_devices(placements) == [(0, 3)]            # the same uuid on another host is another GPU
    assert D.shared_devices(placements[:3]) == []


def test_setup_fills_slurm_rendezvous_from_brackets(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"): monkeypatch.delenv(k, raising=False)
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "rack1-[01-02]-gpu"}
    for k, v in env.items(): monkeypatch.setenv(k, v)
    seen = {}
    def fake_init(backend, rank, world_size, timeout):
        seen.update(backend=backend, rank=rank, world=world_size, timeout=timeout,
                    addr=os.environ["MASTER_ADDR"], port=int(os.environ["MASTER_PORT"]))
        raise RuntimeError("stop here")
    monkeypatch.setattr(T.dist, "init_process_group", fake_init)
    monkeypatch.setenv(D.DIST_TIMEOUT_ENV, "7200")
    with pytest.raises(RuntimeError, match="stop here"):
        T.setup_distributed("cpu")
    assert seen["addr"] == "rack1-01-gpu" and seen["port"] == 20000 + 123456 % 10000 < 32768
    assert (seen["backend"], seen["rank"], seen["world"]) == ("gloo", 1, 2) and seen["timeout"].total_seconds() == 7200


def test_collective_timeout(monkeypatch):
    monkeypatch.delenv(D.DIST_TIMEOUT_ENV, raising=False)
    assert D.dist_timeout().total_seconds() == 3600             # not NCCL's 10 minutes
    monkeypatch.setenv(D.DIST_TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match="positive number of seconds"):
        D.dist_timeout()


def test_omp_threads_share_the_cores():
    assert D.omp_threads(8, cpus=64) == 8 and D.omp_threads(8, cpus=4) == 1 and D.omp_threads(1, cpus=3) == 3


def report_threads() -> tuple[str | None, int]:
    return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()


@pytest.mark.multiproc
def test_launch_sets_omp_threads_for_its_processes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    expected = D.omp_threads(2)
    out = T.launch(report_threads, nprocs=2)
    assert out[0] == out[1] == (str(expected), expected)
    assert "OMP_NUM_THREADS" not in os.environ                   # the caller's environment is left as it was


# -- FSDP2: mixed precision, scalars, the meta device -------------------------------------------------------------

def test_fsdp_root_keeps_its_inputs_fp32():
    block, root = D.fsdp_policies("bf16")
    assert block.param_dtype == root.param_dtype == torch.bfloat16 and root.reduce_dtype == torch.float32
    assert root.cast_forward_inputs is False
    assert D.fsdp_policies("fp32")[1].param_dtype is None


def test_lit_scale_is_not_a_scalar_and_old_files_still_load():
    from prepretrain_lit import lit
    from prepretrain_lit.vit import ViT
    model = lit.LiTModel(ViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2), embed_dim=8, text_width=16,
                         text_layers=1, text_heads=2, context_length=8)
    assert model.logit_scale.shape == (1,)                       # fully_shard refuses 0-dim parameters
    _, _, s = model(torch.randn(2, 3, 16, 16), model.tokenize(["a", "b"]))
    assert s.shape == () and s.item() == pytest.approx(1 / 0.07, rel=1e-5)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    old["logit_scale"] = torch.tensor(2.0)                       # a model.pt written with the scalar
    model.load_state_dict(old)
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == 2.0


def dtypes_worker(jobs: list, out_dir: str) -> list:
    "The dtypes MAE's and SplitMask's batch, targets, noise and losses see in one FSDP bf16 step on 2 gloo ranks."
    from prepretrain_lit import mae as M
    from prepretrain_lit.splitmask import SplitMaskViT
    seen: dict = {}
    mae_loss, sm_targets, real_masking = M.MaskedAutoencoderViT.forward_loss, SplitMaskViT.targets, M.random_masking
    def record_loss(self, imgs, pred, mask):
        loss = mae_loss(self, imgs, pred, mask)
        seen.update(image=str(imgs.dtype), pred=str(pred.dtype), loss=str(loss.dtype))
        return loss
    def record_targets(self, imgs):
        t = sm_targets(self, imgs)
        seen.update(image=str(imgs.dtype), target=str(t.dtype))
        return t
    def record_masking(x, ratio, noise=None):
        seen["noise"] = None if noise is None else str(noise.dtype)
        return real_masking(x, ratio, noise)
    M.MaskedAutoencoderViT.forward_loss, SplitMaskViT.targets, M.random_masking = record_loss, record_targets, record_masking
    info = T.setup_distributed("cpu")
    results = []
    try:
        for stage, cfg in jobs:
            seen.clear()
            torch.manual_seed(0)
            trainer = T.Trainer(cfg, objective_factory(stage)(cfg), T.build_data(stage, cfg, info), out_dir, info, progress=False)
            loss, _ = trainer.train_step(trainer.data.batches(0), 0)
            results.append({**seen, "step_loss": str(loss.dtype)})
        return results
    finally: T.cleanup_distributed(info)


@pytest.mark.multiproc
@pytest.mark.slow
def test_fsdp_bf16_computes_targets_noise_and_losses_in_fp32(tmp_path):
    jobs = [(stage, tiny("train.strategy=fsdp", "train.precision=bf16", "data.batch_size=2", *extra, stage=stage))
            for stage, extra in (("mae", []), ("splitmask", ["splitmask.target=pixels"]))]
    out = T.launch(dtypes_worker, jobs, str(tmp_path), nprocs=2)
    for rank in (0, 1):
        mae, splitmask = out[rank]
        for seen in (mae, splitmask):
            assert seen["image"] == "torch.float32", seen       # the batch is not cast to bf16 by the root
            assert seen["step_loss"] == "torch.float32", seen
        assert mae["noise"] == "torch.float32" and mae["loss"] == "torch.float32", mae
        assert mae["pred"] == "torch.bfloat16", mae             # the layers do compute in bf16
        assert splitmask["target"] == "torch.float32", splitmask


def stages_worker(jobs: list) -> list:
    "Train each (stage, cfg, out_dir) of `jobs` in one process group (set up here and kept across the runs)."
    info = T.setup_distributed("cpu")
    from prepretrain_lit.transfer import probe_data        # the linear probe trains on cached features
    try: return [T.train(stage, cfg, out, progress=False, data=probe_data if stage == "linear_probe" else None)["loss"]
                 for stage, cfg, out in jobs]
    finally: T.cleanup_distributed(info)


def _weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["model"]


@pytest.mark.multiproc
@pytest.mark.slow
def test_lit_splitmask_wsp_and_linear_probe_equal_under_fsdp_and_ddp(tmp_path, digits_manifests):
    "2 gloo ranks, fp32, 2 accumulation steps, activation checkpointing: FSDP (ranks > 0 built on meta) = DDP."
    from prepretrain_lit.data import build_shards, shapes_source
    shapes_manifest = build_shards(shapes_source(64, seed=0, size=32), tmp_path / "shapes", shard_size=16, progress=False)
    common = ["train.precision=fp32", "train.accum_steps=2", "train.activation_checkpointing=true", "train.steps=2",
              "train.checkpoint_every=2", "train.log_every=1", "data.num_workers=0", "train.compile=false"]
    stages = {
        "lit": ["model.depth=2", "model.patch_size=8", *TINY_TEXT, f"data.dataset={shapes_manifest}", "data.batch_size=4"],
        "splitmask": [*TINY, "data.batch_size=2"],
        "wsp": [*TINY_MODEL, f"data.dataset={shapes_manifest}", "data.batch_size=4"],
        "linear_probe": [*TINY_MODEL, f"data.dataset={digits_manifests[0]}", "data.batch_size=16", "eval.num_workers=0"],
    }
    runs = {}
    for strategy in ("ddp", "fsdp"):
        jobs = [(stage, load_config(preset="tiny", stage=stage, overrides=[*extra, *common, f"train.strategy={strategy}"]),
                 str(tmp_path / strategy / stage)) for stage, extra in stages.items()]
        runs[strategy] = T.launch(stages_worker, jobs, nprocs=2)[0]
    assert runs["fsdp"] == pytest.approx(runs["ddp"], rel=1e-4)
    for stage in stages:
        ddp, fsdp = _weights(tmp_path / "ddp" / stage), _weights(tmp_path / "fsdp" / stage)
        assert ddp.keys() == fsdp.keys()
        for name in ddp: torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-5, msg=f"{stage}: {name}")
    assert (tmp_path / "fsdp" / "lit" / "checkpoints" / "step_00000002").is_dir()


def meta_worker(cfg) -> dict:
    "Rank 0 builds the tiny MAE for real, rank 1 on the meta device; both shard; rank 0 returns the gathered weights."
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    info = T.setup_distributed("cpu")
    try:
        torch.manual_seed(123)
        objective = T.build_objective("mae", cfg, on_meta=not info.is_main)
        was_meta = all(p.is_meta for p in objective.parameters())
        trainer = T.Trainer(cfg, objective, T.SyntheticImages(2, 32, 64), "/nonexistent-never-written", info, progress=False)
        full = get_model_state_dict(trainer.objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        buffers = {n: b.clone() for n, b in trainer.objective.named_buffers()}
        return {"was_meta": was_meta, "state": full if info.is_main else None, "buffers": buffers}
    finally: T.cleanup_distributed(info)


@pytest.mark.multiproc
def test_fsdp_ranks_built_on_meta_receive_rank0s_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny("train.strategy=fsdp", "train.precision=fp32", "train.compile=false")
    out = T.launch(meta_worker, cfg, nprocs=2)
    assert out[0]["was_meta"] is False and out[1]["was_meta"] is True   # rank 1 held no weights of its own
    torch.manual_seed(123)
    reference = T.mae_objective(cfg).state_dict()
    assert out[0]["state"].keys() == reference.keys()
    for k, v in reference.items(): torch.testing.assert_close(out[0]["state"][k], v, msg=k)
    for k, b in out[0]["buffers"].items(): torch.testing.assert_close(out[1]["buffers"][k], b, msg=k)   # buffers too


# -- the resume: rank 0 decides ----------------------------------------------------------------------------------

def lagging_rank1_worker(out_dir: str, cfg, mode: str) -> dict:
    "Rank 1 sees no checkpoint at all (`mode=blind`), or cannot load the newest one (`mode=broken`)."
    if int(os.environ["RANK"]) == 1:
        if mode == "blind": T.complete_checkpoints = lambda folder: []
        else:
            real = T.Trainer.load
            def load(self, path):
                if path.name == "step_00000004.pt": raise OSError(5, "Input/output error", str(path))
                return real(self, path)
            T.Trainer.load = load
    return T.train_worker("mae", cfg, out_dir, resume=True)


def _steps(run: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiproc
@pytest.mark.slow
def test_rank0_decides_the_resume_and_a_checkpoint_one_rank_cannot_load_stops_all(tmp_path):
    import shutil
    cfg = tiny("train.steps=4", "train.checkpoint_every=2", "data.batch_size=4", "train.keep_checkpoints=5")
    blind, broken = tmp_path / "blind", tmp_path / "broken"
    T.launch(T.train_worker, "mae", cfg, str(blind), nprocs=2)
    (blind / "model.pt").unlink()
    shutil.copytree(blind, broken)
    C.remove_checkpoint(blind / "checkpoints" / "step_00000004.pt")     # as if stopped after step 3: resume at 2
    out = T.launch(lagging_rank1_worker, str(blind), cfg, "blind", nprocs=2)   # rank 1 sees no checkpoint at all
    assert out[0]["step"] == out[1]["step"] == 4
    assert _steps(blind) == [1, 2, 3, 4]                         # both resumed at 2: steps 3-4 redone once
    before = _steps(broken)
    with pytest.raises(Exception) as raised:                     # rank 1 cannot read step 4, rank 0 can
        T.launch(lagging_rank1_worker, str(broken), cfg, "broken", nprocs=2)
    assert "Input/output error" in str(raised.value) or "OSError" in str(raised.value)
    assert _steps(broken) == before                              # no rank fell back to step 2 and redid steps 3-4
    status = json.loads((broken / "status.json").read_text())
    assert status["state"] == "failed" and "loads here but not on every rank" in status["message"], status


# -- evaluations in a job whose every task runs them ---------------------------------------------------------------

def eval_task_worker(kind: str, cfg, out_dir: str) -> tuple[dict, list]:
    "One task of a 2-task job running `evaluate` (as each SLURM task runs the stage notebook); rank 1 must not write."
    from prepretrain_lit import transfer
    shares = []
    real_extract = transfer.extract_features
    def extract(*args, **kwargs):
        shares.append((kwargs.get("rank", args[8] if len(args) > 8 else 0), kwargs.get("world_size", args[9] if len(args) > 9 else 1)))
        return real_extract(*args, **kwargs)
    transfer.extract_features = extract
    if int(os.environ["RANK"]) == 1:
        transfer.write_results = lambda *a, **k: (_ for _ in ()).throw(AssertionError("rank 1 wrote results.json"))
    return transfer.evaluate(kind, cfg, out_dir, progress=False), shares


@pytest.mark.multiproc
@pytest.mark.slow
def test_an_evaluation_in_every_task_of_a_job_shares_the_extraction_and_writes_once(tmp_path, digits_manifests):
    from prepretrain_lit.transfer import evaluate
    train_m, test_m = digits_manifests
    cfg = load_config(preset="tiny", stage="knn", overrides=TINY_MODEL + [
        f"data.dataset={train_m}", f"eval.dataset={test_m}", "eval.num_workers=0", "train.device=cpu",
        "probe.knn_k=5", "eval.batch_size=128"])
    out = T.launch(eval_task_worker, "knn", cfg, str(tmp_path / "job"), nprocs=2)
    (doc0, shares0), (doc1, shares1) = out[0], out[1]
    assert doc0 == doc1 == json.loads((tmp_path / "job" / "results.json").read_text())
    assert shares0 == [(0, 2), (0, 2)] and shares1 == [(1, 2), (1, 2)]   # train and test sets, half each
    alone = evaluate("knn", cfg, tmp_path / "alone", progress=False)
    assert [r["value"] for r in alone["records"]] == pytest.approx([r["value"] for r in doc0["records"]])


# -- benchmarks/gpu_check.sh: its CPU parts and its arguments ---------------------------------------------------------

GPU_CHECK = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")]


def run_check(*args: str, timeout: int = 600):
    import subprocess
    return subprocess.run([*GPU_CHECK, *args], capture_output=True, text=True, timeout=timeout)


def test_gpu_check_dry_run_and_bad_arguments():
    plan = run_check("--dry-run")
    assert plan.returncode == 0, plan.stderr
    names = [line.split()[0] for line in plan.stdout.splitlines()[:-1]]
    for part in ("device", "tiny-mae-bf16", "tiny-mae-fp16", "tiny-splitmask-pixels", "tiny-splitmask-kmeans",
                 "tiny-mae-compiled", "fsdp", "lit-fsdp", "loader-pinned", "mae-vit_b16", "mae-vit_b16-compiled",
                 "mae-vit_l16-compiled", "mae-vit_h14", "mae-vit_h14-compiled"):
        assert part in names, part
    assert all("timeout" in line for line in plan.stdout.splitlines()[:-1])
    assert "--ours-only --steps 10 --warmup 3" in plan.stdout and "--budget 540s" in plan.stdout
    smoke = run_check("--cpu-smoke", "--dry-run", "--only", "fsdp,device")
    assert smoke.returncode == 0 and [l.split()[0] for l in smoke.stdout.splitlines()[:-1]] == ["device", "fsdp"]
    assert "--device cpu" in smoke.stdout
    for bad, message in ((["--only", "nope"], "no part 'nope'"), (["--frobnicate"], "unknown option"),
                         (["--steps", "ten", "--dry-run"], "whole numbers"), (["--python", "/no/python"], "make install")):
        r = run_check(*bad)
        assert r.returncode == 2 and message in r.stderr, (bad, r.stderr)


def test_gpu_check_reads_the_throughput_table():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec); spec.loader.exec_module(gc)
    text = ("(medians)                         ours img/s  peer img/s  ours/peer   paired\n"
            "train                                1234.50           -          -        -\n"
            "train step achieved: ours 412.3 TFLOP/s; MFU ours 49.4% of 835 TFLOP/s peak dense bf16\n"
            "peak memory: 61.2 GiB\n")
    assert gc.parse_throughput(text) == {"images_per_s": 1234.5, "tflops": 412.3, "mfu": pytest.approx(0.494),
                                         "peak_memory_gib": 61.2}


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_its_parts_and_writes_one_json(tmp_path):
    out = tmp_path / "check.json"
    r = run_check("--cpu-smoke", "--only", "device,tiny-mae-fp32,fsdp,mae-tiny", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    parts = {p["name"]: p for p in doc["parts"]}
    assert doc["failed"] == [] and len(parts) == 4
    tiny = parts["mae fp32"]
    assert tiny["stopped_at"] == 4 and tiny["max_weight_diff"] < 1e-6         # stopped, resumed, the same model
    fsdp = next(p for p in doc["parts"] if p["part"] == "fsdp")
    assert fsdp["dtypes"]["target"] == fsdp["dtypes"]["loss"] == "torch.float32" and fsdp["dcp_round_trip"]
    assert next(p for p in doc["parts"] if p["part"] == "throughput")["images_per_s"] > 0
    assert "parts ok; JSON" in r.stdout and "status" in r.stdout              # the table
    skipped = run_check("--cpu-smoke", "--only", "device", "--budget", "0", "--json", str(tmp_path / "none.json"))
    assert skipped.returncode != 0 and json.loads((tmp_path / "none.json").read_text())["parts"][0]["status"] == "skipped"
