"""Batched augmentation: each op equals torchvision's on every image; probabilities and ranges hold."""
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from ssl_patch_analysis.augment import (
    Augmentation,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    default_blur_kernel_size,
    gaussian_blur,
    resolve_blur_kernel,
    solarize,
)

IDENTITY = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


@pytest.fixture(scope="module")
def images(cifar10_npz) -> torch.Tensor:
    from ssl_patch_analysis.data import load_dataset

    data = load_dataset("cifar10", "test", root=cifar10_npz.parent)
    # Real photos plus a grey image and a saturated one (the hue conversion's edge cases).
    stripes = torch.zeros(3, 32, 32)
    for channel in range(3):
        stripes[channel, :, 11 * channel:11 * (channel + 1)] = 1.0
    return torch.cat([data.images[:6].float() / 255, torch.full((1, 3, 32, 32), 0.5), stripes[None]])


def _each(images: torch.Tensor, op, factors) -> torch.Tensor:
    return torch.stack([op(image, float(f)) for image, f in zip(images, factors, strict=True)])


@pytest.mark.parametrize("ours, theirs, low, high", [
    (adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    (adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    (adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
    (adjust_hue, TF.adjust_hue, -0.1, 0.1),
])
def test_each_adjustment_matches_torchvision_per_image(images, ours, theirs, low, high):
    factors = torch.linspace(low, high, len(images))
    torch.testing.assert_close(ours(images, factors), _each(images, theirs, factors), atol=1e-5, rtol=0)


def test_large_hue_shifts_match_torchvision(images):
    factors = torch.linspace(-0.5, 0.5, len(images))
    torch.testing.assert_close(adjust_hue(images, factors), _each(images, TF.adjust_hue, factors), atol=1e-5, rtol=0)


def test_blur_matches_torchvision_per_image(images):
    sigmas = torch.linspace(0.1, 2.0, len(images))
    expected = torch.stack([TF.gaussian_blur(image, [5, 5], [float(s), float(s)])
                            for image, s in zip(images, sigmas, strict=True)])
    torch.testing.assert_close(gaussian_blur(images, sigmas, 5), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_default_blur_of_32px_images_is_pils_gaussian_blur(cifar10_npz, sigma):
    """solo-learn, SimCLR and EMP-SSL blur with PIL's ``GaussianBlur(radius=sigma)``, sigma up to 2 px, on 32 px
    CIFAR images. The default kernel there was 5 px (10% of the side), which cut a sigma-2 blur to a standard
    deviation of 1.3 px (5 grey levels from PIL's on average); it now reaches 3 sigma (13 px) and gives PIL's blur
    to about a grey level, and a point's spread has PIL's variance, sigma^2."""
    from PIL import Image, ImageFilter

    from ssl_patch_analysis.data import load_dataset

    photos = load_dataset("cifar10", "test", root=cifar10_npz.parent).images[:16]
    blur = Augmentation(**{**IDENTITY, "blur_p": 1.0, "blur_sigma": (sigma, sigma)})
    ours = blur(photos.float() / 255, torch.Generator().manual_seed(0)) * 255
    pil = torch.stack([TF.pil_to_tensor(TF.to_pil_image(p).filter(ImageFilter.GaussianBlur(sigma))) for p in photos])
    assert (ours - pil.float()).abs().mean() < 1.5
    point = torch.zeros(1, 3, 32, 32)
    point[..., 16, 16] = 1.0
    spread = blur(point, torch.Generator().manual_seed(0))[0, 0].sum(0)
    offsets = torch.arange(32) - 16.0
    variance = float((spread * offsets**2).sum() / spread.sum())
    image = Image.fromarray((point[0, 0] * 255).byte().numpy()).filter(ImageFilter.GaussianBlur(sigma))
    pil_spread = torch.from_numpy(np.asarray(image, dtype=np.float64)).sum(0)
    pil_variance = float((pil_spread * offsets.double()**2).sum() / pil_spread.sum())
    assert variance == pytest.approx(sigma**2, rel=0.05) and variance == pytest.approx(pil_variance, rel=0.1)


def test_default_blur_kernel_reaches_three_sigma_and_ten_percent_of_the_side():
    assert [default_blur_kernel_size(side) for side in (32, 224, 256)] == [13, 23, 27]
    assert default_blur_kernel_size(32, max_sigma=1.0) == 7 and default_blur_kernel_size(4) == 7  # reflect padding
    kernel = resolve_blur_kernel(Augmentation(blur_p=0.1), 32).blur_kernel_size
    assert kernel == 13 and resolve_blur_kernel(Augmentation(blur_p=0.1, blur_kernel_size=5), 32).blur_kernel_size == 5
    assert resolve_blur_kernel(Augmentation(), 32).blur_kernel_size is None  # no blur: nothing to name


def test_solarize_matches_torchvision(images):
    torch.testing.assert_close(solarize(images), TF.solarize(images, 0.5))


def test_p1_with_fixed_factors_equals_the_torchvision_chain(images):
    # Zero spreads fix brightness/contrast/saturation at 1 and hue at 0: the chain must reduce to
    # flip + grayscale + blur + solarize, each applied to every image.
    augmentation = Augmentation(flip_p=1.0, jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
                                grayscale_p=1.0, blur_p=1.0, blur_sigma=(1.5, 1.5), blur_kernel_size=3,
                                solarize_p=1.0)
    out = augmentation(images, torch.Generator().manual_seed(0))
    grey = TF.rgb_to_grayscale(TF.horizontal_flip(images), 3)
    expected = TF.solarize(TF.gaussian_blur(grey, [3, 3], [1.5, 1.5]), 0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_p1_jitter_applies_the_drawn_factors_in_torchvision_order(images):
    augmentation = Augmentation(**{**IDENTITY, "jitter_p": 1.0})
    generator = torch.Generator().manual_seed(3)
    out = augmentation(images, generator)
    u = torch.rand(len(images), 10, generator=torch.Generator().manual_seed(3))
    expected = []
    for image, row in zip(images, u, strict=True):
        image = TF.adjust_brightness(image, 0.6 + 0.8 * float(row[2]))
        image = TF.adjust_contrast(image, 0.6 + 0.8 * float(row[3]))
        image = TF.adjust_saturation(image, 0.8 + 0.4 * float(row[4]))
        expected.append(TF.adjust_hue(image, 0.1 * (2 * float(row[5]) - 1)))
    torch.testing.assert_close(out, torch.stack(expected), atol=1e-5, rtol=0)


def test_p0_is_identity(images):
    out = Augmentation(**IDENTITY)(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, images)


def test_output_stays_in_unit_range_and_differs_per_image(images):
    batch = images[:1].expand(256, -1, -1, -1).contiguous()
    out = Augmentation(blur_p=0.5, solarize_p=0.2)(batch, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    distinct = torch.unique(out.reshape(256, -1), dim=0)
    # Same input everywhere: only per-image parameters make the outputs differ.
    assert len(distinct) > 200
    flipped = (out - batch.flip(-1)).abs().flatten(1).amax(1) < (out - batch).abs().flatten(1).amax(1)
    assert 0.3 < flipped.float().mean() < 0.7


def test_same_generator_seed_reproduces_the_batch(images):
    augmentation = Augmentation(blur_p=0.5, solarize_p=0.2)
    first = augmentation(images, torch.Generator().manual_seed(5))
    again = augmentation(images, torch.Generator().manual_seed(5))
    other = augmentation(images, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_application_rates_follow_the_probabilities():
    # Grayscale applied exactly where the three channels become equal (no jitter, no flip).
    colourful = torch.rand(4000, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = Augmentation(**{**IDENTITY, "grayscale_p": 0.2})(colourful, torch.Generator().manual_seed(1))
    grey = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert abs(grey.float().mean().item() - 0.2) < 0.03


@pytest.mark.parametrize("kwargs, message", [
    ({"flip_p": 1.5}, "probability"),
    ({"hue": 0.7}, "hue"),
    ({"brightness": -0.1}, "non-negative"),
    ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Augmentation(**kwargs)


def test_bad_images_are_rejected():
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        Augmentation()(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
