"""Shards on object storage and HTTP: a real S3-compatible server (moto, server mode) and a plain HTTP server
with range requests, both on 127.0.0.1, started and stopped here. Same batches as local shards, exact resume,
retries, clear errors naming the URL, and no credential in anything a run writes."""

import itertools
import logging
import os
import time

import pytest

from conftest import free_port
from dcgan_dist.data import ShardLoader, load_manifest
from dcgan_dist.data.store import Store
from synthetic import image_index, serve_http, write_indexed_shards
from dcgan_dist.errors import UserError

SECRET = "s3cr3t-never-written-anywhere"


def batches(root, n, **kw):
    """The image ids of the first n batches. The loader is closed: left open, its feeder thread (0 workers) went
    on reading from a server the test then shut down, its retries' warnings landing in the next test's log."""
    loader = ShardLoader(root, batch_size=16, seed=3, **kw)
    try:
        return [image_index(x.numpy()).tolist() for x, _ in itertools.islice(loader, n)]
    finally:
        loader.close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-shards")
    write_indexed_shards(root, 256, shard_size=64, chunk_size=16)
    return root


def test_http_shards_give_the_local_batches_and_resume_exactly(shards):
    url, server = serve_http(shards, latency=0.005)
    try:
        local = batches(shards, 40, num_workers=2)
        assert batches(url, 40, num_workers=2) == local
        assert batches(url, 23, num_workers=2, start_batch=17) == local[17:]
        assert batches(url + "/", 16, num_workers=0) == batches(shards, 16, num_workers=0)
        assert server.requests > 16                               # range requests, not whole files
    finally:
        server.shutdown()


def test_a_flaky_server_is_retried_with_backoff(shards, caplog):
    url, server = serve_http(shards, fail_first=3)
    try:
        with caplog.at_level(logging.WARNING):
            assert batches(url, 16, num_workers=0) == batches(shards, 16, num_workers=0)
        assert server.failures == 3 and caplog.text.count("retrying in") == 3
    finally:
        server.shutdown()


def test_unreachable_or_missing_shards_are_clear_errors_naming_the_url(shards):
    url = f"http://127.0.0.1:{free_port()}/data"
    t0 = time.time()
    with pytest.raises(UserError, match=f"{url}/manifest.json: unreachable after 3 tries"):
        Store(url, retries=2, backoff=0.05).read_bytes("manifest.json")
    assert time.time() - t0 < 10
    with pytest.raises(UserError, match=f"{url}/manifest.json: unreachable after"):
        load_manifest(url)
    served, server = serve_http(shards)
    try:
        with pytest.raises(UserError, match=f"{served}/nowhere/manifest.json: no manifest"):
            load_manifest(served + "/nowhere")
        with pytest.raises(UserError, match=f"{served}/shard-000009.tar: FileNotFoundError while reading bytes"):
            Store(served).read_range("shard-000009.tar", 0, 10)
    finally:
        server.shutdown()
    with pytest.raises(UserError, match="^data.shards: https://example.org/...: credentials in the URL") as e:
        Store(f"https://user:{SECRET}@example.org/shards")
    assert SECRET not in str(e.value)
    with pytest.raises(UserError, match="unknown scheme"):
        Store("ftp://example.org/shards")


@pytest.fixture(scope="module")
def s3(shards):
    """moto's S3 server on 127.0.0.1 with the shards uploaded to s3://dcgan/tiny and s3://dcgan/indexed."""
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()


def upload(folder, prefix):
    import boto3
    client = boto3.client("s3")
    if "dcgan" not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket="dcgan")
    for f in folder.iterdir():
        client.upload_file(str(f), "dcgan", f"{prefix}/{f.name}")


def test_s3_shards_give_the_local_batches(shards, s3):
    upload(shards, "indexed")
    assert batches("s3://dcgan/indexed", 24, num_workers=1) == batches(shards, 24, num_workers=1)


