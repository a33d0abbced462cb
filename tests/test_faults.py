"""Fault injection: the faults real cluster runs meet, each reproduced here on a tiny run, with what
must happen instead: nothing lost, nothing silently wrong, an error that names the cause."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prepretrain_lit.schema import UserError
from prepretrain_lit.presets import load_config
from prepretrain_lit.data import build_shards, shapes_source
from prepretrain_lit.checkpoint import EXIT_PREEMPTED
from tiny_runs import TINY, tiny, weights, steps_logged, wait_for

PRETRAIN = Path(sys.executable).parent / "prepretrain"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return build_shards(shapes_source(400, size=32), tmp_path_factory.mktemp("shapes"), shard_size=50, progress=False)


def train_cmd(shapes: Path, out: Path, steps: int, *extra: str) -> list[str]:
    sets = [f"data.dataset={shapes}", f"train.steps={steps}", "train.checkpoint_every=10", "train.log_every=1",
            "data.batch_size=16", "data.num_workers=2", "train.keep_checkpoints=10", *extra]
    return [str(PRETRAIN), "train", "mae", "--preset", "tiny", "--out", str(out), *[a for s in sets for a in ("--set", s)]]


UNINTERRUPTED_STEPS = 40


@pytest.fixture(scope="module")
def uninterrupted(shapes, tmp_path_factory) -> Path:
    "The run folder of `train_cmd(shapes, ..., 40)` run straight through: what each stopped and resumed run must equal."
    out = tmp_path_factory.mktemp("whole")
    whole = subprocess.run(train_cmd(shapes, out, UNINTERRUPTED_STEPS), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    return out


# -- 4. a signal to the whole process group ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])     # a cluster's stop; a terminal's Ctrl-C
def test_a_stop_signal_to_the_process_group_checkpoints_exits_3_and_resumes_bit_identically(tmp_path, shapes,
                                                                                            uninterrupted, stop):
    steps = UNINTERRUPTED_STEPS
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(shapes, run, steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)          # its own process group: the trainer and its 2 workers
    assert wait_for(lambda: (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3)
    os.killpg(proc.pid, getattr(signal, stop))               # as scancel, timeout, container stops and Ctrl-C do
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "Traceback" not in err and f"stopped by {stop} at step" in err.strip().splitlines()[-1]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "preempted" and 0 < status["step"] < steps, status
    assert (run / "checkpoints" / f"step_{status['step']:08d}.pt").exists()   # at the step it stopped, not the last multiple of 10
    again = subprocess.run(train_cmd(shapes, run, steps), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert steps_logged(run) == list(range(1, steps + 1))
    a, b = weights(uninterrupted), weights(run)
    for name in a: assert torch.equal(a[name], b[name]), name


def test_a_process_that_leaves_loader_workers_running_still_exits(tmp_path, shapes):
    """Workers ignore stop signals only when a trainer catches them: a forked process (a ProcessPool worker, as
    nbdev_test runs notebooks in) that leaves a loader iterator open must still end, since multiprocessing stops
    leftover workers with SIGTERM at exit. Before, ignoring SIGTERM in every worker made that exit wait forever."""
    script = f"""
import multiprocessing as mp
from prepretrain_lit.loader import ShardStream, StreamLoader
def first_batch():
    loader = StreamLoader(ShardStream({str(shapes)!r}, None, infinite=True), batch_size=8, num_workers=2)
    batches = iter(loader)
    next(batches)
    globals()["leak"] = batches                  # left open, as a notebook's next(iter(loader)) does
p = mp.get_context("fork").Process(target=first_batch)
p.start(); p.join(60)
print("exitcode", p.exitcode, flush=True)
if p.is_alive(): p.kill()                       # hung: end it, so the test fails instead of waiting too
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "exitcode 0" in done.stdout, done.stdout + done.stderr[-2000:]


def test_warnings_requeue_unless_submitit_runs_the_job(monkeypatch):
    from prepretrain_lit.checkpoint import requeues_on
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert requeues_on(signal.SIGUSR1) and requeues_on(signal.SIGUSR2) and not requeues_on(signal.SIGTERM)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")           # submitit requeues on its own USR2: not twice
    assert not requeues_on(signal.SIGUSR2) and not requeues_on(signal.SIGUSR1)


