"""Fashion-MNIST, the real files (Debian's dataset-fashion-mnist): the converter against the IDX bytes, the download
against a local server holding them, every kind of damage to an IDX file as one line, the published protocol's
numbers on known sets, and a 2-process run on the real shards that resumes exactly."""

import gzip
import http.server
import json
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, accelerate_launch, run_cli
from dcgan_dist.data import read_shards
from dcgan_dist.data.prepare import PrepareOptions, prepare
from dcgan_dist.data.sources import FashionMnistSource, open_source
from synthetic import write_mnist

DEBIAN = FashionMnistSource.default_input
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

if not all((DEBIAN / f"{f}.gz").is_file() for f in FILES):
    if os.environ.get("DCGAN_DIST_REQUIRE_FASHION"):        # CI installs the package: absent there is a failure
        raise RuntimeError(f"{DEBIAN} lacks the Fashion-MNIST files: apt-get install -y dataset-fashion-mnist")
    pytest.skip(f"no {DEBIAN} (apt-get install -y dataset-fashion-mnist)", allow_module_level=True)


def idx(name: str) -> np.ndarray:
    """The IDX file's data, read here independently of dcgan_dist (magic, sizes, uint8 body)."""
    data = gzip.open(DEBIAN / f"{name}.gz").read()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data[4 + 4 * ndim:], np.uint8).reshape(dims)


def shard_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray, list]:
    rows = list(read_shards(folder, with_keys=True))
    return np.stack([r[0] for r in rows]), np.array([r[1] for r in rows]), [r[2] for r in rows]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """Shards of the real files at 32 px: 12,000 training images (a quick classifier), the 10,000 test images,
    and the test split's sneakers; with a config that evaluates against the test shards."""
    root = tmp_path_factory.mktemp("fashion")
    for out, split, kw in (("train", "train", {"limit": 12000}), ("test", "test", {}),
                           ("sneakers", "test", {"classes": "Sneaker"})):
        prepare(open_source("fashion-mnist", None, split), root / out,
                PrepareOptions("fashion-mnist", None, split, resolution=32, **kw), progress=False)
    cfg = root / "fashion.toml"
    cfg.write_text(f"""
name = "fashion"
runs_dir = "{root / 'runs'}"
[data]
shards = "{root / 'train'}"
resolution = 32
channels = 1
workers = 1
[model]
latent = 32
ngf = 16
ndf = 16
[train]
batch_size = 32
max_steps = 24
sync_every = 1
[log]
every = 4
sample_every = 8
wandb = "disabled"
progress_bar = false
[loss]
r1_gamma = 0.05
r1_every = 16
[checkpoint]
every = 100
[eval]
reference = "{root / 'test'}"
cache_dir = "{root / 'cache'}"
every = 8
n = 256
batch_size = 128
kid_subsets = 2
kid_subset_size = 128
""")
    return root, cfg


