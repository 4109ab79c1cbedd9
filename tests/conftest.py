import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dcgan_dist.data.prepare import PrepareOptions, prepare
from dcgan_dist.data.sources import open_source

ROOT = Path(__file__).resolve().parents[1]

# One torch thread per process, in the test process and (through the environment) in every process a test
# starts, unless OMP_NUM_THREADS says otherwise. Torch's default, a thread per core, oversubscribes a shared
# 2-core machine: each parallel region waits for all its threads, so N busy processes x 2 threads crawl (the
# classifier fixture passed the 300 s timeout at load ~10). The ranks that accelerate launch starts had one
# thread already; the digit classifier trains on one thread whatever the process has.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def run_cli(script: str, *args, check: bool = True, env: dict | None = None, timeout: int = 300):
    """Run launch/<script> with this interpreter; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for one launch's rendezvous. Not accelerate.test_utils'
    get_torch_dist_unique_port: outside pytest-xdist that is always 29500, so a launch that left a process
    behind (or a socket in TIME_WAIT) failed the next test's launch with "address already in use"."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TRAIN = ROOT / "launch" / "train.py"


def launch_cmd(config, *overrides, launcher: str = "accelerate", script: Path = TRAIN, num_processes: int = 2,
               node: tuple[int, int, int] | None = None) -> list[str]:
    """The suite's one command line for `num_processes` real gloo processes running `script`: through `accelerate
    launch` (launcher="accelerate") or launch/run.py ("run"). `config`: passed as --config, `overrides` as --set
    each; None: `overrides` are the script's own arguments. `node`: (machine_rank, machines, port), one node of a
    multi-node launch on 127.0.0.1 (static rendezvous, as launch/slurm/train_multinode.sbatch)."""
    head = [sys.executable, str(ROOT / "launch" / "run.py")] if launcher == "run" else \
        [sys.executable, "-m", "accelerate.commands.launch"]
    if node is None:
        where = ["--num_machines", "1", "--main_process_port", str(free_port())]
    else:
        rank, machines, port = node
        where = ["--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                 "--main_process_port", str(port), "--rdzv_backend", "static"]
    args = ["--config", str(config), *[a for o in overrides for a in ("--set", o)]] if config is not None \
        else [str(a) for a in overrides]
    return [*head, "--multi_gpu", "--num_processes", str(num_processes), *where, "--mixed_precision", "no",
            "--dynamo_backend", "no", str(script), *args]


def run_cmd(config, *overrides, launcher: str = "run") -> list[str]:
    """launch_cmd through launch/run.py (what users run for a one-line outcome and exit code), by default."""
    return launch_cmd(config, *overrides, launcher=launcher)


def env(**extra) -> dict:
    """The environment of every process the suite starts: one torch thread each, never a GPU."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return e


def accelerate_launch(script: Path, *args, num_processes: int = 2, timeout: int = 300, env_extra: dict | None = None):
    """Start `script` on `num_processes` real processes (gloo on CPU) through accelerate launch; fails on a
    non-zero exit."""
    proc = subprocess.run(launch_cmd(None, *args, script=script, num_processes=num_processes), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env(**(env_extra or {})))
    if proc.returncode != 0:
        raise AssertionError(f"accelerate launch failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def last_step(run: Path) -> int:
    """The step of the newest row of a run's metrics.jsonl (0: none yet)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def wait_for_step(proc, run: Path, step: int, timeout: float = 120) -> None:
    """Wait until the run started as `proc` has logged `step`; fails if it ends or is too slow first."""
    t0 = time.time()
    while last_step(run) < step:
        assert proc.poll() is None, f"run ended before step {step}:\n{proc.communicate()[1][-3000:]}"
        assert time.time() - t0 < timeout, "run too slow"
        time.sleep(0.02)


def final_weights(run: Path, steps: int) -> dict:
    """G, D and G_ema of the run's checkpoint at `steps`, as {"G.name": tensor, "D.name": ..., "G_ema.name": ...}."""
    from safetensors.torch import load_file
    ckpt = run / "checkpoints" / f"step_{steps:08d}"
    weights = {**{f"G.{k}": v for k, v in load_file(ckpt / "model.safetensors").items()},
               **{f"D.{k}": v for k, v in load_file(ckpt / "model_1.safetensors").items()},
               **{f"G_ema.{k}": v for k, v in load_file(ckpt / "ema.safetensors").items()}}
    assert {k.replace("G_ema.", "G.", 1) for k in weights if k.startswith("G_ema.")} == \
        {k for k in weights if k.startswith("G.")}                       # G_ema: all of G's tensors
    return weights


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_stopped_after_checkpoint(out: str, run: Path, by: str = "signal") -> int:
    """The run's last line says it stopped by `by` after a checkpoint at the step it last logged, and that
    checkpoint exists; returns the step."""
    stopped = last_step(run)
    assert out.strip().splitlines()[-1].startswith(f"stopped by {by} at step {stopped} after a checkpoint; run the "
                                                   f"same command again to continue"), out[-2000:]
    assert (run / "checkpoints" / f"step_{stopped:08d}").is_dir()
    return stopped


def evaluations(run: Path) -> list[tuple]:
    """(step, FID, KID) of each evaluation row in metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["fid"], r["kid"]) for r in rows if "fid" in r]


def tree(pid: int) -> list:
    """The process `pid` and all its descendants (psutil), or [] when it is gone."""
    import psutil
    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def wait_gone(procs: list, timeout: float = 60) -> float:
    """Seconds until every process of `procs` has exited (fails after `timeout`)."""
    import psutil
    t0 = time.time()
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"still running after {timeout}s: {[p.pid for p in alive]}"
    return time.time() - t0


# A run slow enough to stop mid-way, one loader worker per rank (its position must survive too), and the demo's
# settings (configs/digits.toml): G_ema, raw grids, FID/KID during training (with the session's classifier cache).
STEPS = 40
RESUMABLE = [f"train.max_steps={STEPS}", "train.sync_every=1", "checkpoint.every=5", "log.every=1",
             "log.sample_every=10", "data.workers=1", "train.batch_size=32", "model.ngf=16", "model.ndf=16",
             "model.ema=true", "log.raw_grid=true", "eval.every=10", "eval.n=64", "eval.batch_size=32",
             "eval.kid_subset_size=32", "eval.kid_subsets=2", "eval.native_resolution=8", "optim.decay_from=0.5"]
# A run that never ends by itself (stopped by the tests)
SLOW = ["train.max_steps=100000", "train.sync_every=1", "checkpoint.every=5", "log.every=1", "log.sample_every=1000",
        "data.workers=1", "train.batch_size=32"]


def launch_ranks(script: Path, *args, out: Path) -> list[dict]:
    """accelerate_launch a tests/dist script that writes `{out}.rank{r}.json`; return both ranks' JSON."""
    import json
    accelerate_launch(script, *args)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Digits shards and a tiny config (8-wide nets, batch 16) that trains in seconds on a CPU."""
    root = tmp_path_factory.mktemp("tiny")
    prepare(open_source("digits", None), root / "digits", PrepareOptions("digits", None, resolution=32), progress=False)
    cfg = root / "tiny.toml"
    cfg.write_text(f"""
name = "tiny"
runs_dir = "{root / 'runs'}"
[data]
shards = "{root / 'digits'}"
resolution = 32
channels = 1
workers = 0
[model]
latent = 16
ngf = 8
ndf = 8
[train]
batch_size = 16
max_steps = 6
[log]
every = 2
sample_every = 3
n_samples = 16
wandb = "disabled"
progress_bar = false
[checkpoint]
every = 100
""")
    return cfg


@pytest.fixture(scope="session")
def classifier_cache(tiny, tmp_path_factory):
    """An eval.cache_dir holding the digit classifier and reference statistics for the tiny shards, filled once
    for the session (~10 s)."""
    from dcgan_dist.config import load_config
    from dcgan_dist.data import load_manifest
    from dcgan_dist.eval import Dist, Evaluator

    cache = tmp_path_factory.mktemp("eval-cache")
    cfg = load_config(tiny, [f'eval.cache_dir="{cache}"'])
    Evaluator(cfg.eval, cfg.data.shards, load_manifest(cfg.data.shards), Dist())
    return cache


@pytest.fixture(scope="session")
def resumable(classifier_cache):
    """RESUMABLE, evaluating with the session's digit classifier (not trained again by every run)."""
    return [*RESUMABLE, f'eval.cache_dir="{classifier_cache}"']


@pytest.fixture(scope="session")
def reference(tiny, tmp_path_factory, resumable):
    """The RESUMABLE run on 2 processes, never stopped, made once per session: its final weights and evaluations
    (tests that stop and resume the same run compare with it)."""
    runs = tmp_path_factory.mktemp("ref")
    subprocess.run(launch_cmd(tiny, f'runs_dir="{runs}"', *resumable), check=True, capture_output=True, env=env(),
                   timeout=300)
    return {"weights": final_weights(runs / "tiny", STEPS), "evals": evaluations(runs / "tiny")}
