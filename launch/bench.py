"""Benchmarks that print figures (never asserted in tests).

  python launch/bench.py train [--resolutions 32,64] [--batch-sizes 128] [--modes eager,graph] [--json F]
      training images/s of the whole GAN step (one process): resolution x batch x fp32/bf16/fp16 x
      channels_last x mode (eager, torch.compile, or the whole step captured in one CUDA graph) on synthetic
      on-device batches; the shard loader; the textbook loop (pytorch/examples dcgan: Sigmoid + BCELoss,
      separate real/fake backwards, D grads in the G step); FLOPs per image and the fraction of the H200's
      bf16 peak
  python launch/bench.py checkpoint [--resolution 64]
      size, save time and resume (find + load) time of a full checkpoint of the default DCGAN

  python launch/bench.py data --shards DIR [--batch-size 128] [--batches 300]
      loader images/s for one worker process (and in-process), from existing shards
  python launch/bench.py data --synthetic-lsun 2000 [--resolution 64]
      builds an LSUN-style lmdb of 256-px WebP images in a temp folder, then measures
      the classic per-image path (lmdb -> PIL decode -> Resize -> CenterCrop -> ToTensor),
      the converter (one worker) and the shard loader, at the same resolution
"""

from __future__ import annotations

if __name__ == "__main__":
    import _deps  # noqa: F401 - first: without the project's packages, one line on how to get them

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(1, str(TESTS))          # tests/synthetic.py: generated data in the public formats


