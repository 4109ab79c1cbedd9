"""The converter: public formats in, exact shards out; filtering, corrupt inputs, atomic and resumed writes."""

import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from dcgan_dist.data import load_manifest, read_shards
from dcgan_dist.data.prepare import STATE, PrepareOptions, prepare
from dcgan_dist.data.shards import sha256_file
from dcgan_dist.data.sources import open_source
from synthetic import CIFAR_CLASSES, write_cifar10, write_lsun, write_mnist
from dcgan_dist.errors import UserError


def cifar_reference(archive):
    """The fixture's pixels and labels, read independently of the converter."""
    images, labels = [], []
    with tarfile.open(archive) as tar:
        for i in range(1, 6):
            b = pickle.loads(tar.extractfile(f"cifar-10-batches-py/data_batch_{i}").read(), encoding="bytes")
            images.append(b[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += b[b"labels"]
    return np.concatenate(images), np.array(labels)


def test_cifar10_archive_round_trip_is_pixel_exact(tmp_path, cli):
    archive = write_cifar10(tmp_path / "src", n_per_batch=30)
    cli("prepare_data.py", "cifar10", "--input", archive, "--out", tmp_path / "out", "--resolution", 32,
        "--shard-size", 64, "--chunk-size", 16, "--workers", 2)
    ref_x, ref_y = cifar_reference(archive)
    got = list(read_shards(tmp_path / "out"))
    assert len(got) == 150
    assert np.array_equal(np.stack([x for x, _ in got]), ref_x)
    assert [y for _, y in got] == ref_y.tolist()
    m = load_manifest(tmp_path / "out", verify="sha256")
    assert m["num_images"] == 150 and m["resolution"] == 32 and m["channels"] == 3
    assert m["class_names"] == CIFAR_CLASSES
    assert [s["num_images"] for s in m["shards"]] == [64, 64, 22]
    for s in m["shards"]:
        assert s["sha256"] == sha256_file(tmp_path / "out" / s["name"])


def test_cifar10_extracted_folder_and_test_split(tmp_path, cli):
    folder = write_cifar10(tmp_path / "src", n_per_batch=10, as_archive=False)
    cli("prepare_data.py", "cifar10", "--input", folder, "--out", tmp_path / "out", "--resolution", 32,
        "--split", "test")
    b = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
    got = list(read_shards(tmp_path / "out"))
    assert np.array_equal(np.stack([x for x, _ in got]), b[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


@pytest.mark.parametrize("spec, kept", [("cat", [3]), ("3,5", [3, 5]), ("dog,1", [1, 5])])
def test_cifar10_class_filter(tmp_path, spec, kept):
    archive = write_cifar10(tmp_path / "src", n_per_batch=40)
    ref_x, ref_y = cifar_reference(archive)
    m = prepare(open_source("cifar10", archive), tmp_path / "out",
                PrepareOptions("cifar10", str(archive), resolution=32, classes=spec), progress=False)
    mask = np.isin(ref_y, kept)
    got = list(read_shards(tmp_path / "out"))
    assert m["num_images"] == mask.sum() == len(got)
    assert m["classes_kept"] == kept
    assert np.array_equal(np.stack([x for x, _ in got]), ref_x[mask])
    assert sorted({y for _, y in got}) == kept


def test_unknown_class_is_a_one_line_error(tmp_path, cli):
    archive = write_cifar10(tmp_path / "src", n_per_batch=5)
    p = cli("prepare_data.py", "cifar10", "--input", archive, "--out", tmp_path / "o", "--classes", "kitten",
            check=False)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "unknown class 'kitten'" in p.stderr and "cat" in p.stderr


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_round_trip_at_native_28px(tmp_path, gz):
    write_mnist(tmp_path / "src", n=40, gz=gz)
    import gzip
    opener = gzip.open if gz else open
    with opener(tmp_path / "src" / ("train-images-idx3-ubyte" + (".gz" if gz else "")), "rb") as f:
        ref = np.frombuffer(f.read()[16:], np.uint8).reshape(40, 28, 28, 1)
    with opener(tmp_path / "src" / ("train-labels-idx1-ubyte" + (".gz" if gz else "")), "rb") as f:
        ref_y = np.frombuffer(f.read()[8:], np.uint8)
    prepare(open_source("mnist", tmp_path / "src"), tmp_path / "out",
            PrepareOptions("mnist", None, resolution=28), progress=False)
    got = list(read_shards(tmp_path / "out"))
    assert np.array_equal(np.stack([x for x, _ in got]), ref)
    assert [y for _, y in got] == ref_y.tolist()


def test_mnist_to_three_channels_and_32px(tmp_path):
    write_mnist(tmp_path / "src", n=10, split="test")
    src = open_source("mnist", tmp_path / "src", split="test")
    prepare(src, tmp_path / "rgb", PrepareOptions("mnist", None, "test", resolution=28, channels=3), progress=False)
    x = np.stack([x for x, _ in read_shards(tmp_path / "rgb")])
    assert x.shape == (10, 28, 28, 3)
    assert np.array_equal(x[..., 0], src.images) and np.array_equal(x[..., 2], src.images)
    prepare(src, tmp_path / "up", PrepareOptions("mnist", None, "test", resolution=32), progress=False)
    assert next(read_shards(tmp_path / "up"))[0].shape == (32, 32, 1)


def test_lsun_webp_lmdb_skips_and_records_corrupt_values(tmp_path, cli):
    write_lsun(tmp_path / "bedroom_train_lmdb", n=24, corrupt=3)
    p = cli("prepare_data.py", "lsun", "--input", tmp_path / "bedroom_train_lmdb", "--out", tmp_path / "out",
            "--resolution", 64, "--shard-size", 10, "--workers", 2)
    assert "skipped 3 corrupt" in p.stdout
    m = load_manifest(tmp_path / "out", verify="sha256")
    assert m["num_images"] == 21 and m["skipped"]["count"] == 3
    assert all(len(k) == 40 for k, _ in m["skipped"]["items"])        # the hex keys of the bad values
    # shard i holds lmdb items [10i, 10i+10) (key order) minus the corrupt ones among them
    import lmdb
    with lmdb.open(str(tmp_path / "bedroom_train_lmdb"), readonly=True, lock=False).begin() as txn:
        order = [k.decode() for k, _ in txn.cursor()]
    bad_pos = [order.index(k) for k, _ in m["skipped"]["items"]]
    assert [s["num_images"] for s in m["shards"]] == [10 - sum(lo <= p < lo + 10 for p in bad_pos)
                                                      for lo in (0, 10, 20)][:2] + [4 - sum(p >= 20 for p in bad_pos)]
    keys = [k for _, _, k in read_shards(tmp_path / "out", with_keys=True)]
    assert not set(keys) & {k for k, _ in m["skipped"]["items"]}
    x = next(read_shards(tmp_path / "out"))[0]
    assert x.shape == (64, 64, 3) and x.dtype == np.uint8


def test_center_crop_then_antialiased_resize(tmp_path):
    """A 60x100 image with red 20-px bands on the long sides: the center crop drops them exactly."""
    img = np.zeros((60, 100, 3), np.uint8)
    img[:, :, 2] = 200
    img[:, :20] = img[:, 80:] = (255, 0, 0)
    (tmp_path / "src").mkdir()
    Image.fromarray(img).save(tmp_path / "src" / "a.png")
    prepare(open_source("folder", tmp_path / "src"), tmp_path / "out",
            PrepareOptions("folder", None, resolution=32), progress=False)
    x = next(read_shards(tmp_path / "out"))[0]
    assert x.shape == (32, 32, 3)
    assert (x[..., 0] == 0).all() and (x[..., 2] == 200).all()


def _folder_images(tmp_path, files: dict, channels: int = 3) -> dict:
    """Write ``{name: writer(path)}`` into a folder, convert it at 32 px, return ``{name: pixels}``."""
    src = tmp_path / f"src{channels}"
    src.mkdir()
    for name, write in files.items():
        write(src / name)
    prepare(open_source("folder", src), tmp_path / f"out{channels}",
            PrepareOptions("folder", None, resolution=32, channels=channels), progress=False)
    return {key: x for x, _, key in read_shards(tmp_path / f"out{channels}", with_keys=True)}


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_16_bit_grey_png_is_scaled_not_clipped(tmp_path, channels):
    """Issue 9 §3: PIL's convert clipped 16-bit grey to 255, so mid-grey was stored as white."""
    def write(path):
        ramp = np.repeat(np.array([0, 32768, 65535], np.uint16), [12, 8, 12])
        Image.fromarray(np.tile(ramp, (32, 1))).save(path)       # mode I;16
    x = _folder_images(tmp_path, {"grey16.png": write}, channels)["grey16.png"]
    assert x.shape == (32, 32, channels)
    assert (x[:, :12] == 0).all() and (x[:, 12:20] == 128).all() and (x[:, 20:] == 255).all()


def test_folder_exif_rotated_jpeg_is_stored_upright(tmp_path):
    """A phone photo: pixels stored sideways plus an orientation tag (6: turn 90 degrees clockwise to view)."""
    upright = np.zeros((64, 64, 3), np.uint8)
    upright[:32] = 255                                           # top half white, bottom half black
    def write(path):
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    x = _folder_images(tmp_path, {"phone.jpg": write})["phone.jpg"].astype(int)
    assert x[:12].min() > 240 and x[20:].max() < 15             # top white, bottom black, not left/right


def test_folder_transparency_is_composited_on_white(tmp_path):
    """Colour hidden under alpha 0 (here red or green) must not reach the shards: transparent is white."""
    def rgba(path):
        img = np.zeros((32, 32, 4), np.uint8)
        img[:, :16] = (0, 0, 0, 255)                             # opaque black
        img[:, 16:] = (255, 0, 0, 0)                             # fully transparent red
        img[:8, :16] = (0, 0, 255, 128)                          # half-transparent blue
        Image.fromarray(img, "RGBA").save(path)

    def palette(path):
        img = Image.fromarray(np.repeat(np.array([[1] * 16 + [0] * 16], np.uint8), 32, axis=0), "P")
        img.putpalette([0, 255, 0, 0, 0, 0] + [0] * 762)        # index 0 green (transparent), 1 black
        img.save(path, transparency=0)

    def grey_alpha(path):
        img = np.zeros((32, 32, 2), np.uint8)
        img[:, :16] = (0, 255)
        img[:, 16:] = (0, 0)                                     # transparent black
        Image.fromarray(img, "LA").save(path)

    files = {"rgba.png": rgba, "palette.png": palette, "la.png": grey_alpha, "palette.gif": palette}
    for channels in (3, 1):
        out = _folder_images(tmp_path, files, channels)
        for name, x in out.items():
            assert (x[8:, :16] == 0).all() and (x[:, 16:] == 255).all(), (name, channels)
        half_blue = np.array([127, 127, 255])                   # 50% blue over white
        if channels == 1:                                        # ITU-R 601 luma, as PIL's "L"
            half_blue = np.array([round(0.299 * 127 + 0.587 * 127 + 0.114 * 255)])
        assert np.abs(out["rgba.png"][:8, :16].astype(int) - half_blue).max() <= 2


def test_folder_32_bit_float_image_is_skipped_with_a_reason(tmp_path):
    m_src = tmp_path / "src"
    m_src.mkdir()
    Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(m_src / "float.tif")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(m_src / "ok.png")
    m = prepare(open_source("folder", m_src), tmp_path / "out", PrepareOptions("folder", None, resolution=32),
                progress=False)
    assert m["num_images"] == 1 and m["skipped"]["items"][0][0] == "float.tif"
    assert "32-bit floating-point pixels" in m["skipped"]["items"][0][1]


def test_folder_labels_from_subfolders_and_bad_files_skipped(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("cats", 3), ("dogs", 4)):
        (tmp_path / "src" / cls / "deeper").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
                tmp_path / "src" / cls / ("deeper" if i == 0 else ".") / f"{i}.jpg")
    (tmp_path / "src" / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "src" / "notes.txt").write_text("not an image, ignored")
    m = prepare(open_source("folder", tmp_path / "src"), tmp_path / "out",
                PrepareOptions("folder", None, resolution=32, classes="dogs"), progress=False)
    assert m["class_names"] == ["cats", "dogs"]
    assert m["num_images"] == 4 and m["skipped"]["items"][0][0] == "dogs/broken.png"
    assert {y for _, y in read_shards(tmp_path / "out")} == {1}


def test_bundled_digits(tmp_path):
    m = prepare(open_source("digits", None), tmp_path / "out", PrepareOptions("digits", None, resolution=32),
                progress=False)
    labels = [y for _, y in read_shards(tmp_path / "out")]
    assert m["num_images"] == 1797 and m["channels"] == 1
    assert sorted(set(labels)) == list(range(10))


@pytest.mark.parametrize("args, message", [
    (["cifar10", "--input", "/no/such/file"], "/no/such/file: no such file or folder"),
    (["mnist"], "needs --input"),
    (["lsun", "--input", "."], "no data.mdb"),
    (["folder", "--input", "EMPTY"], "no images to convert"),
])
def test_input_mistakes_are_one_line_errors(tmp_path, cli, args, message):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    p = cli("prepare_data.py", *args, "--out", tmp_path / "out", check=False)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and p.stderr.strip().count("\n") == 0, p.stderr
    assert message in p.stderr


def test_unknown_source_is_refused(tmp_path, cli):
    p = cli("prepare_data.py", "imagenet", "--out", tmp_path / "out", check=False)
    assert p.returncode == 2 and "invalid choice: 'imagenet'" in p.stderr


class Interrupt(Exception):
    pass


def interrupted_after(src, n):
    """Wrap a source so that its item iterator dies after n items, like a killed conversion."""
    items = src.items

    def dying():
        for i, item in enumerate(items()):
            if i == n:
                raise Interrupt
            yield item
    src.items = dying
    return src


def test_interrupted_conversion_resumes_to_identical_shards(tmp_path):
    archive = write_cifar10(tmp_path / "src", n_per_batch=30)
    opts = PrepareOptions("cifar10", str(archive), resolution=32, shard_size=40, chunk_size=16)
    prepare(open_source("cifar10", archive), tmp_path / "ref", opts, progress=False)

    with pytest.raises(Interrupt):
        prepare(interrupted_after(open_source("cifar10", archive), 100), tmp_path / "out", opts, progress=False)
    assert (tmp_path / "out" / STATE).exists() and not (tmp_path / "out" / "manifest.json").exists()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(UserError, match="interrupted"):
        load_manifest(tmp_path / "out")
    with pytest.raises(UserError, match=r"other settings \(resolution: 32 -> 64\)"):
        prepare(open_source("cifar10", archive), tmp_path / "out",
                PrepareOptions("cifar10", str(archive), resolution=64, shard_size=40, chunk_size=16), progress=False)

    m = prepare(open_source("cifar10", archive), tmp_path / "out", opts, progress=False)
    ref = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert m["_stats"]["new_images"] == 150 - 80
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".json") == ["manifest.json"]


def test_complete_output_is_not_overwritten_without_flag(tmp_path):
    archive = write_cifar10(tmp_path / "src", n_per_batch=5)
    opts = PrepareOptions("cifar10", str(archive), resolution=32)
    prepare(open_source("cifar10", archive), tmp_path / "out", opts, progress=False)
    before = (tmp_path / "out" / "manifest.json").read_text()
    with pytest.raises(UserError, match="already holds a complete dataset"):
        prepare(open_source("cifar10", archive), tmp_path / "out", opts, progress=False)
    assert (tmp_path / "out" / "manifest.json").read_text() == before
    m = prepare(open_source("cifar10", archive), tmp_path / "out", opts, overwrite=True, progress=False)
    assert m["num_images"] == 25


def test_cifar_pickle_with_foreign_objects_is_refused(tmp_path):
    folder = write_cifar10(tmp_path / "src", n_per_batch=5, as_archive=False)
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Interrupt}, protocol=2))
    with pytest.raises(UserError, match="refusing to load"):
        open_source("cifar10", folder)


