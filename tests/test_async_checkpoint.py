"""Asynchronous checkpoints: the same files and the same exact resume as synchronous ones; a writer killed
mid-file leaves the previous checkpoint the one that loads; a run never ends (normally, on a stop signal, on an
error) before its last checkpoint is on disk; one save in flight at a time."""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from prepretrain_lit import checkpoint as C
from prepretrain_lit.checkpoint import Preempted, complete_checkpoints
from prepretrain_lit.trainer import SyntheticImages, train
from prepretrain_lit.vit import verify_checkpoint_file
from tiny_runs import TINY, tiny, weights, steps_logged, wait_for

def assert_same(a, b, where=""):
    "Equal nested checkpoint contents: tensors bit for bit, everything else by value."
    if torch.is_tensor(a): assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a: assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)): assert_same(x, y, f"{where}[{i}]")
    else: assert a == b, where


@pytest.fixture(scope="module")
def synchronous(tmp_path_factory) -> Path:
    "The uninterrupted run, written synchronously: 6 steps, a checkpoint every 2, all kept."
    out = tmp_path_factory.mktemp("sync")
    train("mae", tiny("train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=10",
                      "train.async_checkpoint=false"), out, progress=False)
    return out


def test_async_writes_the_synchronous_checkpoints_and_resumes_exactly(tmp_path, synchronous, capsys):
    run = tmp_path / "async"
    train("mae", tiny("train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=10"), run, progress=False)
    found = complete_checkpoints(run / "checkpoints")
    assert [s for s, _ in found] == [2, 4, 6]
    for step, path in found:
        assert verify_checkpoint_file(path) is None                   # sidecar written and matching
        assert_same(torch.load(synchronous / "checkpoints" / path.name, weights_only=True),
                    torch.load(path, weights_only=True), path.name)   # model, optimizer, rng, data, schedule
    # exact resume is unchanged: from step 4 of the asynchronous run to the synchronous run's end, bit for bit
    C.remove_checkpoint(found[-1][1]); (run / "model.pt").unlink()
    capsys.readouterr()
    train("mae", tiny("train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=10"), run, progress=False)
    assert "resumed from step 4 of 6" in capsys.readouterr().out
    assert steps_logged(run) == list(range(1, 7))
    a, b = weights(synchronous), weights(run)
    for name in a: assert torch.equal(a[name], b[name]), name


KILLED_MID_WRITE = """
import sys, threading
from pathlib import Path
import torch
from prepretrain_lit import checkpoint as C
from prepretrain_lit.config import load_config
from prepretrain_lit.trainer import train
marker, real = Path(sys.argv[1]), C.HashingWriter.write
def write(self, b):                              # step 4's checkpoint: stuck after its first bytes, until SIGKILL
    n = real(self, b)
    if "step_00000004.pt" in self.f.name:
        self.f.flush(); marker.touch(); threading.Event().wait()
    return n
C.HashingWriter.write = write
torch.set_num_threads(int(sys.argv[3]))          # the test process's threads: the same sums, the same bits
train("mae", load_config(preset="tiny", overrides=sys.argv[4:]), sys.argv[2], progress=False)
"""


@pytest.mark.slow
def test_a_kill_in_the_middle_of_an_async_save_leaves_the_previous_checkpoint_the_one_that_loads(
        tmp_path, synchronous, capsys):
    run, marker = tmp_path / "run", tmp_path / "writing"
    sets = [*TINY, "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=1"]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(marker), str(run), str(torch.get_num_threads()), *sets],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the loop trained on to step 6 while step 4 was being written (asynchronous), then waited for it there
        assert wait_for(lambda: marker.exists() and (run / "metrics.jsonl").exists() and 6 in steps_logged(run), 90), \
            "training did not go on while the checkpoint was written"
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [2], names   # kept: step 4 never landed
    assert any(n.startswith("step_00000004.pt.tmp-") for n in names), names        # half a file, under a temporary name
    assert not any("00000006" in n for n in names), names                          # one save in flight: 6 waited for 4
    capsys.readouterr()
    with pytest.warns(UserWarning, match="removed .*step_00000004.pt.tmp-"):
        train("mae", tiny("train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=1"), run, progress=False)
    assert "resumed from step 2 of 6" in capsys.readouterr().out
    assert steps_logged(run) == list(range(1, 7))
    a, b = weights(synchronous), weights(run)
    for name in a: assert torch.equal(a[name], b[name]), name


