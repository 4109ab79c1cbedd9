"""The epoch plan: which images each rank reads, in which order; a pure function of seed, epoch and world size.

1. The chunks of every shard (``chunk_size`` images each, see shards.py) are permuted with
   ``rng(seed, epoch)`` and laid end to end: one sequence of all N images.
2. The sequence is cut into one *slot* per rank of ``L = N // (world_size * B) * B`` images (B = batch size
   per rank); rank r reads slot r. The last ``N - world_size*L`` images of the sequence (fewer than
   ``world_size*B``) are left out this epoch; the permutation changes them every epoch. When N is a multiple
   of world_size*B every image is seen exactly once.
3. A slot is read in *windows* of ``k*B`` images (``k = shuffle_window // B``, the last window of an epoch
   shorter); each window is gathered from the ~``shuffle_window / chunk_size`` chunks it overlaps (random
   places in the dataset) and permuted with ``rng(seed, epoch, rank, window)``; batches are consecutive
   slices of it.

So every rank yields exactly ``L / B`` batches per epoch, and batch ``g`` of a rank is determined by
``(seed, g)``: a run restarted at batch ``g`` continues with the very batch it would have seen.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ..errors import UserError, brief
from .shards import read_chunk
from .store import Store
from .worker import RAISE_LIMIT

# The epoch plan's version, kept in checkpoints (TrainState.data_order): 1 cut each rank's share into one slot
# per worker (dcgan_dist before 2026-12-01; the same order as 2 for workers 0 and 1); 2 is the plan above.
DATA_ORDER = 2

class ShardWindows(Dataset):
    """Item ``m``: window ``m`` of one rank's plan (see the module docstring), counted across epochs, as
    ``(images uint8 n x H x W x C, labels int64 n, index of its first rank batch, skipped)``, n = its batches x B;
    ``skipped``: ``(where, warning)`` per corrupt chunk, whose places are filled with repeats from the window.
    A user's error (a shard it cannot read) comes back as ``(None, None, first, message)``: raised in a worker,
    the DataLoader would wrap it in a traceback. In a worker process the tensors are in shared memory."""

    def __init__(self, store: Store, manifest: dict, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle_window: int, check: bool, concurrency: int) -> None:
        self.store, self.check, self.concurrency = store, check, concurrency
        self.shape = (manifest["resolution"], manifest["resolution"], manifest["channels"])
        self.chunks = [(s["name"], c) for s in manifest["shards"] for c in s["chunks"]]
        self.sizes = np.array([c["n"] for _, c in self.chunks], dtype=np.int64)
        self.B, self.rank, self.seed = batch_size, rank, seed
        self.batches_per_epoch = int(self.sizes.sum()) // (world_size * batch_size)
        self.window_batches = max(1, min(shuffle_window // batch_size, self.batches_per_epoch))
        self.windows_per_epoch = -(-self.batches_per_epoch // self.window_batches)
        self._pool = None                   # (pid, thread pool) for the range requests of remote shards

    def window_of(self, g: int) -> int:
        """The window (counted across epochs) that holds rank batch ``g``."""
        epoch, i = divmod(g, self.batches_per_epoch)
        return epoch * self.windows_per_epoch + i // self.window_batches

    def __getitem__(self, m: int):
        epoch, w = divmod(m, self.windows_per_epoch)
        first = epoch * self.batches_per_epoch + w * self.window_batches
        try:
            spans, chunks = self._read(epoch, w)
        except UserError as e:
            return None, None, first, str(e)
        rng = np.random.default_rng([self.seed, epoch, self.rank, w])
        skipped = tuple(c for c in chunks if isinstance(c[0], str))
        pieces = [(c[0][a:z], c[1][a:z]) if not isinstance(c[0], str) else z - a for (_, a, z), c in zip(spans, chunks)]
        if skipped:
            pieces = self._fill_corrupt(pieces, rng)
        n = sum(len(p[0]) for p in pieces)
        x, y = np.empty((n, *self.shape), dtype=np.uint8), np.empty(n, dtype=np.int64)   # numpy's: huge pages
        _shuffle_into(pieces, rng, x, y)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if get_worker_info() is not None:
            try:   # here, not in the worker's queue thread, where a full /dev/shm would leave the trainer waiting
                x.share_memory_(), y.share_memory_()
            except RuntimeError as e:
                return None, None, first, shm_full(e)
        return x, y, first, skipped

    def _read(self, epoch: int, w: int):
        """The chunk pieces of window ``w`` of ``epoch``: ``(chunk, first, last image)`` each, and their chunks."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        ends = np.cumsum(self.sizes[order])
        slot_len = self.batches_per_epoch * self.B
        lo = self.rank * slot_len + w * self.window_batches * self.B
        hi = min(lo + self.window_batches * self.B, (self.rank + 1) * slot_len)
        spans = []
        for pos in range(int(np.searchsorted(ends, lo, side="right")), len(order)):
            start = int(ends[pos] - self.sizes[order[pos]])
            if start >= hi:
                break
            spans.append((int(order[pos]), max(lo, start) - start, min(hi, int(ends[pos])) - start))
        indices = [i for i, _, _ in spans]
        if not self.store.remote or len(indices) < 2:
            return spans, [self._chunk(i) for i in indices]
        if self._pool is None or self._pool[0] != os.getpid():      # a forked worker starts its own threads
            from concurrent.futures import ThreadPoolExecutor
            self._pool = (os.getpid(), ThreadPoolExecutor(self.concurrency, thread_name_prefix="range-read"))
        return spans, list(self._pool[1].map(self._chunk, indices))   # about one round trip per window

    def _chunk(self, index: int):
        """A chunk's (images, labels), or ``(where, warning)`` when it is corrupt (remote: after a second fetch)."""
        name, chunk = self.chunks[index]
        for fresh in (False, True):
            try:
                return read_chunk(self.store, name, chunk, self.shape, self.check, fresh=fresh)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):            # not the chunk's fault: never skip it
                    raise UserError(f"{self.store.url(name)}: {e.strerror} while reading it; {RAISE_LIMIT}") from None
                error = e
            except ValueError as e:
                error = e
            if not self.store.remote or isinstance(error, OSError):
                break
        where = f"{chunk['key']} in {self.store.url(name)}"
        return where, f"skipping corrupt chunk {where} ({chunk['n']} images): {error}"

    def _fill_corrupt(self, pieces: list, rng) -> list:
        """Keep the batch count exact: a corrupt chunk's places are filled with repeats from the window."""
        good = [p for p in pieces if not isinstance(p, int)]
        if not good:
            raise RuntimeError(f"{self.store}: every chunk of a loader window is corrupt; "
                               f"re-create the shards (see the warnings above)")
        pool_x, pool_y = np.concatenate([x for x, _ in good]), np.concatenate([y for _, y in good])
        picks = [rng.integers(0, len(pool_x), size=p) if isinstance(p, int) else None for p in pieces]
        return [(pool_x[k], pool_y[k]) if k is not None else p for p, k in zip(pieces, picks)]


def _shuffle_into(pieces: list, rng, x: np.ndarray, y: np.ndarray) -> None:
    """``x, y = concatenate(pieces)[rng.permutation(n)]`` in one copy: each piece is scattered straight to its
    places (``inverse[j]`` is where image j of the concatenation goes)."""
    inverse = np.empty(len(x), dtype=np.int64)
    inverse[rng.permutation(len(x))] = np.arange(len(x))
    at = 0
    for px, py in pieces:
        x[inverse[at:at + len(px)]], y[inverse[at:at + len(px)]] = px, py
        at += len(px)


def shm_full(e: Exception) -> str:
    """The one line for a worker that cannot put a window into shared memory."""
    return (f"shared memory (/dev/shm) is full: loader workers hand batches to the trainer through it ({brief(e, 160)}); "
            f"free /dev/shm, give the container more (docker run --shm-size=2g), or set data.workers = 0")