def test_converter_touches_only_its_own_temporary_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tmp").write_text("a user's own file")
    (out / "folder.tmp").mkdir()
    (out / "shard-000000.tar.tmp").write_bytes(b"left by a killed conversion")
    prepare(open_source("digits", None), out, PrepareOptions("digits", None, resolution=8), progress=False)
    assert (out / "thesis.tmp").read_text() == "a user's own file" and (out / "folder.tmp").is_dir()
    assert not (out / "shard-000000.tar.tmp").exists() and (out / "manifest.json").exists()


def _write_wds(folder, n=10, bad=(), extra_pickle_marker=None):
    """img2dataset-style shards: one PNG per sample, the class in .cls and in .json; returns the pixels."""
    import io
    import pickle
    import webdataset as wds

    class Marker:
        def __reduce__(self):
            return (open, (str(extra_pickle_marker), "w"))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = []
    with wds.ShardWriter(str(folder / "shards-%06d.tar"), maxcount=4, verbose=0) as sink:
        for i in range(n):
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            pixels.append(img)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "PNG")
            sample = {"__key__": f"{i:05d}", "png": b"not an image" if i in bad else buf.getvalue(),
                      "cls": str(i % 3).encode(), "json": json.dumps({"animal": ["cat", "dog", "emu"][i % 3]}).encode()}
            if extra_pickle_marker is not None:
                sample["pkl"] = pickle.dumps(Marker())
            sink.write(sample)
    return pixels


