"""Image data sets as uint8 tensors: CIFAR-10/100, Imagenette and any image folder.

Every data set yields ``(image, label)`` with ``image`` a ``uint8`` tensor of shape ``3 x H x W``
(RGB, values 0..255) and ``label`` an ``int``; models take ``[0, 1]`` floats, so callers divide by
255 on the device, after cropping (patch extraction resizes there, never here).

Where the data come from (:func:`load_dataset`):

- ``cifar10`` / ``cifar100`` (splits ``train``, ``test``): torchvision's on-disk format
  (``cifar-10-batches-py`` / ``cifar-100-python``) when it is under ``root``, else the JPEG archive
  ``cifar10_jpeg.npz`` / ``cifar100_jpeg.npz``. Archive pixels are JPEG copies of the official
  ones (about 7 grey levels off); their decode is cached once under :func:`cache_dir`. Both give an
  in-memory :class:`TensorImageDataset`.
- ``imagenette`` (split ``val``): ``imagenette_jpeg.npz``, decoded lazily image by image (the whole
  split would be 590 MB decoded, while decoding one 224 px JPEG takes about a millisecond).
- a folder path: :class:`ImageFolderDataset` (torchvision's ImageFolder layout), decoded lazily.

When CIFAR-10 is found nowhere, a request for its ``test`` split is served by the built-in sample
(:func:`load_sample`, ``sample_data/cifar10_test_sample.npz`` in the package: the archive's first
1,000 test images, byte for byte), with a one-line notice on stderr. It is a
:class:`SampleDataset`: image ``i`` is test image ``i`` of the full set, and an index past the
sample is an IndexError, so a run never mixes in other images. Every other request (the training
split, other data sets) still fails with the not-found error.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import sys
import tempfile
import warnings
from functools import cached_property, partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DATA_ENV = "SSL_PATCH_ANALYSIS_DATA"
CACHE_ENV = "SSL_PATCH_ANALYSIS_CACHE"

# name -> (valid splits, archive file, native square side, name for titles)
ARCHIVE_DATASETS = {
    "cifar10": (("train", "test"), "cifar10_jpeg.npz", 32, "CIFAR-10"),
    "cifar100": (("train", "test"), "cifar100_jpeg.npz", 32, "CIFAR-100"),
    "imagenette": (("val",), "imagenette_jpeg.npz", 224, "Imagenette"),
}
# name -> (folder, {split: batch files}, meta file, key of the class names, key of the labels)
TORCHVISION_CIFAR = {
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)],
                                         "test": ["test_batch"]}, "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta",
                 "fine_label_names", "fine_labels"),
}
# The built-in sample (sample_data/README.md): the data set and split it stands in for, and its file.
SAMPLE_DATASET, SAMPLE_SPLIT = "cifar10", "test"
SAMPLE_ARCHIVE = "cifar10_test_sample.npz"
FULL_CIFAR10_HINT = (f"for the full set pass --download (download=True) on a machine with internet, or set {DATA_ENV} "
                     "(--data-root, root=) to the folder holding cifar10_jpeg.npz")
# Sub-folder names that mark an image folder as split into train/val/test folders.
SPLIT_FOLDER_NAMES = ("train", "val", "valid", "validation", "test")


def _user_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def default_data_root() -> Path:
    """``$SSL_PATCH_ANALYSIS_DATA`` if set, else ``($XDG_CACHE_HOME or ~/.cache)/ssl_patch_analysis/data``."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else _user_cache_root() / "ssl_patch_analysis" / "data"


def data_roots() -> list[Path]:
    """Where data sets are looked for when no ``root`` is given, in order.

    ``$SSL_PATCH_ANALYSIS_DATA`` alone when it is set; otherwise the user cache folder, then the
    ``shared/data`` folder beside this checkout (where the project keeps its real data sets), so
    that the commands run offline from a checkout without any set-up.
    """
    if os.environ.get(DATA_ENV):
        return [default_data_root()]
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "data"
    return [default_data_root(), beside_checkout]


