"""Readers for the public dataset formats. Each source lists items cheaply; decoding happens in workers.

An item is ``(key, payload, label)``: ``key`` a string that names the image in the source (for error
messages and the manifest), ``payload`` an ``np.ndarray`` (already decoded pixels), ``bytes`` (an
encoded image) or a ``Path`` (an image file), ``label`` an int.
"""

from __future__ import annotations

import gzip
import io
import pickle
import random
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from ..atomic import atomic_write
from ..errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


class Item(NamedTuple):
    key: str
    payload: object
    label: int


class Source:
    """A public dataset: class names, per-item labels when known up front, and an item iterator."""

    name: str = ""
    default_channels: int = 3
    class_names: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def labels(self) -> np.ndarray | None:
        """All labels in item order, or None when unknown without decoding (lsun)."""
        return None

    def items(self) -> Iterator[Item]:
        raise NotImplementedError


class ArraySource(Source):
    """A dataset held in memory: ``images`` (N, H, W) or (N, H, W, C) uint8, ``targets`` (N,) int64 and ``keys``
    (N names, e.g. "t10k:17"), set by the subclass's constructor."""

    images: np.ndarray
    targets: np.ndarray
    keys: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def labels(self) -> np.ndarray:
        return self.targets

    def items(self) -> Iterator[Item]:
        for key, img, y in zip(self.keys, self.images, self.targets):
            yield Item(key, img, int(y))


# --------------------------------------------------------------------------------------------- digits
class DigitsSource(ArraySource):
    """The 1,797 8x8 handwritten digits that ship inside scikit-learn: no download, no --input."""

    name = "digits"
    default_channels = 1
    class_names = [str(i) for i in range(10)]

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        # Values are 0..16 ink counts; stretch to 0..255 grey levels.
        self.images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
        self.targets = d.target.astype(np.int64)
        self.keys = [f"digits:{i}" for i in range(len(self.images))]


# -------------------------------------------------------------------------------------------- cifar10
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR10's public format is a pickle; allow only what its arrays need, never arbitrary objects."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR10 batch file")
        return super().find_class(module, name)


