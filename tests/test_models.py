"""Backbones keep torchvision's names and numbers; SSLModel applies its own pixel normalisation."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import helpers
from ssl_patch_analysis.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ModelInfo,
    Preprocess,
    SSLModel,
    build_backbone,
    build_mlp,
)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_backbone_equals_torchvision_pooled_output(arch):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)().eval()
    reference.fc = nn.Identity()
    ours, dim = build_backbone(arch)
    missing = ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), reference(x), atol=1e-5)
    assert dim == {"resnet18": 512, "resnet50": 2048}[arch]


def test_resnet50x2_doubles_every_width_not_torchvision_wide():
    model, dim = build_backbone("resnet50x2")
    assert dim == 4096
    assert model.conv1.weight.shape == (128, 3, 7, 7)
    assert model.layer1[0].conv1.weight.shape == (128, 128, 1, 1)
    assert model.layer4[2].conv3.weight.shape == (4096, 1024, 1, 1)
    wide = torchvision.models.wide_resnet50_2()
    assert wide.conv1.weight.shape[0] == 64  # torchvision's "wide" keeps the stem and output widths


@pytest.mark.parametrize("padding, side", [(1, 4), (2, 5)])
def test_cifar_stem_padding_sets_final_map(padding, side):
    model, _ = build_backbone("resnet18", stem="cifar", cifar_padding=padding)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.feature_map(torch.zeros(1, 3, 32, 32)).shape[-2:] == (side, side)


def test_narrow_width_scales_channels():
    model, dim = build_backbone("resnet18", stem="cifar", width=0.25)
    assert dim == 128 and model.conv1.weight.shape[0] == 16


def test_vicreg_projector_layout():
    mlp = build_mlp([8, 16, 16, 4], last_bias=False)
    names = [n for n, _ in mlp.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "4.weight", "4.bias", "6.weight"]


def test_ssl_model_normalises_pixels_itself():
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", stem="cifar", width=0.25)
    projector = build_mlp([dim, 32, 8])
    pre = Preprocess(input_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    model = SSLModel(backbone, projector, preprocess=pre, info=ModelInfo(embedding_dim=dim)).eval()
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(x)
        h_ref = backbone((x - mean) / std)
        assert torch.allclose(out["h"], h_ref, atol=1e-6)
        assert torch.allclose(out["z"], projector(h_ref), atol=1e-6)
        assert torch.allclose(model.project(model.embed(x)), out["z"], atol=1e-6)
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        model.embed(torch.rand(3, 32, 32))


def test_model_without_projector_says_so():
    backbone, dim = build_backbone("resnet18", stem="cifar", width=0.25)
    model = SSLModel(backbone, preprocess=Preprocess(input_size=32, mean=None, std=None))
    assert set(model(torch.rand(1, 3, 32, 32))) == {"h"}
    with pytest.raises(RuntimeError, match="no projector"):
        model.project(torch.zeros(1, dim))


def test_randomly_initialised_fresh_seeded_weights_and_calibrated_batch_norm():
    from ssl_patch_analysis.models import randomly_initialised

    trained = helpers.tiny_model(seed=1)
    trained.info.source = "pretrained/tiny.pt"
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    images = helpers.random_images(40, size=48, seed=1)  # resized to the input side (32)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    control = randomly_initialised(trained, seed=7, calibration_images=images, batch_size=64)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
    assert not control.training
    weights = [k for k, v in before.items() if v.ndim >= 2]  # convolutions and linear layers
    assert weights and all(not torch.allclose(control.state_dict()[k], before[k]) for k in weights)
    again = randomly_initialised(helpers.tiny_model(seed=2), seed=7, calibration_images=images, batch_size=64)
    for k, v in control.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k  # the seed alone decides the control
    # BatchNorm of the stem: one calibration batch, so its statistics are the batch's own, computed here
    # independently from the stem convolution's output.
    x = F.interpolate(images.float() / 255, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        stem = control.backbone.conv1(control.normalize_pixels(x))
    bn = control.backbone.bn1
    assert torch.allclose(bn.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, stem.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert bn.momentum == 0.1 or bn.momentum is None  # restored to what it was
    assert control.info.source == "tiny-random-init"
    assert control.info.extra["random_init"] == {"seed": 7, "batch_norm_calibration_images": 40}


def test_randomly_initialised_without_calibration_keeps_initial_statistics(tiny_model):
    from ssl_patch_analysis.models import randomly_initialised

    control = randomly_initialised(tiny_model, seed=0)
    bn = control.backbone.bn1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        randomly_initialised(helpers.tiny_model(), calibration_images=torch.zeros(4, 32, 32, dtype=torch.uint8))