def cache_dir() -> Path:
    """``$SSL_PATCH_ANALYSIS_CACHE`` if set, else ``($XDG_CACHE_HOME or ~/.cache)/ssl_patch_analysis``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else _user_cache_root() / "ssl_patch_analysis"


class ImageDataset(Dataset):
    """Base class: labelled uint8 RGB images, ``dataset[i] -> (3 x H x W uint8 tensor, label)``.

    Subclasses set ``name``, ``split``, ``class_names``, ``labels`` (int64, N), ``image_size``
    (``(H, W)`` shared by all images, ``None`` when sizes vary) and ``description`` (the name to put
    in figure titles, saying where the pixels come from, e.g. "CIFAR-10 (JPEG copy)"), and
    implement :meth:`load_image`.
    """

    name: str
    description: str
    split: str
    class_names: list[str]
    labels: torch.Tensor
    image_size: tuple[int, int] | None

    def load_image(self, i: int) -> torch.Tensor:
        """Image ``i`` (already range-checked, non-negative) as a 3 x H x W uint8 tensor."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def _index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} ({n} images)")
        return i % n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = self._index(i)
        return self.load_image(i), int(self.labels[i])

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Images ``indices`` stacked as a B x 3 x H x W uint8 tensor; ValueError if sizes differ."""
        images = [self.load_image(self._index(i)) for i in _as_index_list(indices)]
        if not images:
            raise ValueError("get_batch needs at least one index")
        sizes = sorted({tuple(im.shape[1:]) for im in images})
        if len(sizes) > 1:
            raise ValueError(
                f"images of {self.name} differ in size ({', '.join(f'{h}x{w}' for h, w in sizes)}) and cannot be "
                "stacked; load the folder with image_size=S to resize and centre-crop every image to S x S"
            )
        return torch.stack(images)

    def __repr__(self) -> str:
        size = "varying" if self.image_size is None else "x".join(map(str, self.image_size))
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, images={len(self)}, "
                f"classes={len(self.class_names)}, image_size={size})")


def _as_index_list(indices: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(indices, torch.Tensor):
        if indices.ndim != 1 or indices.is_floating_point():
            raise ValueError(f"indices must be a 1-D integer tensor, got {indices.dtype} of shape "
                             f"{tuple(indices.shape)}")
        return indices.tolist()
    return [int(i) for i in indices]


class TensorImageDataset(ImageDataset):
    """Images held in memory: ``images`` is a uint8 tensor N x 3 x H x W."""

    def __init__(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | Sequence[int],
                 class_names: Sequence[str], name: str = "tensor", split: str = "", description: str | None = None):
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a uint8 tensor N x 3 x H x W, got {images.dtype} of shape "
                             f"{tuple(images.shape)}")
        if labels.ndim != 1 or len(labels) != len(images) or labels.is_floating_point():
            raise ValueError(f"labels must be N={len(images)} integers, got {labels.dtype} of shape "
                             f"{tuple(labels.shape)}")
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < len(class_names)):
            raise ValueError(f"labels must lie in 0..{len(class_names) - 1} (one per class name), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.class_names = [str(c) for c in class_names]
        self.name = name
        self.split = split
        self.description = description or name
        self.image_size = (int(images.shape[2]), int(images.shape[3]))

    def load_image(self, i: int) -> torch.Tensor:
        return self.images[i]

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        index = torch.tensor([self._index(i) for i in _as_index_list(indices)], dtype=torch.int64)
        if not len(index):
            raise ValueError("get_batch needs at least one index")
        return self.images[index]


class SampleDataset(TensorImageDataset):
    """The built-in sample standing in for CIFAR-10 test: image ``i`` is the full set's test image ``i``.

    Indices past the sample, and negative ones (which would count from the end of the full set),
    raise IndexError saying how to get the full set.
    """

    def _index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} is not in the built-in CIFAR-10 sample, which holds only test images "
                             f"0..{len(self) - 1} (the full data set was not found); {FULL_CIFAR10_HINT}")
        return i


def _decode_jpeg(data: np.ndarray) -> Image.Image:
    """One JPEG file's bytes -> an RGB image (greyscale files too)."""
    # Pillow, not torchvision.io: torchvision 0.29 deprecates its decoders.
    with Image.open(io.BytesIO(data.tobytes())) as image:
        return image.convert("RGB")


