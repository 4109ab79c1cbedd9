"""Shards on object storage and HTTP: a real S3-compatible server (moto, server mode) and a plain HTTP server
with range requests, both on 127.0.0.1, started and stopped here. Same batches as local shards, exact resume,
retries, clear errors naming the URL, and no credential in anything a run writes."""

import itertools
import logging
import os
import socket
import time

import pytest

from dcgan_dist.data import ShardLoader, load_manifest
from dcgan_dist.data.store import Store
from dcgan_dist.data.synthetic import image_index, serve_http, write_indexed_shards
from dcgan_dist.errors import UserError

SECRET = "s3cr3t-never-written-anywhere"


def batches(root, n, **kw):
    loader = ShardLoader(root, batch_size=16, seed=3, **kw)
    return [image_index(x.numpy()).tolist() for x, _ in itertools.islice(loader, n)]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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
