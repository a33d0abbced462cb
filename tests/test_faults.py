"""Fault injection: the faults real cluster runs meet (issue 16), each reproduced here on a tiny run, with what
must happen instead: nothing lost, nothing silently wrong, an error that names the cause."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prepretrain_lit.config import load_config
from prepretrain_lit.data import build_shards, shapes_source
from prepretrain_lit.trainer import EXIT_PREEMPTED

PRETRAIN = Path(sys.executable).parent / "prepretrain"
TINY = ["data.dataset=synthetic", "model.depth=2", "model.decoder_depth=1", "train.log_every=1"]


def tiny(*overrides: str):
    return load_config(preset="tiny", overrides=[*TINY, *overrides])


def weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["model"]


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate(): return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return build_shards(shapes_source(400, size=32), tmp_path_factory.mktemp("shapes"), shard_size=50, progress=False)


def train_cmd(shapes: Path, out: Path, steps: int, *extra: str) -> list[str]:
    sets = [f"data.dataset={shapes}", f"train.steps={steps}", "train.checkpoint_every=10", "train.log_every=1",
            "data.batch_size=16", "data.num_workers=2", "train.keep_checkpoints=10", *extra]
    return [str(PRETRAIN), "train", "mae", "--preset", "tiny", "--out", str(out), *[a for s in sets for a in ("--set", s)]]


# -- 4. a signal to the whole process group ----------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_exits_3_and_resumes_bit_identically(tmp_path, shapes):
    steps = 40
    whole = subprocess.run(train_cmd(shapes, tmp_path / "whole", steps), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(shapes, run, steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)          # its own process group: the trainer and its 2 workers
    assert wait_for(lambda: (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3)
    os.killpg(proc.pid, signal.SIGTERM)                      # as scancel, timeout and container stops do
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "preempted" and 0 < status["step"] < steps, status
    assert (run / "checkpoints" / f"step_{status['step']:08d}.pt").exists()   # at the step it stopped, not the last multiple of 10
    again = subprocess.run(train_cmd(shapes, run, steps), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert steps_logged(run) == list(range(1, steps + 1))
    a, b = weights(tmp_path / "whole"), weights(run)
    for name in a: assert torch.equal(a[name], b[name]), name


def test_warnings_requeue_unless_submitit_runs_the_job(monkeypatch):
    from prepretrain_lit.trainer import requeues_on
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert requeues_on(signal.SIGUSR1) and requeues_on(signal.SIGUSR2) and not requeues_on(signal.SIGTERM)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")           # submitit requeues on its own USR2: not twice
    assert not requeues_on(signal.SIGUSR2) and not requeues_on(signal.SIGUSR1)
