"""Failures end the job promptly on every rank, with one clear line and an exit code that says what happened
(launch/run.py); signals and Ctrl-C stop every rank at one step; no rank outlives its launcher."""

import os
import signal
import subprocess
import time

import psutil
import pytest

from conftest import SLOW, assert_stopped_after_checkpoint, env, last_step, run_cmd, tree, wait_for_step, wait_gone



@pytest.mark.parametrize("fault, code, last_line", [
    ("enospc@10@0", 2, "error: disk full while writing checkpoint {ckpt}/step_00000010.tmp (No space left on "
                       "device); the newest complete checkpoint ({ckpt}/step_00000005) is untouched; free space "
                       "and run the same command to resume from it"),
    ("raise@12@1", 1, "error: crashed with RuntimeError: injected failure at step 12 (DCGAN_DIST_FAULT) "
                      "(traceback above)"),
])
def test_a_failure_on_one_rank_ends_every_rank_promptly(tiny, tmp_path, fault, code, last_line):
    ckpt = tmp_path / "tiny" / "checkpoints"
    proc = subprocess.Popen(run_cmd(tiny, f'runs_dir="{tmp_path}"', *SLOW), env={**env(), "DCGAN_DIST_FAULT": fault},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, tmp_path / "tiny", 8)
    procs = tree(proc.pid)                      # supervisor, launcher, 2 ranks, their loader workers
    assert len(procs) >= 6
    good = {p.name: p.read_bytes() for p in (ckpt / "step_00000005").iterdir()}
    fault_step = int(fault.split("@")[1])
    wait_for_step(proc, tmp_path / "tiny", fault_step - 1)     # the failure comes within a step of this
    t_fail = time.time()
    out, err = proc.communicate(timeout=120)
    gone = wait_gone(procs) + time.time() - t_fail
    print(f"{fault}: every process gone {gone:.1f}s after the failing step began")
    assert proc.returncode == code
    assert err.strip().splitlines()[-1] == last_line.format(ckpt=ckpt)
    if code == 2:
        assert "Traceback" not in err and "ChildFailedError" not in err
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000005"] if code == 2 else True
    assert {p.name: p.read_bytes() for p in (ckpt / "step_00000005").iterdir()} == good
    assert last_step(tmp_path / "tiny") <= fault_step and gone < 30


@pytest.mark.parametrize("overrides, message", [
    (['data.shards="{tmp}/nowhere"'], "error: {tmp}/nowhere/manifest.json: no manifest; create shards with "
                                      "launch/prepare_data.py"),
    (["train.batch_size=1000"], "images cannot fill one batch of 1000 for each of 2 ranks; lower the batch size"),
    (['runs_dir="{tmp}/file"'], "error: run directory {tmp}/file/tiny: cannot write"),
])
def test_a_user_error_under_the_launcher_is_the_last_line_and_exit_2(tiny, tmp_path, overrides, message):
    (tmp_path / "file").write_text("a file, not a folder")
    t0 = time.time()
    p = subprocess.run(run_cmd(tiny, f'runs_dir="{tmp_path}"', *[o.format(tmp=tmp_path) for o in overrides]),
                       env=env(), capture_output=True, text=True, timeout=120)
    print(f"user error reported in {time.time() - t0:.1f}s")
    assert p.returncode == 2
    assert message.format(tmp=tmp_path) in p.stderr.strip().splitlines()[-1]
    assert "Traceback" not in p.stderr and "FAILED" not in p.stderr
    assert p.stderr.count(message.format(tmp=tmp_path)) == 1            # said once, not once per rank


def test_a_bare_setting_without_set_is_one_line_naming_the_fix_and_exit_2(tiny, tmp_path):
    """argparse's error, a user error like any other: recorded by the ranks, so run.py reports it, not the
    launcher's ChildFailedError."""
    p = subprocess.run([*run_cmd(tiny, f'runs_dir="{tmp_path}"'), "train.max_steps=3"], env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == ("error: unrecognized arguments: train.max_steps=3; give each setting "
                                                 "its own --set: --set a.b=1 --set c.d=2")
    assert "Traceback" not in p.stderr and "FAILED" not in p.stderr and not (tmp_path / "tiny").exists()


def test_ctrl_c_checkpoints_and_stops_every_rank_second_ctrl_c_stops_now(tiny, tmp_path):
    proc = subprocess.Popen(run_cmd(tiny, f'runs_dir="{tmp_path}"', *SLOW), env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = tmp_path / "tiny"
    wait_for_step(proc, run, 6)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    stopped = assert_stopped_after_checkpoint(out, run)
    assert "Traceback" not in err

    proc = subprocess.Popen(run_cmd(tiny, f'runs_dir="{tmp_path}"', *SLOW), env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(proc, run, stopped + 3)                      # resumed, then training on
    procs = tree(proc.pid)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)                          # two key presses (two signals sent at once are merged into one)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    print(f"second Ctrl-C: every process gone {wait_gone(procs, 30):.1f}s after the supervisor's exit")
    assert proc.returncode == 130
    assert "second Ctrl-C: stopping everything now, without a checkpoint" in err


def test_kill_usr1_of_plain_accelerate_launch_leaves_no_rank_behind(tiny, tmp_path):
    """Plain `accelerate launch` (not run.py) dies of SIGUSR1; its ranks stop after the step in progress.
    Steps of >= 0.3 s: a dying launcher leaves its children only once its exit is done, which took 3 tiny steps
    (~0.1 s) on a loaded 2-core machine."""
    proc = subprocess.Popen(run_cmd(tiny, f'runs_dir="{tmp_path}"', *SLOW, launcher="accelerate"),
                            env={**env(), "DCGAN_DIST_FAULT": "slow@300"},
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(proc, tmp_path / "tiny", 4)
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2
    procs = tree(proc.pid)
    at_kill = last_step(tmp_path / "tiny")
    os.kill(proc.pid, signal.SIGUSR1)                           # the obvious pid: it kills the launcher
    proc.communicate(timeout=60)
    print(f"launcher killed: ranks gone after {wait_gone(procs, 60):.1f}s")
    assert last_step(tmp_path / "tiny") <= at_kill + 2
    assert not list((tmp_path / "tiny" / "checkpoints").glob("*.tmp"))