def _load_cifar_pickle(data: bytes, where: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not a CIFAR batch
        raise UserError(f"{where}: not a CIFAR10 python batch file ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: not a CIFAR10 python batch file (top level is {type(obj).__name__})")
    # Python 2 pickles loaded with encoding="bytes" have bytes keys; Python 3 ones have str keys.
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


class Cifar10Source(ArraySource):
    """CIFAR10 python version: ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py/``."""

    name = "cifar10"
    default_channels = 3

    def __init__(self, path: Path, split: str = "train", download: bool = False) -> None:
        if download:
            path = _download_torchvision("CIFAR10", path)
        files = _cifar_files(path)
        batch_names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        for name in ["batches.meta", *batch_names]:
            if name not in files:
                raise UserError(f"{path}: no cifar-10-batches-py/{name}; expected the python-version "
                                f"archive cifar-10-python.tar.gz or its extracted folder")
        meta = _load_cifar_pickle(files["batches.meta"](), f"{path}:batches.meta")
        self.class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
        images, labels, keys = [], [], []
        for name in batch_names:
            b = _load_cifar_pickle(files[name](), f"{path}:{name}")
            data = np.asarray(b["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise UserError(f"{path}:{name}: data has shape {data.shape}, expected N x 3072")
            # Rows are row-major CHW (1024 red, 1024 green, 1024 blue); store HWC.
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(b["labels"], dtype=np.int64))
            keys += [f"{name}:{i}" for i in range(len(data))]
        self.images = np.concatenate(images)
        self.targets = np.concatenate(labels)
        self.keys = keys


def _cifar_files(path: Path) -> dict:
    """Map batch file name -> loader, from the .tar.gz or from a folder (itself or a parent)."""
    if path.is_file():
        try:
            tar = tarfile.open(path, "r:*")
        except (tarfile.TarError, OSError) as e:
            raise UserError(f"{path}: cannot open as a tar archive ({e})") from None
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        return {name: (lambda m=m: tar.extractfile(m).read()) for name, m in members.items()}
    folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    archive = path / "cifar-10-python.tar.gz"
    if not (folder / "batches.meta").exists() and archive.is_file():
        return _cifar_files(archive)
    return {p.name: p.read_bytes for p in folder.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------------ mnist, fashion-mnist
def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (LeCun's MNIST format: big-endian magic 0x0000080D, D = number of dimensions, then D uint32
    sizes, then uint8 data), gzipped or not -> uint8 array of those sizes. Every damage is a UserError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:     # not gzip, truncated, or a corrupt compressed stream
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {e}); the file is damaged: fetch it "
                        f"again{_REFETCH}") from None
    if not data:
        raise UserError(f"{path}: is empty; fetch it again{_REFETCH}")
    if len(data) < 4 or struct.unpack(">I", data[:4])[0] != magic:
        raise UserError(f"{path}: not an IDX file with magic number {magic} (starts with {data[:4].hex()})")
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim:
        raise UserError(f"{path}: the IDX header is cut short ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    expected = int(np.prod(dims))
    if len(body) != expected:
        raise UserError(f"{path}: header says {dims} ({expected} bytes) but the file holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


_REFETCH = " (prepare_data.py --download, or reinstall the package that holds it)"


class IdxSource(ArraySource):
    """Images and labels in IDX files, ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``: MNIST's format,
    which Fashion-MNIST shares. The published files' mirrors and md5s are torchvision's (``torchvision_name``);
    ``content_sha256``: sha256 of a file's decompressed bytes, where a repackaged copy (Debian's) is known."""

    default_channels = 1
    torchvision_name = ""
    content_sha256: dict[str, str] = {}
    default_input: Path | None = None

    def __init__(self, path: Path, split: str = "train") -> None:
        prefix = "train" if split == "train" else "t10k"
        images = _find_idx(path, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(path, f"{prefix}-labels-idx1-ubyte")
        self.images = _read_idx(images, 2051)
        self.targets = _read_idx(labels, 2049).astype(np.int64)
        if len(self.images) != len(self.targets):
            raise UserError(f"{images} holds {len(self.images)} images but {labels} {len(self.targets)} labels; "
                            f"the two files are not a pair")
        if len(self.targets) and self.targets.max() >= len(self.class_names):
            i = int(self.targets.argmax())
            raise UserError(f"{labels}: label {self.targets[i]} of image {i} is outside the {len(self.class_names)} "
                            f"classes of {self.name} (0-{len(self.class_names) - 1}); the file is not {self.name}'s")
        self.keys = [f"{prefix}:{i}" for i in range(len(self.images))]

    @classmethod
    def download(cls, root: Path, mirror: str | None = None, timeout: float = 60.0) -> Path:
        """Fetch the four files into ``root`` (skipping those already there and sound), each checked against
        its published checksum before it takes its final name; returns ``root``. Raises UserError."""
        import hashlib
        import urllib.request

        mirrors, resources = _torchvision_resources(cls.torchvision_name)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--input {root}: cannot create ({e.strerror or e})") from None
        for name, md5 in resources:
            dest = root / name
            if dest.is_file() and cls._sound(dest, md5):
                continue
            url = (mirror or mirrors[0]).rstrip("/") + "/" + name
            with atomic_write(dest, suffix=".part") as part:
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
                        while block := r.read(1 << 20):
                            f.write(block)
                except Exception as e:  # noqa: BLE001 - URLError, HTTPError, timeouts, resets, a full disk
                    raise UserError(f"downloading {url} failed ({type(e).__name__}: {e}); without internet, copy "
                                    f"the four files into {root} and drop --download") from None
                if not cls._sound(part, md5):
                    got = hashlib.md5(part.read_bytes()).hexdigest()
                    raise UserError(f"{url}: the download does not match the published checksum (md5 {got}, "
                                    f"expected {md5}); nothing was kept: try again or another --mirror")
        return root

    @classmethod
    def _sound(cls, path: Path, md5: str) -> bool:
        """The published .gz (md5), or a recompressed copy whose IDX bytes are the published ones (sha256)."""
        import hashlib

        if hashlib.md5(path.read_bytes()).hexdigest() == md5:
            return True
        want = cls.content_sha256.get(path.name.split(".")[0])
        try:
            return want is not None and hashlib.sha256(gzip.open(path).read()).hexdigest() == want
        except (OSError, EOFError, zlib.error):
            return False


def _torchvision_resources(dataset: str) -> tuple[list[str], list[tuple[str, str]]]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, dataset)
    return list(cls.mirrors), [(url.rsplit("/", 1)[-1], md5) for url, md5 in cls.resources]


class MnistSource(IdxSource):
    """MNIST (LeCun et al.): 60,000 train and 10,000 test 28x28 grey digits."""

    name = "mnist"
    torchvision_name = "MNIST"
    class_names = [str(i) for i in range(10)]


class FashionMnistSource(IdxSource):
    """Fashion-MNIST (Xiao et al. 2017, zalandoresearch/fashion-mnist): 60,000 train and 10,000 test 28x28 grey
    images of 10 clothing classes, in MNIST's file format. Debian ships it (``apt-get install
    dataset-fashion-mnist``) in ``default_input``."""

    name = "fashion-mnist"
    torchvision_name = "FashionMNIST"
    class_names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
    default_input = Path("/usr/share/datasets/fashion-mnist")
    # Debian's package recompressed the published .gz files (other md5s); these are their IDX bytes, the same
    # 60,000 + 10,000 images and labels.
    content_sha256 = {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }


def _find_idx(path: Path, stem: str) -> Path:
    # torchvision's download puts the files under <root>/<Dataset>/raw/.
    for folder in (path, path / "raw", path / "MNIST" / "raw", path / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise UserError(f"{path}: no {stem} or {stem}.gz (looked in it, raw/, MNIST/raw/ and FashionMNIST/raw/)")


# ----------------------------------------------------------------------------------------------- lsun
class LsunSource(Source):
    """An LSUN lmdb export (e.g. ``bedroom_train_lmdb/``): hex keys, WebP or JPEG values."""

    name = "lsun"
    default_channels = 3

    def __init__(self, path: Path) -> None:
        import lmdb

        if not (path / "data.mdb").is_file():
            raise UserError(f"{path}: no data.mdb; expected an LSUN lmdb folder such as bedroom_train_lmdb/")
        try:
            self.env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False,
                                 max_readers=1)
        except lmdb.Error as e:
            raise UserError(f"{path}: cannot open lmdb ({e})") from None
        self.count = self.env.stat()["entries"]
        self.class_names = [path.name.split("_")[0]]

    def __len__(self) -> int:
        return self.count

    def items(self) -> Iterator[Item]:
        with self.env.begin(write=False, buffers=False) as txn:
            for key, value in txn.cursor():
                yield Item(key.decode("ascii", "replace"), value, 0)


# --------------------------------------------------------------------------------------------- folder
class FolderSource(Source):
    """Image files under a folder, recursively; label = first-level subfolder ('.' for files at the top)."""

    name = "folder"
    default_channels = 3

    def __init__(self, path: Path, seed: int = 0) -> None:
        if not path.is_dir():
            raise UserError(f"{path}: not a folder")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        groups = [p.relative_to(path).parts[0] if len(p.relative_to(path).parts) > 1 else "." for p in files]
        self.class_names = sorted(set(groups))
        index = {name: i for i, name in enumerate(self.class_names)}
        pairs = [(p, index[g]) for p, g in zip(files, groups)]
        # Folders are usually grouped by class; a fixed shuffle makes every shard chunk a mixture.
        random.Random(seed).shuffle(pairs)
        self.root = path
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def labels(self) -> np.ndarray:
        return np.array([y for _, y in self.pairs], dtype=np.int64)

    def items(self) -> Iterator[Item]:
        for p, y in self.pairs:
            yield Item(str(p.relative_to(self.root)), p, y)


# ---------------------------------------------------------------------------------------- webdataset
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")


class WebDatasetSource(Source):
    """Existing one-image-per-sample WebDataset shards (img2dataset, ``webdataset.ShardWriter``): a jpg/png/webp
    member per sample, the label from ``cls`` or from a field of the ``json`` member (``label_field``).

    Read with webdataset's own tar iterator and sample grouping (``tar_file_expander``, ``group_by_keys``), as
    ``read_shards`` reads ours, but only the image, ``cls`` and ``json`` members are ever looked at, and never
    with webdataset's default decoders (which would unpickle a ``.pkl`` member). Inputs are local paths or
    http(s)/s3/gs URLs, with webdataset's brace patterns (``shards-{000000..000099}.tar``). URLs are opened
    through the same Store as remote training shards (fsspec; retries with backoff, credentials from the
    environment, a one-line error naming the URL), not through webdataset's ``gopen``, which runs ``curl`` in a
    subprocess (30 retries 2 s apart on a flaky server, and its errors are the curl command line); ``pipe:``
    and other schemes are refused. A first pass reads the labels (the count, and the class names: the sorted
    distinct values); the second yields the image bytes, decoded by the converter's workers.
    """

    name = "webdataset"
    default_channels = 3

    def __init__(self, pattern: str, label_field: str | None = None) -> None:
        from braceexpand import braceexpand

        from .store import REMOTE

        urls = list(braceexpand(pattern))
        for url in urls:
            scheme = url.split("://", 1)[0] if "://" in url else ""
            if scheme not in ("", *REMOTE) or url.startswith("pipe:"):
                raise UserError(f"--input {url}: only local paths and {', '.join(s + '://' for s in REMOTE)} "
                                f"URLs are read (not {scheme or url[:5]!r})")
            if not scheme and not Path(url).is_file():
                raise UserError(f"--input: {url}: no such shard file")
            if scheme:
                store, name = self._remote(url)
                if not store.exists(name):
                    raise UserError(f"--input: {url}: no such shard (the server answered 'not found')")
        self.urls, self.label_field = urls, label_field
        raw = [label for _, _, label in self._samples(with_image=False)]
        if any(v is None for v in raw):
            self.class_names, self.targets = None, np.zeros(len(raw), dtype=np.int64)
        else:
            values = sorted(set(raw), key=lambda v: (isinstance(v, str), v))
            self.class_names = [str(v) for v in values]
            index = {v: i for i, v in enumerate(values)}
            self.targets = np.array([index[v] for v in raw], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def labels(self) -> np.ndarray:
        return self.targets

    def items(self) -> Iterator[Item]:
        for (key, image, _), y in zip(self._samples(with_image=True), self.targets):
            yield Item(key, image if image is not None else b"", int(y))

    @staticmethod
    def _remote(url: str):
        """The Store of a shard URL's folder, and the shard's name in it."""
        from .store import Store

        root, name = url.rsplit("/", 1)
        return Store(root, what="--input"), name

    @classmethod
    def _open(cls, url: str):
        if "://" not in url:
            return open(url, "rb")
        store, name = cls._remote(url)
        return store.open(name)

    def _samples(self, with_image: bool):
        """(key, image bytes or None, raw label or None) per sample, in shard order."""
        from webdataset.tariterators import group_by_keys, tar_file_expander

        wanted = set(WDS_IMAGE_EXTS) | {"cls", "json"}
        select = lambda name: name.rsplit(".", 1)[-1].lower() in wanted     # noqa: E731
        for url in self.urls:
            try:
                with self._open(url) as stream:
                    for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}],
                                                                  select_files=select)):
                        key = f"{url.rsplit('/', 1)[-1]}:{sample['__key__']}"
                        image = next((sample[k] for k in sample if k.lower() in WDS_IMAGE_EXTS), None) \
                            if with_image else None
                        yield key, image, self._label(sample)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged tar or a dropped connection, from many libraries
                raise UserError(f"--input {url}: cannot read ({type(e).__name__}: {str(e)[:200]}); "
                                f"the conversion resumes where it stopped when run again") from None

    def _label(self, sample: dict):
        """The raw label (int or str), or None when the sample has none."""
        import json

        try:
            if self.label_field:
                label = json.loads(sample["json"])[self.label_field]
            elif "cls" in sample:
                label = int(sample["cls"].decode().strip())
            else:
                return None
        except (KeyError, ValueError, TypeError, UnicodeDecodeError):
            return None
        return label if isinstance(label, (int, str)) else str(label)


