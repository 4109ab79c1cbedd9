"""The quality of a run over wall time, by the published protocol (generated images against the test split, the
run's own [eval] settings: eval.reference, eval.features), for dcgan_dist and for the textbook DCGAN beside it.

  python docs/quality_curve.py ours --config configs/fashion.toml --minutes 12 --every 250 --out bench/fashion
  python docs/quality_curve.py textbook --examples /path/to/pytorch-examples/dcgan --config configs/fashion.toml \\
      --minutes 12 24 --out bench/textbook
  python docs/quality_curve.py table --config configs/fashion.toml bench/fashion bench/textbook \
      [--plot docs/fashion_curve.png] [--real-grid docs/fashion_real.png]

``ours`` trains the config on 2 processes (``accelerate launch --multi_gpu --num_processes 2``), keeps a checkpoint
every ``--every`` steps, stops it (STOP file) after ``--minutes`` and measures G_ema of each checkpoint; the
minutes of a point are its checkpoint's time since the launch. ``textbook`` runs pytorch/examples' dcgan/main.py
unchanged (``--dataset mnist`` pointed at the IDX files given by data.shards' source; it trains 64 px) in this
process and, at each of ``--minutes`` since its start, generates 10,000 images with a copy of its G (train-mode
BatchNorm, as its own samples are drawn; the seconds this takes are not counted), area-averaged to the run's
resolution. ``table`` prints every point with its ratio to the floor: real training images against the same
reference, and with --plot draws FID / floor over minutes (needs matplotlib, not a dependency), with --real-grid
saves 64 real test images as a grid.
Each run writes points.jsonl into its --out folder.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N = 10_000


def evaluator(config: Path, overrides=()):
    from dcgan_dist.config import load_config
    from dcgan_dist.data import load_manifest
    from dcgan_dist.eval import Dist, Evaluator

    cfg = load_config(config, list(overrides))
    manifest = load_manifest(cfg.data.shards, "size", cfg.data.resolution, cfg.data.channels)
    return cfg, manifest, Evaluator(cfg.eval, cfg.data.shards, manifest, Dist())


def measures(result: dict) -> dict:
    return {k: result[k] for k in ("fid", "kid", "precision", "recall")}


def ours(a) -> None:
    from dcgan_dist.config import load_config
    from dcgan_dist.models import load_generator

    cfg = load_config(a.config, a.set)
    run_dir = a.out / "run"
    sets = [f"runs_dir={json.dumps(str(a.out))}", 'name="run"', f"checkpoint.every={a.every}",
            f"checkpoint.milestone_every={a.every}", "eval.every=0", 'log.wandb="disabled"', *a.set]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           str(ROOT / "launch/train.py"), "--config", str(a.config), *[x for s in sets for x in ("--set", s)]]
    t0 = time.time()
    with open(a.out / "train.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=a.minutes[-1] * 60)
        except subprocess.TimeoutExpired:
            (run_dir / "STOP").touch()          # every rank stops at one step, after a checkpoint
            proc.wait()
    print(f"training ended (exit {proc.returncode}) after {(time.time() - t0) / 60:.1f} min", flush=True)
    cfg, _, ev = evaluator(a.config, a.set)
    with open(a.out / "points.jsonl", "w") as f:
        for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
            g, which, _ = load_generator(ckpt, "cpu")
            point = {"who": "dcgan_dist", "config": str(a.config), "sets": a.set, "step": int(ckpt.name[5:]),
                     "minutes": (ckpt.stat().st_mtime - t0) / 60, **measures(ev(g, N))}
            print(json.dumps(point), file=f, flush=True)
            print(point, flush=True)


def textbook(a) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    cfg, manifest, ev = evaluator(a.config, a.set)
    source = Path(manifest["input"] or "/usr/share/datasets/fashion-mnist")
    raw = a.out / "dataroot" / "MNIST" / "raw"        # torchvision's MNIST reads these and downloads nothing
    raw.mkdir(parents=True, exist_ok=True)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        if not (raw / stem).exists():
            with gzip.open(source / f"{stem}.gz") as src, open(raw / stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
    marks = sorted(a.minutes)
    t0, paused = time.time(), 0.0

    def snapshot(signum, frame):
        nonlocal paused
        t = time.time()
        while frame is not None and "netG" not in frame.f_globals:
            frame = frame.f_back
        g = copy.deepcopy(frame.f_globals["netG"])
        images = []
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for _ in range(N // 250):
                x = g(torch.randn(250, 100, 1, 1, generator=gen))
                x = F.adaptive_avg_pool2d(x, cfg.data.resolution)
                images.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        minutes = (t - t0 - paused) / 60
        x = torch.cat(images)
        np.save(a.out / f"samples_{minutes:.0f}min.npy", x.permute(0, 2, 3, 1).numpy())
        point = {"who": "textbook", "examples": str(a.examples), "minutes": minutes, **measures(ev.images(x))}
        print(point, flush=True)
        with open(a.out / "points.jsonl", "a") as f:
            print(json.dumps(point), file=f)
        paused += time.time() - t
        marks.pop(0)
        if not marks:
            os._exit(0)
        signal.setitimer(signal.ITIMER_REAL, marks[0] * 60 - (time.time() - t0 - paused))

    (a.out / "points.jsonl").unlink(missing_ok=True)
    signal.signal(signal.SIGALRM, snapshot)
    signal.setitimer(signal.ITIMER_REAL, marks[0] * 60)
    sys.argv = [str(a.examples / "main.py"), "--dataset", "mnist", "--dataroot", str(a.out / "dataroot"),
                "--outf", str(a.out), "--niter", "1000", "--manualSeed", "0"]
    os.chdir(a.out)
    runpy.run_path(str(a.examples / "main.py"), run_name="__main__")


def table(a) -> None:
    import itertools

    import numpy as np
    import torch

    from dcgan_dist.data import read_shards

    cfg, _, ev = evaluator(a.config, a.set)
    real = np.stack([x for x, _ in itertools.islice(read_shards(cfg.data.shards), N)])
    floor = measures(ev.images(torch.from_numpy(real).permute(0, 3, 1, 2)))
    print(f"floor (first {N} training images vs {cfg.eval.reference or cfg.data.shards}): {floor}")
    print("| who | minutes | step | FID | x floor | precision | recall |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    curves = {}
    for folder in a.runs:
        for line in (Path(folder) / "points.jsonl").read_text().splitlines():
            p = json.loads(line)
            curves.setdefault(folder, []).append((p["minutes"], p["fid"] / floor["fid"]))
            print(f"| {folder} | {p['minutes']:.1f} | {p.get('step', '')} | {p['fid']:.4f} | "
                  f"{p['fid'] / floor['fid']:.1f} | {p['precision']:.3f} | {p['recall']:.3f} |")
    if a.real_grid:
        from torchvision.utils import save_image

        test = np.stack([x for x, _ in itertools.islice(read_shards(cfg.eval.reference or cfg.data.shards), 64)])
        save_image(torch.from_numpy(test).permute(0, 3, 1, 2).float() / 255, a.real_grid, nrow=8, padding=2)
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
        for (folder, pts), label in zip(curves.items(), a.labels or list(curves)):
            ax.plot(*zip(*sorted(pts)), marker="o", label=label)
        ax.set_xlabel("minutes on 2 CPU cores")
        ax.set_ylabel("FID / floor FID")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Fashion-MNIST, 10,000 generated vs the 10,000 test images", fontsize=9)
        fig.tight_layout()
        fig.savefig(a.plot)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("ours", "textbook", "table"):
        s = sub.add_parser(name)
        s.add_argument("--config", type=Path, required=True)
        s.add_argument("--set", action="append", default=[])
        if name == "table":
            s.add_argument("runs", nargs="+")
            s.add_argument("--labels", nargs="+", help="one per run, for the plot")
            s.add_argument("--plot", type=Path)
            s.add_argument("--real-grid", type=Path)
            continue
        s.add_argument("--minutes", type=float, nargs="+", required=True)
        s.add_argument("--out", type=Path, required=True)
        if name == "ours":
            s.add_argument("--every", type=int, default=250)
        else:
            s.add_argument("--examples", type=Path, required=True, help="pytorch/examples' dcgan folder")
    a = p.parse_args()
    if hasattr(a, "out"):
        a.out = a.out.resolve()
        a.out.mkdir(parents=True, exist_ok=True)
    {"ours": ours, "textbook": textbook, "table": table}[a.what](a)


if __name__ == "__main__":
    main()
