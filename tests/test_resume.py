"""Runs that survive: exact resume after kill -9 or a signal, SLURM scripts, NaN guard, hostile inputs."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import (ROOT, STEPS, assert_bitwise_equal, assert_stopped_after_checkpoint, env, evaluations,
                      final_weights, last_step, launch_cmd, tree, wait_for_step, wait_gone)
from dcgan_dist.config import load_config
from dcgan_dist.errors import UserError
from dcgan_dist.train import train

STANDINS = Path(__file__).parent / "slurm_standins"


# the kill at step 12 (mid-run, after a checkpoint) runs by default; the others with -m slow
@pytest.mark.parametrize("kill_after", [pytest.param(3, marks=pytest.mark.slow), 12,
                                        pytest.param(27, marks=pytest.mark.slow)])
def test_kill_9_then_resume_matches_the_uninterrupted_run(tiny, reference, resumable, tmp_path, kill_after):
    cmd = launch_cmd(tiny, f'runs_dir="{tmp_path}"', *resumable)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    wait_for_step(proc, tmp_path / "tiny", kill_after)
    # kill -9 the whole tree, as SLURM's cgroup kill does: torchrun starts each rank in its own session,
    # so killing the launcher's process group alone would leave the ranks running.
    procs = tree(proc.pid)
    for p in procs:
        p.kill()
    wait_gone(procs, 30)
    proc.wait()
    killed_at = last_step(tmp_path / "tiny")
    assert killed_at < STEPS
    complete = [p for p in (tmp_path / "tiny" / "checkpoints").glob("step_*") if not p.name.endswith(".tmp")]
    t0 = time.time()
    p = subprocess.run(launch_cmd(tiny, f'runs_dir="{tmp_path}"', *resumable), check=True, capture_output=True,
                       text=True, env=env(), timeout=300)
    print(f"killed after step {killed_at}; resumed run took {time.time() - t0:.1f}s")
    if complete:                                               # it really resumed, from the newest complete one
        assert f"resumed from {max(complete)} " in p.stderr
    else:
        assert "resumed from" not in p.stderr
    assert_bitwise_equal(final_weights(tmp_path / "tiny", STEPS), reference["weights"])
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss_d" in r] == list(range(1, STEPS + 1))   # redone steps replace old rows
    assert evaluations(tmp_path / "tiny") == reference["evals"]                      # steps 10, 20, 30, 40
    assert [e[0] for e in reference["evals"]] == [10, 20, 30, 40]


@pytest.mark.parametrize("workers", [(0, 0, 0), (0, 2, 3)], ids=["same-workers", "workers-0-2-3"])
def test_stop_and_resume_with_evaluation_is_bitwise_the_uninterrupted_run(tiny, tmp_path, classifier_cache,
                                                                          monkeypatch, workers):
    """One process, the demo's settings (EMA, FID every few steps, raw grids): stopped by a STOP file at step 5
    and resumed, it ends at step 20 with the same G, D, G_ema, losses and FIDs as a run never stopped. Issue 16
    §7: also when the run never stopped used no loader worker, the stopped one 2 and the resumed one 3 (windows
    of 4 batches, so each worker serves other windows)."""
    import dcgan_dist.train.loop as loop
    demo = ["train.max_steps=20", "train.sync_every=1", "checkpoint.every=100", "log.every=1", "log.sample_every=5",
            "model.ema=true", "model.ema_kimg=0.1", "log.raw_grid=true", "eval.every=8", "eval.n=64",
            "eval.batch_size=32", "eval.kid_subset_size=32", "eval.kid_subsets=2",
            f'eval.cache_dir="{classifier_cache}"', "data.shuffle_window=64"]
    results = {}
    for name in ("uninterrupted", "stopped"):
        w = workers[0] if name == "uninterrupted" else workers[1]
        cfg = load_config(tiny, [f'runs_dir="{tmp_path / name}"', *demo, f"data.workers={w}"])
        if name == "stopped":
            steps = []

            def gan_step(*args, real=loop.gan_step):   # the STOP file appears during step 5
                steps.append(1)
                if len(steps) == 5:
                    (cfg.run_dir / "STOP").touch()
                return real(*args)
            with monkeypatch.context() as m:
                m.setattr(loop, "gan_step", gan_step)
                assert train(cfg)["stopped_by"] == "STOP file"
            assert max(p.name for p in (cfg.run_dir / "checkpoints").glob("step_*")) == "step_00000005"
            cfg = load_config(tiny, [f'runs_dir="{tmp_path / name}"', *demo, f"data.workers={workers[2]}"])
        summary = train(cfg)
        assert summary["step"] == 20
        rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        results[name] = summary["models"], [{k: v for k, v in r.items() if not k.endswith("_s") and k not in
                                             ("s_per_step", "images_per_s")} for r in rows]
    (g, d, g_ema), rows = results["stopped"]
    (g0, d0, g_ema0), rows0 = results["uninterrupted"]
    for a, b in ((g, g0), (d, d0), (g_ema, g_ema0)):
        assert_bitwise_equal(a.state_dict(), b.state_dict())
    assert [r["step"] for r in rows if "fid" in r] == [8, 16, 20]
    assert rows == rows0                                        # losses, scales, FID, KID: the same floats


@pytest.mark.slow            # stand-in SLURM; tests/test_slurm.py runs the real one
def test_signal_to_one_rank_stops_all_at_one_step_and_sbatch_requeues(tiny, reference, resumable, tmp_path):
    """The SLURM script with stand-in srun/scontrol/sbatch: USR1 to the batch shell -> STOP file -> every
    rank stops at the same step after a checkpoint -> requeue; the requeued job finishes bitwise equal."""
    log = tmp_path / "slurm.log"
    e = {**env(), "PATH": f"{STANDINS}:{os.environ['PATH']}", "STANDIN_LOG": str(log), "GPUS_PER_NODE": "2",
         "PYTHON": sys.executable, "SLURM_JOB_ID": "4242"}
    sbatch = ["sbatch", "launch/slurm/train.sbatch", str(tiny), "--set", f"runs_dir={tmp_path}",
              *[a for o in resumable for a in ("--set", o)]]
    proc = subprocess.Popen(sbatch, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "tiny"
    wait_for_step(proc, run, 8)
    os.kill(proc.pid, signal.SIGUSR1)                          # what --signal=B:USR1@300 does
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]                  # stopped after a checkpoint, requeued
    stopped = assert_stopped_after_checkpoint(out, run, by="STOP file")
    assert stopped < STEPS
    calls = log.read_text().splitlines()
    assert calls[-1] == "scontrol requeue 4242"
    srun = next(c for c in calls if c.startswith("srun"))
    assert "--kill-on-bad-exit=1" in srun and '--machine_rank "$SLURM_NODEID"' in srun
    assert "--main_process_port 24242" in srun and "--num_processes 2" in srun
    assert not (ROOT / ".dcgan-stop-4242").exists()

    subprocess.run(sbatch, cwd=ROOT, env=e, check=True, capture_output=True, timeout=300)   # the requeued job
    assert_bitwise_equal(final_weights(run, STEPS), reference["weights"])
    assert evaluations(run) == reference["evals"]
    assert log.read_text().splitlines()[-1] != "scontrol requeue 4242"         # finished: no second requeue


def test_sigterm_to_one_worker_stops_every_rank(tiny, resumable, tmp_path):
    proc = subprocess.Popen(launch_cmd(tiny, f'runs_dir="{tmp_path}"', *resumable), env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(proc, tmp_path / "tiny", 4)
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGTERM)                        # one rank only
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = assert_stopped_after_checkpoint(out, tmp_path / "tiny")
    assert sorted(p.name for p in (tmp_path / "tiny" / "checkpoints").iterdir())[-1] == f"step_{stopped:08d}"


def test_nan_on_one_rank_stops_every_rank_naming_step_and_checkpoint(tiny, tmp_path):
    cmd = launch_cmd(tiny, f'runs_dir="{tmp_path}"', "train.max_steps=30", "train.sync_every=4",
                     "checkpoint.every=5", "log.every=100")
    p = subprocess.run(cmd, env={**env(), "DCGAN_DIST_FAULT": "nan@13@1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0
    good = tmp_path / "tiny" / "checkpoints" / "step_00000010"
    message = (f"error: non-finite loss or weights by step 15 (checked every 4 steps); last good "
               f"checkpoint: {good}; nothing was saved after it")
    assert p.stderr.count(message) == 2                         # both ranks (their lines may interleave)
    assert p.stderr.count("error: non-finite") == 2
    assert sorted(x.name for x in (tmp_path / "tiny" / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]


def test_nan_guard_single_process_exit_code(tiny, tmp_path, cli):
    p = cli("train.py", "--config", tiny, "--set", f'runs_dir="{tmp_path}"', "--set", "train.sync_every=1",
            check=False, env={"DCGAN_DIST_FAULT": "nan@2"})
    assert p.returncode == 3 and "non-finite loss or weights by step 2" in p.stderr


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tiny, tmp_path, caplog):
    base = [f'runs_dir="{tmp_path}"', "checkpoint.every=2"]
    train(load_config(tiny, base + ["train.max_steps=4"]))
    ckpt = tmp_path / "tiny" / "checkpoints"
    (ckpt / "step_00000004" / "optimizer.bin").write_bytes(b"truncated")
    (ckpt / "step_00000006.tmp").mkdir()                        # a save killed midway
    summary = train(load_config(tiny, base + ["train.max_steps=6"]))
    assert "checkpoint " + str(ckpt / "step_00000004") + " is damaged" in caplog.text
    assert summary["step"] == 6
    rows = [json.loads(line)["step"] for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [2, 4, 6]                                    # resumed at 2: step 4 redone
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]


def test_keep_last_k_plus_milestones(tiny, tmp_path):
    train(load_config(tiny, [f'runs_dir="{tmp_path}"', "train.max_steps=12", "checkpoint.every=2",
                             "checkpoint.keep=2", "checkpoint.milestone_every=4"]))
    assert sorted(p.name for p in (tmp_path / "tiny" / "checkpoints").iterdir()) == [
        "step_00000004", "step_00000008", "step_00000010", "step_00000012"]


def test_checkpoint_of_another_model_size_is_a_clear_error_and_kept(tiny, tmp_path):
    train(load_config(tiny, [f'runs_dir="{tmp_path}"', "train.max_steps=2"]))
    ckpt = tmp_path / "tiny" / "checkpoints" / "step_00000002"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    with pytest.raises(UserError, match=r"generator tensor net\.0\.weight has shape \(16, 32, 4, 4\) but the "
                                        r"config builds \(16, 64, 4, 4\)"):
        train(load_config(tiny, [f'runs_dir="{tmp_path}"', "train.max_steps=4", "model.ngf=16"]))
    with pytest.raises(UserError, match=r"discriminator tensor net\.0\.bias: only the config builds it \(another "
                                        r"architecture, e\.g\. model\.d_norm\)"):
        train(load_config(tiny, [f'runs_dir="{tmp_path}"', "train.max_steps=4", 'model.d_norm="spectral"']))
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_unwritable_run_directory_is_a_one_line_error(tiny, tmp_path, cli):
    (tmp_path / "file").write_text("not a folder")
    p = cli("train.py", "--config", tiny, "--set", f'runs_dir="{tmp_path / "file"}"', check=False)
    assert p.returncode == 2 and p.stderr.strip().startswith(f"error: run directory {tmp_path / 'file' / 'tiny'}")
    assert p.stderr.strip().count("\n") == 0


def test_truncated_shard_is_refused_before_training(tiny, tmp_path, cli):
    import shutil
    cfg = load_config(tiny)
    shutil.copytree(cfg.data.shards, tmp_path / "shards")
    shard = tmp_path / "shards" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:10000])
    p = cli("train.py", "--config", tiny, "--set", f'runs_dir="{tmp_path}"', "--set",
            f'data.shards="{tmp_path / "shards"}"', check=False, timeout=60)
    assert p.returncode == 2 and "shard-000000.tar: 10000 bytes, manifest says" in p.stderr
    assert not (tmp_path / "tiny" / "checkpoints").exists()


def test_offline_wandb_prints_sync_and_no_file_holds_the_api_key(tiny, tmp_path, cli):
    key = "0123456789abcdef0123456789abcdef01234567"
    p = cli("train.py", "--config", tiny, "--set", f'runs_dir="{tmp_path}"', "--set", 'log.wandb="offline"',
            env={"WANDB_API_KEY": key, "WANDB_MODE": "offline"})
    assert "W&B ran offline; upload with: wandb sync " + str(tmp_path / "tiny" / "wandb" / "offline-run-") in p.stdout
    for f in (tmp_path / "tiny").rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f


def test_resumed_run_continues_the_same_wandb_run(tiny, tmp_path):
    """Also when the second segment starts within the same second as a folder of the first: wandb then names
    its folder offline-run-<time>-<id>-1 (the clean clone's suite once resumed that fast), and the sync command
    must still name it. Empty decoy folders for the next 2 minutes' timestamps make that collision certain."""
    import datetime
    import glob
    base = [f'runs_dir="{tmp_path}"', 'log.wandb="offline"', "checkpoint.every=2"]
    train(load_config(tiny, base + ["train.max_steps=2"]))
    wandb_dir = tmp_path / "tiny" / "wandb"
    wandb_id = json.loads((tmp_path / "tiny" / "checkpoints" / "step_00000002" / "train_state.json").read_text())["wandb_id"]
    now = datetime.datetime.now()
    decoys = [wandb_dir / f"offline-run-{now + datetime.timedelta(seconds=s):%Y%m%d_%H%M%S}-{wandb_id}" for s in range(120)]
    decoys = [d for d in decoys if not d.exists()]
    for d in decoys:
        d.mkdir()
    summary = train(load_config(tiny, base + ["train.max_steps=4"]))
    for d in decoys:
        d.rmdir()                                                   # still empty: wandb wrote beside it
    segments = sorted(wandb_dir.glob("offline-run-*"))
    assert len(segments) == 2 and segments[1].name.endswith(f"-{wandb_id}-1")
    ids = {re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w{12})(-\d+)?", p.name).group(1) for p in segments}
    saved = json.loads((tmp_path / "tiny" / "checkpoints" / "step_00000004" / "train_state.json").read_text())
    assert ids == {saved["wandb_id"]} == {wandb_id} and len(saved["wandb_id"]) == 12
    assert sorted(glob.glob(summary["sync_command"].split(" ", 2)[2])) == [str(s) for s in segments]


def test_stop_file_single_process_exits_75_and_is_removed(tiny, tmp_path, cli):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "STOP").touch()          # there before the start: honoured before the first step
    p = cli("train.py", "--config", tiny, "--set", f'runs_dir="{tmp_path}"', "--set", "train.sync_every=1",
            check=False)
    assert p.returncode == 75 and "stopped by STOP file during start-up, before step 1" in p.stdout
    assert not list((tmp_path / "tiny").glob("checkpoints/step_*"))
    assert not (tmp_path / "tiny" / "STOP").exists()
    p = cli("train.py", "--config", tiny, "--set", f'runs_dir="{tmp_path}"', "--set", "train.sync_every=1")
    assert "done: step 6" in p.stdout


