"""The trainer: recipe (schedule, weight-decay and layer-decay groups), DDP and FSDP2 equivalence, exact resume
after SIGKILL, half-written checkpoints, SIGTERM, NaN, the command line."""
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prepretrain_lit.schema import UserError
from prepretrain_lit.config import derive_seed
from prepretrain_lit.presets import load_config
from prepretrain_lit.data import build_shards, shapes_source
from prepretrain_lit.checkpoint import EXIT_PREEMPTED, complete_checkpoints, save_file_atomic
from prepretrain_lit.trainer import (MODEL_INIT_STREAM, SyntheticImages, Trainer, TrainingDiverged, grad_norm_,
                                     train, train_worker)
from prepretrain_lit.objectives import MAEObjective, mae_objective
from prepretrain_lit.distributed import first_slurm_host, launch
from prepretrain_lit.optim import lr_at, param_groups
from tiny_runs import TINY, tiny, weights, wait_for

PRETRAIN = Path(sys.executable).parent / "prepretrain"
def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- the recipe --------------------------------------------------------------------------------------------

def test_schedule_is_warmup_then_half_cosine():
    peak, low = 1e-3, 1e-5
    assert lr_at(0, 100, 10, peak, low) == 0 and lr_at(5, 100, 10, peak, low) == pytest.approx(peak / 2)
    assert lr_at(10, 100, 10, peak, low) == pytest.approx(peak)
    assert lr_at(55, 100, 10, peak, low) == pytest.approx(low + (peak - low) * 0.5)
    assert lr_at(100, 100, 10, peak, low) == pytest.approx(low)
    cosine = [lr_at(s, 100, 10, peak, low) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))


