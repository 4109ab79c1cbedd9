"""Files that readers see whole or not at all: written beside their place, then renamed over it."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_write(path: Path, fsync: bool = False, unique: bool = False, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path beside ``path`` for the block to write; when the block ends without an error the
    file takes ``path``'s name (``os.replace``: a reader sees the old file or the new one, never a part, even after
    a kill); on an error (a full disk...) it is removed and the error raised. ``fsync``: on disk before the rename
    (shards, manifests: what a power cut must not leave empty). ``unique``: a temporary name per process and
    thread, for files that several writers may write at once (a shared cache)."""
    tmp = path.with_name(path.name + suffix + (f"{os.getpid()}-{threading.get_ident()}" if unique else ""))
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: Path, data: bytes, **kw) -> None:
    with atomic_write(path, **kw) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, obj: dict) -> None:
    with atomic_write(path, fsync=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))
