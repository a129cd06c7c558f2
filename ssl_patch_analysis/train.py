"""Train BagSSL, EMP-SSL, VICReg or SimCLR from scratch: one readable loop, as in vicreg's main_vicreg.py.

The patch methods (``bagssl``, ``emp-ssl``) cut ``--num-patches`` fixed-scale patches of side
``--patch-size`` at random positions out of every image; the baselines (``vicreg``, ``simclr``)
take two ``RandomResizedCrop(--min-scale, --max-scale)`` views. Every crop is resized to the
model's input size (32 px on CIFAR, 224 px otherwise) and colour-augmented on its own.

Everything runs on the device: the whole uint8 training set is copied there once, batches are
indexed there, crops are cut by ``roi_align`` (:func:`.extract.crop_patches`) and augmented by
:class:`.augment.Augmentation`. bf16 autocast and ``channels_last`` on CUDA, float32 on CPU.

Each epoch writes, in ``--out``:

- ``checkpoint.pt``: the model in the project's own format (``load_model`` reads it), its
  ``train`` dict saying how it was made;
- ``resume.pt``: what ``--resume`` needs to continue exactly (model and optimizer state, epoch,
  step, RNG states, args), plain tensors and values so that ``weights_only=True`` loads it;
- ``log.jsonl``: a header line (command line and args), then one record per epoch (loss terms,
  learning rate, images/s, epoch time, online weighted k-NN top-1 on the central view).

Randomness is a function of ``(--seed, epoch)`` for the data order and the crops, and of
``(--seed, step, rank)`` for the colour augmentation, so a resumed run takes the same steps as an
uninterrupted one. Several GPUs: ``torchrun --nproc_per_node=K -m ssl_patch_analysis.train ...``
(``--batch-size`` is the global batch, split over the ranks).

    python -m ssl_patch_analysis.train --method bagssl --data cifar10 --epochs 100
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .augment import Augmentation
from .checkpoints import SOLO_LEARN_MEAN_STD, atomic_torch_save, save_checkpoint
from .data import ARCHIVE_DATASETS, ImageDataset, TensorImageDataset, load_dataset
from .extract import crop_patches
from .knn import knn_accuracy
from .losses import BagSSLLoss, EMPSSLLoss, LossOutput, NTXentLoss, VICRegLoss
from .models import IMAGENET_MEAN, IMAGENET_STD, L2Normalize, ModelInfo, Preprocess, SSLModel, build_backbone, build_mlp
from .patches import central, random_fixed, random_resized

METHODS = ("bagssl", "emp-ssl", "vicreg", "simclr")
PATCH_METHODS = ("bagssl", "emp-ssl")
# Projector output sizes after the embedding (after pre_feature for EMP-SSL), per method.
DEFAULT_PROJECTOR = {"bagssl": "2048-2048-2048", "vicreg": "2048-2048-2048", "simclr": "2048-128",
                     "emp-ssl": "4096-1024"}
DEFAULT_PROJECTOR_LARGE = {**DEFAULT_PROJECTOR, "bagssl": "8192-8192-8192", "vicreg": "8192-8192-8192"}
# LARS base learning rates (per 256 images) and weight decays: solo-learn's CIFAR settings for
# VICReg and SimCLR, EMP-SSL's for EMP-SSL; BagSSL uses VICReg's.
DEFAULT_BASE_LR = {"bagssl": 0.3, "vicreg": 0.3, "simclr": 0.4, "emp-ssl": 0.3}
DEFAULT_WEIGHT_DECAY = {"bagssl": 1e-4, "vicreg": 1e-4, "simclr": 1e-5, "emp-ssl": 1e-4}
# Arguments a resumed run must share with the run it continues (the others may change).
RESUME_FIXED_ARGS = ("method", "data", "arch", "width", "cifar_padding", "projector", "pre_feature", "patch_size",
                     "num_patches", "min_scale", "max_scale", "batch_size", "lr", "base_lr", "optimizer",
                     "weight_decay", "warmup_epochs", "seed", "train_size", "input_size", "image_size", "blur_p",
                     "solarize_p")
# Steps between checks of the loss for NaN/inf (each check waits for the device).
CHECK_EVERY = 10
KNN_K = 20
KNN_TEMPERATURE = 0.07


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_patch_analysis.train",
        description="Train a BagSSL / EMP-SSL / VICReg / SimCLR model from scratch (checkpoints in the project's "
                    "own format, resumable, torchrun for several GPUs).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--method", choices=METHODS, default="bagssl",
        help="bagssl/emp-ssl: fixed-scale patches of one image are positives; vicreg/simclr: two multi-scale views")
    add("--data", default="cifar10",
        help="cifar10, cifar100, imagenette (its only split, val, trains; k-NN uses disjoint subsets of it) or an "
             "image-folder path (<folder>/[train/]<class>/<image>, decoded into memory)")
    add("--data-root", default=None, help="folder holding the data files (default: $SSL_PATCH_ANALYSIS_DATA)")
    add("--image-size", type=int, default=224, help="image folders only: resize and centre-crop every image to this")
    add("--train-size", type=int, default=None, help="train on a fixed random subset of this many images (all: None)")
    add("--arch", choices=("resnet18", "resnet50"), default="resnet18", help="backbone")
    add("--width", type=float, default=1.0, help="channel multiplier of the backbone (0.25: a narrow net for CPUs)")
    add("--cifar-padding", type=int, choices=(1, 2), default=1,
        help="padding of the CIFAR stem's 3x3 conv (used automatically on images of 64 px or less)")
    add("--input-size", type=int, default=None, help="side every crop is resized to (default: 32 on 32 px data, else 224)")
    add("--projector", default=None,
        help="projector output sizes after the embedding, e.g. 2048-2048-2048 (default: 2048-2048-2048 for "
             "bagssl/vicreg on 32 px data, 8192-8192-8192 on larger images; 2048-128 for simclr; 4096-1024 for "
             "emp-ssl, L2-normalised, after its pre_feature layer)")
    add("--pre-feature", type=int, default=4096, help="emp-ssl only: width of the Linear-BN-ReLU pre_feature layer")
    add("--patch-size", type=int, default=None,
        help="bagssl/emp-ssl: side of the fixed-scale patches (default: 16 on 32 px data, 32 on larger images)")
    add("--num-patches", type=int, default=16, help="bagssl/emp-ssl: patches per image (EMP-SSL used 20 to 200)")
    add("--min-scale", type=float, default=0.08, help="vicreg/simclr: RandomResizedCrop's smallest area fraction")
    add("--max-scale", type=float, default=1.0, help="vicreg/simclr: RandomResizedCrop's largest area fraction")
    add("--blur-p", type=float, default=None,
        help="Gaussian blur probability (default: 0 on 32 px inputs, 0.5 on larger ones)")
    add("--solarize-p", type=float, default=0.0, help="solarization probability")
    add("--epochs", type=int, default=100, help="epochs to train")
    add("--batch-size", type=int, default=256, help="images per step over all processes (each gives several crops)")
    add("--base-lr", type=float, default=None,
        help="learning rate per 256 images: lr = base_lr * batch_size / 256 (default: 0.3 for bagssl, vicreg, "
             "emp-ssl; 0.4 for simclr)")
    add("--lr", type=float, default=None, help="absolute peak learning rate (overrides --base-lr)")
    add("--optimizer", choices=("lars", "sgd", "adamw"), default="lars",
        help="LARS as in vicreg (biases and norm weights get no weight decay and no LARS adaptation)")
    add("--weight-decay", type=float, default=None, help="weight decay (default: 1e-4; 1e-5 for simclr)")
    add("--warmup-epochs", type=float, default=10, help="linear warm-up epochs before the per-step cosine decay")
    add("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    add("--seed", type=int, default=0, help="seed of the initial weights, data order, crops and augmentation")
    add("--out", default=None, help="output folder (default: runs/<method>-<arch>-<data>)")
    add("--resume", action="store_true", help="continue the run in --out from its last epoch")
    add("--time-limit", type=float, default=None,
        help="seconds: stop (saving a checkpoint) after the epoch after which another epoch would exceed this")
    add("--knn-every", type=int, default=1, help="online k-NN every this many epochs and at the end (0: only at the end)")
    add("--knn-train-size", type=int, default=5000, help="k-NN bank: this many training images (fixed subset)")
    add("--knn-test-size", type=int, default=1000, help="k-NN queries: this many test images (fixed subset)")
    return parser


# ----------------------------------------------------------------------------- seeds and processes


def mixed_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from several integers (nearby inputs give unrelated streams)."""
    return int(np.random.SeedSequence([v & 0xFFFFFFFF for v in values]).generate_state(1, np.uint64)[0]) >> 1