def test_the_converter_keeps_every_image_and_label_of_the_idx_files(tmp_path):
    """At the native 28 px every pixel is the file's own; counts, labels, class names, keys as in the IDX files."""
    for split, prefix, n in (("train", "train", 60000), ("test", "t10k", 10000)):
        m = prepare(open_source("fashion-mnist", None, split), tmp_path / split,
                    PrepareOptions("fashion-mnist", None, split, resolution=28), workers=2, progress=False)
        assert m["num_images"] == n and m["class_names"] == CLASSES and m["channels"] == 1
        x, y, keys = shard_arrays(tmp_path / split)
        assert np.array_equal(x[..., 0], idx(f"{prefix}-images-idx3-ubyte"))
        assert np.array_equal(y, idx(f"{prefix}-labels-idx1-ubyte"))
        assert keys[:2] == [f"{prefix}:0", f"{prefix}:1"] and len(set(keys)) == n
        assert np.bincount(y).tolist() == [n // 10] * 10            # Fashion-MNIST is balanced


def test_at_32px_images_are_pils_bicubic_resize_of_the_raw_bytes(fashion):
    root, _ = fashion
    x, y, _ = shard_arrays(root / "test")
    raw, labels = idx("t10k-images-idx3-ubyte"), idx("t10k-labels-idx1-ubyte")
    assert x.shape == (10000, 32, 32, 1) and np.array_equal(y, labels)
    for i in (0, 1, 4321, 9999):
        want = np.asarray(Image.fromarray(raw[i]).resize((32, 32), Image.Resampling.BICUBIC))
        assert np.array_equal(x[i, :, :, 0], want), i


def test_one_class_by_its_name(fashion):
    root, _ = fashion
    x, y, keys = shard_arrays(root / "sneakers")
    wanted = np.flatnonzero(idx("t10k-labels-idx1-ubyte") == 7)
    assert len(x) == len(wanted) == 1000 and set(y.tolist()) == {7}
    assert keys == [f"t10k:{i}" for i in wanted]
    assert json.loads((root / "sneakers" / "manifest.json").read_text())["classes_kept"] == [7]


# ------------------------------------------------------------------------------------ damaged IDX files, one line
def _flip_inside_stream(p: Path):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _rewrite_idx(p: Path, change):
    data = bytearray(gzip.open(p).read())
    change(data)
    p.write_bytes(gzip.compress(bytes(data)))


DAMAGE = {
    "truncated .gz": (lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(
        (d / "train-images-idx3-ubyte.gz").read_bytes()[:5000]), "cannot read (EOFError"),
    "not gzip": (lambda d: (d / "train-labels-idx1-ubyte.gz").write_bytes(b"P5\n28 28\n255\n" + bytes(100)),
                 "cannot read (BadGzipFile"),
    "corrupt stream": (lambda d: _flip_inside_stream(d / "train-images-idx3-ubyte.gz"), "cannot read ("),
    "wrong magic": (lambda d: _rewrite_idx(d / "train-images-idx3-ubyte.gz", lambda b: b.__setitem__(3, 1)),
                    "not an IDX file with magic number 2051"),
    "counts disagree": (lambda d: _rewrite_idx(d / "train-labels-idx1-ubyte.gz",
                                               lambda b: b.__setitem__(slice(4, 8), struct.pack(">I", len(b) - 9)) or
                                               b.pop()), "the two files are not a pair"),
    "label outside the classes": (lambda d: _rewrite_idx(d / "train-labels-idx1-ubyte.gz",
                                                         lambda b: b.__setitem__(8 + 17, 200)),
                                  "label 200 of image 17 is outside the 10 classes"),
    "empty file": (lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(b""), "is empty"),
    "empty after gunzip": (lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"")),
                           "is empty"),
}


@pytest.mark.parametrize("source", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_idx_files_are_one_line_exit_2_and_nothing_written(tmp_path, cli, source, damage):
    src = write_mnist(tmp_path / "src", n=64)
    if source == "fashion-mnist":               # the real labels file's header and first labels, cut to 64
        labels = gzip.open(DEBIAN / "train-labels-idx1-ubyte.gz").read()
        (src / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">II", 2049, 64) + labels[8:72]))
    make, message = DAMAGE[damage]
    make(src)
    p = cli("prepare_data.py", source, "--input", src, "--out", tmp_path / "out", "--resolution", 32, check=False)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec", ["", " , ", "Sneakers"])
def test_an_empty_or_unknown_class_list_is_refused(tmp_path, cli, spec):
    p = cli("prepare_data.py", "fashion-mnist", "--out", tmp_path / "out", "--classes", spec, check=False)
    assert p.returncode == 2 and "Sneaker, Bag, Ankle boot or indices 0-9" in p.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------- download
