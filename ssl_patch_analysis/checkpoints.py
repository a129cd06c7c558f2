"""One loader for every supported self-supervised checkpoint format.

``load_model`` reads a checkpoint (always with ``weights_only=True``: checkpoints are untrusted
input), detects its layout, maps its keys onto torchvision's ResNet names (stripping ``module.``,
``backbone.``, ``encoder.``, dropping classifiers, momentum encoders and predictors), infers the
architecture from the tensor shapes, builds an :class:`SSLModel` and loads it with
``strict=True``. When the keys do not match, the error names the missing, unexpected and
mis-shaped keys.

Formats (``detect_format`` returns the name on the left):

- ``ssl_patch_analysis``: the project's own format, written by :func:`save_checkpoint`.
- ``backbone``: a bare ResNet state_dict with torchvision names and no ``fc`` (VICReg's
  ``resnet50.pth``, DINO's ``dino_resnet50_pretrain.pth``).
- ``torchvision``: the same with its ``fc`` classifier (dropped).
- ``vicreg-full``: facebookresearch/vicreg ``{"epoch", "model", "optimizer"}`` with
  ``module.backbone.*`` and ``module.projector.*`` (facebookresearch/barlowtwins saves the same, with its loss's
  ``module.bn``: method ``barlowtwins``, ``bn`` dropped and listed).
- ``backbone-projector``: a raw ``state_dict()`` of a model with ``backbone``/``projector``
  submodules (VICReg-style module saved directly).
- ``solo-learn``: a Lightning ``.ckpt`` of vturrisi/solo-learn (``backbone.*`` or the older
  ``encoder.*``, ``projector.*``); ``args.json`` beside the file is read when present (without it, the
  CIFAR padding 2 of solo-learn is listed as assumed: other Lightning projects share the key prefix).
- ``emp-ssl``: tsb0601/EMP-SSL ``{epoch}.pt`` (``module.backbone``, ``module.pre_feature``,
  ``module.projection``; the projection is L2-normalised).
- ``lightly``: lightly-ai/lightly models (``backbone`` = ``nn.Sequential`` of torchvision's
  children, ``projection_head.layers``), raw or inside a Lightning ``.ckpt``.
- ``sthalles-simclr``: sthalles/SimCLR ``{"epoch", "arch", "state_dict"}``, projection head in
  ``backbone.fc``.
- ``vissl``: VISSL ``classy_state_dict -> base_model -> model -> {trunk, heads}``.
- ``dino-full``: facebookresearch/dino full checkpoint; the ``teacher`` backbone is loaded. For a
  ResNet teacher the DINO head (MLP + weight-normalised prototypes) is ignored; for a ViT teacher it
  is the projector ``z`` (MLP with GELU, L2 normalisation, weight-normalised last layer).

Vision Transformers (timm's ``VisionTransformer``; see :mod:`.vit`), detected by their keys
(``cls_token``/``pos_embed``, ``patch_embed.proj``, ``blocks.N``) wherever the backbone sits:

- ``vit``: a bare ViT state_dict in timm names, without classifier (DINO's
  ``dino_deitsmall16_pretrain.pth``, a timm ViT built with ``num_classes=0``), possibly inside
  ``state_dict``.
- ``timm-vit``: the same with timm's classifier ``head.*`` (dropped).
- ``mocov3``: facebookresearch/moco-v3 ``{epoch, arch, state_dict, optimizer, scaler}`` with
  ``module.base_encoder.*`` (ViT or ResNet); the encoder's head (``head.*`` / ``fc.*``) is the
  projector, the momentum encoder and predictor are dropped. Its ViTs have 12 heads at every width.
- ``mae``: facebookresearch/mae ``{"model": ...}`` (pretraining: decoder and mask token dropped and
  named; fine-tuning: ``fc_norm`` global pooling, classifier dropped); DeiT-style ``{"model"}``
  files read the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import shlex
import struct
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .errors import disk_full, is_disk_full
from .models import (
    ARCHS,
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DINOHead,
    L2Normalize,
    ModelInfo,
    Preprocess,
    ResNet,
    SSLModel,
    WeightNormLinear,
    build_backbone,
    build_mlp,
    build_mlp_from_layout,
    mlp_dims,
    mlp_layout,
)
from .weights import NAMED_WEIGHTS, resolve_checkpoint

OWN_FORMAT = "ssl_patch_analysis"
OWN_VERSION = 1

FORMATS: dict[str, str] = {
    OWN_FORMAT: "this project's own checkpoint (save_checkpoint)",
    "backbone": "bare ResNet state_dict, torchvision names, no fc (VICReg resnet50.pth, DINO backbone)",
    "torchvision": "plain torchvision ResNet state_dict with its fc classifier",
    "vicreg-full": "facebookresearch/vicreg (or barlowtwins) full checkpoint {epoch, model, optimizer}",
    "backbone-projector": "raw state_dict of a model with backbone/projector submodules",
    "solo-learn": "vturrisi/solo-learn Lightning .ckpt (state_dict with backbone./encoder., projector.)",
    "emp-ssl": "tsb0601/EMP-SSL {epoch}.pt (backbone, pre_feature, projection)",
    "lightly": "lightly-ai/lightly model (backbone = Sequential of torchvision children, projection_head)",
    "sthalles-simclr": "sthalles/SimCLR {epoch, arch, state_dict} with the head in backbone.fc",
    "vissl": "facebookresearch/vissl classy_state_dict (trunk _feature_blocks, heads)",
    "dino-full": "facebookresearch/dino full checkpoint {student, teacher, ...}",
    "vit": "bare ViT state_dict in timm names, no classifier (DINO dino_deitsmall16_pretrain.pth, timm num_classes=0)",
    "timm-vit": "timm VisionTransformer state_dict with its classifier head",
    "mocov3": "facebookresearch/moco-v3 {epoch, arch, state_dict} with module.base_encoder (ViT or ResNet)",
    "mae": "facebookresearch/mae {model} ViT, pretraining (decoder dropped) or fine-tuned (fc_norm, head dropped)",
}

# Means/stds solo-learn normalises each data set with (solo/data/pretrain_dataloader.py).
SOLO_LEARN_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261)),
    "imagenet100": (IMAGENET_MEAN, IMAGENET_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
EMP_SSL_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# torchvision's ResNet children in order; lightly's backbone is nn.Sequential(*children[:-1]).
_TORCHVISION_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")


def _unpickled_function_placeholder(*args: Any, **kwargs: Any) -> None:
    """Stands in for a function reference pickled inside an optimizer state (never called)."""
    raise RuntimeError("placeholder for a function stored in a checkpoint's optimizer state")


# Globals that real checkpoints carry outside their weights and that are safe to unpickle:
# DINO's full checkpoint stores its argparse Namespace; VICReg's full checkpoint stores the LARS
# filter function in the optimizer's param_groups (under the script's module name). Functions are
# mapped to a placeholder, so no code from the file ever runs.
_BENIGN_GLOBALS: list[Any] = [
    argparse.Namespace,
    (_unpickled_function_placeholder, "__main__.exclude_bias_and_norm"),
    (_unpickled_function_placeholder, "main_vicreg.exclude_bias_and_norm"),
]


@dataclass
class _Parts:
    """What a format handler extracts: state_dicts in torchvision/Sequential names plus hints."""

    backbone: dict[str, torch.Tensor]
    projector: dict[str, torch.Tensor] | None = None
    projector_layout: list[dict[str, Any]] | None = None
    pre_feature: dict[str, torch.Tensor] | None = None
    pre_feature_layout: list[dict[str, Any]] | None = None
    method: str = "unknown"
    cifar_padding: int | None = None
    cifar_padding_guessed: str | None = None  # why, when the format's padding is a guess: listed as assumed
    preprocess: Preprocess | None = None
    input_size: int | None = None
    mean_std: tuple[Any, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # ViTs: the attention heads when the format knows them (the weights do not show them), and a
    # projector that is not an MLP (DINO's head), built unloaded by the format handler.
    num_heads: int | None = None
    heads_source: str | None = None
    projector_module: nn.Module | None = None


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint file {path} is empty (0 bytes): an interrupted download or copy? "
                         "Fetch or copy it again.")
    try:
        with torch.serialization.safe_globals(_BENIGN_GLOBALS), warnings.catch_warnings():
            # torch's note on a raw pickle's protocol: the file is refused or named below, in one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if unsafe or "Unsupported global" in str(err):
            raise _refused(path, ", ".join(unsafe) if unsafe else str(err).splitlines()[0]) from err
        code = _code_globals(path)
        if code:
            raise _refused(path, ", ".join(code)) from err
        if code is not None and "Unsupported operand" in str(err):
            raise ValueError(
                f"{path} is a plain pickle that torch.load(weights_only=True) cannot read (a pickle protocol it "
                "does not support); re-save its tensors with torch.save(state_dict, 'weights.pth') and load that "
                "file") from err
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt: "
                         f"{str(err).splitlines()[-1]}); {_recovery_advice(path)}") from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt: {err}); "
                         f"{_recovery_advice(path)}") from err
    except (KeyError, IndexError, TypeError, AttributeError, struct.error, UnicodeDecodeError, OverflowError) as err:
        # What torch's legacy reader raises on bytes that are no pickle at all (a text file, an HTML page)
        raise ValueError(f"{path} is not a PyTorch checkpoint (its bytes are no pickle torch.load can read: "
                         f"{type(err).__name__} {' '.join(str(err).split())[:80]}); {_recovery_advice(path)}") from err


def _recovery_advice(path: Path) -> str:
    """What to do about a damaged checkpoint: a training run folder rewrites it from its resume state."""
    if path.name == "checkpoint.pt" and any((path.parent / name).is_file() for name in ("resume.pt", "resume.prev.pt")):
        return (f"run the train command of {path.parent} again with --resume: it rewrites checkpoint.pt from the "
                "resume state beside it")
    return "fetch or copy it again"


class UnsafeCheckpointError(ValueError):
    """A checkpoint that names Python objects beyond tensors and containers: refused before any of it runs."""


def _refused(path: Path, found: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} holds Python objects that are not tensors ({found}), so it was refused for safety: unpickling "
        "them could run arbitrary code. If you trust the file, re-save only its weights in a trusted session, "
        "e.g. torch.save(obj.state_dict(), 'weights.pth') for a pickled model, and load that file instead.")


# Globals a weights-only checkpoint may name: tensors, storages and the containers torch.save writes.
_DATA_GLOBAL = re.compile(r"^(torch(\.\w+)*|collections\.OrderedDict|builtins\.(set|frozenset|slice|bytearray|complex))"
                          r"\.?\w*$")


def _code_globals(path: Path) -> list[str] | None:
    """What a legacy-format or raw pickle file would import beyond tensors and containers, found by
    reading its opcodes (``pickletools.genops`` parses, never executes); ``None`` for a file that is
    not a pickle stream (a zip checkpoint, or garbage)."""
    import pickletools

    data = path.read_bytes()
    found: list[str] = []
    position, parsed = 0, 0
    while position < len(data):  # a legacy torch file is several pickles in a row, then raw storage bytes
        strings: list[str] = []
        try:
            for opcode, arg, end in pickletools.genops(io.BytesIO(data[position:])):
                if opcode.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
                if opcode.name == "STOP":
                    position += end + 1
                    parsed += 1
                    break
            else:
                break
        except Exception:  # noqa: BLE001 - the storage bytes after the last pickle, or a damaged file
            break
    if not parsed:
        return None
    return sorted({name for name in found if not _DATA_GLOBAL.match(name)})


def _unsafe_globals(path: Path) -> list[str]:
    """Names of the globals a checkpoint would need beyond the allowed ones (zip files only)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a legacy or corrupt file: the caller reports torch's message
        return []
    allowed = {item[1] if isinstance(item, tuple) else f"{item.__module__}.{item.__qualname__}"
               for item in _BENIGN_GLOBALS}
    return [name for name in found if name not in allowed]