def test_weight_decay_groups_follow_the_recipe():
    objective = mae_objective(tiny())
    groups = param_groups(objective, 0.05)
    names = {id(p): n for n, p in objective.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    expected_no_decay = {n for n, p in objective.named_parameters()
                         if p.requires_grad and (p.ndim <= 1 or n in ("model.cls_token", "model.mask_token"))}
    assert no_decay == expected_no_decay
    assert {"model.cls_token", "model.mask_token", "model.blocks.0.attn.qkv.bias", "model.norm.weight"} <= no_decay
    assert "model.blocks.0.attn.qkv.weight" in decay and "model.patch_embed.proj.weight" in decay
    assert not {"model.pos_embed", "model.decoder_pos_embed"} & (decay | no_decay)   # fixed: not optimised


def test_layer_decay_scales_each_block():
    objective = mae_objective(tiny("model.depth=3"))
    groups = param_groups(objective, 0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n_p in [g["params"]] for p in n_p
             for n in [next(k for k, v in objective.named_parameters() if v is p)]}
    # timm's grouping: stem 0, blocks 1..3 (the final norm joins the last block), the rest (here the decoder,
    # in finetuning the head) on top at 4: scale = 0.5 ** (4 - layer)
    assert scale["model.patch_embed.proj.weight"] == pytest.approx(0.5 ** 4)
    assert scale["model.cls_token"] == pytest.approx(0.5 ** 4)
    assert scale["model.blocks.0.mlp.fc1.weight"] == pytest.approx(0.5 ** 3)
    assert scale["model.blocks.2.mlp.fc1.weight"] == pytest.approx(0.5 ** 1)
    assert scale["model.norm.weight"] == scale["model.blocks.2.mlp.fc1.weight"]
    assert scale["model.decoder_pred.weight"] == pytest.approx(1.0)


def test_lr_scales_with_the_global_batch(tmp_path):
    cfg = tiny("data.batch_size=8", "train.accum_steps=4", "optim.base_lr=1e-3", "train.steps=1")
    trainer = Trainer(cfg, mae_objective(cfg), SyntheticImages(8, 32, 64), tmp_path, progress=False)
    assert trainer.global_batch == 32 and trainer.peak_lr == pytest.approx(1e-3 * 32 / 256)


def test_first_slurm_host():
    assert first_slurm_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_slurm_host("node7") == "node7"


# -- one process -------------------------------------------------------------------------------------------

def test_accumulation_equals_the_big_batch(tmp_path):
    one = train("mae", tiny("data.batch_size=16", "train.steps=3"), tmp_path / "one", progress=False)
    two = train("mae", tiny("data.batch_size=8", "train.accum_steps=2", "train.steps=3"), tmp_path / "two", progress=False)
    for name, value in weights(tmp_path / "one").items():
        torch.testing.assert_close(weights(tmp_path / "two")[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    class NaNAtThirdStep(MAEObjective):
        calls = 0
        def forward(self, batch):
            loss, logs = super().forward(batch)
            type(self).calls += 1
            return (loss * float("nan") if type(self).calls == 3 else loss), logs
    cfg = tiny("train.steps=6", "train.checkpoint_every=1")
    base = mae_objective(cfg)
    objective = NaNAtThirdStep(base.model, cfg.mae.mask_ratio)
    trainer = Trainer(cfg, objective, SyntheticImages(cfg.data.batch_size, 32, 64), tmp_path, progress=False)
    with pytest.raises(TrainingDiverged, match=r"became NaN or infinite at step 3 \(loss on this rank: nan\); the last good checkpoint is kept"):
        trainer.fit()
    assert [s for s, _ in complete_checkpoints(tmp_path / "checkpoints")] == [1, 2]
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "diverged"


def test_resume_skips_half_written_and_damaged_checkpoints(tmp_path):
    cfg = tiny("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5")
    train("mae", cfg, tmp_path, progress=False)
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_00000009.pt.tmp-123").write_bytes(b"half a checkpoint")   # a writer killed mid-write
    (ckpts / "step_00000008.pt").write_bytes(b"damaged")                     # complete name, broken content
    assert [s for s, _ in complete_checkpoints(ckpts)] == [2, 4, 8]
    trainer = Trainer(cfg, mae_objective(cfg), SyntheticImages(cfg.data.batch_size, 32, 64), tmp_path, progress=False)
    with pytest.warns(UserWarning, match="step_00000008.pt does not load"):
        state = trainer.resume()
    assert state["step"] == 4


def test_resume_flags(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        train("mae", tiny("train.steps=2"), tmp_path, resume=True, progress=False)
    with pytest.raises(UserError, match=r"unknown stage 'wsp2' \(did you mean 'wsp'\?\); valid stages: shards, mae"):
        train("wsp2", tiny(), tmp_path, progress=False)


# -- several processes -------------------------------------------------------------------------------------

@pytest.mark.multiproc
@pytest.mark.slow
def test_ddp_equals_one_process_with_the_combined_batch_and_fsdp_equals_ddp(tmp_path):
    common = ("train.steps=3", "train.checkpoint_every=3", "train.precision=fp32")
    train("mae", tiny("data.batch_size=16", *common), tmp_path / "single", progress=False)
    launch(train_worker, "mae", tiny("data.batch_size=8", *common), str(tmp_path / "ddp"), nprocs=2)
    launch(train_worker, "mae", tiny("data.batch_size=8", "train.strategy=fsdp", *common), str(tmp_path / "fsdp"), nprocs=2)
    single, ddp, fsdp = (weights(tmp_path / r) for r in ("single", "ddp", "fsdp"))
    torch.manual_seed(derive_seed(0, MODEL_INIT_STREAM))
    initial = mae_objective(tiny()).model.state_dict()
    assert single.keys() == ddp.keys() == fsdp.keys()
    moved = 0
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5, msg=f"ddp vs single: {name}")
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-5, msg=f"fsdp vs ddp: {name}")
        moved += not torch.equal(single[name], initial[name])
    assert moved > 0.8 * len(single)                          # training really changed (almost) every weight
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert (tmp_path / "fsdp" / "checkpoints" / "step_00000003").is_dir()   # FSDP writes a sharded checkpoint


def test_launch_refuses_functions_new_processes_cannot_import():
    def local(): pass
    local.__module__ = "__main__"
    with pytest.raises(UserError, match="importable from a module"):
        launch(local, nprocs=2)


# -- signals and exact resume through the command line -----------------------------------------------------

@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return build_shards(shapes_source(600, size=32), tmp_path_factory.mktemp("shapes"), shard_size=100, progress=False)


def train_cmd(shapes: Path, out: Path, steps: int) -> list[str]:
    return [str(PRETRAIN), "train", "mae", "--preset", "tiny", "--out", str(out), "--set", f"data.dataset={shapes}",
            "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=10", "--set", "train.log_every=1",
            "--set", "data.batch_size=16", "--set", "data.num_workers=1", "--set", "train.keep_checkpoints=10"]


@pytest.mark.slow
def test_sigkill_and_resume_reproduce_the_uninterrupted_run(tmp_path, shapes):
    steps = 60
    base = subprocess.run(train_cmd(shapes, tmp_path / "whole", steps), capture_output=True, text=True)
    assert base.returncode == 0, base.stderr
    killed = subprocess.Popen(train_cmd(shapes, tmp_path / "killed", steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: (tmp_path / "killed" / "checkpoints" / "step_00000010.pt").exists())
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    status = json.loads((tmp_path / "killed" / "status.json").read_text())
    assert status["state"] == "running", "the run finished before it could be killed: make it longer"
    (tmp_path / "killed" / "checkpoints" / "step_00000050.pt.tmp-1").write_bytes(b"interrupted write")
    again = subprocess.run(train_cmd(shapes, tmp_path / "killed", steps), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")          # the same curve, line for line
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    for name in whole: assert torch.equal(whole[name], resumed[name]), name   # the same weights, bit for bit


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly_then_resumes(tmp_path, shapes):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(shapes, run, 400), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "preempted" and f"stopped by SIGTERM at step {status['step']}: checkpoint saved" in err
    assert "Traceback" not in err
    assert (run / "checkpoints" / f"step_{status['step']:08d}.pt").exists()
    resumed = subprocess.run(train_cmd(shapes, run, status["step"] + 5), capture_output=True, text=True)
    assert resumed.returncode != 0 and "another config" in resumed.stderr   # a different step count is another run
    finished = subprocess.Popen(train_cmd(shapes, run, 400), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = finished.communicate(timeout=600)
    assert finished.returncode == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 401))


def test_cli_train_user_errors(tmp_path):
    res = subprocess.run([str(PRETRAIN), "train", "mae", "--preset", "tiny", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "build it with `prepretrain shards build" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.multiproc
def test_launch_returns_every_ranks_result_and_restores_signal_handlers(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    results = launch(train_worker, "mae", tiny("train.steps=2", "data.batch_size=4"), str(tmp_path), nprocs=2)
    assert sorted(results) == [0, 1] and results[0]["step"] == 2 and results[0]["loss"] == results[1]["loss"]
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_clipping_trains_and_checkpoints_the_scaler(tmp_path, precision):
    cfg = tiny(f"train.precision={precision}", "train.steps=3", "optim.clip_grad=0.5", "train.checkpoint_every=3")
    last = train("mae", cfg, tmp_path, progress=False)
    assert math.isfinite(last["loss"])
    state = torch.load(tmp_path / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert state["scaler"].get("scale") is not None if precision == "fp16" else state["scaler"] == {}


@pytest.mark.multiproc
@pytest.mark.slow
def test_the_command_line_under_torchrun(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(PRETRAIN), "train",
                          "mae", "--preset", "tiny", "--out", str(tmp_path), *[a for o in TINY + ["train.steps=2"] for a in ("--set", o)]],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    assert provenance["config"]["train"]["steps"] == 2
    assert res.stdout.count("\"step\": 2") == 1          # only rank 0 prints the result


def test_a_nan_gradient_with_a_finite_loss_is_caught_before_its_checkpoint(tmp_path):
    class NaNGradientAtStep2(MAEObjective):
        calls = 0
        def forward(self, batch):
            loss, logs = super().forward(batch)
            type(self).calls += 1
            if type(self).calls == 2:     # finite value, NaN gradient: sqrt(x - x) has an infinite slope at 0
                loss = loss + torch.sqrt((self.model.cls_token - self.model.cls_token.detach()).abs()).sum()
                assert torch.isfinite(loss)
            return loss, logs
    cfg = tiny("train.steps=4", "train.checkpoint_every=2", "train.log_every=2")
    objective = NaNGradientAtStep2(mae_objective(cfg).model, cfg.mae.mask_ratio)
    trainer = Trainer(cfg, objective, SyntheticImages(cfg.data.batch_size, 32, 64), tmp_path, progress=False)
    with pytest.raises(TrainingDiverged, match="at step 2"):
        trainer.fit()
    assert complete_checkpoints(tmp_path / "checkpoints") == []       # the step-2 weights were never saved


def test_grad_norm_is_logged(tmp_path):
    last = train("mae", tiny("train.steps=2"), tmp_path, progress=False)
    assert last["grad_norm"] > 0 and "finite" not in last


def test_grad_norm_without_clipping_is_the_reference_norm_and_leaves_gradients_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3, bias=False))
    model(torch.randn(4, 5)).pow(2).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    reference = torch.linalg.vector_norm(torch.cat([g.flatten() for g in before]))
    norm = grad_norm_(model.parameters(), None)
    assert torch.allclose(norm, reference, rtol=1e-6) and all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))   # the old path's norm
    clipped = grad_norm_(model.parameters(), 0.5 * reference.item())                            # clipping: scaled in place
    assert torch.allclose(clipped, reference, rtol=1e-6)
    assert all(torch.allclose(p.grad, 0.5 * g, rtol=1e-5) for p, g in zip(model.parameters(), before))


def test_training_without_clipping_is_unchanged_by_the_norm_only_path(tmp_path, monkeypatch):
    cfg = tiny("train.steps=3", "optim.clip_grad=null")
    assert cfg.optim.clip_grad is None
    train("mae", cfg, tmp_path / "new", progress=False)
    import prepretrain_lit.trainer as trainer_module
    monkeypatch.setattr(trainer_module, "grad_norm_",   # what the trainer did before: clip at infinity to get the norm
                        lambda params, clip: torch.nn.utils.clip_grad_norm_(params, float("inf") if clip is None else clip))
    train("mae", cfg, tmp_path / "old", progress=False)
    norms = [[json.loads(l)["grad_norm"] for l in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("new", "old")]
    assert len(norms[0]) == 3 and norms[0] == pytest.approx(norms[1], rel=1e-6)
    new, old = weights(tmp_path / "new"), weights(tmp_path / "old")
    assert all(torch.equal(new[k], old[k]) for k in new)


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    cfg = tiny("train.steps=2", "train.checkpoint_every=2")
    train("mae", cfg, tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoints" / "step_00000002.pt", weights_only=True)
    state["world_size"] = 4
    save_file_atomic(state, tmp_path / "checkpoints" / "step_00000002.pt")     # records its new checksum
    trainer = Trainer(cfg, mae_objective(cfg), SyntheticImages(cfg.data.batch_size, 32, 64), tmp_path, progress=False)
    with pytest.raises(UserError, match="written by 4 processes, this run has 1"):
        trainer.resume()


def test_a_finished_run_without_its_model_exports_it_on_rerun(tmp_path):
    cfg = tiny("train.steps=2", "train.checkpoint_every=2")
    train("mae", cfg, tmp_path, progress=False)
    exported = weights(tmp_path)
    (tmp_path / "model.pt").unlink()                     # stopped between the last checkpoint and the export
    assert train("mae", cfg, tmp_path, progress=False)["state"] == "complete"
    for name, value in weights(tmp_path).items(): assert torch.equal(value, exported[name])


def test_a_half_written_metrics_line_does_not_break_resume(tmp_path):
    cfg = tiny("train.steps=4", "train.checkpoint_every=2")
    train("mae", cfg, tmp_path, progress=False)
    (tmp_path / "checkpoints" / "step_00000004.pt").unlink()
    (tmp_path / "model.pt").unlink()
    with open(tmp_path / "metrics.jsonl", "a") as f: f.write('{"step": 5, "lo')
    train("mae", cfg, tmp_path, progress=False)
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.multiproc
@pytest.mark.slow
def test_fsdp_resumes_exactly_from_its_sharded_checkpoint(tmp_path):
    import shutil
    cfg = tiny("data.batch_size=8", "train.strategy=fsdp", "train.steps=4", "train.checkpoint_every=2",
               "train.keep_checkpoints=5", "train.precision=fp32")
    launch(train_worker, "mae", cfg, str(tmp_path), nprocs=2)
    whole, curve = weights(tmp_path), losses(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000004")         # as if the run had died after step 2's checkpoint
    (tmp_path / "model.pt").unlink()
    launch(train_worker, "mae", cfg, str(tmp_path), nprocs=2)         # resumes through torch.distributed.checkpoint
    assert losses(tmp_path) == pytest.approx(curve, rel=1e-6)
    for name, value in weights(tmp_path).items():
        torch.testing.assert_close(value, whole[name], rtol=1e-6, atol=1e-7, msg=name)


def test_the_linear_probe_without_a_data_builder_is_refused_naming_the_evaluation(tmp_path):
    "The trainer knows no stage by name: the linear probe's data (cached features) come from `data=`, or it says where."
    from prepretrain_lit.schema import UserError
    from prepretrain_lit.presets import load_config
    from prepretrain_lit.trainer import train, train_stage
    cfg = load_config(preset="tiny", stage="linear_probe")
    for run in (lambda: train("linear_probe", cfg, tmp_path / "a"), lambda: train_stage("linear_probe", cfg, tmp_path / "b", nprocs=2)):
        with pytest.raises(UserError, match=r"cached features.*evaluate\('linear_probe'.*prepretrain evaluate linear_probe"):
            run()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()      # refused before anything is written
