"""`parallelize`: activation checkpointing (none, full, selective), `torch.compile` and FSDP2 per block, DDP around the
objective. Compiled equals eager under DDP and FSDP2 on two gloo ranks, with accumulation and selective checkpointing;
the three checkpointing modes give the same losses and gradients; the config keeps reading `true`/`false`.

The multi-process test compiles with the `aot_eager` backend: it traces the same graphs (dynamo, AOTAutograd, the
checkpoint and its policy inside the block's graph) without inductor's C++ code generation, which takes minutes on
two shared cores. Inductor itself is measured on CPU in benchmarks/compile_blocks.py and checked on a GPU by
benchmarks/gpu_check.py."""
import copy
import json
from pathlib import Path

import pytest
from project import ROOT
import torch

import prepretrain_lit.trainer as T
from prepretrain_lit.schema import ConfigError, UserError
from prepretrain_lit.presets import load_config
from prepretrain_lit.distributed import DistInfo, compile_seconds, parallelize
from prepretrain_lit.vit import CheckpointedBlock, checkpoint_mode

TINY = ["data.dataset=synthetic", "model.depth=2", "model.decoder_depth=1", "train.log_every=1", "train.precision=fp32",
        "train.steps=3", "train.checkpoint_every=3", "train.accum_steps=2", "data.batch_size=4", "data.num_workers=0",
        "model.drop_path_rate=0.0"]


def tiny(*overrides: str):
    return load_config(preset="tiny", overrides=[*TINY, *overrides])


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_config_reads_the_three_modes_and_the_old_switch():
    modes = [tiny(f"train.activation_checkpointing={v}").train.activation_checkpointing
             for v in ("true", "false", "none", "full", "selective")]
    assert modes == ["full", "none", "none", "full", "selective"]
    assert load_config(preset="tiny").train.activation_checkpointing == "none"
    with pytest.raises(ConfigError, match="'none', 'full', 'selective'"):
        tiny("train.activation_checkpointing=partial")
    assert checkpoint_mode(True) == "full" and checkpoint_mode(None) == "none"


def step_losses_and_grads(mode: str) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    objective = T.mae_objective(tiny())
    model = parallelize(objective, DistInfo(), checkpointing=mode)
    torch.manual_seed(1)
    batch = {"image": torch.randn(4, 3, 32, 32), "noise": torch.rand(4, 64)}
    loss, _ = model(batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in objective.named_parameters() if p.grad is not None}


def test_none_full_and_selective_checkpointing_give_the_same_loss_and_gradients():
    (l0, g0), (l1, g1), (l2, g2) = (step_losses_and_grads(m) for m in ("none", "full", "selective"))
    assert l0 == l1 == l2 and g0.keys() == g1.keys() == g2.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(g2[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_parallelize_checkpoints_and_compiles_every_block_and_keeps_the_names():
    torch.manual_seed(0)
    objective = T.mae_objective(tiny())
    names = list(objective.state_dict())
    objective.model.set_grad_checkpointing(True)                 # the model's own switch gives way to the blocks'
    parallelize(objective, DistInfo(), checkpointing="selective", compile=True, backend="aot_eager")
    assert list(objective.state_dict()) == names and objective.model.grad_checkpointing == "none"
    assert all(isinstance(b, CheckpointedBlock) and b.checkpointing == "selective" for b in objective.blocks())
    assert all(b._compiled_call_impl is not None for b in objective.blocks())
    assert objective._compiled_call_impl is None                  # never the whole objective


class TwoBlocks(torch.nn.Module):
    "The smallest objective: two timm blocks and a loss (compiles in seconds)."
    def __init__(self):
        super().__init__()
        from timm.models.vision_transformer import Block
        self.model = torch.nn.Module()
        self.model.blocks = torch.nn.ModuleList([Block(16, 2) for _ in range(2)])
    def blocks(self): return list(self.model.blocks)
    def forward(self, x):
        for b in self.model.blocks: x = b(x)
        return x.square().mean()


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_each_checkpointing_mode_compiles_per_block_and_equals_eager(mode):
    torch.manual_seed(0)
    eager, x = TwoBlocks(), torch.randn(2, 5, 16)
    compiled = parallelize(copy.deepcopy(eager), DistInfo(), checkpointing=mode, compile=True, backend="aot_eager")
    before = compile_seconds()
    loss, reference = compiled(x), eager(x)
    loss.backward(); reference.backward()
    assert compile_seconds() > before
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-7)
    for p, q in zip(compiled.parameters(), eager.parameters()): torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def runs_worker(jobs: list) -> list[dict]:
    "Train each (cfg, out_dir) of `jobs` in one process group; each run's compile seconds on this rank."
    info = T.setup_distributed("cpu")
    try:
        out = []
        for cfg, folder in jobs:
            before = compile_seconds()
            T.train("mae", cfg, folder, progress=False)
            out.append({"compile_s": compile_seconds() - before})
        return out
    finally: T.cleanup_distributed(info)


@pytest.mark.multiproc
@pytest.mark.slow
def test_compiled_blocks_equal_eager_under_ddp_and_fsdp(tmp_path):
    """2 gloo ranks, 2 accumulation steps, selective checkpointing, 3 steps: the losses and weights of compiled blocks
    under DDP and under FSDP2 equal eager DDP's (which equals eager FSDP2: tests/test_trainer.py) to 1e-5 relative."""
    common = ("train.compile_backend=aot_eager", "train.activation_checkpointing=selective")
    runs = {name: (tiny(f"train.strategy={s}", f"train.compile={c}", *common), str(tmp_path / name))
            for name, s, c in (("eager", "ddp", "false"), ("ddp", "ddp", "true"), ("fsdp", "fsdp", "true"))}
    seconds = dict(zip(runs, T.launch(runs_worker, list(runs.values()), nprocs=2)[0]))
    eager = torch.load(tmp_path / "eager" / "model.pt", weights_only=True)["model"]
    assert len(losses(tmp_path / "eager")) == 3 and seconds["eager"]["compile_s"] == 0
    for name in ("ddp", "fsdp"):
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "eager"), rel=1e-5), name
        compiled = torch.load(tmp_path / name / "model.pt", weights_only=True)["model"]
        assert compiled.keys() == eager.keys()
        for key in eager: torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    assert seconds["ddp"]["compile_s"] > 0                          # compiled, and the time was counted apart


