"""Dense patch embeddings, fast: crop and resize every box of a batch on the device, embed in chunks.

``extract_patch_embeddings(model, data, sampler)`` gives, for every image, the embedding ``h`` (and
the projection ``z``, EMP-SSL's ``pre_feature``) of each patch the sampler places on it. Per batch
of images: the uint8 pixels go to the device, the boxes of all patches are cut and resized there by
``torchvision.ops.roi_align`` (or gathered exactly when no resize is needed), and the patches go
through the model in chunks under ``torch.inference_mode`` and ``channels_last`` (bf16 autocast by
default on CUDA, on request on the CPU; ``compile=True`` adds ``torch.compile``). With ``out=DIR``
the rows stream into a resumable on-disk store (:mod:`.store`), so memory does not grow with the
data set and an interrupted run continues where it stopped.

Command line (``torchrun --nproc_per_node=K -m ssl_patch_analysis.extract ...`` shares the images
between K processes writing one store)::

    python -m ssl_patch_analysis.extract --model M --data cifar10 --split test --grid 8 --stride 4 --store DIR
    python -m ssl_patch_analysis.extract --model dino-vits16 --tokens --block 9 --store DIR  # a ViT's own tokens
    python -m ssl_patch_analysis.extract --verify --store DIR  # check every checksum of a store, list any damage

Re-running the same command resumes an interrupted store and repairs a damaged one (only its
damaged batches are extracted again); one run at a time writes a store (the others wait).
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import hashlib
import inspect
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import roi_align
from tqdm import tqdm

from . import cli
from .augment import Augmentation, resolve_blur_kernel
from .cli import UserError
from .data import DataFileError, ImageDataset, TensorImageDataset
from .models import ResNet, SSLModel
from .patches import PatchSampler, central, grid, random_fixed, random_resized
from .store import (
    LAYERS,
    STORE_DTYPES,
    PatchEmbeddings,
    StoreLayout,
    StorePlan,
    StoreWriter,
    done_batches,
    prepare_store,
    read_store_meta,
    repair_advice,
    store_lock,
    verify_store,
)

# Patches per forward pass when chunk_size is not given. On a GPU, large chunks fill the device;
# small inputs (CIFAR-sized) are cheap per patch, ImageNet-sized ones take ~50x the activation memory.
DEFAULT_CHUNK_SMALL_INPUT = 1024
DEFAULT_CHUNK_LARGE_INPUT = 256
SMALL_INPUT_MAX_SIDE = 64
# On a CPU, throughput falls once a chunk's activations leave the caches (measured on 2 cores:
# CIFAR ResNet-18 240 patches/s at 64 per chunk vs 73 at 1024; ResNet-50 at 224 px 19 at 4-9 per
# chunk vs 11 at 64), so the CPU chunk holds about 64 patches of 32x32 pixels, and no fewer than 8.
CPU_CHUNK_PIXELS = 64 * 32 * 32
CPU_CHUNK_RANGE = (8, 64)
# Mixed into the seed of each image's augmentation stream: the samplers key their boxes by the same
# (seed, image id), and the two must not draw the same random numbers.
_AUGMENTATION_STREAM = 0x6175676D656E74  # "augment"
_MASK64 = (1 << 64) - 1


def default_chunk_size(input_size: int, device: torch.device) -> int:
    """Patches per forward pass for inputs of ``input_size`` squared on ``device``."""
    if device.type == "cpu":
        low, high = CPU_CHUNK_RANGE
        return max(low, min(high, CPU_CHUNK_PIXELS // (input_size * input_size)))
    return DEFAULT_CHUNK_SMALL_INPUT if input_size <= SMALL_INPUT_MAX_SIDE else DEFAULT_CHUNK_LARGE_INPUT


def crop_patches(images: torch.Tensor, boxes: torch.Tensor, output_size: int) -> torch.Tensor:
    """Cut the boxes ``B x P x 4`` (``x0, y0, x1, y1``) out of ``images`` ``B x 3 x H x W``, each resized to
    ``output_size`` squared: returns ``(B * P) x 3 x S x S``, patch ``k`` from image ``k // P``.

    ``images`` are floats. When every box already is ``output_size`` pixels on integer positions the
    pixels are gathered exactly; otherwise one ``roi_align`` call (``aligned=True``: pixel ``i``
    spans ``[i, i + 1)``) samples every box, averaging ``ceil(box / output)`` points per output
    pixel and axis so that shrinking a large box does not alias.
    """
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be float B x 3 x H x W, got {images.dtype} of shape {tuple(images.shape)}")
    if boxes.ndim != 3 or boxes.shape[0] != images.shape[0] or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be B x P x 4 with B={images.shape[0]}, got shape {tuple(boxes.shape)}")
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    flat = boxes.reshape(-1, 4)
    _check_boxes(flat, images.shape[-2:])
    return crop_checked_patches(images, boxes, output_size, exact=_is_exact(flat, output_size))


def crop_checked_patches(images: torch.Tensor, boxes: torch.Tensor, output_size: int, *, exact: bool) -> torch.Tensor:
    """:func:`crop_patches` for boxes already checked (inside the images, non-empty) and whose exactness
    (:func:`boxes_are_exact`) is known: no checks, so no wait for the device (the trainer checks the
    boxes of a whole epoch once, on the CPU, and crops every step without a host sync)."""
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    image_index = torch.arange(boxes.shape[0], device=images.device).repeat_interleave(boxes.shape[1])
    return _crop(images, boxes.reshape(-1, 4), image_index, output_size, exact)


def check_boxes(boxes: torch.Tensor, image_size: Sequence[int]) -> None:
    """Raise ValueError naming the first box (``... x 4``) that is empty or leaves an ``H x W`` image."""
    _check_boxes(boxes.reshape(-1, 4).float(), image_size)


def boxes_are_exact(boxes: torch.Tensor, output_size: int) -> bool:
    """Whether every box (``... x 4``) is ``output_size`` pixels on integer edges: cropped by gathering pixels."""
    return _is_exact(boxes.reshape(-1, 4).float(), output_size)


def _is_exact(boxes: torch.Tensor, output_size: int) -> bool:
    """Whether every box is ``output_size`` wide and high on integer pixel edges (no resampling needed)."""
    sizes = boxes[:, 2:] - boxes[:, :2]
    return bool((sizes == output_size).all() and (boxes == boxes.round()).all())


def _check_boxes(boxes: torch.Tensor, image_size: Sequence[int]) -> None:
    height, width = int(image_size[0]), int(image_size[1])
    inside = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= width) & (boxes[:, 3] <= height)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    bad = ~(inside & nonempty)
    if bool(bad.any()):
        box = [round(float(v), 2) for v in boxes[int(bad.nonzero()[0])]]
        raise ValueError(
            f"box {box} (x0, y0, x1, y1) is empty or leaves the {height}x{width} image: the sampler must place "
            "every patch inside the image (use a smaller patch size)"
        )


def _crop(images: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor, size: int, exact: bool) -> torch.Tensor:
    if exact:
        offsets = torch.arange(size, device=images.device)
        rows = boxes[:, 1].long()[:, None] + offsets
        cols = boxes[:, 0].long()[:, None] + offsets
        # Advanced indexing puts the index dimensions first: K x S x S x 3, i.e. channels_last.
        return images[image_index[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    rois = torch.cat([image_index[:, None].to(boxes.dtype), boxes], dim=1)
    parts = min(torch.get_num_threads(), rois.shape[0]) if images.device.type == "cpu" else 1
    if parts <= 1:
        return _roi_align(images, rois, size)
    # torchvision's CPU roi_align runs on one core. Each box is cropped independently, so the boxes
    # are shared between threads (the op releases the GIL), each writing its rows of the output:
    # the same result, about 1.5x faster on 2 cores.
    out = images.new_empty((rois.shape[0], 3, size, size)).contiguous(memory_format=torch.channels_last)
    bounds = np.linspace(0, rois.shape[0], parts + 1).astype(int)
    inference = torch.is_inference_mode_enabled()  # thread-local: the threads take the caller's mode

    def crop_part(part: int) -> None:
        start, stop = bounds[part], bounds[part + 1]
        with torch.inference_mode(inference), torch.no_grad():
            out[start:stop].copy_(_roi_align(images, rois[start:stop], size))

    list(_crop_pool().map(crop_part, range(parts)))
    return out


def _roi_align(images: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    # sampling_ratio=-1: ceil(box side / output side) samples per bin and axis, chosen per box.
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


@functools.lru_cache(maxsize=1)
def _crop_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="crop")


class _ImageSource:
    """The images to embed, whatever form they came in: ``get_batch(indices) -> B x 3 x H x W``."""

    def __init__(self, data: ImageDataset | torch.Tensor | np.ndarray):
        if isinstance(data, (torch.Tensor, np.ndarray)):
            images = torch.as_tensor(data)
            if images.ndim != 4 or images.shape[1] != 3:
                channels_last = images.ndim == 4 and images.shape[-1] == 3
                raise ValueError(
                    f"images must be N x 3 x H x W (RGB, channels first), got shape {tuple(images.shape)}"
                    + ("; permute(0, 3, 1, 2) N x H x W x 3 images first" if channels_last else "")
                )
            if images.dtype != torch.uint8 and not images.is_floating_point():
                raise ValueError(f"images must be uint8 (0..255) or float (0..1), got {images.dtype}")
            if images.is_floating_point() and not bool(torch.isfinite(images).all()):
                bad = (~torch.isfinite(images)).flatten(1).any(dim=1).nonzero().flatten()
                raise ValueError(f"images hold NaN or infinite pixels (image {int(bad[0])} first, {len(bad)} images "
                                 "in all): every patch embedding of them would be NaN")
            if images.is_floating_point() and images.numel() and (images.min() < 0 or images.max() > 1):
                low, high = float(images.min()), float(images.max())
                raise ValueError(
                    f"float images must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
                    "pass uint8 pixels or divide by 255"
                )
            self.images: torch.Tensor | None = images
            self.dataset: ImageDataset | None = None
            self.name, self.split, self.class_names = "tensor", "", []
            self.labels = np.full(len(images), -1, dtype=np.int64)
            self.image_size = (int(images.shape[2]), int(images.shape[3]))
            self.lazy = False
        elif hasattr(data, "get_batch") and hasattr(data, "labels"):
            if data.image_size is None:
                raise ValueError(
                    f"the images of {data.name} vary in size, but one batch of boxes needs one size: load it with "
                    "load_dataset(..., image_size=S) (--image-size S) to resize and centre-crop every image to S x S"
                )
            self.images = data.images if isinstance(data, TensorImageDataset) else None
            self.dataset = data
            self.name, self.split, self.class_names = data.name, data.split, list(data.class_names)
            self.labels = np.asarray(data.labels, dtype=np.int64)
            self.image_size = (int(data.image_size[0]), int(data.image_size[1]))
            self.lazy = not isinstance(data, TensorImageDataset)
        else:
            raise ValueError(
                "data must be an ImageDataset (load_dataset(...)) or an N x 3 x H x W tensor, "
                f"got {type(data).__name__}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: np.ndarray) -> torch.Tensor:
        if self.images is not None:
            return self.images[torch.from_numpy(indices)]
        batch = self.dataset.get_batch(torch.from_numpy(indices))  # type: ignore[union-attr]
        if batch.dtype != torch.uint8 or tuple(batch.shape[1:]) != (3, *self.image_size):
            raise ValueError(
                f"{self.name} returned a batch of {batch.dtype} {tuple(batch.shape)}, expected uint8 "
                f"B x 3 x {self.image_size[0]} x {self.image_size[1]}"
            )
        return batch

    def fingerprint(self, ids: np.ndarray) -> dict[str, Any]:
        """What identifies the data of the images ``ids`` in a store's settings: names, sizes, labels, and
        their content -- the pixels of in-memory data, the JPEG bytes of an archive, the files' sizes and
        modification times of an image folder -- so a store never outlives a change to its images."""
        description: dict[str, Any] = {
            "name": self.name, "split": self.split, "size": len(self), "image_size": list(self.image_size),
            "labels_sha256": hashlib.sha256(self.labels.tobytes()).hexdigest(),
        }
        every = len(ids) == len(self) and bool((ids == np.arange(len(self))).all())
        if self.images is not None:
            description["pixels_sha256"] = tensor_sha256(self.images if every else self.images[torch.from_numpy(ids)])
        elif hasattr(self.dataset, "paths") and hasattr(self.dataset, "root"):
            description["files_sha256"] = _files_sha256(self.dataset.root, [self.dataset.paths[i] for i in ids])
        elif hasattr(self.dataset, "jpeg") and hasattr(self.dataset, "offsets"):
            digest = hashlib.sha256()
            jpeg, offsets = self.dataset.jpeg, self.dataset.offsets
            for i in ids.tolist():
                digest.update(memoryview(np.ascontiguousarray(jpeg[offsets[i]:offsets[i + 1]])).cast("B"))
            description["jpeg_sha256"] = digest.hexdigest()
        return description


def _files_sha256(root: str | os.PathLike, paths: Sequence[str | os.PathLike]) -> str:
    """A digest of each file's path under ``root``, size and modification time (a replaced image changes it)."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class _BatchReader(Dataset):
    """One item per batch of images, so DataLoader workers decode whole batches in parallel."""

    def __init__(self, source: _ImageSource, batches: Sequence[np.ndarray]):
        self.source, self.batches = source, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.source.get_batch(self.batches[k])


