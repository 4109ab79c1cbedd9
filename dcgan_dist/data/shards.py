"""The shard format: WebDataset tar files whose samples are chunks of images, plus manifest.json.

Each tar sample is one chunk of up to ``chunk_size`` images already at the training resolution::

    000003_0007.images.npy   uint8  N x H x W x C
    000003_0007.labels.npy   int64  N
    000003_0007.keys.json    the N source keys (for tracing an image back to its source)

Why chunks of raw pixels rather than one PNG per image: per-member tar iteration and PNG decoding
cost ~100-300 us of Python per image (about 3,000 images/s per core at 64 px); a chunk costs one read
and one memcpy for hundreds of images, which is what lets one loader worker feed a GPU. The files stay
ordinary WebDataset tars, and the manifest records each member's byte offset so the loader can read any
chunk directly.

Shards are data, never code: only the three members above are decoded (npy without pickles, JSON), any
other member is refused, and shard names in the manifest are plain file names inside the shard folder
(no paths, no URLs: webdataset would run a ``pipe:`` name as a shell command). Do not read untrusted
shards with ``wds.WebDataset(...).decode()``: its default decoders unpickle ``.pkl`` members.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from ..atomic import atomic_write, write_json_atomic  # noqa: F401 - write_json_atomic: re-exported
from ..errors import UserError
from .store import Store

FORMAT = "dcgan_dist.shards/1"
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    while chunk := f.read(block):
        h.update(chunk)
    return h.hexdigest()


def write_shard(path: Path, chunks: list[tuple[str, np.ndarray, np.ndarray, list[str]]]) -> dict:
    """Write ``[(key, images, labels, source_keys), ...]`` to ``path`` atomically; return its manifest entry."""
    import webdataset as wds

    with atomic_write(path, fsync=True) as tmp:
        # mtime fixed: the same input gives byte-identical shards and therefore the same sha256.
        with wds.TarWriter(str(tmp), mtime=0) as sink:
            for key, images, labels, keys in chunks:
                sink.write({"__key__": key, "images.npy": images, "labels.npy": labels,
                            "keys.json": json.dumps(keys)})
        offsets = {}
        with tarfile.open(tmp) as tar:
            for m in tar.getmembers():
                offsets[m.name] = [m.offset_data, m.size]
        crcs = {}
        with open(tmp, "rb") as f:
            for key, *_ in chunks:
                crcs[key] = chunk_crc32(_read_bytes(f, *offsets[f"{key}.images.npy"]),
                                        _read_bytes(f, *offsets[f"{key}.labels.npy"]))
        entry = {
            "name": path.name,
            "num_images": int(sum(len(c[1]) for c in chunks)),
            "bytes": tmp.stat().st_size,
            "sha256": sha256_file(tmp),
            "chunks": [{"key": key, "n": len(images), "images": offsets[f"{key}.images.npy"],
                        "labels": offsets[f"{key}.labels.npy"], "crc32": crcs[key]}
                       for key, images, _, _ in chunks],
        }
    return entry


def fingerprint(manifest: dict) -> str:
    """Identifies a shard set by content (not by path): the same images in the same shards."""
    h = hashlib.sha256(f"{manifest['resolution']}/{manifest['channels']}".encode())
    for shard in manifest["shards"]:
        h.update(shard["sha256"].encode())
    return h.hexdigest()[:16]


def load_manifest(root, verify: str = "size", resolution: int | None = None,
                  channels: int | None = None) -> dict:
    """Read ``root/manifest.json``, check its shape, and check the shards against it before training.

    ``root``: a folder, or an s3:// gs:// http(s):// URL (see store.py). ``verify``: ``"size"`` (every shard
    exists with the recorded byte size; instant locally, one request per shard remotely) or ``"sha256"``
    (also hash every shard: reads them all). ``resolution``/``channels``: what the run expects.
    """
    store = Store(root)
    path = store.url(MANIFEST)
    if not store.exists(MANIFEST):
        hint = " (a conversion seems to be in progress or was interrupted; re-run prepare_data.py)" \
            if store.exists("prepare_state.json") else ""
        raise UserError(f"{path}: no manifest; create shards with launch/prepare_data.py{hint}")
    try:
        manifest = json.loads(store.read_bytes(MANIFEST))
    except (OSError, ValueError) as e:       # ValueError: invalid JSON or not UTF-8
        raise UserError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{path}: format {got!r} is not {FORMAT!r}; re-create the shards")
    check_manifest(manifest, path)
    for key, want in (("resolution", resolution), ("channels", channels)):
        if want is not None and manifest[key] != want:
            raise UserError(f"{path}: shards are {key} {manifest[key]} but the run asks for {want}; "
                            f"re-create them with prepare_data.py --{key} {want} or change the config")
    if verify not in ("size", "sha256", "none"):
        raise UserError(f"verify must be size, sha256 or none, not {verify!r}")
    for shard in manifest["shards"]:
        f = store.url(shard["name"])
        size = store.size(shard["name"])
        if size is None:
            raise UserError(f"{f}: shard listed in {path} is missing")
        if verify != "none" and size != shard["bytes"]:
            raise UserError(f"{f}: {size} bytes, manifest says {shard['bytes']} "
                            f"(truncated or replaced); re-create the shards")
        if verify == "sha256":
            with store.open(shard["name"]) as stream:
                digest = sha256_stream(stream)
            if digest != shard["sha256"]:
                raise UserError(f"{f}: sha256 differs from the manifest (corrupted); re-create the shards")
    return manifest


# A shard is a plain file name inside the shard folder: no path separators, no "..", no URL scheme
# (webdataset would run "pipe:CMD" as a shell command), nothing hidden.
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar$")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_manifest(m: dict, path: Path) -> None:
    """Refuse a manifest of the wrong shape with one line naming the field (never a KeyError later)."""
    def bad(field: str, what: str):
        raise UserError(f"{path}: invalid manifest: {field} {what}; re-create the shards with prepare_data.py")

    for key in ("resolution", "channels", "num_images"):
        if not _is_int(m.get(key)) or m[key] < (0 if key == "num_images" else 1):
            bad(key, f"must be a positive integer, got {m.get(key)!r}")
    if m["channels"] not in (1, 3):
        bad("channels", f"must be 1 or 3, got {m['channels']!r}")
    if not isinstance(m.get("shards"), list):
        bad("shards", f"must be a list, got {type(m.get('shards')).__name__}")
    total = 0
    for i, s in enumerate(m["shards"]):
        where = f"shards[{i}]"
        if not isinstance(s, dict):
            bad(where, "must be an object")
        name = s.get("name")
        if not isinstance(name, str) or not SAFE_NAME.match(name) or ".." in name:
            # the name is not echoed in full: it may be a path the manifest's author wants disclosed
            bad(f"{where}.name", "is not a plain .tar file name inside the shard folder (no paths, no URLs)")
        for key in ("num_images", "bytes"):
            if not _is_int(s.get(key)) or s[key] < 0:
                bad(f"{where}.{key}", f"must be a non-negative integer, got {s.get(key)!r}")
        if not isinstance(s.get("sha256"), str):
            bad(f"{where}.sha256", "must be a string")
        if not isinstance(s.get("chunks"), list):
            bad(f"{where}.chunks", "must be a list")
        n = 0
        for j, c in enumerate(s["chunks"]):
            cw = f"{where}.chunks[{j}]"
            if not isinstance(c, dict) or not isinstance(c.get("key"), str):
                bad(cw, "must be an object with a string key")
            if not _is_int(c.get("n")) or c["n"] < 1:
                bad(f"{cw}.n", f"must be a positive integer, got {c.get('n')!r}")
            for member in ("images", "labels"):
                v = c.get(member)
                if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 0 for x in v)):
                    bad(f"{cw}.{member}", f"must be [offset, size] of non-negative integers, got {v!r}")
            if "crc32" in c and not _is_int(c["crc32"]):
                bad(f"{cw}.crc32", f"must be an integer, got {c['crc32']!r}")
            n += c["n"]
        if n != s["num_images"]:
            bad(f"{where}.num_images", f"is {s['num_images']} but its chunks hold {n}")
        total += n
    if total != m["num_images"]:
        bad("num_images", f"is {m['num_images']} but the shards hold {total}")


def chunk_crc32(images: bytes, labels: bytes) -> int:
    """The per-chunk checksum kept in the manifest: CRC-32 of the images member's bytes, then the labels'.
    zlib's (stdlib, no new dependency) runs at ~2.3 GB/s on the development VM, ~10x what one loader
    worker reads at 64 px, so checking every chunk as it is read costs the loader little (docs/benchmarks.md)."""
    return zlib.crc32(labels, zlib.crc32(images))


def chunk_span(chunk: dict) -> tuple[int, int]:
    """The byte range [start, end) of a shard that holds a chunk's images and labels (one read)."""
    ends = [off + size for off, size in (chunk["images"], chunk["labels"])]
    return min(chunk["images"][0], chunk["labels"][0]), max(ends)


