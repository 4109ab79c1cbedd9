"""A real one-node SLURM cluster (Debian's slurm-wlm and munge) for the `slurm` tests, started as root without
systemd, in a folder of its own; stopped by the pids it started, nothing else.

    python tests/slurm/cluster.py start DIR   # prints `export SLURM_CONF=DIR/slurm.conf`; sinfo, sbatch... work
    python tests/slurm/cluster.py stop DIR

Two partitions share the node: ``debug`` (default, preemptable: its jobs are requeued) and ``urgent`` (a higher
priority tier that preempts it). The node claims 16 CPUs whatever the machine has (``config_overrides``), so
several 2-CPU test jobs run side by side. munge's ``cred_expire=30`` cuts a requeued job's restart wait from ~120 s
to 30-50 s. Install the packages with: apt-get install -y slurm-wlm munge
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> str | None:
    """None when the cluster can be started here, else why not."""
    missing = [d for d in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(d, path="/usr/sbin:/usr/bin") is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install -y slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    return None


def config(root: Path, host: str) -> str:
    return f"""ClusterName=dcgantest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=30
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobRequeue=1
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
KillWait=60
MinJobAge=3600
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs=16 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=urgent Nodes={host} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def start(root: Path, timeout: float = 60) -> dict:
    """Start munged, slurmctld and slurmd under ``root`` (emptied first); returns the clients' environment
    additions. Raises RuntimeError naming the daemon and its log when one does not come up."""
    why = available()
    if why:
        raise RuntimeError(why)
    stop(root)
    shutil.rmtree(root, ignore_errors=True)
    for d in ("munge", "state", "spool"):
        (root / d).mkdir(parents=True, mode=0o700)
    os.chmod(root, 0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(config(root, host))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    m = root / "munge"
    cmds = {"munged": ["munged", "-F", "-f", f"--socket={m}/munge.socket", f"--key-file={key}",
                       f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/seed"],
            "slurmctld": ["slurmctld", "-D", "-i", "-f", str(conf)],
            "slurmd": ["slurmd", "-D", "-N", host, "-f", str(conf)]}
    for name in DAEMONS:
        log = open(root / f"{name}.out", "w")
        p = subprocess.Popen(cmds[name], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=root)
        (root / f"{name}.started").write_text(str(p.pid))
        if name == "munged":
            _wait(lambda: (m / "munge.socket").exists(), timeout, f"munged (see {m}/munged.log)")
        if name == "slurmctld":
            _wait(lambda: _ok(["scontrol", "ping"], env, "UP"), timeout, f"slurmctld (see {root}/slurmctld.log)")
    _wait(lambda: _ok(["sinfo", "-h", "-o", "%t"], env, "idle"), timeout, f"slurmd (see {root}/slurmd.log)")
    return {"SLURM_CONF": str(conf)}


def _ok(cmd: list[str], env: dict, expect: str) -> bool:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return p.returncode == 0 and expect in p.stdout


def _wait(cond, timeout: float, what: str) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.3)


def stop(root: Path) -> None:
    """Stop the daemons this script started under ``root`` (by the pids it recorded), newest first."""
    for name in reversed(DAEMONS):
        f = root / f"{name}.started"
        if not f.exists():
            continue
        pid = int(f.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)      # its own session: the daemon and what it forked
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        f.unlink()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(__doc__)
    folder = Path(sys.argv[2]).resolve()
    if sys.argv[1] == "start":
        try:
            print(f"export SLURM_CONF={start(folder)['SLURM_CONF']}")
        except RuntimeError as err:
            sys.exit(f"error: {err}")
    else:
        stop(folder)
