"""The loader reads each project's real checkpoint layout and reproduces the writer's outputs.

Every writer below is built independently of the loader (torchvision ResNets and nn.Sequential
heads with the original projects' module names), saved in that project's exact layout, loaded
with ``load_model``, and compared on the same images: the embedding ``h`` and, where there is a
head, the projection ``z`` must agree to 1e-5.
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from ssl_patch_analysis import weights
from ssl_patch_analysis.checkpoints import (
    CHECKSUM_KEY,
    FORMATS,
    detect_format,
    infer_backbone_arch,
    load_model,
    main,
    save_checkpoint,
)
from ssl_patch_analysis.models import SSLModel, build_backbone, build_mlp

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_SOLO = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
ATOL = 1e-5


def _randomize_norms(module: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so a mis-mapped BN changes the outputs."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.2)
    return module.eval()


def _tv_resnet(depth: int, cifar_padding: int | None = None, num_classes: int = 1000) -> nn.Module:
    net = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth](num_classes=num_classes)
    if cifar_padding is not None:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=cifar_padding, bias=False)
        net.maxpool = nn.Identity()
    return _randomize_norms(net)


def _trunk(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled torchvision trunk output, computed without the loader's ResNet."""
    return torch.flatten(nn.Sequential(*list(net.children())[:-1])(x), 1)


def _normalize(x: torch.Tensor, mean_std) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)
    return (x - mean) / std


def _images(size: int) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _load(path, **kwargs) -> SSLModel:
    return load_model(path, verbose=False, **kwargs)


# ----------------------------------------------------------------------------- formats


def test_vicreg_backbone_only_resnet50(tmp_path):
    # facebookresearch/vicreg resnet.py: ConstantPad2d(1) then conv1 with padding 2 (= padding 3).
    writer = _tv_resnet(50)
    writer.conv1.padding = (2, 2)
    state = {k: v for k, v in writer.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "resnet50.pth")

    model = _load(tmp_path / "resnet50.pth")
    x = _images(64)
    with torch.no_grad():
        expected = _trunk(writer, F.pad(_normalize(x, IMAGENET), (1, 1, 1, 1)))
        torch.testing.assert_close(model.embed(x), expected, atol=ATOL, rtol=0)
    assert model.info.format == "backbone"
    assert (model.info.arch, model.info.stem, model.info.embedding_dim) == ("resnet50", "imagenet", 2048)
    assert model.projector is None and not model.training
    assert model.preprocess.input_size == 224 and model.preprocess.mean == IMAGENET[0]


def test_vicreg_full_checkpoint_with_ddp_prefix_and_lars_filters(tmp_path, monkeypatch):
    backbone = _tv_resnet(50)
    backbone.fc = nn.Identity()
    projector = _randomize_norms(nn.Sequential(
        nn.Linear(2048, 64), nn.BatchNorm1d(64), nn.ReLU(True),
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(True), nn.Linear(64, 32, bias=False)))
    vicreg = nn.Module()
    vicreg.backbone, vicreg.projector = backbone, projector
    ddp = nn.Module()
    ddp.module = vicreg

    # main_vicreg.py's LARS keeps exclude_bias_and_norm in its param_groups; torch.save pickles
    # the function by reference under the script's module name.
    def exclude_bias_and_norm(p):
        return p.ndim == 1
    exclude_bias_and_norm.__module__, exclude_bias_and_norm.__qualname__ = "__main__", "exclude_bias_and_norm"
    monkeypatch.setattr(sys.modules["__main__"], "exclude_bias_and_norm", exclude_bias_and_norm, raising=False)
    optimizer = torch.optim.SGD([{"params": ddp.parameters(), "weight_decay_filter": exclude_bias_and_norm,
                                  "lars_adaptation_filter": exclude_bias_and_norm}], lr=0.1)
    torch.save({"epoch": 100, "model": ddp.state_dict(), "optimizer": optimizer.state_dict()},
               tmp_path / "model.pth")

    model = _load(tmp_path / "model.pth")
    x = _images(64)
    with torch.no_grad():
        h = backbone(_normalize(x, IMAGENET))
        out = model(x)
        torch.testing.assert_close(out["h"], h, atol=ATOL, rtol=0)
        torch.testing.assert_close(out["z"], projector(h), atol=ATOL, rtol=0)
    assert model.info.format == "vicreg-full" and model.info.method == "vicreg"
    assert model.info.projector_dims == [2048, 64, 64, 32]
    assert model.projector[-1].bias is None