def bench_loader(shards: Path, batch_size: int, batches: int, workers: int, verify: str = "size") -> float:
    from dcgan_dist.data import ShardLoader

    loader = ShardLoader(shards, batch_size=batch_size, num_workers=workers, seed=0, verify=verify)
    try:
        it = iter(loader)
        for _ in range(min(100, batches // 5)):  # warm up: worker start, page cache, the first prefetched windows
            next(it)
        t0 = time.perf_counter()
        n = 0
        for x, _ in itertools.islice(it, batches):
            n += len(x)
        return n / (time.perf_counter() - t0)
    finally:
        loader.close()      # its workers and their connections end here, not at exit


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
    try:
        with env.begin() as txn:
            for _, value in itertools.islice(txn.cursor(), n):
                tf(Image.open(io.BytesIO(value)).convert("RGB"))
                count += 1
    finally:
        env.close()              # lmdb 3 refuses to open an environment twice in one process (the converter next)
    return count / (time.perf_counter() - t0)


def cmd_data(a) -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, batch {a.batch_size}, {a.batches} batches timed")
    if a.random_images:
        from synthetic import write_indexed_shards
        with tempfile.TemporaryDirectory() as tmp:
            write_indexed_shards(Path(tmp), a.random_images, resolution=a.resolution, shard_size=8192,
                                 chunk_size=256)
            _report_shards(Path(tmp), a)
        return
    if a.shards:
        _report_shards(a.shards, a)
        return
    from dcgan_dist.data.prepare import PrepareOptions, prepare
    from dcgan_dist.data.sources import LsunSource
    from synthetic import write_lsun

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
        per_worker = _report_shards(out, a)
        print(f"shard loader / classic path: {per_worker / classic:.0f}x")


SERVER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from synthetic import serve_http
url, server = serve_http(Path(sys.argv[1]), latency=float(sys.argv[2]))
print(url, flush=True)
sys.stdin.read()                                   # until the benchmark closes the pipe
print(server.requests, flush=True)
"""


def _report_shards(shards: Path, a) -> float:
    """The loader's figures on these shards (and over HTTP with --http); returns one local worker's img/s."""
    per_worker = _report_loader(shards, a)
    if a.http is not None:
        _report_http(shards, a)
    return per_worker


def _report_http(shards: Path, a) -> None:
    """The same shards served over HTTP from this machine (range requests), with and without added latency.
    The server runs in a process of its own, as object storage would: in the benchmark's process it would
    compete for the GIL with the thread that receives the worker's batches."""
    import subprocess

    for ms in sorted({0, a.http}):
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(shards), str(ms / 1000), str(TESTS)], text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            rate = bench_loader(server.stdout.readline().strip(), a.batch_size, a.batches, workers=1)
            requests = server.communicate("", timeout=30)[0].strip()
        finally:
            server.kill()
        print(f"shard loader over HTTP (server in its own process), {ms} ms added per request, 1 worker "
              f"process: {rate:,.0f} img/s ({requests} requests)")


def _report_loader(shards: Path, a) -> float:
    from dcgan_dist.data import load_manifest

    m = load_manifest(shards)
    print(f"shards: {shards} ({m['num_images']} images, {m['resolution']} px, {m['channels']} ch)")
    one = bench_loader(shards, a.batch_size, a.batches, workers=1)
    print(f"shard loader, 1 worker process: {one:,.0f} img/s")
    inproc = bench_loader(shards, a.batch_size, a.batches, workers=0)
    print(f"shard loader, in-process (workers=0): {inproc:,.0f} img/s")
    # verify="none" also turns off the per-chunk CRC-32: the pair shows what checking every chunk costs
    one_off = bench_loader(shards, a.batch_size, a.batches, workers=1, verify="none")
    inproc_off = bench_loader(shards, a.batch_size, a.batches, workers=0, verify="none")
    print(f"without the per-chunk checksum (verify=none): 1 worker {one_off:,.0f} img/s, "
          f"in-process {inproc_off:,.0f} img/s; checked / unchecked: {one / one_off:.2f} (1 worker), "
          f"{inproc / inproc_off:.2f} (in-process)")
    return one


def _timed(step, warmup: int, steps: int, sync) -> float:
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def textbook_step_fn(G, D, batch: int, latent: int, res: int, channels: int, device):
    """pytorch/examples/dcgan/main.py's update, verbatim in structure (fp32: its BCELoss refuses autocast)."""
    netD = torch.nn.Sequential(D, torch.nn.Sigmoid())
    criterion = torch.nn.BCELoss()
    optD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optG = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = torch.rand(batch, channels, res, res, device=device) * 2 - 1

    def step():
        netD.zero_grad()
        label = torch.full((batch,), 1.0, device=device)
        errD_real = criterion(netD(real), label)
        errD_real.backward()
        fake = G(torch.randn(batch, latent, 1, 1, device=device))
        label.fill_(0.0)
        errD_fake = criterion(netD(fake.detach()), label)
        errD_fake.backward()
        optD.step()
        G.zero_grad()
        label.fill_(1.0)
        errG = criterion(netD(fake), label)
        errG.backward()
        optG.step()
    return step


H200_BF16_PEAK = 790e12      # FLOP/s, an 8192^3 bf16 matrix product measured on the lent H200 (device KINDS.md)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def train_rows(a) -> list[tuple]:
    """(resolution, batch, precision, channels_last, mode) of every row asked for."""
    rows = []
    for res, batch, prec, cl, mode in itertools.product(_ints(a.resolutions), _ints(a.batch_sizes),
                                                        a.precisions.split(","), a.channels_last, a.modes.split(",")):
        if mode == "graph" and prec == "fp16":
            continue                  # GradScaler keeps host-side state per step: not capturable (capture_step)
        rows.append((res, batch, prec, cl, mode))
    return rows


def cmd_train(a) -> None:
    """Images/s of the whole GAN step (one process), per row of train_rows, plus the textbook loop; --json
    writes every figure."""
    import json

    from torch.utils.flop_counter import FlopCounterMode

    from dcgan_dist.config import load_config
    from dcgan_dist.data import ShardLoader, to_device
    from synthetic import write_indexed_shards
    from dcgan_dist.models import build_models
    from dcgan_dist.runtime import new_accelerator
    from dcgan_dist.train import step as step_mod
    from dcgan_dist.train.loop import build

    acc = new_accelerator(cpu=not torch.cuda.is_available())
    dev = acc.device
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True           # autotuned convolutions (the trainer's default leaves it off)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {name}; {a.steps} timed steps after "
          f"{a.warmup} warm-up; cudnn.benchmark on")
    print(f"{'res':>4} {'batch':>5} {'prec':>5} {'ch_last':>7} {'mode':>8} {'img/s':>10} {'ms/step':>8}  note")
    out = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "rows": [], "flops_per_image": {}}

    def report(res, batch, prec, cl, mode, s, note=""):
        img_s = batch / s if s else None
        row = {"resolution": res, "batch": batch, "precision": prec, "channels_last": cl, "mode": mode,
               "images_per_s": img_s, "ms_per_step": s * 1000 if s else None, "note": note}
        out["rows"].append(row)
        fig = f"{img_s:>10,.0f} {s * 1000:>8.2f}" if s else f"{'-':>10} {'-':>8}"
        print(f"{res:>4} {batch:>5} {prec:>5} {str(cl):>7} {mode:>8} {fig}  {note}", flush=True)

    for res, batch, prec, cl, mode in train_rows(a):
        if prec == "fp16" and not cuda and not a.full:
            report(res, batch, prec, cl, mode, None, "skipped: CPU fp16 convolutions are ~20x slower (--full runs it)")
            continue
        cfg = load_config(None, [f"data.resolution={res}", f'train.precision="{prec}"', f"train.batch_size={batch}",
                                 f"train.channels_last={str(cl).lower()}",
                                 f"train.compile={str(mode == 'compile').lower()}"])
        torch.manual_seed(0)
        nets = build(acc, cfg)
        fixed = torch.randint(0, 256, (batch, res, res, cfg.data.channels), dtype=torch.uint8, device=dev)
        note = ""
        if str(res) not in out["flops_per_image"]:
            with FlopCounterMode(display=False) as fc:
                step_mod.gan_step(acc, nets, to_device(fixed, dev, cl), cfg, 0.0)
            out["flops_per_image"][str(res)] = fc.get_total_flops() / batch
        try:
            step = lambda: step_mod.gan_step(acc, nets, to_device(fixed, dev, cl), cfg, 0.0)  # noqa: E731
            if mode == "graph":
                nets.opt_g, nets.opt_d = step_mod.make_optimizers(nets.G, nets.D, cfg.optim, cuda, capturable=cuda)
                if cuda:
                    step = step_mod.capture_step(step)
                else:
                    note = "CPU rehearsal: the capturable step, run eagerly (no CUDA graph on a CPU)"
            s = _timed(step, a.warmup + (2 if mode == "compile" else 0), a.steps, sync)
        except Exception as e:  # noqa: BLE001 - report an unsupported combination, keep benchmarking
            report(res, batch, prec, cl, mode, None, f"failed: {type(e).__name__}: {e}"[:160])
            continue
        flops = out["flops_per_image"][str(res)]
        if cuda:
            note = note or f"{flops * batch / s / H200_BF16_PEAK:.1%} of the H200's bf16 peak"
        report(res, batch, prec, cl, mode, s, note)
    for res, batch in itertools.product(_ints(a.resolutions), _ints(a.batch_sizes)):
        torch.manual_seed(0)
        cfg = load_config(None, [f"data.resolution={res}"])
        G, D = (m.to(dev) for m in build_models(cfg))
        s = _timed(textbook_step_fn(G, D, batch, cfg.model.latent, res, cfg.data.channels, dev), a.warmup, a.steps,
                   sync)
        report(res, batch, "fp32", False, "textbook", s, "pytorch/examples dcgan: Sigmoid + BCELoss, 3 backwards")
    if a.shards_row:
        tmp = tempfile.TemporaryDirectory()
        batch = _ints(a.batch_sizes)[0]
        write_indexed_shards(Path(tmp.name), max(4096, 8 * batch), 64, 3, shard_size=2048, chunk_size=256)
        cfg = load_config(None, ["data.resolution=64", f"train.batch_size={batch}", 'train.precision="fp32"'])
        nets = build(acc, cfg)
        it = iter(ShardLoader(Path(tmp.name), batch, num_workers=a.workers, seed=0, pin_memory=cuda))
        s = _timed(lambda: step_mod.gan_step(acc, nets, to_device(next(it)[0], dev, True), cfg, 0.0), a.warmup,
                   a.steps, sync)
        report(64, batch, "fp32", True, "shards", s, f"fed by the shard loader, {a.workers} worker(s)")
    best = max((r for r in out["rows"] if r["images_per_s"] and r["mode"] != "textbook" and r["resolution"] == 64),
               key=lambda r: r["images_per_s"], default=None)
    book = max((r for r in out["rows"] if r["images_per_s"] and r["mode"] == "textbook" and r["resolution"] == 64),
               key=lambda r: r["images_per_s"], default=None)
    if best and book:
        out["best_64"] = {**best, "vs_textbook": best["images_per_s"] / book["images_per_s"],
                          "peak_fraction": out["flops_per_image"]["64"] * best["images_per_s"] / H200_BF16_PEAK}
        print(f"best 64 px row: {best['images_per_s']:,.0f} img/s ({best['precision']}, batch {best['batch']}, "
              f"{best['mode']}), {out['best_64']['vs_textbook']:.2f}x the best textbook row; "
              f"{out['flops_per_image']['64'] / 1e9:.2f} GFLOP per image per step")
    if a.json:                        # several invocations add their rows to one file
        path = Path(a.json)
        if path.exists():
            old = json.loads(path.read_text())
            out = {**old, **out, "rows": old["rows"] + out["rows"],
                   "flops_per_image": {**old["flops_per_image"], **out["flops_per_image"]}}
        path.write_text(json.dumps(out, indent=1))


