"""MAE training throughput: this package against Hugging Face `transformers.ViTMAEForPreTraining`, side by side.

Both sides get the same architecture (width, depth, heads, MLP ratio, decoder width/depth/heads, patch and
image size, mask ratio, norm_pix_loss; the script checks that their parameter counts are equal), the same
batch of synthetic images and the same masking noise, the same precision (bf16 autocast on both, or fp32 on
both), AdamW with MAE's betas and no decay on 1-D parameters (the fused kernel on both sides, as the trainer uses) and, with --compile, torch.compile on both. This package's step is its real training path, `Trainer.train_step` (autocast, backward, the
gradient norm it logs, AdamW, lr schedule); the peer's is the plain loop an HF user writes. The two are timed
alternately (A B, B A, A B, ...) so that the load of a shared machine falls on both alike; medians and their ratio
are printed for the training step and for a forward-only encoder pass (eval, no grad).

It also prints model FLOPs utilisation: the matmul and attention FLOPs of the step (counted analytically: patch
embedding, visible-token encoder, decoder; x3 for forward + backward, x2 for the patch projection, whose input
needs no gradient) per second, over the device's peak dense bf16 rate (GPU) and over the machine's own measured
matmul rate at the run's precision, with the goals (>= 80% of it in fp32, >= 60% in bf16; never slower than the
peer at equal precision) and whether they are met. The first step of each side (with --compile: the compilation)
is timed apart; --json PATH writes the train-step row for a GPU check to collect. --attention fused|math forces
our attention kernel (default auto, the trainer's choice: two matmuls around a softmax on a CPU under bf16, SDPA
elsewhere); the peer always calls SDPA.

    .venv/bin/python benchmarks/mae_throughput.py                                  # CPU: ViT-S/16, 224 px, batch 8, fp32
    .venv/bin/python benchmarks/mae_throughput.py --precision bf16                 # CPUs with AVX512-BF16 / AMX only
    .venv/bin/python benchmarks/mae_throughput.py --model vit_l16 --batch 256 --precision bf16 --compile   # GPU
    .venv/bin/python benchmarks/mae_throughput.py --model vit_h14 --precision bf16 --device cuda:0 --ours-only --json h14.json

Numbers are only comparable within one run on one machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

from prepretrain_lit.schema import MAEConfig, ModelConfig, RunConfig
from prepretrain_lit.presets import load_config
from prepretrain_lit.distributed import DistInfo
from prepretrain_lit.trainer import SyntheticImages, Trainer
from prepretrain_lit.objectives import mae_objective
from prepretrain_lit.optim import param_groups

# Peak dense bf16 tensor-core rates (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name(); the
# longest key found in the name wins ("NVIDIA H200 NVL" is an H200 NVL, not an H200; "GH200" not "H200").
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200 NVL": 835.0, "H200": 989.0,
                    "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "A10": 125.0}

# The goals of the performance issue: the train step's share of this machine's own matmul rate at the run's
# precision (fp32: >= 80%; bf16: >= 60%, where LayerNorm, softmax and casts weigh more), and ours/peer >= 1 at equal precision.
MFU_GOALS = {"fp32": 0.80, "bf16": 0.60}

# --model: a preset of prepretrain_lit.config, and the batch used when --batch is not given
# (CPU: a batch a laptop runs in seconds; GPU: batches that fill an 80 GB card in bf16). `tiny` (32 px) is a smoke test.
MODELS = {"tiny": dict(cpu_batch=32, gpu_batch=512), "vit_s16": dict(cpu_batch=8, gpu_batch=512), "vit_b16": dict(cpu_batch=8, gpu_batch=512),
          "vit_l16": dict(cpu_batch=4, gpu_batch=256), "vit_h14": dict(cpu_batch=2, gpu_batch=128)}


# -- FLOPs -------------------------------------------------------------------------------------------------

def linear_flops(tokens: int, fan_in: int, fan_out: int) -> int:
    "Forward FLOPs of a linear map applied to `tokens` rows: 2 per multiply-add."
    return 2 * tokens * fan_in * fan_out

def block_flops(tokens: int, width: int, mlp_hidden: int) -> int:
    "Forward FLOPs of one transformer block over `tokens` tokens: qkv, q.k^T and attn.v, output projection, MLP."
    attention = 2 * 2 * tokens * tokens * width          # two (T x T x d) products per head, heads x d = width
    return (linear_flops(tokens, width, 3 * width) + attention + linear_flops(tokens, width, width)
            + linear_flops(tokens, width, mlp_hidden) + linear_flops(tokens, mlp_hidden, width))

@dataclass
class MAEFlops:
    "Forward FLOPs of one MAE step on `batch` images, by part (matmuls, convolution and attention only)."
    patch_embed: int   # the patch projection, over all L patches (MAE embeds every patch, then masks)
    encoder: int       # the encoder blocks over 1 + K visible tokens (K = int(L * (1 - mask_ratio)))
    decoder: int       # decoder_embed over 1 + K tokens, the decoder blocks and decoder_pred over 1 + L tokens

    @property
    def forward(self) -> int: return self.patch_embed + self.encoder + self.decoder

    @property
    def train(self) -> int:
        """Forward + backward: backward costs twice the forward (input and weight gradients), except for the patch
        projection, whose input (the images) needs no gradient."""
        return 3 * (self.encoder + self.decoder) + 2 * self.patch_embed

def mae_flops(m: ModelConfig, mask_ratio: float, batch: int) -> MAEFlops:
    "The FLOPs of a MAE step for model `m` at `mask_ratio` on `batch` images."
    L, K = m.num_patches, int(m.num_patches * (1 - mask_ratio))
    D, Dd, pixels = m.embed_dim, m.decoder_embed_dim, m.patch_size ** 2 * m.in_chans
    H, Hd = int(m.mlp_ratio * D), int(m.mlp_ratio * Dd)
    patch_embed = linear_flops(L, pixels, D)
    encoder = m.depth * block_flops(K + 1, D, H)
    decoder = (linear_flops(K + 1, D, Dd) + m.decoder_depth * block_flops(L + 1, Dd, Hd)
               + linear_flops(L + 1, Dd, pixels))
    return MAEFlops(batch * patch_embed, batch * encoder, batch * decoder)

def peak_tflops(device_name: str) -> float | None:
    "The peak dense bf16 TFLOP/s of a device named `device_name` (its most specific key), or None when unknown."
    found = [k for k in PEAK_BF16_TFLOPS if k in device_name]
    return PEAK_BF16_TFLOPS[max(found, key=len)] if found else None


# -- the peer ----------------------------------------------------------------------------------------------

def peer_config(m: ModelConfig, mae: MAEConfig):
    "The `ViTMAEConfig` of the same MAE as `m` and `mae` (sdpa attention, no dropout, LayerNorm eps 1e-6)."
    from transformers import ViTMAEConfig
    return ViTMAEConfig(hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
                        intermediate_size=int(m.mlp_ratio * m.embed_dim), hidden_act="gelu",
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6,
                        image_size=m.img_size, patch_size=m.patch_size, num_channels=m.in_chans, qkv_bias=True,
                        decoder_hidden_size=m.decoder_embed_dim, decoder_num_hidden_layers=m.decoder_depth,
                        decoder_num_attention_heads=m.decoder_num_heads,
                        decoder_intermediate_size=int(m.mlp_ratio * m.decoder_embed_dim),
                        mask_ratio=mae.mask_ratio, norm_pix_loss=mae.norm_pix_loss, attn_implementation="sdpa")

def build_peer(m: ModelConfig, mae: MAEConfig):
    "Hugging Face's `ViTMAEForPreTraining` for the same MAE."
    from transformers import ViTMAEForPreTraining
    return ViTMAEForPreTraining(peer_config(m, mae))

_BLOCK_NAMES = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_TOP_NAMES = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
              "patch_embed.proj": "vit.embeddings.patch_embeddings.projection", "norm": "vit.layernorm",
              "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.decoder_pos_embed",
              "decoder_embed": "decoder.decoder_embed", "decoder_norm": "decoder.decoder_norm",
              "decoder_pred": "decoder.decoder_pred"}

def peer_state_dict(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    "Our MAE's (official-layout) state dict under the peer's names; the fused qkv projection split into q, k, v."
    out = {}
    for key, value in ours.items():
        parts = key.split(".")
        if parts[0] in ("blocks", "decoder_blocks"):
            prefix = f"vit.layers.{parts[1]}" if parts[0] == "blocks" else f"decoder.decoder_layers.{parts[1]}"
            inner, leaf = ".".join(parts[2:-1]), parts[-1]
            if inner == "attn.qkv":
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}.attention.{name}.{leaf}"] = chunk
            else: out[f"{prefix}.{_BLOCK_NAMES[inner]}.{leaf}"] = value
        else:
            stem, leaf = (key, None) if key in _TOP_NAMES else (".".join(parts[:-1]), parts[-1])
            out[_TOP_NAMES[stem] + ("" if leaf is None else f".{leaf}")] = value
    return out

def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    "(trainable, all) parameter counts; the fixed sin-cos position embeddings are parameters without gradient."
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


# -- timing ------------------------------------------------------------------------------------------------

def interleaved_times(steps: dict[str, Callable[[], object]], warmup: int, iters: int, device: torch.device,
                      first: dict | None = None, first_seconds: dict | None = None) -> dict[str, list[float]]:
    """Seconds per call of each step, calling them in turn, `warmup` untimed then `iters` timed rounds. The order
    flips every round (A B, B A, A B, ...): whichever goes second in a round was measured to run up to 20% slower
    on a loaded CPU (the same module against itself), so each side goes first half of the time.
    `first`, when given, receives what each step returned the first time; `first_seconds` how long that first call
    took (with --compile: the compilation, which the timed steps never include)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)   # this GPU, not cuda:0
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + iters):
        for name, step in (list(steps.items()) if round_ % 2 == 0 else reversed(steps.items())):
            sync()
            start = time.perf_counter()
            result = step()
            sync()
            if round_ >= warmup: times[name].append(time.perf_counter() - start)
            if first_seconds is not None and round_ == 0: first_seconds[name] = time.perf_counter() - start
            if first is not None and first.get(name) is None: first[name] = result
            del result
    return times


