"""Every stop path ends in a checkpoint (when a step was taken since the last one) and exit 75, as on a real
cluster, where SLURM signals every process of a job at once: the supervisor, the launcher, each rank, the loader
workers and W&B's service. No rank outlives its launcher by more than one step. Two launchers on 127.0.0.1
stand for two nodes."""

import json
import signal
import subprocess
import time

import psutil
import pytest

from conftest import (SLOW, STEPS, assert_bitwise_equal, assert_stopped_after_checkpoint, env, final_weights, free_port,
                      last_step, launch_cmd, run_cmd, tree, wait_for_step, wait_gone)

WANDB_OFFLINE = ['log.wandb="offline"', 'log.trackers=["wandb"]']


def signal_every_process(pid: int, sig: int) -> list[psutil.Process]:
    """What slurmstepd does: the signal to every process of the tree at once (returns them)."""
    procs = tree(pid)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return procs


def metric_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_to_every_process_with_wandb_on_checkpoints_and_exits_75(tiny, tmp_path):
    run = tmp_path / "tiny"
    proc = subprocess.Popen(run_cmd(tiny, f'runs_dir="{tmp_path}"', *SLOW, *WANDB_OFFLINE), env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(proc, run, 12)
    signal_every_process(proc.pid, signal.SIGTERM)            # W&B's service (wandb-core) too, when in the tree
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    stopped = assert_stopped_after_checkpoint(out, run)
    assert metric_steps(run) == list(range(1, stopped + 1))           # nothing lost with the tracker
    assert "Traceback" not in err and "ConnectionResetError" not in err.replace("(ConnectionResetError", "")
    assert err.count("wandb failed at step") <= 1                       # one line, if W&B was called after it died


@pytest.mark.slow            # 30 s; the real-cluster test usr1_to_every_process covers it too (-m slurm)
def test_usr1_to_every_process_with_a_far_sync_point_checkpoints_and_exits_75(tiny, tmp_path):
    """The launcher survives SIGUSR1 and run.py waits for the ranks as long as they live (not a fixed 5 s):
    here the next sync point is up to 40 steps of 0.25 s away."""
    run = tmp_path / "tiny"
    proc = subprocess.Popen(run_cmd(tiny, f'runs_dir="{tmp_path}"', *SLOW, "train.sync_every=40", "checkpoint.every=1000"),
                            env={**env(), "DCGAN_DIST_FAULT": "slow@250"}, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    wait_for_step(proc, run, 41)
    signal_every_process(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert assert_stopped_after_checkpoint(out, run) == 80


def _first_rank_started(proc) -> None:
    t0 = time.time()
    while not any("LOCAL_RANK" in _environ(p) for p in tree(proc.pid)):
        assert proc.poll() is None and time.time() - t0 < 60
        time.sleep(0.01)


def _environ(p: psutil.Process) -> dict:
    try:
        return p.environ()
    except psutil.Error:
        return {}


@pytest.mark.parametrize("sig, when, to", [      # the default suite runs one, -m slow the others
    pytest.param(signal.SIGTERM, "one second in", "run.py", marks=pytest.mark.slow),
    (signal.SIGTERM, "as the first rank starts", "every process"),
    pytest.param(signal.SIGUSR1, "as the first rank starts", "every process", marks=pytest.mark.slow),
])
def test_a_stop_request_during_start_up_ends_the_run_at_once_with_exit_75(tiny, tmp_path, sig, when, to):
    run = tmp_path / "tiny"
    proc = subprocess.Popen(run_cmd(tiny, f'runs_dir="{tmp_path}"', *SLOW), env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if when == "one second in":
        time.sleep(1)
    else:
        _first_rank_started(proc)
    if to == "run.py":
        proc.send_signal(sig)
    else:
        signal_every_process(proc.pid, sig)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-3000:]
    assert out.strip().splitlines()[-1] == ("stopped by signal during start-up, before step 1 (nothing new to "
                                            "checkpoint); run the same command again to continue")
    assert last_step(run) == 0 and not list((run / "checkpoints").glob("step_*"))
    assert "Traceback" not in err


@pytest.mark.parametrize("killed", ["run.py", pytest.param("the launcher", marks=pytest.mark.slow)])
def test_no_rank_outlives_a_killed_launcher_by_more_than_one_step(tiny, tmp_path, killed):
    """Steps of 1.5 s and no sync point for 1000 steps: the ranks stop after the step in progress."""
    run = tmp_path / "tiny"
    proc = subprocess.Popen(run_cmd(tiny, f'runs_dir="{tmp_path}"', *SLOW, "train.sync_every=1000",
                                    "checkpoint.every=1000"),
                            env={**env(), "DCGAN_DIST_FAULT": "slow@1500"}, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    wait_for_step(proc, run, 2)
    procs = tree(proc.pid)
    launcher = psutil.Process(proc.pid).children()[0]
    ranks = launcher.children()
    assert len(ranks) == 2 and all("LOCAL_RANK" in _environ(r) for r in ranks)
    at_kill = last_step(run)
    (psutil.Process(proc.pid) if killed == "run.py" else launcher).kill()
    print(f"ranks gone {wait_gone(ranks, 60):.1f} s after the kill")
    assert last_step(run) <= at_kill + 2        # the step in progress when the kill came, and its log row
    out, err = proc.communicate(timeout=60)
    if killed == "the launcher":                # run.py waited for the ranks and reports what they said
        assert proc.returncode == 1
        assert "the launcher (pid" in err.strip().splitlines()[-1] and "is gone" in err
    wait_gone(procs, 60)


def _node(tiny, tmp_path, machine_rank: int, port: int, *overrides):
    cmd = launch_cmd(tiny, f'runs_dir="{tmp_path}"', *overrides, launcher="run", node=(machine_rank, 2, port))
    return subprocess.Popen(cmd, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("signalled_node", [pytest.param(0, marks=pytest.mark.slow), 1])
def test_two_nodes_stop_together_on_a_signal_to_either_and_resume_exactly(tiny, reference, resumable, tmp_path,
                                                                          signalled_node):
    """Two launchers as two machines on 127.0.0.1 (static rendezvous, as train_multinode.sbatch), one process
    each: a SIGTERM to either node's run.py stops both at one step after a checkpoint, both exit 75; resumed, the
    run ends bitwise equal to the same run never stopped on one node with two processes."""
    run = tmp_path / "tiny"
    port = free_port()
    nodes = [_node(tiny, tmp_path, r, port, *resumable) for r in (0, 1)]
    wait_for_step(nodes[0], run, 10)
    nodes[signalled_node].send_signal(signal.SIGTERM)
    outs = [n.communicate(timeout=120) for n in nodes]
    assert [n.returncode for n in nodes] == [75, 75], outs[signalled_node][1][-3000:]
    assert assert_stopped_after_checkpoint(outs[0][0], run) < STEPS

    port = free_port()
    nodes = [_node(tiny, tmp_path, r, port, *resumable) for r in (0, 1)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert_bitwise_equal(final_weights(run, STEPS), reference["weights"])
