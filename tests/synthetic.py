"""Small files in the exact public formats (CIFAR10 python pickles, MNIST IDX, LSUN lmdb), for tests
and benchmarks on machines that cannot download the real datasets."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def photo_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour field with mild noise: compresses like a photo, unlike pure noise."""
    from PIL import Image

    base = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-12, 13, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_cifar10(root: Path, n_per_batch: int = 20, seed: int = 0, as_archive: bool = True) -> Path:
    """``cifar-10-python.tar.gz`` (or the extracted ``cifar-10-batches-py/``) with Python-2-style pickles:
    bytes keys, ``data`` uint8 N x 3072 row-major CHW, ``labels`` a list. Returns the archive or folder."""
    rng = np.random.default_rng(seed)
    files = {"batches.meta": {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_cases_per_batch": n_per_batch}}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        files[name] = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                       b"filenames": [f"img_{i}.png".encode() for i in range(n_per_batch)]}
    root.mkdir(parents=True, exist_ok=True)
    if not as_archive:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(exist_ok=True)
        for name, obj in files.items():
            (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
        return folder
    path = root / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in files.items():
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def write_mnist(root: Path, n: int = 50, split: str = "train", seed: int = 0, gz: bool = True) -> Path:
    """``{train,t10k}-images-idx3-ubyte[.gz]`` (magic 2051) and ``-labels-idx1-ubyte[.gz]`` (magic 2049)."""
    rng = np.random.default_rng(seed)
    prefix = "train" if split == "train" else "t10k"
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    ext = ".gz" if gz else ""
    with opener(root / f"{prefix}-images-idx3-ubyte{ext}", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    with opener(root / f"{prefix}-labels-idx1-ubyte{ext}", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def write_lsun(path: Path, n: int = 20, seed: int = 0, fmt: str = "WEBP", corrupt: int = 0) -> Path:
    """An LSUN-style lmdb: hex keys, WebP (or JPEG) values with shorter side 256. The first ``corrupt``
    values are damaged (truncated, or not an image)."""
    import hashlib

    import lmdb
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 34)
    with env.begin(write=True) as txn:
        for i in range(n):
            h, w = (256, int(rng.integers(256, 400))) if i % 2 else (int(rng.integers(256, 400)), 256)
            buf = io.BytesIO()
            Image.fromarray(photo_like(rng, h, w)).save(buf, format=fmt, quality=75)
            value = buf.getvalue()
            if i < corrupt:
                value = value[: len(value) // 3] if i % 2 == 0 else b"not an image at all"
            txn.put(hashlib.sha1(f"{seed}-{i}".encode()).hexdigest().encode(), value)
    env.close()
    return path


def write_indexed_shards(out: Path, n: int, resolution: int = 32, channels: int = 3, shard_size: int = 64,
                         chunk_size: int = 16, seed: int = 0) -> dict:
    """Shards of random images whose label is their index and whose first row encodes it
    (``image_index``), for checking loader coverage and order. Returns the manifest."""
    from dcgan_dist.data.shards import FORMAT, MANIFEST, shard_name, write_json_atomic, write_shard

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, lo in enumerate(range(0, n, shard_size)):
        chunks = []
        for c, a in enumerate(range(lo, min(lo + shard_size, n), chunk_size)):
            idx = np.arange(a, min(a + chunk_size, lo + shard_size, n))
            images = rng.integers(0, 256, size=(len(idx), resolution, resolution, channels), dtype=np.uint8)
            for k in range(3):
                images[:, 0, k, 0] = (idx >> (8 * k)) & 0xFF
            chunks.append((f"{s:06d}_{c:04d}", images, idx.astype(np.int64), [f"synthetic:{i}" for i in idx]))
        shards.append(write_shard(out / shard_name(s), chunks))
    manifest = {"format": FORMAT, "source": "synthetic", "resolution": resolution, "channels": channels,
                "num_images": n, "class_names": None, "chunk_size": chunk_size, "shard_size": shard_size,
                "skipped": {"count": 0, "items": []}, "shards": shards}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def image_index(images: np.ndarray) -> np.ndarray:
    """Invert ``write_indexed_shards``'s encoding: B x H x W x C uint8 -> B indices."""
    px = images[:, 0, :3, 0].astype(np.int64)
    return px[:, 0] | (px[:, 1] << 8) | (px[:, 2] << 16)


def write_random_inception(path: Path, seed: int = 0) -> Path:
    """Random weights of the real FID Inception-v3 (torch-fidelity's architecture, every tensor of the
    2015-12-05 file with its shape), saved as a plain state dict: for tests and benchmarks on machines where
    the real file cannot be downloaded. Its features are meaningless; its cost and code path are the real ones."""
    from unittest import mock

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    # build the module without its weights: the constructor would download them, then load them strictly
    with mock.patch.object(fe, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def serve_http(folder: Path, latency: float = 0.0, fail_first: int = 0, hang: bool = False,
               corrupt_first: int = 0):
    """A plain HTTP server on 127.0.0.1 for ``folder`` that answers byte-range requests (206) and HEAD, with
    ``latency`` seconds added to every request, in a daemon thread: stands in for object storage / a CDN in
    tests and ``bench.py data --http``. The first ``fail_first`` range requests get a 503 (a flaky network).
    ``hang``: range requests are accepted and never answered (until shutdown). The first ``corrupt_first`` range
    answers have their last byte flipped (a transient corruption). Returns ``(base_url, server)``;
    ``server.requests`` counts requests (``server.ranges`` range requests), ``server.shutdown()`` stops it."""
    import http.server
    import threading
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _target(self):
            path = folder / self.path.lstrip("/").split("?")[0]
            return path if path.is_file() and folder in path.resolve().parents else None

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _answer(self, body: bool):
            self.server.requests += 1
            time.sleep(latency)
            path = self._target()
            if path is None:
                self.send_error(404)
                return
            size = path.stat().st_size
            start, end = 0, size                              # [start, end)
            ranged = self.headers.get("Range", "").startswith("bytes=")
            self.server.ranges += ranged
            if ranged and hang:
                self.server.released.wait()
                return
            if ranged and self.server.failures < fail_first:
                self.server.failures += 1
                self.send_error(503)
                return
            if ranged:
                a, _, b = self.headers["Range"][6:].partition("-")
                start, end = int(a or 0), min(size, int(b) + 1 if b else size)
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if body and ranged and self.server.corrupted < corrupt_first:
                self.server.corrupted += 1
                with open(path, "rb") as f:
                    f.seek(start)
                    data = bytearray(f.read(end - start))
                data[-1] ^= 0xFF
                self.wfile.write(bytes(data))
            elif body:
                with open(path, "rb") as f:                    # zero-copy (os.sendfile), as real servers do
                    self.connection.sendfile(f, start, end - start)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        # socketserver's listen backlog is 5: a loader opening 16+ connections at once had some refused
        # (ClientConnectorError, retried after 0.25 s) in the 20-ms benchmark; real servers queue hundreds (nginx 511)
        request_queue_size = 512

        def handle_error(self, request, client_address):    # a client closing its keep-alive connection
            pass

        def shutdown(self):
            self.released.set()
            super().shutdown()
            self.server_close()                       # later connections are refused, not left unanswered

    folder = Path(folder).resolve()
    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.requests = server.failures = server.ranges = server.corrupted = 0
    server.released = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server
