"""The streaming loader: equal batches on every rank, coverage, exact resume, bad shards."""

import itertools
import os
import shutil
import subprocess
import sys
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import conftest
from conftest import ROOT
from dcgan_dist.data import ShardLoader, load_manifest, to_device
from dcgan_dist.data.shards import MANIFEST, read_shards, write_json_atomic
from synthetic import image_index, write_indexed_shards
from dcgan_dist.errors import UserError

DIST = Path(__file__).parent / "dist" / "loader_ranks.py"


def ids(batches):
    return [image_index(x.numpy()).tolist() for x, _ in batches]


def take(loader, n):
    return list(itertools.islice(loader, n))


def test_every_image_once_per_epoch_single_process(tmp_path):
    write_indexed_shards(tmp_path, 256, shard_size=64, chunk_size=16)
    loader = ShardLoader(tmp_path, batch_size=16, num_workers=2, seed=3)
    assert loader.batches_per_epoch == 16
    batches = ids(take(loader, 32))
    for epoch in (batches[:16], batches[16:]):
        assert sorted(sum(epoch, [])) == list(range(256))
    assert batches[:16] != batches[16:]                          # reshuffled each epoch
    assert loader.epoch == 2 and loader.state_dict() == {"batches": 32}


def test_labels_travel_with_their_images(tmp_path):
    write_indexed_shards(tmp_path, 100, shard_size=30, chunk_size=7)
    for x, y in take(ShardLoader(tmp_path, batch_size=8, num_workers=1), 20):
        assert image_index(x.numpy()).tolist() == y.tolist()


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("start", [1, 5, 11, 23])
def test_restart_at_any_batch_continues_exactly(tmp_path, workers, start):
    write_indexed_shards(tmp_path, 203, shard_size=50, chunk_size=16)       # uneven on purpose
    full = ids(take(ShardLoader(tmp_path, batch_size=8, num_workers=workers, seed=7, shuffle_window=32), 40))
    resumed = ShardLoader(tmp_path, batch_size=8, num_workers=workers, seed=7, shuffle_window=32, start_batch=start)
    assert ids(take(resumed, 40 - start)) == full[start:]


def test_the_batches_do_not_depend_on_the_worker_count(tmp_path):
    """Issue 16 §7: the epoch was cut into one slot per worker, so a resume with another data.workers saw other
    batches. Windows of 7 batches, a short last window per epoch (23 = 3 x 7 + 2): every worker count and every restart gives the one stream of workers = 0."""
    write_indexed_shards(tmp_path, 3000, resolution=8, channels=1, shard_size=700, chunk_size=50)
    kw = dict(batch_size=128, seed=4, shuffle_window=1000)
    reference = ShardLoader(tmp_path, num_workers=0, **kw)
    assert (reference.batches_per_epoch, reference.windows.window_batches, reference.windows.windows_per_epoch) == \
        (23, 7, 4)
    want = ids(take(reference, 60))
    assert sorted(sum(want[:23], [])) != sorted(sum(want[23:46], []))        # 3000 - 23*128 left out, other ones
    for workers in (1, 2, 3, 5):
        for start in (0, 9, 22, 30):
            loader = ShardLoader(tmp_path, num_workers=workers, start_batch=start, **kw)
            assert ids(take(loader, 60 - start)) == want[start:], (workers, start)
            loader.close()


def test_corrupt_chunks_are_counted_and_named_when_used_whatever_the_worker_count(tmp_path, caplog):
    """Found trying issue 16 §7: a window's skips were counted when its first piece arrived, up to two epochs early
    with several workers (metrics rows then differed by worker count), and each worker warned on its own."""
    m = write_indexed_shards(tmp_path, 3000, resolution=8, channels=1, shard_size=700, chunk_size=50)
    chunk = m["shards"][2]["chunks"][3]
    with open(tmp_path / "shard-000002.tar", "r+b") as f:
        f.seek(chunk["images"][0])
        f.write(b"garbage!")
    counts = {}
    for workers in (0, 1, 3):
        loader = ShardLoader(tmp_path, batch_size=128, num_workers=workers, seed=4, shuffle_window=1000)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            counts[workers] = [loader.corrupt_chunks for _ in itertools.islice(loader, 69)]    # 3 epochs of 23
        loader.close()
        assert [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()] == [
            f"skipping corrupt chunk {chunk['key']} in {tmp_path / 'shard-000002.tar'} (50 images): "
            f"{caplog.records[0].getMessage().split('(50 images): ')[1]}"]
    assert counts[0][-1] == 3 and len(set(counts[0])) == 4                   # once per epoch, as it is used
    assert counts[1] == counts[0] and counts[3] == counts[0]


