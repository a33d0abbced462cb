"""The SLURM executor against a real one-node SLURM (tools/slurm_cluster.py starts it): submission with `afterok`,
`--kill-on-invalid-dep`, reuse of queued jobs, the time-limit warning, preemption signals and requeue.

The cluster starts once per session (a running one is reused and left running; one this session started is stopped
at the end). Where it cannot be had (not root, no apt-get) these tests skip with the reason; under CI (`CI=true`,
root, Debian's packages reachable) that is a failure. tests/test_pipeline.py keeps the fast fake-`sbatch` checks.

Every job asks for one CPU, so two run side by side on a 2-core machine; the models are the `tiny` preset.
Nothing here is timed: a test waits on what it can observe (a logged step, status.json, the job's restart count)
with generous timeouts, and where a signal must arrive before the run ends the trainer is held still (SIGSTOP)
until SLURM's signal lets it go on (SLURM sends SIGCONT with every signal it delivers to a step), so no step count
depends on how fast or how loaded the CPU is."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from prepretrain_lit.cli import main

from project import ROOT
sys.path.insert(0, str(ROOT / "tools"))
import slurm_cluster  # noqa: E402

pytestmark = pytest.mark.slow
PARTITION = "debug"
RESOURCES = {"gpus_per_node": 0, "cpus_per_node": 1, "mem_gb": 1, "partition": PARTITION, "time_min": 10}
TINY = {"preset": "tiny", "seed": 0, "nprocs": 1, "batch_size": 8}


@pytest.fixture(scope="session")
def slurm():
    "A running one-node cluster; `SLURM_CONF` points this process (and the jobs it submits) at it."
    cluster = slurm_cluster.Cluster(partition=PARTITION)
    was_running = slurm_cluster.is_running(cluster)
    try:
        slurm_cluster.start(cluster)
    except slurm_cluster.ClusterUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the SLURM test cluster cannot be had: {e}", pytrace=False)
        pytest.skip(f"no SLURM cluster on this machine: {e}")
    except slurm_cluster.ClusterError as e:
        pytest.fail(f"the SLURM test cluster did not start: {e}", pytrace=False)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    if old is None: os.environ.pop("SLURM_CONF", None)
    else: os.environ["SLURM_CONF"] = old
    if not was_running: slurm_cluster.stop(cluster)


@pytest.fixture(autouse=True)
def cancel_leftovers(tmp_path):
    "After each test, cancel the jobs it submitted that SLURM still has (a failed test leaves none behind)."
    yield
    jobs = {read(p).get("job_id") for p in tmp_path.rglob("stage.json")} - {None}
    if jobs and shutil.which("scancel"): subprocess.run(["scancel", *sorted(jobs)], capture_output=True)


# -- helpers -------------------------------------------------------------------------------------------------

def write_experiment(path: Path, name: str, stages: dict, resources: dict | None = None, defaults: dict | None = None) -> Path:
    data = {"name": name, "defaults": {**TINY, **(defaults or {})}, "resources": {**RESOURCES, **(resources or {})}, "stages": stages}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read(path: Path) -> dict:
    try: return json.loads(Path(path).read_text())
    except (OSError, ValueError): return {}


def job_info(job: str) -> dict:
    "`scontrol show job -o` as a dict (JobState, Restarts, Reason, Dependency, ...); {} once SLURM forgot the job."
    res = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True)
    if res.returncode: return {}
    return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)


def wait_for(what: str, ready, timeout: float, folders=()) -> object:
    "Poll `ready()` every half second until it is truthy; on timeout fail with what the run folders say."
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = ready()
        if value: return value
        time.sleep(0.5)
    seen = {str(f): (read(Path(f) / "stage.json").get("state"), read(Path(f) / "status.json")) for f in folders}
    logs = {str(f): [p.read_text()[-3000:] for p in sorted(Path(f, "slurm").glob("*_log.*"))] for f in folders}
    pytest.fail(f"waited {timeout:.0f}s for {what}; stage/status: {seen}\nlogs: {logs}", pytrace=False)


def state(folder: Path) -> str | None:
    return read(folder / "stage.json").get("state")


def checkpoint_steps(folder: Path) -> list[int]:
    from prepretrain_lit.checkpoint import complete_checkpoints
    return [step for step, _ in complete_checkpoints(folder / "checkpoints")]


def trained(folder: Path) -> int:
    "The last step the run logged (metrics.jsonl), 0 before its first log line."
    try: lines = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError: return 0
    steps = [json.loads(l)["step"] for l in lines if l.strip().endswith("}")]
    return max(steps, default=0)


def stopped_at(folder: Path) -> int:
    "The step in the trainer's status.json."
    return int(read(folder / "status.json").get("step") or 0)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = torch.load(a, map_location="cpu")["model"], torch.load(b, map_location="cpu")["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def damaged_copy(manifest: Path, folder: Path) -> Path:
    """`manifest` and its shards copied to `folder`, every shard's bytes overwritten: a stage on it passes the dry-run
    (the files are there, the config is valid) and fails at run time, when every sample it reads is bad."""
    shutil.copytree(manifest.parent, folder)
    for shard in folder.glob("*.tar"): shard.write_bytes(b"\0damaged" * (shard.stat().st_size // 8))
    return folder / manifest.name


def mae_stage(dataset: Path, steps: int, **params) -> dict:
    return {"notebook": "mae", "params": {"dataset": str(dataset), "steps": steps, **params}}


# -- the DAG ---------------------------------------------------------------------------------------------------

def test_dag_with_afterok_a_failed_stage_cancels_only_its_dependants_and_queued_jobs_are_reused(
        slurm, shapes_manifest, tmp_path, capsys):
    "MAE -> WSP from its model.pt (afterok); a failing stage beside it, whose dependant SLURM cancels; run twice."
    path = write_experiment(tmp_path / "dag.yaml", "dag", {
        "mae": mae_stage(shapes_manifest, 6),
        "wsp": {"notebook": "wsp", "params": {"dataset": str(shapes_manifest), "steps": 4}, "inputs": {"init_checkpoint": "mae/model.pt"}},
        "bad": mae_stage(damaged_copy(shapes_manifest, tmp_path / "damaged"), 4),   # passes every check, fails reading its data
        "after_bad": {"notebook": "wsp", "params": {"dataset": str(shapes_manifest), "steps": 4}, "inputs": {"init_checkpoint": "bad/model.pt"}}})
    out = tmp_path / "runs"
    root = out / "dag"
    folders = {s: root / s / "main" for s in ("mae", "wsp", "bad", "after_bad")}
    assert main(["run", str(path), "--out", str(out), "--executor", "slurm", "--quiet"]) == 0
    jobs = {s: read(f / "stage.json")["job_id"] for s, f in folders.items()}
    wsp = job_info(jobs["wsp"])
    assert wsp.get("Dependency", "").startswith(f"afterok:{jobs['mae']}"), wsp
    assert job_info(jobs["after_bad"]).get("Dependency", "").startswith(f"afterok:{jobs['bad']}")
    # again, while the jobs are queued or running: nothing is submitted twice
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(out), "--executor", "slurm", "--quiet"]) == 0
    again = capsys.readouterr().out
    assert {s: read(f / "stage.json")["job_id"] for s, f in folders.items()} == jobs
    assert again.count("(queued before)") + again.count("skipped") == 4, again
    names = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
    assert sum(n.startswith("dag:") for n in names) <= 4, names

    wait_for("wsp to complete and after_bad to be cancelled",
             lambda: state(folders["wsp"]) == "complete" and job_info(jobs["after_bad"]).get("JobState") == "CANCELLED",
             600, folders.values())
    assert state(folders["mae"]) == "complete" and (folders["mae"] / "model.pt").is_file()
    assert read(folders["wsp"] / "status.json")["state"] == "complete"
    assert state(folders["bad"]) == "failed" and job_info(jobs["bad"])["JobState"] == "FAILED"
    assert job_info(jobs["after_bad"])["Reason"] == "DependencyNeverSatisfied"
    assert not (folders["after_bad"] / "executed.ipynb").exists()         # SLURM never started it
    capsys.readouterr()
    main(["status", str(root)])
    table = capsys.readouterr().out
    states = {p[1]: p[3] for p in (line.split() for line in table.splitlines()) if len(p) > 3 and p[0] == "dag"}
    assert states == {"mae": "complete", "wsp": "complete", "bad": "failed", "after_bad": "cancelled"}, table
    assert f"SLURM cancelled job {jobs['after_bad']} before the stage started (DependencyNeverSatisfied)" in table, table
    assert state(folders["after_bad"]) == "cancelled"           # written back: SLURM forgets ended jobs (MinJobAge)
    assert main(["report", str(root), "--out", str(tmp_path / "report")]) == 0
    assert any((tmp_path / "report").iterdir())


# -- signals ---------------------------------------------------------------------------------------------------

def held(pid: int) -> bool:
    "Process `pid` is stopped (SIGSTOP): `State: T` in /proc/PID/status."
    try: lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError: return False
    return any(line.startswith("State:") and line.split()[1] == "T" for line in lines)


@contextmanager
def holding(folder: Path):
    """Hold the trainer of run `folder` still (SIGSTOP its process, from status.json) at the step it reached; yields
    its pid. SLURM sends SIGCONT with every signal it delivers to a step, so the next SLURM signal lets it go on;
    if none came, it is let go at the end. A signal is thereby handled at the step after the hold, whatever the
    CPU's speed."""
    pid = read(folder / "status.json")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for("the trainer to stop", lambda: held(pid), 30, [folder])
        assert read(folder / "status.json")["state"] == "running"
        yield pid
    finally:
        if held(pid): os.kill(pid, signal.SIGCONT)