def test_the_gpu_check_has_the_parallel_part_in_both_modes():
    import subprocess
    check = [str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--only", "parallel"]
    gpu, cpu = (subprocess.run(["bash", *check, *extra], capture_output=True, text=True) for extra in ([], ["--cpu-smoke"]))
    assert gpu.returncode == cpu.returncode == 0, gpu.stderr + cpu.stderr
    assert "gpu_check.py parallel --device cuda" in gpu.stdout
    assert "parallel --device cpu --preset tiny" in cpu.stdout and "--backend aot_eager" in cpu.stdout


@pytest.mark.slow
def test_the_gpu_checks_parallel_part_runs_on_the_cpu():
    "Its CPU path (one gloo rank, FSDP2, aot_eager): eager and the three compiled modes train the same losses."
    import subprocess, sys
    script = ROOT / "benchmarks" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "parallel", "--device", "cpu", "--preset", "tiny", "--batch", "4",
                        "--precision", "fp32", "--backend", "aot_eager", "--steps", "1", "--tolerance", "1e-5"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert result["ok"] and result["max_rel_loss_diff"] <= 1e-5 and result["compile_s_none"] > 0
    assert result["compile_s_eager"] == 0 and result["peak_gib_none"] is None      # no CUDA: memory not compared


def test_the_trainer_compiles_blocks_never_the_wrapped_model(tmp_path):
    cfg = tiny("train.compile=true", "train.compile_backend=aot_eager", "train.activation_checkpointing=full")
    trainer = T.Trainer(cfg, T.mae_objective(cfg), T.SyntheticImages(4, 32, 64), tmp_path, progress=False)
    assert trainer.compile and trainer.model is trainer.objective and trainer.objective._compiled_call_impl is None
    assert all(b._compiled_call_impl is not None and b.checkpointing == "full" for b in trainer.objective.blocks())
    assert trainer.objective.model.grad_checkpointing == "none"      # checkpointed once, by the blocks
    with pytest.raises(UserError, match="not a torch.compile backend"):
        T.Trainer(tiny("train.compile=true", "train.compile_backend=inductr"), T.mae_objective(cfg),
                  T.SyntheticImages(4, 32, 64), tmp_path / "b", progress=False)


def test_lit_text_blocks_of_open_clip_checkpoint_and_compile_too():
    "Another library's blocks (open_clip's, called with an attention mask keyword): the same loss and gradients."
    import warnings
    from prepretrain_lit.objectives import lit_objective
    cfg = load_config(preset="tiny", stage="lit", overrides=["model.depth=2", "model.patch_size=8", "lit.embed_dim=32",
                      "lit.text_width=32", "lit.text_layers=2", "lit.text_heads=4", "lit.context_length=16"])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # a random locked tower: this checks the blocks only
        eager = lit_objective(cfg)
    compiled = parallelize(copy.deepcopy(eager), DistInfo(), checkpointing="selective", compile=True, backend="aot_eager")
    assert all(isinstance(b, CheckpointedBlock) for b in compiled.model.text.transformer.resblocks)
    assert not any(isinstance(b, CheckpointedBlock) for b in compiled.model.image.blocks)   # frozen: nothing to keep
    batch = {"image": torch.randn(4, 3, 32, 32), "caption": [f"a photo of shape {i}" for i in range(4)]}
    (a, _), (b, _) = compiled(batch), eager(batch)
    a.backward(); b.backward()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        if q.grad is not None: torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
