"""Where patches are: samplers that return boxes, never pixels.

A box is ``x0, y0, x1, y1`` in pixel coordinates of the source image, with ``x1``/``y1``
exclusive: the box covers columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1`` (as continuous
coordinates it spans ``[x0, x1] x [y0, y1]``, which is what ``torchvision.ops.roi_align`` takes
with ``aligned=True``). Every sampler returns a float32 tensor ``B x P x 4`` for ``B`` images.

The samplers are the scales of the paper (docs/design.md):

- :func:`grid`: every position of a regular grid (heatmaps, "all patches" of the convergence study);
- :func:`random_fixed`: BagSSL's fixed-scale patches at random positions (its pretraining and its
  "1 patch" / "n patches" evaluation);
- :func:`random_resized`: the multi-scale ``RandomResizedCrop`` views of the baselines;
- :func:`central`: the standard single view (whole CIFAR image, 224 centre crop on ImageNet).

Random samplers are deterministic per ``(seed, image_id)``: each image draws from its own
generator, so an image's boxes do not depend on the batch it is in, the rank that draws it, or
whether a run was resumed.
"""
from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64: a bijective 64-bit mixer, so nearby seeds give unrelated streams."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _image_generator(seed: int, image_id: int) -> torch.Generator:
    """The CPU generator that draws the random boxes of one image under one sampler seed."""
    generator = torch.Generator()
    generator.manual_seed(_splitmix64(_splitmix64(seed & _MASK64) ^ image_id))
    return generator


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _positive_int(value: Any, name: str) -> int:
    number = _integer(value, name)
    if number <= 0:
        raise ValueError(f"{name} must be a positive integer (at least 1), got {number}")
    return number


def _image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (height, width), got {tuple(image_size)!r}")
    return _positive_int(image_size[0], "image height"), _positive_int(image_size[1], "image width")


def _image_ids(image_ids: Any) -> list[int]:
    expected = "image_ids must be a 1-D sequence of integer dataset indices"
    try:
        ids = torch.as_tensor(image_ids)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{expected}, got {image_ids!r}") from None
    # An empty list becomes a float tensor; it is still a valid (empty) batch.
    not_integer = ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool
    if ids.ndim != 1 or (ids.numel() > 0 and not_integer):
        raise ValueError(f"{expected}, got dtype {ids.dtype} and shape {tuple(ids.shape)}")
    ids_list = [int(i) for i in ids.tolist()]
    if any(i < 0 for i in ids_list):
        raise ValueError(f"image_ids must be non-negative dataset indices, got {min(ids_list)}")
    return ids_list


def _check_fits(patch_size: int, height: int, width: int, what: str = "patch") -> None:
    if patch_size > height or patch_size > width:
        raise ValueError(
            f"{what} of side {patch_size} does not fit in an image of height {height} and width {width}: "
            f"pass a {what} size of at most {min(height, width)}"
        )


def _grid_positions(length: int, patch_size: int, stride: int) -> int:
    """How many grid positions ``0, s, 2s, ...`` with ``x0 + p <= length`` there are along one axis."""
    return (length - patch_size) // stride + 1


def _square_boxes(x0: torch.Tensor, y0: torch.Tensor, side: int) -> torch.Tensor:
    x0, y0 = x0.to(torch.float32), y0.to(torch.float32)
    return torch.stack((x0, y0, x0 + side, y0 + side), dim=-1)