def run_time_s(job: str) -> int:
    "How long job `job` has run (`RunTime=[D-]HH:MM:SS` of scontrol), in seconds."
    text = job_info(job)["RunTime"]
    days, _, hms = text.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def test_time_limit_checkpoints_at_the_warning_requeues_and_resumes_bit_identical(slurm, shapes_manifest, tmp_path):
    """A time limit that passes mid-training, whatever the CPU's speed. The job starts with 30 minutes and the warning
    (USR2) 150 s before the end. Once it trains, the test holds the trainer still (SIGSTOP) and cuts the limit to end
    2-3 minutes from now; SLURM's own time-limit check (every 30 s) then signals every process of the step, and as it
    does with every signal it delivers, sends SIGCONT with it: the warning itself lets the trainer go on. The test
    then lifts the limit again (the requeued job may finish). The trainer checkpoints at the next logged step, the job
    requeues itself and resumes from that checkpoint; its final weights equal those of an uninterrupted run of the
    same config, submitted beside it. Holding the trainer is what makes this independent of speed: no step count is
    calibrated, and the run cannot end before the warning however fast or slow the CPU is."""
    steps = 60                                         # held at a step >= 10; the signal is handled at the next logged one
    stages = {"mae": mae_stage(shapes_manifest, steps, overrides=["train.log_every=10", f"train.checkpoint_every={steps}"])}
    limited = write_experiment(tmp_path / "limited.yaml", "limited", stages, {"time_min": 30, "signal_delay_s": 150})
    reference = write_experiment(tmp_path / "reference.yaml", "reference", stages, {"time_min": 30})
    assert main(["run", str(reference), "--out", str(tmp_path / "runs"), "--executor", "slurm", "--quiet"]) == 0
    assert main(["run", str(limited), "--out", str(tmp_path / "runs"), "--executor", "slurm", "--quiet"]) == 0
    run, ref = tmp_path / "runs/limited/mae/main", tmp_path / "runs/reference/mae/main"
    job = read(run / "stage.json")["job_id"]
    wait_for("the limited run to train", lambda: trained(run) >= 10, 400, [run])
    with holding(run) as pid:                          # the trainer holds still at some step < steps
        held_at = trained(run)
        assert held_at < steps
        minutes = (run_time_s(job) + 180) // 60        # ends 121-180 s from now: inside the 150 s (+30 s check) warning
        subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}"], check=True)
        assert job_info(job)["TimeLimit"] == f"00:{minutes:02d}:00"
        wait_for("SLURM's time-limit warning (USR2, with SIGCONT) to reach the held trainer", lambda: not held(pid), 120, [run])
        assert job_info(job)["JobState"] == "RUNNING"
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=30"], check=True)   # the requeued job may finish
    wait_for("the warning to stop the run at a checkpoint", lambda: read(run / "status.json").get("state") == "preempted", 300, [run])
    assert read(run / "status.json")["signal"] == "SIGUSR2"
    stopped = stopped_at(run)
    assert held_at <= stopped < steps and stopped % 10 == 0
    assert checkpoint_steps(run) == [stopped]          # written at the signal: no periodic one before `steps`
    seen = {}                                          # stage.json between the stop and the restart (>= 11 s apart)
    def requeued():
        record = read(run / "stage.json")
        if record.get("state") == "preempted": seen.update(record)
        return job_info(job).get("Restarts") == "1" and seen
    wait_for("the job to requeue itself", requeued, 120, [run])
    assert seen["signal"] == "SIGUSR2" and seen["job_id"] == job, seen
    wait_for("both runs to complete", lambda: state(run) == "complete" and state(ref) == "complete", 600, [run, ref])
    assert job_info(job)["Restarts"] == "1"            # requeued once, by the warning
    assert read(run / "status.json")["step"] == steps
    lines = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert lines == list(range(10, steps + 1, 10))
    assert same_weights(run / "model.pt", ref / "model.pt")


