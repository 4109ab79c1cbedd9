import os
import subprocess
import sys
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


def accelerate_launch(script: Path, *args, num_processes: int = 2, timeout: int = 300, env: dict | None = None):
    """Start `script` on `num_processes` real processes (gloo on CPU) through accelerate launch."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"accelerate launch failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


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