def test_resnet50x2_shapes_map_onto_the_widened_resnet():
    # VICReg/VISSL widen every width (inplanes 128, bottleneck planes 128..1024), which is not
    # torchvision's wide_resnet50_2; built on the meta device to avoid allocating 94M params.
    with torch.device("meta"):
        writer = torchvision.models.resnet.ResNet(Bottleneck, [3, 4, 6, 3])
        writer.inplanes = 128
        writer.conv1 = nn.Conv2d(3, 128, kernel_size=7, stride=2, padding=3, bias=False)
        writer.bn1 = nn.BatchNorm2d(128)
        writer.layer1 = writer._make_layer(Bottleneck, 128, 3)
        writer.layer2 = writer._make_layer(Bottleneck, 256, 4, stride=2)
        writer.layer3 = writer._make_layer(Bottleneck, 512, 6, stride=2)
        writer.layer4 = writer._make_layer(Bottleneck, 1024, 3, stride=2)
        state = {k: v for k, v in writer.state_dict().items() if not k.startswith("fc.")}
        arch, stem, width = infer_backbone_arch(state)
        built, dim = build_backbone(arch, stem=stem, width=width)
        wide = torchvision.models.wide_resnet50_2()
    assert (arch, stem, width, dim) == ("resnet50x2", "imagenet", 2.0, 4096)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert sum(v.numel() for v in state.values() if v.ndim > 1) > 90e6
    wide_shapes = {k: v.shape for k, v in wide.state_dict().items() if not k.startswith("fc.")}
    assert wide_shapes != {k: v.shape for k, v in state.items()}


def _solo_learn_module(prefix: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """A solo-learn BYOL-like LightningModule: backbone, projector, predictor, momentum nets, classifier."""
    backbone = _tv_resnet(18, cifar_padding=2)
    backbone.fc = nn.Identity()
    projector = _randomize_norms(nn.Sequential(
        nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32)))
    method = nn.Module()
    setattr(method, prefix, backbone)
    method.projector = projector
    method.classifier = nn.Linear(512, 100)
    method.predictor = nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 32))
    method.momentum_backbone = _tv_resnet(18, cifar_padding=2)
    method.momentum_projector = nn.Sequential(nn.Linear(512, 32))
    return method, backbone, projector


@pytest.mark.parametrize("layout", ["current", "older"])
def test_solo_learn_ckpt_with_args_json(tmp_path, layout):
    prefix = "backbone" if layout == "current" else "encoder"
    method, backbone, projector = _solo_learn_module(prefix)
    torch.save({"epoch": 999, "global_step": 1, "pytorch-lightning_version": "2.0.9",
                "state_dict": method.state_dict(), "loops": {}, "callbacks": {},
                "optimizer_states": [torch.optim.SGD(method.parameters(), lr=0.1).state_dict()],
                "lr_schedulers": [{"last_epoch": 999, "base_lrs": [0.1]}]},
               tmp_path / "byol-cifar100-abc-ep=999.ckpt")
    if layout == "current":
        args = {"method": "byol", "backbone": {"name": "resnet18", "kwargs": {}},
                "data": {"dataset": "cifar100", "num_classes": 100},
                "augmentations": [{"crop_size": 32, "rrc": {"enabled": True}}],
                "method_kwargs": {"proj_hidden_dim": 64, "proj_output_dim": 32}}
    else:
        args = {"method": "byol", "encoder": "resnet18", "dataset": "cifar100", "crop_size": [32],
                "proj_hidden_dim": 64, "output_dim": 32}
    (tmp_path / "args.json").write_text(json.dumps(args))

    model = _load(tmp_path / "byol-cifar100-abc-ep=999.ckpt")
    x = _images(32)
    with torch.no_grad():
        h = backbone(_normalize(x, CIFAR100_SOLO))
        out = model(x)
        torch.testing.assert_close(out["h"], h, atol=ATOL, rtol=0)
        torch.testing.assert_close(out["z"], projector(h), atol=ATOL, rtol=0)
    info = model.info
    assert (info.format, info.method, info.stem, info.cifar_padding) == ("solo-learn", "byol", "cifar", 2)
    assert set(info.extra["dropped"]) == {"classifier", "predictor", "momentum_backbone", "momentum_projector"}
    assert model.preprocess.mean == CIFAR100_SOLO[0] and model.preprocess.input_size == 32
    assert "assumed" not in info.extra


def test_emp_ssl_checkpoint(tmp_path):
    # tsb0601/EMP-SSL model.py: encoder(backbone, pre_feature, projection) inside nn.DataParallel.
    backbone = _tv_resnet(18, cifar_padding=1)
    backbone.fc = nn.Identity()
    encoder = nn.Module()
    encoder.backbone = backbone
    encoder.pre_feature = _randomize_norms(nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU()))
    encoder.projection = _randomize_norms(nn.Sequential(
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16)))
    torch.save(nn.DataParallel(encoder).state_dict(), tmp_path / "29.pt")

    model = _load(tmp_path / "29.pt")
    x = _images(32)
    with torch.no_grad():
        h = backbone(_normalize(x, ((0.5,) * 3, (0.5,) * 3)))
        feature = encoder.pre_feature(h)
        out = model(x)
        torch.testing.assert_close(out["h"], h, atol=ATOL, rtol=0)
        torch.testing.assert_close(out["pre_feature"], feature, atol=ATOL, rtol=0)
        torch.testing.assert_close(out["z"], F.normalize(encoder.projection(feature), p=2), atol=ATOL, rtol=0)
        torch.testing.assert_close(model.project(out["h"]), out["z"])
    assert torch.allclose(out["z"].norm(dim=1), torch.ones(2))
    info = model.info
    assert (info.format, info.method, info.cifar_padding) == ("emp-ssl", "emp-ssl", 1)
    assert info.pre_feature_dims == [512, 64] and info.projector_dims == [64, 64, 16]
    assert info.projection_normalized and model.preprocess.mean == (0.5, 0.5, 0.5)