def test_term_and_usr1_checkpoint_every_process_of_the_step_usr1_requeues(slurm, shapes_manifest, tmp_path):
    """`scancel --signal` reaches every process of the step (kernel and loader workers): SIGTERM leaves a clean
    `preempted` run (nothing requeues it), SIGUSR1 checkpoints and requeues the job, which resumes and completes."""
    stages = {n: mae_stage(shapes_manifest, 4000, seed=i, overrides=["data.num_workers=1", "train.log_every=20"])
              for i, n in enumerate(("term", "usr1"))}
    path = write_experiment(tmp_path / "sig.yaml", "sig", stages)
    assert main(["run", str(path), "--out", str(tmp_path / "runs"), "--executor", "slurm", "--quiet"]) == 0
    runs = {n: tmp_path / "runs/sig" / n / "main" for n in stages}
    jobs = {n: read(f / "stage.json")["job_id"] for n, f in runs.items()}
    wait_for("both to train", lambda: all(trained(f) >= 20 for f in runs.values()), 400, runs.values())
    for name, sig in (("term", "TERM"), ("usr1", "USR1")):
        subprocess.run(["scancel", f"--signal={sig}", jobs[name]], check=True)
    wait_for("both to stop", lambda: all(read(f / "status.json").get("state") == "preempted" for f in runs.values()), 300, runs.values())
    stopped = {n: stopped_at(f) for n, f in runs.items()}
    for name, folder in runs.items():
        assert max(checkpoint_steps(folder)) == stopped[name] < 4000, name
    wait_for("SIGTERM's job to end", lambda: job_info(jobs["term"]).get("JobState") == "FAILED", 300, runs.values())
    assert job_info(jobs["term"])["Restarts"] == "0" and state(runs["term"]) == "preempted"
    wait_for("SIGUSR1's job to be requeued", lambda: job_info(jobs["usr1"]).get("Restarts") == "1", 300, runs.values())
    assert state(runs["usr1"]) in ("preempted", "running")
    subprocess.run(["scancel", jobs["usr1"]], check=True)   # enough: the resume itself is the time-limit test's