def _to_chw_tensor(image: Image.Image) -> torch.Tensor:
    # np.array copies: the array np.asarray gives over a Pillow image is read-only.
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


class JpegArchiveDataset(ImageDataset):
    """Images kept as concatenated JPEG bytes (the ``.npz`` archive layout), decoded on access.

    Image ``i`` is ``jpeg[offsets[i]:offsets[i + 1]]``. Greyscale JPEGs come back as 3 equal channels.
    """

    def __init__(self, jpeg: np.ndarray, offsets: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 name: str, split: str, description: str | None = None):
        if len(offsets) != len(labels) + 1:
            raise ValueError(f"{name} {split}: {len(offsets)} offsets for {len(labels)} labels (expected one more)")
        self.jpeg = jpeg
        self.offsets = offsets
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.class_names = [str(c) for c in class_names]
        self.name = name
        self.split = split
        self.description = description or name

    def load_image(self, i: int) -> torch.Tensor:
        return _to_chw_tensor(_decode_jpeg(self.jpeg[self.offsets[i]:self.offsets[i + 1]]))

    @cached_property
    def image_size(self) -> tuple[int, int] | None:
        # Pillow reads only the JPEG header here: all 3,925 Imagenette sizes take ~0.15 s.
        sizes = {Image.open(io.BytesIO(self.jpeg[a:b].tobytes())).size
                 for a, b in zip(self.offsets[:-1], self.offsets[1:])}
        return _common_size(sizes)


def _common_size(sizes: set[tuple[int, int]]) -> tuple[int, int] | None:
    """The shared (H, W) of Pillow ``(W, H)`` sizes, or None when they differ."""
    if len(sizes) != 1:
        return None
    (w, h), = sizes
    return (h, w)


class ImageFolderDataset(ImageDataset):
    """Any folder of class sub-folders (torchvision's ImageFolder layout), decoded lazily.

    Classes are the sorted sub-folder names and files are found and ordered exactly as
    ``torchvision.datasets.ImageFolder`` does, so labels agree with it. ``image_size=S`` resizes
    the shorter side to ``S`` (bilinear, antialiased) and centre-crops ``S x S``; ``None`` keeps
    each image's own size.
    """

    def __init__(self, root: str | Path, image_size: int | None = None, split: str = ""):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist (expected <folder>/<class>/<image>)")
        if image_size is not None and image_size <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.root = root
        self.resize_to = image_size
        self.class_names, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
        self.paths = [Path(p) for p, _ in samples]
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        self.name = root.name
        self.split = split
        self.description = f"{root.parent.name}/{root.name}" if split else root.name

    def load_image(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            image = im.convert("RGB")
        if self.resize_to is not None:
            image = TF.center_crop(TF.resize(image, self.resize_to, antialias=True), self.resize_to)
        return _to_chw_tensor(image)

    @cached_property
    def image_size(self) -> tuple[int, int] | None:
        if self.resize_to is not None:
            return (self.resize_to, self.resize_to)
        sizes = set()
        for path in self.paths:
            with Image.open(path) as im:
                sizes.add(im.size)
        return _common_size(sizes)


def decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray, desc: str = "decoding") -> np.ndarray:
    """Decode every image of a JPEG archive split into one N x 3 x H x W uint8 array.

    Image ``i`` is ``jpeg[offsets[i]:offsets[i + 1]]``. All images must share one size (ValueError
    otherwise). Shows a progress bar once decoding has taken 2 seconds.
    """
    n = len(offsets) - 1
    if n < 1:
        raise ValueError(f"{desc}: the archive split holds no images")
    first = np.asarray(_decode_jpeg(jpeg[offsets[0]:offsets[1]]))
    out = np.empty((n, first.shape[2], first.shape[0], first.shape[1]), dtype=np.uint8)
    for i in tqdm(range(n), desc=desc, unit="img", delay=2.0, mininterval=0.5):
        image = first if i == 0 else np.asarray(_decode_jpeg(jpeg[offsets[i]:offsets[i + 1]]))
        if image.shape != first.shape:
            raise ValueError(f"{desc}: image {i} is {image.shape[0]}x{image.shape[1]}, image 0 is "
                             f"{first.shape[0]}x{first.shape[1]}; an archive decoded into one array needs one size")
        out[i] = image.transpose(2, 0, 1)
    return out