@dataclass
class Processes:
    """This process's place among the DDP processes (rank 0 of 1 without torchrun)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_processes(device_arg: str | None) -> Processes:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    requested = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if requested.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available; pass --device cpu")
    if world_size == 1:
        return Processes(0, 1, requested)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = requested
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


# ----------------------------------------------------------------------------- data


@dataclass
class TrainingData:
    """The uint8 training images on the device, and the fixed k-NN bank and queries."""

    images: torch.Tensor
    description: str
    num_classes: int
    knn_bank_images: torch.Tensor
    knn_bank_labels: torch.Tensor
    knn_test_images: torch.Tensor
    knn_test_labels: torch.Tensor
    knn_split: str


def _all_images(data: ImageDataset, indices: torch.Tensor, show: bool) -> torch.Tensor:
    """The images ``indices`` of ``data`` as one uint8 tensor (decoding lazily stored images in chunks)."""
    if isinstance(data, TensorImageDataset):
        return data.images[indices]
    if data.image_size is None:
        raise ValueError(f"the images of {data.name} differ in size; pass --image-size to resize them to one size")
    chunks = [indices[i:i + 256] for i in range(0, len(indices), 256)]
    return torch.cat([data.get_batch(chunk) for chunk in tqdm(chunks, desc=f"decoding {data.name}", unit="chunk",
                                                              disable=not show, delay=2.0)])


def _held_out_split(args: argparse.Namespace) -> ImageDataset | None:
    """The split the k-NN queries come from, or None when the data set has a single split."""
    key = args.data.lower()
    if key in ("cifar10", "cifar100"):
        return load_dataset(key, "test", root=args.data_root)
    if key in ARCHIVE_DATASETS:
        return None
    for split in ("val", "test"):
        if (Path(args.data).expanduser() / split).is_dir():
            return load_dataset(args.data, split, image_size=args.image_size)
    return None


def load_training_data(args: argparse.Namespace, device: torch.device, show: bool) -> TrainingData:
    key = args.data.lower()
    if key in ARCHIVE_DATASETS:
        train_split = ARCHIVE_DATASETS[key][0][0]
        train = load_dataset(key, train_split, root=args.data_root)
    else:
        train = load_dataset(args.data, "train", image_size=args.image_size)
    held_out = _held_out_split(args)
    n = len(train)
    pick = torch.Generator().manual_seed(mixed_seed(args.seed, 1))
    if args.train_size is not None:
        if not 2 <= args.train_size <= n:
            raise ValueError(f"--train-size must lie in 2..{n} (the training split's size), got {args.train_size}")
        train_indices = torch.randperm(n, generator=pick)[:args.train_size].sort().values
    else:
        train_indices = torch.arange(n)
    knn_order = torch.randperm(n, generator=torch.Generator().manual_seed(mixed_seed(args.seed, 2)))
    bank = knn_order[:min(args.knn_train_size, n)].sort().values
    if held_out is not None:
        test_order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(mixed_seed(args.seed, 3)))
        test = test_order[:min(args.knn_test_size, len(held_out))].sort().values
        test_source, knn_split = held_out, f"bank: {train.split or 'train'}, queries: {held_out.split}"
    else:
        # A single split: bank and queries are disjoint subsets of it.
        bank = knn_order[:min(args.knn_train_size, n // 2)].sort().values
        test = knn_order[len(bank):len(bank) + min(args.knn_test_size, n - len(bank))].sort().values
        test_source, knn_split = train, f"disjoint subsets of {train.split or 'the only split'}"
    labels = torch.as_tensor(train.labels)
    return TrainingData(
        images=_all_images(train, train_indices, show).to(device),
        description=train.description,
        num_classes=len(train.class_names),
        knn_bank_images=_all_images(train, bank, show).to(device),
        knn_bank_labels=labels[bank].to(device),
        knn_test_images=_all_images(test_source, test, show).to(device),
        knn_test_labels=torch.as_tensor(test_source.labels)[test].to(device),
        knn_split=knn_split,
    )


# ----------------------------------------------------------------------------- model, loss, optimiser


def parse_dims(text: str) -> list[int]:
    try:
        dims = [int(part) for part in text.split("-")]
    except ValueError:
        raise ValueError(f"--projector must be sizes joined by '-', e.g. 2048-2048-2048, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise ValueError(f"--projector sizes must be positive integers, got {text!r}")
    return dims


def build_model(args: argparse.Namespace, image_side: int) -> SSLModel:
    """The backbone (CIFAR stem on images of 64 px or less) and the method's projector."""
    small = image_side <= 64
    stem = "cifar" if small else "imagenet"
    backbone, dim = build_backbone(args.arch, stem=stem, cifar_padding=args.cifar_padding, width=args.width)
    dims = parse_dims(args.projector)
    pre_feature = None
    if args.method == "emp-ssl":
        # EMP-SSL: h -> Linear-BN-ReLU (pre_feature) -> Linear-BN-ReLU-Linear -> L2 normalisation.
        pre_feature = nn.Sequential(nn.Linear(dim, args.pre_feature), nn.BatchNorm1d(args.pre_feature),
                                    nn.ReLU(inplace=True))
        projector = build_mlp([args.pre_feature, *dims])
        projector.append(L2Normalize())
    else:
        projector = build_mlp([dim, *dims])
    key = args.data.lower()
    if key in SOLO_LEARN_MEAN_STD:
        mean, std = SOLO_LEARN_MEAN_STD[key]
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    preprocess = Preprocess(input_size=args.input_size, mean=tuple(mean), std=tuple(std))
    info = ModelInfo(method=args.method, arch=args.arch, stem=stem, cifar_padding=args.cifar_padding if small else None,
                     width=args.width, embedding_dim=dim, projector_dims=[args.pre_feature if pre_feature else dim, *dims],
                     pre_feature_dims=[dim, args.pre_feature] if pre_feature else None,
                     projection_normalized=args.method == "emp-ssl")
    return SSLModel(backbone, projector, pre_feature, preprocess, info)


