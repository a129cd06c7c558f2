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
  split would be 590 MB decoded, while decoding one 224 px JPEG is cheap: benchmarks/RESULTS.md, "Numbers
  quoted in the code").
- a folder path: :class:`ImageFolderDataset` (torchvision's ImageFolder layout), decoded lazily.

When CIFAR-10 is found nowhere, a request for its ``test`` split is served by the built-in sample
(:func:`load_sample`, ``sample_data/cifar10_test_sample.npz`` in the package: the archive's first
1,000 test images, byte for byte), with a one-line notice on stderr. It is a
:class:`SampleDataset`: image ``i`` is test image ``i`` of the full set, and an index past the
sample is an IndexError, so a run never mixes in other images. Every other request (the training
split, other data sets) still fails with the not-found error.

Pixels of every kind become 8-bit RGB the same way (:func:`_as_rgb`): 16-bit greyscale is scaled
by 255/65535 and rounded (Pillow's own conversion clips it to white), transparency is composited
over white, and modes without a defined 8-bit form (32-bit float or integer, LAB, HSV) are refused.

Damaged data stop with one line naming the file and what to do (:class:`DataFileError`): an
archive or CIFAR batch file that does not read back, an image that does not decode. An image
folder decodes lazily, so a bad image is found when it is first used; ``skip_bad_images=True``
checks every file up front instead and leaves the bad ones out, listing them. The decoded-image
cache carries a checksum of its pixels: a cache that fails it is decoded again, with a notice.
"""
from __future__ import annotations

import codecs
import contextlib
import contextvars
import hashlib
import io
import os
import pickle
import struct
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property, partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DATA_ENV = "SSL_PATCH_ANALYSIS_DATA"
CACHE_ENV = "SSL_PATCH_ANALYSIS_CACHE"
_PROGRESS = contextvars.ContextVar("ssl_patch_analysis_data_progress", default=True)


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Inside the block, the data loaders' own progress bars (decoding an archive, checking an image folder) are
    shown, or not: a command's ``--no-progress`` silences them too."""
    token = _PROGRESS.set(enabled)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


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
FOLDER_IMAGE_FIX = ("replace or remove the file, or pass --skip-bad-images (skip_bad_images=True) to leave out the "
                    "folder's unreadable images")
# How many skipped files the one-line summary of skip_bad_images names.
SKIPPED_NAMED = 5

# What Pillow raises for a file it cannot decode (cut short, garbled, not an image at all).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)
# What np.load raises for a damaged .npz (zip structure, member CRC-32s, .npy headers, missing members).
_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError)
# Modes that Pillow converts to RGB by their definition: nothing to rescale, no transparency to resolve.
_RGB_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
# Modes whose transparent palette entry or colour (info["transparency"]) Pillow turns into alpha.
_KEYED_TRANSPARENCY_MODES = frozenset({"1", "L", "P", "RGB"})
_NO_RGB_FORM = {"F": "32-bit floating-point pixels (mode F)", "I": "32-bit integer pixels (mode I)"}


class DataFileError(ValueError):
    """A data file that cannot be used as it is: damaged, or pixels with no defined 8-bit RGB form.

    The message is one line naming the file and what to do.
    """


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
                "stacked; load the folder with --image-size S (image_size=S) to resize and centre-crop every image "
                "to S x S"
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


def _reason(error: BaseException) -> str:
    """An exception as a short one-line reason."""
    return " ".join(str(error).split()) or type(error).__name__


def _undecodable(source: str, error: BaseException, fix: str) -> DataFileError:
    return DataFileError(f"{source} cannot be decoded as an image ({_reason(error)}); {fix}")


def _no_rgb_form(image: Image.Image) -> str | None:
    """What keeps ``image`` from a defined 8-bit RGB form (None when it has one: see :func:`_as_rgb`)."""
    if image.mode in _RGB_MODES or image.mode in _ALPHA_MODES or image.mode.startswith("I;16"):
        return None
    if image.mode == "I" and image.format == "PNG":
        low, high = image.getextrema()
        return None if 0 <= low and high <= 65535 else (
            f"32-bit integer pixels (mode I) with values {low}..{high}, beyond 16 bits")
    return _NO_RGB_FORM.get(image.mode, f"pixels of mode {image.mode}")


def _as_rgb(image: Image.Image) -> Image.Image:
    """``image`` (a mode :func:`_no_rgb_form` accepts) as 8-bit RGB.

    16-bit greyscale (modes ``I;16*``, and mode ``I``, in which Pillow before 10 opened 16-bit PNGs)
    is scaled by 255/65535 and rounded: Pillow's own conversion clips it, turning it white.
    Transparency (an alpha channel, a transparent palette entry or colour) is composited over white,
    so colours hidden under transparent pixels never reach a model. 16-bit colour PNGs arrive already
    reduced by Pillow to their high byte (at most 1 level below rounding).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        return _sixteen_bit_grey_to_rgb(image)
    if image.mode in _ALPHA_MODES or (image.mode in _KEYED_TRANSPARENCY_MODES and "transparency" in image.info):
        return _over_white(image.convert("RGBA"))
    return image.convert("RGB")


def _sixteen_bit_grey_to_rgb(image: Image.Image) -> Image.Image:
    grey = np.asarray(image).astype(np.int64)
    # v * 255 / 65535 is v / 257, and (v + 128) // 257 rounds it: no 16-bit value lies half-way.
    rgb = np.repeat(((grey + 128) // 257).astype(np.uint8)[..., None], 3, axis=2)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        rgb[grey == transparent] = 255
    return Image.fromarray(rgb)


def _over_white(rgba: Image.Image) -> Image.Image:
    pixels = np.asarray(rgba).astype(np.uint32)
    colour, alpha = pixels[..., :3], pixels[..., 3:]
    # round((colour * alpha + 255 * (255 - alpha)) / 255), in integers: no value lies half-way.
    return Image.fromarray((((colour * alpha + 255 * (255 - alpha)) * 2 + 255) // 510).astype(np.uint8))


def _open_rgb(file: str | Path | io.BytesIO, source: str, fix: str) -> Image.Image:
    """The image in ``file`` as 8-bit RGB (:func:`_as_rgb`); DataFileError naming ``source`` and ``fix`` if it
    does not decode or has no defined 8-bit RGB form."""
    # Pillow, not torchvision.io: torchvision 0.29 deprecates its decoders.
    try:
        with Image.open(file) as image:
            image.load()
            problem = _no_rgb_form(image)
            if problem is None:
                return _as_rgb(image)
    except _DECODE_ERRORS as error:
        raise _undecodable(source, error, fix) from error
    raise DataFileError(f"{source} holds {problem}, which have no defined conversion to 8-bit RGB: save it as an "
                        f"8-bit or 16-bit PNG or JPEG; {fix}")


def _header_size(file: str | Path | io.BytesIO, source: str, fix: str) -> tuple[int, int]:
    """Pillow ``(W, H)`` of the image in ``file``, from its header alone."""
    try:
        with Image.open(file) as image:
            return image.size
    except _DECODE_ERRORS as error:
        raise _undecodable(source, error, fix) from error


def _image_problem(path: Path) -> str | None:
    """Why the image file ``path`` cannot be used, or None when it can.

    Pillow's verify() checks the file's structure (and a PNG's checksums) without decoding, so it
    does not see a JPEG cut short: the image is decoded as well, a JPEG at 1/8 scale (draft), which
    still reads every byte of it at a fraction of the cost.
    """
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.draft(None, (1, 1))
            image.load()
            return _no_rgb_form(image)
    except _DECODE_ERRORS as error:
        return _reason(error)


def _to_chw_tensor(image: Image.Image) -> torch.Tensor:
    # np.array copies: the array np.asarray gives over a Pillow image is read-only.
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


class JpegArchiveDataset(ImageDataset):
    """Images kept as concatenated JPEG bytes (the ``.npz`` archive layout), decoded on access.

    Image ``i`` is ``jpeg[offsets[i]:offsets[i + 1]]``. Greyscale JPEGs come back as 3 equal channels.
    An image that does not decode raises DataFileError naming image ``i`` of ``source`` (the file the
    bytes came from) and ``fix`` (what to do about it).
    """

    def __init__(self, jpeg: np.ndarray, offsets: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 name: str, split: str, description: str | None = None, source: str = "the archive",
                 fix: str = "replace the archive with a fresh copy"):
        if len(offsets) != len(labels) + 1:
            raise ValueError(f"{name} {split}: {len(offsets)} offsets for {len(labels)} labels (expected one more)")
        self.jpeg = jpeg
        self.offsets = offsets
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.class_names = [str(c) for c in class_names]
        self.name = name
        self.split = split
        self.description = description or name
        self.source = source
        self.fix = fix

    def _file(self, i: int) -> io.BytesIO:
        return io.BytesIO(self.jpeg[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def load_image(self, i: int) -> torch.Tensor:
        return _to_chw_tensor(_open_rgb(self._file(i), f"image {i} of {self.source}", self.fix))

    @cached_property
    def image_size(self) -> tuple[int, int] | None:
        # Pillow reads only the JPEG headers here: cheap even for all of Imagenette (benchmarks/RESULTS.md).
        sizes = {_header_size(self._file(i), f"image {i} of {self.source}", self.fix) for i in range(len(self))}
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

    A file that does not decode raises DataFileError naming it when it is first used: checking
    every file when the folder is listed would cost a decode per image on every load.
    ``skip_bad_images=True`` pays that once, up front (:func:`_image_problem`, on several threads,
    with a progress bar after 2 seconds), leaves the bad files out, lists them in one line on stderr
    and keeps them in ``skipped`` as ``(path, reason)``; image ``i`` is then the ``i``-th good file.
    """

    def __init__(self, root: str | Path, image_size: int | None = None, split: str = "",
                 skip_bad_images: bool = False, class_names: Sequence[str] | None = None):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist (expected <folder>/<class>/<image>)")
        if image_size is not None and image_size <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.root = root
        self.resize_to = image_size
        layout = "expected <folder>/<class>/<image>: one sub-folder per class, or one (e.g. all/) for unlabelled images"
        # The class of a label: the class folders in sorted order, hidden ones (.ipynb_checkpoints) left out; a split
        # of a folder with split sub-folders gets the classes of all its splits (_load_folder), so a label means the
        # same class in every split even where a split lacks a class (was: each split numbered its own folders).
        self.class_names = list(class_names) if class_names is not None else class_folders(root)
        if not self.class_names:
            loose = sum(1 for entry in root.iterdir() if entry.suffix.lower() in IMG_EXTENSIONS)
            raise FileNotFoundError(f"image folder {root} has no class sub-folders"
                                    f"{f' (it holds {loose} images directly)' if loose else ''}; {layout}")
        class_to_idx = {name: index for index, name in enumerate(self.class_names)}
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not samples:
            shown = [name for name in self.class_names if (root / name).is_dir()]
            raise FileNotFoundError(f"image folder {root}: its class sub-folders ({', '.join(shown[:5])}"
                                    f"{', ...' if len(shown) > 5 else ''}) hold no images (files ending "
                                    f"in {', '.join(IMG_EXTENSIONS[:4])}, ...)")
        self.paths = [Path(p) for p, _ in samples]
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        self.name = root.name
        self.split = split
        self.description = f"{root.parent.name}/{root.name}" if split else root.name
        self.skipped: list[tuple[Path, str]] = []
        if skip_bad_images:
            self._leave_out_bad_images()

    def _leave_out_bad_images(self) -> None:
        # Decoding releases the GIL: threads check several files at once.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            problems = list(tqdm(pool.map(_image_problem, self.paths), total=len(self.paths),
                                 desc=f"checking the images of {self.root}", unit="img", delay=2.0, mininterval=0.5,
                                 disable=not _PROGRESS.get()))
        self.skipped = [(path, problem) for path, problem in zip(self.paths, problems, strict=True)
                        if problem is not None]
        if not self.skipped:
            return
        named = ", ".join(f"{path.relative_to(self.root).as_posix()} ({problem})"
                          for path, problem in self.skipped[:SKIPPED_NAMED])
        if len(self.skipped) == len(self.paths):
            raise DataFileError(f"none of the {len(self.paths)} images of {self.root} can be read (first: {named}); "
                                "replace the files or load another folder")
        more = len(self.skipped) - SKIPPED_NAMED
        print(f"note: skipped {len(self.skipped)} of {len(self.paths)} images of {self.root} that cannot be read: "
              f"{named}" + (f", and {more} more" if more > 0 else ""), file=sys.stderr)
        keep = [i for i, problem in enumerate(problems) if problem is None]
        self.paths = [self.paths[i] for i in keep]
        self.labels = self.labels[keep]

    def load_image(self, i: int) -> torch.Tensor:
        image = _open_rgb(self.paths[i], str(self.paths[i]), FOLDER_IMAGE_FIX)
        if self.resize_to is not None:
            image = TF.center_crop(TF.resize(image, self.resize_to, antialias=True), self.resize_to)
        return _to_chw_tensor(image)

    @cached_property
    def image_size(self) -> tuple[int, int] | None:
        if self.resize_to is not None:
            return (self.resize_to, self.resize_to)
        sizes = {_header_size(path, str(path), FOLDER_IMAGE_FIX) for path in self.paths}
        return _common_size(sizes)


def decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray, desc: str = "decoding", source: str = "the archive",
                 fix: str = "replace the archive with a fresh copy") -> np.ndarray:
    """Decode every image of a JPEG archive split into one N x 3 x H x W uint8 array.

    Image ``i`` is ``jpeg[offsets[i]:offsets[i + 1]]``. All images must share one size (ValueError
    otherwise); one that does not decode raises DataFileError naming it, ``source`` (the file the
    bytes came from) and ``fix``. Shows a progress bar once decoding has taken 2 seconds.
    """
    n = len(offsets) - 1
    if n < 1:
        raise ValueError(f"{desc}: the archive split holds no images")

    def decode(i: int) -> np.ndarray:
        file = io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())
        return np.asarray(_open_rgb(file, f"image {i} of {source}", fix))

    first = decode(0)
    out = np.empty((n, first.shape[2], first.shape[0], first.shape[1]), dtype=np.uint8)
    for i in tqdm(range(n), desc=desc, unit="img", delay=2.0, mininterval=0.5, disable=not _PROGRESS.get()):
        image = first if i == 0 else decode(i)
        if image.shape != first.shape:
            raise ValueError(f"{desc}: image {i} is {image.shape[0]}x{image.shape[1]}, image 0 is "
                             f"{first.shape[0]}x{first.shape[1]}; an archive decoded into one array needs one size")
        out[i] = image.transpose(2, 0, 1)
    return out


