"""Convert a public dataset into shards at the training resolution (decode + crop + resize exactly once).

Atomicity: every shard is written as ``*.tmp`` and renamed when complete, with a small sidecar
``shard-NNNNNN.json`` recording what it holds; ``manifest.json`` is written last. An interrupted run
leaves ``prepare_state.json``; re-running the same command resumes after the last complete shard,
re-running a different command refuses.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..errors import UserError
from .shards import FORMAT, MANIFEST, shard_name, write_json_atomic, write_shard
from .sources import Item, Source, decode_image, parse_classes

STATE = "prepare_state.json"


@dataclass(frozen=True)
class PrepareOptions:
    source: str
    input: str | None
    split: str = "train"
    resolution: int = 64
    channels: int | None = None        # None: the source's own (1 for mnist/digits, 3 otherwise)
    classes: str | None = None
    shard_size: int = 8192             # images per shard (~100 MB at 64 px RGB)
    chunk_size: int = 256              # images per tar sample; the loader's unit of reading
    limit: int | None = None
    label_field: str | None = None     # webdataset: the .json field holding the label


def decode_chunk(items: list[Item], resolution: int, channels: int):
    """Worker task: decode one chunk; corrupt images are returned as skipped keys, never raised."""
    images, labels, keys, bad = [], [], [], []
    for item in items:
        try:
            images.append(decode_image(item.payload, resolution, channels))
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            bad.append([item.key, f"{type(e).__name__}: {e}"[:200]])
            continue
        labels.append(item.label)
        keys.append(item.key)
    shape = (0, resolution, resolution, channels)
    arr = np.stack(images) if images else np.zeros(shape, np.uint8)
    return arr, np.asarray(labels, dtype=np.int64), keys, bad


def _ordered_map(fn, tasks: Iterable, workers: int, *args) -> Iterator:
    """map(fn) over tasks in order, with at most ~2 tasks per worker in flight (bounded memory:
    multiprocessing.Pool.imap would read the whole source ahead)."""
    if workers <= 1:
        for t in tasks:
            yield fn(t, *args)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending: deque = deque()
        for t in tasks:
            pending.append(pool.submit(fn, t, *args))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _batched(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch


def prepare(src: Source, out: Path, opts: PrepareOptions, workers: int = 1, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Write shards + manifest for ``src`` into ``out``; returns the manifest."""
    channels = opts.channels or src.default_channels
    if channels not in (1, 3):
        raise UserError(f"--channels must be 1 or 3, not {channels}")
    if not 8 <= opts.resolution <= 1024:
        raise UserError(f"--resolution must be between 8 and 1024, not {opts.resolution}")
    if opts.shard_size < 1 or opts.chunk_size < 1 or (opts.limit is not None and opts.limit < 1):
        raise UserError("--shard-size, --chunk-size and --limit must be positive")
    chunk_size = min(opts.chunk_size, opts.shard_size)
    class_ids = parse_classes(opts.classes, src.class_names)

    params = {**asdict(opts), "channels": channels, "chunk_size": chunk_size, "class_ids": class_ids}
    done = _start_or_resume(out, params, overwrite)

    total = len(src)
    items: Iterable[Item] = src.items()
    if class_ids is not None:
        labels = src.labels()
        total = int(np.isin(labels, class_ids).sum())
        items = (it for it in items if it.label in class_ids)
    if opts.limit is not None:
        total = min(total, opts.limit)
        items = itertools.islice(items, opts.limit)
    if total == 0:
        raise UserError(f"{opts.input or opts.source}: no images to convert"
                        + (f" in classes {opts.classes}" if class_ids is not None else ""))

    # Shard i holds source items [i*shard_size, (i+1)*shard_size) minus corrupt ones, so a resumed
    # conversion knows where to continue from the count of finished shards alone.
    start_shard = len(done)
    items = itertools.islice(items, start_shard * opts.shard_size, None)
    t0 = time.time()
    bar = tqdm(total=total, initial=min(total, start_shard * opts.shard_size), unit="img",
               desc=f"{src.name} -> {out}", disable=not progress, smoothing=0.1)

    def tasks():
        for shard_items in _batched(items, opts.shard_size):
            yield from _batched(shard_items, chunk_size)

    results = _ordered_map(decode_chunk, tasks(), workers, opts.resolution, channels)
    shard_index, new_images = start_shard, 0
    remaining = total - start_shard * opts.shard_size
    while remaining > 0:
        n_items = min(opts.shard_size, remaining)
        chunks, bad, seen = [], [], 0
        while seen < n_items:
            result = next(results, None)
            if result is None:      # the source held fewer items than it announced
                remaining = n_items = seen
                break
            images, labels, keys, bad_chunk = result
            seen += len(keys) + len(bad_chunk)
            bad += bad_chunk
            if len(keys):
                chunks.append((f"{shard_index:06d}_{len(chunks):04d}", images, labels, keys))
            bar.update(len(keys) + len(bad_chunk))
        entry = write_shard(out / shard_name(shard_index), chunks) if chunks else {"num_images": 0}
        entry["skipped"] = bad
        write_json_atomic(out / f"shard-{shard_index:06d}.json", entry)
        done.append(entry)
        new_images += entry["num_images"]
        shard_index += 1
        remaining -= n_items
    bar.close()
    elapsed = time.time() - t0

    skipped = [k for e in done for k in e["skipped"]]
    shards = [{k: v for k, v in e.items() if k != "skipped"} for e in done if e["num_images"]]
    num_images = sum(s["num_images"] for s in shards)
    if num_images == 0:
        raise UserError(f"{opts.input or opts.source}: none of the {total} images could be decoded "
                        f"(first error: {skipped[0][1] if skipped else '?'})")
    class_names = src.class_names
    manifest = {
        "format": FORMAT,
        "tool": f"dcgan_dist {__version__}",
        "source": opts.source, "input": opts.input, "split": opts.split,
        "resolution": opts.resolution, "channels": channels,
        "num_images": num_images,
        "class_names": class_names, "classes_kept": class_ids,
        "chunk_size": chunk_size, "shard_size": opts.shard_size,
        "skipped": {"count": len(skipped), "items": skipped},
        "shards": shards,
    }
    write_json_atomic(out / MANIFEST, manifest)
    for i in range(shard_index):
        (out / f"shard-{i:06d}.json").unlink(missing_ok=True)
    (out / STATE).unlink(missing_ok=True)
    manifest["_stats"] = {"seconds": elapsed, "new_images": new_images,
                          "images_per_s": new_images / elapsed if elapsed > 0 else 0.0}
    return manifest


