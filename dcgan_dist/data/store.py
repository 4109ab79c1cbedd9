"""Where shards live: a local folder, or object storage / HTTP through fsspec (s3://, gs://, http(s)://).

Everything the loader, the trainer and the evaluator read goes through a Store: the manifest (one small file),
shard sizes (pre-flight), and byte ranges of chunks (the manifest's offsets), so the epoch plan, equal batches
and exact resume are the same for every kind of storage. Remote reads are stateless range requests
(fsspec's ``_cat_file(path, start, end)`` on its event loop), safe to run from many threads at once, retried with
exponential backoff. Every request is bounded (``timeout_s``: connect and answer, 30 s by default; fsspec's own
default lets a server that accepted a request and never answers hold a read for 300 s per try) and so is every
read with its retries (``deadline_s``); a shard that stays unreachable or silent is an error naming its URL, never
a hang. ``Store.cancel()`` ends the reads in flight of a closed loader within a quarter of a second.

Credentials come from each back end's usual places (AWS_* variables or ~/.aws for s3fs, Google's default
credentials for gcsfs); a URL with a user or password in it is refused, so none can reach config.toml, logs
or W&B through ``data.shards``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlsplit

from ..atomic import write_bytes_atomic
from ..errors import UserError

log = logging.getLogger("dcgan_dist")
REMOTE = ("s3", "gs", "gcs", "http", "https")
# Bounds of every remote read, in seconds: one request (connect + the whole answer), and one read with all its
# retries. The trainer sets them from data.timeout_s / data.deadline_s (set_limits) before it makes any Store.
LIMITS = {"timeout_s": 30.0, "deadline_s": 120.0}
MIN_TRY_S = 0.1         # the least time left under deadline_s for which one more try is made (or timeout_s if less)


def set_limits(timeout_s: float, deadline_s: float) -> None:
    """The bounds of remote reads for every Store made from now on (loader workers get them with their Store)."""
    LIMITS.update(timeout_s=float(timeout_s), deadline_s=float(deadline_s))


class Cancelled(Exception):
    """The Store was cancelled (its loader closed) while a read was in flight."""


def is_remote(root) -> bool:
    return isinstance(root, str) and "://" in root and root.split("://", 1)[0] in REMOTE


def _really_missing(e: FileNotFoundError) -> bool:
    """fsspec's HTTP back end reports any failure of HEAD/GET, a refused connection included, as
    FileNotFoundError with the real error as its cause: only a 404 (or no cause) means "missing"."""
    cause = e.__cause__
    return cause is None or isinstance(cause, FileNotFoundError) or getattr(cause, "status", None) == 404


class ChunkCache:
    """Fetched byte ranges of remote shards on local disk, for the epochs after the first: one file per range,
    written atomically (tmp + rename) so the loader workers and ranks of a node can share the folder, the
    least recently used deleted once the folder holds more than ``limit`` bytes. Cached bytes go through the
    same CRC check as fetched ones."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self._written = 0
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, start: int, end: int) -> Path:
        return self.folder / f"{name}.{start}-{end}"

    def get(self, name: str, start: int, end: int) -> bytes | None:
        path = self._path(name, start, end)
        try:
            data = path.read_bytes()
            os.utime(path)                                   # recently used
        except OSError:
            return None
        return data if len(data) == end - start else None

    def put(self, name: str, start: int, end: int, data: bytes) -> None:
        path = self._path(name, start, end)
        try:
            write_bytes_atomic(path, data, unique=True)
        except OSError as e:                                 # a full cache disk must not stop training
            log.warning("shard cache %s: cannot write (%s); reading from the store", self.folder, e.strerror)
            return
        self._written += len(data)
        if self._written > self.limit // 16:                 # look at the folder now and then, not per write
            self._written = 0
            self.evict()

    def evict(self) -> None:
        entries = []
        for p in self.folder.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:                        # another process evicted it
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.limit:
                break
            p.unlink(missing_ok=True)
            total -= size