def _archive_fix(name: str) -> str:
    """What to do about a damaged archive of data set ``name``."""
    file = ARCHIVE_DATASETS[name][1]
    if name == "imagenette":
        return (f"replace it with a fresh copy of {file}, or load fast.ai's imagenette2 folder instead "
                "(--data /path/to/imagenette2 --image-size 224)")
    return (f"replace it with a fresh copy of {file}, or pass --download (download=True) to read torchvision's "
            "official files instead")


def _read_npz(path: Path | io.BytesIO, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of the .npz ``path``; the errors of np.load (:data:`_NPZ_ERRORS`) if it is damaged."""
    # np.load of an .npz reads an array only when its key is accessed (checking the member's CRC-32),
    # so the JPEG bytes stay on disk when the decoded cache is used.
    loaded = np.load(path)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError("it holds a single .npy array, not an .npz archive")
    with loaded as archive:
        missing = [k for k in keys if k not in archive.files]
        if missing:
            raise ValueError(f"it lacks the array(s) {', '.join(missing)}; it has {', '.join(archive.files)}")
        return {k: archive[k] for k in keys}


def _read_archive_arrays(path: Path, name: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        return _read_npz(path, keys)
    except PermissionError:  # not damage: the message names the file already
        raise
    except _NPZ_ERRORS as error:
        raise DataFileError(f"{path} is damaged ({_reason(error)}); {_archive_fix(name)}") from error


def _split_problem(split: str, arrays: dict[str, np.ndarray], jpeg_bytes: int | None) -> str | None:
    """What is wrong with the offsets and labels of an archive split (None when they fit)."""
    offsets, labels, class_names = arrays[f"{split}_offsets"], arrays[f"{split}_labels"], arrays["class_names"]
    for key, array in ((f"{split}_offsets", offsets), (f"{split}_labels", labels)):
        if array.ndim != 1 or array.dtype.kind not in "iu":
            return f"{key} is {array.dtype} of shape {array.shape}, not a list of integers"
    if len(offsets) != len(labels) + 1:
        return f"{len(offsets)} {split} offsets for {len(labels)} labels (expected one more)"
    end = offsets[-1] if jpeg_bytes is None else jpeg_bytes
    if offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] != end:
        return f"its {split} offsets do not cut its {end:,} bytes of {split}_jpeg into {len(labels)} images"
    if len(labels) and not (0 <= labels.min() and labels.max() < len(class_names)):
        return f"its {split} labels {labels.min()}..{labels.max()} do not fit its {len(class_names)} class names"
    return None


def _check_archive_split(path: Path, name: str, split: str, arrays: dict[str, np.ndarray]) -> None:
    jpeg = arrays.get(f"{split}_jpeg")
    problem = _split_problem(split, arrays, None if jpeg is None else len(jpeg))
    if problem is not None:
        raise DataFileError(f"{path} is damaged ({problem}); {_archive_fix(name)}")


def _decoded_cache_path(archive: Path, split: str) -> Path:
    stat = archive.stat()
    where = hashlib.sha1(str(archive.resolve()).encode()).hexdigest()[:12]
    # size + mtime: a replaced archive gets a new cache file instead of stale pixels.
    return cache_dir() / "decoded" / f"{archive.stem}-{where}-{split}-{stat.st_size}-{stat.st_mtime_ns}.npz"


def _checksum(images: np.ndarray) -> int:
    # CRC-32 is cheap beside decoding: a fraction of a second for CIFAR-10's training split (timing in
    # benchmarks/RESULTS.md, "Numbers quoted in the code").
    return zlib.crc32(np.ascontiguousarray(images))


def _read_cache(path: Path, n: int) -> np.ndarray:
    """The ``n`` images cached at ``path``; the errors of np.load, or ValueError, if they cannot be trusted."""
    arrays = _read_npz(path, ["images", "crc32"])
    images, checksum = arrays["images"], arrays["crc32"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:2] != (n, 3):
        raise ValueError(f"it holds {images.dtype} images of shape {images.shape}, not {n} uint8 RGB images")
    if checksum.shape != () or int(checksum) != _checksum(images):
        raise ValueError("its pixels do not match their checksum")
    return images


def _load_cached(path: Path, n: int, archive: Path) -> np.ndarray | None:
    """The cached decode of ``archive``, or None when there is none, or none to trust (with a notice)."""
    if not path.exists():
        return None
    try:
        return _read_cache(path, n)
    except _NPZ_ERRORS as error:
        print(f"note: the decoded-image cache {path} is damaged ({_reason(error)}); decoding {archive} again to "
              "replace it", file=sys.stderr)
        return None


def _write_cache(path: Path, images: np.ndarray) -> None:
    """Atomic write (temporary file + rename) of the images and their checksum, and removal of caches of older
    versions of the archive (and of the cache format)."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, images=images, crc32=np.uint32(_checksum(images)))
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the decoded-image cache {path} ({e}); the archive will be decoded again "
                      f"next time. Set {CACHE_ENV} to a writable folder to cache it.", stacklevel=3)
        return
    stem = path.name.rsplit("-", 2)[0]
    for old in path.parent.glob(f"{stem}-*.np[yz]"):
        if old != path:
            old.unlink(missing_ok=True)