def _start_or_resume(out: Path, params: dict, overwrite: bool) -> list[dict]:
    """Create ``out`` or resume a conversion there; returns the entries of the shards already done."""
    state_path = out / STATE
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if overwrite and out.is_dir():
        for p in out.iterdir():
            if p.name in (MANIFEST, STATE) or p.name.startswith("shard-"):
                p.unlink()
    if (out / MANIFEST).exists():
        raise UserError(f"{out}: already holds a complete dataset ({MANIFEST}); "
                        f"pass --overwrite to rebuild it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"--out {out}: not writable")
    for tmp in out.glob("*.tmp"):          # only what the converter itself writes: shard-*.tar.tmp and its JSON
        if tmp.is_file() and (tmp.name.startswith("shard-") or tmp.name in (f"{MANIFEST}.tmp", f"{STATE}.tmp")):
            tmp.unlink()
    if not state_path.exists():
        if any(out.glob("shard-*")):
            raise UserError(f"{out}: holds shard files but no {STATE} or {MANIFEST}; "
                            f"pass --overwrite to replace them or choose another --out")
        write_json_atomic(state_path, {"params": params})
        return []
    old = json.loads(state_path.read_text())["params"]
    if old != params:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {params.get(k)!r}"
                         for k in sorted(set(old) | set(params)) if old.get(k) != params.get(k))
        raise UserError(f"{out}: holds an interrupted conversion with other settings ({diff}); "
                        f"re-run it with the same settings to resume, or pass --overwrite")
    done = []
    # A shard is done once its sidecar exists (written after its tar is complete) and its tar is there.
    for i in itertools.count():
        side = out / f"shard-{i:06d}.json"
        if not side.exists():
            break
        entry = json.loads(side.read_text())
        if entry["num_images"] and not (out / shard_name(i)).exists():
            break
        done.append(entry)
    for p in out.glob("shard-*"):   # anything past the resume point is rewritten
        idx = int(p.name[6:12])
        if idx >= len(done):
            p.unlink()
    return done
