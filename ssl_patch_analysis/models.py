"""Backbones, projectors and the `SSLModel` wrapper every analysis works with.

Notation (docs/design.md): a patch ``x`` gives the embedding ``h = f(x)`` (pooled backbone output) and
the projection ``z = g(h)``. EMP-SSL puts a ``pre_feature`` layer between them:
``z = projection(pre_feature(h))``.

The ResNets here keep torchvision's parameter names exactly (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ...) so that every published checkpoint maps onto them by prefix
stripping alone. They add two things torchvision's constructors cannot express:

- ``width``: every channel count multiplied (VICReg's ``resnet50x2`` doubles every width and gives a
  4096-d embedding; torchvision's ``wide_resnet50_2`` only widens the bottleneck and is *not* the
  same network). Widths below 1 give narrow ResNets for CPU training.
- the CIFAR stem: 3x3 convolution, stride 1, no max-pool, with padding 1 (EMP-SSL, lightly) or 2
  (solo-learn; the final map of a 32 px input is then 5x5 instead of 4x4).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1.0),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1.0),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1.0),
    "resnet50x2": (Bottleneck, (3, 4, 6, 3), 2.0),
}


class ResNet(nn.Module):
    """A torchvision-compatible ResNet trunk that returns the pooled embedding ``h``.

    There is no ``fc`` layer: the classifier of a checkpoint is dropped by the loader.
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: Sequence[int],
        width: float = 1.0,
        stem: str = "imagenet",
        cifar_padding: int = 1,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        base = max(1, round(64 * width))
        self.inplanes = base
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, base, kernel_size=3, stride=1, padding=cifar_padding, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, base, layers[0])
        self.layer2 = self._make_layer(block, base * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.embedding_dim = base * 8 * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # base_width=64 keeps the bottleneck's inner width equal to `planes`, so scaling `planes`
        # scales every width (VICReg's "widen"), unlike torchvision's width_per_group.
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.feature_map(x)), 1)