def _load_decoded_archive(path: Path, name: str, split: str) -> TensorImageDataset:
    meta = _read_archive_arrays(path, name, [f"{split}_labels", f"{split}_offsets", "class_names"])
    _check_archive_split(path, name, split, meta)
    labels, offsets = meta[f"{split}_labels"], meta[f"{split}_offsets"]
    cache = _decoded_cache_path(path, split)
    images = _load_cached(cache, len(labels), path)
    if images is None:
        jpeg = _read_archive_arrays(path, name, [f"{split}_jpeg"])[f"{split}_jpeg"]
        _check_archive_split(path, name, split, {**meta, f"{split}_jpeg": jpeg})
        images = decode_jpegs(jpeg, offsets, desc=f"decoding {name} {split}", source=str(path),
                              fix=f"the archive is damaged: {_archive_fix(name)}")
        _write_cache(cache, images)
    # The pixels are JPEG copies of the official ones: results must say so.
    return TensorImageDataset(torch.from_numpy(images), labels, meta["class_names"].tolist(), name=name, split=split,
                              description=f"{ARCHIVE_DATASETS[name][3]} (JPEG copy)")


def _load_lazy_archive(path: Path, name: str, split: str) -> JpegArchiveDataset:
    arrays = _read_archive_arrays(path, name, [f"{split}_jpeg", f"{split}_offsets", f"{split}_labels", "class_names"])
    _check_archive_split(path, name, split, arrays)
    return JpegArchiveDataset(arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"], arrays[f"{split}_labels"],
                              arrays["class_names"].tolist(), name=name, split=split,
                              description=ARCHIVE_DATASETS[name][3], source=str(path),
                              fix=f"the archive is damaged: {_archive_fix(name)}")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch files and nothing else: only the globals a pickled dict of numpy
    arrays needs may load, so a tampered file cannot run code."""

    allowed = frozenset({
        ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"CIFAR batch files hold only numpy arrays and lists; refusing to "
                                         f"load {module}.{name}")
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        return super().find_class(module, name)


def _damaged_cifar(path: Path, problem: str) -> DataFileError:
    return DataFileError(f"{path} is damaged or not an official CIFAR file ({problem}); remove the folder "
                         f"{path.parent} and reload with --download (download=True, on a machine with internet) to "
                         "fetch it again")


def _read_cifar_pickle(path: Path, keys: Sequence[str]) -> dict[str, object]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from torchvision's CIFAR folder; remove the folder and "
                                "reload with --download (download=True, on a machine with internet) to fetch it again")
    with open(path, "rb") as f:
        try:
            # latin1, like torchvision: the official files were pickled by Python 2.
            entry = _CifarUnpickler(f, encoding="latin1").load()
        except Exception as error:  # a garbled pickle can raise almost any exception type
            raise _damaged_cifar(path, _reason(error)) from error
    if not isinstance(entry, dict):
        raise _damaged_cifar(path, f"it holds a {type(entry).__name__}, not a pickled dict")
    # Keys are str in the official files and bytes in files written by Python 3 with b"..." keys.
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    missing = [k for k in keys if k not in entry]
    if missing:
        raise _damaged_cifar(path, f"it lacks the key(s) {', '.join(missing)} of torchvision's CIFAR format; it has "
                                   f"{', '.join(map(str, entry))}")
    return entry


def _cifar_class_names(path: Path, names_key: str) -> list[str]:
    names = _read_cifar_pickle(path, [names_key])[names_key]
    if not isinstance(names, (list, tuple)) or not names:
        raise _damaged_cifar(path, f"its {names_key!r} is not a list of names")
    return [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in names]


def _cifar_batch(path: Path, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``(N x 3072 uint8 rows, N labels)`` of one CIFAR batch file, checked."""
    entry = _read_cifar_pickle(path, ["data", labels_key])
    try:
        data, labels = np.asarray(entry["data"]), np.asarray(entry[labels_key])
    except (TypeError, ValueError) as error:
        raise _damaged_cifar(path, _reason(error)) from error
    if data.dtype.kind not in "iu" or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _damaged_cifar(path, f"'data' must hold rows of 3072 integers (3 x 32 x 32), it holds {data.dtype} of "
                                   f"shape {data.shape}")
    if data.dtype != np.uint8 and len(data) and not (0 <= data.min() and data.max() <= 255):
        raise _damaged_cifar(path, f"its pixels {data.min()}..{data.max()} do not fit 0..255")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise _damaged_cifar(path, f"{len(labels) if labels.ndim == 1 else labels.shape} labels for {len(data)} "
                                   "images")
    return data.astype(np.uint8, copy=False), labels.astype(np.int64)


