"""A real SLURM cluster (Debian's slurm-wlm and munge) for the `slurm` tests, started as root without systemd, in
a folder of its own; stopped by the pids it started (and the network it made), nothing else.

    python tests/slurm/cluster.py start DIR [--nodes 2]   # prints `export SLURM_CONF=DIR/slurm.conf`
    python tests/slurm/cluster.py stop DIR

One node: slurmd on this host. Two nodes: each slurmd is a host of its own, `node1` and `node2`: its own network
namespace (a veth pair on a bridge of the test's own, 10.77.N.0/24; slurmctld listens on the bridge's .1), its own
hostname (UTS namespace) and mount namespace (/etc/hosts names the nodes; DIR/nodelocal is a tmpfs of its own,
a path that differs per node as a node-local disk does). Jobs run in their node's namespaces: the ranks of a
two-node job talk gloo over that network, never over 127.0.0.1.

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

DAEMONS = ("munged", "slurmctld", "slurmd", "slurmd-node1", "slurmd-node2")     # stopped in reverse order


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available(nodes: int = 1) -> str | None:
    """None when the cluster can be started here, else why not."""
    tools = ("munged", "slurmctld", "slurmd", "sbatch", *(("ip", "nsenter", "unshare") if nodes > 1 else ()))
    missing = [d for d in tools if shutil.which(d, path="/usr/sbin:/usr/bin") is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install -y slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    return None


def config(root: Path, host: str, nodes: dict[str, str] | None = None, ctl_ip: str = "127.0.0.1") -> str:
    """slurm.conf; ``nodes``: {name: address} of a multi-node cluster (None: this host alone)."""
    nodes = nodes or {host: "127.0.0.1"}
    names = ",".join(nodes)
    lines = "\n".join(f"NodeName={n} NodeAddr={a} CPUs=16 RealMemory=16000 State=UNKNOWN" for n, a in nodes.items())
    return f"""ClusterName=dcgantest
SlurmctldHost={host}({ctl_ip})
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=30
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
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
{lines}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=urgent Nodes={names} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def start(root: Path, timeout: float = 60, nodes: int = 1) -> dict:
    """Start munged, slurmctld and the slurmd of each node under ``root`` (emptied first); returns the clients'
    environment additions. Raises RuntimeError naming the daemon and its log when one does not come up."""
    why = available(nodes)
    if why:
        raise RuntimeError(why)
    stop(root)
    shutil.rmtree(root, ignore_errors=True)
    for d in ("munge", "state", "spool", "nodelocal"):
        (root / d).mkdir(parents=True, mode=0o700)
    os.chmod(root, 0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    addrs = _network(root, nodes, host) if nodes > 1 else None
    conf.write_text(config(root, host, addrs and {n: a for n, a in addrs.items() if n != host},
                           addrs[host] if addrs else "127.0.0.1"))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    m = root / "munge"
    cmds = {"munged": ["munged", "-F", "-f", f"--socket={m}/munge.socket", f"--key-file={key}",
                       f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/seed"],
            "slurmctld": ["slurmctld", "-D", "-i", "-f", str(conf)]}
    if addrs is None:
        cmds["slurmd"] = ["slurmd", "-D", "-N", host, "-f", str(conf)]
    for node in [n for n in (addrs or {}) if n != host]:
        (root / "spool" / node).mkdir()
        # the node's own network (nsenter), hostname and mounts (unshare): /etc/hosts and a node-local tmpfs
        cmds[f"slurmd-{node}"] = [
            "nsenter", f"--net=/run/netns/{_netns(root, node)}", "unshare", "--mount", "--uts", "sh", "-c",
            f"mount --bind {root}/hosts /etc/hosts && mount -t tmpfs -o size=64m tmpfs {root}/nodelocal && "
            f"hostname {node} && exec slurmd -D -N {node} -f {conf}"]
    (root / "spool" / host).mkdir(exist_ok=True)
    for name in DAEMONS:
        if name not in cmds:
            continue
        log = open(root / f"{name}.out", "w")
        p = subprocess.Popen(cmds[name], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=root)
        (root / f"{name}.started").write_text(str(p.pid))
        if name == "munged":
            _wait(lambda: (m / "munge.socket").exists(), timeout, f"munged (see {m}/munged.log)")
        if name == "slurmctld":
            _wait(lambda: _ok(["scontrol", "ping"], env, "UP"), timeout, f"slurmctld (see {root}/slurmctld.log)")
    _wait(lambda: _ok(["sinfo", "-h", "-o", "%t"], env, "idle") and
          not _ok(["sinfo", "-h", "-o", "%t"], env, "unk"), timeout, f"slurmd (see {root}/slurmd*.log)")
    return {"SLURM_CONF": str(conf)}


def _netns(root: Path, node: str) -> str:
    return f"dcgan{(root / 'network').read_text().split()[0]}-{node}"


def _network(root: Path, nodes: int, host: str) -> dict[str, str]:
    """A bridge (this host: 10.77.N.1) and a network namespace per node (10.77.N.1i) on a subnet no interface
    uses yet; recorded in root/network (N) for stop(); root/hosts names them. Returns {name: address}."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    n = next(k for k in range(77, 250) if f" 10.77.{k}." not in used and not Path(f"/run/netns/dcgan{k}-node1").exists())
    (root / "network").write_text(f"{n}\n")
    addrs = {host: f"10.77.{n}.1", **{f"node{i}": f"10.77.{n}.1{i}" for i in range(1, nodes + 1)}}
    bridge = f"dcgbr{n}"
    run = [["ip", "link", "add", bridge, "type", "bridge"], ["ip", "addr", "add", f"{addrs[host]}/24", "dev", bridge],
           ["ip", "link", "set", bridge, "up"]]
    for i in range(1, nodes + 1):
        ns, veth = _netns(root, f"node{i}"), f"dcgv{n}-{i}"
        run += [["ip", "netns", "add", ns], ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
                ["ip", "link", "set", veth, "master", bridge], ["ip", "link", "set", veth, "up"],
                ["ip", "-n", ns, "addr", "add", f"{addrs[f'node{i}']}/24", "dev", "eth0"],
                ["ip", "-n", ns, "link", "set", "eth0", "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]
    for cmd in run:
        subprocess.run(cmd, check=True, capture_output=True)
    (root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in addrs.items()))
    return addrs


def node_pids(root: Path, node: str) -> list[int]:
    """The pids of every process in ``node``'s network namespace (its slurmd, and the job steps it runs)."""
    p = subprocess.run(["ip", "netns", "pids", _netns(root, node)], capture_output=True, text=True)
    return [int(x) for x in p.stdout.split()]


def set_link(root: Path, node: str, up: bool) -> None:
    """Plug ``node``'s network cable in or out (its veth on the bridge)."""
    n = (root / "network").read_text().split()[0]
    subprocess.run(["ip", "link", "set", f"dcgv{n}-{node[-1]}", "up" if up else "down"], check=True)


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
    net = root / "network"
    if net.exists():                             # the multi-node cluster's network: its namespaces and bridge
        n = net.read_text().split()[0]
        for ns in Path("/run/netns").glob(f"dcgan{n}-node*"):
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
        subprocess.run(["ip", "link", "del", f"dcgbr{n}"], capture_output=True)
        net.unlink()


# --- clients' helpers for the tests

def job(env: dict, job_id: int) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, env=env).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_until(cond, timeout: float, what: str, log: Path | None = None):
    t0 = time.time()
    while not (value := cond()):
        if time.time() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n" + (log.read_text()[-4000:] if log and
                                                                             log.exists() else ""))
        time.sleep(1)
    return value


def wait_done(env, job_id: int, log: Path, timeout: float = 900) -> dict:
    return wait_until(lambda: (j := job(env, job_id)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED",
                                                                            "TIMEOUT", "NODE_FAIL") and j,
                      timeout, f"job {job_id} to end", log)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 5) or sys.argv[1] not in ("start", "stop") or sys.argv[3:4] not in ([], ["--nodes"]):
        sys.exit(__doc__)
    folder = Path(sys.argv[2]).resolve()
    if sys.argv[1] == "start":
        try:
            print(f"export SLURM_CONF={start(folder, nodes=int(sys.argv[4]) if len(sys.argv) == 5 else 1)['SLURM_CONF']}")
        except RuntimeError as err:
            sys.exit(f"error: {err}")
    else:
        stop(folder)