@pytest.fixture
def server(tmp_path):
    """A local HTTP server over a folder; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *a: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_download_from_a_server_holding_the_real_files_checks_and_converts(tmp_path, cli, server):
    folder, url = server
    for f in FILES:
        shutil.copy(DEBIAN / f"{f}.gz", folder)
    p = cli("prepare_data.py", "fashion-mnist", "--download", "--mirror", url, "--input", tmp_path / "raw",
            "--split", "test", "--out", tmp_path / "out", "--resolution", 28, "--quiet")
    assert "wrote 10000 images" in p.stdout
    assert sorted(q.name for q in (tmp_path / "raw").iterdir()) == sorted(f"{f}.gz" for f in FILES)
    x, y, _ = shard_arrays(tmp_path / "out")
    assert np.array_equal(x[..., 0], idx("t10k-images-idx3-ubyte")) and np.array_equal(y, idx("t10k-labels-idx1-ubyte"))


@pytest.mark.parametrize("source", ["mnist", "fashion-mnist"])
def test_a_download_that_fails_its_checksum_is_refused_and_not_kept(tmp_path, cli, server, source):
    """One byte changed inside the (still valid) gzip of the labels: neither md5 nor IDX sha256 matches. MNIST's
    synthetic files match no published md5 at all."""
    folder, url = server
    if source == "fashion-mnist":
        for f in FILES:
            shutil.copy(DEBIAN / f"{f}.gz", folder)
        _rewrite_idx(folder / "train-labels-idx1-ubyte.gz", lambda b: b.__setitem__(100, (b[100] + 1) % 10))
    else:
        write_mnist(folder, n=16)
        write_mnist(folder, n=16, split="test")
    p = cli("prepare_data.py", source, "--download", "--mirror", url, "--input", tmp_path / "raw",
            "--out", tmp_path / "out", check=False)
    assert p.returncode == 2 and "does not match the published checksum" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert not [q for q in (tmp_path / "raw").iterdir() if q.name.startswith("train-labels")]   # nothing half kept


# ----------------------------------------------------------------------------------------------------- protocol
def test_the_protocol_tells_the_floor_one_class_and_shuffled_pixels_apart(fashion, tmp_path):
    """Real training images against the test split (the floor), the test split's sneakers only, and shuffled
    pixels. In these class-trained features one class reads as far as shuffled pixels by FID (both > 100x the
    floor: measured 29.8 and 25.8 against 0.031); precision and recall tell them apart: a real class lies on the
    real manifold but covers a fifth of it, shuffled pixels lie nowhere near it. Every output names the features."""
    root, cfg = fashion
    rows = {}
    for name, args in (("floor", [root / "train"]), ("one class", [root / "sneakers"]),
                       ("shuffled", [root / "train", "--shuffle-pixels"])):
        p = run_cli("evaluate.py", "--config", cfg, "--n", 1000, "--set", "eval.n=1000", "--images", *args,
                    "--json", tmp_path / "r.json")
        rows[name] = json.loads((tmp_path / "r.json").read_text())
        assert "features: a classifier trained on" in p.stdout and "not Inception" in p.stdout
        assert rows[name]["reference"] == str(root / "test") and rows[name]["n_real"] == 10000
    floor, one, shuffled = rows["floor"], rows["one class"], rows["shuffled"]
    assert floor["n_fake"] == one["n_fake"] == shuffled["n_fake"] == 1000
    assert 100 * floor["fid"] < min(one["fid"], shuffled["fid"]), rows
    assert floor["precision"] > 0.85 and floor["recall"] > 0.85, floor
    assert one["precision"] > 0.9 and one["recall"] < 0.3, one
    assert shuffled["precision"] < 0.1 and shuffled["recall"] < 0.05, shuffled
    assert one["class_fractions"][7] > 0.8                      # the classifier sees sneakers


def test_two_processes_on_the_real_shards_resume_exactly(fashion, tmp_path):
    """2 ranks, EMA, evaluation against the test split and the recipe's R1 penalty on (steps 1 and 17: one in the
    resumed half): 12 steps, then on to 24 from that checkpoint, ends bitwise where 24 steps in one go end (G, D,
    G_ema), with the same FIDs and precisions."""
    root, cfg = fashion

    def run(name, steps):
        accelerate_launch(ROOT / "launch" / "train.py", "--config", cfg, "--set", f'runs_dir="{tmp_path / name}"',
                          "--set", f"train.max_steps={steps}", "--set", "checkpoint.every=12", "--set", "eval.every=12",
                          timeout=600)
        return tmp_path / name / "fashion"

    once = run("once", 24)
    run("twice", 12)
    twice = run("twice", 24)
    for f in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a, b = (load_file(r / "checkpoints" / "step_00000024" / f) for r in (once, twice))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    fids = [[(r["step"], r["fid"], r["precision"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text()
                                                                 .splitlines()) if "fid" in r] for run_dir in (once, twice)]
    assert fids[0] == fids[1] and [s for s, *_ in fids[0]] == [12, 24]


def test_images_from_a_npy_file_measure_as_the_same_images_from_shards(fashion, tmp_path):
    """Another program's samples come as .npy: the first 500 training images saved so give exactly the figures of
    the same images read from the shards; a file of the wrong shape or dtype is one line, exit 2."""
    root, cfg = fashion
    x, _, _ = shard_arrays(root / "train")
    np.save(tmp_path / "samples.npy", x[:500])
    results = []
    for images in (root / "train", tmp_path / "samples.npy"):
        run_cli("evaluate.py", "--config", cfg, "--n", 500, "--images", images, "--json", tmp_path / "r.json")
        r = json.loads((tmp_path / "r.json").read_text())
        results.append({k: r[k] for k in ("fid", "kid", "precision", "recall", "n_fake")})
    assert results[0] == results[1] and results[0]["n_fake"] == 500
    for bad in (x[:10, :28, :28], x[:10].astype(np.float32)):
        np.save(tmp_path / "bad.npy", bad)
        p = run_cli("evaluate.py", "--config", cfg, "--images", tmp_path / "bad.npy", check=False)
        assert p.returncode == 2 and p.stderr.strip().splitlines() == [p.stderr.strip()], p.stderr
        assert "expected uint8 N x 32 x 32 x 1" in p.stderr
