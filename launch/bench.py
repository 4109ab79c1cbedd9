"""Benchmarks that print figures (never asserted in tests).

  python launch/bench.py data --shards DIR [--batch-size 128] [--batches 300]
      loader images/s for one worker process (and in-process), from existing shards
  python launch/bench.py data --synthetic-lsun 2000 [--resolution 64]
      builds an LSUN-style lmdb of 256-px WebP images in a temp folder, then measures
      the classic per-image path (lmdb -> PIL decode -> Resize -> CenterCrop -> ToTensor),
      the converter (one worker) and the shard loader, at the same resolution
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch


def bench_loader(shards: Path, batch_size: int, batches: int, workers: int) -> float:
    from dcgan_dist.data import ShardLoader

    loader = ShardLoader(shards, batch_size=batch_size, num_workers=workers, seed=0)
    it = iter(loader)
    for _ in range(min(20, batches // 5)):  # warm up: worker start, page cache
        next(it)
    t0 = time.perf_counter()
    n = 0
    for x, _ in itertools.islice(it, batches):
        n += len(x)
    return n / (time.perf_counter() - t0)


def bench_classic(lmdb_path: Path, resolution: int, n: int) -> float:
    """pytorch/examples dcgan's per-image path, fed from LSUN's lmdb as torchvision.datasets.LSUN does."""
    import io

    import lmdb
    import torchvision.transforms as T
    from PIL import Image

    tf = T.Compose([T.Resize(resolution), T.CenterCrop(resolution), T.ToTensor(),
                    T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    env = lmdb.open(str(lmdb_path), readonly=True, lock=False, readahead=False, meminit=False)
    t0 = time.perf_counter()
    count = 0
    with env.begin() as txn:
        for _, value in itertools.islice(txn.cursor(), n):
            tf(Image.open(io.BytesIO(value)).convert("RGB"))
            count += 1
    return count / (time.perf_counter() - t0)


def cmd_data(a) -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, batch {a.batch_size}, {a.batches} batches timed")
    if a.shards:
        _report_loader(a.shards, a)
        return
    from dcgan_dist.data.prepare import PrepareOptions, prepare
    from dcgan_dist.data.sources import LsunSource
    from dcgan_dist.data.synthetic import write_lsun

    with tempfile.TemporaryDirectory() as tmp:
        lmdb_path = Path(tmp) / "bedroom_train_lmdb"
        t0 = time.perf_counter()
        write_lsun(lmdb_path, a.synthetic_lsun)
        print(f"made {a.synthetic_lsun} synthetic 256-px WebP images in {time.perf_counter() - t0:.1f}s")
        classic = bench_classic(lmdb_path, a.resolution, a.synthetic_lsun)
        print(f"classic per-image path (WebP decode+resize+crop+to tensor, 1 core): {classic:,.0f} img/s")
        out = Path(tmp) / "shards"
        m = prepare(LsunSource(lmdb_path), out, PrepareOptions("lsun", str(lmdb_path), resolution=a.resolution),
                    workers=1, progress=False)
        print(f"converter, 1 worker, 256-px WebP -> {a.resolution} px: {m['_stats']['images_per_s']:,.0f} img/s")
        per_worker = _report_loader(out, a)
        print(f"shard loader / classic path: {per_worker / classic:.0f}x")


def _report_loader(shards: Path, a) -> float:
    from dcgan_dist.data import load_manifest

    m = load_manifest(shards)
    print(f"shards: {shards} ({m['num_images']} images, {m['resolution']} px, {m['channels']} ch)")
    one = bench_loader(shards, a.batch_size, a.batches, workers=1)
    print(f"shard loader, 1 worker process: {one:,.0f} img/s")
    inproc = bench_loader(shards, a.batch_size, a.batches, workers=0)
    print(f"shard loader, in-process (workers=0): {inproc:,.0f} img/s")
    return one


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="loader / converter throughput")
    d.add_argument("--shards", type=Path)
    d.add_argument("--synthetic-lsun", type=int, default=2000, help="images in the synthetic lmdb")
    d.add_argument("--resolution", type=int, default=64)
    d.add_argument("--batch-size", type=int, default=128)
    d.add_argument("--batches", type=int, default=300)
    a = p.parse_args(argv)
    if a.cmd == "data":
        cmd_data(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
