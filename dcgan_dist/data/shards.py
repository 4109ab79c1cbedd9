"""The shard format: WebDataset tar files whose samples are chunks of images, plus manifest.json.

Each tar sample is one chunk of up to ``chunk_size`` images already at the training resolution::

    000003_0007.images.npy   uint8  N x H x W x C
    000003_0007.labels.npy   int64  N
    000003_0007.keys.json    the N source keys (for tracing an image back to its source)

Why chunks of raw pixels rather than one PNG per image: per-member tar iteration and PNG decoding
cost ~100-300 us of Python per image (about 3,000 images/s per core at 64 px); a chunk costs one read
and one memcpy for hundreds of images, which is what lets one loader worker feed a GPU. The files stay
ordinary WebDataset shards (``wds.WebDataset(urls).decode()`` reads them), and the manifest records
each member's byte offset so the loader can read any chunk directly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import UserError

FORMAT = "dcgan_dist.shards/1"
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_shard(path: Path, chunks: list[tuple[str, np.ndarray, np.ndarray, list[str]]]) -> dict:
    """Write ``[(key, images, labels, source_keys), ...]`` to ``path`` atomically; return its manifest entry."""
    import webdataset as wds

    tmp = path.with_name(path.name + ".tmp")
    # mtime fixed: the same input gives byte-identical shards and therefore the same sha256.
    with wds.TarWriter(str(tmp), mtime=0) as sink:
        for key, images, labels, keys in chunks:
            sink.write({"__key__": key, "images.npy": images, "labels.npy": labels,
                        "keys.json": json.dumps(keys)})
    offsets = {}
    with tarfile.open(tmp) as tar:
        for m in tar.getmembers():
            offsets[m.name] = [m.offset_data, m.size]
    entry = {
        "name": path.name,
        "num_images": int(sum(len(c[1]) for c in chunks)),
        "bytes": tmp.stat().st_size,
        "sha256": sha256_file(tmp),
        "chunks": [{"key": key, "n": len(images), "images": offsets[f"{key}.images.npy"],
                    "labels": offsets[f"{key}.labels.npy"]} for key, images, _, _ in chunks],
    }
    _fsync(tmp)
    os.replace(tmp, path)
    return entry


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def load_manifest(root: str | Path, verify: str = "size", resolution: int | None = None,
                  channels: int | None = None) -> dict:
    """Read ``root/manifest.json`` and check the shards against it before any training starts.

    ``verify``: ``"size"`` (every shard exists with the recorded byte size; instant) or ``"sha256"``
    (also hash every shard). ``resolution``/``channels``: what the run expects; a mismatch is an error.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        hint = " (a conversion seems to be in progress or was interrupted; re-run prepare_data.py)" \
            if (root / "prepare_state.json").exists() else ""
        raise UserError(f"{path}: no manifest; create shards with launch/prepare_data.py{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; re-create the shards")
    for key, want in (("resolution", resolution), ("channels", channels)):
        if want is not None and manifest[key] != want:
            raise UserError(f"{path}: shards are {key} {manifest[key]} but the run asks for {want}; "
                            f"re-create them with prepare_data.py --{key} {want} or change the config")
    if verify not in ("size", "sha256", "none"):
        raise UserError(f"verify must be size, sha256 or none, not {verify!r}")
    for shard in manifest["shards"]:
        f = root / shard["name"]
        if not f.is_file():
            raise UserError(f"{f}: shard listed in {path} is missing")
        if verify != "none" and f.stat().st_size != shard["bytes"]:
            raise UserError(f"{f}: {f.stat().st_size} bytes, manifest says {shard['bytes']} "
                            f"(truncated or replaced); re-create the shards")
        if verify == "sha256" and sha256_file(f) != shard["sha256"]:
            raise UserError(f"{f}: sha256 differs from the manifest (corrupted); re-create the shards")
    return manifest


def read_chunk(f, chunk: dict, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Read one chunk's images and labels from an open shard file, by the manifest's byte offsets.

    Raises ValueError when the member is not the npy array the manifest describes.
    """
    images = _read_npy(f, *chunk["images"])
    labels = _read_npy(f, *chunk["labels"])
    n = chunk["n"]
    if images.dtype != np.uint8 or images.shape != (n, *shape) or labels.shape != (n,):
        raise ValueError(f"chunk holds {images.dtype} {images.shape} / labels {labels.shape}, "
                         f"expected uint8 {(n, *shape)}")
    return images, labels.astype(np.int64, copy=False)


def _read_npy(f, offset: int, size: int) -> np.ndarray:
    f.seek(offset)
    buf = f.read(size)
    if len(buf) != size:
        raise ValueError(f"short read ({len(buf)} of {size} bytes)")
    return np.lib.format.read_array(io.BytesIO(buf), allow_pickle=False)


def read_shards(path: str | Path, with_keys: bool = False) -> Iterator[tuple]:
    """Yield ``(uint8 H x W x C array, int label)`` (plus the source key) for every image, in stored order.

    Reads through WebDataset itself, so it also shows the shards are plain WebDataset data.
    """
    import webdataset as wds

    manifest = load_manifest(path)
    urls = [str(Path(path) / s["name"]) for s in manifest["shards"]]
    if not urls:
        return
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                             empty_check=False).decode()
    for sample in dataset:
        keys = sample["keys.json"]
        for img, label, key in zip(sample["images.npy"], sample["labels.npy"], keys):
            yield (img, int(label), key) if with_keys else (img, int(label))