class FailingImages(SyntheticImages):
    "Synthetic images whose reader breaks at the third batch (a lost disk)."
    def batches(self, start: int = 0):
        for i, batch in enumerate(super().batches(start)):
            if i == 2: raise RuntimeError("the image disk is gone")
            yield batch


def failing_images(cfg, info, out):
    return FailingImages(cfg.data.batch_size, cfg.model.img_size, cfg.model.num_patches, cfg.seed)


@pytest.mark.parametrize("ending", ["normal", "SIGTERM", "SIGINT", "error"])
def test_a_run_never_ends_before_its_last_save_is_on_disk(tmp_path, monkeypatch, ending):
    """Each checkpoint's write is held until someone waits for that checkpoint: a run that returned (or raised)
    without waiting would leave its last checkpoint unwritten, and the assertions below would find it missing."""
    gates, lock = {}, threading.Lock()
    def gate(name: str) -> threading.Event:
        with lock: return gates.setdefault(name, threading.Event())
    real_save, real_wait = C.save_file_atomic, C.CheckpointWriter.wait
    def held(obj, path, checksum=True):
        if ending.startswith("SIG") and path.name == "step_00000002.pt":
            os.kill(os.getpid(), getattr(signal, ending))     # a stop signal arrives while step 2 is written
        gate(path.name).wait(60)
        return real_save(obj, path, checksum)
    def waiting(self):
        if self.thread is not None: gate(self.thread.name.removeprefix("writing ")).set()
        return real_wait(self)
    monkeypatch.setattr(C, "save_file_atomic", held)
    monkeypatch.setattr(C.CheckpointWriter, "wait", waiting)
    cfg = tiny("train.steps=8", "train.checkpoint_every=2")
    try:
        if ending == "normal":
            train("mae", cfg, tmp_path, progress=False)
            last = 8
        elif ending == "error":
            with pytest.raises(RuntimeError, match="image disk is gone"):
                train("mae", cfg, tmp_path, progress=False, data=failing_images)
            last = 2
        else:
            with pytest.raises(Preempted) as stopped:
                train("mae", cfg, tmp_path, progress=False)
            last = stopped.value.step
            assert 2 < last < 8                                  # it stopped at the step after the signal
        found = complete_checkpoints(tmp_path / "checkpoints")
        assert found and found[-1][0] == last, found             # on disk when train returned or raised
        assert verify_checkpoint_file(found[-1][1]) is None
        status = json.loads((tmp_path / "status.json").read_text())
        assert status["state"] == {"normal": "complete", "error": "failed"}.get(ending, "preempted"), status
    finally:
        for g in list(gates.values()): g.set()                   # a failing run's writer is not left waiting


def test_the_next_optimizer_step_waits_for_the_background_copy(tmp_path, monkeypatch):
    """The thread copies the parameters and moments; the copy starts late here (a busy machine), and the optimizer
    step called meanwhile must wait for it, or the checkpoint would hold the weights after that step."""
    net = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(2, 8)).sum().backward(); opt.step()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    moments = opt.state[net.weight]["exp_avg"].clone()
    late, real_write = threading.Event(), C.CheckpointWriter._write
    def delayed(self, *args):
        late.wait(); real_write(self, *args)
    monkeypatch.setattr(C.CheckpointWriter, "_write", delayed)
    writer = C.CheckpointWriter(True, opt, net)
    writer.write({"model": net.state_dict(), "optimizer": opt.state_dict()}, C.checkpoint_path(tmp_path, 1), keep=1)
    threading.Timer(0.3, late.set).start()          # the thread gets the CPU only in 0.3 s
    opt.step()                                       # waits for the copy (held_s), then changes every tensor
    writer.wait()
    saved = torch.load(C.checkpoint_path(tmp_path, 1), weights_only=True)
    for k in before: assert torch.equal(saved["model"][k], before[k]), k
    assert torch.equal(saved["optimizer"]["state"][0]["exp_avg"], moments)
    assert not torch.equal(net.weight.detach(), before["weight"]) and writer.held_s > 0