def test_webdataset_source_is_pixel_exact_counts_corrupt_and_never_unpickles(tmp_path, cli):
    marker = tmp_path / "PWNED"
    pixels = _write_wds(tmp_path / "wds", n=10, bad=(4,), extra_pickle_marker=marker)
    assert len(list((tmp_path / "wds").glob("*.tar"))) == 3
    p = cli("prepare_data.py", "webdataset", "--input", f"{tmp_path}/wds/shards-{{000000..000002}}.tar",
            "--out", tmp_path / "out", "--resolution", 32, "--workers", 1, "--quiet")
    assert "wrote 9 images" in p.stdout and "skipped 1 corrupt" in p.stdout
    m = load_manifest(tmp_path / "out")
    assert m["class_names"] == ["0", "1", "2"] and m["skipped"]["items"][0][0] == "shards-000001.tar:00004"
    got = {key: (x, y) for x, y, key in read_shards(tmp_path / "out", with_keys=True)}
    for i in (0, 5, 9):
        x, y = got[f"shards-{i // 4:06d}.tar:{i:05d}"]
        assert np.array_equal(x, pixels[i]) and y == i % 3
    assert not marker.exists()
    cli("prepare_data.py", "webdataset", "--input", f"{tmp_path}/wds/shards-{{000000..000002}}.tar",
        "--out", tmp_path / "out2", "--resolution", 32, "--label-field", "animal", "--classes", "emu", "--quiet")
    m = load_manifest(tmp_path / "out2")
    assert m["class_names"] == ["cat", "dog", "emu"] and m["num_images"] == 3          # samples 2, 5, 8