def tensor_sha256(tensor: torch.Tensor) -> str:
    """The sha256 of a tensor's bytes (on the host, row-major), hashed in place: a store's pixels, a model's
    weights, the trainer's images."""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(raw.numpy())).hexdigest()


def model_sha256(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer (names, dtypes, shapes, values): which weights made a store."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(bytes.fromhex(tensor_sha256(tensor)))
    return digest.hexdigest()


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(value: Any, world_size: int) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _autocast_choice(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """The autocast dtype: by default bf16 (fp16 on GPUs without bf16) on CUDA and none on the CPU,
    where ``amp=True`` gives bf16 (fast on CPUs with AMX or AVX512-BF16 units, see :func:`cpu_has_bf16`)."""
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def _autocast_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """:func:`_autocast_choice`, warning once per caller's line when it is bf16 on a CPU without bf16 units."""
    dtype = _autocast_choice(device, amp)
    if dtype is not None and device.type == "cpu":
        warn_if_bf16_is_slow(device)
    return dtype


def extraction_precision(device: str | torch.device | None = None, amp: bool | None = None) -> str:
    """The precision :func:`extract_patch_embeddings` would compute in with these ``device`` and ``amp`` (None:
    the enclosing :func:`extraction_options`, then the defaults): ``"float32"``, ``"bfloat16"`` or
    ``"float16"``, as a store's ``meta["precision"]`` records it. Warns nothing."""
    amp = _OPTIONS.get().get("amp") if amp is None else amp
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return str(_autocast_choice(device, amp) or torch.float32).removeprefix("torch.")


_OPTIONS: contextvars.ContextVar[dict[str, bool]] = contextvars.ContextVar(
    "extraction_options", default={})  # noqa: B039 - never mutated: extraction_options sets a new dict


@contextlib.contextmanager
def extraction_options(*, amp: bool | None = None, compile: bool | None = None) -> Iterator[None]:
    """Defaults of ``amp`` and ``compile`` for every :func:`extract_patch_embeddings` call in the block
    that does not pass them itself: how the analyses (convergence, heatmap, retrieval, evaluate) take
    ``--amp`` / ``--compile``. None leaves a default as it is::

        with extraction_options(amp=True, compile=True):
            result = convergence_curve(model, data)
    """
    chosen = {name: value for name, value in (("amp", amp), ("compile", compile)) if value is not None}
    token = _OPTIONS.set({**_OPTIONS.get(), **chosen})
    try:
        yield
    finally:
        _OPTIONS.reset(token)


_last_compiled: tuple[int, str, str] | None = None


def _compile(model: SSLModel, weights_sha256: str, device: torch.device) -> torch.nn.Module:
    """``torch.compile(model)``, never serving a graph compiled for other weights.

    Freezing bakes the weights into the compiled graph as constants, and torch.compile's cache is
    keyed by the module object, not by its weights: a model compiled before its weights changed would
    silently give the old embeddings. So when the model or its weights differ from the last ones
    compiled here, torch.compile's caches are reset (``torch._dynamo.reset()``, which also drops any
    other compiled code of this process; it recompiles on its next call).
    """
    global _last_compiled
    key = (id(model), weights_sha256, str(device))
    if key != _last_compiled:
        torch._dynamo.reset()
        _last_compiled = key
    return torch.compile(model, dynamic=False)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16), where ``amp=True`` pays off."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


class SlowBf16Warning(UserWarning):
    """bf16 autocast asked for on a CPU that has no bf16 units: it runs, several times slower than float32."""


def warn_if_bf16_is_slow(device: str | torch.device) -> None:
    """Warn when bf16 autocast is to run on a CPU without bf16 units, where PyTorch emulates it: a CIFAR ResNet-18
    extraction ran 8.4x slower than float32 on a 2-core AVX2 CPU (benchmarks/RESULTS.md). The run goes on, as asked;
    the warning says what to leave out, and points at the caller's line outside this package (so it shows once per
    line of a user's code, not once per extraction)."""
    if torch.device(device).type == "cpu" and not cpu_has_bf16():
        warnings.warn("bf16 autocast on a CPU without bf16 units (AMX or AVX512-BF16) runs several times slower than "
                      "float32 here: leave out --amp (amp=True) on this machine", SlowBf16Warning,
                      stacklevel=_outside_package_stacklevel())


def _outside_package_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, for a warning raised by this function's caller, of the first frame outside
    this package (Python 3.12's ``skip_file_prefixes``)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


class _Embedder:
    """Runs patches through the model in chunks, halving the chunk when CUDA runs out of memory.

    With ``compile=True`` the model runs through ``torch.compile`` (inductor, weights frozen as
    constants); a last, partial chunk is padded to the chunk size so that one compiled graph serves
    every chunk (eval mode: the padding rows do not touch the others, and are dropped).
    """

    def __init__(self, model: SSLModel, device: torch.device, layers: Sequence[str], chunk_size: int,
                 amp_dtype: torch.dtype | None, compile: bool = False, weights_sha256: str | None = None):
        self.model, self.device, self.layers = model, device, list(layers)
        self.chunk_size, self.amp_dtype = chunk_size, amp_dtype
        self.compiled = _compile(model, weights_sha256 or model_sha256(model), device) if compile else None
        self._compiled_ok = False
        self._warned = False

    def _run_model(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.compiled is None:
            return self.model(patches)
        from torch._inductor import config as inductor_config

        try:
            # Freezing folds the weights into the graph as constants (BatchNorm into the convolutions,
            # oneDNN's prepacked bf16 weights on the CPU); passed as compile options it is not applied.
            with inductor_config.patch(freezing=True):
                outputs = self.compiled(patches)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # inductor needs a C++ compiler (CPU) or Triton (CUDA)
            if self._compiled_ok:
                raise
            raise RuntimeError(
                f"torch.compile could not compile the model ({type(error).__name__}: {str(error)[:500]}); "
                "run without compile=True / --compile"
            ) from error
        self._compiled_ok = True
        return outputs

    def halve_chunk(self, unit: str, units: str) -> None:
        """After CUDA ran out of memory: halve the chunk (warned once), or say what to do when it holds one item."""
        if self.chunk_size == 1:
            raise RuntimeError(f"CUDA ran out of memory embedding a single {unit}: use a smaller --resize-to or "
                               "another device") from None
        self.chunk_size = max(1, self.chunk_size // 2)
        torch.cuda.empty_cache()
        if not self._warned:
            warnings.warn(f"CUDA ran out of memory; continuing with chunks of {self.chunk_size} {units} "
                          "(pass a smaller chunk_size / --chunk-size to start there)", RuntimeWarning, stacklevel=3)
            self._warned = True

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        count = patches.shape[0]
        if self.compiled is not None and count < self.chunk_size:
            patches = torch.cat([patches, patches.new_zeros(self.chunk_size - count, *patches.shape[1:])])
        patches = patches.contiguous(memory_format=torch.channels_last)
        enabled = self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=enabled):
            outputs = self._run_model(patches)
        return {name: outputs[name][:count].float() for name in self.layers}

    def embed(self, images: torch.Tensor, boxes: torch.Tensor, size: int, exact: bool,
              host: dict[str, torch.Tensor], augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Embed every box of one batch into the host buffers ``host`` (``K x D`` rows, K = B * P).

        ``augment`` maps the batch's ``K`` float ``[0, 1]`` crops to augmented ones before the model
        sees them. It needs every patch of an image at once, so the whole batch is cropped first then;
        the forward passes keep the same chunks, so an identity ``augment`` changes nothing.
        """
        num_patches = boxes.shape[1]
        flat = boxes.reshape(-1, 4)
        augmented = None
        if augment is not None:
            augmented = augment(_crop(images, flat, torch.arange(flat.shape[0], device=self.device) // num_patches,
                                      size, exact))
        start = 0
        while start < flat.shape[0]:
            stop = min(start + self.chunk_size, flat.shape[0])
            index = torch.arange(start, stop, device=self.device)
            try:
                patches = (augmented[start:stop] if augmented is not None
                           else _crop(images, flat[start:stop], index // num_patches, size, exact))
                outputs = self.forward(patches)
            except torch.OutOfMemoryError:
                self.halve_chunk("patch", "patches")
                continue
            for name in self.layers:
                # Cast on the device: float16 storage halves the transfer.
                host[name][start:stop].copy_(outputs[name].to(host[name].dtype), non_blocking=True)
            start = stop


def _augmentation_generator(seed: int, image_id: int) -> torch.Generator:
    """The CPU generator that draws the augmentation of one image's patches under one seed."""
    state = np.random.SeedSequence([_AUGMENTATION_STREAM, seed & _MASK64, int(image_id)]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def augment_patches(patches: torch.Tensor, image_ids: Sequence[int] | np.ndarray, augmentation: Augmentation,
                    seed: int = 0) -> torch.Tensor:
    """``augmentation`` applied to the float ``[0, 1]`` patches ``(B * P) x 3 x S x S`` of the images
    ``image_ids`` (patch ``k`` from image ``k // P``), image by image.

    The ``P`` patches of one image draw their random parameters from a CPU generator keyed by
    ``(seed, image id)`` (a stream apart from the samplers'), so an image's augmentation does not
    depend on the batch it is in, the chunk size, the device, or whether a store was resumed.
    """
    if len(image_ids) == 0 or patches.shape[0] % len(image_ids):
        raise ValueError(f"need the same number of patches for each of the {len(image_ids)} images, got "
                         f"{patches.shape[0]} patches")
    per_image = patches.shape[0] // len(image_ids)
    return torch.cat([augmentation(patches[k * per_image:(k + 1) * per_image], _augmentation_generator(seed, i))
                      for k, i in enumerate(np.asarray(image_ids).tolist())])


# ----------------------------------------------------------------------------- a ViT's own patch tokens


@dataclass(frozen=True)
class TokenSampler(PatchSampler):
    """Where a Vision Transformer's patch tokens are: token ``(i, j)`` of its ``rows x cols`` grid over an
    ``H x W`` image is the pixel square ``[j W / cols, i H / rows, (j + 1) W / cols, (i + 1) H / rows]``, row-major.

    The grid is what the ViT makes of the whole image fed at ``input_size`` pixels with ``token_size``-pixel
    patches; ``block`` is the transformer block (0 .. depth - 1) whose tokens are taken. Like every sampler
    it gives boxes only; :func:`extract_token_embeddings` embeds them, one forward pass per image. Made by
    :func:`token_sampler`, which checks them against the model.
    """

    kind: ClassVar[str] = "tokens"
    seed: ClassVar[int] = 0
    patch_size: ClassVar[None] = None
    grid: tuple[int, int]
    token_size: int
    input_size: int
    block: int

    def __post_init__(self) -> None:
        rows, cols = (int(v) for v in self.grid)
        if rows < 1 or cols < 1 or self.token_size < 1 or self.input_size < 1 or self.block < 0:
            raise ValueError(f"a token grid needs positive sides, token size and input size and a block >= 0, got "
                             f"grid {self.grid}, token_size {self.token_size}, input_size {self.input_size}, "
                             f"block {self.block}")
        object.__setattr__(self, "grid", (rows, cols))

    def num_patches(self, image_size: tuple[int, int]) -> int:
        _positive_image_size(image_size)
        return self.grid[0] * self.grid[1]

    def boxes(self, image_ids: Sequence[int] | torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        height, width = _positive_image_size(image_size)
        rows, cols = self.grid
        # Multiplied before dividing, in float64: the last edge is exactly the image side.
        ys = torch.arange(rows + 1, dtype=torch.float64) * height / rows
        xs = torch.arange(cols + 1, dtype=torch.float64) * width / cols
        y0, x0 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
        y1, x1 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
        one_image = torch.stack((x0, y0, x1, y1), dim=-1).reshape(-1, 4).to(torch.float32)
        return one_image.unsqueeze(0).repeat(len(image_ids), 1, 1)


def _positive_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2 or min(int(v) for v in image_size) < 1:
        raise ValueError(f"image_size must be (height, width) in pixels, got {tuple(image_size)!r}")
    return int(image_size[0]), int(image_size[1])


def vit_backbone(model: SSLModel) -> Any:
    """The model's :class:`~.vit.ViT` backbone; a one-line ``ValueError`` for any other backbone."""
    from .vit import ViT  # timm is imported only when tokens are asked for

    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, ViT):
        return backbone
    name = Path(str(model.info.source or model.info.arch or "the model")).stem
    kind = "a ResNet" if isinstance(backbone, ResNet) else f"a {type(backbone).__name__}, not a ViT"
    raise UserError(f"--tokens needs a Vision Transformer; {name} is {kind}: its patches go through the network "
                    "as crops (leave out --tokens / tokens=True)")


def token_sampler(model: SSLModel, resize_to: int | None = None, block: int | None = None) -> TokenSampler:
    """The :class:`TokenSampler` of ``model`` (a ViT) fed whole images at ``resize_to`` pixels (default its input
    size), taking the tokens of ``block`` (default the last; negative counts from the end).

    Raises a one-line ``ValueError`` for a model that is not a ViT, a side that is not a multiple of its
    patch size, or a block it does not have.
    """
    vit = vit_backbone(model)
    size = int(resize_to if resize_to is not None else model.preprocess.input_size)
    patch = int(vit.config.patch_size)
    if size < patch or size % patch:
        raise UserError(f"the whole image is fed to the ViT at {size} px, which is not a multiple of its {patch} px "
                        f"patches: pass --resize-to (resize_to) a multiple of {patch}, e.g. "
                        f"{max(patch, round(size / patch) * patch)}")
    return TokenSampler((size // patch, size // patch), patch, size, vit.block_index(block))


def describe_tokens(model: SSLModel, sampler: TokenSampler) -> dict[str, Any]:
    """What a token store holds, in its settings: the block, the depth and what ``h`` / ``z`` of a token are."""
    vit = vit_backbone(model)
    depth = len(vit.blocks)
    norm = "after the final norm" if vit.config.final_norm and not vit.config.fc_norm else "without a norm"
    return {
        "block": sampler.block, "depth": depth, "last_block": sampler.block == depth - 1,
        "grid": list(sampler.grid), "token_size": sampler.token_size, "input_size": sampler.input_size,
        "h": f"patch token of block {sampler.block} (of 0..{depth - 1}) {norm}",
        "z": "the model's projector applied to each token (eval mode)" if model.projector is not None else None,
        "whole_image": f"{vit.config.pooling}, of block {sampler.block}",
    }


class _TokenNetwork(nn.Module):
    """One forward pass per whole image: every patch token of one ViT block, and the whole-image embedding
    of that block (the model's pooling: the class token), each through the model's heads (``pre_feature``,
    projector ``z``) as a patch embedding would be. Outputs ``name`` (B x P x D) and ``whole_<name>`` (B x D)."""

    def __init__(self, model: SSLModel, block: int):
        super().__init__()
        self.model, self.block = model, block

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model
        whole, tokens = model.backbone.embed_tokens(model.normalize_pixels(x), self.block)
        count, dim = whole.shape
        # One batch of rows through the heads (eval mode: rows do not touch each other): the whole images first.
        rows = torch.cat([whole, tokens.flatten(2).transpose(1, 2).reshape(-1, dim)])
        outputs = {"h": rows}
        if model.pre_feature is not None:
            outputs["pre_feature"] = model.pre_feature(rows)
        if model.projector is not None:
            outputs["z"] = model.projector(outputs.get("pre_feature", rows))
        result = {name: value[count:].reshape(count, -1, value.shape[-1]) for name, value in outputs.items()}
        result.update({f"whole_{name}": value[:count] for name, value in outputs.items()})
        return result


class _TokenEmbedder:
    """Whole images through :class:`_TokenNetwork` in chunks of images (``_Embedder``'s autocast, compile and
    chunking), each resized to the input side as the central view is; writes ``P`` token rows per image into
    the host buffers of the layers, and one row per image into those named ``whole_<layer>``."""

    def __init__(self, network: _TokenNetwork, device: torch.device, outputs: Sequence[str], chunk_size: int,
                 amp_dtype: torch.dtype | None, compile: bool = False, weights_sha256: str | None = None):
        self.runner = _Embedder(network, device, outputs, chunk_size, amp_dtype, compile,  # type: ignore[arg-type]
                                weights_sha256)
        self.device = device

    def embed(self, images: torch.Tensor, boxes: torch.Tensor, size: int, exact: bool,
              host: dict[str, torch.Tensor], augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if augment is not None:
            raise ValueError("a patch augmentation does not apply to tokens (they are not cropped): leave it out")
        runner, count, per_image = self.runner, images.shape[0], boxes.shape[1]
        height, width = images.shape[-2:]
        whole_exact = height == width == size
        frame = torch.tensor([0.0, 0.0, float(width), float(height)], device=images.device).expand(count, 4)
        start = 0
        while start < count:
            stop = min(start + runner.chunk_size, count)
            try:
                pixels = images[start:stop] if whole_exact else _crop(
                    images, frame[start:stop], torch.arange(start, stop, device=images.device), size, False)
                outputs = runner.forward(pixels)
            except torch.OutOfMemoryError:
                runner.halve_chunk("image's tokens", "images")
                continue
            for name, buffer in host.items():
                value = outputs[name].reshape(-1, outputs[name].shape[-1]).to(buffer.dtype)
                rows = slice(start, stop) if name.startswith("whole_") else slice(start * per_image, stop * per_image)
                buffer[rows].copy_(value, non_blocking=True)
            start = stop


def _check_token_sampler(model: SSLModel, sampler: TokenSampler, size: int) -> None:
    expected = token_sampler(model, size, sampler.block)
    if expected != sampler:
        raise ValueError(f"this token sampler ({sampler.to_dict()}) is not the model's at {size} px "
                         f"({expected.to_dict()}): make it with token_sampler(model, resize_to, block)")


def extract_token_embeddings(
    model: SSLModel,
    data: ImageDataset | torch.Tensor | np.ndarray,
    *,
    block: int | None = None,
    resize_to: int | None = None,
    **options: Any,
) -> PatchEmbeddings:
    """A Vision Transformer's own patch tokens as patch embeddings: one forward pass per image.

    Each image is fed whole at ``resize_to`` pixels (default the model's input size; a multiple of the
    patch size), resized as the central view is. Row ``i`` holds every patch token of block ``block``
    (default the last; tokens of every block go through the final norm, as DINO's
    ``get_intermediate_layers``), row-major over the token grid, with its pixel square as its box
    (:class:`TokenSampler`): ``h`` of a token is the token, ``z`` (and ``pre_feature``) the model's
    heads applied to it in eval mode. ``options`` are :func:`extract_patch_embeddings`'s (``layers``,
    ``image_ids``, ``batch_size``, ``chunk_size`` -- images per forward pass here --, ``device``,
    ``out``, ``dtype``, ``amp``, ``compile``, ``overwrite``, ...): a store of tokens is resumable and
    checksummed like any other, and its settings (the sampler ``{"kind": "tokens", ...}`` and
    ``tokens``: the block) keep it apart from a store of crops. The whole-image embedding of the same
    block is :func:`whole_image_embeddings`. A model that is not a ViT raises a one-line ``ValueError``.
    """
    sampler = token_sampler(model, resize_to, block)
    return extract_patch_embeddings(model, data, sampler, resize_to=sampler.input_size, **options)


def whole_image_embeddings(
    model: SSLModel,
    data: ImageDataset | torch.Tensor | np.ndarray,
    *,
    block: int | None = None,
    layers: Sequence[str] | None = None,
    image_ids: Iterable[int] | np.ndarray | torch.Tensor | None = None,
    resize_to: int | None = None,
    batch_size: int = 64,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    num_workers: int | None = None,
) -> dict[str, np.ndarray]:
    """``{layer: N x D float32}``: the whole-image embedding of each image from the forward pass that gives its
    tokens (:func:`extract_token_embeddings` with the same ``block`` and ``resize_to``): the model's pooling of
    that block (the class token after the final norm; for the last block exactly the model's ``h`` of the
    image at that size), and the heads applied to it (``z``). For the tokens too, from the same pass, see
    :func:`tokens_and_whole_image_embeddings`."""
    arguments = dict(locals())
    return _token_pass(**arguments, with_tokens=False, progress=False)[1]


def tokens_and_whole_image_embeddings(
    model: SSLModel, data: ImageDataset | torch.Tensor | np.ndarray, *, progress: bool = True, **options: Any,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(tokens, whole)``, both from one forward pass per image, in memory, float32: ``tokens[layer]`` is
    ``N x P x D``, every patch token of ``block`` row-major over the token grid (the rows of
    :func:`extract_token_embeddings`, whose boxes are :func:`token_sampler`'s), and ``whole[layer]`` is
    ``N x D``, :func:`whole_image_embeddings`, whose ``options`` these are (``block``, ``layers``, ``image_ids``,
    ``resize_to``, ``batch_size``, ``chunk_size``, ``device``, ``amp``, ``num_workers``). Half the forward passes
    of calling the two (what aggregation convergence of tokens needs); a store of tokens, resumable and
    checksummed, is :func:`extract_token_embeddings` with ``out``."""
    arguments = inspect.signature(whole_image_embeddings).bind(model, data, **options)
    arguments.apply_defaults()
    return _token_pass(**arguments.arguments, with_tokens=True, progress=progress)


def _token_pass(model: SSLModel, data: ImageDataset | torch.Tensor | np.ndarray, *, block: int | None,
                layers: Sequence[str] | None, image_ids: Iterable[int] | np.ndarray | torch.Tensor | None,
                resize_to: int | None, batch_size: int, chunk_size: int | None, device: str | torch.device | None,
                amp: bool | None, num_workers: int | None, with_tokens: bool, progress: bool,
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Whole images through :class:`_TokenNetwork` once: the tokens (when ``with_tokens``) and the whole-image
    embeddings of ``layers``, float32 in memory; an image whose embedding is not finite stops it, named."""
    amp = _OPTIONS.get().get("amp") if amp is None else amp
    compile = bool(_OPTIONS.get().get("compile", False))  # --compile of the command lines
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    source = _ImageSource(data)
    ids = _as_image_ids(image_ids, len(source))
    sampler = token_sampler(model, resize_to, block)
    size, per_image = sampler.input_size, sampler.num_patches(source.image_size)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    was_training = model.training
    model.eval().to(device)
    try:
        dims = _layer_dims(model, size, device)
        layers = list(dims) if layers is None else list(layers)
        unknown = [name for name in layers if name not in dims]
        if unknown:
            raise ValueError(f"layers must be among those the model has ({', '.join(dims)}), got {layers}")
        outputs = [f"whole_{name}" for name in layers] + (list(layers) if with_tokens else [])
        embedder = _TokenEmbedder(_TokenNetwork(model, sampler.block), device, outputs,
                                  chunk_size or default_chunk_size(size, device), _autocast_dtype(device, amp),
                                  compile)
        whole = {name: np.empty((len(ids), dims[name]), dtype=np.float32) for name in layers}
        tokens = {name: np.empty((len(ids), per_image, dims[name]), dtype=np.float32)
                  for name in (layers if with_tokens else [])}
        spans = _batches(len(ids), batch_size)
        batch_ids = [ids[span] for span in spans]
        with tqdm(total=len(ids), unit="img", disable=not progress, dynamic_ncols=True, mininterval=0.5,
                  desc=f"embedding {per_image} tokens/img") as bar:
            for span, these, pixels in zip(spans, batch_ids, _image_batches(source, batch_ids, device, num_workers),
                                           strict=True):
                # the embedder writes each batch's rows straight into the results (views of their rows)
                rows = {f"whole-image {name}": whole[name][span] for name in layers}
                rows.update({name: tokens[name][span] for name in tokens})
                host = {f"whole_{name}": torch.from_numpy(whole[name][span]) for name in layers}
                host.update({name: torch.from_numpy(tokens[name][span].reshape(-1, dims[name])) for name in tokens})
                with torch.inference_mode():
                    images = pixels.to(device)
                    images = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
                    embedder.embed(images, sampler.boxes(these, source.image_size), size, False, host)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                _check_finite_rows(rows, these, "float32")
                bar.update(len(these))
        return tokens, whole
    finally:
        model.train(was_training)


def _layer_dims(model: SSLModel, size: int, device: torch.device) -> dict[str, int]:
    """Every layer the model outputs, with its dimension, from one forward pass of a blank patch."""
    with torch.inference_mode():
        outputs = model(torch.zeros(1, 3, size, size, device=device))
    return {name: int(outputs[name].shape[-1]) for name in LAYERS if name in outputs}


def _as_image_ids(image_ids: Iterable[int] | np.ndarray | torch.Tensor | None, num_images: int) -> np.ndarray:
    if image_ids is None:
        return np.arange(num_images, dtype=np.int64)
    if isinstance(image_ids, torch.Tensor):
        ids = image_ids.cpu().numpy()
    else:
        ids = np.asarray(image_ids if isinstance(image_ids, np.ndarray) else list(image_ids))
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"image_ids must be a non-empty 1-D list of integer dataset indices, got {ids.dtype} of shape {ids.shape}"
        )
    if ids.min() < 0 or ids.max() >= num_images:
        raise ValueError(f"image_ids must lie in 0..{num_images - 1} (the data set has {num_images} images), "
                         f"got {int(ids.min())}..{int(ids.max())}")
    return ids.astype(np.int64)


def _batches(rows: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, rows)) for start in range(0, rows, batch_size)]


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers decoding images: min(4, CPUs) when a GPU computes, none on the CPU.

    On the CPU the forward pass already uses every core; workers only compete with it (starting two
    of them cost a 2-core machine about 0.25 s of the first chunk), and decoding is cheap beside a
    CPU forward pass.
    """
    return min(4, os.cpu_count() or 1) if device.type != "cpu" else 0


def _image_batches(source: _ImageSource, ids: Sequence[np.ndarray], device: torch.device,
                   num_workers: int | None) -> Iterator[torch.Tensor]:
    """The uint8 pixels of each list of image ids, decoded ahead by DataLoader workers when lazy."""
    if not source.lazy:
        yield from (source.get_batch(batch) for batch in ids)
        return
    workers = default_num_workers(device) if num_workers is None else num_workers
    loader = DataLoader(_BatchReader(source, ids), batch_size=None, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    yield from loader


def extract_patch_embeddings(
    model: SSLModel,
    data: ImageDataset | torch.Tensor | np.ndarray,
    sampler: PatchSampler,
    *,
    layers: Sequence[str] | None = None,
    image_ids: Iterable[int] | np.ndarray | torch.Tensor | None = None,
    batch_size: int = 64,
    chunk_size: int | None = None,
    resize_to: int | None = None,
    device: str | torch.device | None = None,
    out: str | os.PathLike | None = None,
    dtype: str = "float16",
    progress: bool = True,
    amp: bool | None = None,
    compile: bool | None = None,
    overwrite: bool = False,
    num_workers: int | None = None,
    augmentation: Augmentation | None = None,
    augmentation_seed: int = 0,
) -> PatchEmbeddings:
    """Embed every patch the ``sampler`` places on each image of ``data``.

    A :class:`TokenSampler` (:func:`token_sampler`) embeds a ViT's own patch tokens instead, one
    forward pass per whole image: see :func:`extract_token_embeddings`.

    - ``data``: an :class:`~.data.ImageDataset` or an ``N x 3 x H x W`` tensor (uint8 0..255 or
      float 0..1; its labels are then -1). All images must share one size.
    - ``layers``: among ``"h"``, ``"z"``, ``"pre_feature"`` (default: all the model has).
    - ``image_ids``: the dataset indices to embed (default all), in the order of the result's rows.
    - ``batch_size``: images per batch (the unit of progress on disk); ``chunk_size``: patches per
      forward pass (default: see :func:`default_chunk_size`), halved automatically when CUDA
      runs out of memory.
    - ``resize_to``: side every patch is resized to (default the model's ``preprocess.input_size``).
    - ``out``: a store directory to stream into (None keeps everything in memory). Re-running with
      the same settings resumes an interrupted store, or returns a complete one after checking all
      its checksums, repairing damage first (only the damaged batches are extracted again). Other
      settings, another store version or a damaged meta.json raise ValueError unless
      ``overwrite=True``, which builds the new store beside the old one and moves it in once it is
      complete, replacing only the store's own files. The store's identity covers the images'
      content (pixels in memory, JPEG bytes of an archive, the files' sizes and modification times
      of an image folder). One process at a time writes a store: another run waits for it.
    - ``dtype``: ``"float16"`` (default) or ``"float32"`` for the stored embeddings.
    - ``amp``: autocast: bf16 (fp16 on GPUs without bf16); default on for CUDA only. On a CPU with
      AMX (Intel Sapphire Rapids and newer, :func:`cpu_has_bf16`) ``amp=True`` runs about 2-3x faster.
      bf16 changes the embeddings slightly (cosine to float32 >= 0.998 on the shipped models); a
      store records its precision and is only resumed with the same one.
    - ``compile``: run the model through ``torch.compile`` (a one-off 5-60 s compilation, then
      faster chunks: with ``amp=True`` on the CPU above about 4x the float32 eager speed; see
      benchmarks/RESULTS.md). Needs a C++ compiler on the CPU, Triton on CUDA.
    - ``amp`` and ``compile`` left at None take the defaults of an enclosing
      :func:`extraction_options` block (else: autocast on CUDA only, no compile).
    - ``num_workers``: DataLoader workers decoding lazily-loaded data sets (default min(4, CPUs) on
      a GPU, 0 on the CPU: :func:`default_num_workers`).
    - ``augmentation``: an :class:`~.augment.Augmentation` applied to every cropped, resized patch
      (float ``[0, 1]``, before the model's normalisation), seeded per image by
      ``augmentation_seed`` (:func:`augment_patches`): the same seed gives the same embeddings. A
      store records it and is only resumed with the same augmentation and seed.

    The model is moved to ``device`` (default CUDA when available) and run in eval mode. When
    ``torch.distributed`` is initialised (``torchrun``), each rank embeds its share of the batches
    into the one store ``out``.
    """
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    if augmentation is not None and not isinstance(augmentation, Augmentation):
        raise ValueError(f"augmentation must be an ssl_patch_analysis.augment.Augmentation or None, got "
                         f"{type(augmentation).__name__}")
    defaults = _OPTIONS.get()
    amp = defaults.get("amp") if amp is None else amp
    compile = bool(defaults.get("compile", False)) if compile is None else compile
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    source = _ImageSource(data)
    ids = _as_image_ids(image_ids, len(source))
    size = int(resize_to if resize_to is not None else model.preprocess.input_size)
    if size < 1:
        raise ValueError(f"resize_to must be a positive number of pixels, got {size}")
    tokens = isinstance(sampler, TokenSampler)
    if tokens:
        _check_token_sampler(model, sampler, size)
        if augmentation is not None:
            raise ValueError("augmentation applies to crops, not to a ViT's tokens: leave it out with tokens")
    if augmentation is not None:  # the kernel its patches get, in the store's settings
        augmentation = resolve_blur_kernel(augmentation, size)
    num_patches = sampler.num_patches(source.image_size)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world_size = _distributed()
    if out is None and world_size > 1:
        raise ValueError("with several processes (torchrun), pass out=DIR (--store) so that all ranks write one store")
    if chunk_size is None:
        chunk_size = default_chunk_size(size, device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")

    was_training = model.training
    model.eval().to(device)
    model.to(memory_format=torch.channels_last)
    amp_dtype = _autocast_dtype(device, amp)
    try:
        dims = _layer_dims(model, size, device)
        layers = list(dims) if layers is None else list(layers)
        unknown = [name for name in layers if name not in dims]
        if unknown or "h" not in layers:
            raise ValueError(
                f"layers must include 'h' and be among those the model has ({', '.join(dims)}), got {layers}"
            )
        # What decides the numbers; a store made with other settings is not resumed. The model is
        # identified by its weights and preprocessing, not by where its file was.
        settings = {
            "model_sha256": model_sha256(model),
            "preprocess": model.preprocess.to_dict(),
            "sampler": sampler.to_dict(),
            "resize_to": size,
            "dataset": source.fingerprint(ids),
            "image_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
            "layers_extracted": layers,
            "dtype": dtype,
            "precision": str(amp_dtype or torch.float32).removeprefix("torch."),
            # Always present (None without one), so an augmented store and a plain one never resume each other.
            "augmentation": None if augmentation is None else {**asdict(augmentation), "seed": int(augmentation_seed)},
        }
        if tokens:  # the sampler says "tokens" and the block too; this says what a token's h and z are
            settings["tokens"] = describe_tokens(model, sampler)
        layout = StoreLayout(num_patches=num_patches, layer_dims={name: dims[name] for name in layers},
                             image_ids=ids, labels=source.labels[ids], batch_size=batch_size, dtype=dtype)
        runner = _Run(model, source, sampler, layout, device, chunk_size, amp_dtype, compile, settings["model_sha256"],
                      size, progress and rank == 0, num_workers,
                      None if augmentation is None else (augmentation, int(augmentation_seed)))
        info = {"model": model.info.to_dict(), "class_names": source.class_names}
        if out is None:
            return runner.in_memory(settings, info)
        return runner.into_store(Path(out), settings, info, overwrite, rank, world_size)
    finally:
        model.train(was_training)


def _check_finite_rows(arrays: dict[str, np.ndarray], image_ids: np.ndarray, dtype: str) -> None:
    """Stop at the first image whose embedding holds NaN or infinity, naming it (a store of NaN is no result)."""
    for name, rows in arrays.items():
        finite = np.isfinite(rows).reshape(len(rows), -1).all(axis=1)
        if not finite.all():
            first = int(np.argmin(finite))
            overflow = (" or a value beyond float16's range (65504) was stored: try dtype='float32' (--dtype float32)"
                        if dtype == "float16" else "")
            raise ValueError(f"the {name} embedding of image {int(image_ids[first])} holds NaN or infinity "
                             f"({int((~finite).sum())} of the {len(rows)} images of its batch): the model produced "
                             f"it from these pixels{overflow}; nothing was stored for this batch")


class _Run:
    """One extraction: the batch loop shared by the in-memory and the on-disk paths."""

    def __init__(self, model: SSLModel, source: _ImageSource, sampler: PatchSampler, layout: StoreLayout,
                 device: torch.device, chunk_size: int, amp_dtype: torch.dtype | None, compile: bool,
                 weights_sha256: str, size: int, progress: bool, num_workers: int | None,
                 augmentation: tuple[Augmentation, int] | None = None):
        self.source, self.sampler, self.layout, self.device = source, sampler, layout, device
        self.size, self.progress, self.num_workers = size, progress, num_workers
        self.augmentation = augmentation
        self.unit = "tokens" if isinstance(sampler, TokenSampler) else "patches"
        if isinstance(sampler, TokenSampler):
            self.embedder: _Embedder | _TokenEmbedder = _TokenEmbedder(
                _TokenNetwork(model, sampler.block), device, list(layout.layer_dims), chunk_size, amp_dtype, compile,
                weights_sha256)
        else:
            self.embedder = _Embedder(model, device, list(layout.layer_dims), chunk_size, amp_dtype, compile,
                                      weights_sha256)
        self.run_info = {"device": str(device), "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else None,
                         "compile": compile}

    def rows(self, batches: Sequence[slice]) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """``(rows, arrays)`` for each batch of rows: every layer ``B x P x D`` and the ``boxes``."""
        layout, pinned = self.layout, self.device.type == "cuda"
        rows_per_batch = max(s.stop - s.start for s in batches) * layout.num_patches
        store_dtype = getattr(torch, layout.dtype)
        host = {name: torch.empty(rows_per_batch, dim, dtype=store_dtype, pin_memory=pinned)
                for name, dim in layout.layer_dims.items()}
        ids = [layout.image_ids[s] for s in batches]
        total = sum(s.stop - s.start for s in batches)
        started, done_images = time.perf_counter(), 0
        with tqdm(total=total, unit="img", disable=not self.progress, dynamic_ncols=True, mininterval=0.5,
                  desc=f"embedding {layout.num_patches} {self.unit}/img") as bar:
            pixel_batches = _image_batches(self.source, ids, self.device, self.num_workers)
            for span, batch_ids, pixels in zip(batches, ids, pixel_batches, strict=True):
                boxes = torch.as_tensor(self.sampler.boxes(batch_ids, self.source.image_size), dtype=torch.float32)
                flat = boxes.reshape(-1, 4)
                _check_boxes(flat, self.source.image_size)
                count = flat.shape[0]
                # Inside the loop, not around the generator: the mode must not leak into the caller between yields.
                with torch.inference_mode():
                    images = pixels.to(self.device, non_blocking=True)
                    images = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
                    augment = None
                    if self.augmentation is not None:
                        augment = functools.partial(augment_patches, image_ids=batch_ids,
                                                    augmentation=self.augmentation[0], seed=self.augmentation[1])
                    self.embedder.embed(images, boxes.to(self.device, non_blocking=True), self.size,
                                        _is_exact(flat, self.size), host, augment)
                if pinned:
                    torch.cuda.current_stream(self.device).synchronize()
                n = span.stop - span.start
                arrays = {name: host[name][:count].numpy().reshape(n, layout.num_patches, -1) for name in host}
                _check_finite_rows(arrays, batch_ids, layout.dtype)
                arrays["boxes"] = boxes.numpy()
                yield span, arrays
                done_images += n
                bar.update(n)
                rate = done_images * layout.num_patches / (time.perf_counter() - started)
                bar.set_postfix_str(f"{rate:,.0f} {self.unit}/s", refresh=False)
        seconds = time.perf_counter() - started
        self.run_info.update(images=done_images, seconds=round(seconds, 3),
                             patches_per_s=round(done_images * layout.num_patches / max(seconds, 1e-9), 1))

    def in_memory(self, settings: dict[str, Any], info: dict[str, Any]) -> PatchEmbeddings:
        layout = self.layout
        n, p = layout.num_images, layout.num_patches
        arrays = {name: np.empty((n, p, dim), dtype=layout.dtype) for name, dim in layout.layer_dims.items()}
        boxes = np.empty((n, p, 4), dtype=np.float32)
        for span, rows in self.rows(_batches(n, layout.batch_size)):
            for name in arrays:
                arrays[name][span] = rows[name]
            boxes[span] = rows["boxes"]
        meta = {**info, **settings, "dtype": layout.dtype, "num_images": n, "num_patches": p,
                "layers": {name: list(array.shape) for name, array in arrays.items()}, "last_run": self.run_info}
        return PatchEmbeddings(h=arrays["h"], z=arrays.get("z"), pre_feature=arrays.get("pre_feature"), boxes=boxes,
                               image_ids=layout.image_ids.copy(), labels=np.asarray(layout.labels, dtype=np.int64),
                               meta=meta)

    def into_store(self, out: Path, settings: dict[str, Any], info: dict[str, Any], overwrite: bool, rank: int,
                   world_size: int) -> PatchEmbeddings:
        with contextlib.ExitStack() as held:
            status: StorePlan | tuple[str, str] | None = None
            if rank == 0:
                try:
                    held.enter_context(store_lock(out))  # one writer at a time; the other ranks follow rank 0
                    status = prepare_store(out, settings, self.layout, overwrite, info)
                except (ValueError, OSError) as error:
                    status = (type(error).__name__, str(error))
                    if world_size == 1:
                        raise
            plan = _broadcast(status, world_size)
            if isinstance(plan, tuple):
                raise RuntimeError(f"rank 0 could not prepare the store {out}: {plan[0]}: {plan[1]}")
            if plan.complete:  # complete already, checked in full, with the same settings: nothing to compute
                return PatchEmbeddings.load(plan.target, verify=False)
            with StoreWriter(plan.path, rank) as writer:
                pending = _broadcast(writer.pending_batches() if rank == 0 else None, world_size)
                if rank == 0 and len(pending) < writer.num_batches:
                    print(f"resuming {plan.path}: {writer.num_batches - len(pending)} of {writer.num_batches} "
                          "batches already written", file=sys.stderr)
                # Every rank has read the same pending list before any rank writes a record.
                _barrier(world_size)
                mine = pending[rank::world_size]
                if mine:
                    try:
                        for span, rows in self.rows([writer.batch_rows(b) for b in mine]):
                            writer.write_batch(span.start // writer.batch_size, rows)
                    except DataFileError as error:  # fixing the images changes the data set the store was for
                        if not writer.num_batches - len(writer.pending_batches()):
                            raise  # no batch finished: the next run replaces the store by itself
                        raise DataFileError(
                            f"{error}; the store {out} keeps the batches written so far, for these images: once "
                            "they are fixed or skipped, run again with --overwrite (overwrite=True) to rebuild it "
                            "for the new ones") from error
                _barrier(world_size)
                if rank == 0:
                    # the command line that completed the store (none from Python), to re-run or repair it
                    command = {"command": cli.running_command()} if cli.running_command() else {}
                    writer.mark_complete({"last_run": {**self.run_info, "world_size": world_size, **command}})
            if rank == 0:
                plan.finish()  # a replacement built beside the old store moves in only now, complete
            _barrier(world_size)
            return PatchEmbeddings.load(plan.target, verify=False)


def _sampler_from_args(args: argparse.Namespace) -> PatchSampler:
    if args.grid is not None:
        return grid(args.grid, args.stride)
    if args.random is not None:
        if args.patch_size is None:
            raise UserError("--random N needs --patch-size P (the side of the fixed-scale patches)")
        return random_fixed(args.random, args.patch_size, seed=args.seed)
    if args.multiscale is not None:
        return random_resized(args.multiscale, scale=args.scale, seed=args.seed)
    return central(args.central or None)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m ssl_patch_analysis.extract", renamed=cli.RENAMED_FLAGS["extract"],
        description="Embed the patches of a data set with a self-supervised model into a resumable, checksummed "
        "store (--store). Several GPUs: torchrun --nproc_per_node=K -m ssl_patch_analysis.extract ...",
    )
    cli.add_model_args(parser)
    cli.add_data_args(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--grid", type=cli.positive_int, metavar="P", help="every PxP patch of a grid (stride --stride)")
    where.add_argument("--random", type=cli.positive_int, metavar="N",
                       help="N fixed-scale patches of side --patch-size")
    where.add_argument("--multiscale", type=cli.positive_int, metavar="N",
                       help="N RandomResizedCrop boxes (area range --scale)")
    where.add_argument("--central", type=int, nargs="?", const=0, metavar="SIZE",
                       help="the central view (default the whole square image)")
    parser.add_argument("--stride", type=cli.positive_int, default=None, help="grid stride (default: the patch size)")
    parser.add_argument("--patch-size", type=cli.positive_int, default=None, help="side of --random patches")
    cli.add_tokens_args(parser)
    cli.add_scale_arg(parser, (0.08, 1.0), "area range of --multiscale crops")
    cli.add_seed_arg(parser, "seed of the random samplers")
    cli.add_num_images_arg(parser, None, "images embedded")
    cli.add_layers_arg(parser, None)
    cli.add_batch_size_arg(parser, 64, "images per batch")
    parser.add_argument("--chunk-size", type=cli.positive_int, default=None,
                        help="patches per forward pass (default on CUDA 1024, 256 above 64 px; on a CPU 64 at 32 px, 8 "
                             "at 224 px)")
    cli.add_resize_arg(parser)
    parser.add_argument("--dtype", choices=STORE_DTYPES, default="float16", help="stored dtype (default float16)")
    cli.add_device_args(parser)
    parser.add_argument("--workers", type=cli.non_negative_int, default=None,
                        help="data decoding workers (default min(4, CPUs) on a GPU, 0 on the CPU)")
    parser.add_argument("--store", type=Path, default=None,
                        help="the store folder (re-run the same command to resume it, or to repair it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a store made with other settings, by another version, or whose meta.json is "
                        "damaged: the new store is built beside it and moved in once complete; only the store's own "
                        "files are replaced")
    cli.add_progress_arg(parser)
    parser.add_argument("--verify", action="store_true",
                        help="only check the store --store DIR (every checksum) and list any damage; exit status 0 "
                        "intact, 1 damaged")
    return parser


@cli.command
def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if "--verify" in words and "--store" not in words:  # the form of earlier versions: --verify DIR
        after = words[words.index("--verify") + 1:][:1]
        if after and not after[0].startswith("-"):
            parser.error(f"--verify {after[0]} is now --verify --store {after[0]}")
    args = parser.parse_args(words)
    if args.store is None:
        parser.error("the following argument is required: --store DIR (the store folder)")
    if args.verify:
        raise SystemExit(verify_command(args.store))
    given = [flag for flag in ("grid", "random", "multiscale", "central") if getattr(args, flag) is not None]
    if args.tokens and given:
        parser.error(f"--{given[0]} places crops; --tokens takes the ViT's own tokens: pass one of them")
    if not given and not args.tokens:
        parser.error("one of the arguments --grid --random --multiscale --central --tokens is required")
    # flags of one sampler given with another: refused, not ignored (--grid 8 --patch-size 16 embedded 8 px patches)
    chosen = given[0] if given else "tokens"
    for flag, dest, sampler in (("--stride", "stride", "grid"), ("--patch-size", "patch_size", "random"),
                                ("--scale", "scale", "multiscale")):
        asked = any(word == flag or word.startswith(f"{flag}=") for word in words) if flag == "--scale" \
            else getattr(args, dest) is not None
        if asked and chosen != sampler:
            parser.error(f"{flag} is for --{sampler}; --{chosen} does not use it: drop it, or pass --{sampler}")
    cli.token_block(args)
    _extract_command(args)


def _extract_command(args: argparse.Namespace) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device
    if world_size > 1:
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        rank = dist.get_rank() if world_size > 1 else 0
        device = cli.resolve_device(device)
        model = cli.load_model_from_args(args, device, verbose=rank == 0)
        data = cli.load_data_from_args(args)
        if args.random_init:
            model = cli.random_init_control(model, data, args.seed)
        if args.num_images is not None and args.num_images > len(data):
            raise UserError(f"--num-images {args.num_images}: {args.data} {data.split} has only {len(data)} images "
                            "(pass at most that, or all)")
        image_ids = np.arange(args.num_images) if args.num_images is not None else None
        sampler = token_sampler(model, args.resize_to, args.block) if args.tokens else _sampler_from_args(args)
        embeddings = extract_patch_embeddings(
            model, data, sampler, layers=args.layers, image_ids=image_ids, batch_size=args.batch_size,
            chunk_size=args.chunk_size, resize_to=args.resize_to, device=device, out=args.store, dtype=args.dtype,
            amp=args.amp, compile=args.compile, overwrite=args.overwrite, num_workers=args.workers,
            progress=not args.no_progress,
        )
        if rank == 0:
            print(f"store: {Path(args.store).resolve()}")
            for name in embeddings.layers:
                print(f"  {name}: {tuple(embeddings.layer(name).shape)} {embeddings.layer(name).dtype}")
            run = embeddings.meta.get("last_run", {})
            if run.get("patches_per_s"):
                print(f"  {run['patches_per_s']:,.0f} patches/s on {run['device']} "
                      f"(rank 0 of {run.get('world_size', 1)}, run that completed the store)")
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def verify_command(path: Path) -> int:
    """``--verify DIR``: check every file and checksum of a store, print what is damaged; the exit status."""
    started = time.perf_counter()
    try:
        damage = verify_store(path)
        meta = None if any(d.file == "meta.json" for d in damage) else read_store_meta(path)
    except (ValueError, OSError) as error:  # no store there, or one of another version
        print(f"error: {cli.one_line(error)}", file=sys.stderr)
        return 2
    if damage:
        print(f"{path}: damaged")
        for problem in damage:
            print(f"  {problem.describe(with_rows=True)}")
        print(repair_advice(path, damage, meta))
        return 1
    seconds = time.perf_counter() - started
    checked = sum((path / f"{name}.npy").stat().st_size for name in meta["arrays"])
    done = done_batches(path)
    if not meta.get("complete"):
        print(f"{path}: intact so far, incomplete ({int(done.sum())} of {done.size} batches written): re-run the "
              "extract command that made it to finish it")
    else:
        print(f"{path}: intact ({meta['num_images']} images x {meta['num_patches']} patches, {done.size} batches; "
              f"{checked / 1e6:,.1f} MB checked in {seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    main()
