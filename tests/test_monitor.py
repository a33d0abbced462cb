"""The online k-NN monitor (`eval.monitor`, nbs/05c_knn.ipynb): it logs the trunk's k-NN top-1 at its steps, and the
run it watches trains exactly as without it (same losses, same weights), resumes exactly, and gives the same number on
one process, under DDP and under FSDP2."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from prepretrain_lit.schema import ConfigError, UserError
from prepretrain_lit.trainer import train, train_worker
from prepretrain_lit.distributed import launch
from tiny_runs import tiny, weights

RUN = ("train.steps=6", "train.precision=fp32", "train.checkpoint_every=100")


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def monitored(run: Path) -> dict[int, float]:
    found = [(r["step"], r["monitor/knn_top1"]) for r in records(run) if "monitor/knn_top1" in r]
    assert len({s for s, _ in found}) == len(found), f"a step monitored twice: {found}"
    return dict(found)


def with_monitor(digits: Path, every: int, *extra: str):
    return tiny(*RUN, *extra, f"eval.monitor.every={every}", f"eval.monitor.dataset={digits}", "eval.monitor.samples=150")


def test_the_monitor_logs_knn_at_its_steps_and_the_run_trains_as_without_it(tmp_path, digits_manifests, shapes_manifest,
                                                                           monkeypatch):
    """WSP on shapes, read in this process (its crops and flips draw from torch's global stream) with drop path (global
    stream, and off in eval mode): same losses and weights with the monitor on as off, even with a monitor that draws
    from every global stream (as a random transform or a library might). Fails if the monitor left a stream moved or
    the trunk in eval mode (both checked by hand against such mutants)."""
    import prepretrain_lit.knn as knn
    real = knn.pooled_features
    def noisy(trunk, imgs, pool="cls"):
        torch.rand(3); random.random(); np.random.rand()
        return real(trunk, imgs, pool)
    run = (f"data.dataset={shapes_manifest}", "data.num_workers=0", "data.batch_size=16", "train.steps=4",
           "model.drop_path_rate=0.2", "train.precision=fp32", "train.checkpoint_every=100")
    train("wsp", tiny(*run, stage="wsp"), tmp_path / "off", progress=False)
    monkeypatch.setattr(knn, "pooled_features", noisy)
    train("wsp", tiny(*run, "eval.monitor.every=3", f"eval.monitor.dataset={digits_manifests[1]}", "eval.monitor.samples=150",
                      stage="wsp"), tmp_path / "on", progress=False)
    assert losses(tmp_path / "on") == losses(tmp_path / "off")          # exactly: not a bit of the training moved
    for name, value in weights(tmp_path / "off").items(): assert torch.equal(weights(tmp_path / "on")[name], value), name
    knn_top1 = monitored(tmp_path / "on")
    assert sorted(knn_top1) == [0, 3, 4]                                # the start, every 3 steps, the last step
    assert all(10.0 < v <= 100.0 for v in knn_top1.values()), knn_top1  # 10 digits: a random tiny trunk is above chance
    assert not monitored(tmp_path / "off")


def test_monitor_lines_survive_resume_exactly_once(tmp_path, digits_manifests):
    "Killed after step 6 with its last checkpoint at 3: steps 4-6 run again, their monitor lines once, with the same values."
    cfg = with_monitor(digits_manifests[1], 2, "train.checkpoint_every=3", "train.keep_checkpoints=5")
    train("mae", cfg, tmp_path, progress=False)
    whole = monitored(tmp_path)
    assert sorted(whole) == [0, 2, 4, 6]
    for f in (tmp_path / "checkpoints").glob("step_00000006*"): f.unlink()     # as if killed before step 6's checkpoint
    (tmp_path / "model.pt").unlink()
    train("mae", cfg, tmp_path, progress=False)
    assert monitored(tmp_path) == whole


def test_a_run_may_resume_with_the_monitor_turned_on(tmp_path, digits_manifests):
    "The monitor changes nothing a run computes, so it is not part of the run's identity: a requeue may add it."
    from prepretrain_lit.presets import config_hash
    plain = tiny(*RUN, "train.checkpoint_every=3")
    watched = with_monitor(digits_manifests[1], 2, "train.checkpoint_every=3")
    assert config_hash(plain) == config_hash(watched)
    train("mae", plain, tmp_path, progress=False)
    (tmp_path / "model.pt").unlink()
    for f in (tmp_path / "checkpoints").glob("step_00000006*"): f.unlink()
    train("mae", watched, tmp_path, progress=False)                 # resumed from step 3, not refused
    assert sorted(monitored(tmp_path)) == [4, 6]


def test_the_monitor_is_refused_in_one_line_without_a_labelled_set(tmp_path, shapes_manifest):
    with pytest.raises(ConfigError, match="eval.monitor.every=5 needs eval.monitor.dataset"):
        tiny("eval.monitor.every=5").check()
    with pytest.raises(ConfigError, match="eval.monitor.every=-1 must be >= 0"):
        tiny("eval.monitor.every=-1").check()
    with pytest.raises(UserError, match="eval.monitor.dataset=.*is not a manifest file"):
        train("mae", tiny("eval.monitor.every=5", f"eval.monitor.dataset={tmp_path / 'none.yaml'}"), tmp_path / "a", progress=False)


@pytest.mark.multiproc
@pytest.mark.slow
def test_the_monitor_gives_one_number_on_one_process_under_ddp_and_fsdp(tmp_path, digits_manifests):
    """Each rank extracts its share (digits-test is one shard: rank 1 has none and still runs the forward passes FSDP2
    gathers weights for), gathered in key order, the same 200 images kept on any number of ranks: the same top-1 as one
    process at step 0, where the weights are equal."""
    common = (f"eval.monitor.dataset={digits_manifests[1]}", "eval.monitor.every=2", "eval.monitor.samples=200", "train.steps=2",
              "train.precision=fp32", "train.checkpoint_every=100")
    train("mae", tiny("data.batch_size=16", *common), tmp_path / "single", progress=False)
    launch(train_worker, "mae", tiny("data.batch_size=8", *common), str(tmp_path / "ddp"), nprocs=2)
    launch(train_worker, "mae", tiny("data.batch_size=8", "train.strategy=fsdp", *common), str(tmp_path / "fsdp"), nprocs=2)
    single, ddp, fsdp = (monitored(tmp_path / r) for r in ("single", "ddp", "fsdp"))
    assert sorted(single) == sorted(ddp) == sorted(fsdp) == [0, 2]
    assert single[0] == ddp[0] == fsdp[0]
    assert ddp[2] == pytest.approx(single[2], abs=1.0) and fsdp[2] == pytest.approx(ddp[2], abs=1.0)   # weights equal to 1e-5