def _load_torchvision_cifar(folder: Path, name: str, split: str) -> TensorImageDataset:
    """Read torchvision's ``cifar-10-batches-py`` / ``cifar-100-python`` folder (no md5 check)."""
    _, files, meta_file, names_key, labels_key = TORCHVISION_CIFAR[name]
    batches = [_cifar_batch(folder / f, labels_key) for f in files[split]]
    class_names = _cifar_class_names(folder / meta_file, names_key)
    for f, (_, batch_labels) in zip(files[split], batches, strict=True):
        if len(batch_labels) and not (0 <= batch_labels.min() and batch_labels.max() < len(class_names)):
            raise _damaged_cifar(folder / f, f"its labels {batch_labels.min()}..{batch_labels.max()} do not fit the "
                                             f"{len(class_names)} classes of {meta_file}")
    data = np.concatenate([rows for rows, _ in batches])
    labels = np.concatenate([batch_labels for _, batch_labels in batches])
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
        raise RuntimeError(f"downloading {name} into {root} failed ({e}); --download (download=True) needs internet "
                           f"access. Otherwise pass --data-root (root=, or set {DATA_ENV}) to a folder holding "
                           f"{name}_jpeg.npz") from e


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
        raise ValueError(f"{name} images are {native}x{native}; --image-size {image_size} (image_size=) is only for "
                         "image folders. "
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
        f"To get it: --download (load_dataset({name!r}, download=True)) on a machine with internet (torchvision "
        f"downloads the official files into {folder}), or pass --data-root (root=, or set {DATA_ENV}) to the folder "
        f"holding {archive.name}."))


