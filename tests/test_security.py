"""Shards are data, never code: crafted shards and manifests are refused and their payloads never run."""

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest

from dcgan_dist.data import ShardLoader, load_manifest, read_shards
from dcgan_dist.data.shards import MANIFEST, sha256_file
from synthetic import write_indexed_shards
from dcgan_dist.errors import UserError


class Payload:
    """Unpickling this creates the marker file: proof that a shard's pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def add_member(root: Path, shard: str, name: str, data: bytes) -> None:
    """Append a member to a shard and fix the manifest's size and hash, so that only the member is wrong."""
    path = root / shard
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    m = json.loads((root / MANIFEST).read_text())
    entry = next(s for s in m["shards"] if s["name"] == shard)
    entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    (root / MANIFEST).write_text(json.dumps(m))


def edit_manifest(root: Path, edit) -> None:
    m = json.loads((root / MANIFEST).read_text())
    m = edit(m) or m
    (root / MANIFEST).write_text(json.dumps(m))


@pytest.fixture
def shards(tmp_path):
    m = write_indexed_shards(tmp_path / "s", 64, shard_size=32, chunk_size=16)
    return tmp_path / "s", m


@pytest.mark.parametrize("suffix", ["pkl", "pth", "pyd"])
def test_a_pickle_member_is_refused_and_never_unpickled(shards, tmp_path, suffix):
    root, m = shards
    marker = tmp_path / "pwned"
    last_key = m["shards"][0]["chunks"][-1]["key"]
    add_member(root, "shard-000000.tar", f"{last_key}.{suffix}", pickle.dumps(Payload(marker)))
    load_manifest(root, verify="sha256")                       # the manifest itself is consistent
    with pytest.raises(UserError, match=rf"shard-000000.tar: holds {last_key}\.{suffix}, which is not part of"):
        list(read_shards(root))
    assert not marker.exists()


def test_a_pipe_shard_name_never_runs(shards, tmp_path):
    root, _ = shards
    marker = tmp_path / "pwned"
    edit_manifest(root, lambda m: m["shards"][0].update(name=f"pipe:touch {marker} && cat shard-000000.tar"))
    for read in (lambda: list(read_shards(root)), lambda: ShardLoader(root, batch_size=8, num_workers=0)):
        with pytest.raises(UserError, match=r"shards\[0\]\.name is not a plain \.tar file name"):
            read()
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../outside/secret.tar", "/etc/passwd", "sub/shard.tar", ".hidden.tar",
                                  "file:///etc/passwd", "shard..tar", "shard-000000.tar/"])
def test_shard_names_outside_the_folder_are_refused_without_disclosing_anything(shards, tmp_path, name):
    root, _ = shards
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.tar").write_bytes(b"x" * 631)
    edit_manifest(root, lambda m: m["shards"][1].update(name=name))
    with pytest.raises(UserError) as e:
        ShardLoader(root, batch_size=8, num_workers=0)
    message = str(e.value)
    assert message == (f"{root / MANIFEST}: invalid manifest: shards[1].name is not a plain .tar file name inside "
                       f"the shard folder (no paths, no URLs); re-create the shards with prepare_data.py")
    assert "631" not in message and "secret" not in message and "passwd" not in message


@pytest.mark.parametrize("edit, message", [
    (lambda m: [m], "format 'list' is not"),
    (lambda m: m.pop("shards") and None, "invalid manifest: shards must be a list, got NoneType"),
    (lambda m: m.pop("resolution") and None, "invalid manifest: resolution must be a positive integer, got None"),
    (lambda m: m["shards"][0]["chunks"][0].update(n="16"), r"shards\[0\]\.chunks\[0\]\.n must be a positive integer, "
                                                            r"got '16'"),
    (lambda m: m["shards"][0]["chunks"][0].update(images=[0]), r"chunks\[0\]\.images must be \[offset, size\]"),
    (lambda m: m["shards"][1].update(num_images=31), r"shards\[1\]\.num_images is 31 but its chunks hold 32"),
    (lambda m: m.update(num_images=65), "num_images is 65 but the shards hold 64"),
    (lambda m: m["shards"].__setitem__(0, "shard-000000.tar"), r"shards\[0\] must be an object"),
])
def test_a_manifest_of_the_wrong_shape_is_a_one_line_error(shards, edit, message):
    root, _ = shards
    edit_manifest(root, edit)
    with pytest.raises(UserError, match=message) as e:
        ShardLoader(root, batch_size=8, num_workers=0)
    assert "\n" not in str(e.value)


def test_a_manifest_that_is_not_utf8_is_a_one_line_error(shards):
    root, _ = shards
    (root / MANIFEST).write_bytes(b"\xff\xfe{not json")
    with pytest.raises(UserError, match="unreadable manifest"):
        load_manifest(root)


def test_well_formed_shards_still_read_exactly(shards):
    root, _ = shards
    got = list(read_shards(root, with_keys=True))
    assert [label for _, label, _ in got] == list(range(64))
    assert [key for _, _, key in got] == [f"synthetic:{i}" for i in range(64)]