def _read_archive_arrays(path: Path, split: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    # np.load of an .npz reads an array only when its key is accessed, so the JPEG bytes stay on
    # disk when the decoded cache is used.
    with np.load(path) as archive:
        missing = [k for k in keys if k not in archive.files]
        if missing:
            raise ValueError(f"{path} lacks the {split!r} arrays of a JPEG archive: {', '.join(missing)} "
                             f"(it has {', '.join(archive.files)})")
        return {k: archive[k] for k in keys}


def _decoded_cache_path(archive: Path, split: str) -> Path:
    stat = archive.stat()
    where = hashlib.sha1(str(archive.resolve()).encode()).hexdigest()[:12]
    # size + mtime: a replaced archive gets a new cache file instead of stale pixels.
    return cache_dir() / "decoded" / f"{archive.stem}-{where}-{split}-{stat.st_size}-{stat.st_mtime_ns}.npy"


def _load_cached(path: Path, n: int) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        images = np.load(path)
    except (OSError, ValueError):
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != n:
        return None
    return images


def _write_cache(path: Path, images: np.ndarray) -> None:
    """Atomic write (temporary file + rename), and removal of caches of older versions of the archive."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.save(f, images)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the decoded-image cache {path} ({e}); the archive will be decoded again "
                      f"next time. Set {CACHE_ENV} to a writable folder to cache it.", stacklevel=3)
        return
    stem = path.name.rsplit("-", 2)[0]
    for old in path.parent.glob(f"{stem}-*.npy"):
        if old != path:
            old.unlink(missing_ok=True)


def _load_decoded_archive(path: Path, name: str, split: str) -> TensorImageDataset:
    meta = _read_archive_arrays(path, split, [f"{split}_labels", f"{split}_offsets", "class_names"])
    labels, offsets = meta[f"{split}_labels"], meta[f"{split}_offsets"]
    cache = _decoded_cache_path(path, split)
    images = _load_cached(cache, len(labels))
    if images is None:
        jpeg = _read_archive_arrays(path, split, [f"{split}_jpeg"])[f"{split}_jpeg"]
        if len(offsets) != len(labels) + 1:
            raise ValueError(f"{path}: {len(offsets)} {split} offsets for {len(labels)} labels")
        images = decode_jpegs(jpeg, offsets, desc=f"decoding {name} {split}")
        _write_cache(cache, images)
    # The pixels are JPEG copies of the official ones: results must say so.
    return TensorImageDataset(torch.from_numpy(images), labels, meta["class_names"].tolist(), name=name, split=split,
                              description=f"{ARCHIVE_DATASETS[name][3]} (JPEG copy)")


def _load_lazy_archive(path: Path, name: str, split: str) -> JpegArchiveDataset:
    arrays = _read_archive_arrays(path, split, [f"{split}_jpeg", f"{split}_offsets", f"{split}_labels", "class_names"])
    return JpegArchiveDataset(arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"], arrays[f"{split}_labels"],
                              arrays["class_names"].tolist(), name=name, split=split,
                              description=ARCHIVE_DATASETS[name][3])


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch files and nothing else: only the globals a pickled dict of numpy
    arrays needs may load, so a tampered file cannot run code."""

    allowed = {
        ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"CIFAR batch files hold only numpy arrays and lists; refusing to "
                                         f"load {module}.{name}")
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path, keys: Sequence[str]) -> dict[str, object]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from torchvision's CIFAR folder; remove the folder and "
                                "reload with download=True (on a machine with internet) to fetch it again")
    with open(path, "rb") as f:
        # latin1, like torchvision: the official files were pickled by Python 2.
        entry = _CifarUnpickler(f, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR batch file (a pickled dict), it holds a {type(entry).__name__}")
    # Keys are str in the official files and bytes in files written by Python 3 with b"..." keys.
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{path} lacks the key(s) {', '.join(missing)} of torchvision's CIFAR format "
                         f"(it has {', '.join(map(str, entry))})")
    return entry


