"""Names for checkpoints: published weights (downloaded on request) and the models shipped in ``pretrained/``.

``resolve_checkpoint`` turns what a user typed (a path, a published name such as
``vicreg-resnet50``, or a shipped name such as ``vicreg``) into a file on disk. Nothing is
downloaded unless the caller passes ``download=True``; files land in the torch hub cache
(``torch.hub.get_dir()/checkpoints``, which honours ``TORCH_HOME``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

PRETRAINED_ENV = "SSL_PATCH_ANALYSIS_PRETRAINED"


@dataclass(frozen=True)
class NamedWeights:
    """A published checkpoint: where it lives and what it is."""

    url: str
    method: str
    description: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_FB = "https://dl.fbaipublicfiles.com"

NAMED_WEIGHTS: dict[str, NamedWeights] = {
    "vicreg-resnet50": NamedWeights(
        f"{_FB}/vicreg/resnet50.pth", "vicreg", "VICReg ResNet-50 backbone (facebookresearch/vicreg)"),
    "vicreg-resnet50-full": NamedWeights(
        f"{_FB}/vicreg/resnet50_fullckpt.pth", "vicreg", "VICReg ResNet-50 backbone + 8192-d expander"),
    "vicreg-resnet50x2": NamedWeights(
        f"{_FB}/vicreg/resnet50x2.pth", "vicreg", "VICReg ResNet-50 (x2) backbone, 4096-d embedding"),
    "vicreg-resnet50x2-full": NamedWeights(
        f"{_FB}/vicreg/resnet50x2_fullckpt.pth", "vicreg", "VICReg ResNet-50 (x2) backbone + expander"),
    "dino-resnet50": NamedWeights(
        f"{_FB}/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth", "dino",
        "DINO ResNet-50 backbone (facebookresearch/dino)"),
    "dino-resnet50-full": NamedWeights(
        f"{_FB}/dino/dino_resnet50_pretrain/dino_resnet50_pretrain_full_checkpoint.pth", "dino",
        "DINO ResNet-50 full checkpoint (teacher backbone is loaded; the DINO head is not)"),
    "simclr-resnet50-vissl": NamedWeights(
        f"{_FB}/vissl/model_zoo/simclr_rn50_800ep_simclr_8node_resnet_16_07_20.7e8feed1/"
        "model_final_checkpoint_phase799.torch", "simclr",
        "SimCLR ResNet-50, 800 epochs, VISSL model zoo (trunk + 2048-2048-128 head)"),
    # Vision Transformers (loaded into timm's VisionTransformer; see vit.py). DINO's README and hubconf.py:
    "dino-vits16": NamedWeights(
        f"{_FB}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", "dino",
        "DINO ViT-S/16 teacher backbone (facebookresearch/dino)"),
    "dino-vits8": NamedWeights(
        f"{_FB}/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth", "dino",
        "DINO ViT-S/8 teacher backbone"),
    "dino-vitb16": NamedWeights(
        f"{_FB}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", "dino",
        "DINO ViT-B/16 teacher backbone"),
    "dino-vitb8": NamedWeights(
        f"{_FB}/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth", "dino",
        "DINO ViT-B/8 teacher backbone"),
    "dino-vits16-full": NamedWeights(
        f"{_FB}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain_full_checkpoint.pth", "dino",
        "DINO ViT-S/16 full checkpoint: teacher backbone + DINO head (65536 prototypes) as the projector"),
    "dino-vits8-full": NamedWeights(
        f"{_FB}/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain_full_checkpoint.pth", "dino",
        "DINO ViT-S/8 full checkpoint: teacher backbone + DINO head"),
    "dino-vitb16-full": NamedWeights(
        f"{_FB}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain_full_checkpoint.pth", "dino",
        "DINO ViT-B/16 full checkpoint: teacher backbone + DINO head"),
    "dino-vitb8-full": NamedWeights(
        f"{_FB}/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain_full_checkpoint.pth", "dino",
        "DINO ViT-B/8 full checkpoint: teacher backbone + DINO head"),
    # MoCo v3's CONFIG.md (300-epoch ViTs, 12 heads; full pretraining checkpoints with the projector):
    "mocov3-vits": NamedWeights(
        f"{_FB}/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar", "mocov3",
        "MoCo v3 ViT-S/16 (12 heads), 300 epochs: base encoder + 3-layer projector (facebookresearch/moco-v3)"),
    "mocov3-vitb": NamedWeights(
        f"{_FB}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar", "mocov3",
        "MoCo v3 ViT-B/16, 300 epochs: base encoder + 3-layer projector"),
    "mocov3-resnet50": NamedWeights(
        f"{_FB}/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar", "mocov3",
        "MoCo v3 ResNet-50, 1000 epochs: base encoder + 2-layer projector"),
    # MAE's README (pretrained encoders) and FINETUNE.md (ImageNet fine-tuned, global pooling):
    "mae-vitb16": NamedWeights(
        f"{_FB}/mae/pretrain/mae_pretrain_vit_base.pth", "mae",
        "MAE ViT-B/16 pretrained encoder (facebookresearch/mae)"),
    "mae-vitl16": NamedWeights(
        f"{_FB}/mae/pretrain/mae_pretrain_vit_large.pth", "mae", "MAE ViT-L/16 pretrained encoder"),
    "mae-vith14": NamedWeights(
        f"{_FB}/mae/pretrain/mae_pretrain_vit_huge.pth", "mae", "MAE ViT-H/14 pretrained encoder"),
    "mae-vitb16-finetuned": NamedWeights(
        f"{_FB}/mae/finetune/mae_finetuned_vit_base.pth", "mae",
        "MAE ViT-B/16 fine-tuned on ImageNet-1k (h = fc_norm of the mean patch token; classifier dropped)"),
    "mae-vitl16-finetuned": NamedWeights(
        f"{_FB}/mae/finetune/mae_finetuned_vit_large.pth", "mae", "MAE ViT-L/16 fine-tuned on ImageNet-1k"),
    "mae-vith14-finetuned": NamedWeights(
        f"{_FB}/mae/finetune/mae_finetuned_vit_huge.pth", "mae", "MAE ViT-H/14 fine-tuned on ImageNet-1k"),
}

# Short names for the models this project trains and ships as pretrained/<name>.pt.
SHIPPED_ALIASES: dict[str, str] = {
    "vicreg": "vicreg-resnet18-cifar10",
    "bagssl": "bagssl-resnet18-cifar10",
    "simclr": "simclr-resnet18-cifar10",
    "emp-ssl": "emp-ssl-resnet18-cifar10",
    "vicreg-vit": "vicreg-vit_tiny_patch4-cifar10",
}


def pretrained_dir() -> Path:
    """Folder of the shipped models: ``$SSL_PATCH_ANALYSIS_PRETRAINED`` or ``pretrained/`` at the repo root."""
    env = os.environ.get(PRETRAINED_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "pretrained"


def hub_checkpoint_path(name: str) -> Path:
    """Where a named download is cached. The name prefixes the file because several projects
    publish a ``resnet50.pth`` that would otherwise overwrite each other in the shared cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{name}--{NAMED_WEIGHTS[name].filename}"