@pytest.mark.slow            # stand-in SLURM, 22 s
def test_slurm_job_exit_code_tells_user_error_divergence_and_passes_overrides_verbatim(tiny, tmp_path):
    """What a job script sees: 2 user error, 3 divergence (neither requeued); overrides with spaces and shell
    metacharacters reach the trainer as one word each and are never run."""
    log = tmp_path / "slurm.log"
    marker = tmp_path / "pwned"
    e = {**env(), "PATH": f"{STANDINS}:{os.environ['PATH']}", "STANDIN_LOG": str(log), "GPUS_PER_NODE": "2",
         "PYTHON": sys.executable, "SLURM_JOB_ID": "4243"}

    def sbatch(*args, **kw):
        return subprocess.run(["sbatch", "launch/slurm/train.sbatch", str(tiny), "--set", f"runs_dir={tmp_path}",
                               *args], cwd=ROOT, env={**e, **kw}, capture_output=True, text=True, timeout=300)

    project = f"my project; touch {marker} $(touch {marker})"
    p = sbatch("--set", f"log.project={project}", "--dry-run")
    assert p.returncode == 0 and f'project = "{project}"' in p.stdout and not marker.exists()

    p = sbatch("--set", f'data.shards="{tmp_path}/none"')
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (f"error: {tmp_path}/none/manifest.json: no manifest; create "
                                                 f"shards with launch/prepare_data.py")
    p = sbatch("--set", "train.sync_every=2", DCGAN_DIST_FAULT="nan@3")
    assert p.returncode == 3 and "error: non-finite loss or weights by step 4" in p.stderr.strip().splitlines()[-1]
    assert "requeue" not in log.read_text()