# ----------------------------------------------------------------------------- detection


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    """Remove each prefix once, in order, where present (``str.removeprefix``, never lstrip)."""
    for prefix in prefixes:
        key = key.removeprefix(prefix)
    return key


def _is_lightly(keys: list[str]) -> bool:
    return any(k.startswith("projection_head.") or re.match(r"backbone\.\d+\.", k) for k in keys)


def _is_vit(keys: list[str] | Mapping[str, Any]) -> bool:
    """Whether state_dict keys (prefixes stripped) are a Vision Transformer's in timm/DINO/MAE names."""
    return "pos_embed" in keys and any(k.startswith("patch_embed.") for k in keys) and any(
        k.startswith("blocks.") for k in keys)


def detect_format(obj: dict) -> str:
    """Name the layout of a loaded checkpoint object (one of :data:`FORMATS`)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"unknown checkpoint layout: the file holds a {type(obj).__name__}, not a dict; "
                         f"known formats: {_formats_list()}")
    if obj.get("format") == OWN_FORMAT:
        return OWN_FORMAT
    if isinstance(obj.get("classy_state_dict"), Mapping):
        return "vissl"
    if isinstance(obj.get("teacher"), Mapping):
        return "dino-full"
    state = obj.get("state_dict")
    if _is_tensor_dict(state):
        keys = list(state)
        if any(_strip(k, ("module.",)).startswith("base_encoder.") for k in keys):
            return "mocov3"
        if "arch" in obj and any(k.startswith("backbone.fc.") for k in keys):
            return "sthalles-simclr"
        if _is_lightly(keys):
            return "lightly"
        if any(k.startswith(("backbone.", "encoder.")) for k in keys):
            return "solo-learn"
        keys = [_strip(k, ("module.",)) for k in keys]
        if _is_vit(keys):
            return "timm-vit" if "head.weight" in keys else "vit"
    model = obj.get("model")
    if _is_tensor_dict(model) and _is_vit([_strip(k, ("module.",)) for k in model]):
        return "mae"
    if _is_tensor_dict(model) and any(_strip(k, ("module.",)).startswith("backbone.") for k in model):
        return "vicreg-full"
    if _is_tensor_dict(obj):
        keys = [_strip(k, ("module.",)) for k in obj]
        if any(k.startswith("pre_feature.") for k in keys):
            return "emp-ssl"
        if _is_lightly(keys):
            return "lightly"
        if any(k.startswith(("backbone.", "encoder.")) for k in keys):
            return "backbone-projector"
        if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
            return "torchvision" if "fc.weight" in keys else "backbone"
        if _is_vit(keys):
            return "timm-vit" if "head.weight" in keys else "vit"
    found = ", ".join(repr(k) for k in list(obj)[:12]) + (" ..." if len(obj) > 12 else "")
    raise ValueError(f"unknown checkpoint layout: top-level keys found: {found or '(none)'}; "
                     f"known formats: {_formats_list()}")


def _formats_list() -> str:
    return "; ".join(f"{name} ({desc})" for name, desc in FORMATS.items())


# ----------------------------------------------------------------------------- key mapping


def _sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _torchvision_backbone(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep the trunk, drop ``fc.*`` (a classifier or SimCLR head): returns (trunk, dropped keys)."""
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    return trunk, [k for k in state if k.startswith("fc.")]