def _load_imagenette(split: str, root: Path, download: bool) -> JpegArchiveDataset:
    archive = root / ARCHIVE_DATASETS["imagenette"][1]
    if archive.is_file():
        return _load_lazy_archive(archive, "imagenette", split)
    hint = "--download (download=True) cannot fetch it (only CIFAR downloads). " if download else ""
    raise _not_found("imagenette", [archive], (
        f"To get it: {hint}pass --data-root (root=, or set {DATA_ENV}) to the folder holding {archive.name}, or "
        "download fast.ai's imagenette2 (https://github.com/fastai/imagenette) and load its folder: --data "
        "/path/to/imagenette2 --image-size 224 (load_dataset('/path/to/imagenette2', split='val', image_size=224))."))


def _say_folder_not_read(name: str, roots: list[Path]) -> None:
    """A data set's name is the data set, even where a folder of that name holds images (./cifar10/<class>/...): said
    on stderr, with the spelling that reads the folder (that folder was read from the archive without a word)."""
    folder = Path(name).expanduser()
    if not folder.is_dir() or any(folder.resolve() == r.resolve() for r in roots):
        return
    own = {entry[0] for entry in TORCHVISION_CIFAR.values()}  # a data root holding torchvision's files is no images
    if not [c for c in class_folders(folder) if c not in own]:
        return
    print(f"note: {name!r} is the data set {name} (its archive, as documented); the image folder ./{name} is not "
          f"read: to read it, give its path (./{name})", file=sys.stderr)