# -- 3. a non-finite state is never checkpointed ------------------------------------------------------------

def test_weights_made_non_finite_by_the_update_are_never_checkpointed(tmp_path):
    from prepretrain_lit.trainer import TrainingDiverged, train
    from prepretrain_lit.checkpoint import complete_checkpoints
    cfg = tiny("optim.lr=1e39", "optim.warmup_fraction=0", "train.steps=4", "train.checkpoint_every=1")
    with pytest.raises(TrainingDiverged, match=r"weights or the optimizer state became NaN.*last finite state checked is at "
                                               r"step 0.*Lower optim.lr"):
        train("mae", cfg, tmp_path, progress=False)
    assert complete_checkpoints(tmp_path / "checkpoints") == []
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "diverged"


# -- 5, 6. checkpoint integrity -----------------------------------------------------------------------------

def flip_bytes_inside(path: Path, at: float = 0.6) -> None:
    "Overwrite a few bytes in the middle of `path` (inside a tensor's data: the file still loads)."
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + 8] = bytes(b ^ 0xFF for b in data[i:i + 8])
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_that_still_loads_is_skipped_with_a_warning_naming_it(tmp_path):
    from prepretrain_lit.trainer import train
    cfg = tiny("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5")
    train("mae", cfg, tmp_path, progress=False)
    newest = tmp_path / "checkpoints" / "step_00000004.pt"
    flip_bytes_inside(newest)
    torch.load(newest, weights_only=True)                          # the damage is silent to torch
    (tmp_path / "model.pt").unlink()
    with pytest.warns(UserWarning, match=r"step_00000004.pt does not load .*SHA-256"):
        train("mae", cfg, tmp_path, progress=False)                # resumes from step 2 and redoes steps 3-4
    assert steps_logged(tmp_path) == [1, 2, 3, 4]


def test_resume_with_no_loadable_checkpoint_refuses_naming_the_files(tmp_path):
    from prepretrain_lit.schema import UserError
    from prepretrain_lit.trainer import train
    cfg = tiny("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5")
    train("mae", cfg, tmp_path, progress=False)
    for p in (tmp_path / "checkpoints").glob("step_*.pt"): flip_bytes_inside(p)
    (tmp_path / "model.pt").unlink()
    with pytest.warns(UserWarning), pytest.raises(UserError, match=r"none of the checkpoints .* loads: step_00000002.pt, step_00000004.pt"):
        train("mae", cfg, tmp_path, resume=True, progress=False)
    assert steps_logged(tmp_path) == [1, 2, 3, 4]                 # nothing redone, nothing duplicated
    cli = subprocess.run([str(PRETRAIN), "train", "mae", "--preset", "tiny", "--out", str(tmp_path), "--resume",
                          *[a for s in TINY + ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5"]
                            for a in ("--set", s)]], capture_output=True, text=True)
    assert cli.returncode == 2 and "none of the checkpoints" in cli.stderr and "Traceback" not in cli.stderr


# -- 10. disk full ------------------------------------------------------------------------------------------

def test_a_full_disk_names_the_path_and_cause_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno
    from prepretrain_lit import trainer as T
    cfg = tiny("train.steps=4", "train.checkpoint_every=2")
    real_save = torch.save
    def full_disk(obj, f, *a, **k):
        if "step" in obj:                                            # checkpoints only
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(T.torch, "save", full_disk)
    with pytest.raises(T.CheckpointIOError, match=r"cannot write .*step_00000002.pt: No space left on device"):
        T.train("mae", cfg, tmp_path, progress=False)
    assert not list((tmp_path / "checkpoints").iterdir())          # no *.tmp-PID keeps the space
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and "No space left" in status["message"]


def test_temporary_files_of_killed_writers_are_removed_at_start(tmp_path):
    from prepretrain_lit.trainer import train
    (tmp_path / "checkpoints" / "step_00000002.tmp").mkdir(parents=True)          # a sharded write, killed
    (tmp_path / "checkpoints" / "step_00000004.pt.tmp-99999").write_bytes(b"half")
    (tmp_path / ".status.json.tmp-99999").write_text("{")
    with pytest.warns(UserWarning, match="left by a writer that was killed"):
        train("mae", tiny("train.steps=1"), tmp_path, progress=False)
    leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