def build_loss(method: str) -> nn.Module:
    return {"bagssl": BagSSLLoss, "emp-ssl": EMPSSLLoss, "vicreg": VICRegLoss, "simclr": NTXentLoss}[method]()


def method_loss(method: str, loss: nn.Module, z: torch.Tensor) -> LossOutput:
    """The loss of projections ``z`` (``B x crops x D``): a bag of patches, or a pair of views."""
    if method in PATCH_METHODS:
        return loss(z)
    return loss(z[:, 0], z[:, 1])


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in facebookresearch/vicreg; groups with ``lars_exclude=True`` (biases and
    norm weights) get neither weight decay nor the trust-ratio adaptation.

    The exclusion is a plain flag of the parameter group (vicreg stores a function there), so the
    optimizer state loads with ``weights_only=True``.
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(param_norm > 0.0,
                                        torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one), one)
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(args: argparse.Namespace, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # Biases and norm weights are the 1-D parameters (vicreg's exclude_bias_and_norm).
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    if args.optimizer == "lars":
        return LARS([{"params": weights}, {"params": others, "lars_exclude": True}], lr=lr,
                    weight_decay=args.weight_decay)
    groups = [{"params": weights}, {"params": others, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=args.weight_decay)


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``peak / 1000`` at ``total_steps`` (vicreg's schedule)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    end = peak * 0.001
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- one step


@dataclass
class CropPlan:
    """Where the crops of a step are cut: fixed-scale patches or RandomResizedCrop views, how many per image."""

    method: str
    seed: int
    num_crops: int
    patch_size: int | None
    min_scale: float
    max_scale: float

    def boxes(self, epoch: int, image_ids: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        seed = mixed_seed(self.seed, 4, epoch)
        if self.method in PATCH_METHODS:
            sampler = random_fixed(self.num_crops, self.patch_size, seed=seed)
        else:
            sampler = random_resized(self.num_crops, scale=(self.min_scale, self.max_scale), seed=seed)
        return sampler.boxes(image_ids.cpu(), image_size)


def crops_of(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Float ``[0, 1]`` crops ``(B * P) x 3 x size x size`` of uint8 images ``B x 3 x H x W``."""
    return crop_patches(images.float().div_(255), boxes.to(images.device), size)


@torch.no_grad()
def central_embeddings(model: SSLModel, images: torch.Tensor, size: int, amp: bool, batch: int = 512) -> torch.Tensor:
    """Embeddings ``h`` of the central view of uint8 images (the k-NN monitor's features)."""
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        boxes = central().boxes(list(range(len(chunk))), tuple(chunk.shape[-2:]))
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            outputs.append(model.embed(_device_layout(crops_of(chunk, boxes, size))).float())
    model.train(was_training)
    return torch.cat(outputs)


def _device_layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cuda" else x


def knn_top1(model: SSLModel, data: TrainingData, size: int, amp: bool) -> float:
    bank = central_embeddings(model, data.knn_bank_images, size, amp)
    queries = central_embeddings(model, data.knn_test_images, size, amp)
    return knn_accuracy(bank, data.knn_bank_labels, queries, data.knn_test_labels, data.num_classes, k=KNN_K,
                        temperature=KNN_TEMPERATURE)


# ----------------------------------------------------------------------------- checkpoints and logs


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    # RNG states must be CPU byte tensors, whatever map_location the file was read with.
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _resolve_defaults(args: argparse.Namespace, image_side: int) -> None:
    """Fill the per-method and per-data defaults in ``args`` (so that the log records the values used)."""
    small = image_side <= 64
    if args.input_size is None:
        args.input_size = 32 if small else 224
    if args.projector is None:
        args.projector = (DEFAULT_PROJECTOR if small else DEFAULT_PROJECTOR_LARGE)[args.method]
    if args.patch_size is None:
        args.patch_size = 16 if small else 32
    if args.base_lr is None:
        args.base_lr = DEFAULT_BASE_LR[args.method]
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY[args.method]
    if args.blur_p is None:
        args.blur_p = 0.0 if args.input_size <= 64 else 0.5


def _check_args(args: argparse.Namespace, world_size: int, image_size: tuple[int, int]) -> None:
    if args.batch_size < 2 or args.batch_size % world_size:
        raise ValueError(f"--batch-size ({args.batch_size}) must be at least 2 and divisible by the number of "
                         f"processes ({world_size})")
    if args.batch_size // world_size < 2:
        raise ValueError("each process needs at least 2 images per step (the losses compare images of a batch)")
    if args.method in PATCH_METHODS:
        if args.num_patches < 2:
            raise ValueError(f"--num-patches must be at least 2 (patches of one image are the positives), "
                             f"got {args.num_patches}")
        if not 1 <= args.patch_size <= min(image_size):
            raise ValueError(f"--patch-size must lie in 1..{min(image_size)} for {image_size[0]}x{image_size[1]} "
                             f"images, got {args.patch_size}")
    if not 0 < args.min_scale <= args.max_scale <= 1:
        raise ValueError(f"need 0 < --min-scale <= --max-scale <= 1, got {args.min_scale} and {args.max_scale}")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")


def command_line(args: argparse.Namespace) -> str:
    """The command that runs ``args`` (every flag that differs from its default; ``--resume`` left out)."""
    parts = ["python -m ssl_patch_analysis.train"]
    for action in build_parser()._actions:
        if not action.option_strings or action.dest in ("help", "resume"):
            continue
        value = getattr(args, action.dest, action.default)
        if value != action.default:
            parts.append(action.option_strings[0] if isinstance(value, bool) else f"{action.option_strings[0]} {value}")
    return " ".join(parts)


def _nonfinite_message(step: int, record: torch.Tensor, names: list[str]) -> str:
    values = ", ".join(f"{name}={value:.4g}" for name, value in zip(names, record.tolist()))
    return (f"the loss became NaN or infinite at step {step} ({values}); stopping. The last good checkpoint is kept. "
            "Try a lower --lr / --base-lr or a longer --warmup-epochs, and check that the images are valid.")


# ----------------------------------------------------------------------------- the loop


def train(args: argparse.Namespace) -> Path:
    """Run the training described by ``args`` (from :func:`build_parser`); returns the checkpoint path.

    Raises :class:`TrainingDiverged` when the loss becomes NaN or infinite.
    """
    # Plain values only: args go into the JSON log and into resume.pt (read with weights_only=True).
    args = argparse.Namespace(**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    args.command = command_line(args)
    processes = setup_processes(args.device)
    try:
        return _train(args, processes)
    finally:
        if processes.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(args: argparse.Namespace, processes: Processes) -> Path:
    start_time = time.time()
    device, main = processes.device, processes.main
    data = load_training_data(args, device, show=main)
    image_size = (int(data.images.shape[2]), int(data.images.shape[3]))
    _resolve_defaults(args, min(image_size))
    _check_args(args, processes.world_size, image_size)
    data_name = Path(args.data).name if args.data.lower() not in ARCHIVE_DATASETS else args.data.lower()
    out = Path(args.out or f"runs/{args.method}-{args.arch}-{data_name}")
    checkpoint_path, resume_path, log_path = out / "checkpoint.pt", out / "resume.pt", out / "log.jsonl"

    amp = device.type == "cuda"
    torch.manual_seed(args.seed)
    model = build_model(args, min(image_size)).to(device)
    # A plain copy on the CPU that checkpoints are written from: SyncBatchNorm layers (several GPUs)
    # are not the BatchNorm1d the checkpoint format describes, but their state_dicts are the same.
    export_model = build_model(args, min(image_size))
    if amp:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(data.images) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the training set ({len(data.images)} images)")
    peak_lr = args.lr if args.lr is not None else args.base_lr * args.batch_size / 256
    optimizer = build_optimizer(args, model, peak_lr)

    start_epoch, step, previous_wall = 0, 0, 0.0
    if args.resume:
        if not resume_path.is_file():
            raise FileNotFoundError(f"--resume: {resume_path} does not exist; run without --resume to start")
        state = torch.load(resume_path, map_location=device, weights_only=True)
        changed = [k for k in RESUME_FIXED_ARGS if state["args"].get(k) != getattr(args, k)]
        if changed:
            raise ValueError("--resume needs the settings of the run it continues; these differ: " + ", ".join(
                f"{k} (was {state['args'].get(k)!r}, now {getattr(args, k)!r})" for k in changed))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, previous_wall = int(state["epoch"]), int(state["step"]), float(state["wall_time_s"])
        _restore_rng_states(state["rng"])
    elif checkpoint_path.exists():
        raise FileExistsError(f"{checkpoint_path} exists: pass --resume to continue that run, or another --out")

    if main:
        out.mkdir(parents=True, exist_ok=True)
        _append_log(log_path, {"command": args.command, "args": vars(args),
                               "resumed_from_epoch": start_epoch if args.resume else None,
                               "data": data.description, "train_images": len(data.images), "knn": data.knn_split,
                               "world_size": processes.world_size, "device": _device_name(device)})

    ssl_model = model
    if processes.world_size > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ssl_model = model
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = build_loss(args.method)
    crop_plan = CropPlan(args.method, args.seed, args.num_patches if args.method in PATCH_METHODS else 2,
                         args.patch_size, args.min_scale, args.max_scale)
    augmentation = Augmentation(blur_p=args.blur_p, solarize_p=args.solarize_p)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))
    local_batch = args.batch_size // processes.world_size
    term_names: list[str] = []
    stopped_early = None

    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        model.train()
        order = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(mixed_seed(args.seed, 5, epoch)))
        # This rank's images of every step, and all their boxes drawn at once: one vectorised
        # sampler call per epoch instead of CPU work between the steps.
        epoch_ids = order[:steps_per_epoch * args.batch_size].view(steps_per_epoch, processes.world_size, local_batch)
        epoch_ids = epoch_ids[:, processes.rank]
        epoch_boxes = crop_plan.boxes(epoch, epoch_ids.reshape(-1), image_size).to(device)
        epoch_boxes = epoch_boxes.view(steps_per_epoch, local_batch, crop_plan.num_crops, 4)
        epoch_ids = epoch_ids.to(device)
        records = torch.zeros(steps_per_epoch, 8, device=device)
        checked = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not main, leave=False)
        for i in bar:
            lr = learning_rate(step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator = torch.Generator(device=device).manual_seed(mixed_seed(args.seed, 6, step, processes.rank))
            crops = crops_of(data.images[epoch_ids[i]], epoch_boxes[i], args.input_size)
            crops = _device_layout(augmentation(crops, generator))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                z = model(crops)["z"]
            output = method_loss(args.method, loss_fn, z.float().view(local_batch, crop_plan.num_crops, -1))
            optimizer.zero_grad(set_to_none=True)
            output.total.backward()
            optimizer.step()
            term_names = ["loss", *output.terms]
            records[i, :len(term_names)] = torch.stack([output.total.detach(), *output.terms.values()])
            step += 1
            if (i + 1) % CHECK_EVERY == 0 or i + 1 == steps_per_epoch:
                _check_finite(records[checked:i + 1], step - (i + 1 - checked), term_names, processes)
                checked = i + 1
                if main:
                    bar.set_postfix(loss=f"{float(records[i, 0]):.4g}",
                                    img_s=f"{(i + 1) * args.batch_size / (time.time() - epoch_start):.0f}")
        bar.close()

        if not all(bool(torch.isfinite(p).all()) for p in ssl_model.parameters()):
            raise TrainingDiverged(f"the weights became NaN or infinite during epoch {epoch + 1} although the loss "
                                   "stayed finite; the last good checkpoint is kept. Try a lower --lr / --base-lr.")
        train_time = time.time() - epoch_start
        mean_terms = records[:, :len(term_names)].mean(dim=0)
        if processes.world_size > 1:
            dist.all_reduce(mean_terms)
            mean_terms /= processes.world_size
        elapsed = time.time() - start_time
        last_epoch = epoch + 1 == args.epochs
        if args.time_limit is not None and not last_epoch:
            # Stop when another epoch like this one would cross the limit; rank 0's clock decides for all.
            stop = torch.tensor([float(elapsed + train_time > args.time_limit)], device=device)
            if processes.world_size > 1:
                dist.broadcast(stop, src=0)
            if bool(stop.item()):
                stopped_early = f"time limit of {args.time_limit:g} s"
        finishing = last_epoch or stopped_early is not None
        if main:
            knn = None
            if finishing or (args.knn_every > 0 and (epoch + 1) % args.knn_every == 0):
                knn = knn_top1(ssl_model, data, args.input_size, amp)
            wall = previous_wall + time.time() - start_time
            record = {"epoch": epoch + 1, "step": step, "lr": lr,
                      **{name: float(v) for name, v in zip(term_names, mean_terms.tolist())},
                      "images_per_s": steps_per_epoch * args.batch_size / train_time, "epoch_time_s": train_time,
                      "knn_top1": knn, "wall_time_s": wall}
            if processes.world_size > 1:
                record["rank_param_max_diff"] = _rank_param_max_diff(ssl_model)
            train_info = _train_info(args, data, epoch + 1, peak_lr, wall, device, knn, stopped_early)
            export_model.load_state_dict(ssl_model.state_dict())
            save_checkpoint(export_model, checkpoint_path, train=train_info)
            atomic_torch_save({"model": ssl_model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                          "step": step, "rng": _rng_states(), "args": vars(args), "wall_time_s": wall}, resume_path)
            _append_log(log_path, record)
            tqdm.write(f"epoch {epoch + 1}/{args.epochs}  loss {record['loss']:.4g}  lr {lr:.3g}  "
                       f"{record['images_per_s']:.0f} img/s  k-NN top-1 "
                       f"{'-' if knn is None else f'{knn:.2f}%'}  ({train_time:.1f} s)")
        elif processes.world_size > 1:
            _rank_param_max_diff(ssl_model)
        if processes.world_size > 1:
            dist.barrier()
        if stopped_early:
            if main:
                print(f"stopping after epoch {epoch + 1}: {stopped_early}; continue with --resume")
            break
    if main:
        print(f"checkpoint: {checkpoint_path}")
    return checkpoint_path


def _check_finite(records: torch.Tensor, first_step: int, names: list[str], processes: Processes) -> None:
    """Raise TrainingDiverged naming the first step whose loss terms are not finite (on any rank)."""
    bad = ~torch.isfinite(records[:, :len(names)]).all(dim=1)
    flag = bad.any().float().view(1)
    if processes.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        if not bool(bad.any()):
            raise TrainingDiverged(f"the loss became NaN or infinite on another process near step {first_step}; "
                                   "stopping. Try a lower --lr / --base-lr.")
        index = int(bad.nonzero()[0])
        raise TrainingDiverged(_nonfinite_message(first_step + index, records[index, :len(names)], names))


def _rank_param_max_diff(model: nn.Module) -> float:
    """Largest difference between rank 0's parameters and any rank's (0 when the processes are in sync)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max().view(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def _train_info(args: argparse.Namespace, data: TrainingData, epochs_done: int, peak_lr: float, wall: float,
                device: torch.device, knn: float | None, stopped_early: str | None) -> dict[str, Any]:
    """What made the model, stored in its checkpoint's ``train`` dict (plain values only)."""
    patch = args.method in PATCH_METHODS
    return {
        "method": args.method, "arch": args.arch, "width": args.width, "data": data.description,
        "train_images": len(data.images), "input_size": args.input_size,
        "patch_size": args.patch_size if patch else None, "num_patches": args.num_patches if patch else None,
        "min_scale": None if patch else args.min_scale, "max_scale": None if patch else args.max_scale,
        "projector": args.projector, "epochs": epochs_done, "epochs_planned": args.epochs,
        "batch_size": args.batch_size, "lr": peak_lr, "base_lr": args.base_lr, "optimizer": args.optimizer,
        "weight_decay": args.weight_decay, "seed": args.seed, "wall_time_s": wall, "device": _device_name(device),
        "knn_top1": knn, "knn": f"weighted k-NN k={KNN_K} T={KNN_TEMPERATURE}, central view, {data.knn_split}",
        "stopped_early": stopped_early, "command": args.command,
    }


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except TrainingDiverged as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