@pytest.mark.parametrize("pattern, message", [
    ("pipe:cat {tmp}/wds/shards-000000.tar", "only local paths and s3://, gs://, gcs://, http://, https:// URLs"),
    ("https://user:hunter2@example.org/shards-{{000000..000001}}.tar",
     "--input: https://example.org/...: credentials in the URL would be written to manifests"),
    ("{tmp}/wds/shards-{{000000..000009}}.tar", "shards-000003.tar: no such shard file"),
])
def test_webdataset_source_refuses_pipes_and_missing_shards(tmp_path, cli, pattern, message):
    _write_wds(tmp_path / "wds", n=10)
    p = cli("prepare_data.py", "webdataset", "--input", pattern.format(tmp=tmp_path), "--out", tmp_path / "out",
            check=False)
    assert p.returncode == 2 and message in p.stderr and p.stderr.count("\n") == 1


def test_webdataset_source_over_http_is_pixel_exact_retries_and_names_a_missing_shard(tmp_path, cli):
    from synthetic import serve_http
    pixels = _write_wds(tmp_path / "wds", n=10)
    url, server = serve_http(tmp_path / "wds", fail_first=2)          # the first two range requests get a 503
    try:
        p = cli("prepare_data.py", "webdataset", "--input", f"{url}/shards-{{000000..000002}}.tar",
                "--out", tmp_path / "out", "--resolution", 32, "--workers", 1, "--quiet")
        assert "wrote 10 images" in p.stdout and server.failures == 2 and "retrying" in p.stderr
        got = {key: (x, y) for x, y, key in read_shards(tmp_path / "out", with_keys=True)}
        assert len(got) == 10
        for i in range(10):
            x, y = got[f"shards-{i // 4:06d}.tar:{i:05d}"]
            assert np.array_equal(x, pixels[i]) and y == i % 3
        p = cli("prepare_data.py", "webdataset", "--input", f"{url}/shards-{{000000..000003}}.tar",
                "--out", tmp_path / "out2", check=False)
    finally:
        server.shutdown()
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert f"{url}/shards-000003.tar: no such shard" in p.stderr and not (tmp_path / "out2").exists()


def test_atomic_write_leaves_the_old_file_whole_and_no_temporary_when_the_write_fails(tmp_path):
    """The one helper behind every write-then-rename (shards, manifests, caches, metrics.jsonl, downloads)."""
    import errno
    import json

    from dcgan_dist.atomic import atomic_write, write_json_atomic
    path = tmp_path / "state.json"
    write_json_atomic(path, {"step": 1})
    with pytest.raises(OSError, match="No space"):
        with atomic_write(path, unique=True) as tmp:
            tmp.write_text('{"step": 2, "half')
            raise OSError(errno.ENOSPC, "No space left on device")
    assert json.loads(path.read_text()) == {"step": 1} and sorted(tmp_path.iterdir()) == [path]
    with atomic_write(path, fsync=True) as tmp:
        tmp.write_text('{"step": 3}')
    assert json.loads(path.read_text()) == {"step": 3} and sorted(tmp_path.iterdir()) == [path]