def test_training_on_s3_writes_no_credential_anywhere(tiny, tmp_path, s3, cli):
    from dcgan_dist.config import load_config
    cfg = load_config(tiny)
    upload(__import__("pathlib").Path(cfg.data.shards), "tiny")
    p = cli("train.py", "--config", tiny, "--set", f'runs_dir="{tmp_path}"', "--set", 'data.shards="s3://dcgan/tiny"',
            "--set", 'log.wandb="offline"', "--set", "checkpoint.every=3", env=s3)
    assert "done: step 6" in p.stdout and SECRET not in p.stdout + p.stderr
    run = tmp_path / "tiny"
    assert 's3://dcgan/tiny' in (run / "config.toml").read_text()
    files = [f for f in run.rglob("*") if f.is_file()]
    assert len(files) > 20 and any("wandb" in str(f) for f in files)
    assert not [f for f in files if SECRET.encode() in f.read_bytes()]


def test_the_local_cache_serves_later_epochs_and_stays_within_its_size(shards, tmp_path):
    url, server = serve_http(shards)
    try:
        first = batches(url, 16, num_workers=0, cache_dir=str(tmp_path / "cache"), cache_gb=1.0)
        fetched = server.requests
        again = batches(url, 16, num_workers=2, cache_dir=str(tmp_path / "cache"), cache_gb=1.0)
        assert again[:16] == batches(shards, 16, num_workers=2) and first == batches(shards, 16, num_workers=0)
        assert server.requests - fetched <= 12          # the manifest and sizes again, no chunk range
        (folder,) = (tmp_path / "cache").iterdir()      # one folder per shard set (its fingerprint)
        assert len(list(folder.iterdir())) == 16        # the 16 chunks, one file each
        small = tmp_path / "small"
        batches(url, 16, num_workers=0, cache_dir=str(small), cache_gb=200_000 / 1e9)
        (folder,) = small.iterdir()
        assert sum(f.stat().st_size for f in folder.iterdir()) <= 200_000 + 50_000    # ~4 chunks of 49 KB
    finally:
        server.shutdown()


def test_a_server_that_accepts_and_never_answers_is_an_error_naming_the_url_within_the_deadline(shards):
    """Issue 16 §2: each request is bounded (data.timeout_s) and so is each read with its retries (data.deadline_s);
    fsspec alone waited 300 s per try, 5 tries."""
    from dcgan_dist.data.store import set_limits
    url, server = serve_http(shards, hang=True)
    set_limits(0.5, 2.0)
    try:
        store = Store(url)
        t0 = time.monotonic()
        with pytest.raises(UserError, match=rf"^{url}/shard-000000.tar: unreachable after \d tries in [12]\.\d s while "
                                            r"reading bytes 0-10 \(TimeoutError: no answer within [\d.]+ s\); a request "
                                            r"may take data.timeout_s = 0.5 s, .* data.deadline_s = 2 s") as e:
            store.read_range("shard-000000.tar", 0, 10)
        assert time.monotonic() - t0 < 3.0
        tries = int(str(e.value).split(" tries in ")[0].rsplit(" ", 1)[1])
        while server.ranges < tries and time.monotonic() - t0 < 10:   # a loaded machine runs its handlers late
            time.sleep(0.05)
        # 3 tries (0.5 s each, 0.25 and 0.5 s between) when idle; under load the third would have < 0.1 s: not made
        assert tries in (2, 3) and server.ranges == tries, (tries, server.ranges)
        assert "no answer within -" not in str(e.value)
    finally:
        set_limits(30, 120)
        server.shutdown()


