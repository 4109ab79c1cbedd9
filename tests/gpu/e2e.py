"""The end-to-end section of tests/gpu/run.sh: a real launch/run.py + launch/train.py run fed by the shard loader
from generated shards on local disk, W&B offline (when wandb is importable); writes what it measured as JSON:
images/s (median of the logged rows after the first), peak GPU memory, seconds per checkpoint and per grid,
the outcome. Not a test: it reports, it does not judge."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]          # tests/synthetic.py: the generated shards

from synthetic import write_indexed_shards  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--images", type=int, default=50000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--precision", default="bf16")
    a = p.parse_args()
    t0 = time.perf_counter()
    shards = a.work / "shards"
    write_indexed_shards(shards, a.images, a.resolution, 3, shard_size=8192, chunk_size=256)
    made = time.perf_counter() - t0
    try:
        import wandb  # noqa: F401
        tracker = "offline"
    except ImportError:
        tracker = "disabled"
    log_every = max(1, a.steps // 12)
    cfg = a.work / "e2e.toml"
    cfg.write_text(f"""name = "e2e"
runs_dir = "{a.work / 'runs'}"
[data]
shards = "{shards}"
resolution = {a.resolution}
channels = 3
workers = {a.workers}
[train]
batch_size = {a.batch_size}
max_steps = {a.steps}
precision = "{a.precision}"
sync_every = {log_every}
[log]
every = {log_every}
sample_every = {max(1, a.steps // 3)}
wandb = "{tracker}"
progress_bar = false
[checkpoint]
every = {max(1, a.steps // 2)}
""")
    cmd = [sys.executable, str(ROOT / "launch" / "run.py"), "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "launch" / "train.py"), "--config", str(cfg)]
    t1 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t1
    rows = [json.loads(line) for line in (a.work / "runs" / "e2e" / "metrics.jsonl").read_text().splitlines()] \
        if (a.work / "runs" / "e2e" / "metrics.jsonl").exists() else []
    rows = [r for r in rows if "images_per_s" in r]

    def last(key):
        return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)

    result = {"exit_code": proc.returncode, "last_line": (proc.stdout + proc.stderr).strip().splitlines()[-1:],
              "wandb": tracker, "shards_made_s": round(made, 1), "run_wall_s": round(wall, 1),
              "steps_logged": [r["step"] for r in rows], "settings": vars(a) | {"work": str(a.work), "json": None},
              "images_per_s_median": statistics.median(r["images_per_s"] for r in rows[1:]) if len(rows) > 1 else None,
              "gpu_mem_gb_peak": last("gpu_mem_gb"), "checkpoint_s": last("checkpoint_s"), "grid_s": last("grid_s")}
    a.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