def make_config(model: str, batch: int, precision: str, compile_: bool, device: torch.device,
                attention: str = "auto") -> RunConfig:
    return load_config(preset=model, overrides=["data.dataset=synthetic", f"data.batch_size={batch}",
                                                f"train.precision={precision}", f"train.compile={compile_}",
                                                f"train.device={device.type}", "train.steps=1000000",
                                                f"train.attention={attention}"])


def ours_train_step(cfg: RunConfig, batch: dict, out_dir: str) -> tuple[Callable[[], object], Trainer]:
    "This package's training step: `Trainer.train_step` on `batch`, again and again; and its trainer."
    torch.manual_seed(0)
    data = SyntheticImages(cfg.data.batch_size, cfg.model.img_size, cfg.model.num_patches)
    device = batch["image"].device
    trainer = Trainer(cfg, mae_objective(cfg), data, out_dir, DistInfo(device=device), progress=False)
    repeat, counter = iter(lambda: batch, None), iter(range(10 ** 9))
    return (lambda: trainer.train_step(repeat, next(counter))[0]), trainer


def peer_train_step(cfg: RunConfig, batch: dict, device: torch.device, weights: dict | None = None
                    ) -> tuple[Callable[[], object], torch.nn.Module]:
    """Hugging Face's training step on `batch`: autocast, forward, backward, AdamW with the same settings as ours.
    `weights`: our MAE's state dict to start from (so both sides compute the same first loss)."""
    torch.manual_seed(0)
    model = build_peer(cfg.model, cfg.mae)
    if weights is not None: model.load_state_dict(peer_state_dict(weights), strict=True)
    model = model.to(device).train()
    run = torch.compile(model) if cfg.train.compile else model
    groups = param_groups(model, cfg.optim.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.scaled_lr(cfg.data.batch_size), betas=cfg.optim.betas,
                            fused=True)     # the same kernel as the trainer's
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
    images, noise = batch["image"], batch["noise"]
    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = run(pixel_values=images, noise=noise).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step, model