def test_lightly_lightning_checkpoint(tmp_path):
    # lightly examples: backbone = nn.Sequential(*list(resnet.children())[:-1]);
    # SimCLRProjectionHead(batch_norm=True).layers = Linear(no bias)-BN-ReLU-Linear(no bias)-BN.
    resnet = _tv_resnet(18)
    simclr = nn.Module()
    simclr.backbone = nn.Sequential(*list(resnet.children())[:-1])
    head = nn.Module()
    head.layers = _randomize_norms(nn.Sequential(
        nn.Linear(512, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16, bias=False),
        nn.BatchNorm1d(16)))
    simclr.projection_head = head
    torch.save({"epoch": 9, "pytorch-lightning_version": "2.1.0", "state_dict": simclr.state_dict()},
               tmp_path / "epoch=9-step=100.ckpt")

    model = _load(tmp_path / "epoch=9-step=100.ckpt")
    x = _images(64)
    with torch.no_grad():
        h = torch.flatten(simclr.backbone(_normalize(x, IMAGENET)), 1)
        out = model(x)
        torch.testing.assert_close(out["h"], h, atol=ATOL, rtol=0)
        torch.testing.assert_close(out["z"], head.layers(h), atol=ATOL, rtol=0)
    assert model.info.format == "lightly" and model.info.arch == "resnet18"
    assert model.info.projector_dims == [512, 64, 16]


def test_sthalles_simclr_checkpoint(tmp_path):
    # sthalles/SimCLR ResNetSimCLR: backbone.fc = Sequential(Linear(d, d), ReLU(), Linear(d, out_dim)).
    backbone = _tv_resnet(18, num_classes=16)
    backbone.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), backbone.fc)
    simclr = nn.Module()
    simclr.backbone = backbone
    optimizer = torch.optim.Adam(simclr.parameters(), 3e-4)
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": simclr.state_dict(),
                "optimizer": optimizer.state_dict()}, tmp_path / "checkpoint_0100.pth.tar")
    (tmp_path / "config.yml").write_text("arch: resnet18\ndataset_name: cifar10\nepochs: 100\n")

    model = _load(tmp_path / "checkpoint_0100.pth.tar")
    x = _images(32)
    with torch.no_grad():
        h = _trunk(backbone, x)  # sthalles trains on ToTensor() pixels: no Normalize
        out = model(x)
        torch.testing.assert_close(out["h"], h, atol=ATOL, rtol=0)
        torch.testing.assert_close(out["z"], backbone.fc(h), atol=ATOL, rtol=0)
    assert model.info.format == "sthalles-simclr" and model.info.method == "simclr"
    assert not model.preprocess.normalize and model.preprocess.input_size == 32


def test_vissl_simclr_checkpoint(tmp_path):
    # VISSL: trunk keys "_feature_blocks.<torchvision name>", heads "<i>.clf.<j>" chained with a ReLU.
    resnet = _tv_resnet(50)
    trunk = {f"_feature_blocks.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    head0, head1 = nn.Sequential(nn.Linear(2048, 64)), nn.Sequential(nn.Linear(64, 16))
    heads = {**{f"0.clf.{k}": v for k, v in head0.state_dict().items()},
             **{f"1.clf.{k}": v for k, v in head1.state_dict().items()}}
    torch.save({"phase_idx": 799, "iteration": 1000, "type": "checkpoint",
                "classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}, "meta": {}},
                                      "loss": {}}},
               tmp_path / "model_final_checkpoint_phase799.torch")

    model = _load(tmp_path / "model_final_checkpoint_phase799.torch")
    x = _images(64)
    with torch.no_grad():
        h = _trunk(resnet, _normalize(x, IMAGENET))
        out = model(x)
        torch.testing.assert_close(out["h"], h, atol=ATOL, rtol=0)
        torch.testing.assert_close(out["z"], head1(F.relu(head0(h))), atol=ATOL, rtol=0)
    assert model.info.format == "vissl" and model.info.projector_dims == [2048, 64, 16]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # DINO uses nn.utils.weight_norm (weight_g/weight_v keys)
