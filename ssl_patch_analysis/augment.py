"""The colour augmentation of VICReg/SimCLR/BagSSL, applied to a whole batch on its device.

Per image of a batch, independently: horizontal flip (p=0.5), colour jitter (p=0.8; brightness
0.4, contrast 0.4, saturation 0.2, hue 0.1), grayscale (p=0.2), Gaussian blur (p configurable) and
solarization (p configurable), in that order, as in VICReg's ``augmentations.py``. The jitter
applies its four adjustments in torchvision's listed order (brightness, contrast, saturation,
hue) for every image, where ``torchvision.transforms.ColorJitter`` shuffles the order per call: one
fixed order keeps the whole batch a handful of tensor operations.

Every random parameter is drawn per image from one ``torch.Generator``, so a batch is reproducible;
images are floats in ``[0, 1]``, ``B x 3 x H x W``, and stay there. Each adjustment function takes
one factor per image and matches ``torchvision.transforms.v2.functional``'s op of the same name
applied image by image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

# ITU-R 601-2 luma, the weights of torchvision's rgb_to_grayscale and of Pillow's "L" mode.
_LUMA = (0.2989, 0.587, 0.114)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be float B x 3 x H x W in [0, 1], got {images.dtype} of shape "
                         f"{tuple(images.shape)}")


def _per_image(factors: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Factors ``B`` as ``B x 1 x 1 x 1`` on the images' device and dtype."""
    factors = torch.as_tensor(factors, dtype=images.dtype, device=images.device)
    if factors.shape != (images.shape[0],):
        raise ValueError(f"need one factor per image ({images.shape[0]}), got shape {tuple(factors.shape)}")
    return factors.view(-1, 1, 1, 1)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (ratio * images + (1 - ratio) * other).clamp_(0, 1)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma ``B x 1 x H x W`` of RGB images."""
    r, g, b = images.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return (images * _per_image(factors, images)).clamp(0, 1)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, _per_image(factors, images))


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images), _per_image(factors, images))


def _rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    # Pillow's algorithm, as torchvision implements it; denominators are replaced by 1 where
    # max == min (grey pixels), where hue and saturation are 0 anyway.
    r, g, _ = images.unbind(dim=1)
    minc, maxc = torch.aminmax(images, dim=1)
    grey = maxc == minc
    ones = torch.ones_like(maxc)
    chroma = maxc - minc
    saturation = chroma / torch.where(grey, ones, maxc)
    divisor = torch.where(grey, ones, chroma)
    rc, gc, bc = ((maxc.unsqueeze(1) - images) / divisor.unsqueeze(1)).unbind(dim=1)
    max_is_r = maxc == r
    max_is_g = (maxc == g) & ~max_is_r
    max_is_b = ~max_is_r & ~max_is_g
    hue = (bc - gc) * max_is_r + (2.0 + rc - bc) * max_is_g + (4.0 + gc - rc) * max_is_b
    hue = (hue / 6.0 + 1.0).fmod(1.0)
    return torch.stack((hue, saturation, maxc), dim=1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(dim=1)
    h6 = h * 6
    sector = torch.floor(h6)
    f = h6 - sector
    sector = sector.to(torch.int64).remainder(6)
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    vpqt = torch.stack((v, p, q, t), dim=1)
    # Which of v, p, q, t is red, green and blue in each of the six hue sectors.
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=hsv.device)
    return vpqt.gather(1, select[:, sector].permute(1, 0, 2, 3))


def adjust_hue(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factors`` (in turns, each in ``[-0.5, 0.5]``)."""
    shift = _per_image(factors, images).view(-1, 1, 1)
    if bool((shift.abs() > 0.5).any()):
        raise ValueError("hue factors must lie in [-0.5, 0.5] (fractions of a full turn)")
    return _rotate_hue(images, shift)


def _rotate_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    # Unchecked (no wait for the device): Augmentation draws its shifts inside [-0.5, 0.5] itself.
    hsv = _rgb_to_hsv(images)
    hue = (hsv[:, 0] + shift).remainder(1.0)
    return _hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur image ``i`` with a ``kernel_size`` Gaussian of standard deviation ``sigmas[i]`` (reflect padding).

    One grouped convolution per axis for the whole batch (the 2-D Gaussian is separable).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number of pixels, got {kernel_size}")
    if kernel_size // 2 >= min(images.shape[-2:]):
        raise ValueError(f"a blur kernel of {kernel_size} pixels needs images larger than {kernel_size // 2} "
                         f"pixels for reflect padding, got {tuple(images.shape[-2:])}; pass a smaller kernel_size")
    sigmas = _per_image(sigmas, images).view(-1, 1)
    if bool((sigmas <= 0).any()):
        raise ValueError("blur sigmas must be positive")
    return _blur(images, sigmas, kernel_size)


