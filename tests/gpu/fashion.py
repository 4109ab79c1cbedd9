"""The real-data section of tests/gpu/run.sh: Fashion-MNIST from its four IDX files (they travel with the check),
converted at 32 px, trained with configs/fashion.toml on one process for --epochs, then measured by the published
protocol (10,000 generated images against the 10,000 test images; the feature classifier from --cache when it
was carried, else trained there) beside the floor (real training images against the same test images). Writes
what it measured as JSON: wall time, images/s, FID, precision, recall, the floor and the ratio. Not a test: it
reports, it does not judge."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*cmd) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, cwd=ROOT)
    print(proc.stdout[-2000:], proc.stderr[-3000:], sep="\n", flush=True)
    return proc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--idx", type=Path, required=True, help="folder with the four Fashion-MNIST .gz files")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--cache", type=Path, help="eval.cache_dir (a carried classifier is used from there)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--limit", type=int, help="training images (a rehearsal)")
    p.add_argument("--cache-only", action="store_true",
                   help="only convert and fill --cache (the classifier and the reference statistics), to carry it")
    a = p.parse_args()
    result: dict = {"settings": {k: str(v) for k, v in vars(a).items()}}

    def save():                 # after every phase: a section that times out still reports what it measured
        a.json.write_text(json.dumps(result, indent=1))

    t0 = time.perf_counter()
    if not (a.idx / "train-images-idx3-ubyte.gz").is_file():
        result["skipped"] = f"no Fashion-MNIST IDX files in {a.idx} (apt-get install -y dataset-fashion-mnist)"
        save()
        print(result["skipped"])
        return 0
    for split, out in (("train", "fashion"), ("test", "fashion-test")):
        limit = ["--limit", a.limit] if a.limit and split == "train" else []
        if run("launch/prepare_data.py", "fashion-mnist", "--input", a.idx, "--split", split, "--out",
               a.work / out, "--resolution", 32, "--quiet", "--overwrite", *limit).returncode:
            result["error"] = f"prepare {split} failed"
            break
    result["prepare_s"] = round(time.perf_counter() - t0, 1)
    save()
    cache = a.cache or a.work / "cache"
    # the epochs as steps (one process), so that the config's lr decay (optim.decay_from) ends with the run
    max_steps = a.epochs * ((a.limit or 60000) // a.batch_size)
    sets = [f'runs_dir="{a.work / "runs"}"', f'data.shards="{a.work / "fashion"}"',
            f'eval.reference="{a.work / "fashion-test"}"', f'eval.cache_dir="{cache}"', f"data.workers={a.workers}",
            f"train.batch_size={a.batch_size}", f"train.max_epochs={a.epochs}", f"train.max_steps={max_steps}",
            f'train.precision="{a.precision}"', 'log.wandb="disabled"', "log.progress_bar=false", "eval.every=0",
            "checkpoint.every=1000000"]
    if a.cache_only:
        return fill_cache(a.work, cache)
    if "error" not in result:
        t1 = time.perf_counter()
        proc = run("launch/run.py", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "launch/train.py", "--config", "configs/fashion.toml",
                   *[x for s in sets for x in ("--set", s)])
        result.update(train_exit=proc.returncode, train_wall_s=round(time.perf_counter() - t1, 1))
        metrics = a.work / "runs" / "fashion" / "metrics.jsonl"
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        rows = [r for r in rows if "images_per_s" in r]
        result.update(steps=rows[-1]["step"] if rows else 0, epochs=rows[-1]["epoch"] if rows else 0,
                      images_per_s_median=statistics.median(r["images_per_s"] for r in rows[1:]) if len(rows) > 1
                      else None)
        save()
        ckpts = sorted((a.work / "runs" / "fashion" / "checkpoints").glob("step_*"))
        evals = [x for s in sets[2:4] for x in ("--set", s)]          # eval.reference, eval.cache_dir
        measured = {}
        for name, args in (("G_ema", ["--checkpoint", ckpts[-1]] if ckpts else None),
                           ("floor", ["--config", "configs/fashion.toml", "--images", a.work / "fashion",
                                      "--shards", a.work / "fashion"])):
            if args is None:
                continue
            t2 = time.perf_counter()
            out = a.work / f"{name}.json"
            if run("launch/evaluate.py", *args, "--n", a.n, "--json", out, *evals).returncode == 0:
                r = json.loads(out.read_text())
                measured[name] = {k: r[k] for k in ("fid", "kid", "precision", "recall", "n_fake", "n_real",
                                                    "features_description")}
                measured[name]["eval_wall_s"] = round(time.perf_counter() - t2, 1)
                result.update(measured)
                save()
        result.update(measured)
        if "G_ema" in measured and "floor" in measured:
            result["fid_over_floor"] = measured["G_ema"]["fid"] / measured["floor"]["fid"]
    result["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    print(json.dumps(result, indent=1))
    return 0 if result.get("train_exit") == 0 and "G_ema" in result else 1


def fill_cache(work: Path, cache: Path) -> int:
    """The feature classifier of the training shards and the test shards' reference statistics, into ``cache``."""
    sys.path.insert(0, str(ROOT))
    from dcgan_dist.config import load_config
    from dcgan_dist.data import load_manifest
    from dcgan_dist.eval import Dist, Evaluator

    cfg = load_config(ROOT / "configs" / "fashion.toml", [f'data.shards="{work / "fashion"}"',
                                                          f'eval.reference="{work / "fashion-test"}"',
                                                          f'eval.cache_dir="{cache}"'])
    Evaluator(cfg.eval, cfg.data.shards, load_manifest(cfg.data.shards), Dist())
    print(f"filled {cache}: {sorted(p.name for p in cache.iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