class PatchSampler(ABC):
    """Where to cut the patches of an image.

    Subclasses are frozen dataclasses with the attributes ``kind`` (``"grid"``, ``"random_fixed"``,
    ``"random_resized"`` or ``"central"``), ``seed`` (0 for the deterministic samplers, which ignore
    it) and ``patch_size`` (the fixed side of every patch, ``None`` when it varies).
    """

    kind: ClassVar[str]

    @abstractmethod
    def num_patches(self, image_size: tuple[int, int]) -> int:
        """``P``, the number of boxes per image of size ``(height, width)``."""

    @abstractmethod
    def boxes(self, image_ids: Sequence[int] | torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Boxes ``x0, y0, x1, y1`` of the images ``image_ids`` (dataset indices), float32 ``B x P x 4``."""

    def to_dict(self) -> dict[str, Any]:
        """The sampler as JSON-able values; :func:`sampler_from_dict` rebuilds it."""
        d: dict[str, Any] = {"kind": self.kind}
        for key, value in asdict(self).items():  # type: ignore[call-overload]
            d[key] = list(value) if isinstance(value, tuple) else value
        return d


@dataclass(frozen=True)
class GridSampler(PatchSampler):
    """Every ``patch_size`` square at positions ``0, stride, 2 * stride, ...``, row-major (y outer)."""

    kind: ClassVar[str] = "grid"
    seed: ClassVar[int] = 0
    patch_size: int
    stride: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", _positive_int(self.patch_size, "patch_size"))
        object.__setattr__(self, "stride", _positive_int(self.stride, "stride"))

    def grid_shape(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, cols)`` of the grid over an image of size ``(height, width)``."""
        height, width = _image_size(image_size)
        _check_fits(self.patch_size, height, width)
        return (
            _grid_positions(height, self.patch_size, self.stride),
            _grid_positions(width, self.patch_size, self.stride),
        )

    def num_patches(self, image_size: tuple[int, int]) -> int:
        rows, cols = self.grid_shape(image_size)
        return rows * cols

    def boxes(self, image_ids: Sequence[int] | torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        rows, cols = self.grid_shape(image_size)
        ids = _image_ids(image_ids)
        y0, x0 = torch.meshgrid(
            torch.arange(rows) * self.stride, torch.arange(cols) * self.stride, indexing="ij"
        )
        one_image = _square_boxes(x0.reshape(-1), y0.reshape(-1), self.patch_size)
        return one_image.unsqueeze(0).repeat(len(ids), 1, 1)


@dataclass(frozen=True)
class RandomFixedSampler(PatchSampler):
    """``n`` squares of side ``patch_size`` at positions drawn uniformly from a stride-``stride`` grid."""

    kind: ClassVar[str] = "random_fixed"
    n: int
    patch_size: int
    seed: int = 0
    replace: bool = True
    stride: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", _positive_int(self.n, "n (patches per image)"))
        object.__setattr__(self, "patch_size", _positive_int(self.patch_size, "patch_size"))
        object.__setattr__(self, "stride", _positive_int(self.stride, "stride"))
        object.__setattr__(self, "seed", _integer(self.seed, "seed"))
        if not isinstance(self.replace, bool):
            raise ValueError(f"replace must be True or False, got {self.replace!r}")

    def _grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        rows, cols = GridSampler(self.patch_size, self.stride).grid_shape(image_size)
        if not self.replace and self.n > rows * cols:
            raise ValueError(
                f"cannot draw {self.n} distinct positions without replacement: a "
                f"{image_size[0]}x{image_size[1]} image has only {rows * cols} positions for patches of "
                f"side {self.patch_size} at stride {self.stride}; pass n <= {rows * cols} or replace=True"
            )
        return rows, cols

    def num_patches(self, image_size: tuple[int, int]) -> int:
        self._grid(image_size)
        return self.n

    def boxes(self, image_ids: Sequence[int] | torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        rows, cols = self._grid(image_size)
        ids = _image_ids(image_ids)
        count = rows * cols
        if self.replace:
            draws = [torch.randint(count, (self.n,), generator=_image_generator(self.seed, i)) for i in ids]
        else:
            draws = [torch.randperm(count, generator=_image_generator(self.seed, i))[: self.n] for i in ids]
        position = torch.stack(draws) if draws else torch.empty(0, self.n, dtype=torch.long)
        row, col = position // cols, position % cols
        return _square_boxes(col * self.stride, row * self.stride, self.patch_size)


# Tries before the central fallback, as in torchvision.transforms.RandomResizedCrop.get_params.
_RESIZED_CROP_TRIES = 10


@dataclass(frozen=True)
class RandomResizedSampler(PatchSampler):
    """``n`` boxes from ``RandomResizedCrop``'s distribution (the multi-scale views of the baselines).

    Same algorithm as ``torchvision.transforms.RandomResizedCrop.get_params``: an area fraction
    uniform in ``scale``, a log-uniform aspect ratio (width / height) in ``ratio``, sides rounded to
    integers, the first of 10 tries that fits, else the central fallback crop; then a uniform
    integer position.
    """

    kind: ClassVar[str] = "random_resized"
    patch_size: ClassVar[None] = None
    n: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", _positive_int(self.n, "n (patches per image)"))
        object.__setattr__(self, "seed", _integer(self.seed, "seed"))
        scale = _float_pair(self.scale, "scale")
        ratio = _float_pair(self.ratio, "ratio")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(
                f"scale must be (min, max) area fractions with 0 < min <= max <= 1, got {scale}; "
                "e.g. pass scale=(0.08, 1.0)"
            )
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(
                f"ratio must be (min, max) aspect ratios with 0 < min <= max, got {ratio}; "
                "e.g. pass ratio=(3/4, 4/3)"
            )
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)

    def num_patches(self, image_size: tuple[int, int]) -> int:
        _image_size(image_size)
        return self.n

    def _fallback(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of the crop used when no try fits: the image cropped to the nearest allowed ratio."""
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            return round(width / self.ratio[0]), width
        if in_ratio > self.ratio[1]:
            return height, round(height * self.ratio[1])
        return height, width

    def boxes(self, image_ids: Sequence[int] | torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        height, width = _image_size(image_size)
        ids = _image_ids(image_ids)
        tries = _RESIZED_CROP_TRIES
        # One draw per image (area and ratio of every try, then the position), so the boxes of an
        # image depend only on (seed, image_id); the arithmetic below is vectorised over the batch.
        draws = [
            torch.rand(self.n, 2 * tries + 2, dtype=torch.float64, generator=_image_generator(self.seed, i))
            for i in ids
        ]
        uniform = torch.stack(draws) if draws else torch.empty(0, self.n, 2 * tries + 2, dtype=torch.float64)
        area_u, ratio_u = uniform[..., :tries], uniform[..., tries : 2 * tries]
        position_u = uniform[..., 2 * tries :]

        target_area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * area_u)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * ratio_u)
        # torch.round rounds halves to even, like Python's round() in torchvision.
        w = torch.round(torch.sqrt(target_area * aspect))
        h = torch.round(torch.sqrt(target_area / aspect))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first_fit = fits.to(torch.uint8).argmax(dim=-1, keepdim=True)
        any_fit = fits.any(dim=-1)

        fallback_h, fallback_w = self._fallback(height, width)
        h = torch.where(any_fit, h.gather(-1, first_fit).squeeze(-1), float(fallback_h))
        w = torch.where(any_fit, w.gather(-1, first_fit).squeeze(-1), float(fallback_w))
        # floor(u * count) with u < 1 is a uniform integer in [0, count); the clamp guards the one
        # float64 rounding case where the product reaches count.
        y0 = torch.minimum(torch.floor(position_u[..., 0] * (height - h + 1)), height - h)
        x0 = torch.minimum(torch.floor(position_u[..., 1] * (width - w + 1)), width - w)
        y0 = torch.where(any_fit, y0, float((height - fallback_h) // 2))
        x0 = torch.where(any_fit, x0, float((width - fallback_w) // 2))
        return torch.stack((x0, y0, x0 + w, y0 + h), dim=-1).to(torch.float32)


def _float_pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers (min, max), got {value!r}") from None
    return lo, hi


@dataclass(frozen=True)
class CentralSampler(PatchSampler):
    """The centred square of side ``size`` (``None``: the largest centred square, the whole image if square).

    Offsets follow ``torchvision.transforms.CenterCrop``, so the box is the standard evaluation view.
    """

    kind: ClassVar[str] = "central"
    seed: ClassVar[int] = 0
    size: int | None = None

    def __post_init__(self) -> None:
        if self.size is not None:
            object.__setattr__(self, "size", _positive_int(self.size, "central size"))

    @property
    def patch_size(self) -> int | None:
        return self.size

    def num_patches(self, image_size: tuple[int, int]) -> int:
        height, width = _image_size(image_size)
        if self.size is not None:  # said before anything is embedded or stored, as the other samplers do
            _check_fits(self.size, height, width, what="central crop")
        return 1

    def boxes(self, image_ids: Sequence[int] | torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        height, width = _image_size(image_size)
        ids = _image_ids(image_ids)
        side = min(height, width) if self.size is None else self.size
        _check_fits(side, height, width, what="central crop")
        y0, x0 = round((height - side) / 2.0), round((width - side) / 2.0)
        box = torch.tensor([[x0, y0, x0 + side, y0 + side]], dtype=torch.float32)
        return box.unsqueeze(0).repeat(len(ids), 1, 1)


_SAMPLERS: dict[str, type[PatchSampler]] = {
    cls.kind: cls for cls in (GridSampler, RandomFixedSampler, RandomResizedSampler, CentralSampler)
}


def grid(patch_size: int, stride: int | None = None) -> GridSampler:
    """All ``patch_size`` squares at stride ``stride`` (default: ``patch_size``, non-overlapping tiles)."""
    return GridSampler(patch_size, patch_size if stride is None else stride)


def random_fixed(
    n: int, patch_size: int, seed: int = 0, replace: bool = True, stride: int = 1
) -> RandomFixedSampler:
    """BagSSL's fixed scale: ``n`` squares of side ``patch_size`` at uniformly drawn grid positions.

    ``replace=False`` draws ``n`` distinct positions (at most the number of positions there are).
    """
    return RandomFixedSampler(n, patch_size, seed=seed, replace=replace, stride=stride)


def random_resized(
    n: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    seed: int = 0,
) -> RandomResizedSampler:
    """``n`` multi-scale boxes from ``RandomResizedCrop(scale, ratio)``'s distribution."""
    return RandomResizedSampler(n, scale=scale, ratio=ratio, seed=seed)


def central(size: int | None = None) -> CentralSampler:
    """The standard single view: the centred square of side ``size`` (``None``: the whole square image)."""
    return CentralSampler(size)


def sampler_from_dict(d: dict[str, Any]) -> PatchSampler:
    """Rebuild a sampler from :meth:`PatchSampler.to_dict` output (e.g. read back from a JSON file)."""
    kind = d.get("kind")
    if kind not in _SAMPLERS:
        raise ValueError(f"unknown sampler kind {kind!r}; known kinds: {', '.join(_SAMPLERS)}")
    cls = _SAMPLERS[kind]
    params = {key: value for key, value in d.items() if key != "kind"}
    accepted = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(
            f"unknown parameters {unknown} for a {kind!r} sampler; it accepts {sorted(accepted)}"
        )
    return cls(**params)


def box_centers(boxes: torch.Tensor) -> torch.Tensor:
    """Centres ``(x, y)`` of boxes ``x0, y0, x1, y1``: shape ``(..., 2)``."""
    _check_boxes(boxes)
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def box_sizes(boxes: torch.Tensor) -> torch.Tensor:
    """Sides ``(width, height)`` of boxes ``x0, y0, x1, y1``: shape ``(..., 2)``."""
    _check_boxes(boxes)
    return boxes[..., 2:] - boxes[..., :2]


def _check_boxes(boxes: torch.Tensor) -> None:
    if boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise ValueError(
            f"boxes must have a last dimension of 4 (x0, y0, x1, y1), got shape {tuple(boxes.shape)}"
        )


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.patches says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