def _train_on(url, tiny, tmp_path, *sets):
    import subprocess
    import sys

    from conftest import ROOT
    args = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(tiny), "--set", f'runs_dir="{tmp_path}"',
            "--set", f'data.shards="{url}"', *[a for s in sets for a in ("--set", s)]]
    return subprocess.Popen(args, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("workers", [0, 1])          # 1: not "Caught UserError in DataLoader worker process 0"
def test_a_hung_shard_server_ends_the_run_with_one_line_and_exit_2(tiny, tmp_path, workers):
    from dcgan_dist.config import load_config
    url, server = serve_http(load_config(tiny).data.shards, hang=True)
    try:
        t0 = time.monotonic()
        proc = _train_on(url, tiny, tmp_path, "data.timeout_s=1", "data.deadline_s=3", f"data.workers={workers}")
        out, err = proc.communicate(timeout=120)
        ranges_at_end = server.ranges
    finally:
        proc.kill()
        server.shutdown()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {url}/shard-0000") and "TimeoutError: no answer within" in last
    assert "Traceback" not in err and "Caught" not in err and ranges_at_end >= 3
    assert time.monotonic() - t0 < 60            # start-up (~10 s here) + the 3 s deadline, not 5 x 300 s


@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_while_the_shard_server_hangs_stops_the_run_at_once_with_exit_75(tiny, tmp_path, workers):
    """Issue 16 §2: the main process waited in the loader's queue and never looked at the stop request."""
    import signal
    from dcgan_dist.config import load_config
    url, server = serve_http(load_config(tiny).data.shards, hang=True)
    try:
        proc = _train_on(url, tiny, tmp_path, f"data.workers={workers}")      # default bounds: 30 s, 120 s
        t0 = time.monotonic()
        while server.ranges == 0 and proc.poll() is None and time.monotonic() - t0 < 90:
            time.sleep(0.1)
        time.sleep(0.5)
        assert proc.poll() is None and server.ranges > 0
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        proc.kill()
        server.shutdown()
    assert proc.returncode == 75, err[-3000:]
    assert out.strip().splitlines()[-1] == (f"stopped by signal while waiting for data from {url}; run the same "
                                            f"command again to resume from the newest checkpoint (none yet: from "
                                            f"the start)")
    # the unfixed trainer waited for the request's 30-s timeout and its retries; what remains is the 1-s grace, the
    # loader's close and the interpreter's teardown (2.5 s of the 4.2 s measured on a slow 2-core VM, 2026-12-01)
    assert took < 15 and "Traceback" not in err


def test_without_the_remote_extra_an_http_folder_is_one_line_at_once(monkeypatch, caplog):
    """Issue 16: a missing package was retried as a network failure ("unreachable after 5 tries")."""
    import fsspec
    calls = []

    def missing(*args, **kw):
        calls.append(args)
        raise ImportError('HTTPFileSystem requires "requests" and "aiohttp" to be installed')
    monkeypatch.setattr(fsspec, "filesystem", missing)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        with pytest.raises(UserError, match=r'^data.shards = http://127.0.0.1:9/data: HTTPFileSystem requires "requests" '
                                            r'and "aiohttp" to be installed; install the remote extra: '
                                            r'pip install -e "\.\[remote\]"$'):
            load_manifest("http://127.0.0.1:9/data")
    assert len(calls) == 1 and "retrying" not in caplog.text and time.monotonic() - t0 < 1


def test_a_transiently_corrupted_remote_chunk_is_fetched_again_not_skipped(shards, tmp_path):
    """Issue 16: one bad transfer made a chunk 'corrupt' for good (and the cache kept the bad copy)."""
    url, server = serve_http(shards, corrupt_first=1)
    try:
        loader = ShardLoader(url, batch_size=16, seed=3, num_workers=0, cache_dir=str(tmp_path), cache_gb=1.0)
        got = [image_index(x.numpy()).tolist() for x, _ in itertools.islice(loader, 16)]
        loader.close()
    finally:
        server.shutdown()
    assert server.corrupted == 1 and loader.corrupt_chunks == 0
    assert got == batches(shards, 16, num_workers=0)                 # every image of the epoch, none repeated