def known_names() -> list[str]:
    """Every name ``resolve_checkpoint`` accepts besides a path."""
    shipped = sorted(set(SHIPPED_ALIASES) | set(SHIPPED_ALIASES.values())
                     | {p.stem for p in pretrained_dir().glob("*.pt")})
    return list(NAMED_WEIGHTS) + shipped


def _looks_like_name(text: str) -> bool:
    return os.sep not in text and "/" not in text and not Path(text).suffix


def resolve_checkpoint(name_or_path: str | Path, download: bool = False,
                       verbose: bool = True) -> tuple[Path, str | None]:
    """Return ``(file, name)``: the checkpoint file to read and the registry name it came from (or None).

    Raises FileNotFoundError with the URL to fetch, or the names known, when there is no file.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder: pass the checkpoint file inside it")
    if path.is_file():
        return path, None
    text = str(name_or_path)
    if text in NAMED_WEIGHTS:
        cached = hub_checkpoint_path(text)
        if cached.is_file():
            return cached, text
        url = NAMED_WEIGHTS[text].url
        if not download:
            raise FileNotFoundError(
                f"{text!r} is not downloaded yet ({url}); pass download=True (or --download on the "
                f"command line) to fetch it into {cached.parent}"
            )
        cached.parent.mkdir(parents=True, exist_ok=True)
        if verbose:
            print(f"downloading {url} to {cached}")
        # download_url_to_file writes a temporary file and renames it, so an interrupted
        # download never leaves a half file under the final name.
        torch.hub.download_url_to_file(url, str(cached), progress=verbose)
        return cached, text
    if _looks_like_name(text):
        shipped = SHIPPED_ALIASES.get(text, text)
        candidate = pretrained_dir() / f"{shipped}.pt"
        if candidate.is_file():
            return candidate, shipped
        if shipped in SHIPPED_ALIASES.values():
            raise FileNotFoundError(
                f"the shipped model {shipped!r} ({candidate}) is not in this checkout yet: the shipped "
                "models are trained by the project's trainer and added to pretrained/ later. Pass a "
                "checkpoint path, or a published name with download=True: " + ", ".join(NAMED_WEIGHTS)
            )
    raise FileNotFoundError(
        f"no checkpoint file {str(path)!r}, and {text!r} is not a known name. "
        f"Known names: {', '.join(known_names())}"
    )


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.weights says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