def test_a_torn_last_metrics_line_is_dropped_on_resume(tiny, tmp_path, caplog):
    base = [f'runs_dir="{tmp_path}"', "checkpoint.every=2"]
    train(load_config(tiny, base + ["train.max_steps=4"]))
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss_d": 1.3')                    # what a kill during an append leaves
    train(load_config(tiny, base + ["train.max_steps=6"]))
    assert "dropping a torn last line" in caplog.text
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [2, 4, 6]
    metrics.write_text('{"step": 2}\nnot json\n{"step": 4}\n')
    with pytest.raises(UserError, match=rf"{metrics}:2: not a metrics row"):
        train(load_config(tiny, base + ["train.max_steps=8"]))


def test_a_second_run_on_the_same_directory_is_refused_naming_the_holder(tiny, tmp_path, cli):
    from dcgan_dist.train.rundir import RunLock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from dcgan_dist.train.rundir import RunLock; RunLock(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(60)", str(tmp_path / "tiny")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    p = cli("train.py", "--config", tiny, "--set", f'runs_dir="{tmp_path}"', check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert p.stderr.startswith(f"error: run directory {tmp_path / 'tiny'} is in use by another run (pid {holder.pid} on ")
    assert not (tmp_path / "tiny" / "checkpoints").exists()
    # Two ranks: rank 0 holds the lock check, and every rank raises its error. Before, rank 1 waited in the
    # rendezvous for the rank 0 that had left, until torchrun killed it (SIGTERM, then SIGKILL 30 s later).
    launch = subprocess.run(launch_cmd(tiny, f'runs_dir="{tmp_path}"'), capture_output=True, text=True, timeout=120,
                            env=env())
    assert launch.stderr.count(f"error: run directory {tmp_path / 'tiny'} is in use by another run") == 2
    assert sorted(re.findall(r"rank\s*: (\d) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", launch.stderr)) == \
        [("0", "2"), ("1", "2")]                                # both ranks exited with the user error, none killed
    holder.kill()                                               # kill -9 leaves no stale lock
    holder.wait()
    RunLock(tmp_path / "tiny").release()


def test_resuming_an_older_checkpoint_moves_newer_ones_aside_and_auto_follows_the_new_timeline(tiny, tmp_path):
    base = [f'runs_dir="{tmp_path}"', "checkpoint.every=2", "checkpoint.keep=2"]
    train(load_config(tiny, base + ["train.max_steps=6"]))
    ckpt = tmp_path / "tiny" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000004", "step_00000006"]
    train(load_config(tiny, base + ["train.max_steps=8", f'checkpoint.resume="{ckpt / "step_00000004"}"']))
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000006", "step_00000008"]
    abandoned = list((tmp_path / "tiny" / "abandoned").iterdir())
    assert len(abandoned) == 1
    assert [p.name for p in (abandoned[0] / "checkpoints").iterdir()] == ["step_00000006"]   # moved, not deleted
    assert (abandoned[0] / "metrics.jsonl").read_text().count("\n") == 3                    # the old 2, 4, 6
    new6 = load_file(ckpt / "step_00000006" / "model.safetensors")
    old6 = load_file(abandoned[0] / "checkpoints" / "step_00000006" / "model.safetensors")
    assert all(torch.equal(new6[k], old6[k]) for k in new6)     # the same steps redone: the same weights
    summary = train(load_config(tiny, base + ["train.max_steps=10"]))                         # auto
    assert summary["step"] == 10
    rows = [json.loads(line)["step"] for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [2, 4, 6, 8, 10]


def test_config_changes_on_resume_safe_ones_applied_breaking_ones_refused(tiny, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    base = [f'runs_dir="{tmp_path}"', "checkpoint.every=2"]
    train(load_config(tiny, base + ["train.max_steps=2"]))
    train(load_config(tiny, base + ["train.max_steps=4", "optim.lr_g=1e-3", "optim.beta1=0.3"]))
    assert "changed since the checkpoint, applied: optim.lr_g: 0.0002 -> 0.001" in caplog.text
    opt = torch.load(tmp_path / "tiny" / "checkpoints" / "step_00000004" / "optimizer.bin", weights_only=True)
    assert [(g["lr"], g["betas"][0]) for g in opt["param_groups"]] == [(1e-3, 0.3)]   # really applied
    for change, named in (("train.batch_size=8", "train.batch_size: 16 -> 8"), ("train.seed=5", "train.seed: 0 -> 5")):
        with pytest.raises(UserError, match=f"changes that break an exact continuation: {named}"):
            train(load_config(tiny, base + ["train.max_steps=6", change]))
    other = tmp_path / "other"
    import shutil
    shutil.copytree(load_config(tiny).data.shards, other)
    from synthetic import write_indexed_shards
    write_indexed_shards(other, 1797, resolution=32, channels=1, shard_size=2048)
    with pytest.raises(UserError, match="data: the shard set differs"):
        train(load_config(tiny, base + ["train.max_steps=6", f'data.shards="{other}"']))
    summary = train(load_config(tiny, base + ["train.max_steps=6", "train.seed=5", "checkpoint.allow_changes=true"]))
    assert summary["step"] == 6 and "no longer an exact continuation" in caplog.text


def test_precision_change_on_resume_is_not_damage(tiny, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    base = [f'runs_dir="{tmp_path}"', "checkpoint.every=2"]
    train(load_config(tiny, base + ["train.max_steps=2"]))
    summary = train(load_config(tiny, base + ["train.max_steps=4", 'train.precision="fp16"']))
    assert summary["step"] == 4 and "damaged" not in caplog.text
    assert "starts with a fresh loss-scaler state" in caplog.text
    summary = train(load_config(tiny, base + ["train.max_steps=6", 'train.precision="fp32"']))
    assert summary["step"] == 6 and "damaged" not in caplog.text


@pytest.mark.parametrize("damage", ["flip model.safetensors", "delete random_states_0.pkl",
                                    "truncate random_states_0.pkl"])
def test_any_damaged_checkpoint_file_is_detected_and_the_previous_one_used(tiny, tmp_path, caplog, damage):
    base = [f'runs_dir="{tmp_path}"', "checkpoint.every=2"]
    train(load_config(tiny, base + ["train.max_steps=4"]))
    action, name = damage.split()
    f = tmp_path / "tiny" / "checkpoints" / "step_00000004" / name
    data = bytearray(f.read_bytes())
    if action == "flip":
        data[-10] ^= 0xFF
        data[-20] ^= 0xFF
        f.write_bytes(bytes(data))
    elif action == "truncate":
        f.write_bytes(bytes(data[:len(data) // 2]))
    else:
        f.unlink()
    train(load_config(tiny, base + ["train.max_steps=6"]))
    assert f"checkpoint {tmp_path / 'tiny' / 'checkpoints' / 'step_00000004'} is damaged" in caplog.text
    assert name in caplog.text
    rows = [json.loads(line)["step"] for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [2, 4, 6]                                    # resumed from step 2, step 4 redone


def test_rerunning_a_finished_run_says_so_and_touches_nothing(tiny, tmp_path, cli):
    args = ["--config", tiny, "--set", f'runs_dir="{tmp_path}"', "--set", 'log.wandb="offline"']
    cli("train.py", *args, env={"WANDB_MODE": "offline"})
    run = tmp_path / "tiny"

    def mtimes():
        # wandb's detached core service of the first run can still append to its own debug logs after that
        # run's process exited (seen in CI 1.3 s later); those are W&B's logs, not files this project writes
        return {p: p.stat().st_mtime_ns for p in run.rglob("*")
                if p.is_file() and p.name != ".lock" and not (p.name.startswith("debug") and p.suffix == ".log")}

    before = mtimes()
    p = cli("train.py", *args, env={"WANDB_MODE": "offline"})
    assert p.stdout.strip().splitlines()[-1].startswith("already complete: step 6 reached train.max_steps")
    assert mtimes() == before
    # what was watched (a count would vary: W&B writes files/output.log only when the run printed something)
    names = {str(f.relative_to(run)) for f in before}
    assert {"config.toml", "metrics.jsonl", "samples/progress.gif", "samples/step_00000006.png",
            "checkpoints/step_00000006/model.safetensors", "checkpoints/step_00000006/checksums.json"} <= names
    assert any(n.startswith("wandb/offline-run-") and n.endswith(".wandb") for n in names)
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1          # no empty second W&B segment


def test_tensorboard_after_a_resume_from_an_older_step_holds_each_step_once(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    base = [f'runs_dir="{tmp_path}"', "checkpoint.every=2", "log.every=1", "log.sample_every=3",
            'log.trackers=["tensorboard"]']
    train(load_config(tiny, base + ["train.max_steps=5"]))
    ckpt = tmp_path / "tiny" / "checkpoints"
    train(load_config(tiny, base + ["train.max_steps=7", f'checkpoint.resume="{ckpt / "step_00000002"}"']))
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    tb = EventAccumulator(str(tmp_path / "tiny" / "tensorboard" / "dcgan_dist"), size_guidance={"images": 0}).Reload()
    assert [(e.step, round(e.value, 5)) for e in tb.Scalars("loss_d")] == [(r["step"], round(r["loss_d"], 5))
                                                                           for r in rows]   # steps 3-5 once
    assert [e.step for e in tb.Images("samples")] == [3, 6, 7]


def test_resuming_on_more_processes_says_the_world_size_changed(tiny, tmp_path):
    """A checkpoint of 1 process has no RNG state for rank 1: that is a world-size change, named as such (like
    2 -> 1), not 'none of the checkpoints could be loaded'."""
    train(load_config(tiny, [f'runs_dir="{tmp_path}"', "train.max_steps=2", "checkpoint.every=1"]))
    p = subprocess.run(launch_cmd(tiny, f'runs_dir="{tmp_path}"', "train.max_steps=4"), capture_output=True,
                       text=True, env=env(), timeout=300)
    assert p.returncode != 0
    assert ("error: resuming " + str(tmp_path / "tiny" / "checkpoints" / "step_00000002") + " with changes that "
            "break an exact continuation: world_size: 1 -> 2 (the loader position") in p.stderr
    assert "could be loaded" not in p.stderr and "damaged" not in p.stderr


@pytest.mark.parametrize("limit, failing", [(60_000, "model.safetensors (safetensors)"),
                                            (110_000, "optimizer.bin (torch.save)")])
def test_a_checkpoint_write_failing_inside_a_library_is_one_line_and_exit_2(tiny, tmp_path, limit, failing):
    """A real write failure (a file size limit: EFBIG, as ENOSPC would be) inside safetensors (SafetensorError)
    or torch.save (RuntimeError without an errno) is the disk error line, not a traceback."""
    import resource

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # the write fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    p = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(tiny), "--set",
                        f'runs_dir="{tmp_path}"'], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       preexec_fn=limited)
    ckpt = tmp_path / "tiny" / "checkpoints"
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: file size limit exceeded while writing checkpoint {ckpt}/step_00000006.tmp (File too large); the "
        f"newest complete checkpoint (none) is untouched; free space and run the same command to resume from it")
    assert "Traceback" not in p.stderr and p.stderr.count("error") == 1
    assert list(ckpt.iterdir()) == []


def test_a_checkpoint_from_the_per_worker_epoch_plan_is_refused_only_when_its_order_differs():
    """Checkpoints written before DATA_ORDER 2 (no data_order in their state) cut the epoch per worker: resumed with
    workers 0 or 1 they continue exactly (the same order), with more workers the change is named and refused."""
    from dcgan_dist.data.loader import DATA_ORDER
    from dcgan_dist.train.checkpoint import TrainState
    from dcgan_dist.train.rundir import compare
    state = TrainState(torch.zeros(1))
    state.load_json({"step": 5, "loader_batches": 5, "skipped_d": 0, "skipped_g": 0, "wandb_id": ""})
    assert state.data_order == 1 and DATA_ORDER == 2
    now = {"data.workers": 4, "data_order": DATA_ORDER}
    assert compare({"data.workers": 1, "data_order": 1}, now) == (
        ["data.workers: 1 -> 4 (the data order does not depend on it)"], [])
    safe, breaking = compare({"data.workers": 2, "data_order": 1}, {"data.workers": 2, "data_order": DATA_ORDER})
    assert safe == [] and len(breaking) == 1 and breaking[0].startswith(
        "data order: the checkpoint's loader cut each epoch into one part per worker (data.workers = 2")
    assert compare({"data.workers": 2, "data_order": 2}, now) == (
        ["data.workers: 2 -> 4 (the data order does not depend on it)"], [])