def test_dino_full_checkpoint_loads_teacher_backbone(tmp_path):
    teacher, student = _tv_resnet(18), _tv_resnet(18)
    for net in (teacher, student):
        net.fc = nn.Identity()

    def wrapper(backbone: nn.Module) -> nn.Module:
        head = nn.Module()
        head.mlp = nn.Sequential(nn.Linear(512, 32), nn.GELU(), nn.Linear(32, 8))
        head.last_layer = nn.utils.weight_norm(nn.Linear(8, 100, bias=False))
        multi_crop = nn.Module()
        multi_crop.backbone, multi_crop.head = backbone, head
        return multi_crop

    torch.save({"student": nn.DataParallel(wrapper(student)).state_dict(), "teacher": wrapper(teacher).state_dict(),
                "epoch": 100, "args": argparse.Namespace(arch="resnet50", out_dim=100, lr=0.03),
                "dino_loss": {"center": torch.zeros(1, 100)}}, tmp_path / "checkpoint.pth")

    model = _load(tmp_path / "checkpoint.pth")
    x = _images(64)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), teacher(_normalize(x, IMAGENET)), atol=ATOL, rtol=0)
    assert model.info.format == "dino-full" and model.info.method == "dino"
    assert not model.has_projector
    with pytest.raises(RuntimeError, match="no projector"):
        model.project(torch.zeros(1, 512))


def test_plain_torchvision_state_dict_drops_fc(tmp_path):
    net = _tv_resnet(18)
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    model = _load(tmp_path / "resnet18.pth")
    x = _images(64)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), _trunk(net, _normalize(x, IMAGENET)), atol=ATOL, rtol=0)
    assert model.info.format == "torchvision" and model.info.extra["dropped"] == {"fc": 2}


def test_cifar_stem_without_padding_information_is_recorded_as_assumed(tmp_path):
    net = _tv_resnet(18, cifar_padding=2)
    torch.save(net.state_dict(), tmp_path / "net.pth")
    assumed = _load(tmp_path / "net.pth")
    told = _load(tmp_path / "net.pth", cifar_padding=2)
    x = _images(32)
    with torch.no_grad():
        expected = _trunk(net, _normalize(x, CIFAR10))
        torch.testing.assert_close(told.embed(x), expected, atol=ATOL, rtol=0)
        assert not torch.allclose(assumed.embed(x), expected, atol=1e-3)
    assert assumed.info.cifar_padding == 1 and any("padding 1" in a for a in assumed.info.extra["assumed"])
    assert told.info.cifar_padding == 2



def test_a_lightning_checkpoint_without_args_json_lists_solo_learns_padding_as_assumed(tmp_path):
    """A Lightning .ckpt whose keys start with backbone. is read as solo-learn's, whose CIFAR padding is 2; without
    args.json nothing confirms it is solo-learn's (other Lightning projects name their trunk backbone too), so the
    padding is listed as assumed (was: padding 2, silently, and another project's padding-1 net embedded wrongly)."""
    method, backbone, _ = _solo_learn_module("backbone")
    torch.save({"epoch": 9, "global_step": 1, "pytorch-lightning_version": "2.0.9",
                "state_dict": method.state_dict()}, tmp_path / "last.ckpt")
    model = _load(tmp_path / "last.ckpt")
    assert model.info.cifar_padding == 2
    (padding,) = [a for a in model.info.extra["assumed"] if "padding" in a]
    assert "padding 2" in padding and "no args.json" in padding and "cifar_padding=1" in padding
    x = _images(8)
    with torch.no_grad():  # the padding it assumed is the writer's here: h is the writer's
        torch.testing.assert_close(model.embed(x), backbone(_normalize(x, CIFAR10)), atol=ATOL, rtol=0)
    told = _load(tmp_path / "last.ckpt", cifar_padding=2)  # said by the user: nothing assumed of it
    assert not any("padding" in a for a in told.info.extra.get("assumed", []))


def test_cifar_padding_on_an_imagenet_stem_is_refused(tmp_path):
    # was: accepted and ignored (exit 0, no note); on the project's own files it is refused as well
    torch.save(_tv_resnet(18).state_dict(), tmp_path / "tv18.pth")
    with pytest.raises(ValueError, match=r"cifar_padding applies to the CIFAR stem \(a 3x3 conv1\); .*tv18\.pth holds "
                                         r"a ResNet with the ImageNet stem \(a 7x7 conv1\): leave it out$"):
        _load(tmp_path / "tv18.pth", cifar_padding=2)