# -------------------------------------------------------------------------------------------- helpers
SOURCES = ("digits", "cifar10", "mnist", "fashion-mnist", "lsun", "folder", "webdataset")
IDX = {"mnist": MnistSource, "fashion-mnist": FashionMnistSource}


def open_source(name: str, path: str | Path | None, split: str = "train", download: bool = False,
                label_field: str | None = None, mirror: str | None = None) -> Source:
    """Build the reader for ``name``; every mistake (unknown source, bad path) is a UserError. ``path`` None for
    fashion-mnist: the Debian package's folder (``data/raw/fashion-mnist`` with ``download``)."""
    if name not in SOURCES:
        raise UserError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; choose train or test")
    if name == "digits":
        return DigitsSource()
    if path is None and name == "fashion-mnist":
        path = Path("data/raw/fashion-mnist") if download else FashionMnistSource.default_input
        if not download and not path.is_dir():
            raise UserError(f"fashion-mnist: no --input and no {path}; install it (apt-get install -y "
                            f"dataset-fashion-mnist), or pass --input DIR with the four IDX files, or --download")
    if path is None:
        raise UserError(f"source {name!r} needs --input PATH")
    if download and name not in ("cifar10", *IDX):
        raise UserError(f"--download is only available for cifar10, mnist and fashion-mnist, not {name}")
    if mirror and not (download and name in IDX):
        raise UserError("--mirror is only for --download of mnist or fashion-mnist")
    if name == "webdataset":                  # a pattern or URL, not one path
        return WebDatasetSource(str(path), label_field)
    if label_field:
        raise UserError("--label-field is only for the webdataset source")
    path = Path(path)
    if not download and not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if name == "cifar10":
        return Cifar10Source(path, split, download)
    if name in IDX:
        return IDX[name](IDX[name].download(path, mirror) if download else path, split)
    if name == "lsun":
        return LsunSource(path)
    return FolderSource(path)