def cmd_checkpoint(a) -> None:
    from dcgan_dist.config import load_config
    from dcgan_dist.runtime import new_accelerator
    from dcgan_dist.train import checkpoint
    from dcgan_dist.train.checkpoint import TrainState
    from dcgan_dist.train.loop import build

    cfg = load_config(None, [f"data.resolution={a.resolution}", 'train.precision="fp16"'])
    acc = new_accelerator(cpu=not torch.cuda.is_available())
    nets = build(acc, cfg)
    for opt, model in ((nets.opt_g, nets.G), (nets.opt_d, nets.D)):   # one step: Adam state exists
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    state = TrainState(torch.randn(64, cfg.model.latent))
    state.step = 1000
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = checkpoint.save(acc, nets, state, Path(tmp), "", 3, 0)
        saved = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.iterdir())
        t0 = time.perf_counter()
        checkpoint.resume("auto", Path(tmp), acc, nets, TrainState(torch.zeros(1)))
        loaded = time.perf_counter() - t0
    print(f"{a.resolution}-px DCGAN checkpoint: {size / 1e6:.1f} MB; save {saved:.2f} s; "
          f"resume (find + load) {loaded:.2f} s")


def cmd_eval(a) -> None:
    """Seconds per 1,000 images of an evaluation: the default 64-px G generating, and each extractor
    (Inception-v3 with random weights of the real architecture: its cost is the real one)."""
    from synthetic import write_random_inception
    from dcgan_dist.eval.features import DigitClassifier, InceptionFeatures
    from dcgan_dist.models import Generator

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = Generator(100, 64, 3, a.resolution).to(dev).eval()
    x = torch.randint(0, 256, (a.batch_size, 3, a.resolution, a.resolution), dtype=torch.uint8, device=dev)
    with tempfile.TemporaryDirectory() as tmp:
        extractors = {"inception": InceptionFeatures(write_random_inception(Path(tmp) / "w.pth")).to(dev),
                      "digit classifier": DigitClassifier(3, 10).to(dev).eval()}
    z = torch.randn(a.batch_size, 100, device=dev)
    print(f"torch {torch.__version__}, {dev}, batch {a.batch_size}, {a.resolution} px, {a.batches} batches")
    with torch.no_grad():
        s = _timed(lambda: g(z), 1, a.batches, sync)
        print(f"generate (G, latent 100, ngf 64): {s / a.batch_size * 1000:.2f} s per 1,000 images")
        for name, net in extractors.items():
            s = _timed(lambda: net(x), 1, a.batches, sync)
            print(f"features ({name}): {s / a.batch_size * 1000:.2f} s per 1,000 images")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="loader / converter throughput")
    d.add_argument("--shards", type=Path)
    d.add_argument("--random-images", type=int, metavar="N", help="time the loader on N random images in "
                   "shards of 8,192 (chunks of 256), made in a temporary folder, instead of converting LSUN")
    d.add_argument("--synthetic-lsun", type=int, default=2000, help="images in the synthetic lmdb")
    d.add_argument("--resolution", type=int, default=64)
    d.add_argument("--batch-size", type=int, default=128)
    d.add_argument("--batches", type=int, default=300)
    d.add_argument("--http", type=int, metavar="MS", help="also serve the shards over HTTP here (range requests) "
                                                          "and time the loader with 0 and MS ms added per request")
    t = sub.add_parser("train", help="training step throughput")
    t.add_argument("--resolutions", default="32,64", help="comma-separated, e.g. 32,64,128")
    t.add_argument("--batch-sizes", default="128", help="per-GPU batch sizes, comma-separated, e.g. 128,256,512")
    t.add_argument("--precisions", default="fp32,bf16,fp16")
    t.add_argument("--channels-last", default="on,off", type=lambda v: [x == "on" for x in v.split(",")],
                   help="on, off or on,off")
    t.add_argument("--modes", default="eager,graph",
                   help="eager, compile (torch.compile), graph (the whole step in one CUDA graph), comma-separated")
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--workers", type=int, default=1, help="loader workers for the shard-fed row")
    t.add_argument("--shards-row", action=argparse.BooleanOptionalAction, default=True,
                   help="also time 64 px fp32 fed by the shard loader")
    t.add_argument("--full", action="store_true", help="also fp16 on a CPU")
    t.add_argument("--json", help="write every figure to this JSON file")
    c = sub.add_parser("checkpoint", help="checkpoint size, save and resume time")
    c.add_argument("--resolution", type=int, default=64)
    e = sub.add_parser("eval", help="FID/KID evaluation cost per 1,000 images")
    e.add_argument("--resolution", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=50)
    e.add_argument("--batches", type=int, default=2)
    a = p.parse_args(argv)
    {"data": cmd_data, "train": cmd_train, "checkpoint": cmd_checkpoint, "eval": cmd_eval}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