# -- 11. damaged metrics ------------------------------------------------------------------------------------

def test_a_damaged_metrics_file_does_not_block_resume(tmp_path):
    from prepretrain_lit.trainer import train
    cfg = tiny("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5")
    train("mae", cfg, tmp_path, progress=False)
    (tmp_path / "checkpoints" / "step_00000004.pt").unlink(); (tmp_path / "model.pt").unlink()
    with open(tmp_path / "metrics.jsonl", "ab") as f: f.write(b'42\n"text"\n\xff\xfe{"step": 9}\n[1]\n')
    with pytest.warns(UserWarning, match="dropped 4 damaged line"):
        train("mae", cfg, tmp_path, progress=False)
    assert steps_logged(tmp_path) == [1, 2, 3, 4]


# -- 9. every value with a range is checked when the config is built ----------------------------------------

@pytest.mark.parametrize("override, message", [
    ("optim.min_lr=-1", "optim.min_lr=-1.0 must be >= 0"),
    ("optim.clip_grad=-1", "optim.clip_grad=-1.0 must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.lr=-0.125", "optim.lr=-0.125 must be > 0"),
    ("optim.base_lr=0", "optim.base_lr=0.0 must be > 0"),
    ("mae.mask_ratio=0.99", "mae.mask_ratio=0.99 leaves 0 of the 64 patches visible"),
    ("splitmask.split_ratio=0.01", "splitmask.split_ratio=0.01 puts 0 of the 64"),
    ("eval.num_workers=-1", "eval.num_workers=-1 must be >= 0"),
    ("seed=-3", "seed=-3 must be >= 0"),
    ("model.mlp_ratio=0", "model.mlp_ratio=0.0 must be > 0"),
])
def test_out_of_range_values_are_refused_when_the_config_is_built(override, message):
    from prepretrain_lit.schema import ConfigError
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        tiny(override)


# -- 8. a failed start, and the identity of a run -------------------------------------------------------------

def test_a_run_that_failed_before_its_first_step_leaves_a_usable_folder(tmp_path):
    from prepretrain_lit.schema import UserError
    from prepretrain_lit.trainer import train
    bad = tiny("train.steps=2", "data.dataset=/no/such/manifest.yaml")        # fails after config.yaml is written
    with pytest.raises(UserError):
        train("mae", bad, tmp_path, progress=False)
    assert (tmp_path / "config.yaml").exists() and json.loads((tmp_path / "status.json").read_text())["state"] == "failed"
    assert train("mae", tiny("train.steps=2"), tmp_path, progress=False)["step"] == 2   # the corrected rerun


def test_what_cannot_change_the_result_is_not_part_of_a_runs_identity(tmp_path, monkeypatch):
    from prepretrain_lit.presets import config_hash, legacy_config_hash
    import torch as _t
    from prepretrain_lit.trainer import train
    cfg = tiny("train.steps=2", "train.checkpoint_every=2")
    same = tiny("train.steps=2", "train.checkpoint_every=1", "data.num_workers=7", "train.log_every=2",
                "train.keep_checkpoints=9", "train.tensorboard=false")
    assert config_hash(cfg) == config_hash(same) and config_hash(cfg) != config_hash(tiny("train.steps=3"))
    manifest = tmp_path / "m.yaml"; manifest.write_text("x")
    monkeypatch.chdir(tmp_path)
    assert config_hash(tiny("data.dataset=m.yaml")) == config_hash(tiny(f"data.dataset={manifest}"))
    run = tmp_path / "run"
    train("mae", cfg, run, progress=False)
    (run / "model.pt").unlink()
    assert train("mae", same, run, progress=False)["state"] == "complete"   # resumed under another cadence and workers
    ckpt = run / "checkpoints" / "step_00000002.pt"         # a checkpoint written before identities: still loads
    state = _t.load(ckpt, weights_only=True); state["config_hash"] = legacy_config_hash(cfg)
    from prepretrain_lit.checkpoint import save_file_atomic
    save_file_atomic(state, ckpt); (run / "model.pt").unlink()
    assert train("mae", cfg, run, progress=False)["state"] == "complete"