def encoder_steps(ours, peer, cfg: RunConfig, batch: dict, device: torch.device) -> dict[str, Callable[[], object]]:
    "Forward-only MAE encoder passes (visible tokens only; eval mode, no grad) of both models."
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
    ratio, images, noise = cfg.mae.mask_ratio, batch["image"], batch["noise"]
    maybe_compile = torch.compile if cfg.train.compile else (lambda fn: fn)
    def wrap(fn):
        def step():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                return fn()
        return step
    ours_enc = maybe_compile(ours.forward_encoder)
    steps = {"ours": wrap(lambda: ours_enc(images, ratio, noise))}
    if peer is not None:
        peer_enc = maybe_compile(peer.vit)
        steps["peer"] = wrap(lambda: peer_enc(pixel_values=images, noise=noise))
    return steps


def summarise(times: list[float], batch: int) -> tuple[float, float]:
    "(median seconds per step, images/s at the median)."
    median = statistics.median(times)
    return median, batch / median

def paired_ratio(ours: list[float], peer: list[float]) -> float:
    "Median over rounds of peer time / our time: each pair ran back to back, so slow drifts of the load cancel."
    return statistics.median(p / o for o, p in zip(ours, peer))


def matmul_rate(device: torch.device, precision: str, n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of this machine's best kernel as the run uses it: an n x n x n matmul at the run's precision (bf16
    operands for bf16) and thread count, the fastest of `reps` after one warm-up (on a shared machine the fastest
    is the nearest to what the core does alone): the denominator of "CPU MFU"."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 1):
        if device.type == "cuda": torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda": torch.cuda.synchronize(device)
        if i: times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="vit_s16", help="default: vit_s16 (224 px)")
    parser.add_argument("--batch", type=int, help="images per step (default: per model, CPU or GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (default: 10 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per side first (default: 2 CPU, 5 GPU)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="both sides; default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s (default: looked up by name)")
    parser.add_argument("--no-encoder", action="store_true", help="skip the forward-only encoder comparison")
    parser.add_argument("--ours-only", action="store_true", help="time this package only (MFU sweeps on a GPU)")
    parser.add_argument("--default-vs-peer-fp32", action="store_true",
                        help="also time this package's default precision (bf16 autocast) against the peer in fp32: "
                             "a different-precision row, labelled as such")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    parser.add_argument("--attention", choices=("auto", "fused", "math"), default="auto",
                        help="our attention kernel (train.attention; auto: math on CPU under bf16, else fused SDPA); "
                             "the peer always uses SDPA")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="n of the n^3 matmul that measures the machine's own rate (default: 2048 CPU, 8192 GPU)")
    parser.add_argument("--json", help="also write the train-step row (images/s, first-step seconds, MFU, memory) to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda and device.index is not None: torch.cuda.set_device(device)   # --device cuda:N: compile and allocations there too
    if args.threads: torch.set_num_threads(args.threads)
    precision = args.precision or ("bf16" if cuda else "fp32")
    batch_size = args.batch or MODELS[args.model]["gpu_batch" if cuda else "cpu_batch"]
    steps, warmup = args.steps or (30 if cuda else 10), args.warmup if args.warmup is not None else (5 if cuda else 2)

    if device.type == "cpu" and "bf16" in (precision, "bf16" if args.default_vs_peer_fp32 else "") \
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("warning: this CPU has no native bf16 matmul (no AVX512-BF16 / AMX): bf16 autocast falls back to a "
              "scalar kernel, measured ~100x slower than fp32 on an AVX2 EPYC; use --precision fp32 here")
    cfg = make_config(args.model, batch_size, precision, args.compile, device, args.attention)
    m = cfg.model
    data = SyntheticImages(batch_size, m.img_size, m.num_patches)
    batch = {k: v.to(device) for k, v in next(data.batches()).items() if k in ("image", "noise")}
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"MAE {args.model}: img {m.img_size}, patch {m.patch_size}, encoder {m.embed_dim}x{m.depth} ({m.num_heads} heads), "
          f"decoder {m.decoder_embed_dim}x{m.decoder_depth} ({m.decoder_num_heads} heads), mask {cfg.mae.mask_ratio}, "
          f"norm_pix_loss={cfg.mae.norm_pix_loss}")
    print(f"batch {batch_size}, {precision}, compile={args.compile}, {name}, torch {torch.__version__}, "
          f"{warmup} warm-up + {steps} timed steps per side, interleaved")

    with tempfile.TemporaryDirectory() as out:
        ours_step, ours_trainer = ours_train_step(cfg, batch, out)
        ours_model, attention = ours_trainer.objective.model, ours_trainer.attention    # what the trainer resolved
        print(f"attention: ours {attention} (train.attention={args.attention}; 'math': two matmuls around a "
              f"softmax), peer scaled_dot_product_attention")
        train_steps = {"ours": ours_step}
        peer_model = None
        if not args.ours_only:
            import transformers
            peer_step, peer_model = peer_train_step(cfg, batch, device, ours_model.state_dict())
            ours_n, peer_n = param_counts(ours_model), param_counts(peer_model)
            if ours_n != peer_n:
                raise SystemExit(f"the peer is not the same model: parameters (trainable, all) ours {ours_n}, peer {peer_n}")
            print(f"parameters: {ours_n[0] / 1e6:.2f}M trainable, {ours_n[1] / 1e6:.2f}M in all, on both sides "
                  f"(transformers {transformers.__version__}, attn_implementation=sdpa)")
            train_steps["peer"] = peer_step
        rows = []
        first: dict = {}
        first_s: dict = {}
        t = interleaved_times(train_steps, warmup, steps, device, first, first_s)
        print("first-step loss (same weights, same noise): " + ", ".join(f"{k} {float(v):.6f}" for k, v in first.items()))
        rows.append(("train step", {k: summarise(v, batch_size) for k, v in t.items()}, t))
        if not args.no_encoder:
            ours_model.eval()
            if peer_model is not None: peer_model.eval()
            t = interleaved_times(encoder_steps(ours_model, peer_model, cfg, batch, device), warmup, steps, device)
            rows.append(("encoder forward (25% visible)", {k: summarise(v, batch_size) for k, v in t.items()}, t))
            ours_model.train()
            if peer_model is not None: peer_model.train()
        if args.default_vs_peer_fp32 and not args.ours_only:
            if precision != "fp32": raise SystemExit("--default-vs-peer-fp32 needs --precision fp32 (the peer's side)")
            bf16_cfg = make_config(args.model, batch_size, "bf16", args.compile, device, args.attention)
            ours_bf16, _ = ours_train_step(bf16_cfg, batch, out)
            t = interleaved_times({"ours": ours_bf16, "peer": train_steps["peer"]}, warmup, steps, device)
            rows.append(("train: ours bf16 vs peer fp32", {k: summarise(v, batch_size) for k, v in t.items()}, t))

    print()
    print(f"{'(medians)':32} {'ours img/s':>11} {'peer img/s':>11} {'ours/peer':>10} {'paired':>8}")
    for label, r, raw in rows:
        ours_ips = r["ours"][1]
        if "peer" in r:
            print(f"{label:32} {ours_ips:>11.2f} {r['peer'][1]:>11.2f} {ours_ips / r['peer'][1]:>9.3f}x "
                  f"{paired_ratio(raw['ours'], raw['peer']):>7.3f}x")
        else:
            print(f"{label:32} {ours_ips:>11.2f} {'-':>11} {'-':>10} {'-':>8}")
    print("ours/peer: ratio of the medians; paired: median of the per-round ratios (each round times both back to back)")
    if any(label.startswith("train: ours bf16") for label, *_ in rows):
        print("(the last row compares different precisions: this package's default bf16 autocast against the peer in "
              "fp32; it is not a like-for-like ratio)")
    print("first step, untimed (" + ("includes torch.compile" if args.compile else "eager: allocator and kernel warm-up")
          + "): " + ", ".join(f"{k} {v:.1f} s" for k, v in first_s.items()))

    flops = mae_flops(m, cfg.mae.mask_ratio, batch_size)
    rate = lambda n, seconds: f"{n / seconds / 1e12:.1f} TFLOP/s" if cuda else f"{n / seconds / 1e9:.1f} GFLOP/s"
    print(f"\nmodel FLOPs per step: {flops.train / 1e9:.1f} GFLOP train (forward {flops.forward / 1e9:.1f}: patch "
          f"embedding {flops.patch_embed / flops.forward:.1%}, encoder {flops.encoder / flops.forward:.1%}, "
          f"decoder {flops.decoder / flops.forward:.1%})")
    train = rows[0][1]
    line = f"train step achieved: ours {rate(flops.train, train['ours'][0])}"
    if "peer" in train: line += f", peer {rate(flops.train, train['peer'][0])}"
    peak = args.peak_tflops or (peak_tflops(name) if cuda else None)
    mfu = (lambda seconds: flops.train / seconds / 1e12 / peak) if peak else None
    if mfu:
        line += f"; MFU ours {mfu(train['ours'][0]):.1%}" + (f", peer {mfu(train['peer'][0]):.1%}" if "peer" in train else "")
        line += f" of {peak:.0f} TFLOP/s peak dense bf16"
    elif cuda: line += " (pass --peak-tflops for MFU)"
    print(line)
    if len(rows) > 1 and rows[1][0].startswith("encoder"):
        enc, r = flops.patch_embed + flops.encoder, rows[1][1]
        print(f"encoder forward: {enc / 1e9:.1f} GFLOP per pass, ours {rate(enc, r['ours'][0])}"
              + (f", peer {rate(enc, r['peer'][0])}" if "peer" in r else ""))
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
    if cuda: print(f"peak memory: {memory:.1f} GiB")
    matmul_n = args.matmul_size or (8192 if cuda else 2048)
    measured = matmul_rate(device, precision, n=matmul_n)
    share = lambda seconds: flops.train / seconds / measured
    goal = MFU_GOALS.get(precision)
    print(f"{'GPU' if cuda else 'CPU'} MFU: this machine's {matmul_n}^3 matmul runs at {rate(2 * matmul_n ** 3, 2 * matmul_n ** 3 / measured)} "
          f"({precision}, {'device ' + name if cuda else str(torch.get_num_threads()) + ' threads'}, measured after the steps); "
          f"the train step reaches ours {share(train['ours'][0]):.0%}" + (f", peer {share(train['peer'][0]):.0%}" if "peer" in train else "")
          + " of it")
    goals = {}
    if goal is not None:
        goals["mfu"] = share(train["ours"][0]) >= goal
        print(f"goal: the train step at >= {goal:.0%} of the measured matmul rate in {precision}: "
              f"{'met' if goals['mfu'] else 'NOT met'} ({share(train['ours'][0]):.0%})")
    paired = paired_ratio(rows[0][2]["ours"], rows[0][2]["peer"]) if "peer" in train else None
    if paired is not None:
        goals["peer"] = paired >= 1.0
        print(f"goal: never slower than the peer at equal precision ({precision} both): ours/peer {paired:.3f}x paired, "
              f"{train['peer'][0] / train['ours'][0]:.3f}x of the medians: {'met' if goals['peer'] else 'NOT met'}")
    from prepretrain_lit.trainer import resolve_precision
    default = resolve_precision("auto", device)
    differs = default != "fp32"
    print(f"defaults: this package's train.precision=auto is {default} on this device; the peer's (transformers) is fp32"
          + (f": our default row against the peer's default differs in precision ({default} vs fp32), see "
             "--default-vs-peer-fp32" if differs else ": the same precision") + f"; this run used {precision} on both sides")
    if args.json:
        result = {"model": args.model, "batch": batch_size, "precision": precision, "compile": bool(args.compile),
                  "attention": attention,
                  "device": str(device), "device_name": name, "torch": torch.__version__, "steps": steps, "warmup": warmup,
                  "train_step_s": {k: v[0] for k, v in train.items()}, "images_per_s": {k: v[1] for k, v in train.items()},
                  "first_step_s": first_s, "paired_ours_over_peer": paired,
                  "model_tflop_per_step": flops.train / 1e12,
                  "achieved_tflops": {k: flops.train / v[0] / 1e12 for k, v in train.items()},
                  "peak_bf16_tflops": peak, "mfu_of_peak": {k: mfu(v[0]) for k, v in train.items()} if mfu else None,
                  "matmul_tflops": measured / 1e12, "matmul_n": matmul_n,
                  "share_of_matmul": {k: share(v[0]) for k, v in train.items()}, "goal_share": goal, "goals_met": goals,
                  "peak_memory_gib": memory, "default_precision": default, "peer_default_precision": "fp32",
                  "rows": [{"row": label, **{f"{k}_images_per_s": v[1] for k, v in r.items()}} for label, r, _ in rows]}
        from pathlib import Path
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