class Store:
    def __init__(self, root, retries: int = 4, backoff: float = 0.25, what: str = "data.shards") -> None:
        """``what``: the setting or option the root came from, for error messages."""
        self.root = str(root).rstrip("/") if is_remote(root) else Path(root)
        self.remote = is_remote(root)
        self.retries, self.backoff, self.what = retries, backoff, what
        self.timeout_s, self.deadline_s = LIMITS["timeout_s"], LIMITS["deadline_s"]
        self._cancelled = threading.Event()
        self._fs, self._fs_pid = None, 0
        self.cache: ChunkCache | None = None
        self._fds: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        if self.remote:
            parts = urlsplit(self.root)
            if parts.username or parts.password:
                raise UserError(f"{what}: {parts.scheme}://{parts.hostname}/...: credentials in the URL would be "
                                f"written to manifests, config.toml, logs and W&B; remove them and use the "
                                f"storage's usual credentials (environment variables or its config file)")
        elif "://" in str(root):
            raise UserError(f"{what} = {str(root)[:60]!r}: unknown scheme; use a folder or an "
                            f"{', '.join(s + '://' for s in REMOTE)} URL")

    def url(self, name: str) -> str:
        return f"{self.root}/{name}" if self.remote else str(self.root / name)

    def __str__(self) -> str:
        return str(self.root)

    # ------------------------------------------------------------------------------------------ remote
    @property
    def fs(self):
        # One file system per process, never fsspec's shared instance: a forked loader worker must not use the
        # parent's event loop or its pooled connections (sharing a keep-alive socket across processes mixes up
        # their responses: seen as a parent waiting forever after its workers had read).
        if self._fs is None or self._fs_pid != os.getpid():
            import fsspec
            try:
                self._fs = fsspec.filesystem(self.root.split("://", 1)[0], skip_instance_cache=True)
            except ImportError as e:
                raise UserError(f"{self.what} = {self.root}: {e}; install the remote extra: "
                                f"pip install -e \".[remote]\"") from None
            self._fs_pid = os.getpid()
        return self._fs

    def __getstate__(self):            # DataLoader workers get a copy without open handles or clients
        return {**self.__dict__, "_fs": None, "_fds": OrderedDict(), "_lock": None, "_cancelled": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """End this Store's remote reads: those in flight raise Cancelled within 0.25 s, later ones at once (for
        a closing loader: its threads must not keep the process alive until their requests time out)."""
        self._cancelled.set()

    def _request(self, method: str, url: str, timeout: float, **kw):
        """``fs.<method>(url, **kw)`` through the file system's async API, bounded by ``timeout`` seconds and by
        cancel(). Raises TimeoutError naming the bound, Cancelled, or what the request raised."""
        fs = self.fs
        future = asyncio.run_coroutine_threadsafe(getattr(fs, "_" + method)(url, **kw), fs.loop)
        end = time.monotonic() + timeout
        while not future.done():
            left = end - time.monotonic()
            if left <= 0 or self._cancelled.is_set():
                future.cancel()               # cancels the coroutine on fsspec's loop: the connection is dropped
                if self._cancelled.is_set():
                    raise Cancelled(url)
                raise TimeoutError(f"no answer within {timeout:.3g} s")
            concurrent.futures.wait([future], timeout=min(left, 0.25))
        return future.result()

    def _retry(self, what: str, name: str, method: str, missing_ok: bool = False, **kw):
        """``method`` of the remote file system on ``name``, retried with backoff; every try bounded by
        ``timeout_s`` and all of them by ``deadline_s``. Raises UserError naming the URL."""
        t0 = time.monotonic()
        for attempt in range(self.retries + 1):
            left = self.deadline_s - (time.monotonic() - t0)
            try:
                if self._cancelled.is_set():
                    raise Cancelled(self.url(name))
                return self._request(method, self.url(name), min(self.timeout_s, left), **kw)
            except (UserError, Cancelled):    # not a network failure (a missing package): never retried
                raise
            except Exception as e:  # noqa: BLE001 - network errors come in many types (aiohttp, botocore, OSError)
                if isinstance(e, FileNotFoundError) and _really_missing(e):
                    if missing_ok:
                        raise
                    raise UserError(f"{self.url(name)}: FileNotFoundError while {what}") from None
                if isinstance(e, PermissionError):
                    raise UserError(f"{self.url(name)}: {type(e).__name__} while {what}") from None
                error = e.__cause__ if isinstance(e, FileNotFoundError) else e      # fsspec http's wrapping
                spent = time.monotonic() - t0
                delay = self.backoff * 2 ** attempt
                # no try after the backoff if it would have less than MIN_TRY_S (a try with a timeout of ~0 s, or
                # below 0 on a loaded machine, cannot be answered: "no answer within -0.0036 s" in the message)
                if attempt == self.retries or self.deadline_s - spent - delay < min(self.timeout_s, MIN_TRY_S):
                    raise UserError(f"{self.url(name)}: unreachable after {attempt + 1} tries in {spent:.1f} s while "
                                    f"{what} ({type(error).__name__}: {str(error)[:160]}){self._bounds(error)}") from None
                log.warning("%s: %s (%s: %s); retrying in %.2f s", self.url(name), what, type(error).__name__,
                            str(error)[:160], delay)
                if self._cancelled.wait(delay):
                    raise Cancelled(self.url(name)) from None

    def _bounds(self, error: Exception) -> str:
        if not isinstance(error, TimeoutError):
            return ""
        return (f"; a request may take data.timeout_s = {self.timeout_s:g} s, a read with its retries data.deadline_s "
                f"= {self.deadline_s:g} s: check the server, or raise them")

    # ------------------------------------------------------------------------------------------ reading
    def size(self, name: str) -> int | None:
        """The file's size in bytes, or None when it does not exist (one request remotely: ``fs.info``, not
        ``fs.exists``, which answers False for an unreachable server too)."""
        if not self.remote:
            path = self.root / name
            return path.stat().st_size if path.is_file() else None
        try:
            info = self._retry("asking its size", name, "info", missing_ok=True)
        except FileNotFoundError:
            return None
        return int(info["size"])

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def read_bytes(self, name: str) -> bytes:
        if not self.remote:
            return (self.root / name).read_bytes()
        return self._retry("reading it", name, "cat_file")

    def read_range(self, name: str, start: int, end: int, fresh: bool = False) -> bytes:
        """Bytes [start, end) of a shard. Thread-safe (pread locally, stateless range requests remotely).
        ``fresh``: fetch them again, not from the local cache (a copy that failed its checksum)."""
        if not self.remote:
            return os.pread(self._fd(name), end - start, start)
        cached = self.cache.get(name, start, end) if self.cache is not None and not fresh else None
        if cached is not None:
            return cached
        data = self._retry(f"reading bytes {start}-{end}", name, "cat_file", start=start, end=end)
        if self.cache is not None:
            self.cache.put(name, start, end, data)
        return data

    def use_cache(self, folder: str, gigabytes: float, key: str) -> None:
        """Cache fetched ranges under ``folder/<key>`` (``key``: the shard set's fingerprint, so re-created
        shards at the same URL never meet old bytes), at most ``gigabytes``. Local shards need none."""
        if self.remote and folder and gigabytes > 0:
            self.cache = ChunkCache(Path(folder).expanduser() / key, int(gigabytes * 1e9))

    def open(self, name: str):
        """A whole shard as a file object for sequential reading (read_shards, the webdataset source). Remotely,
        reads of 8 MiB ranges, each retried like every other read; fsspec's own file object would not retry."""
        if not self.remote:
            return open(self.root / name, "rb")
        size = self.size(name)
        if size is None:
            raise UserError(f"{self.url(name)}: not found")
        return io.BufferedReader(_RangeReader(self, name, size), buffer_size=8 << 20)

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.pop(name, None)
            if fd is None:
                fd = os.open(self.root / name, os.O_RDONLY)
            self._fds[name] = fd
            if len(self._fds) > 32:                       # bound open files per process
                os.close(self._fds.popitem(last=False)[1])
            return fd


class _RangeReader(io.RawIOBase):
    """A remote file read front to back through Store.read_range (see Store.open)."""

    def __init__(self, store: Store, name: str, size: int) -> None:
        self.store, self.name, self.size, self.pos = store, name, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        data = self.store.read_range(self.name, self.pos, self.pos + n)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)