def test_barlow_twins_and_emp_ssl_files_list_what_is_left_out(tmp_path):
    """facebookresearch/barlowtwins saves vicreg's layout plus its loss's BatchNorm (module.bn): read as Barlow Twins
    with bn listed as dropped (was: method vicreg, bn gone without a word); an EMP-SSL file with a classifier lists
    it (was: dropped silently)."""
    barlow = nn.Module()
    barlow.backbone = _tv_resnet(18)
    barlow.projector = nn.Sequential(nn.Linear(512, 32))
    barlow.bn = nn.BatchNorm1d(32, affine=False)
    ddp = nn.Module()
    ddp.module = barlow
    torch.save({"epoch": 3, "model": ddp.state_dict()}, tmp_path / "checkpoint.pth")
    model = _load(tmp_path / "checkpoint.pth")
    assert (model.info.format, model.info.method) == ("vicreg-full", "barlowtwins")
    assert model.info.extra["dropped"] == {"bn": 3, "backbone.fc": 2}  # running mean, var, batches; fc weight, bias
    del barlow.bn
    barlow.backbone.fc = nn.Identity()
    torch.save({"epoch": 3, "model": ddp.state_dict()}, tmp_path / "vicreg.pth")
    vicreg = _load(tmp_path / "vicreg.pth")
    assert (vicreg.info.method, vicreg.info.extra["dropped"]) == ("vicreg", {})

    encoder = nn.Module()
    encoder.backbone = _tv_resnet(18, cifar_padding=1)
    encoder.backbone.fc = nn.Identity()
    encoder.pre_feature = nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU())
    encoder.projection = nn.Sequential(nn.Linear(64, 16))
    encoder.classifier = nn.Linear(64, 10)
    torch.save(nn.DataParallel(encoder).state_dict(), tmp_path / "29.pt")
    assert _load(tmp_path / "29.pt").info.extra["dropped"] == {"classifier": 2}


# ----------------------------------------------------------------------------- own format


def test_own_format_round_trip_full_and_half(tmp_path):
    emp = nn.Module()
    emp.backbone = _tv_resnet(18, cifar_padding=1)
    emp.backbone.fc = nn.Identity()
    emp.pre_feature = _randomize_norms(nn.Sequential(nn.Linear(512, 32), nn.BatchNorm1d(32), nn.ReLU()))
    emp.projection = _randomize_norms(nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8)))
    torch.save({f"module.{k}": v for k, v in emp.state_dict().items()}, tmp_path / "0.pt")
    original = _load(tmp_path / "0.pt")

    save_checkpoint(original, tmp_path / "own.pt", train={"epochs": 1, "patch_size": 8})
    save_checkpoint(original, tmp_path / "own16.pt", half=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.pt", "own.pt", "own16.pt"]  # no temp files

    raw = torch.load(tmp_path / "own.pt", weights_only=True)
    assert raw["format"] == "ssl_patch_analysis" and raw["version"] == 1
    assert raw["arch"]["name"] == "resnet18" and raw["arch"]["cifar_padding"] == 1
    assert raw["arch"]["pre_feature_dims"] == [512, 32] and raw["arch"]["projection_normalized"]
    assert raw["train"] == {"epochs": 1, "patch_size": 8, "method": "emp-ssl"}
    assert torch.load(tmp_path / "own16.pt", weights_only=True)["backbone"]["conv1.weight"].dtype == torch.float16

    full, half = _load(tmp_path / "own.pt"), _load(tmp_path / "own16.pt")
    x = _images(32)
    with torch.no_grad():
        expected = original(x)
        for key, value in full(x).items():
            torch.testing.assert_close(value, expected[key], atol=ATOL, rtol=0)
        got = half(x)
        assert all(p.dtype == torch.float32 for p in half.parameters())
        torch.testing.assert_close(got["h"], expected["h"], atol=0.05, rtol=0.02)
    assert full.info.format == "ssl_patch_analysis" and full.info.method == "emp-ssl"
    assert full.preprocess == original.preprocess


def _tensor_data_offset(path) -> int:
    """Byte offset of the middle of the largest tensor's data inside a torch zip checkpoint."""
    with zipfile.ZipFile(path) as archive:
        entry = max((e for e in archive.infolist() if "/data/" in e.filename), key=lambda e: e.file_size)
    with open(path, "rb") as f:
        f.seek(entry.header_offset)
        header = f.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2


def test_own_format_carries_a_checksum_that_names_a_damaged_file(tmp_path):
    # Was: one changed byte in the weights loaded silently, with a changed weight.
    backbone, dim = build_backbone("resnet18", stem="cifar", width=0.25)
    model = SSLModel(_randomize_norms(backbone), _randomize_norms(build_mlp([dim, 16, 8]))).eval()
    save_checkpoint(model, tmp_path / "own.pt", train={"epochs": 3})
    data = bytearray((tmp_path / "own.pt").read_bytes())
    data[_tensor_data_offset(tmp_path / "own.pt")] ^= 0x01  # the lowest bit of one byte of a weight
    (tmp_path / "damaged.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged\.pt is damaged: .*sha256.*fetch or copy it again$"):
        _load(tmp_path / "damaged.pt")
    raw = torch.load(tmp_path / "own.pt", weights_only=True)
    assert len(raw["sha256"]) == 64
    # A changed plain value (here the training record) is damage too.
    raw["train"]["epochs"] = 4
    torch.save(raw, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match=r"edited\.pt is damaged"):
        _load(tmp_path / "edited.pt")
    # Files written before checksums existed (the shipped pretrained/*.pt among them) still load.
    del raw["sha256"]
    torch.save(raw, tmp_path / "older.pt")
    assert _load(tmp_path / "older.pt").info.extra["train"] == {"epochs": 4, "method": "unknown"}
    x = _images(32)
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "own.pt")(x)["z"], model(x)["z"], atol=0, rtol=0)