def read_chunk(store: Store, name: str, chunk: dict, shape: tuple[int, int, int],
               check: bool = True, fresh: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read one chunk's images and labels from a shard, by the manifest's byte offsets, in one range read.

    ``check``: compare the bytes with the chunk's ``crc32`` (manifests written before it existed have none).
    ``fresh``: remote shards, fetch the bytes again rather than from the local cache.
    Raises ValueError when the bytes differ from the manifest's or are not the npy arrays it describes.
    """
    start, end = chunk_span(chunk)
    buf = store.read_range(name, start, end, fresh)
    if len(buf) != end - start:
        raise ValueError(f"short read ({len(buf)} of {end - start} bytes)")

    view = memoryview(buf)

    def member(offset: int, size: int) -> memoryview:
        return view[offset - start: offset - start + size]
    raw_images, raw_labels = member(*chunk["images"]), member(*chunk["labels"])
    if check and "crc32" in chunk and chunk_crc32(raw_images, raw_labels) != chunk["crc32"]:
        raise ValueError("checksum differs from the manifest's (bytes changed since the shards were written)")
    images, labels = npy_view(raw_images), npy_view(raw_labels)
    n = chunk["n"]
    if images.dtype != np.uint8 or images.shape != (n, *shape) or labels.shape != (n,):
        raise ValueError(f"chunk holds {images.dtype} {images.shape} / labels {labels.shape}, "
                         f"expected uint8 {(n, *shape)}")
    return images, labels.astype(np.int64, copy=False)


def npy_view(raw) -> np.ndarray:
    """The array an .npy member's bytes hold, as a read-only view of them (``np.lib.format.read_array`` on a
    BytesIO copies the data twice: a fifth of a remote loader worker's time at 64 px). Header parsing is numpy's
    own; pickled (object) arrays and truncated data are refused (ValueError)."""
    head = io.BytesIO(bytes(raw[:16384]))     # numpy's header readers refuse more than 10,000 bytes by default
    version = np.lib.format.read_magic(head)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
    if dtype.hasobject:
        raise ValueError("npy member holds Python objects (pickles), which shards never do")
    count = math.prod(shape)
    if len(raw) - head.tell() != count * dtype.itemsize:
        raise ValueError(f"npy member holds {len(raw) - head.tell()} data bytes, its header says "
                         f"{count * dtype.itemsize}")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=head.tell())
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def _read_bytes(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    buf = f.read(size)
    if len(buf) != size:
        raise ValueError(f"short read ({len(buf)} of {size} bytes)")
    return buf


MEMBERS = ("images.npy", "labels.npy", "keys.json")     # everything a shard may hold, per chunk


def read_shards(path: str | Path, with_keys: bool = False) -> Iterator[tuple]:
    """Yield ``(uint8 H x W x C array, int label)`` (plus the source key) for every image, in stored order.

    Reads the tars with WebDataset's own tar iterator and sample grouping, but decodes only the members
    the format defines (npy without pickles, JSON) and refuses any other member by name: webdataset's
    default decoders would unpickle a ``.pkl`` member. Shards are opened through the Store (plain files, or
    fsspec for an s3/gs/http(s) root), never through webdataset's URL handling (which runs ``pipe:`` names).
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    store = Store(path)
    manifest = load_manifest(path)
    for shard in manifest["shards"]:
        f = store.url(shard["name"])
        listed = {c["key"]: c for c in shard["chunks"]}
        with store.open(shard["name"]) as stream:
            for sample in group_by_keys(tar_file_expander([{"url": f, "stream": stream}])):
                images, labels, keys = _decode_sample(sample, f, listed)
                for img, label, key in zip(images, labels, keys):
                    yield (img, int(label), key) if with_keys else (img, int(label))


def _decode_sample(sample: dict, shard: str, listed: dict) -> tuple:
    members = {k for k in sample if not k.startswith("__")}
    extra = sorted(members - set(MEMBERS))
    if extra or members != set(MEMBERS):
        what = f"holds {sample['__key__']}.{extra[0]}" if extra else f"lacks a member of chunk {sample['__key__']}"
        raise UserError(f"{shard}: {what}, which is not part of the dcgan_dist shard format "
                        f"({', '.join(MEMBERS)}); refusing to read it")
    chunk = listed.get(sample["__key__"])
    if chunk is None:
        raise UserError(f"{shard}: holds chunk {sample['__key__']}, which the manifest does not list; "
                        f"re-create the shards")
    if "crc32" in chunk and chunk_crc32(sample["images.npy"], sample["labels.npy"]) != chunk["crc32"]:
        raise UserError(f"{shard}: chunk {sample['__key__']} differs from the manifest's checksum (corrupted); "
                        f"re-create the shards")
    try:
        images = np.load(io.BytesIO(sample["images.npy"]), allow_pickle=False)
        labels = np.load(io.BytesIO(sample["labels.npy"]), allow_pickle=False)
        keys = json.loads(sample["keys.json"])
    except ValueError as e:
        raise UserError(f"{shard}: chunk {sample['__key__']} cannot be decoded ({e})") from None
    return images, labels, keys
