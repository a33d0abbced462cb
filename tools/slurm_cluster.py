"""A one-node SLURM cluster on this machine, from Debian's packages: for the tests and for trying the SLURM executor.

    python tools/slurm_cluster.py start     install if needed (apt-get, as root), configure, start, wait until idle
    python tools/slurm_cluster.py status    is it running? (exit 0 if so)
    python tools/slurm_cluster.py stop      stop the daemons this script started, by the PIDs it recorded
    eval "$(python tools/slurm_cluster.py env)"   point sbatch/squeue/scontrol of this shell at the cluster

What it builds, in `--dir` (default $PREPRETRAIN_SLURM_DIR or /tmp/prepretrain-slurm): a `slurm.conf` with
`SlurmctldHost` and one `NodeName` = the short hostname (CPUs = the CPUs this process may use), process tracking by
`/proc` (`proctrack/linuxproc`: no cgroups needed), no task binding, no accounting, `select/cons_tres` with
`CR_CPU`; a munge key and a private munge socket (the system's munged, if any, is left alone); spool, state and log
folders. `munged`, `slurmctld` and `slurmd` run in the foreground of their own sessions, started by this script,
which records their PIDs in `pids.json`; `stop` signals exactly those PIDs (checked against their start times, so
a recycled PID is never hit). `start` is idempotent: a cluster that answers is left running. A fresh start forgets
the jobs of an earlier one (`slurmctld -c`).

Clients find the cluster through `SLURM_CONF` (the file in `--dir`): this script never writes /etc/slurm.

Settings chosen for tests, all of which a real cluster sets otherwise:
  AuthInfo=cred_expire=10   a requeued job may start again 11 s after it ended; SLURM's default (120 s) is the
                            "begin-time delay" of a requeued job: slurmctld sets its BeginTime to now + cred_expire + 1
  KillWait=15               SIGTERM -> SIGKILL at a time limit, a cancel or a requeue (default 30 s)
  MinJobAge=300             finished jobs stay visible to squeue/scontrol for 5 minutes (the tests read their state)
  OverTimeLimit=0           the time limit is hard
  SchedulerParameters=bf_interval=1,sched_interval=2,batch_sched_delay=0
                            the scheduler looks at pending jobs every 1-2 s (defaults 30 s / 60 s / 3 s), so a job
                            whose dependency or begin time is satisfied starts at once
  SlurmdParameters=config_overrides  the node's CPUs and memory are what slurm.conf says (a CPU-limited container
                            sees fewer CPUs than the hardware has)

Exit status: 0 done, 1 the cluster failed to start (the daemons' logs are printed), 2 it cannot be had here
(not root and not installed, no apt-get, the packages cannot be downloaded, a port is taken by another SLURM).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel", "srun")
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class ClusterUnavailable(RuntimeError):
    "SLURM cannot be had on this machine (not root, no apt-get, no packages, a port taken): tests skip outside CI."


class ClusterError(RuntimeError):
    "SLURM is installed but the cluster did not come up; the message carries the daemons' logs."


@dataclass
class Cluster:
    "Where a one-node cluster lives and how it is configured."
    root: Path = field(default_factory=lambda: Path(os.environ.get("PREPRETRAIN_SLURM_DIR", "/tmp/prepretrain-slurm")))
    partition: str = "debug"
    ctld_port: int = 6817
    slurmd_port: int = 6818
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    cpus: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))

    def __post_init__(self): self.root = Path(self.root).resolve()
    @property
    def conf(self) -> Path: return self.root / "slurm.conf"
    @property
    def munge_socket(self) -> Path: return self.root / "munge" / "munge.socket"
    @property
    def pids_file(self) -> Path: return self.root / "pids.json"
    def log(self, name: str) -> Path: return self.root / "log" / f"{name}.log"

    @property
    def env(self) -> dict[str, str]:
        "What a client (sbatch, squeue, a job calling scontrol) needs in its environment."
        return {"SLURM_CONF": str(self.conf)}


# -- installing ------------------------------------------------------------------------------------------------

def which(name: str) -> str | None:
    "`name` on PATH or in the sbin folders (daemons live there and a non-root PATH may lack them)."
    return shutil.which(name) or next((str(Path(d) / name) for d in SBIN if (Path(d) / name).is_file()), None)


def missing_programs() -> list[str]:
    return [p for p in DAEMONS + CLIENTS if which(p) is None]


def install(echo=print) -> None:
    "apt-get install SLURM and munge if a program is missing; `ClusterUnavailable` with the reason if that cannot be done."
    missing = missing_programs()
    if not missing: return
    what = f"SLURM is not installed here (missing: {', '.join(missing)})"
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"{what} and installing it needs root: `sudo apt-get install {' '.join(PACKAGES)}`, "
                                 "or run as root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"{what} and this machine has no apt-get: install {', '.join(PACKAGES)} (version "
                                 "22.05 or newer) with its package manager")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    echo(f"== {what}: apt-get install {' '.join(PACKAGES)}")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:
            tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
            raise ClusterUnavailable(f"{what}, and `{' '.join(cmd)}` failed (exit {res.returncode}): the packages "
                                     f"cannot be had from this machine's apt sources:\n{tail}")
    if missing_programs():
        raise ClusterUnavailable(f"apt-get installed {', '.join(PACKAGES)} but {', '.join(missing_programs())} "
                                 "are still missing")


def slurm_version(c: "Cluster") -> str:
    "`22.05.8`: what `sinfo --version` says (it needs a slurm.conf to say anything)."
    out = _client(c, "sinfo", "--version").stdout
    return out.strip().split()[-1] if out.strip() else "unknown"


# -- configuring -----------------------------------------------------------------------------------------------

def memory_mb() -> int:
    "This machine's memory in MB (MemTotal), less 5% for the system."
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"): return int(int(line.split()[1]) / 1024 * 0.95)
    return 1024


def slurm_conf(c: Cluster) -> str:
    "The text of slurm.conf for cluster `c`."
    r = c.root
    return f"""# A one-node test cluster, written by tools/slurm_cluster.py (see its docstring for why each value)