def class_folders(root: Path) -> list[str]:
    """The class sub-folders of an image folder, sorted (labels are their indices), hidden ones left out."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def _load_folder(folder: Path, split: str, image_size: int | None, skip_bad_images: bool) -> ImageFolderDataset:
    if (folder / split).is_dir():
        splits = {folder / name for name in SPLIT_FOLDER_NAMES if (folder / name).is_dir()} | {folder / split}
        classes = sorted({name for path in splits for name in class_folders(path)})
        return ImageFolderDataset(folder / split, image_size=image_size, split=split, skip_bad_images=skip_bad_images,
                                  class_names=classes)
    split_folders = [s for s in SPLIT_FOLDER_NAMES if (folder / s).is_dir()]
    if split_folders:
        # Without this check the split folders themselves would silently become the classes.
        raise ValueError(f"{folder} has split sub-folders ({', '.join(split_folders)}) but no {split!r}; "
                         f"pass split= (--split on the command line) one of them")
    return ImageFolderDataset(folder, image_size=image_size, skip_bad_images=skip_bad_images)


def sample_path() -> Traversable:
    """The built-in sample's archive inside the installed package."""
    return resources.files(__package__) / "sample_data" / SAMPLE_ARCHIVE


def load_sample() -> SampleDataset:
    """The built-in sample: CIFAR-10's first 1,000 test images in the official order (JPEG copy).

    Its JPEG bytes are those of ``cifar10_jpeg.npz``, so its pixels equal the full copy's. Decoding
    takes a fraction of a second, so it is not cached.
    """
    keys = [f"{SAMPLE_SPLIT}_jpeg", f"{SAMPLE_SPLIT}_offsets", f"{SAMPLE_SPLIT}_labels", "class_names"]
    fix = f"reinstall ssl_patch_analysis to get an intact copy; {FULL_CIFAR10_HINT}"
    try:
        # read_bytes: works wherever the package lives, a zip file included.
        arrays = _read_npz(io.BytesIO(sample_path().read_bytes()), keys)
    except _NPZ_ERRORS as error:
        raise DataFileError(f"the built-in sample {sample_path()} is damaged ({_reason(error)}); {fix}") from error
    jpeg, offsets, labels, class_names = (arrays[k] for k in keys)
    images = decode_jpegs(jpeg, offsets, desc=f"decoding the {SAMPLE_DATASET} sample", source=str(sample_path()),
                          fix=fix)
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