# -- 13. an error on one rank reaches all ranks --------------------------------------------------------------

def rank1_fails_at_batch(out_dir: str, fail_at: int) -> dict:
    "A 2-rank worker (importable: `launch` spawns it) whose rank 1 only raises a DataQualityError at batch `fail_at`."
    from prepretrain_lit import trainer as T
    from prepretrain_lit.decode import DataQualityError
    real = T.build_data
    class RottenOnRank1:
        seen = skipped = 0
        def __init__(self, data): self.data = data
        def batches(self, start: int = 0):
            for i, batch in enumerate(self.data.batches(start)):
                if i == fail_at: raise DataQualityError("3 of 4 samples of shard 7 are bad (limit 1%)")
                yield batch
    def build(stage, cfg, info, out=None, data=None):
        data = real(stage, cfg, info, out, data)
        return RottenOnRank1(data) if info.rank == 1 and info.world_size == 2 else data
    T.build_data = build
    return T.train_worker("mae", tiny("train.steps=6", "data.batch_size=4", "train.log_every=2"), out_dir)


@pytest.mark.multiproc
def test_an_error_on_one_rank_stops_both_promptly_with_that_error(tmp_path):
    from prepretrain_lit.distributed import launch
    tic = time.time()
    with pytest.raises(Exception) as raised:
        launch(rank1_fails_at_batch, str(tmp_path), 3, nprocs=2)
    assert time.time() - tic < 90                                   # not a collective's 30-minute timeout
    assert "DataQualityError" in str(raised.value)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and "rank 1: DataQualityError: 3 of 4 samples" in status["message"], status


# -- 7. one run per folder ---------------------------------------------------------------------------------