ClusterName=prepretrain
SlurmctldHost={c.node}(127.0.0.1)
SlurmctldPort={c.ctld_port}
SlurmdPort={c.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={c.munge_socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={c.log("slurmctld")}
SlurmdLogFile={c.log("slurmd")}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=15
MinJobAge=300
OverTimeLimit=0
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={c.node} NodeAddr=127.0.0.1 CPUs={c.cpus} RealMemory={memory_mb()} State=UNKNOWN
PartitionName={c.partition} Nodes={c.node} Default=YES MaxTime=INFINITE State=UP
"""


def write_files(c: Cluster) -> None:
    "slurm.conf, a munge key (kept across starts), and the folders the daemons need."
    for sub in ("state", "spool", "run", "log", "munge"):
        (c.root / sub).mkdir(parents=True, exist_ok=True)
    c.root.chmod(0o755)
    (c.root / "munge").chmod(0o711)            # munged refuses a socket or key folder others can write
    key = c.root / "munge" / "munge.key"
    if not key.is_file():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    c.conf.write_text(slurm_conf(c))


# -- the daemons -----------------------------------------------------------------------------------------------

def _start_time(pid: int) -> int | None:
    "The kernel's start time (field 22 of /proc/PID/stat) of `pid`, or None if it is gone."
    try: stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError: return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def read_pids(c: Cluster) -> dict[str, dict]:
    try: return json.loads(c.pids_file.read_text())
    except (OSError, ValueError): return {}


def alive(c: Cluster) -> dict[str, int]:
    "The daemons this script started that are still those processes: name -> pid."
    out = {}
    for name, rec in read_pids(c).items():
        if _start_time(rec["pid"]) == rec["start"]: out[name] = rec["pid"]
    return out


def _client(c: Cluster, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([which(args[0]) or args[0], *args[1:]], env={**os.environ, **c.env},
                          capture_output=True, text=True, timeout=timeout)


def node_state(c: Cluster) -> str:
    "What sinfo says about the node (`idle`, `mixed`, `down*`...), or '' if slurmctld does not answer."
    try: res = _client(c, "sinfo", "-h", "-n", c.node, "-o", "%T", timeout=10)
    except (OSError, subprocess.SubprocessError): return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def is_running(c: Cluster) -> bool:
    "All three daemons started by this script are up and the node is usable."
    return set(alive(c)) == set(DAEMONS) and node_state(c).rstrip("*~#") in ("idle", "mixed", "allocated", "completing")


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try: s.bind(("127.0.0.1", port))
        except OSError: return True
    return False


def _spawn(c: Cluster, name: str, argv: list[str]) -> dict:
    "Start a daemon in the foreground of a new session (it outlives this process); its output goes to its log."
    log = open(c.root / "log" / f"{name}.out", "ab")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **c.env})
    log.close()
    time.sleep(0.2)
    if proc.poll() is not None:
        raise ClusterError(f"{name} exited at once (status {proc.returncode}):\n{_logs(c, name)}")
    return {"pid": proc.pid, "start": _start_time(proc.pid), "argv": argv}


def _logs(c: Cluster, *names: str, lines: int = 20) -> str:
    out = []
    for name in names:
        for path in (c.root / "log" / f"{name}.out", c.log(name)):
            if path.is_file() and path.stat().st_size:
                out.append(f"--- {path} (last {lines} lines)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out) or "(no log written)"


def start(c: Cluster | None = None, timeout: float = 60, echo=print) -> Cluster:
    "Install if needed, configure and start the cluster, wait until its node is idle; a running one is left as it is."
    c = c or Cluster()
    if is_running(c):
        echo(f"== SLURM cluster already running ({c.conf}; pids {alive(c)})")
        return c
    install(echo)
    if alive(c): stop(c, echo=lambda s: None)          # half up (one daemon died): start afresh
    for port in (c.ctld_port, c.slurmd_port):
        if _port_taken(port):
            raise ClusterUnavailable(f"port {port} is in use by another program (another SLURM?): stop it, or "
                                     "start this cluster on other ports (--ctld-port, --slurmd-port)")
    write_files(c)
    pids = {}
    try:
        pids["munged"] = _spawn(c, "munged", [which("munged"), "--foreground", "--force", f"--socket={c.munge_socket}",
                                              f"--key-file={c.root / 'munge' / 'munge.key'}",
                                              f"--pid-file={c.root / 'run' / 'munged.pid'}",
                                              f"--seed-file={c.root / 'munge' / 'munged.seed'}",
                                              f"--log-file={c.log('munged')}"])
        _wait(lambda: c.munge_socket.exists(), 10, c, "munged", "its socket")
        pids["slurmctld"] = _spawn(c, "slurmctld", [which("slurmctld"), "-D", "-c", "-f", str(c.conf)])
        _wait(lambda: _client(c, "scontrol", "ping").stdout.count("UP") > 0, timeout, c, "slurmctld", "`scontrol ping` UP")
        pids["slurmd"] = _spawn(c, "slurmd", [which("slurmd"), "-D", "-f", str(c.conf), "-N", c.node])
    finally:
        c.pids_file.write_text(json.dumps(pids, indent=2) + "\n")
    _wait(lambda: node_state(c).rstrip("*~#") == "idle", timeout, c, "slurmd", f"node {c.node} idle in sinfo")
    echo(f"== SLURM {slurm_version(c)} cluster up: node {c.node} ({c.cpus} CPUs), partition {c.partition}, "
         f"SLURM_CONF={c.conf}")
    return c


def _wait(ready, timeout: float, c: Cluster, name: str, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if ready(): return
        except (OSError, subprocess.SubprocessError): pass
        dead = [n for n, rec in read_pids(c).items() if _start_time(rec["pid"]) != rec["start"]]
        if dead: break
        time.sleep(0.5)
    raise ClusterError(f"the SLURM cluster did not come up: waited for {what} ({timeout:.0f}s):\n"
                       + _logs(c, "munged", "slurmctld", "slurmd"))


def stop(c: Cluster | None = None, wait: float = 20, echo=print) -> list[str]:
    "SIGTERM the daemons this script started (slurmd first), SIGKILL what is left after `wait` s; returns their names."
    c = c or Cluster()
    running = alive(c)
    stopped = []
    for name in ("slurmd", "slurmctld", "munged"):
        if name not in running: continue
        pid = running[name]
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + wait
        while _start_time(pid) is not None and time.time() < deadline:
            _reap(pid); time.sleep(0.2)
        if _start_time(pid) is not None:
            os.kill(pid, signal.SIGKILL); time.sleep(0.2); _reap(pid)
        stopped.append(name)
    c.pids_file.unlink(missing_ok=True)
    echo(f"== stopped {', '.join(stopped)}" if stopped else "== no SLURM daemon of this script was running")
    return stopped


def _reap(pid: int) -> None:
    "Collect `pid` if it is our child that exited (a zombie otherwise keeps its /proc entry)."
    try: os.waitpid(pid, os.WNOHANG)
    except ChildProcessError: pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument("--dir", type=Path, default=None, help="where config, state and logs live")
    parser.add_argument("--partition", default="debug")
    parser.add_argument("--ctld-port", type=int, default=6817)
    parser.add_argument("--slurmd-port", type=int, default=6818)
    args = parser.parse_args(argv)
    kw = {"partition": args.partition, "ctld_port": args.ctld_port, "slurmd_port": args.slurmd_port}
    c = Cluster(root=args.dir, **kw) if args.dir else Cluster(**kw)
    try:
        if args.command == "start": start(c)
        elif args.command == "stop": stop(c)
        elif args.command == "env": print(f"export SLURM_CONF={c.conf}")
        else:
            up = is_running(c)
            print(f"running: node {c.node} {node_state(c)}, pids {alive(c)}, SLURM_CONF={c.conf}" if up else "not running")
            return 0 if up else 1
    except ClusterUnavailable as e:
        print(f"slurm_cluster: cannot be had here: {e}", file=sys.stderr); return 2
    except ClusterError as e:
        print(f"slurm_cluster: {e}", file=sys.stderr); return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