def _lightly_backbone(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``0.weight`` / ``4.0.conv1.weight`` (Sequential of torchvision children) to torchvision names."""
    renamed = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or int(index) >= len(_TORCHVISION_CHILDREN):
            renamed[key] = value  # left as is: reported as unexpected by the strict load
            continue
        renamed[f"{_TORCHVISION_CHILDREN[int(index)]}.{rest}"] = value
    return renamed


def _group_by_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in state:
        head = key.split(".", 1)[0]
        counts[head] = counts.get(head, 0) + 1
    return counts


def infer_mlp_layout(state: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Rebuild a projector's layer list from its ``nn.Sequential`` state_dict alone.

    A layer with ``running_mean`` is a BatchNorm1d, one with a 2-D ``weight`` a Linear. Indices
    without parameters between them are activations: ReLU in every supported projector
    (VICReg, SimCLR, BYOL, lightly, solo-learn, EMP-SSL heads).
    """
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        index, _, name = key.partition(".")
        if not index.isdigit():
            raise ValueError(f"projector key {key!r} is not of the form '<index>.<param>' of an nn.Sequential")
        by_index.setdefault(int(index), {})[name] = value
    layout: list[dict[str, Any]] = []
    for index in range(max(by_index) + 1 if by_index else 0):
        params = by_index.get(index)
        if params is None:
            layout.append({"type": "relu"})
        elif "running_mean" in params:
            layout.append({"type": "batchnorm", "features": params["running_mean"].numel(),
                           "affine": "weight" in params})
        elif "weight" in params and params["weight"].ndim == 2:
            out_features, in_features = params["weight"].shape
            layout.append({"type": "linear", "in": int(in_features), "out": int(out_features),
                           "bias": "bias" in params})
        else:
            raise ValueError(f"projector layer {index} has parameters {sorted(params)}: neither a Linear "
                             "nor a BatchNorm1d, so it cannot be rebuilt")
    return layout


# ----------------------------------------------------------------------------- format handlers


def _solo_learn_args(path: Path) -> dict[str, Any]:
    args_file = path.parent / "args.json"
    if not args_file.is_file():
        return {}
    try:
        return json.loads(args_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{args_file} (solo-learn's run arguments beside the checkpoint) is not valid "
                         f"JSON: {err}") from err


def _lookup(args: Mapping[str, Any], *paths: str) -> Any:
    """First value found at any dotted path (solo-learn's newer nested and older flat args.json)."""
    for dotted in paths:
        node: Any = args
        for part in dotted.split("."):
            if isinstance(node, list):
                node = node[0] if node else None
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            return node
    return None


def _parts_solo_learn(obj: Mapping[str, Any], path: Path) -> _Parts:
    state = {_strip(k, ("module.",)): v for k, v in obj["state_dict"].items()}
    prefix = "backbone." if any(k.startswith("backbone.") for k in state) else "encoder."
    backbone, fc = _torchvision_backbone(_sub_state(state, prefix))
    projector = _sub_state(state, "projector.") or None
    extra: dict[str, Any] = {"dropped": _dropped(state, {prefix.rstrip("."), "projector"}, fc, prefix.rstrip("."))}
    args = _solo_learn_args(path)
    parts = _Parts(backbone=backbone, projector=projector, method=str(args.get("method", "unknown")),
                   cifar_padding=2, extra=extra)  # solo-learn's CIFAR conv1 always uses padding=2
    if not args:  # the format itself is read from a key prefix that other Lightning projects share
        parts.cifar_padding_guessed = ("CIFAR stem padding 2 (solo-learn's: the keys' backbone. prefix, no "
                                       "args.json beside the file; pass cifar_padding=1 if another project wrote it)")
    if args:
        extra["args_json"] = str(path.parent / "args.json")
        dataset = _lookup(args, "data.dataset", "dataset")
        mean = _lookup(args, "augmentations.mean", "mean")
        std = _lookup(args, "augmentations.std", "std")
        if dataset in SOLO_LEARN_MEAN_STD:
            parts.mean_std = SOLO_LEARN_MEAN_STD[dataset]
        elif mean is not None and std is not None:
            parts.mean_std = (tuple(mean), tuple(std))
        else:
            parts.mean_std = (IMAGENET_MEAN, IMAGENET_STD)
        crop = _lookup(args, "augmentations.crop_size", "crop_size")
        if isinstance(crop, list):
            crop = crop[0] if crop else None
        if crop is not None:
            parts.input_size = int(crop)
        extra["dataset"] = dataset
    return parts


def _dropped(state: Mapping[str, Any], kept: set[str], backbone_fc: Sequence[str], backbone: str = "backbone",
             ) -> dict[str, int]:
    """The tensors of ``state`` a reader leaves out, by top-level module, and the backbone's classifier (``fc``)."""
    dropped = {k: n for k, n in _group_by_prefix(state).items() if k not in kept}
    if backbone_fc:
        dropped[f"{backbone}.fc"] = len(backbone_fc)
    return dropped


def _parts_vicreg_full(obj: Mapping[str, Any]) -> _Parts:
    state = {_strip(k, ("module.",)): v for k, v in obj["model"].items()}
    backbone, fc = _torchvision_backbone(_sub_state(state, "backbone."))
    projector = _sub_state(state, "projector.") or None
    dropped = _dropped(state, {"backbone", "projector"}, fc)
    # facebookresearch/barlowtwins saves the same layout, with the loss's affine-free BatchNorm as "bn"
    method = "barlowtwins" if "bn" in dropped else "vicreg"
    return _Parts(backbone=backbone, projector=projector, method=method,
                  extra={"epoch": obj.get("epoch"), "dropped": dropped})


def _parts_backbone_projector(obj: Mapping[str, Any]) -> _Parts:
    state = {_strip(k, ("module.",)): v for k, v in obj.items()}
    prefix = "backbone." if any(k.startswith("backbone.") for k in state) else "encoder."
    backbone, fc = _torchvision_backbone(_sub_state(state, prefix))
    return _Parts(backbone=backbone, projector=_sub_state(state, "projector.") or None,
                  extra={"dropped": _dropped(state, {prefix.rstrip("."), "projector"}, fc, prefix.rstrip("."))})


def _parts_emp_ssl(obj: Mapping[str, Any]) -> _Parts:
    state = {_strip(k, ("module.",)): v for k, v in obj.items()}
    backbone, fc = _torchvision_backbone(_sub_state(state, "backbone."))
    pre_feature = _sub_state(state, "pre_feature.")
    projection = _sub_state(state, "projection.")
    # EMP-SSL: pre_feature = Linear-BN-ReLU (the trailing ReLU has no weights to show it),
    # z = F.normalize(projection(pre_feature(h))).
    return _Parts(
        backbone=backbone,
        pre_feature=pre_feature, pre_feature_layout=infer_mlp_layout(pre_feature) + [{"type": "relu"}],
        projector=projection, projector_layout=infer_mlp_layout(projection) + [{"type": "l2normalize"}],
        method="emp-ssl", cifar_padding=1, mean_std=EMP_SSL_MEAN_STD,
        extra={"note": "EMP-SSL evaluates on the pre_feature output (the 'pre_feature' key of forward)",
               "dropped": _dropped(state, {"backbone", "pre_feature", "projection"}, fc)},
    )


def _parts_lightly(obj: Mapping[str, Any]) -> _Parts:
    state = obj["state_dict"] if _is_tensor_dict(obj.get("state_dict")) else obj
    state = {_strip(k, ("module.",)): v for k, v in state.items()}
    backbone = _lightly_backbone(_sub_state(state, "backbone."))
    projector = _sub_state(state, "projection_head.layers.") or None
    kept = {"backbone", "projection_head"}
    return _Parts(
        backbone=backbone, projector=projector,
        # lightly's transforms normalise with ImageNet statistics by default, CIFAR included.
        mean_std=(IMAGENET_MEAN, IMAGENET_STD),
        extra={"dropped": {k: n for k, n in _group_by_prefix(state).items() if k not in kept}},
    )


def _parts_sthalles(obj: Mapping[str, Any], path: Path) -> _Parts:
    state = _sub_state(obj["state_dict"], "backbone.")
    backbone, _ = _torchvision_backbone(state)
    extra: dict[str, Any] = {"arch_in_file": obj.get("arch"), "epoch": obj.get("epoch")}
    # sthalles/SimCLR trains without Normalize (ToTensor only) on STL10 (96 px, its default) or
    # CIFAR-10 (32 px); config.yml beside the checkpoint names the data set.
    input_size, dataset = 96, None
    config = path.parent / "config.yml"
    if config.is_file():
        match = re.search(r"^dataset_name:\s*(\S+)", config.read_text(), re.MULTILINE)
        dataset = match.group(1) if match else None
    if dataset == "cifar10":
        input_size = 32
    elif dataset is None:
        extra.setdefault("assumed", []).append("input size 96 (STL10, sthalles/SimCLR's default data set)")
    extra["dataset"] = dataset
    return _Parts(backbone=backbone, projector=_sub_state(state, "fc."), method="simclr",
                  preprocess=Preprocess(input_size=input_size, mean=None, std=None), extra=extra)


def _parts_vissl(obj: Mapping[str, Any]) -> _Parts:
    model = obj["classy_state_dict"].get("base_model", {}).get("model", {})
    trunk = model.get("trunk")
    if not _is_tensor_dict(trunk):
        raise ValueError("VISSL checkpoint without classy_state_dict['base_model']['model']['trunk'] weights")
    backbone, _ = _torchvision_backbone({_strip(k, ("module.", "_feature_blocks.")): v for k, v in trunk.items()})
    heads = model.get("heads")
    parts = _Parts(backbone=backbone, extra={"phase_idx": obj.get("phase_idx")})
    if _is_tensor_dict(heads):
        # heads is a ModuleList of VISSL MLPs ("<head>.clf.<layer>"); chained, they form the
        # projection head. A ReLU follows every head but the last (use_relu in VISSL's SimCLR
        # config); it has no weights, so it is assumed.
        layout: list[dict[str, Any]] = []
        projector: dict[str, torch.Tensor] = {}
        head_ids = sorted({int(k.split(".", 1)[0]) for k in heads})
        for position, head in enumerate(head_ids):
            head_state = _sub_state(heads, f"{head}.clf.")
            head_layout = infer_mlp_layout(head_state)
            for key, value in head_state.items():
                index, _, name = key.partition(".")
                projector[f"{len(layout) + int(index)}.{name}"] = value
            layout += head_layout
            if position < len(head_ids) - 1:
                layout.append({"type": "relu"})
        parts.projector, parts.projector_layout = projector, layout
        if len(head_ids) > 1:
            parts.extra.setdefault("assumed", []).append("ReLU between VISSL heads (SimCLR config)")
    return parts


def _parts_dino_full(obj: Mapping[str, Any]) -> _Parts:
    state = {_strip(k, ("module.",)): v for k, v in obj["teacher"].items()}
    trunk = _sub_state(state, "backbone.")
    if _is_vit(trunk):
        return _parts_dino_full_vit(obj, state, trunk)
    backbone, _ = _torchvision_backbone(trunk)
    head_keys = [k for k in state if not k.startswith("backbone.")]
    return _Parts(backbone=backbone, method="dino",
                  extra={"dropped": {"teacher head (DINO head, not loaded)": len(head_keys)},
                         "epoch": obj.get("epoch")})


# Attention heads of facebookresearch/dino's vision_transformer.py constructors (args.arch; "deit" names map to them).
_DINO_VIT_HEADS = {"vit_tiny": 3, "vit_small": 6, "vit_base": 12}


def _parts_dino_full_vit(obj: Mapping[str, Any], state: dict[str, torch.Tensor],
                         trunk: dict[str, torch.Tensor]) -> _Parts:
    """The teacher ViT, with the teacher's DINO head as the projector."""
    backbone, classifier = _vit_backbone(trunk)
    extra: dict[str, Any] = {"epoch": obj.get("epoch"), "network": "teacher"}
    if classifier:
        extra["dropped"] = {"backbone.head (classifier)": len(classifier)}
    parts = _Parts(backbone=backbone, method="dino", mean_std=(IMAGENET_MEAN, IMAGENET_STD), extra=extra)
    arch = str(getattr(obj.get("args"), "arch", "")).replace("deit", "vit")
    if arch in _DINO_VIT_HEADS:
        parts.num_heads, parts.heads_source = _DINO_VIT_HEADS[arch], f"DINO's {arch}, named by the checkpoint's args"
    head = _sub_state(state, "head.")
    if head:
        parts.projector, parts.projector_module = _dino_head(head)
    return parts


def _dino_head(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], DINOHead]:
    """DINO's head (``mlp.*``, ``last_layer.weight_g/weight_v``) as an unloaded :class:`DINOHead` and its weights."""
    mlp = _sub_state(state, "mlp.")
    if "weight" in mlp:  # nlayers=1: the MLP is a single Linear, not an nn.Sequential
        mlp = {f"0.{k}": v for k, v in mlp.items()}
    # The activations between DINO's Linear layers are GELUs (infer_mlp_layout fills gaps with ReLU).
    layout = [{"type": "gelu"} if spec["type"] == "relu" else spec for spec in infer_mlp_layout(mlp)]
    # nn.utils.weight_norm writes weight_g/weight_v; its parametrizations successor original0/original1.
    renamed = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    last = {renamed.get(k, k): v for k, v in _sub_state(state, "last_layer.").items()}
    prototypes = last.get("weight_v")
    if prototypes is None or prototypes.ndim != 2:
        raise ValueError("the DINO head has no weight-normalised last layer (head.last_layer.weight_v): found "
                         f"{', '.join(sorted(state)[:8]) or 'nothing'}")
    module = DINOHead(build_mlp_from_layout(layout), WeightNormLinear(prototypes.shape[1], prototypes.shape[0]))
    weights = {**{f"mlp.{k}": v for k, v in mlp.items()}, **{f"last_layer.{k}": v for k, v in last.items()}}
    return weights, module


def _vit_backbone(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep the ViT, drop timm's classifier ``head.*``: returns (trunk, dropped keys)."""
    trunk = {k: v for k, v in state.items() if not k.startswith("head.")}
    return trunk, [k for k in state if k.startswith("head.")]


def _parts_vit(obj: Mapping[str, Any]) -> _Parts:
    state = obj["state_dict"] if _is_tensor_dict(obj.get("state_dict")) else obj
    backbone, classifier = _vit_backbone({_strip(k, ("module.",)): v for k, v in state.items()})
    return _Parts(backbone=backbone, extra={"dropped": {"head (classifier)": len(classifier)}} if classifier else {})


# moco-v3's vits.py builds vit_small and vit_base (and the conv-stem variants) with 12 heads.
_MOCOV3_VIT_HEADS = 12


def _parts_mocov3(obj: Mapping[str, Any]) -> _Parts:
    state = {_strip(k, ("module.",)): v for k, v in obj["state_dict"].items()}
    encoder = _sub_state(state, "base_encoder.")
    extra: dict[str, Any] = {"epoch": obj.get("epoch"), "arch_in_file": obj.get("arch"),
                             "dropped": {k: n for k, n in _group_by_prefix(state).items() if k != "base_encoder"}}
    parts = _Parts(backbone={}, method="mocov3", mean_std=(IMAGENET_MEAN, IMAGENET_STD), extra=extra)
    if _is_vit(encoder):
        parts.backbone = {k: v for k, v in encoder.items() if not k.startswith("head.")}
        parts.projector = _sub_state(encoder, "head.") or None
        parts.num_heads, parts.heads_source = _MOCOV3_VIT_HEADS, "MoCo v3's vits.py uses 12 at every width"
    else:
        parts.backbone, _ = _torchvision_backbone(encoder)
        parts.projector = _sub_state(encoder, "fc.") or None
    return parts


def _parts_mae(obj: Mapping[str, Any]) -> _Parts:
    state = {_strip(k, ("module.",)): v for k, v in obj["model"].items()}
    decoder = {k: v for k, v in state.items() if k.startswith("decoder_") or k == "mask_token"}
    backbone, classifier = _vit_backbone({k: v for k, v in state.items() if k not in decoder})
    model_name = str(getattr(obj.get("args"), "model", "") or "")
    dropped: dict[str, Any] = {}
    if decoder:
        dropped["MAE decoder"] = _group_by_prefix(decoder)
    if classifier:
        dropped["head (classifier)"] = len(classifier)
    extra: dict[str, Any] = {"epoch": obj.get("epoch"), "dropped": dropped}
    if model_name:
        extra["model_in_args"] = model_name
    # A fine-tuned file (or one saved without its decoder) does not show that MAE pretrained it.
    method = "mae" if decoder or model_name.startswith("mae_") else "unknown"
    return _Parts(backbone=backbone, method=method, mean_std=(IMAGENET_MEAN, IMAGENET_STD), extra=extra)


def _parts_plain(obj: Mapping[str, Any]) -> _Parts:
    state = {_strip(k, ("module.", "backbone.", "encoder.")): v for k, v in obj.items()}
    backbone, dropped = _torchvision_backbone(state)
    return _Parts(backbone=backbone, extra={"dropped": {"fc": len(dropped)}} if dropped else {})


# ----------------------------------------------------------------------------- architecture


def infer_backbone_arch(state: Mapping[str, torch.Tensor]) -> tuple[str, str, float]:
    """``(arch, stem, width)`` of a ResNet state_dict with torchvision names, from shapes alone.

    The stem is ``cifar`` when conv1 is 3x3 (stride and padding are not stored in weights) and
    ``imagenet`` when it is 7x7; the width is conv1's channel count over 64 (VICReg's
    ``resnet50x2`` has 128).
    """
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.ndim != 4:
        raise ValueError("cannot infer the architecture: no 4-D 'conv1.weight' among the backbone keys "
                         f"(found e.g. {', '.join(list(state)[:5]) or 'nothing'})")
    kernel = conv1.shape[-1]
    if kernel not in (3, 7):
        raise ValueError(f"cannot infer the stem: conv1 is {kernel}x{kernel} (expected 7x7 ImageNet or 3x3 CIFAR)")
    stem = "imagenet" if kernel == 7 else "cifar"
    width = conv1.shape[0] / 64
    block = Bottleneck if any(k.startswith("layer1.0.conv3.") for k in state) else BasicBlock
    layers = tuple(
        len({int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.") and k.split(".")[1].isdigit()})
        for i in range(1, 5)
    )
    matches = [(name, arch_width) for name, (b, blocks, arch_width) in ARCHS.items()
               if b is block and tuple(blocks) == layers]
    if not matches:
        raise ValueError(f"unsupported ResNet: {block.__name__} blocks {layers} per stage; supported: "
                         + ", ".join(f"{n} {b.__name__} {tuple(blocks)}" for n, (b, blocks, _) in ARCHS.items()))
    for name, arch_width in matches:
        if arch_width == width:
            return name, stem, width
    base = next(name for name, arch_width in matches if arch_width == 1.0)
    return base, stem, width


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, source: str) -> None:
    """``load_state_dict(strict=True)`` after naming every missing, unexpected and mis-shaped key."""
    expected = module.state_dict()
    # A BatchNorm counter that old files lack; BatchNorm's loader fills it in, it never affects outputs.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                 for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        def some(items: list[str]) -> str:
            return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "") if items else "none"
        raise ValueError(
            f"the {what} weights of {source} do not match the model built for them: "
            f"{len(missing)} missing ({some(missing)}); {len(unexpected)} unexpected ({some(unexpected)}); "
            f"{len(misshaped)} mis-shaped ({some(misshaped)}). Check the arch/stem arguments, or report "
            "the file's layout if it is a supported format."
        )
    module.load_state_dict(dict(state), strict=True)


def _float32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


# ----------------------------------------------------------------------------- own format


def save_checkpoint(model: SSLModel, path: str | Path, train: dict | None = None, half: bool = False,
                    advice: str = "free some space and run the same command again") -> None:
    """Write ``model`` in the project's own format: one ``torch.save`` of tensors and plain values.

    ``train`` holds what produced the model (method, patch size, epochs, data set, final
    metrics). ``half=True`` stores floating tensors as float16 (for shipped models); they are
    read back as float32. The file is written to a temporary name and renamed, so a crash never
    leaves a partial checkpoint under ``path``.
    """
    vit_config = getattr(model.backbone, "config", None) if type(model.backbone).__name__ == "ViT" else None
    if not isinstance(model.backbone, ResNet) and vit_config is None:
        raise ValueError(f"save_checkpoint supports ResNet and ViT backbones only, got {type(model.backbone).__name__}")
    info = model.info
    # Read the architecture off the module itself, not off model.info, so that the file always
    # describes the weights it holds.
    if vit_config is not None:
        arch_name, stem, width, padding = vit_config.name, f"patch{vit_config.patch_size}", 1.0, None
    else:
        arch_name, stem, width = infer_backbone_arch(model.backbone.state_dict())
        padding = int(model.backbone.conv1.padding[0]) if stem == "cifar" else None

    def tensors(module: nn.Module | None) -> dict[str, torch.Tensor] | None:
        if module is None:
            return None
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.half() if half and v.is_floating_point() else v for k, v in state.items()}

    projector_layout = mlp_layout(model.projector) if model.projector is not None else None
    pre_feature_layout = mlp_layout(model.pre_feature) if model.pre_feature is not None else None
    linears = [s for s in projector_layout or [] if s["type"] == "linear"]
    arch = {
        "name": arch_name, "stem": stem, "cifar_padding": padding, "width": float(width),
        "embedding_dim": int(model.backbone.embedding_dim),
        "projector_dims": mlp_dims(projector_layout) if projector_layout else None,
        "projector_last_bias": bool(linears[-1]["bias"]) if linears else None,
        "projector_layout": projector_layout,
        "pre_feature_dims": mlp_dims(pre_feature_layout) if pre_feature_layout else None,
        "pre_feature_layout": pre_feature_layout,
        "projection_normalized": bool(projector_layout and projector_layout[-1]["type"] == "l2normalize"),
    }
    if vit_config is not None:  # everything that shapes the ViT, as plain values (vit.ViTConfig)
        arch["vit"] = vit_config.to_dict()
    train = dict(train or {})
    train.setdefault("method", info.method)
    checkpoint = {
        "format": OWN_FORMAT, "version": OWN_VERSION, "arch": arch,
        "preprocess": model.preprocess.to_dict(),
        "backbone": tensors(model.backbone), "projector": tensors(model.projector), "train": train,
    }
    if model.pre_feature is not None:
        checkpoint["pre_feature"] = tensors(model.pre_feature)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(with_checksum(checkpoint), path, advice=advice)


def atomic_torch_save(obj: Any, path: Path, previous: Path | None = None,
                      advice: str = "free some space and run the same command again") -> None:
    """``torch.save`` to a temporary name, flushed to disk, then renamed: a crash never leaves a partial file at
    ``path``. With ``previous``, the file at ``path`` (if any) is first renamed to it, so that one intact older
    version is always kept. A full disk is a :class:`~.errors.DiskFullError` naming the folder, what is kept and
    ``advice`` (the object is serialised in memory first: torch's own file writer turned a full disk into a
    RuntimeError, "unexpected pos")."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.is_file():
            os.replace(path, previous)
        os.replace(tmp, path)
    except OSError as error:
        if not is_disk_full(error):
            raise
        kept = f"{path.name} as it was is kept" if path.is_file() else f"no {path.name} was there before"
        raise disk_full(path.parent, path.name, kept, advice) from error
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the renames themselves reach the disk
    finally:
        os.close(directory)


# The key under which a saved dict holds the sha256 of the rest of its contents (own format, resume states).
CHECKSUM_KEY = "sha256"


class DamagedCheckpointError(ValueError):
    """A file's contents no longer match the checksum written with them."""


def content_sha256(obj: Mapping[str, Any]) -> str:
    """sha256 of a saved dict: the JSON of its plain values, then every tensor's name, dtype, shape and bytes in a
    fixed (sorted) order. ``CHECKSUM_KEY`` itself is left out."""
    tensors: list[tuple[str, torch.Tensor]] = []

    def plain(value: Any, name: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors.append((name, value))
            return {"tensor": name}
        if isinstance(value, Mapping):
            return {str(k): plain(v, f"{name}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v, f"{name}/{i}") for i, v in enumerate(value)]
        return value

    skeleton = plain({k: v for k, v in obj.items() if k != CHECKSUM_KEY}, "")
    digest = hashlib.sha256(json.dumps(skeleton, sort_keys=True, default=repr).encode())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"\n{name} {flat.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def with_checksum(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` with ``CHECKSUM_KEY`` holding the sha256 of its contents."""
    return {**obj, CHECKSUM_KEY: content_sha256(obj)}


def verify_checksum(obj: Any, path: str | Path) -> None:
    """Raise :class:`DamagedCheckpointError` naming ``path`` when the contents of ``obj`` (as read from it) do
    not match its checksum. Files written before checksums existed (no ``CHECKSUM_KEY``) pass."""
    if not isinstance(obj, Mapping) or CHECKSUM_KEY not in obj:
        return
    if obj[CHECKSUM_KEY] != content_sha256(obj):
        raise DamagedCheckpointError(
            f"{path} is damaged: its contents no longer match the sha256 written with them (bytes changed on disk "
            f"or in a copy); {_recovery_advice(Path(path))}")


def _load_own(obj: Mapping[str, Any], source: str) -> SSLModel:
    if obj.get("version") != OWN_VERSION:
        raise ValueError(f"{source} is version {obj.get('version')!r} of the {OWN_FORMAT} format; this code "
                         f"reads version {OWN_VERSION}: update ssl_patch_analysis")
    def missing(what: str) -> ValueError:  # a hand-written or cut file: one line, not a KeyError
        return ValueError(f"{source} is in the {OWN_FORMAT} format but has no {what}: a file of this format is "
                          "written by save_checkpoint (or pretrained/ship.py), which records it")

    for key in ("arch", "backbone", "preprocess"):
        if not isinstance(obj.get(key), Mapping):
            raise missing(f"{key!r} record")
    arch = obj["arch"]
    if "name" not in arch:
        raise missing("architecture name (arch.name)")
    stem = arch.get("stem", "imagenet")
    padding = arch.get("cifar_padding") or 1
    extra: dict[str, Any] = {}
    if arch.get("vit") is not None:
        from .vit import ViTConfig, build_vit  # timm only when a ViT is loaded

        fields = {f.name for f in dataclasses.fields(ViTConfig)}
        unknown = sorted(set(arch["vit"]) - fields)
        if unknown:
            raise ValueError(f"{source}: its ViT has settings this version does not know ({', '.join(unknown)}): "
                             "update ssl_patch_analysis")
        config = ViTConfig(**arch["vit"])
        backbone, dim = build_vit(config)
        extra["vit"] = {**config.to_dict(), "h": config.pooling}
    else:
        backbone, dim = build_backbone(arch["name"], stem=stem, cifar_padding=padding, width=arch.get("width"))
    _load_strict(backbone, _float32(obj["backbone"]), "backbone", source)

    def head(kind: str) -> nn.Sequential | None:
        state = obj.get(kind)
        if state is None:
            return None
        layout = arch.get(f"{kind}_layout")
        if layout is None and f"{kind}_dims" not in arch:
            raise missing(f"shape of its {kind} (arch.{kind}_layout or arch.{kind}_dims)")
        if layout is None:  # a hand-written file may give the VICReg-style dims only
            module = build_mlp(arch[f"{kind}_dims"], last_bias=arch.get(f"{kind}_last_bias", True))
            if kind == "projector" and arch.get("projection_normalized"):
                module.append(L2Normalize())
        else:
            module = build_mlp_from_layout(layout)
        _load_strict(module, _float32(state), kind, source)
        return module

    projector, pre_feature = head("projector"), head("pre_feature")
    train = obj.get("train") or {}
    info = ModelInfo(
        method=str(train.get("method", "unknown")), arch=arch["name"], stem=stem,
        cifar_padding=padding if stem == "cifar" else None, width=float(arch.get("width") or 1.0),
        embedding_dim=dim, projection_normalized=bool(arch.get("projection_normalized")),
        projector_dims=mlp_dims(mlp_layout(projector)) if projector is not None else None,
        pre_feature_dims=mlp_dims(mlp_layout(pre_feature)) if pre_feature is not None else None,
        extra={"train": train, **extra},
    )
    try:
        preprocess = Preprocess.from_dict(obj["preprocess"])
    except (KeyError, TypeError, ValueError) as error:
        raise missing(f"complete preprocess record ({type(error).__name__}: {error})") from None
    return SSLModel(backbone, projector, pre_feature, preprocess, info)


# ----------------------------------------------------------------------------- loader


def _extract(obj: Mapping[str, Any], fmt: str, path: Path) -> _Parts:
    if fmt == "solo-learn":
        return _parts_solo_learn(obj, path)
    if fmt == "vicreg-full":
        return _parts_vicreg_full(obj)
    if fmt == "backbone-projector":
        return _parts_backbone_projector(obj)
    if fmt == "emp-ssl":
        return _parts_emp_ssl(obj)
    if fmt == "lightly":
        return _parts_lightly(obj)
    if fmt == "sthalles-simclr":
        return _parts_sthalles(obj, path)
    if fmt == "vissl":
        return _parts_vissl(obj)
    if fmt == "dino-full":
        return _parts_dino_full(obj)
    if fmt == "mocov3":
        return _parts_mocov3(obj)
    if fmt == "mae":
        return _parts_mae(obj)
    if fmt in ("vit", "timm-vit"):
        return _parts_vit(obj)
    return _parts_plain(obj)


def _build_from_parts(parts: _Parts, source: str, arch: str | None, stem: str | None,
                      cifar_padding: int | None, num_heads: int | None = None) -> SSLModel:
    if _is_vit(parts.backbone):
        given = [name for name, value in (("arch", arch), ("stem", stem), ("cifar_padding", cifar_padding))
                 if value is not None]
        if given:
            raise ValueError(f"{source} holds a Vision Transformer: {', '.join(given)} appl"
                             f"{'ies' if len(given) == 1 else 'y'} to ResNets only (its shape is read from the "
                             "weights; num_heads is the one thing they do not show)")
        return _build_vit_from_parts(parts, source, num_heads)
    if num_heads is not None:
        raise ValueError(f"num_heads applies to Vision Transformers only; {source} holds a ResNet")
    inferred_arch, inferred_stem, width = infer_backbone_arch(parts.backbone)
    if arch is not None:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
        width = ARCHS[arch][2]
    arch = arch or inferred_arch
    stem = stem or inferred_stem
    assumed: list[str] = list(parts.extra.pop("assumed", []))
    padding: int | None = None
    if cifar_padding is not None and stem != "cifar":  # was ignored without a word
        raise ValueError(f"cifar_padding applies to the CIFAR stem (a 3x3 conv1); {source} holds a ResNet with the "
                         "ImageNet stem (a 7x7 conv1): leave it out")
    if stem == "cifar":
        padding = cifar_padding or parts.cifar_padding
        if cifar_padding is None and parts.cifar_padding_guessed:
            assumed.append(parts.cifar_padding_guessed)
        if padding is None:
            padding = 1
            assumed.append("CIFAR stem padding 1 (not visible in weights; pass cifar_padding=2 for solo-learn-style "
                           "nets)")
    backbone, dim = build_backbone(arch, stem=stem, cifar_padding=padding or 1, width=width)
    _load_strict(backbone, parts.backbone, "backbone", source)

    def head(state: dict | None, layout: list | None, what: str) -> nn.Sequential | None:
        if not state:
            return None
        module = build_mlp_from_layout(layout if layout is not None else infer_mlp_layout(state))
        _load_strict(module, state, what, source)
        return module

    pre_feature = head(parts.pre_feature, parts.pre_feature_layout, "pre_feature")
    projector = head(parts.projector, parts.projector_layout, "projector")

    preprocess = parts.preprocess
    if preprocess is None:
        if parts.mean_std is not None:
            mean, std = parts.mean_std
        elif stem == "cifar":
            mean, std = CIFAR10_MEAN, CIFAR10_STD
            assumed.append("CIFAR-10 mean/std (the file does not say how inputs were normalised)")
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        size = parts.input_size or (32 if stem == "cifar" else 224)
        preprocess = Preprocess(input_size=size, mean=tuple(float(v) for v in mean),
                                std=tuple(float(v) for v in std))
    if assumed:
        parts.extra["assumed"] = assumed
    info = ModelInfo(
        method=parts.method, arch=arch, stem=stem,
        cifar_padding=padding, width=width, embedding_dim=dim,
        projector_dims=mlp_dims(mlp_layout(projector)) if projector is not None else None,
        pre_feature_dims=mlp_dims(mlp_layout(pre_feature)) if pre_feature is not None else None,
        projection_normalized=projector is not None and isinstance(projector[-1], L2Normalize),
        extra=parts.extra,
    )
    return SSLModel(backbone, projector, pre_feature, preprocess, info)


def _build_vit_from_parts(parts: _Parts, source: str, num_heads: int | None) -> SSLModel:
    # Imported here, not at the top: timm makes every import of this module seconds slower
    # (benchmarks/RESULTS.md, "Numbers quoted in the code").
    from .vit import build_vit, infer_vit_config

    config, heads_note = infer_vit_config(parts.backbone, num_heads=num_heads or parts.num_heads,
                                          heads_source=None if num_heads else parts.heads_source)
    backbone, dim = build_vit(config)
    _load_strict(backbone, parts.backbone, "backbone", source)
    projector: nn.Module | None = None
    if parts.projector:
        projector = parts.projector_module or build_mlp_from_layout(
            parts.projector_layout if parts.projector_layout is not None else infer_mlp_layout(parts.projector))
        _load_strict(projector, parts.projector, "projector", source)
    if parts.pre_feature:
        raise ValueError(f"{source}: a pre_feature layer on a Vision Transformer is not supported")

    assumed: list[str] = [*parts.extra.pop("assumed", []), *heads_note]
    preprocess = parts.preprocess
    if preprocess is None:
        if parts.mean_std is not None:
            mean, std = parts.mean_std
        elif config.img_size <= 64:
            mean, std = CIFAR10_MEAN, CIFAR10_STD
            assumed.append(f"CIFAR-10 mean/std (a ViT trained at {config.img_size} px; the file does not say how "
                           "inputs were normalised)")
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
            assumed.append("ImageNet mean/std (the file does not say how inputs were normalised; timm's augreg ViTs "
                           "use 0.5, 0.5)")
        preprocess = Preprocess(input_size=parts.input_size or config.img_size, mean=tuple(float(v) for v in mean),
                                std=tuple(float(v) for v in std))
    if assumed:
        parts.extra["assumed"] = assumed
    grid = config.grid_size
    parts.extra["vit"] = {
        **config.to_dict(), "h": config.pooling,
        "position_embeddings": f"{grid}x{grid} grid ({config.img_size} px), resampled (bicubic) for other inputs "
                               f"whose sides are multiples of {config.patch_size} px",
    }
    if isinstance(projector, DINOHead):
        projector_dims = projector.dims
    else:
        projector_dims = mlp_dims(mlp_layout(projector)) if projector is not None else None
    info = ModelInfo(
        method=parts.method, arch=config.name, stem=f"patch{config.patch_size}", width=1.0, embedding_dim=dim,
        projector_dims=projector_dims,
        projection_normalized=isinstance(projector, nn.Sequential) and isinstance(projector[-1], L2Normalize),
        extra=parts.extra,
    )
    return SSLModel(backbone, projector, None, preprocess, info)


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu", download: bool = False,
               arch: str | None = None, stem: str | None = None, verbose: bool = True,
               cifar_padding: int | None = None, num_heads: int | None = None) -> SSLModel:
    """Load any supported checkpoint (a path, a published name, or a shipped name) as an SSLModel.

    ``arch``/``stem``/``cifar_padding`` override what is inferred from a ResNet file; ``num_heads``
    gives a Vision Transformer's attention heads, which its weights do not show (by default the
    format's own, else timm's for the width; ``info.extra["assumed"]`` says which). Published names
    (``vicreg-resnet50``, ``dino-vits16``, ...) are downloaded into the torch hub cache only with
    ``download=True``. The model is returned in eval mode on ``device``; ``model.info`` says what
    was loaded and ``model.info.extra["assumed"]`` lists anything the file did not say.
    """
    if stem is not None and stem not in ("imagenet", "cifar"):
        raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
    if cifar_padding is not None and cifar_padding not in (1, 2):
        raise ValueError(f"cifar_padding must be 1 or 2, got {cifar_padding!r}")
    if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1):
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    path, name = resolve_checkpoint(name_or_path, download=download, verbose=verbose)
    obj = read_checkpoint(path)
    fmt = detect_format(obj)
    source = str(path)
    if fmt == OWN_FORMAT:
        verify_checksum(obj, path)
        model = _load_own(obj, source)
        _refuse_overrides_of_a_record(model, source, arch=arch, stem=stem, cifar_padding=cifar_padding,
                                      num_heads=num_heads)
    else:
        model = _build_from_parts(_extract(obj, fmt, path), source, arch, stem, cifar_padding, num_heads)
    _check_finite(model, source)
    model.info.source, model.info.format = source, fmt
    if name is not None:
        model.info.extra["name"] = name
        if name in NAMED_WEIGHTS:
            model.info.method = NAMED_WEIGHTS[name].method
            model.info.extra["url"] = NAMED_WEIGHTS[name].url
    model = model.to(device).eval()
    if verbose:
        print(describe(model, one_line=True))
    return model


def _refuse_overrides_of_a_record(model: SSLModel, source: str, **given: object) -> None:
    """This project's own file records its architecture: an ``arch``/``stem``/``cifar_padding``/``num_heads`` that
    says otherwise is refused in one line (it was ignored in silence), one that agrees is accepted."""
    vit = model.info.extra.get("vit") or {}
    recorded = {"arch": model.info.arch, "stem": model.info.stem, "cifar_padding": model.info.cifar_padding,
                "num_heads": vit.get("num_heads")}
    for name, value in given.items():
        if value is not None and value != recorded[name]:
            flag = "--" + name.replace("_", "-")
            what = f"{name} {recorded[name]}" if recorded[name] is not None else f"no {name} (it holds a ResNet)"
            raise ValueError(f"{flag} {value}: {source} is this project's own checkpoint, which records {what} "
                             f"and is built as recorded; leave {flag} out")


def _check_finite(model: SSLModel, source: str) -> None:
    """Refuse weights or BatchNorm statistics holding NaN or infinity: every embedding would be NaN."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ValueError(f"{source}: tensor {name} holds {bad} non-finite value(s) (NaN or inf) of "
                                 f"{tensor.numel()}: the file is damaged or comes from a diverged run; use an "
                                 "earlier checkpoint")


def describe(model: SSLModel, one_line: bool = False) -> str:
    """What a loaded model is: format, method, arch, dims, preprocessing and parameter count."""
    info, pre = model.info, model.preprocess
    stem = info.stem + (f" stem, padding {info.cifar_padding}" if info.stem == "cifar" else " stem")
    width = f"width {info.width:g}"
    vit = info.extra.get("vit")
    if isinstance(vit, Mapping):
        stem = f"{vit['patch_size']} px patches, depth {vit['depth']}, {vit['num_heads']} heads"
        width = f"width {vit['embed_dim']}"
    n_params = sum(p.numel() for p in model.parameters())
    projector = "-".join(map(str, info.projector_dims)) if info.projector_dims else "none"
    if one_line:
        return (f"loaded {info.source} [{info.format}]: {info.method} {info.arch} ({stem}), "
                f"h {info.embedding_dim}-d, projector {projector}, {n_params / 1e6:.2f}M params")
    norm = f"mean {list(pre.mean)}, std {list(pre.std)}" if pre.normalize else "none (raw [0, 1] pixels)"
    lines = [
        f"source:        {info.source}",
        f"format:        {info.format} ({FORMATS.get(info.format or '', '')})",
        f"method:        {info.method}",
        f"arch:          {info.arch} ({width}, {stem})",
        f"embedding h:   {info.embedding_dim}-d" + (f" ({vit['h']})" if isinstance(vit, Mapping) else ""),
        f"pre_feature:   {'-'.join(map(str, info.pre_feature_dims)) if info.pre_feature_dims else 'none'}",
        f"projector g:   {projector}" + (" (L2-normalised output)" if info.projection_normalized else ""),
        f"preprocess:    input {pre.input_size} px, normalisation {norm}",
        f"parameters:    {n_params:,}",
    ]
    for key, value in info.extra.items():
        lines.append(f"{key + ':':<15}{value}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from . import cli

    parser = cli.ArgumentParser(
        prog="python -m ssl_patch_analysis.checkpoints",
        description="Inspect a checkpoint: print the format detected, architecture, dims and preprocessing.")
    cli.add_model_args(parser, default=None, random_init=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    from . import cli

    @cli.command
    def inspect(argv: list[str] | None) -> None:
        parser = build_parser()
        words = list(sys.argv[1:] if argv is None else argv)
        if words and not words[0].startswith("-") and "--model" not in words:  # the form of earlier versions
            parser.error(f"the checkpoint is passed with --model: python -m ssl_patch_analysis.checkpoints --model "
                         f"{shlex.quote(words[0])}")
        args = parser.parse_args(words)
        model = cli.load_model_from_args(args, "cpu", verbose=False)
        print(describe(model))

    inspect(argv)


if __name__ == "__main__":
    main()