def default_split(name: str | Path) -> str:
    """The split a command uses when none is given: the one split of a data set that has one (``val`` for
    Imagenette), else ``test``."""
    splits = ARCHIVE_DATASETS.get(str(name).lower(), (("test",),))[0]
    return splits[0] if len(splits) == 1 else "test"


def load_dataset(name: str, split: str = "test", root: str | Path | None = None, download: bool = False,
                 image_size: int | None = None, skip_bad_images: bool = False) -> ImageDataset:
    """Load a data set by name (``cifar10``, ``cifar100``, ``imagenette``) or by image-folder path.

    ``root`` is the folder holding the data (default :func:`data_roots`). For a folder path,
    ``<path>/<split>`` is used when it exists (e.g. ``imagenette2/val``), else ``<path>`` itself;
    ``image_size`` resizes and centre-crops folder images to a square (archives keep their native
    size). When CIFAR-10 is in none of the roots, ``cifar10`` ``test`` is the built-in sample
    (:func:`load_sample`, with a notice on stderr); other absent data raise FileNotFoundError naming
    every path tried. Damaged data raise :class:`DataFileError` naming the file and what to do;
    ``skip_bad_images=True`` leaves out an image folder's unreadable files instead, listing them
    (:class:`ImageFolderDataset`). An archive is checked as a whole: it has no images to leave out.
    """
    key = name.lower()
    if key in ARCHIVE_DATASETS:
        splits, _, native, _ = ARCHIVE_DATASETS[key]
        _check_split(key, split, splits)
        _check_native_size(key, image_size, native)
        if skip_bad_images:
            raise ValueError(f"skip_bad_images (--skip-bad-images) is for image folders: {key} is read from an "
                             "archive, which is checked as a whole (a damaged one must be replaced)")
        loader = _load_imagenette if key == "imagenette" else partial(_load_cifar, key)
        roots = [Path(root).expanduser()] if root is not None else data_roots()
        _say_folder_not_read(name, roots)
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
        return _load_folder(folder, split, image_size, skip_bad_images)
    raise ValueError(f"unknown data set {name!r}: known names are {', '.join(ARCHIVE_DATASETS)}, "
                     "or give the path of an image folder (<folder>/<class>/<image>)")


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.data says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