def _load_torchvision_cifar(folder: Path, name: str, split: str) -> TensorImageDataset:
    """Read torchvision's ``cifar-10-batches-py`` / ``cifar-100-python`` folder (no md5 check)."""
    _, files, meta_file, names_key, labels_key = TORCHVISION_CIFAR[name]
    batches = [_read_cifar_pickle(folder / f, ["data", labels_key]) for f in files[split]]
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{folder}: 'data' must hold rows of 3072 values (3 x 32 x 32), got shape {data.shape}")
    labels = np.concatenate([np.asarray(b[labels_key], dtype=np.int64) for b in batches])
    names = _read_cifar_pickle(folder / meta_file, [names_key])[names_key]
    class_names = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
    # Each row is 1024 red, then 1024 green, then 1024 blue values of a row-major 32 x 32 image.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32))
    return TensorImageDataset(images, labels, class_names, name=name, split=split,
                              description=ARCHIVE_DATASETS[name][3])


def _download_cifar(root: Path, name: str) -> None:
    dataset_class = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    try:
        # train=False downloads the same archive (it holds both splits).
        dataset_class(str(root), train=False, download=True)
    except OSError as e:
        raise RuntimeError(f"downloading {name} into {root} failed ({e}); download=True needs internet access. "
                           f"Otherwise pass root= (or set {DATA_ENV}) to a folder holding {name}_jpeg.npz") from e


class DataSetNotFoundError(FileNotFoundError):
    """A data set absent from a data root (while a damaged one raises a plain FileNotFoundError)."""


def _not_found(name: str, looked_in: list[Path], how: str) -> DataSetNotFoundError:
    paths = "\n".join(f"  {p}" for p in looked_in)
    return DataSetNotFoundError(f"data set {name!r} not found. Looked in:\n{paths}\n{how}")


def _check_split(name: str, split: str, valid: Sequence[str]) -> None:
    if split not in valid:
        raise ValueError(f"unknown split {split!r} for {name}; valid splits: {', '.join(valid)}")


def _check_native_size(name: str, image_size: int | None, native: int) -> None:
    if image_size is not None and image_size != native:
        raise ValueError(f"{name} images are {native}x{native}; image_size={image_size} is only for image folders. "
                         "Patch extraction resizes crops on the device, so load the native size")


def _load_cifar(name: str, split: str, root: Path, download: bool) -> TensorImageDataset:
    folder = root / TORCHVISION_CIFAR[name][0]
    archive = root / ARCHIVE_DATASETS[name][1]
    # download=True asks for the official pixels, so it never falls back to the JPEG copy.
    if download and not folder.is_dir():
        _download_cifar(root, name)
    if folder.is_dir():
        return _load_torchvision_cifar(folder, name, split)
    if archive.is_file():
        return _load_decoded_archive(archive, name, split)
    raise _not_found(name, [folder, archive], (
        f"To get it: load_dataset({name!r}, download=True) on a machine with internet (torchvision downloads the "
        f"official files into {folder}), or pass root= (or set {DATA_ENV}) to the folder holding {archive.name}."))


def _load_imagenette(split: str, root: Path, download: bool) -> JpegArchiveDataset:
    archive = root / ARCHIVE_DATASETS["imagenette"][1]
    if archive.is_file():
        return _load_lazy_archive(archive, "imagenette", split)
    hint = "download=True cannot fetch it (only CIFAR downloads). " if download else ""
    raise _not_found("imagenette", [archive], (
        f"To get it: {hint}pass root= (or set {DATA_ENV}) to the folder holding {archive.name}, or download "
        "fast.ai's imagenette2 (https://github.com/fastai/imagenette) and load its folder: "
        "load_dataset('/path/to/imagenette2', split='val', image_size=224)."))


def _load_folder(folder: Path, split: str, image_size: int | None) -> ImageFolderDataset:
    if (folder / split).is_dir():
        return ImageFolderDataset(folder / split, image_size=image_size, split=split)
    split_folders = [s for s in SPLIT_FOLDER_NAMES if (folder / s).is_dir()]
    if split_folders:
        # Without this check the split folders themselves would silently become the classes.
        raise ValueError(f"{folder} has split sub-folders ({', '.join(split_folders)}) but no {split!r}; "
                         f"pass split= one of them")
    return ImageFolderDataset(folder, image_size=image_size)


