"""Two nodes for real: a SLURM cluster of two hosts on this machine (tests/slurm/cluster.py with nodes=2: each
slurmd in a network, UTS and mount namespace of its own, hostnames node1 and node2, a bridge between them) and
launch/slurm/train_multinode.sbatch as users submit it, one process per node (GPUS_PER_NODE=1, CPU nodes).

Run with: python -m pytest -q -m slurm   (root, `apt-get install -y slurm-wlm munge`, iproute2; .ci/run does it)
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, STEPS, assert_bitwise_equal, evaluations, final_weights, last_step

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
import cluster  # noqa: E402
from cluster import job, wait_done, wait_until  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1200)]
NODE = ["--gpus-per-node=0", "--cpus-per-task=2"]          # the documented setting for nodes without GPUs


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    why = cluster.available(nodes=2)
    if why:
        if os.environ.get("DCGAN_DIST_REQUIRE_SLURM"):
            pytest.fail(f"DCGAN_DIST_REQUIRE_SLURM is set but {why}")
        pytest.skip(why)
    root = tmp_path_factory.mktemp("cluster2")
    t0 = time.monotonic()
    env = {**os.environ, **cluster.start(root, nodes=2)}
    print(f"two-node cluster up in {time.monotonic() - t0:.1f} s")
    yield root, env
    cluster.stop(root)


def submit(env: dict, tiny: Path, runs: Path, *overrides: str, options=(), extra: dict | None = None) -> int:
    """sbatch --nodes=2 launch/slurm/train_multinode.sbatch, unchanged; its log in runs/slurm-JOBID.out."""
    cmd = ["sbatch", "--parsable", *NODE, f"--output={runs}/slurm-%j.out", *options,
           "launch/slurm/train_multinode.sbatch", str(tiny),
           *[a for s in [f'runs_dir="{runs}"', *overrides] for a in ("--set", s)]]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**env, "GPUS_PER_NODE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                            **(extra or {})})
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip().split(";")[0])


def test_the_nodes_are_two_hosts_on_a_network_of_their_own(two_nodes):
    """What a job step sees on each node: its own hostname, its own address, the other node by name."""
    _, env = two_nodes
    p = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "bash", "-c",
                        'echo $SLURM_NODEID $(hostname) $(hostname -I) $(getent hosts node1 | cut -d" " -f1)'],
                       capture_output=True, text=True, env=env, timeout=60)
    rows = sorted(line.split() for line in p.stdout.splitlines())
    assert p.returncode == 0 and [r[:2] for r in rows] == [["0", "node1"], ["1", "node2"]], p.stderr
    (_, _, ip1, head1), (_, _, ip2, head2) = rows
    assert ip1 != ip2 and not ip1.startswith("127.") and head1 == head2 == ip1


def test_a_two_node_job_trains_to_the_end_bitwise_equal_to_one_node(two_nodes, tiny, reference, resumable,
                                                                     tmp_path):
    """The same config and world size (2) as the session's reference run (2 processes on one machine): G, D, G_ema
    and the evaluations bitwise equal; the ranks' rendezvous is node1's address, from the allocation."""
    _, env = two_nodes
    t0 = time.monotonic()
    job_id = submit(env, tiny, tmp_path, *resumable)
    log = tmp_path / f"slurm-{job_id}.out"
    end = wait_done(env, job_id, log, timeout=600)
    print(f"two-node job: {time.monotonic() - t0:.1f} s from sbatch to its end")
    text = log.read_text()
    assert end["JobState"] == "COMPLETED" and end["NodeList"] == "node[1-2]", (end, text[-3000:])
    assert re.search(r"2 node\(s\) x 1, head node1:\d+", text) and "Traceback" not in text, text[-3000:]
    assert last_step(tmp_path / "tiny") == STEPS
    assert_bitwise_equal(final_weights(tmp_path / "tiny", STEPS), reference["weights"])
    assert evaluations(tmp_path / "tiny") == reference["evals"]


SLOW_STEPS = {"DCGAN_DIST_FAULT": "slow@250"}   # every step 0.25 s longer: time to stop or cut a node mid-run
WANDB = ['log.wandb="offline"', 'log.trackers=["wandb"]']


def kill_the_job_on(root: Path, node: str) -> None:
    """kill -9 of the job's own processes on ``node`` (run.py, the launcher, the rank, its loader worker), not
    SLURM's daemons (without its slurmstepd, srun would wait for that step for ever; job.sh bounds that too)."""
    for pid in cluster.node_pids(root, node):
        try:
            if not Path(f"/proc/{pid}/comm").read_text().startswith(("slurmd", "slurmstepd")):
                os.kill(pid, 9)
        except OSError:                    # gone meanwhile
            pass


def wait_at_step(env, job_id: int, run: Path, step: int, log: Path) -> None:
    wait_until(lambda: job(env, job_id).get("JobState") == "RUNNING" and last_step(run) >= step, 600,
               f"job {job_id} at step {step}", log)


def assert_requeued_and_exact(env, job_id: int, run: Path, log: Path, reference: dict) -> str:
    end = wait_done(env, job_id, log, timeout=900)
    text = log.read_text()
    assert end["JobState"] == "COMPLETED" and int(end["Restarts"]) >= 1, (end, text[-4000:])
    assert last_step(run) == STEPS and not list((run / "checkpoints").glob("*.tmp")), text[-3000:]
    assert_bitwise_equal(final_weights(run, STEPS), reference["weights"])
    assert evaluations(run) == reference["evals"]
    return text


@pytest.mark.parametrize("how", ["usr1_to_the_batch_shell", "usr1_to_every_process", "scontrol_requeue",
                                 "preemption", "time_limit"])
def test_a_stopped_two_node_job_checkpoints_requeues_and_ends_bitwise_equal(two_nodes, tiny, reference, resumable,
                                                                           tmp_path, how):
    """Every rank on both nodes stops at one agreed step after a checkpoint (exit 75), the job is requeued and
    ends bitwise where the one-node run ends. W&B (offline) is one run: global rank 0's, every segment one id."""
    _, env = two_nodes
    command = {"usr1_to_the_batch_shell": ["scancel", "--signal=USR1", "--batch", "{job}"],
               "usr1_to_every_process": ["scancel", "--signal=USR1", "{job}"],
               "scontrol_requeue": ["scontrol", "requeue", "{job}"],
               # a job of the higher-priority partition that needs both nodes whole
               "preemption": ["sbatch", "--partition=urgent", "--nodes=2", "--cpus-per-task=16",
                              f"--output={tmp_path}/urgent-%j.out", "--wrap", "sleep 2"],
               # a real time limit: the scripts' warning signal 60 s before 2 minutes end (steps of 1.5 s)
               "time_limit": None}[how]
    limit = how == "time_limit"
    job_id = submit(env, tiny, tmp_path, *resumable, *WANDB, options=["--time=2", "--signal=B:USR1@60"] if limit
                    else (), extra={"DCGAN_DIST_FAULT": "slow@1500"} if limit else SLOW_STEPS)
    run, log = tmp_path / "tiny", tmp_path / f"slurm-{job_id}.out"
    t0 = time.monotonic()
    wait_until(lambda: job(env, job_id).get("JobState") == "RUNNING", 300, "the job to start", log)
    wait_until(lambda: last_step(run) >= 1, 300, "the first step", log)
    print(f"{how}: first step {time.monotonic() - t0:.1f} s after the job started running")
    wait_at_step(env, job_id, run, 12, log)
    t0 = time.monotonic()
    if command:
        subprocess.run([a.format(job=job_id) for a in command], check=True, env=env, capture_output=True)
    wait_until(lambda: "stopped by" in log.read_text(), 180, "the stop", log)
    print(f"{how}: stopped {time.monotonic() - t0:.1f} s after the request")
    text = assert_requeued_and_exact(env, job_id, run, log, reference)
    stopped = re.search(r"stopped by (?:signal|STOP file) at step (\d+) after a checkpoint", text)
    assert stopped and 12 <= int(stopped.group(1)) < STEPS, text[-3000:]
    segments = sorted((run / "wandb").glob("offline-run-*"))
    ids = {re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w{12})(-\d+)?", p.name).group(1) for p in segments}
    assert len(segments) >= 2 and len(ids) == 1, [p.name for p in segments]


@pytest.mark.parametrize("loss", ["processes_killed", "link_down"])
def test_a_node_lost_mid_run_ends_the_job_in_bounded_time_and_the_requeue_resumes_exactly(two_nodes, tiny, reference,
                                                                                         resumable, tmp_path, loss):
    """Every process of the job on node2 killed (kill -9), or node2's network link cut: node1's rank does not wait
    for ever; within train.dist_timeout_s (here 20 s) it ends with one line naming what it lost (exit 76), the job
    requeues itself and resumes from the newest complete checkpoint, bitwise where the one-node run ends."""
    root, env = two_nodes
    job_id = submit(env, tiny, tmp_path, *resumable, "train.dist_timeout_s=20", extra=SLOW_STEPS)
    run, log = tmp_path / "tiny", tmp_path / f"slurm-{job_id}.out"
    wait_at_step(env, job_id, run, 12, log)
    t0 = time.monotonic()
    if loss == "processes_killed":
        kill_the_job_on(root, "node2")
    else:
        cluster.set_link(root, "node2", up=False)
    try:
        wait_until(lambda: "lost contact with" in log.read_text(), 120, "node1 to give up", log)
        took = time.monotonic() - t0
        print(f"{loss}: node1's rank gave up {took:.1f} s after the loss")
        assert took < 20 + 30 if loss == "link_down" else took < 30
    finally:
        if loss == "link_down":
            time.sleep(2)
            cluster.set_link(root, "node2", up=True)
    wait_until(lambda: "requeueing job" in log.read_text(), 180, "the requeue", log)
    print(f"{loss}: the job's first segment ended (requeueing) {time.monotonic() - t0:.1f} s after the loss")
    text = assert_requeued_and_exact(env, job_id, run, log, reference)
    line = next(line for line in text.splitlines() if "lost contact with" in line)
    if loss == "processes_killed":
        assert re.search(r"error: rank 0 lost contact with the rank\(s\) on node2 \(10\.77\.\d+\.12\)", line), line
    else:
        assert "no answer within train.dist_timeout_s = 20 s" in line, line
    assert "requeueing job" in text and "resumed from" in text, text[-3000:]


def test_a_run_directory_that_only_one_node_sees_stops_the_job_at_start_with_one_line(two_nodes, tiny, tmp_path):
    """runs_dir on a node-local disk (each node's own tmpfs at the same path): one line naming the directory and
    what to do, exit 2, instead of two nodes resuming from different states."""
    root, env = two_nodes
    local = root / "nodelocal" / "runs"
    job_id = submit(env, tiny, tmp_path, f'runs_dir="{local}"')
    log = tmp_path / f"slurm-{job_id}.out"
    end = wait_done(env, job_id, log, timeout=300)
    text = log.read_text()
    assert end["JobState"] == "FAILED" and end["ExitCode"].startswith("2:"), (end, text[-3000:])
    assert f"error: run directory {local / 'tiny'} is not shared: rank(s) 1 on node2 cannot see what rank 0 on " \
           f"node1 wrote there; put runs_dir on a file system that every node mounts" in text, text[-3000:]
    assert "Traceback" not in text


def test_a_port_taken_on_the_head_node_is_said_and_another_is_used(two_nodes, tiny, tmp_path):
    """The rendezvous port derived from the job id, held by another program on node1: one line, another port,
    and the job trains (not a wait on a stranger's server)."""
    root, env = two_nodes
    job_id = submit(env, tiny, tmp_path, "train.max_steps=4", options=["--hold"])
    port = 20000 + job_id % 20000
    holder = subprocess.Popen(["nsenter", f"--net=/run/netns/{cluster._netns(root, 'node1')}", sys.executable, "-c",
                               f"import socket, time; s = socket.socket(); s.bind(('', {port})); s.listen(); "
                               f"print('holding', flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        subprocess.run(["scontrol", "release", str(job_id)], check=True, env=env)
        log = tmp_path / f"slurm-{job_id}.out"
        end = wait_done(env, job_id, log, timeout=300)
    finally:
        holder.kill()
    text = log.read_text()
    assert end["JobState"] == "COMPLETED", (end, text[-3000:])
    assert re.search(rf"dcgan_dist: port {port} on node1 is in use by another program; the rendezvous uses port "
                     rf"\d+", text), text[-3000:]


def test_a_node_lost_while_a_checkpoint_is_written_leaves_no_half_checkpoint_and_resumes_exactly(
        two_nodes, tiny, reference, resumable, tmp_path):
    """node2's processes killed while the checkpoint of step 15 is being written (its rank takes 8 s over it):
    node1 ends with the one line and exit 76; the half-written step_00000015.tmp is removed, never loaded; the
    requeued job resumes from step 10 and ends bitwise where the one-node run ends."""
    root, env = two_nodes
    job_id = submit(env, tiny, tmp_path, *resumable, "train.dist_timeout_s=20",
                    extra={"DCGAN_DIST_FAULT": "slowsave@15@1"})
    run, log = tmp_path / "tiny", tmp_path / f"slurm-{job_id}.out"
    wait_until(lambda: (run / "checkpoints" / "step_00000015.tmp").is_dir(), 300, "the checkpoint of step 15", log)
    kill_the_job_on(root, "node2")
    text = assert_requeued_and_exact(env, job_id, run, log, reference)
    assert "error: rank 0 lost contact with the rank(s) on node2" in text, text[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000010'} (step 10)" in text, text[-3000:]