def _blur(images: torch.Tensor, sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    # Unchecked (no wait for the device): Augmentation draws positive sigmas itself.
    batch, channels, height, width = images.shape
    offsets = torch.arange(kernel_size, dtype=images.dtype, device=images.device) - (kernel_size - 1) / 2
    kernels = torch.exp(-0.5 * (offsets / sigmas) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    pad = kernel_size // 2
    x = F.pad(images.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernels.view(-1, 1, 1, kernel_size), groups=batch * channels)
    x = F.conv2d(x, kernels.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return x.view(batch, channels, height, width)


def solarize(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert every pixel value at or above ``threshold``."""
    return torch.where(images >= threshold, 1 - images, images)


def default_blur_kernel_size(side: int, max_sigma: float = 2.0) -> int:
    """The blur kernel for images of ``side`` px and sigmas up to ``max_sigma`` px: odd, reaching 3 sigma either side
    (13 px for sigma 2, about as far as PIL's ``GaussianBlur(radius=sigma)`` of solo-learn, SimCLR and EMP-SSL, so
    that a blur of sigma 2 has a standard deviation of 2 px) and at least about 10% of the side (23 at 224 px, as in
    BYOL); never wider than reflect padding allows (``side - 1`` either side). Until 2026-12-07 it was the 10% alone:
    5 px at 32 px, whose largest blur had a standard deviation of 1.3 px instead of 2."""
    radius = max(1, math.ceil(3 * max_sigma), round(side * 0.05))
    return 2 * max(0, min(radius, side - 1)) + 1


def resolve_blur_kernel(augmentation: Augmentation, side: int) -> Augmentation:
    """``augmentation`` with its blur kernel fixed for images of ``side`` px (:func:`default_blur_kernel_size` where
    it blurs and names none), so that a record of it (a store's settings, a cache's key) names the kernel used."""
    if augmentation.blur_p == 0 or augmentation.blur_kernel_size is not None:
        return augmentation
    return replace(augmentation, blur_kernel_size=default_blur_kernel_size(side, augmentation.blur_sigma[1]))


def _check_probability(value: float, name: str) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


@dataclass(frozen=True)
class Augmentation:
    """Random per-image flip, colour jitter, grayscale, blur and solarization of a batch.

    ``augmentation(images, generator)`` returns the augmented batch. The defaults are VICReg's
    (and SimCLR's) colour augmentation; ``blur_p`` is 0 here because blurring 32 px images destroys
    them (VICReg uses 1.0 / 0.1 on its two 224 px views; the trainer uses 0.5 on large images).
    ``blur_kernel_size`` None: :func:`default_blur_kernel_size` of the images' side and the largest sigma.
    """

    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int | None = None
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            _check_probability(getattr(self, name), name)
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative (the factor is drawn from [1 - {name}, 1 + {name}])")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5] (a fraction of a turn), got {self.hue}")
        if self.blur_kernel_size is not None and (self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0):
            raise ValueError(f"blur_kernel_size must be a positive odd number of pixels, got {self.blur_kernel_size}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (min, max) with 0 < min <= max, got {self.blur_sigma}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_images(images)
        batch = images.shape[0]
        device = generator.device if generator is not None else torch.device("cpu")
        # All parameters in one draw of fixed shape, so the generator advances the same way
        # whatever the probabilities are.
        u = torch.rand(batch, 10, generator=generator, device=device).to(images.device, images.dtype)

        def chosen(column: int, p: float) -> torch.Tensor:
            return (u[:, column] < p).view(-1, 1, 1, 1)

        def factor(column: int, spread: float) -> torch.Tensor:
            low = max(0.0, 1 - spread)
            return low + (1 + spread - low) * u[:, column]

        x = torch.where(chosen(0, self.flip_p), images.flip(-1), images)
        if self.jitter_p > 0:
            jittered = adjust_brightness(x, factor(2, self.brightness))
            jittered = adjust_contrast(jittered, factor(3, self.contrast))
            jittered = adjust_saturation(jittered, factor(4, self.saturation))
            if self.hue > 0:
                jittered = _rotate_hue(jittered, (self.hue * (2 * u[:, 5] - 1)).view(-1, 1, 1))
            x = torch.where(chosen(1, self.jitter_p), jittered, x)
        if self.grayscale_p > 0:
            x = torch.where(chosen(6, self.grayscale_p), grayscale(x).expand_as(x), x)
        if self.blur_p > 0:
            kernel_size = self.blur_kernel_size or default_blur_kernel_size(min(images.shape[-2:]), self.blur_sigma[1])
            sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * u[:, 8]
            if kernel_size // 2 >= min(images.shape[-2:]):
                raise ValueError(f"a blur kernel of {kernel_size} pixels needs images larger than {kernel_size // 2} "
                                 f"pixels; pass a smaller blur_kernel_size")
            x = torch.where(chosen(7, self.blur_p), _blur(x, sigma.view(-1, 1), kernel_size), x)
        if self.solarize_p > 0:
            x = torch.where(chosen(9, self.solarize_p), solarize(x), x)
        return x


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.augment says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