@pytest.mark.parametrize("cut, said", [
    (lambda raw: raw.pop("preprocess"), "no 'preprocess' record"),
    (lambda raw: raw["arch"].pop("name"), "no architecture name (arch.name)"),
    (lambda raw: [raw["arch"].pop(k, None) for k in ("projector_layout", "projector_dims")],
     "no shape of its projector (arch.projector_layout or arch.projector_dims)"),
    (lambda raw: raw["preprocess"].pop("mean"), "no complete preprocess record (ValueError: preprocess mean and "
                                                "std must both be given or both be None)"),
])
def test_an_own_format_file_missing_a_record_is_named_in_one_line(tmp_path, tiny_model, capsys, cut, said):
    # was: "internal error (KeyError): projector_dims; ... please report it", exit 1
    save_checkpoint(tiny_model, tmp_path / "full.pt")
    raw = torch.load(tmp_path / "full.pt", weights_only=True)
    cut(raw)
    raw.pop(CHECKSUM_KEY)  # a hand-written file: no checksum either
    torch.save(raw, tmp_path / "cut.pt")
    with pytest.raises(SystemExit) as stopped:
        main(["--model", str(tmp_path / "cut.pt")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'cut.pt'} is in the ssl_patch_analysis format but has {said}: a file "
                          "of this format is written by save_checkpoint"), err
    assert "\n" not in err


def test_shipped_checkpoints_without_a_checksum_still_load():
    from pathlib import Path

    # The two ResNets shipped before checksums existed (newer shipped files carry one).
    folder = Path(__file__).resolve().parents[1] / "pretrained"
    for name in ("vicreg-resnet18-cifar10.pt", "bagssl-resnet18-cifar10.pt"):
        assert "sha256" not in torch.load(folder / name, weights_only=True)
        assert _load(folder / name).info.format == "ssl_patch_analysis"


def test_own_format_reads_the_architecture_off_the_module(tmp_path):
    backbone, dim = build_backbone("resnet18", stem="cifar", cifar_padding=2, width=0.25)
    model = SSLModel(_randomize_norms(backbone), _randomize_norms(build_mlp([dim, 16, 8], last_bias=False))).eval()
    save_checkpoint(model, tmp_path / "narrow.pt")  # model.info still holds the defaults (resnet50)
    loaded = _load(tmp_path / "narrow.pt")
    x = _images(32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["z"], model(x)["z"], atol=ATOL, rtol=0)
    info = loaded.info
    described = (info.arch, info.stem, info.cifar_padding, info.width, info.embedding_dim)
    assert described == ("resnet18", "cifar", 2, 0.25, 128)


# ----------------------------------------------------------------------------- names