def test_requeued_job_resumes_from_another_working_directory(slurm, shapes_manifest, tmp_path, monkeypatch):
    """Submitted from a folder with relative paths; preempted (USR1) and requeued; before it starts again its working
    directory is changed (`scontrol update WorkDir=`) and the first one deleted: it resumes where it stopped."""
    first = tmp_path / "submit"
    first.mkdir()
    shutil.copytree(shapes_manifest.parent, tmp_path / "data")       # the data stays; it is named from `first`
    write_experiment(first / "wd.yaml", "wd", {"mae": mae_stage(Path("../data") / shapes_manifest.name, 60,
                                                                 overrides=["train.log_every=10"])})
    monkeypatch.chdir(first)
    assert main(["run", "wd.yaml", "--out", str(tmp_path / "runs"), "--executor", "slurm", "--quiet"]) == 0
    run = tmp_path / "runs/wd/mae/main"
    job = read(run / "stage.json")["job_id"]
    wait_for("training", lambda: trained(run) >= 10, 400, [run])
    with holding(run):                                 # so that the signal comes before the last step, however fast
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_for("the job to be requeued", lambda: job_info(job).get("Restarts") == "1", 300, [run])
    stopped = stopped_at(run)
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    subprocess.run(["scontrol", "update", f"JobId={job}", f"WorkDir={other}"], check=True)
    shutil.rmtree(first)
    assert job_info(job)["WorkDir"] == str(other)
    wait_for("the requeued job to complete", lambda: state(run) in ("complete", "failed"), 600, [run])
    assert state(run) == "complete", read(run / "stage.json")
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert [r["step"] for r in lines] == list(range(10, 61, 10))     # one line per logged step: resumed, not restarted
    assert stopped > 0
