"""The small model and images the tests share: one definition of each.

conftest.py offers the defaults as the ``tiny_model`` and ``random_images`` fixtures; a test that needs
another variant (another seed, stem, size, no projector, a recorded training) calls these functions
(``import helpers``; ``helpers.tiny_model(seed=1)``).
"""
import importlib.util
import subprocess
from pathlib import Path
from typing import Any

import torch

from ssl_patch_analysis.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelInfo,
    Preprocess,
    SSLModel,
    build_backbone,
    build_mlp,
)


def tiny_model(seed: int = 0, *, stem: str = "cifar", input_size: int = 32, projector: bool = True,
               train: dict[str, Any] | None = None) -> SSLModel:
    """A narrow ResNet-18 (width 0.125, projector ``dim -> 32 -> 16``) in eval mode, whose batch-norm
    statistics were measured on 64 random images.

    Calibrated statistics keep activations in a normal range; with the initial ones (mean 0, var 1)
    some inputs drive the CPU into slow subnormal arithmetic. The CIFAR stem normalises with the
    CIFAR-10 mean and std, the ImageNet stem with ImageNet's. ``train`` is what a checkpoint records of
    the training (``info.extra["train"]``: patch size, crop scales). Seeds torch's global generator with
    ``seed``, so the same call gives the same weights.
    """
    torch.manual_seed(seed)
    backbone, dim = build_backbone("resnet18", stem=stem, width=0.125)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if stem == "cifar" else (IMAGENET_MEAN, IMAGENET_STD)
    info = ModelInfo(method="test", arch="resnet18", stem=stem, width=0.125, embedding_dim=dim,
                     extra={} if train is None else {"train": train})
    model = SSLModel(backbone, build_mlp([dim, 32, 16]) if projector else None,
                     preprocess=Preprocess(input_size, mean, std), info=info)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        model.train()(torch.rand(64, 3, input_size, input_size))
    return model.eval()


def random_images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``count`` x 3 x ``size`` x ``size`` uint8 images of uniform noise, the same for the same seed
    (``random_images(8)[:2]`` equals ``random_images(2)``)."""
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


GPU_MODELS = ("emp-ssl", "vicreg", "simclr", "bagssl")  # the issue-12 models benchmarks/gpu_session.sh trains


def gpu_recipe(model: str) -> list[str]:
    """The trainer flags benchmarks/gpu_session.sh trains ``model`` with (its ``model_recipe``, run by bash)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    define = f'eval "$(sed -n "/^model_recipe()/,/^}}/p" {script})"'
    return subprocess.run(["bash", "-c", f"{define}; model_recipe {model}"], capture_output=True, text=True,
                          check=True).stdout.split()


def load_script(relative_path: str) -> Any:
    """A script of the repository (``pretrained/ship.py``, ...) imported as a module from its path."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