def test_more_workers_than_cores_is_one_warning_line(tmp_path, caplog, monkeypatch):
    """torch warned twice per loader (two places, one long paragraph); the run's log now has one line."""
    import warnings
    write_indexed_shards(tmp_path, 64, shard_size=32, chunk_size=16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loader = ShardLoader(tmp_path, batch_size=8, num_workers=3)      # torch warns from 3 on this 2-core VM
        take(loader, 3)
        loader.close()
    assert [r.getMessage() for r in caplog.records] == [
        "data.workers = 3 loader workers on 1 CPU core(s) that this process may use: they compete with the trainer "
        "for them; fewer workers are likely faster"]
    assert not [w for w in seen if "worker processes" in str(w.message)]


LIBRARY_USE = """from dcgan_dist.data import ShardLoader
loader = ShardLoader({shards!r}, batch_size=8, num_workers=2)
batches = [x for x, _ in zip(loader, range(20))]
print("batches", len(batches), tuple(batches[0][0].shape), sorted(p.pid for p in loader._workers) != [], flush=True)
loader.close()
"""


@pytest.mark.parametrize("how", ["script", "-c", "stdin"])
def test_the_loader_with_workers_runs_from_any_script_without_a_main_guard(tmp_path, how):
    """Issue 24 §3: workers came from a fork server, which imports __main__ again: a script without the
    `if __name__ == "__main__":` guard died (RuntimeError), the same lines from standard input with
    FileNotFoundError '<stdin>'. Workers are now forked from the script itself."""
    write_indexed_shards(tmp_path / "s", 256, shard_size=64, chunk_size=16)
    code = LIBRARY_USE.format(shards=str(tmp_path / "s"))
    (tmp_path / "use.py").write_text(code)
    args = {"script": [str(tmp_path / "use.py")], "-c": ["-c", code], "stdin": ["-"]}[how]
    p = subprocess.run([sys.executable, *args], input=code if how == "stdin" else None, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout == "batches 20 (8, 32, 32, 3) True\n" and p.stderr == ""


def test_the_loader_with_workers_runs_in_a_jupyter_kernel(tmp_path):
    """The same lines in a real IPython kernel (ipykernel, as a notebook runs them), its own threads around."""
    from jupyter_client.manager import start_new_kernel
    write_indexed_shards(tmp_path / "s", 256, shard_size=64, chunk_size=16)
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        out = []
        reply = kc.execute_interactive(LIBRARY_USE.format(shards=str(tmp_path / "s")), timeout=120,
                                       output_hook=lambda msg: out.append(msg["content"]))
        text = "".join(c.get("text", "") for c in out)
        assert reply["content"]["status"] == "ok", (reply["content"], out)
        assert text == "batches 20 (8, 32, 32, 3) True\n", out
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_workers_end_when_the_trainer_is_killed(tmp_path):
    """kill -9 of the process that iterates: its workers end at once (the kernel's parent-death signal), even
    one in the middle of a read; torch's own watchdog only looks now and then, and only between windows."""
    import psutil
    write_indexed_shards(tmp_path / "s", 256, shard_size=64, chunk_size=16)
    script = tmp_path / "script.py"
    script.write_text(f"""import time
from dcgan_dist.data import ShardLoader
loader = ShardLoader({str(tmp_path / "s")!r}, batch_size=8, num_workers=2)
next(iter(loader))
print("ready", flush=True)
time.sleep(600)
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == []
    finally:
        proc.kill()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_workers_outlive_stop_signals_from_others_and_end_on_their_trainers(tmp_path, sig):
    """SLURM signals every process of a job: a worker that died of it would crash its trainer before the
    checkpoint. A worker ignores stop signals from anyone but its trainer; close() (the trainer's SIGTERM) ends
    it, batches keep coming meanwhile."""

    import psutil
    write_indexed_shards(tmp_path, 256, shard_size=64, chunk_size=16)
    loader = ShardLoader(tmp_path, batch_size=8, num_workers=2, shuffle_window=16)
    try:
        it = iter(loader)
        next(it)
        workers = [psutil.Process(p.pid) for p in loader._workers]
        killer = subprocess.run(["kill", f"-{sig[3:]}", *[str(w.pid) for w in workers]])
        assert killer.returncode == 0
        assert len(take(it, 40)) == 40 and all(w.is_running() for w in workers)
    finally:
        loader.close()
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert all(p.exitcode == 0 for p in loader._workers)


def test_same_seed_same_stream_other_seed_other_stream(tmp_path):
    write_indexed_shards(tmp_path, 128, shard_size=32, chunk_size=8)
    a = ids(take(ShardLoader(tmp_path, batch_size=8, num_workers=2, seed=1), 16))
    b = ids(take(ShardLoader(tmp_path, batch_size=8, num_workers=2, seed=1), 16))
    c = ids(take(ShardLoader(tmp_path, batch_size=8, num_workers=2, seed=2), 16))
    assert a == b and a != c


def test_batches_mix_many_chunks(tmp_path):
    """With a 4096-image window and 256-image chunks, a batch of 128 draws from many chunks."""
    write_indexed_shards(tmp_path, 8192, resolution=8, shard_size=2048, chunk_size=256)
    x, _ = next(iter(ShardLoader(tmp_path, batch_size=128, num_workers=0)))
    assert len(set((image_index(x.numpy()) // 256).tolist())) >= 10


def launch_ranks(shards, out, batch, workers, seed, epochs):
    return conftest.launch_ranks(DIST, shards, out, batch, workers, seed, epochs, out=out)


def test_two_ranks_two_workers_even_shards_cover_each_image_once(tmp_path):
    write_indexed_shards(tmp_path / "s", 256, resolution=8, channels=1, shard_size=64, chunk_size=16)
    ranks = launch_ranks(tmp_path / "s", tmp_path / "a", 16, 2, 0, 2)
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert [r["batches_per_epoch"] for r in ranks] == [8, 8]
    assert [len(r["batches"]) for r in ranks] == [16, 16]
    for e in (0, 1):
        seen = sum((b for r in ranks for b in r["batches"][8 * e:8 * e + 8]), [])
        assert sorted(seen) == list(range(256))
    # the same launch again gives the same batches on every rank
    again = launch_ranks(tmp_path / "s", tmp_path / "b", 16, 2, 0, 1)
    assert [r["batches"] for r in again] == [r["batches"][:8] for r in ranks]


def test_two_ranks_uneven_and_fewer_shards_than_slots(tmp_path):
    """3 shards of 60/60/23 images for 2 ranks x 2 workers: equal batch counts, few images left out."""
    write_indexed_shards(tmp_path / "s", 143, resolution=8, channels=1, shard_size=60, chunk_size=16)
    ranks = launch_ranks(tmp_path / "s", tmp_path / "a", 8, 2, 5, 1)
    assert [len(r["batches"]) for r in ranks] == [8, 8]         # 143 // (2 ranks * 8) = 8 a rank
    seen = sum((b for r in ranks for b in r["batches"]), [])
    assert len(seen) == len(set(seen)) == 128                   # no repeats; 15 (< 2*8) left out this epoch


def test_too_small_dataset_is_a_clear_error(tmp_path):
    write_indexed_shards(tmp_path, 20, shard_size=20)
    with pytest.raises(UserError, match="20 images cannot fill one batch of 16 for each of 2 ranks; lower the batch size"):
        ShardLoader(tmp_path, batch_size=16, world_size=2, num_workers=1)


def test_missing_truncated_and_mismatched_shards_fail_before_training(tmp_path):
    write_indexed_shards(tmp_path, 64, shard_size=32)
    shard = tmp_path / "shard-000001.tar"
    with pytest.raises(UserError, match="resolution 32 but the run asks for 64"):
        ShardLoader(tmp_path, batch_size=8, resolution=64)
    with pytest.raises(UserError, match="channels 3 but the run asks for 1"):
        ShardLoader(tmp_path, batch_size=8, channels=1)
    data = shard.read_bytes()
    flipped = bytearray(data)
    flipped[-2000] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    load_manifest(tmp_path, verify="size")                      # same size: only the hash can tell
    with pytest.raises(UserError, match="shard-000001.tar: sha256 differs"):
        ShardLoader(tmp_path, batch_size=8, verify="sha256")
    shard.write_bytes(data[:5000])
    with pytest.raises(UserError, match="shard-000001.tar: 5000 bytes, manifest says"):
        ShardLoader(tmp_path, batch_size=8)
    shard.unlink()
    with pytest.raises(UserError, match="shard-000001.tar: shard listed in .* is missing"):
        ShardLoader(tmp_path, batch_size=8)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(UserError, match="no manifest"):
        ShardLoader(tmp_path, batch_size=8)


def test_corrupt_member_is_skipped_counted_and_named(tmp_path, caplog):
    m = write_indexed_shards(tmp_path, 64, shard_size=32, chunk_size=16)
    chunk = m["shards"][1]["chunks"][0]
    with open(tmp_path / "shard-000001.tar", "r+b") as f:
        f.seek(chunk["images"][0])
        f.write(b"garbage!")                                     # destroys the npy header
    loader = ShardLoader(tmp_path, batch_size=8, num_workers=0, seed=0)
    with caplog.at_level(logging.WARNING):
        batches = take(loader, loader.batches_per_epoch)
    assert len(batches) == 8 and all(len(x) == 8 for x, _ in batches)
    assert loader.corrupt_chunks == 1
    assert f"skipping corrupt chunk {chunk['key']} in {tmp_path / 'shard-000001.tar'}" in caplog.text
    seen = set(sum(ids(batches), []))
    assert not seen & set(range(32, 48))                         # the corrupt chunk's images never appear


def _epoch_ids(root, **kw):
    loader = ShardLoader(root, batch_size=8, num_workers=0, seed=0, **kw)
    batches = take(loader, loader.batches_per_epoch)
    assert len(batches) == loader.batches_per_epoch and all(len(x) == 8 for x, _ in batches)
    return loader, sum(ids(batches), [])


def test_same_size_byte_changes_are_caught_by_the_chunk_checksum(tmp_path, caplog):
    """Issue 9 §3: pixels overwritten inside a shard (size unchanged) used to be trained on silently."""
    m = write_indexed_shards(tmp_path, 64, shard_size=32, chunk_size=16)
    chunk = m["shards"][1]["chunks"][1]                          # images 48..63
    with open(tmp_path / "shard-000001.tar", "r+b") as f:
        f.seek(chunk["images"][0] + chunk["images"][1] - 4096)  # inside the pixels, the npy header intact
        f.write(b"\xff" * 4096)
    with caplog.at_level(logging.WARNING):
        loader, seen = _epoch_ids(tmp_path)
    assert loader.corrupt_chunks == 1
    assert f"skipping corrupt chunk {chunk['key']}" in caplog.text and "checksum differs" in caplog.text
    assert not set(seen) & set(range(48, 64)) and set(range(48)) <= set(seen)
    with pytest.raises(UserError, match=f"chunk {chunk['key']} differs from the manifest's checksum"):
        list(read_shards(tmp_path))
    loader, seen = _epoch_ids(tmp_path, verify="none")            # the switch that turns every check off
    assert loader.corrupt_chunks == 0 and 0xFFFFFF in seen     # image 63, now all white, is trained on


def test_a_shard_replaced_by_a_same_size_copy_of_another_is_caught(tmp_path):
    write_indexed_shards(tmp_path, 96, shard_size=32, chunk_size=16)
    (tmp_path / "shard-000000.tar").write_bytes((tmp_path / "shard-000002.tar").read_bytes())
    load_manifest(tmp_path)                                       # same sizes: the up-front check passes
    loader, seen = _epoch_ids(tmp_path)
    assert loader.corrupt_chunks == 2
    assert not set(seen) & set(range(32)) and set(seen) == set(range(32, 96))


def test_manifests_without_chunk_checksums_still_load(tmp_path):
    m = write_indexed_shards(tmp_path, 64, shard_size=32, chunk_size=16)
    for shard in m["shards"]:
        for c in shard["chunks"]:
            assert isinstance(c.pop("crc32"), int)
    write_json_atomic(tmp_path / MANIFEST, m)
    loader, seen = _epoch_ids(tmp_path)
    assert loader.corrupt_chunks == 0 and sorted(seen) == list(range(64))
    assert len(list(read_shards(tmp_path))) == 64


def test_to_device_maps_uint8_to_minus_one_one_channels_last():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 1, 3, 1).expand(2, 4, 3, 3).contiguous()
    y = to_device(x, "cpu")
    assert y.shape == (2, 3, 4, 3) and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert y[0, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    assert to_device(x, "cpu", channels_last=False).is_contiguous()


def test_a_script_that_exits_with_a_live_loader_does_not_hang(tmp_path):
    """Workers ignore SIGTERM; multiprocessing's exit handler would wait on them forever without the loader's
    own exit hook."""
    import subprocess
    import sys
    write_indexed_shards(tmp_path, 64, shard_size=32, chunk_size=16)
    code = ("import sys; from dcgan_dist.data import ShardLoader; "
            "loader = ShardLoader(sys.argv[1], batch_size=8, num_workers=2); it = iter(loader); next(it); "
            "raise SystemExit(7)")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=60, capture_output=True)
    assert p.returncode == 7


@pytest.mark.parametrize("workers", [0, 2])
def test_close_leaves_no_thread_or_worker_of_the_loader_running(tmp_path, workers):
    """A daemon thread still running when the interpreter finalizes can abort the process (SIGABRT, "terminate
    called without an active exception"): after close() the window-reading thread (0 workers) and the workers
    are gone."""
    import threading
    import time
    write_indexed_shards(tmp_path, 256, shard_size=64, chunk_size=16)
    before = set(threading.enumerate())
    for _ in range(3):
        loader = ShardLoader(tmp_path, batch_size=16, num_workers=workers, shuffle_window=64)
        next(iter(loader))
        loader.close()
        deadline = time.monotonic() + 5      # multiprocessing's queue threads end once their queue is closed
        while set(threading.enumerate()) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(threading.enumerate()) - before == set()
        assert len(loader._workers) == workers and not any(p.is_alive() for p in loader._workers)


@pytest.mark.parametrize("array", [np.arange(7 * 4 * 4 * 3, dtype=np.uint8).reshape(7, 4, 4, 3),
                                   np.arange(5, dtype=np.int64), np.asfortranarray(np.arange(12.0).reshape(3, 4)),
                                   np.zeros((0, 2, 2, 1), dtype=np.uint8)])
def test_npy_view_reads_what_numpy_wrote_without_copying(array):
    import io

    from dcgan_dist.data.shards import npy_view
    buf = io.BytesIO()
    np.save(buf, array)
    raw = buf.getvalue()
    view = npy_view(memoryview(raw))
    assert view.dtype == array.dtype and view.shape == array.shape and np.array_equal(view, array)
    assert not view.flags.writeable                                # a view of the fetched bytes, not a copy
    with pytest.raises(ValueError, match="data bytes" if array.size else None):
        npy_view(raw[:-1])                                         # truncated data (or, when empty, header)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickles"):
        npy_view(pickled.getvalue())


def test_window_shuffle_is_concatenate_then_permute():
    from dcgan_dist.data.windows import _shuffle_into
    rng = np.random.default_rng(0)
    pieces = [(rng.integers(0, 256, (n, 2, 2, 3), dtype=np.uint8), rng.integers(0, 10, n)) for n in (5, 16, 1, 9)]
    x, y = np.empty((31, 2, 2, 3), dtype=np.uint8), np.empty(31, dtype=np.int64)
    _shuffle_into(pieces, np.random.default_rng([4, 1, 2]), x, y)
    perm = np.random.default_rng([4, 1, 2]).permutation(31)
    assert np.array_equal(x, np.concatenate([p[0] for p in pieces])[perm])
    assert np.array_equal(y, np.concatenate([p[1] for p in pieces])[perm]) and y.dtype == np.int64


@pytest.mark.parametrize("soft, hard", [(16, 16), (16, 4096)])
def test_a_low_open_file_limit_is_one_line_or_raised_never_a_hang_or_a_flood(tiny, tmp_path, soft, hard):
    """Issue 16 §3: with ulimit -n 16 a loader worker's batches were lost in its queue thread ("Too many open files"
    again and again) and the trainer waited forever. A hard limit too low is one line; a soft one is raised."""
    import resource
    import subprocess
    import sys
    import time
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, str(conftest.ROOT / "launch" / "train.py"), "--config", str(tiny),
                            "--set", f'runs_dir="{tmp_path}"', "--set", "data.workers=1"], cwd=conftest.ROOT,
                           capture_output=True, text=True, timeout=90,
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"no end after 90 s; {len(e.stderr or b'')} bytes on stderr")
    assert len(p.stderr) < 20_000 and time.monotonic() - t0 < 90
    if soft == hard:
        assert p.returncode == 2, p.stderr[-3000:]
        assert p.stderr.strip().splitlines()[-1] == (
            "error: Too many open files would follow: the limit of open files (ulimit -n) is 16, and 1 loader "
            "worker(s) need about 144; raise the limit of open files with ulimit -n (e.g. ulimit -n 4096) or set "
            "fewer data.workers")
        assert "Traceback" not in p.stderr
    else:
        assert p.returncode == 0 and "done: step 6" in p.stdout, p.stderr[-3000:]


def test_too_many_open_files_while_reading_a_shard_is_not_a_corrupt_chunk(tmp_path, monkeypatch):
    """It used to be skipped as corrupt (a warning per chunk), then 'every chunk of a loader window is corrupt'."""
    import errno
    import os

    from dcgan_dist.data import store
    write_indexed_shards(tmp_path, 64, shard_size=32, chunk_size=16)
    loader = ShardLoader(tmp_path, batch_size=8, num_workers=0)

    def no_more_files(*args, **kw):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    monkeypatch.setattr(store.os, "open", no_more_files)
    with pytest.raises(UserError, match=r"shard-00000[01].tar: Too many open files while reading it; raise the limit "
                                        r"of open files with ulimit -n"):
        next(iter(loader))
    assert loader.corrupt_chunks == 0
    loader.close()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="mounts a tiny /dev/shm in its own "
                    "mount namespace (root, util-linux unshare)")
def test_a_full_dev_shm_is_one_line_naming_it_never_a_hang(tiny, tmp_path):
    """A 64 KiB /dev/shm (a container's default is 64 MiB) in a private mount namespace: the shared machine's is
    untouched. Before: the worker's queue thread failed to allocate, the worker lived on, the trainer waited
    forever."""
    script = (f'mount -t tmpfs -o size=64k tmpfs /dev/shm && exec {sys.executable} {ROOT}/launch/train.py --config '
              f'{tiny} --set runs_dir=\\"{tmp_path}\\" --set data.workers=2')
    p = subprocess.run(["unshare", "--mount", "bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: shared memory (/dev/shm) is full: loader workers hand batches to the trainer")
    assert last.endswith("or set data.workers = 0") and "Traceback" not in p.stderr



def test_a_read_that_never_returns_is_an_error_after_batch_timeout_s_never_a_hang(tiny, monkeypatch):
    """workers=0: the read runs in a thread of the trainer's process; one that blocks for ever (a hung network file
    system) ends the wait for the batch after batch_timeout_s, naming this process."""
    import threading
    from dcgan_dist.config import load_config
    from dcgan_dist.data import windows
    monkeypatch.setattr(windows, "read_chunk", lambda *a, **k: threading.Event().wait())
    loader = ShardLoader(load_config(tiny).data.shards, batch_size=16, num_workers=0, batch_timeout_s=1)
    try:
        with pytest.raises(UserError) as e:
            next(iter(loader))
    finally:
        loader.close()
    assert str(e.value).startswith(f"{loader.root}: no batch for 1 s (data.batch_timeout_s) at batch 0: the reads "
                                   f"in this process (pid {os.getpid()}) returned nothing;")


def test_a_worker_that_stops_answering_ends_the_run_with_one_line_naming_its_pid(tiny, tmp_path):
    """A loader worker that is alive but silent (SIGSTOP: as a worker deadlocked at its start, or stuck in a read)
    used to leave the trainer waiting for its next batch for ever. Now: exit 2 after data.batch_timeout_s, one line
    naming the setting and the worker's pid."""
    import signal
    import time

    import psutil
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(tiny),
                             "--set", f'runs_dir="{tmp_path}"', "--set", "data.workers=1", "--set", "train.max_steps=100000",
                             "--set", "data.batch_timeout_s=3"], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        t0, workers, metrics = time.monotonic(), [], tmp_path / "tiny" / "metrics.jsonl"
        # after the first logged steps (before, a loaded machine could pass the 3 s waiting for the first batch,
        # and the worker was gone when the test stopped it: CI, 2026-12-01)
        while not (metrics.exists() and metrics.read_text()) and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 1, proc.communicate(timeout=60)[1][-2000:]
        workers[0].send_signal(signal.SIGSTOP)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and ": no batch for 3 s (data.batch_timeout_s) at batch " in last
    assert f"its worker(s) (pid {workers[0].pid}) are alive and sent nothing" in last
    assert last.endswith("raise data.batch_timeout_s") and "Traceback" not in err
    assert "resource_tracker" not in err          # its warnings about the killed worker's semaphores came after it
    assert not psutil.pid_exists(workers[0].pid) or workers[0].status() == psutil.STATUS_ZOMBIE


def test_close_returns_when_a_killed_worker_held_the_done_events_lock(tiny):
    """Each worker takes the lock of the DataLoader's done event between batches; killed while holding it, it
    left torch's shutdown (Event.set) blocked for ever, and so the trainer's exit (found in the clean clone's
    suite). Holding that lock here stands in for the dead worker: close() must still return at once."""
    import threading
    from dcgan_dist.config import load_config
    loader = ShardLoader(load_config(tiny).data.shards, batch_size=16, num_workers=1)
    next(iter(loader))
    it = loader._it
    assert it._workers_done_event._cond._lock.acquire(timeout=10)         # as a worker killed inside is_set()
    closing = threading.Thread(target=loader.close, daemon=True)
    closing.start()
    closing.join(30)
    assert not closing.is_alive() and not any(w.is_alive() for w in it._workers)
    it._workers_done_event._cond._lock.release()      # else torch's shutdown blocks where this test drops `it`


@pytest.mark.parametrize("workers", [0, 2])
def test_a_closed_loader_iterated_again_continues_where_it_stopped(tmp_path, workers):
    """close() ends the workers; iterating again forks new ones that start at the batch the loader had reached."""
    write_indexed_shards(tmp_path, 203, shard_size=50, chunk_size=16)
    kw = dict(batch_size=8, num_workers=workers, seed=7, shuffle_window=32)
    full = ids(take(ShardLoader(tmp_path, **kw), 30))
    loader = ShardLoader(tmp_path, **kw)
    first = ids(take(loader, 13))
    loader.close()
    assert first + ids(take(loader, 17)) == full and loader.batches == 30
    loader.close()