def hold_lock(folder: Path) -> subprocess.Popen:
    "Another process (not a child the lock is held for) holding `folder`'s lock until killed."
    from prepretrain_lit.config import HELD_LOCKS_ENV
    env = {k: v for k, v in os.environ.items() if k != HELD_LOCKS_ENV}
    proc = subprocess.Popen([sys.executable, "-c", f"import time\nfrom prepretrain_lit.config import run_lock\n"
                             f"with run_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(120)"],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_a_folder_names_who_holds_it_and_a_dead_holders_lock_is_taken_over(tmp_path, capfd):
    from prepretrain_lit.config import RunFolderBusy
    from prepretrain_lit.trainer import train
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(RunFolderBusy, match=rf"in use by pid {holder.pid} on "):
            train("mae", tiny("train.steps=1"), tmp_path, progress=False)
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill(); holder.wait()                                    # SIGKILL: it never released its lock
    train("mae", tiny("train.steps=1"), tmp_path, progress=False)
    assert f"taking over the lock of {tmp_path} from pid {holder.pid}" in capfd.readouterr().err


# -- 12. status.json and stage.json tell the truth ------------------------------------------------------------

def test_a_killed_run_reads_as_interrupted_not_running(tmp_path):
    from prepretrain_lit.pipeline_plan import live_state
    from prepretrain_lit.run_folder import read_status
    proc = subprocess.Popen([str(PRETRAIN), "train", "mae", "--preset", "tiny", "--out", str(tmp_path),
                             *[a for s in TINY + ["train.steps=100000"] for a in ("--set", s)]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: (tmp_path / "metrics.jsonl").exists())
    assert read_status(tmp_path)["state"] == "running"                # alive: running
    proc.kill(); proc.wait()
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "running"   # what the dead process left
    assert read_status(tmp_path)["state"] == "interrupted"            # what a reader is told
    record = {"state": "running", "pid": proc.pid, "host": os.uname().nodename}
    assert live_state(tmp_path, record) == "interrupted"


@pytest.mark.slow
def test_stage_json_records_every_ending_and_the_pipeline_holds_the_lock(tmp_path):
    from prepretrain_lit.config import RunFolderBusy
    from prepretrain_lit.pipeline import run_experiment
    from prepretrain_lit.pipeline_stage import write_stage_notebook
    d = tmp_path / "stages"
    write_stage_notebook(d / "train.ipynb", 'out_dir = "."  # the run folder\nending = "complete"  # how it ends', [
        "import json, os, pathlib, signal\nfrom prepretrain_lit.config import run_lock\n"
        "with run_lock(out_dir):     # as train() does: the pipeline holds it for this kernel\n"
        "    out = pathlib.Path(out_dir)\n"
        "    (out / 'leftover').write_text(ending)\n"
        "    if ending == 'diverged':\n"
        "        (out / 'status.json').write_text(json.dumps({'state': 'diverged', 'step': 3}))\n"
        "        raise RuntimeError('diverged at step 3')\n"
        "    if ending == 'killed': os.kill(os.getpid(), signal.SIGKILL)\n"
        "    (out / 'model.pt').write_text('done')"])
    exp = tmp_path / "x.yaml"
    exp.write_text("name: x\nstages:\n  train: {notebook: train}\n")
    folder = tmp_path / "runs/x/train/main"
    quiet = dict(out=tmp_path / "runs", stages_dir=d, progress=False, echo=lambda s: None)
    def stage_state(): return json.loads((folder / "stage.json").read_text())["state"]
    assert [o.state for o in run_experiment(exp, overrides=["ending=diverged"], **quiet)] == ["diverged"]
    assert stage_state() == "diverged"
    assert [o.state for o in run_experiment(exp, overrides=["ending=killed"], force=True, **quiet)] == ["killed"]
    assert stage_state() == "killed"
    holder = hold_lock(folder)                                          # a second `prepretrain run` of the same folder
    try:
        with pytest.raises(RunFolderBusy, match=rf"in use by pid {holder.pid}"):
            run_experiment(exp, force=True, **quiet)
    finally: holder.kill(); holder.wait()
    assert [o.state for o in run_experiment(exp, force=True, **quiet)] == ["complete"]   # --force cleared the killed run
    assert (folder / "leftover").read_text() == "complete"


# -- 14. a refusal writes nothing; a run folder outlives the schema's growth ----------------------------------

def folder_bytes(folder: Path) -> dict[str, bytes]:
    "Every file below `folder`, with its bytes."
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def staged(stage: str, *overrides: str):
    "A tiny config of `stage` (its recipe, its name recorded), 2 steps, a checkpoint at each."
    return load_config(preset="tiny", stage=stage, overrides=[*TINY, "train.steps=2", "train.checkpoint_every=1",
                                                              "train.keep_checkpoints=5", *overrides])


@pytest.fixture
def finished_mae(tmp_path) -> Path:
    from prepretrain_lit.trainer import train
    train("mae", staged("mae"), tmp_path / "mae", progress=False)
    return tmp_path / "mae"


def edit_checkpoints(run: Path, **changes) -> None:
    "Make every checkpoint of `run` record `changes` (e.g. another config hash), their checksum sidecars kept valid."
    from prepretrain_lit.checkpoint import save_file_atomic
    for ckpt in (run / "checkpoints").glob("step_*.pt"):
        save_file_atomic({**torch.load(ckpt, weights_only=True), **changes}, ckpt)


@pytest.mark.parametrize("stage, overrides, extend, message", [
    ("mae", ["model.depth=3"], False, r"(?s)another config.*model\.depth: 2 -> 3"),      # another model size
    ("splitmask", [], False, r"holds a 'mae' run.*not a 'splitmask' one"),           # another stage kind
    ("mae", ["train.steps=4", "mae.mask_ratio=0.6"], True, r"(?s)changes nothing else.*mae\.mask_ratio"),
    ("mae", ["train.steps=1"], True, "would shorten it"),
])
def test_a_refused_resume_or_extend_leaves_the_folder_byte_identical(finished_mae, stage, overrides, extend, message):
    from prepretrain_lit.schema import UserError
    from prepretrain_lit.trainer import train
    before = folder_bytes(finished_mae)
    with pytest.raises(UserError, match=message):
        train(stage, staged(stage, *overrides), finished_mae, resume=True, extend=extend, progress=False)
    assert folder_bytes(finished_mae) == before


def test_an_extend_refused_for_a_checkpoint_of_another_config_writes_nothing(finished_mae):
    from prepretrain_lit.schema import UserError
    from prepretrain_lit.trainer import train
    edit_checkpoints(finished_mae, config_hash="0123456789ab")
    before = folder_bytes(finished_mae)
    with pytest.raises(UserError, match=r"step_00000002\.pt was written by another config \(hash 0123456789ab"):
        train("mae", staged("mae", "train.steps=4"), finished_mae, extend=True, progress=False)
    assert folder_bytes(finished_mae) == before


def test_train_splitmask_resume_into_a_finished_mae_folder_is_refused_and_changes_nothing(finished_mae):
    before = folder_bytes(finished_mae)
    res = subprocess.run([str(PRETRAIN), "train", "splitmask", "--preset", "tiny", "--out", str(finished_mae), "--resume",
                          *[a for s in TINY + ["train.steps=2"] for a in ("--set", s)]], capture_output=True, text=True)
    assert res.returncode == 2 and "holds a 'mae' run" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert folder_bytes(finished_mae) == before


@dataclasses.dataclass
class GrownConfig:
    "A section a later version adds, with defaults that do what the code did before it."
    weight: float = 1.0

    def check(self) -> None: pass


def grown_schema():
    from prepretrain_lit.schema import RunConfig
    @dataclasses.dataclass
    class GrownRunConfig(RunConfig):
        grown: GrownConfig = dataclasses.field(default_factory=GrownConfig)
    return GrownRunConfig


def whole_identity_hash(values: dict) -> str:
    "The hash checkpoints recorded before identities left out keys at their defaults (every key but NOT_IDENTITY)."
    import copy, hashlib
    from prepretrain_lit.presets import NOT_IDENTITY
    d = copy.deepcopy(values)
    for key in NOT_IDENTITY:
        *parents, leaf = key.split(".")
        node = d
        for part in parents: node = node.get(part, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def test_a_run_folder_from_before_the_schema_grew_resumes_extends_and_shows_its_status(finished_mae, monkeypatch):
    import yaml
    from prepretrain_lit import presets
    from prepretrain_lit.pipeline import status_rows
    from prepretrain_lit.schema import RunRefused
    from prepretrain_lit.trainer import train
    run, saved = finished_mae, (finished_mae / "config.yaml").read_bytes()
    edit_checkpoints(run, config_hash=whole_identity_hash(yaml.safe_load(saved)))  # as the version before this one wrote them
    monkeypatch.setattr(presets, "RunConfig", grown_schema())              # then the schema gains a section
    assert train("mae", staged("mae"), run, progress=False)["step"] == 2   # resumes: the run is complete
    assert (run / "config.yaml").read_bytes() == saved                     # the code of its time still reads it
    assert train("mae", staged("mae", "train.steps=4"), run, extend=True, progress=False)["step"] == 4
    assert steps_logged(run) == [1, 2, 3, 4] and "grown" not in yaml.safe_load((run / "config.yaml").read_text())
    row, = status_rows(run)
    assert (row["state"], row["step"]) == ("complete", 4), row
    before = folder_bytes(run)
    with pytest.raises(RunRefused, match=r"grown\.weight: \(absent.*1\.0\) -> 2\.0"):   # the new key off its default
        train("mae", staged("mae", "train.steps=4", "grown.weight=2"), run, progress=False)
    assert folder_bytes(run) == before


def test_a_changed_default_is_refused_on_resume_and_changes_nothing(finished_mae, monkeypatch):
    "The hash leaves defaults out, so it cannot see a default change: the stored values do."
    from prepretrain_lit import presets
    from prepretrain_lit.schema import OptimConfig, RunConfig
    from prepretrain_lit.schema import RunRefused
    from prepretrain_lit.trainer import train
    @dataclasses.dataclass
    class ClippingOptim(OptimConfig):
        clip_grad: float | None = 1.0               # a later version clips by default
    @dataclasses.dataclass
    class ChangedRunConfig(RunConfig):
        optim: ClippingOptim = dataclasses.field(default_factory=ClippingOptim)
    before = folder_bytes(finished_mae)
    monkeypatch.setattr(presets, "RunConfig", ChangedRunConfig)
    with pytest.raises(RunRefused, match=r"optim\.clip_grad: None -> 1\.0"):
        train("mae", staged("mae"), finished_mae, resume=True, progress=False)
    assert folder_bytes(finished_mae) == before


def test_a_resume_refused_for_another_number_of_processes_writes_nothing(finished_mae):
    from prepretrain_lit.schema import UserError
    from prepretrain_lit.trainer import train
    edit_checkpoints(finished_mae, world_size=2)                # as if 2 ranks wrote them (no data stream to re-deal)
    before = folder_bytes(finished_mae)
    with pytest.raises(UserError, match=r"step_00000002\.pt was written by 2 processes, this run has 1"):
        train("mae", staged("mae"), finished_mae, resume=True, progress=False)
    assert folder_bytes(finished_mae) == before


def test_bit_rot_in_a_weights_file_is_refused_by_init_and_export(tmp_path):
    "A `model.pt` whose `.sha256` sidecar no longer matches is refused, naming the file (evaluations read trunks through load_init)."
    from prepretrain_lit.checkpoint import save_file_atomic
    from prepretrain_lit.schema import InitConfig, UserError
    from prepretrain_lit.presets import load_config, save_config
    from prepretrain_lit.cli import export_trunk
    from prepretrain_lit.vit import load_init, vit_from_config
    cfg = load_config(preset="tiny")
    weights = save_file_atomic(vit_from_config(cfg.model).state_dict(), tmp_path / "model.pt")   # with its sidecar
    save_config(cfg, tmp_path / "config.yaml")
    load_init(vit_from_config(cfg.model), InitConfig(str(weights)))              # intact: loads
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF                                                  # one flipped byte, same size
    weights.write_bytes(bytes(data))
    for read in (lambda: load_init(vit_from_config(cfg.model), InitConfig(str(weights))),
                 lambda: export_trunk(tmp_path, "safetensors")):
        with pytest.raises(UserError, match=r"model\.pt is damaged: its SHA-256 differs"):
            read()
    assert not (tmp_path / "export-safetensors").exists()


# -- 15. a loader worker that dies, a shard that vanishes: the run ends at once, in one line ------------------

def loader_workers(pid: int) -> list[int]:
    "The child processes of `pid` (a trainer's loader workers)."
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def run_until_logged(cmd: list[str], run: Path, lines: int = 3) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert wait_for(lambda: (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= lines)
    return proc


def ended_within(proc: subprocess.Popen, seconds: float = 60) -> str:
    "`proc`'s stderr once it has ended; a process still alive after `seconds` fails the test (and is killed)."
    try: return proc.communicate(timeout=seconds)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the process was still running {seconds} s after the fault")


@pytest.mark.slow
def test_a_loader_worker_killed_ends_the_run_in_one_line_naming_it_and_the_rerun_resumes(tmp_path, shapes):
    run = tmp_path / "run"
    proc = run_until_logged(train_cmd(shapes, run, 25), run)
    victim = loader_workers(proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)                           # as the out-of-memory killer does
    err = ended_within(proc)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert f"(pid {victim}) was killed by SIGKILL, most likely the out-of-memory killer" in last, last
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and f"pid {victim}" in status["message"] and "\n" not in status["message"]
    again = subprocess.run(train_cmd(shapes, run, 25), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert steps_logged(run) == list(range(1, 26))


@pytest.mark.slow
def test_a_shard_that_vanishes_mid_run_ends_the_run_in_one_line(tmp_path, shapes):
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(shapes.parent), str(data)], check=True)
    run = tmp_path / "run"
    proc = run_until_logged(train_cmd(data / shapes.name, run, 2000), run)
    for shard in sorted(data.glob("*.tar"))[2:6]: shard.rename(shard.with_suffix(".gone"))   # storage lost under it
    err = ended_within(proc)
    assert proc.returncode == 2 and "Traceback" not in err and "Original Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "skipped as bad" in last and "in loader worker" in last, last
    assert any("No such file or directory" in line for line in err.splitlines()), err[-3000:]   # the warning names the shard


# -- 16. storage that turns read-only, memory that runs out: one line, the run folder as it was --------------

def test_a_run_folder_turned_read_only_mid_run_ends_in_one_line_naming_the_path_and_errno(tmp_path, monkeypatch):
    import errno
    from prepretrain_lit import trainer as T
    real = T.Trainer._metrics
    def remounted(self, record):
        if record["step"] == 3: raise OSError(errno.EROFS, "Read-only file system", str(self.out / "metrics.jsonl"))
        return real(self, record)
    monkeypatch.setattr(T.Trainer, "_metrics", remounted)
    with pytest.raises(T.CheckpointIOError, match=r"^cannot write .*metrics.jsonl: Read-only file system") as caught:
        T.train("mae", tiny("train.steps=6", "train.checkpoint_every=2"), tmp_path, progress=False)
    assert "\n" not in str(caught.value)
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "failed"
    assert (tmp_path / "checkpoints" / "step_00000002.pt").exists()          # what was written before stays


def test_a_step_that_cannot_allocate_its_memory_names_the_batch_size_and_the_size_asked(tmp_path, monkeypatch):
    from prepretrain_lit import trainer as T
    def too_big(self, batches, step):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 53687091200 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(T.Trainer, "train_step", too_big)
    with pytest.raises(T.UserError, match=r"out of memory: one step of data.batch_size=\d+ per process asked for 50.00 GiB"):
        T.train("mae", tiny("train.steps=2"), tmp_path, progress=False)
    assert "out of memory" in json.loads((tmp_path / "status.json").read_text())["message"]


# -- 17. the manifest edited between a run's start and its resume --------------------------------------------

@pytest.mark.parametrize("edit, change", [
    ("remove", r"1 shard\(s\) removed: shapes-000003\.tar"),
    ("append", r"1 shard\(s\) added: shapes-000008\.tar"),
    ("rebuild", r"1 shard\(s\) with other bytes \(checksum\): shapes-000001\.tar"),
])
def test_a_resume_over_an_edited_manifest_is_refused_listing_the_changes_and_writes_nothing(tmp_path, shapes, edit, change):
    import shutil
    import yaml
    from prepretrain_lit.manifest import expand_braces
    from prepretrain_lit.trainer import train
    data = tmp_path / "data"
    shutil.copytree(shapes.parent, data)
    manifest = data / shapes.name
    sets = [f"data.dataset={manifest}", "data.batch_size=16", "data.num_workers=0", "train.keep_checkpoints=5"]
    run = tmp_path / "run"
    train("mae", staged("mae", *sets), run, progress=False)
    m = yaml.safe_load(manifest.read_text())
    shards, counts = expand_braces(m["shards"]), list(m["shard_samples"])
    if edit == "remove":
        del shards[3], counts[3]
    elif edit == "append":
        shutil.copy(data / shards[0], data / "shapes-000008.tar")
        shards.append("shapes-000008.tar"); counts.append(counts[0])
    m.update(shards=shards, shard_samples=counts, num_samples=sum(counts))
    if edit == "rebuild": m["sha256"] = [m["sha256"][0], "0" * 64, *m["sha256"][2:]]
    else: m["sha256"] = [s for i, s in enumerate(m["sha256"]) if not (edit == "remove" and i == 3)] + (
        [m["sha256"][0]] if edit == "append" else [])
    manifest.write_text(yaml.safe_dump(m))
    before = folder_bytes(run)
    with pytest.raises(UserError, match=rf"(?s)written over other data .*{change}.*start a new run folder"):
        train("mae", staged("mae", *sets, "train.steps=4"), run, progress=False, extend=True)
    assert folder_bytes(run) == before


# -- 18. a rank killed: the others end by themselves (no launcher agent to kill them, as under plain srun) ------

@pytest.mark.multiproc
@pytest.mark.slow
def test_when_one_rank_is_killed_the_other_ends_by_itself_in_one_line(tmp_path, shapes):
    from prepretrain_lit.distributed import free_port
    run, port = tmp_path / "run", str(free_port())
    procs = []
    for rank in range(2):                                     # started as srun starts tasks: no torchrun agent
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(train_cmd(shapes, run, 2000, "data.batch_size=8"), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
    try:
        assert wait_for(lambda: (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3)
        os.kill(procs[1].pid, signal.SIGKILL)
        err = ended_within(procs[0])
    finally:
        for p in procs:
            try: os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError: pass
    assert procs[0].returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("prepretrain: error: another rank of this run stopped answering"), err[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