def build_backbone(
    arch: str, stem: str = "imagenet", cifar_padding: int = 1, width: float | None = None
) -> tuple[ResNet, int]:
    """Build a backbone by name; returns ``(model, embedding_dim)`` like vicreg/dino do.

    ``width`` overrides the arch's own multiplier (``resnet50x2`` is resnet50 at width 2).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    block, layers, arch_width = ARCHS[arch]
    model = ResNet(block, layers, width=arch_width if width is None else width, stem=stem,
                   cifar_padding=cifar_padding)
    return model, model.embedding_dim


class L2Normalize(nn.Module):
    """Divides by the L2 norm along the last dimension (EMP-SSL's projection output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class WeightNormLinear(nn.Module):
    """A Linear layer without bias whose weight is ``weight_g * weight_v / ||weight_v||`` row by row.

    The parameters carry the names ``nn.utils.weight_norm(nn.Linear(..., bias=False))`` stores
    (``weight_g``: out x 1, ``weight_v``: out x in), as DINO's head does, so its checkpoints load as
    they are, without the deprecated hook.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default
        nn.init.ones_(self.weight_g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True)))


class DINOHead(nn.Module):
    """DINO's projection head (facebookresearch/dino ``DINOHead``): ``z = last_layer(normalize(mlp(h)))``.

    ``mlp`` is Linear-GELU blocks (BatchNorm after each hidden Linear with ``use_bn``) ending in the
    bottleneck Linear; ``last_layer`` the weight-normalised prototypes. Parameter names are DINO's.
    """

    def __init__(self, mlp: nn.Module, last_layer: WeightNormLinear):
        super().__init__()
        self.mlp = mlp
        self.last_layer = last_layer

    @property
    def dims(self) -> list[int]:
        """Feature sizes along the head: input, each Linear's output, then the prototypes."""
        return [*mlp_dims(mlp_layout(self.mlp)), self.last_layer.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def build_mlp(dims: Sequence[int], last_bias: bool = True, last_bn: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU blocks between ``dims``, a plain Linear at the end (VICReg's projector).

    Module indices follow facebookresearch/vicreg's ``Projector`` (``0``: Linear, ``1``: BN,
    ``2``: ReLU, ..., last: Linear), so its state_dict keys load without renaming.
    """
    if len(dims) < 2:
        raise ValueError(f"a projector needs at least input and output dims, got {list(dims)}")
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(dims[:-1]):
        layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


def mlp_layout(mlp: nn.Sequential) -> list[dict[str, Any]]:
    """Describe a projector as plain values (layer types and sizes), enough to rebuild it.

    Supports the layers every supported projector is made of: Linear, BatchNorm1d, ReLU, GELU
    (DINO's head), Identity and L2Normalize. The layout is what the project's own checkpoint format stores.
    """
    layout: list[dict[str, Any]] = []
    for index, layer in enumerate(mlp):
        if isinstance(layer, nn.Linear):
            layout.append({"type": "linear", "in": layer.in_features, "out": layer.out_features,
                           "bias": layer.bias is not None})
        elif isinstance(layer, nn.BatchNorm1d):
            layout.append({"type": "batchnorm", "features": layer.num_features, "affine": layer.affine,
                           "eps": layer.eps})
        elif isinstance(layer, nn.ReLU):
            layout.append({"type": "relu"})
        elif isinstance(layer, nn.GELU):
            layout.append({"type": "gelu"})
        elif isinstance(layer, nn.Identity):
            layout.append({"type": "identity"})
        elif isinstance(layer, L2Normalize):
            layout.append({"type": "l2normalize"})
        else:
            raise ValueError(
                f"cannot describe projector layer {index} ({type(layer).__name__}): only Linear, "
                "BatchNorm1d, ReLU, GELU, Identity and L2Normalize layers are supported"
            )
    return layout


def build_mlp_from_layout(layout: Sequence[dict[str, Any]]) -> nn.Sequential:
    """Rebuild a projector from :func:`mlp_layout`'s description (same module indices)."""
    layers: list[nn.Module] = []
    for index, spec in enumerate(layout):
        kind = spec.get("type")
        if kind == "linear":
            layers.append(nn.Linear(int(spec["in"]), int(spec["out"]), bias=bool(spec.get("bias", True))))
        elif kind == "batchnorm":
            layers.append(nn.BatchNorm1d(int(spec["features"]), eps=float(spec.get("eps", 1e-5)),
                                         affine=bool(spec.get("affine", True))))
        elif kind == "relu":
            layers.append(nn.ReLU(inplace=True))
        elif kind == "gelu":
            layers.append(nn.GELU())
        elif kind == "identity":
            layers.append(nn.Identity())
        elif kind == "l2normalize":
            layers.append(L2Normalize())
        else:
            raise ValueError(f"unknown projector layer type {kind!r} at index {index} of the layout")
    return nn.Sequential(*layers)


def mlp_dims(layout: Sequence[dict[str, Any]]) -> list[int]:
    """The feature sizes along a projector: input of the first Linear, then each Linear's output."""
    linears = [spec for spec in layout if spec.get("type") == "linear"]
    if not linears:
        return []
    return [int(linears[0]["in"])] + [int(spec["out"]) for spec in linears]


@dataclass
class Preprocess:
    """How a model wants its pixels: square input side, and the normalisation it was trained with.

    ``mean``/``std`` are ``None`` when the model takes raw ``[0, 1]`` pixels (``normalize=False``).
    """

    input_size: int = 224
    mean: tuple[float, float, float] | None = IMAGENET_MEAN
    std: tuple[float, float, float] | None = IMAGENET_STD

    def __post_init__(self) -> None:
        if int(self.input_size) < 1:
            raise ValueError(f"preprocess input_size must be a positive number of pixels, got {self.input_size}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("preprocess mean and std must both be given or both be None")
        if self.mean is not None:
            values = [*self.mean, *self.std]
            if len(self.mean) != 3 or len(self.std) != 3 or not all(math.isfinite(float(v)) for v in values):
                raise ValueError(f"preprocess mean and std must be 3 finite numbers each, got mean {list(self.mean)}, "
                                 f"std {list(self.std)}")
            if min(float(v) for v in self.std) <= 0:
                raise ValueError(f"preprocess std must be positive (pixels are divided by it), got {list(self.std)}")

    @property
    def normalize(self) -> bool:
        return self.mean is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean) if self.mean is not None else None
        d["std"] = list(self.std) if self.std is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        mean, std = d.get("mean"), d.get("std")
        return cls(
            input_size=int(d.get("input_size", 224)),
            mean=tuple(float(v) for v in mean) if mean is not None else None,
            std=tuple(float(v) for v in std) if std is not None else None,
        )


@dataclass
class ModelInfo:
    """What a loaded model is and where it came from (printed by the loader, stored with results)."""

    method: str = "unknown"
    arch: str = "resnet50"
    stem: str = "imagenet"
    cifar_padding: int | None = None
    width: float = 1.0
    embedding_dim: int = 0
    projector_dims: list[int] | None = None
    pre_feature_dims: list[int] | None = None
    projection_normalized: bool = False
    source: str | None = None
    format: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SSLModel(nn.Module):
    """A self-supervised backbone ``f`` with its optional projector ``g``.

    Inputs to :meth:`embed` and :meth:`forward` are RGB images with values in ``[0, 1]`` (float,
    B x 3 x S x S); the model applies its own normalisation (``preprocess``), so callers never need
    to know which mean/std a checkpoint was trained with.
    """

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module | None = None,
        pre_feature: nn.Module | None = None,
        preprocess: Preprocess | None = None,
        info: ModelInfo | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.pre_feature = pre_feature
        self.preprocess = preprocess or Preprocess()
        self.info = info or ModelInfo()
        if self.preprocess.normalize:
            mean = torch.tensor(self.preprocess.mean).view(1, 3, 1, 1)
            std = torch.tensor(self.preprocess.std).view(1, 3, 1, 1)
        else:
            mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def embedding_dim(self) -> int:
        return self.info.embedding_dim

    @property
    def has_projector(self) -> bool:
        return self.projector is not None

    def normalize_pixels(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape B x 3 x H x W, got {tuple(x.shape)}")
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``h = f(x)``: the pooled backbone output for ``[0, 1]`` RGB images."""
        return self.backbone(self.normalize_pixels(x))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """``z = g(h)`` (through ``pre_feature`` first for EMP-SSL)."""
        if self.projector is None:
            raise RuntimeError(
                f"this checkpoint ({self.info.source or 'unknown source'}) has no projector: "
                "only the embedding h is available"
            )
        if self.pre_feature is not None:
            h = self.pre_feature(h)
        return self.projector(h)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All representations of one batch: ``{"h": ..., "pre_feature": ..., "z": ...}``.

        Keys for layers the model does not have are absent.
        """
        h = self.embed(x)
        out = {"h": h}
        if self.pre_feature is not None:
            out["pre_feature"] = self.pre_feature(h)
        if self.projector is not None:
            out["z"] = self.projector(out.get("pre_feature", h))
        return out


def randomly_initialised(model: SSLModel, seed: int = 0, calibration_images: torch.Tensor | None = None,
                         batch_size: int = 64) -> SSLModel:
    """The control of every analysis: ``model``'s architecture with fresh weights (in place; returned).

    Every layer is reset with PyTorch's default initialisation under ``torch.manual_seed(seed)``
    (the caller's global random state is left as it was). With ``calibration_images`` (uint8 or
    ``[0, 1]`` float, B x 3 x H x W, resized to the model's input side) BatchNorm's running statistics
    are then set to the average, over batches of those images, of the activations' batch mean and
    variance (as BatchNorm computes them in training mode): with the
    initial statistics (mean 0, variance 1) a random ResNet's activations shrink layer by layer into
    subnormal floats (slow on a CPU, and numerically degenerate; see benchmarks/RESULTS.md, "Numbers
    quoted in the code"). No weight sees the data.
    ``model.info`` records it (``extra["random_init"]``) and its source gains a ``random-init``
    suffix, so figures and stores of the control never take the trained model's name.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if module is not model and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    calibrated = 0
    if calibration_images is not None and batch_norms:
        calibrated = _calibrate_batch_norm(model, batch_norms, calibration_images, batch_size)
    model.eval()
    model.info.extra["random_init"] = {"seed": seed, "batch_norm_calibration_images": calibrated}
    model.info.source = f"{Path(str(model.info.source or 'model')).stem}-random-init"
    return model


def _calibrate_batch_norm(model: SSLModel, batch_norms: list[nn.Module], images: torch.Tensor,
                          batch_size: int) -> int:
    if images.ndim != 4 or images.shape[1] != 3 or not len(images):
        raise ValueError(f"calibration images must be B x 3 x H x W with B >= 1, got {tuple(images.shape)}")
    device = next(model.parameters()).device
    size = model.preprocess.input_size
    saved = [(m.momentum, m.training) for m in batch_norms]
    for m in batch_norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            for batch in images.split(batch_size):
                x = batch.to(device)
                x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
                if tuple(x.shape[-2:]) != (size, size):
                    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                model(x)
    finally:
        model.train(was_training)
        for m, (momentum, training) in zip(batch_norms, saved, strict=True):
            m.momentum = momentum
            m.train(training)
    return len(images)


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.models says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