def sample_path() -> Traversable:
    """The built-in sample's archive inside the installed package."""
    return resources.files(__package__) / "sample_data" / SAMPLE_ARCHIVE


def load_sample() -> SampleDataset:
    """The built-in sample: CIFAR-10's first 1,000 test images in the official order (JPEG copy).

    Its JPEG bytes are those of ``cifar10_jpeg.npz``, so its pixels equal the full copy's. Decoding
    takes a fraction of a second, so it is not cached.
    """
    # read_bytes: works wherever the package lives, a zip file included.
    with np.load(io.BytesIO(sample_path().read_bytes())) as archive:
        jpeg, offsets, labels, class_names = (archive[f"{SAMPLE_SPLIT}_jpeg"], archive[f"{SAMPLE_SPLIT}_offsets"],
                                              archive[f"{SAMPLE_SPLIT}_labels"], archive["class_names"])
    images = decode_jpegs(jpeg, offsets, desc=f"decoding the {SAMPLE_DATASET} sample")
    return SampleDataset(torch.from_numpy(images), labels, class_names.tolist(), name=SAMPLE_DATASET,
                         split=SAMPLE_SPLIT, description=f"{ARCHIVE_DATASETS[SAMPLE_DATASET][3]} (JPEG copy, "
                                                         f"{len(labels):,}-image sample)")


def _sample_instead(roots: list[Path], missing: FileNotFoundError) -> SampleDataset:
    if not sample_path().is_file():
        raise FileNotFoundError(f"{missing}\nThe built-in sample {sample_path()} is missing too: reinstall "
                                "ssl_patch_analysis to get it back")
    print(f"note: {ARCHIVE_DATASETS[SAMPLE_DATASET][3]} not found in {', '.join(map(str, roots))}; using the built-in "
          f"sample of its first 1,000 test images (JPEG copy); {FULL_CIFAR10_HINT}", file=sys.stderr)
    return load_sample()


def load_dataset(name: str, split: str = "test", root: str | Path | None = None, download: bool = False,
                 image_size: int | None = None) -> ImageDataset:
    """Load a data set by name (``cifar10``, ``cifar100``, ``imagenette``) or by image-folder path.

    ``root`` is the folder holding the data (default :func:`data_roots`). For a folder path,
    ``<path>/<split>`` is used when it exists (e.g. ``imagenette2/val``), else ``<path>`` itself;
    ``image_size`` resizes and centre-crops folder images to a square (archives keep their native
    size). When CIFAR-10 is in none of the roots, ``cifar10`` ``test`` is the built-in sample
    (:func:`load_sample`, with a notice on stderr); other absent data raise FileNotFoundError naming
    every path tried.
    """
    key = name.lower()
    if key in ARCHIVE_DATASETS:
        splits, _, native, _ = ARCHIVE_DATASETS[key]
        _check_split(key, split, splits)
        _check_native_size(key, image_size, native)
        loader = _load_imagenette if key == "imagenette" else partial(_load_cifar, key)
        roots = [Path(root).expanduser()] if root is not None else data_roots()
        missing = []
        for data_root in roots:
            try:
                return loader(split, data_root, download)
            except FileNotFoundError as e:
                missing.append(e)
        error = missing[0] if len(missing) == 1 else FileNotFoundError("\n".join(str(e) for e in missing))
        # Only a data set absent everywhere falls back: a damaged one must be repaired, not replaced.
        if all(isinstance(e, DataSetNotFoundError) for e in missing):
            if (key, split) == (SAMPLE_DATASET, SAMPLE_SPLIT):
                return _sample_instead(roots, error)
            raise DataSetNotFoundError(f"{error}\nThe built-in sample cannot stand in for {key} {split}: it holds "
                                       f"only the first 1,000 {ARCHIVE_DATASETS[SAMPLE_DATASET][3]} test "
                                       "images.")
        raise error
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _load_folder(folder, split, image_size)
    raise ValueError(f"unknown data set {name!r}: known names are {', '.join(ARCHIVE_DATASETS)}, "
                     "or give the path of an image folder (<folder>/<class>/<image>)")
