"""Cached evaluation files (reference statistics, digit classifiers): safetensors files that carry their own
checksum, like checkpoints do, so a damaged or truncated entry is recomputed instead of used.

The checksum is the sha256 of the header (tensor names, dtypes, shapes, offsets, the other metadata) and of
every data byte, stored in the header's metadata as ``sha256``. A file is written under a temporary name and
renamed, so a reader sees a complete old entry or a complete new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import tempfile
from pathlib import Path

import torch

from ..atomic import write_bytes_atomic
from ..errors import UserError, disk_error

log = logging.getLogger("dcgan_dist")
MAX_HEADER = 100 * 1024 * 1024        # safetensors' own limit


def check_writable(cache: Path) -> None:
    """Create ``cache`` if needed and check that files can be written in it; else a one-line UserError naming
    it (eval.cache_dir) and what to do."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):
            pass
    except OSError as e:
        raise UserError(f"eval.cache_dir: {cache} is not a writable folder ({e.strerror or e}); FID/KID cache "
                        f"their reference statistics and classifier there: set eval.cache_dir to a writable "
                        f"folder") from None


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` to ``path`` with its checksum (atomically). An unwritable or full cache folder is a
    one-line UserError."""
    from safetensors.torch import save as to_bytes

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    plain = to_bytes(tensors, metadata=metadata)
    header, data = _split(plain)
    blob = to_bytes(tensors, metadata={**metadata, "sha256": _digest(header, data)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, blob, unique=True)
    except OSError as e:
        err = disk_error(e, f"the evaluation cache file {path}", "free space or set eval.cache_dir to another folder")
        raise (err or UserError(f"eval.cache_dir: cannot write {path} ({e.strerror or e}); set eval.cache_dir "
                                f"to a writable folder")) from None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of a cached entry whose checksum holds; None when there is none, or when it is
    damaged, truncated or has no checksum (written by an older version): then with a warning, and the caller
    computes it again."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
            digest = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        metadata = dict(header.get("__metadata__") or {})
        expected = metadata.pop("sha256", None)
        if expected is None:
            raise ValueError("no checksum (written by an older version)")
        if _digest({**header, "__metadata__": metadata}, digest) != expected:
            raise ValueError("differs from its checksum (truncated or altered)")
        return load_file(str(path)), metadata
    except Exception as e:  # noqa: BLE001 - any failure to read is damage
        log.warning("evaluation cache file %s is damaged (%s: %s); computing it again", path, type(e).__name__,
                    str(e)[:200])
        return None


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _digest(header: dict, data) -> str:
    """sha256 of the header without its checksum, then of the data (bytes, or a hashlib object fed with them)."""
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != "sha256"}
    canon = json.dumps({**header, "__metadata__": meta}, sort_keys=True).encode()
    if isinstance(data, (bytes, bytearray)):
        return hashlib.sha256(canon + hashlib.sha256(data).digest()).hexdigest()
    return hashlib.sha256(canon + data.digest()).hexdigest()