def test_named_weights_download_only_when_asked(tmp_path, monkeypatch):
    net = _tv_resnet(18)
    source = tmp_path / "published" / "resnet18.pth"
    source.parent.mkdir()
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, source)
    monkeypatch.setitem(weights.NAMED_WEIGHTS, "test-resnet18",
                        weights.NamedWeights(source.as_uri(), "vicreg", "a local stand-in"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    with pytest.raises(FileNotFoundError, match="download=True") as err:
        _load("test-resnet18")
    assert source.as_uri() in str(err.value)

    model = _load("test-resnet18", download=True)
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "test-resnet18--resnet18.pth"
    assert cached.is_file() and model.info.source == str(cached)
    assert model.info.method == "vicreg" and model.info.extra["url"] == source.as_uri()
    source.unlink()  # from now on only the cache can serve it
    again = _load("test-resnet18")
    x = _images(64)
    with torch.no_grad():
        torch.testing.assert_close(again.embed(x), _trunk(net, _normalize(x, IMAGENET)), atol=ATOL, rtol=0)


def test_named_weights_point_at_the_published_files():
    assert weights.NAMED_WEIGHTS["vicreg-resnet50"].url == "https://dl.fbaipublicfiles.com/vicreg/resnet50.pth"
    assert weights.NAMED_WEIGHTS["vicreg-resnet50x2"].url == "https://dl.fbaipublicfiles.com/vicreg/resnet50x2.pth"
    assert weights.NAMED_WEIGHTS["vicreg-resnet50-full"].url.endswith("/vicreg/resnet50_fullckpt.pth")
    assert weights.NAMED_WEIGHTS["dino-resnet50"].url.endswith("/dino_resnet50_pretrain/dino_resnet50_pretrain.pth")
    assert weights.NAMED_WEIGHTS["simclr-resnet50-vissl"].url.endswith("model_final_checkpoint_phase799.torch")


def test_shipped_names_resolve_to_the_pretrained_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_PRETRAINED", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"vicreg-resnet18-cifar10.*not in this checkout yet"):
        _load("vicreg")
    backbone, dim = build_backbone("resnet18", stem="cifar", width=0.25)
    save_checkpoint(SSLModel(backbone, build_mlp([dim, 8])), tmp_path / "vicreg-resnet18-cifar10.pt",
                    train={"method": "vicreg"})
    for name in ("vicreg", "vicreg-resnet18-cifar10"):
        model = _load(name)
        assert model.info.extra["name"] == "vicreg-resnet18-cifar10" and model.info.method == "vicreg"


# ----------------------------------------------------------------------------- bad input


def test_unknown_layout_lists_formats_and_keys(tmp_path):
    torch.save({"weights_of_something": torch.zeros(3), "step": 5}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="unknown checkpoint layout") as err:
        _load(tmp_path / "odd.pth")
    assert "'weights_of_something'" in str(err.value) and "'step'" in str(err.value)
    assert all(name in str(err.value) for name in FORMATS)
    with pytest.raises(ValueError, match="not a dict"):
        detect_format([torch.zeros(1)])


def test_mismatched_keys_are_named_with_counts(tmp_path):
    state = _tv_resnet(18).state_dict()
    del state["layer4.1.bn2.weight"]
    state["layer3.0.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    state["extra_block.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "broken.pth")
    # the user's file or --arch: was a RuntimeError, reported as an "internal error", exit 1
    with pytest.raises(ValueError, match="do not match the model built for them") as err:
        _load(tmp_path / "broken.pth")
    message = str(err.value)
    assert "1 missing (layer4.1.bn2.weight)" in message
    assert "1 unexpected (extra_block.weight)" in message
    assert "1 mis-shaped (layer3.0.conv2.weight (file (256, 256, 1, 1), model (256, 256, 3, 3)))" in message
    with pytest.raises(ValueError, match=r"\d+ missing \(layer1\.2\."):
        _load(tmp_path / "broken.pth", arch="resnet34")


def test_a_checkpoint_that_does_not_fit_is_a_users_error_in_one_line(tmp_path, capsys):
    state = _tv_resnet(18).state_dict()
    del state["layer4.1.bn2.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(SystemExit) as stopped:
        main(["--model", str(tmp_path / "broken.pth")])
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: the backbone weights of ") and "1 missing (layer4.1.bn2.weight)" in line


class PickledCode:
    """Any custom class: unpickling it would import and run code named by the file."""

    def __init__(self):
        self.weights = torch.zeros(2)


def test_pickled_code_is_refused(tmp_path):
    torch.save(PickledCode(), tmp_path / "model.pth")
    with pytest.raises(ValueError, match="refused for safety") as err:  # a user's error: one line, exit status 2
        _load(tmp_path / "model.pth")
    assert "PickledCode" in str(err.value) and "state_dict" in str(err.value)


class RunsCode:
    """Unpickling this calls os.getcwd: a stand-in for a file whose pickle would run code."""

    def __reduce__(self):
        import os
        return (os.getcwd, ())


@pytest.mark.parametrize("layout", ["legacy", "raw"])
def test_pickled_code_in_legacy_and_raw_files_is_refused_as_such(tmp_path, layout):
    # Was: "not a readable PyTorch checkpoint (truncated or corrupt ...)" for both layouts.
    import pickle

    path = tmp_path / f"{layout}.pth"
    if layout == "legacy":
        torch.save({"weights": torch.zeros(2), "hook": RunsCode()}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps({"weights": torch.zeros(2), "hook": RunsCode()}, protocol=4))
    with pytest.raises(ValueError, match="holds Python objects that are not tensors") as err:
        _load(path)
    assert "getcwd" in str(err.value) and "refused for safety" in str(err.value)
    assert "truncated" not in str(err.value)


def test_plain_pickle_of_tensors_is_named_as_such(tmp_path):
    import pickle

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(_tv_resnet(18).state_dict(), protocol=4))
    with pytest.raises(ValueError, match="plain pickle") as err:
        _load(path)
    assert "torch.save" in str(err.value) and "truncated" not in str(err.value)


def test_legacy_file_of_tensors_still_loads(tmp_path):
    torch.save(_tv_resnet(18).state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert _load(tmp_path / "legacy.pth").info.arch == "resnet18"


def test_non_finite_weights_and_zero_std_are_refused_at_load(tmp_path):
    # Was: a NaN weight or std 0 loaded silently and gave an all-NaN store with exit 0.
    state = _tv_resnet(18).state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"tensor backbone\.layer2\.0\.conv1\.weight holds 1 non-finite"):
        _load(tmp_path / "nan.pth")
    state = _tv_resnet(18).state_dict()
    state["bn1.running_var"][3] = float("inf")
    torch.save(state, tmp_path / "inf.pth")
    with pytest.raises(ValueError, match=r"bn1\.running_var holds 1 non-finite"):
        _load(tmp_path / "inf.pth")
    torch.save(_tv_resnet(18).state_dict(), tmp_path / "good.pth")
    save_checkpoint(_load(tmp_path / "good.pth"), tmp_path / "own.pt")
    raw = torch.load(tmp_path / "own.pt", weights_only=True)
    raw["preprocess"]["std"] = [0.2, 0.0, 0.2]
    del raw["sha256"]  # a hand-written file without the checksum (with it, the edit is reported as damage)
    torch.save(raw, tmp_path / "zero_std.pt")
    with pytest.raises(ValueError, match=r"std must be positive .*\[0\.2, 0\.0, 0\.2\]"):
        _load(tmp_path / "zero_std.pt")


def test_truncated_and_empty_files(tmp_path):
    torch.save(_tv_resnet(18).state_dict(), tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        _load(tmp_path / "half.pth")
    with pytest.raises(ValueError, match="empty"):
        _load(tmp_path / "empty.pth")


@pytest.mark.parametrize("content", [b"hello not a checkpoint\n", b"e" * 64, bytes(range(256)) * 8,
                                     b"\x80\x04K\x05.", b"\x80\x02}q\x00(X\x01"])
def test_any_other_file_is_named_unreadable_not_an_internal_error(tmp_path, content):
    # A text file made torch.load raise KeyError (an "internal error", exit status 1, from every command).
    path = tmp_path / "text.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"text\.pt is not a") as err:
        _load(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("layout", ["zip", "raw"])
def test_cli_refuses_pickled_code_in_one_line_with_status_2(tmp_path, capsys, layout):
    # Was: "internal error (RuntimeError)", exit status 1, after torch's warning about the raw pickle's protocol.
    import pickle

    path = tmp_path / "model.pth"
    if layout == "zip":
        torch.save(PickledCode(), path)
    else:
        path.write_bytes(pickle.dumps({"weights": torch.zeros(2), "hook": RunsCode()}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as stop:
            main(["--model", str(path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "refused for safety" in err
    assert [str(w.message) for w in caught] == []


def test_missing_path_lists_known_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a known name") as err:
        _load(tmp_path / "nope.pth")
    assert "vicreg-resnet50" in str(err.value) and "bagssl" in str(err.value)
    with pytest.raises(FileNotFoundError, match="dino-resnet50"):
        _load("no-such-model")


# ----------------------------------------------------------------------------- printing


def test_verbose_line_and_cli(tmp_path, capsys):
    method, _, _ = _solo_learn_module("backbone")
    torch.save({"pytorch-lightning_version": "2.0.9", "state_dict": method.state_dict()}, tmp_path / "last.ckpt")
    model = load_model(tmp_path / "last.ckpt")
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and "[solo-learn]" in line and "resnet18" in line and "M params" in line

    main(["--model", str(tmp_path / "last.ckpt")])
    out = capsys.readouterr().out
    assert "format:        solo-learn" in out and "projector g:   512-64-64-32" in out
    n_params = sum(p.numel() for p in model.parameters())
    assert "padding 2" in out and f"parameters:    {n_params:,}" in out
    with pytest.raises(SystemExit) as stop:
        main(["--model", str(tmp_path / "missing.ckpt")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "not a known name" in err and "missing.ckpt" in err


def test_an_override_that_contradicts_an_own_checkpoints_record_is_refused(tmp_path, capsys):
    # --stem / --cifar-padding / --arch were ignored in silence for this project's own files: the user asked for a
    # padding-2 stem and got the recorded padding-1 one without a word
    backbone, dim = build_backbone("resnet18", stem="cifar", cifar_padding=1, width=0.25)
    save_checkpoint(SSLModel(backbone, build_mlp([dim, 8])), tmp_path / "own.pt")
    for override, flag in (({"cifar_padding": 2}, "--cifar-padding 2"), ({"stem": "imagenet"}, "--stem imagenet"),
                           ({"arch": "resnet50"}, "--arch resnet50"), ({"num_heads": 3}, "--num-heads 3")):
        with pytest.raises(ValueError, match=rf"^{flag}: .*own.pt is this project's own checkpoint, which records "):
            load_model(tmp_path / "own.pt", verbose=False, **override)
    with pytest.raises(ValueError, match=r"records no num_heads \(it holds a ResNet\)"):
        load_model(tmp_path / "own.pt", verbose=False, num_heads=3)
    agreeing = load_model(tmp_path / "own.pt", verbose=False, arch="resnet18", stem="cifar", cifar_padding=1)
    assert agreeing.backbone.conv1.padding == (1, 1)
    with pytest.raises(SystemExit) as stopped:
        main(["--model", str(tmp_path / "own.pt"), "--cifar-padding", "2"])
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --cifar-padding 2: ") and line.endswith("leave --cifar-padding out")