def parse_classes(spec: str | None, class_names: list[str] | None) -> list[int] | None:
    """``"cat"`` or ``"3,5"`` -> sorted class indices, checked against the source's class names (case does not
    matter). None (not given) keeps every class; an empty or blank ``spec`` is a UserError."""
    if spec is None:
        return None
    if not class_names:
        raise UserError("--classes: this source has no classes to choose from")
    valid = f"valid: {', '.join(class_names)} or indices 0-{len(class_names) - 1}"
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if not tokens:
        raise UserError(f"--classes {spec!r} names no class; {valid}")
    lower = [c.lower() for c in class_names]
    chosen = set()
    for token in tokens:
        if token.lower() in lower:
            chosen.add(lower.index(token.lower()))
        elif token.isdigit() and int(token) < len(class_names):
            chosen.add(int(token))
        else:
            raise UserError(f"--classes: unknown class {token!r}; {valid}")
    return sorted(chosen)


def _download_torchvision(dataset: str, root: Path) -> Path:
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    try:
        getattr(tvd, dataset)(str(root), download=True)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise UserError(f"downloading {dataset} into {root} failed ({e.__class__.__name__}: {e}); "
                        f"without internet, copy the public files there and drop --download") from None
    return root


# Transparent pixels are composited on this colour (white, as browsers and image viewers show them on a page).
BACKGROUND = (255, 255, 255)
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_mode(img, channels: int):
    """A decoded PIL image -> upright "L" or "RGB" pixels, converted the way a person would see the file.

    PIL's own ``convert`` gets three kinds of file wrong: 16-bit greyscale (it clips to 255 instead of
    scaling: mid-grey becomes white), EXIF-rotated photos (the pixels are stored sideways with an
    orientation tag), and transparency (RGBA, LA, or a palette/tRNS transparent colour: it keeps whatever
    colour hides under alpha 0). So: apply the EXIF orientation, scale 16-bit grey by 255/65535
    (16-bit colour PNGs PIL already reduces correctly), and composite transparency on ``BACKGROUND``.
    """
    from PIL import Image, ImageOps

    if img.getexif().get(0x0112, 1) != 1:             # 0x0112: Orientation; 1 = stored upright
        img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_GREY:
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        raise ValueError("32-bit floating-point pixels have no standard range; convert the file to 8 or 16 bit")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba)
    return img.convert("L" if channels == 1 else "RGB")


def decode_image(payload: object, resolution: int, channels: int) -> np.ndarray:
    """Decode, center-crop to a square and resize once (antialiased) -> uint8 H x W x C.

    Pixels already at the target size are copied exactly. Raises on a corrupt image.
    """
    from PIL import Image

    if isinstance(payload, np.ndarray):
        arr = payload if payload.ndim == 3 else payload[:, :, None]
        if arr.shape == (resolution, resolution, channels):
            return np.ascontiguousarray(arr)
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    else:
        img = Image.open(io.BytesIO(payload) if isinstance(payload, (bytes, bytearray)) else payload)
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; draft keeps the result >= the target size.
        img.draft("L" if channels == 1 else "RGB", (resolution, resolution))
        img.load()
    img = to_mode(img, channels)
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr
