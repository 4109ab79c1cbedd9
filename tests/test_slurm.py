"""On a real SLURM cluster (tests/slurm/cluster.py: Debian's slurm-wlm, one node, run as root): the project's
sbatch script, unchanged, stopped every way a cluster stops a job; each job ends COMPLETED after at least one
requeue with G, D and G_ema bitwise equal to an uninterrupted run. W&B runs offline, as on compute nodes.

Run with: python -m pytest -q -m slurm   (needs `apt-get install -y slurm-wlm munge` and root; .ci/run does both)
"""

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT, assert_bitwise_equal, env, final_weights, last_step, run_cmd

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
import cluster  # noqa: E402
from cluster import job, wait_done, wait_until  # noqa: E402

# the module fixture runs five 2-rank jobs side by side, requeues included (~90 s each): on a slow 2-core VM
# (2026-12-01) it outlasted the suite's 300-s timeout while every job still finished; wait_done bounds each job
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1200)]

STEPS = 300
STOP_AFTER = 60               # the stop request comes once the job has trained this many steps
# the demo's settings (G_ema, raw grids, FID/KID and the 8x8 pixel measure during training, lr decay), W&B offline
SETTINGS = [f"train.max_steps={STEPS}", "train.sync_every=1", "checkpoint.every=25", "log.every=1",
            "log.sample_every=50", "data.workers=1", "train.batch_size=32", "model.ngf=16", "model.ndf=16",
            'log.wandb="offline"', 'log.trackers=["wandb"]', "log.raw_grid=true", "eval.every=100", "eval.n=64",
            "eval.batch_size=32", "eval.kid_subset_size=32", "eval.kid_subsets=2", "eval.native_resolution=8",
            "optim.decay_from=0.5"]


@pytest.fixture(scope="module", autouse=True)
def _eval_cache(classifier_cache):
    """The session's digit classifier: not trained again by every job."""
    SETTINGS.append(f'eval.cache_dir="{classifier_cache}"')
    yield
    SETTINGS.pop()
CPU_NODE = ["--gpus-per-node=0", "--cpus-per-task=2"]        # the documented setting for nodes without GPUs


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = cluster.available()
    if why:
        if os.environ.get("DCGAN_DIST_REQUIRE_SLURM"):
            pytest.fail(f"DCGAN_DIST_REQUIRE_SLURM is set but {why}")
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, **cluster.start(root)}
    yield env
    cluster.stop(root)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    runs = tmp_path_factory.mktemp("slurm_ref")
    p = subprocess.run(run_cmd(tiny, f'runs_dir="{runs}"', *SETTINGS), capture_output=True, text=True,
                       timeout=600, env=env())
    assert p.returncode == 0, p.stderr[-3000:]
    return final_weights(runs / "tiny", STEPS)


def sbatch(env: dict, tiny: Path, runs: Path, *options: str, output: bool = True) -> int:
    """Submit launch/slurm/train.sbatch as it is; its log goes to runs/slurm-JOBID.out (output=False: where the
    script says, logs/)."""
    cmd = ["sbatch", "--parsable", *CPU_NODE, *([f"--output={runs}/slurm-%j.out"] if output else []), *options,
           "launch/slurm/train.sbatch", str(tiny), *[a for s in [f'runs_dir="{runs}"', *SETTINGS] for a in ("--set", s)]]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**env, "GPUS_PER_NODE": "2",
                                                                           "PYTHON": sys.executable})
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip().split(";")[0])


def wait_running_at(env, job_id: int, run: Path, step: int, log: Path) -> None:
    wait_until(lambda: job(env, job_id).get("JobState") == "RUNNING" and last_step(run) >= step, 600,
               f"job {job_id} at step {step}", log)


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss_d" in line]


def stop_at(env, job_id: int, run: Path, log: Path, command: list[str]) -> None:
    wait_running_at(env, job_id, run, STOP_AFTER, log)
    subprocess.run([a.format(job=job_id) for a in command], check=True, env=env, capture_output=True)


# How each stop reaches a job: sbatch options, and the command that stops it ({job}: its id; None: SLURM does).
STOPS = {
    "usr1_to_the_batch_shell": ([], ["scancel", "--signal=USR1", "--batch", "{job}"]),
    "usr1_to_every_process": ([], ["scancel", "--signal=USR1", "{job}"]),
    "scontrol_requeue": ([], ["scontrol", "requeue", "{job}"]),
    "time_limit_warning": (["--time=2", "--signal=B:USR1@60"], None),
}


@pytest.fixture(scope="module")
def stopped_jobs(slurm, tiny, reference, tmp_path_factory):
    """Every stop of STOPS, and a plain scancel, on jobs that run side by side: {how: (final job state, log, run)}."""
    runs = {how: tmp_path_factory.mktemp(how) for how in [*STOPS, "scancel"]}
    jobs = {how: sbatch(slurm, tiny, runs[how], *STOPS.get(how, ([], None))[0]) for how in runs}
    logs = {how: runs[how] / f"slurm-{jobs[how]}.out" for how in runs}
    threads = [threading.Thread(target=stop_at, args=(slurm, jobs[how], runs[how] / "tiny", logs[how], command))
               for how, (_, command) in [*STOPS.items(), ("scancel", ([], ["scancel", "{job}"]))] if command]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {how: (wait_done(slurm, jobs[how], logs[how]), logs[how].read_text(), runs[how] / "tiny") for how in runs}


def assert_requeued_and_exact(end: dict, text: str, run: Path, reference: dict) -> None:
    assert end["JobState"] == "COMPLETED" and int(end["Restarts"]) >= 1, (end, text[-4000:])
    assert re.search(r"stopped by (signal|STOP file) at step \d+ after a checkpoint", text), text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert steps_logged(run) == list(range(1, STEPS + 1))          # each step once: redone ones replaced
    assert_bitwise_equal(final_weights(run, STEPS), reference)


@pytest.mark.parametrize("how", list(STOPS))
def test_a_stopped_job_requeues_and_ends_bitwise_equal_to_an_uninterrupted_run(stopped_jobs, reference, how):
    assert_requeued_and_exact(*stopped_jobs[how], reference)


def test_plain_scancel_checkpoints_at_the_stop_and_ends_the_job(stopped_jobs):
    end, text, run = stopped_jobs["scancel"]
    stopped = int(re.search(r"stopped by (?:signal|STOP file) at step (\d+) after a checkpoint", text).group(1))
    assert end["JobState"] == "CANCELLED" and int(end["Restarts"]) == 0, end
    assert STOP_AFTER <= stopped < STEPS and (run / "checkpoints" / f"step_{stopped:08d}").is_dir()
    assert "requeueing" not in text and "Traceback" not in text


def test_preemption_by_a_higher_priority_partition_requeues_and_ends_exact(slurm, tiny, reference, tmp_path,
                                                                          stopped_jobs):
    """After the other jobs (the urgent job takes the whole node: it would preempt them too)."""
    job_id = sbatch(slurm, tiny, tmp_path, output=False)       # and its log where the script puts it
    run, log = tmp_path / "tiny", ROOT / "logs" / f"slurm-dcgan-{job_id}.out"
    try:
        stop_at(slurm, job_id, run, log, ["sbatch", "--partition=urgent", "--cpus-per-task=16",
                                          f"--output={tmp_path}/urgent-%j.out", "--wrap", "sleep 2"])
        assert_requeued_and_exact(wait_done(slurm, job_id, log), log.read_text(), run, reference)
        ignored = subprocess.run(["git", "status", "--porcelain", "--ignored", str(log)], cwd=ROOT, capture_output=True,
                                 text=True).stdout
        assert ignored.startswith("!! "), ignored                   # in logs/, and git ignores it
    finally:
        log.unlink(missing_ok=True)
