"""Train BagSSL, EMP-SSL, VICReg or SimCLR from scratch: one readable loop, as in vicreg's main_vicreg.py.

The patch methods (``bagssl``, ``emp-ssl``) cut ``--num-patches`` fixed-scale patches of side
``--patch-size`` at random positions out of every image; the baselines (``vicreg``, ``simclr``)
take two ``RandomResizedCrop(--min-scale, --max-scale)`` views. Every crop is resized to the
model's input size (32 px on CIFAR, 224 px otherwise) and colour-augmented on its own. What
differs between the methods (loss, crops, projector, optimiser and augmentation defaults) is one
row of :data:`METHODS`.

Everything runs on the device: the whole uint8 training set is copied there once, batches are
indexed there, crops are cut by ``roi_align`` (:func:`.extract.crop_checked_patches`, the boxes of
an epoch checked once on the CPU) and augmented by :class:`.augment.Augmentation`; the step never
waits for the device (the loss is checked for NaN one interval behind). ``channels_last`` on every
device; bf16 autocast (``--amp``) by default on CUDA and on CPUs with bf16 units (AMX, AVX512-BF16);
``--compile`` runs the model through ``torch.compile``.

Each epoch writes, in ``--run-dir`` (``TrainConfig.out``):

- ``checkpoint.pt``: the model in the project's own format (``load_model`` reads it), its
  ``train`` dict saying how it was made;
- ``resume.pt``: what ``--resume`` needs to continue exactly (model and optimizer state, epoch,
  step, RNG states, config, the checkpoint's ``train`` dict and a copy of the log), plain tensors
  and values so that ``weights_only=True`` loads it; the previous one is kept as
  ``resume.prev.pt``. Within an epoch it is also written every ``--save-every`` seconds (default
  600) and when ``--time-limit`` stops the run there, with the epoch's progress (steps done, every
  rank's loss terms so far): a run of one long epoch (EMP-SSL's recipe on a CPU) loses at most
  that much when it is killed, and resumes at that step;
- ``log.jsonl``: a header line (command line and config), then one record per epoch (loss terms,
  learning rate, images/s, epoch time, online weighted k-NN top-1); each line carries the ``crc32``
  of its own content (:func:`read_log` checks it). The online k-NN (``--knn-protocol``) embeds a
  fixed subset of training images as the bank and of test images as queries: for the patch methods
  each image as the mean of 16 patches at the pretraining scale (the measure their model cards
  judge), for the others its central view.

The run folder checks itself: checkpoints and resume states carry a sha256 of their contents. On
``--resume`` a damaged ``resume.pt`` falls back to ``resume.prev.pt`` (the steps after it are
trained again, with the same bits), a damaged or missing ``checkpoint.pt`` is rewritten from the
resume state (from one written within an epoch: at that epoch's end), and damaged log lines are
restored from its copy, each said in one line on stderr.

Randomness is a function of ``(--seed, epoch)`` for the data order and the crops, and of
``(--seed, step, rank)`` for the colour augmentation, so a resumed run takes the same steps as an
uninterrupted one. Several GPUs: ``torchrun --nproc_per_node=K -m ssl_patch_analysis.train ...``
(``--batch-size`` is the global batch, split over the ranks).

From Python, :func:`train` takes a :class:`TrainConfig`::

    train(TrainConfig(method="emp-ssl", epochs=1, schedule_epochs=2, batch_size=100, num_patches=20))

    python -m ssl_patch_analysis.train --method bagssl --data cifar10 --epochs 100
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import platform
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from . import cli
from .allocator import KEPT, MALLOC_ENV, keep_freed_memory, malloc_description
from .augment import Augmentation, default_blur_kernel_size
from .checkpoints import (
    CHECKSUM_KEY,
    SOLO_LEARN_MEAN_STD,
    DamagedCheckpointError,
    atomic_torch_save,
    load_model,
    read_checkpoint,
    save_checkpoint,
    verify_checksum,
    with_checksum,
)
from .data import ARCHIVE_DATASETS, ImageDataset, TensorImageDataset, load_dataset
from .errors import disk_full, is_disk_full
from .evaluate import PatchScale, protocol_sampler, protocol_title
from .extract import (
    boxes_are_exact,
    check_boxes,
    cpu_has_bf16,
    crop_checked_patches,
    tensor_sha256,
    warn_if_bf16_is_slow,
)
from .knn import knn_accuracy
from .losses import BagSSLLoss, EMPSSLLoss, LossOutput, NTXentLoss, VICRegLoss
from .models import IMAGENET_MEAN, IMAGENET_STD, L2Normalize, ModelInfo, Preprocess, SSLModel, build_backbone, build_mlp
from .patches import PatchSampler, central, random_fixed, random_resized
from .store import file_sha256

# ResNets, and timm's standard ViTs at the patch sizes used on small and large images.
TRAIN_ARCHS = ("resnet18", "resnet50", *(f"vit_{size}_patch{patch}" for size in ("tiny", "small", "base")
                                         for patch in (4, 8, 16)))

# ----------------------------------------------------------------------------- the methods


@dataclass(frozen=True)
class LarsOptions:
    """The LARS flavour of a method (see :class:`LARS`)."""

    eta: float = 0.001
    clip: bool = False
    nesterov: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """Everything that differs between two methods: the loss, the crops and the defaults of the rest.

    ``projector`` lists the projector's output sizes after the embedding on images of 64 px or
    less, ``projector_large`` on larger ones (after the ``pre_feature`` layer where there is one).
    The learning rate is ``base_lr * batch / 256`` or, where ``base_lr`` is None, the absolute ``lr``.
    ``augmentation`` is the colour augmentation; its ``blur_p`` of None means 0 on inputs of 64 px
    or less and 0.5 on larger ones. ``min_scale`` is the smallest area fraction of the two views'
    random resized crops (vicreg, simclr).
    """

    loss: Callable[[], nn.Module]
    patches: bool
    projector: str
    projector_large: str
    weight_decay: float
    base_lr: float | None = None
    lr: float | None = None
    warmup_epochs: float = 10.0
    batch_size: int = 256
    num_patches: int = 16
    pre_feature: bool = False
    lars: LarsOptions = LarsOptions()
    augmentation: Augmentation = Augmentation()
    blur_p: float | None = None
    min_scale: float = 0.08
    reference: str = ""


# solo-learn's LARS (clip_lr=True, eta 0.02, biases and norms excluded) of its CIFAR VICReg and SimCLR scripts.
SOLO_LEARN_LARS = LarsOptions(eta=0.02, clip=True, nesterov=False)
# solo-learn's CIFAR VICReg colours (scripts/pretrain/cifar/vicreg.yaml): VICReg's jitter, solarization p=0.1.
VICREG_COLOURS = Augmentation(solarize_p=0.1)

METHODS: dict[str, MethodSpec] = {
    "bagssl": MethodSpec(
        loss=BagSSLLoss, patches=True, projector="2048-2048-2048", projector_large="8192-8192-8192",
        base_lr=0.3, weight_decay=1e-4, lars=SOLO_LEARN_LARS, augmentation=VICREG_COLOURS,
        reference="the vicreg row's optimiser and colours (solo-learn's CIFAR VICReg), fixed-scale patches"),
    "emp-ssl": MethodSpec(
        loss=EMPSSLLoss, patches=True, projector="4096-1024", projector_large="4096-1024", pre_feature=True,
        lr=0.3, weight_decay=1e-4, warmup_epochs=0.0, batch_size=100, num_patches=20,
        lars=LarsOptions(eta=0.005, clip=True, nesterov=True),
        augmentation=Augmentation(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2, solarize_p=0.1),
        blur_p=0.1,
        reference="tsb0601/EMP-SSL main.py and dataset/aug.py: batch 100, lr 0.3 (not scaled), no warm-up, "
                  "SGD-Nesterov in solo-learn's clipped LARS (eta 0.005), ColorJitter(0.4, 0.4, 0.4, 0.2), "
                  "blur and solarize p=0.1"),
    "vicreg": MethodSpec(
        loss=VICRegLoss, patches=False, projector="2048-2048-2048", projector_large="8192-8192-8192",
        base_lr=0.3, weight_decay=1e-4, lars=SOLO_LEARN_LARS, augmentation=VICREG_COLOURS, min_scale=0.2,
        reference="solo-learn's scripts/pretrain/cifar/vicreg.yaml: crops (0.2, 1), VICReg's jitter, solarize "
                  "p=0.1, LARS eta 0.02 clipped"),
    "simclr": MethodSpec(
        loss=functools.partial(NTXentLoss, temperature=0.2), patches=False, projector="2048-256",
        projector_large="2048-256", base_lr=0.4, weight_decay=1e-4, lars=SOLO_LEARN_LARS,
        augmentation=Augmentation(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2), blur_p=0.5,
        reference="solo-learn's scripts/pretrain/cifar/simclr.yaml and augmentations/symmetric.yaml: crops "
                  "(0.08, 1), ColorJitter(0.8, 0.8, 0.8, 0.2), blur p=0.5, LARS eta 0.02 clipped"),
}
PATCH_METHODS = tuple(name for name, spec in METHODS.items() if spec.patches)


def _jitter_of(augmentation: Augmentation) -> tuple[float, float, float, float]:
    """An augmentation's colour jitter as ``--jitter`` gives it: brightness, contrast, saturation, hue."""
    return augmentation.brightness, augmentation.contrast, augmentation.saturation, augmentation.hue


@dataclass
class TrainConfig:
    """A training run; the command-line flags are these fields (``--batch-size`` is ``batch_size``).

    Fields left at None take the method's default (:data:`METHODS`) or the data's (32 px inputs on
    images of 64 px or less, else 224) when the run starts; the log and the checkpoint record the
    values used.
    """

    method: str = "bagssl"
    data: str = "cifar10"
    data_root: str | None = None
    image_size: int = 224
    skip_bad_images: bool = False
    train_size: int | None = None
    arch: str = "resnet18"
    width: float = 1.0
    cifar_padding: int = 1
    input_size: int | None = None
    projector: str | None = None
    pre_feature: int = 4096
    patch_size: int | None = None
    num_patches: int | None = None
    min_scale: float | None = None
    max_scale: float = 1.0
    jitter: tuple[float, float, float, float] | None = None
    blur_p: float | None = None
    blur_kernel_size: int | None = None
    solarize_p: float | None = None
    epochs: int = 100
    schedule_epochs: int | None = None
    batch_size: int | None = None
    base_lr: float | None = None
    lr: float | None = None
    optimizer: str = "lars"
    lars_eta: float | None = None
    lars_clip: bool | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    amp: bool | None = None
    compile: bool = False
    device: str | None = None
    seed: int = 0
    init_from: str | None = None
    out: str | None = None
    resume: bool = False
    time_limit: float | None = None
    save_every: float = 600.0
    knn_every: int = 1
    knn_train_size: int = 5000
    knn_test_size: int = 1000
    knn_protocol: str | None = None
    command: str | None = field(default=None, repr=False)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace | TrainConfig) -> TrainConfig:
        if isinstance(args, TrainConfig):
            return dataclasses.replace(args)
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in names}
        if getattr(args, "scale", None) is not None:  # --scale MIN,MAX
            values["min_scale"], values["max_scale"] = args.scale
        return cls(**values)

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    def resolve(self, image_side: int, device: torch.device) -> None:
        """Fill the fields left at None with the method's and the data's defaults."""
        spec, small = self.spec, image_side <= 64
        if self.input_size is None:
            self.input_size = 32 if small else 224
        if self.projector is None:
            self.projector = spec.projector if small else spec.projector_large
        if self.patch_size is None:
            self.patch_size = 16 if small else 32
        if self.num_patches is None:
            self.num_patches = spec.num_patches
        if self.batch_size is None:
            self.batch_size = spec.batch_size
        if self.base_lr is None and self.lr is None:
            self.base_lr, self.lr = spec.base_lr, spec.lr
        if self.weight_decay is None:
            self.weight_decay = spec.weight_decay
        if self.warmup_epochs is None:
            self.warmup_epochs = spec.warmup_epochs
        if self.blur_p is None:
            self.blur_p = spec.blur_p if spec.blur_p is not None else (0.0 if self.input_size <= 64 else 0.5)
        if self.blur_kernel_size is None:
            self.blur_kernel_size = default_blur_kernel_size(self.input_size, spec.augmentation.blur_sigma[1])
        if self.solarize_p is None:
            self.solarize_p = spec.augmentation.solarize_p
        if self.min_scale is None:
            self.min_scale = spec.min_scale
        if self.jitter is None:
            self.jitter = _jitter_of(spec.augmentation)
        if self.lars_eta is None:
            self.lars_eta = spec.lars.eta
        if self.lars_clip is None:
            self.lars_clip = spec.lars.clip
        if self.amp is None:
            self.amp = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
        elif self.amp:
            warn_if_bf16_is_slow(device)
        if self.knn_protocol is None:
            self.knn_protocol = KNN_PATCHES if spec.patches else "central"
        self.knn_protocol = str(self.knn_protocol).strip().lower()

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    def augmentation(self) -> Augmentation:
        jitter = self.jitter if self.jitter is not None else _jitter_of(self.spec.augmentation)
        brightness, contrast, saturation, hue = jitter
        return dataclasses.replace(self.spec.augmentation, blur_p=self.blur_p, solarize_p=self.solarize_p,
                                   brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                                   blur_kernel_size=self.blur_kernel_size)


# Settings a resumed run must share with the run it continues (the others may change).
RESUME_FIXED_ARGS = ("method", "data", "arch", "width", "cifar_padding", "projector", "pre_feature", "patch_size",
                     "num_patches", "min_scale", "max_scale", "batch_size", "lr", "base_lr", "optimizer",
                     "weight_decay", "warmup_epochs", "seed", "train_size", "input_size", "image_size", "blur_p",
                     "blur_kernel_size", "solarize_p", "jitter", "lars_eta", "lars_clip")
# and the learning-rate schedule's length (--schedule-epochs, else --epochs): --epochs may change on --resume only with
# --schedule-epochs keeping the schedule the run had


def _unrecorded_settings(args: dict[str, Any]) -> dict[str, Any]:
    """What a run started before ``jitter``, ``lars_eta`` and ``lars_clip`` were settings (2026-12-05) used for them:
    every row but emp-ssl had facebookresearch/vicreg's LARS (eta 0.001, unclipped) and VICReg's jitter; and before
    ``blur_kernel_size`` was one (2026-12-07), its blur kernel: about 10% of the input side (5 px at 32 px)."""
    emp_ssl = args.get("method") == "emp-ssl"
    side = args.get("input_size")
    return {"jitter": (0.4, 0.4, 0.4, 0.2) if emp_ssl else (0.4, 0.4, 0.2, 0.1),
            "lars_eta": 0.005 if emp_ssl else 0.001, "lars_clip": emp_ssl,
            "blur_kernel_size": 2 * max(1, round(side * 0.05)) + 1 if isinstance(side, int) else None}


def _schedule_text(config: TrainConfig) -> str:
    """How a resumed run's flags set the schedule's length, for its error."""
    if config.schedule_epochs is not None:
        return f"--schedule-epochs {config.schedule_epochs}"
    return f"--epochs {config.epochs} (the schedule's length without --schedule-epochs)"


def _flags_for(recorded: dict[str, Any], keys: list[str]) -> list[str]:
    """The command-line flags that set ``keys`` to their ``recorded`` values (``command_line``'s formatting)."""
    dests = {"scale" if key in ("min_scale", "max_scale") else key for key in keys}
    return [_flag(action, value) for action in build_parser()._actions if action.dest in dests
            and (value := _flag_value(recorded, action.dest, None)) is not None]


# Steps between checks of the loss for NaN/inf (read one interval late, so the step never waits).
CHECK_EVERY = 10
KNN_K = 20
KNN_TEMPERATURE = 0.07
# The patch methods' online k-NN: the mean of this many patches, the measure their model cards judge (issue 12).
KNN_PATCHES = "16"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _method_table() -> str:
    rows = []
    for name, spec in METHODS.items():
        lr = f"base lr {spec.base_lr} per 256" if spec.base_lr is not None else f"lr {spec.lr}"
        loss_args = "".join(f", {key} {value:g}" for key, value in getattr(spec.loss, "keywords", {}).items())
        a = spec.augmentation
        crops = "patches" if spec.patches else f"two views of scale ({spec.min_scale:g}, 1)"
        blur = f", blur {spec.blur_p:g}" if spec.blur_p else ""
        rows.append(f"{name}: {crops}, projector {spec.projector}, {lr}, wd {spec.weight_decay:g}, LARS eta "
                    f"{spec.lars.eta:g}{' clipped' if spec.lars.clip else ''}, warm-up {spec.warmup_epochs:g}, "
                    f"batch {spec.batch_size}, jitter {a.brightness:g},{a.contrast:g},{a.saturation:g},{a.hue:g}"
                    f"{blur}, solarize {a.solarize_p:g}{loss_args}")
    return "; ".join(rows)


def jitter_strengths(text: str) -> tuple[float, float, float, float]:
    """``--jitter B,C,S,H``: ColorJitter's brightness, contrast, saturation (each >= 0) and hue (0 to 0.5)."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values) or min(values) < 0 or values[3] > 0.5:
        raise argparse.ArgumentTypeError(
            f"expected four numbers BRIGHTNESS,CONTRAST,SATURATION,HUE (each >= 0, hue at most 0.5), e.g. "
            f"0.4,0.4,0.2,0.1; got {text!r}")
    return values  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = cli.ArgumentParser(
        prog="python -m ssl_patch_analysis.train", renamed=cli.RENAMED_FLAGS["train"],
        description="Train a BagSSL / EMP-SSL / VICReg / SimCLR model from scratch (checkpoints in the project's "
                    "own format, resumable, torchrun for several GPUs). Method defaults: " + _method_table(),
        formatter_class=cli.DefaultsHelpFormatter)
    add = parser.add_argument
    add("--method", choices=tuple(METHODS), default=defaults.method,
        help="bagssl/emp-ssl: fixed-scale patches of one image are positives; vicreg/simclr: two multi-scale views")
    add("--data", default=defaults.data,
        help="cifar10, cifar100, imagenette (its only split, val, trains; k-NN uses disjoint subsets of it) or an "
             "image-folder path (<folder>/[train/]<class>/<image>, decoded into memory)")
    add("--data-root", default=None, help="folder holding the data files (default: $SSL_PATCH_ANALYSIS_DATA)")
    add("--image-size", type=cli.positive_int, default=defaults.image_size,
        help="image folders only: resize and centre-crop every image to this")
    add("--skip-bad-images", action="store_true",
        help="image folders only: check every file first and leave out those that cannot be read, listing them "
             "(default: stop at the first, naming it)")
    add("--train-size", type=cli.positive_int, default=None,
        help="train on a fixed random subset of this many images (default: all)")
    add("--arch", choices=TRAIN_ARCHS, default=defaults.arch,
        help="backbone: a ResNet, or a ViT (timm's vit_<size>_patch<P>: tiny 192 wide, small 384, base 768, depth 12; "
             "the crops' side --input-size must be a multiple of P; use --optimizer adamw)")
    add("--width", type=cli.positive_float, default=defaults.width,
        help="channel multiplier of the backbone (0.25: a narrow net for CPUs)")
    add("--cifar-padding", type=int, choices=(1, 2), default=defaults.cifar_padding,
        help="padding of the CIFAR stem's 3x3 conv (used automatically on images of 64 px or less)")
    add("--input-size", type=cli.positive_int, default=None,
        help="side every crop is resized to (default: 32 on 32 px data, else 224)")
    add("--projector", default=None,
        help="projector output sizes after the embedding, e.g. 2048-2048-2048 (default: the method's; emp-ssl's "
             "4096-1024 is L2-normalised and follows its pre_feature layer)")
    add("--pre-feature", type=cli.positive_int, default=defaults.pre_feature,
        help="emp-ssl only: width of the Linear-BN-ReLU pre_feature layer")
    add("--patch-size", type=cli.positive_int, default=None,
        help="bagssl/emp-ssl: side of the fixed-scale patches (default: 16 on 32 px data, 32 on larger images)")
    add("--num-patches", type=cli.positive_int, default=None,
        help="bagssl/emp-ssl: patches per image (default: 16; emp-ssl 20)")
    add("--scale", type=cli.scale_range, default=None, metavar="MIN,MAX",
        help="vicreg/simclr: RandomResizedCrop's area range (default: the method's: vicreg 0.2,1; simclr 0.08,1)")
    add("--jitter", type=jitter_strengths, default=None, metavar="B,C,S,H",
        help="colour jitter's brightness, contrast, saturation, hue (default: the method's: simclr 0.8,0.8,0.8,0.2; "
             "emp-ssl 0.4,0.4,0.4,0.2; others 0.4,0.4,0.2,0.1)")
    add("--blur-p", type=cli.probability, default=None,
        help="Gaussian blur probability (default: emp-ssl 0.1, simclr 0.5; others 0 on 32 px inputs, 0.5 on "
             "larger ones)")
    add("--blur-kernel-size", type=cli.positive_int, default=None, metavar="PX",
        help="Gaussian blur kernel side, odd (default: to 3 sigma of the largest sigma 2 and at least 10%% of the "
             "input: 13 on 32 px inputs, 23 on 224; runs before 2026-12-07 used 5 on 32 px)")
    add("--solarize-p", type=cli.probability, default=None,
        help="solarization probability (default: 0.1; simclr 0)")
    add("--epochs", type=cli.positive_int, default=defaults.epochs, help="epochs to train")
    add("--schedule-epochs", type=cli.positive_int, default=None,
        help="length of the learning-rate schedule in epochs (default: --epochs); EMP-SSL's one-epoch recipe "
             "trains 1 epoch of a 2-epoch schedule")
    add("--batch-size", type=cli.positive_int, default=None,
        help="images per step over all processes, each giving several crops (default: 256; emp-ssl 100)")
    add("--base-lr", type=cli.non_negative_float, default=None,
        help="learning rate per 256 images: lr = base_lr * batch_size / 256 (default: 0.3 for bagssl and vicreg, "
             "0.4 for simclr)")
    add("--lr", type=cli.non_negative_float, default=None,
        help="absolute peak learning rate (overrides --base-lr; default: emp-ssl 0.3, as in EMP-SSL)")
    add("--optimizer", choices=("lars", "sgd", "adamw"), default=defaults.optimizer,
        help="LARS (biases and norm weights get no weight decay and no LARS adaptation; solo-learn's clipped one, "
             "with Nesterov momentum for emp-ssl)")
    add("--lars-eta", type=cli.positive_float, default=None,
        help="LARS trust coefficient (default: 0.02; emp-ssl 0.005)")
    add("--lars-clip", action=argparse.BooleanOptionalAction, default=None,
        help="clip LARS's per-layer rate at the learning rate (solo-learn's clip_lr; default: on); --no-lars-clip "
             "is facebookresearch/vicreg's LARS (eta 0.001 there)")
    add("--weight-decay", type=cli.non_negative_float, default=None, help="weight decay (default: 1e-4)")
    add("--warmup-epochs", type=cli.non_negative_float, default=None,
        help="linear warm-up epochs before the per-step cosine decay (default: 10; emp-ssl 0)")
    cli.add_device_args(parser, cpu_amp_default=True)
    add("--seed", type=cli.non_negative_int, default=defaults.seed,
        help="seed of the initial weights, data order, crops and augmentation")
    add("--init-from", default=None, metavar="CHECKPOINT",
        help="start from this model's weights (a run's checkpoint.pt, a file of pretrained/, or any checkpoint "
             "load_model reads, of the run's --arch/--width/--projector shapes; a backbone-only file leaves the "
             "heads at their random init), with a fresh optimiser and learning-rate schedule; the log and the "
             "checkpoint record its sha256")
    add("--run-dir", dest="out", type=cli.folder, default=None,
        help="the run folder: checkpoint, resume state and log (default: runs/<method>-<arch>-<data>)")
    add("--resume", action="store_true",
        help="continue the run in --run-dir from its last resume state (an epoch's end, or a step within one)")
    add("--time-limit", type=cli.positive_float, default=None,
        help="seconds: stop at the end of the epoch after which another epoch would exceed this (checkpoint "
             "written), or within an epoch before a step would (resume state written; --resume continues)")
    add("--save-every", type=cli.non_negative_float, default=defaults.save_every, metavar="SECONDS",
        help="within an epoch, write the resume state when this long has passed since the last one (a killed run "
             "then loses at most this much; 0: only at epoch ends)")
    add("--knn-every", type=cli.non_negative_int, default=defaults.knn_every,
        help="online k-NN every this many epochs and at the end (0: only at the end)")
    add("--knn-train-size", type=cli.positive_int, default=defaults.knn_train_size,
        help="k-NN bank: this many training images (fixed subset)")
    add("--knn-test-size", type=cli.positive_int, default=defaults.knn_test_size,
        help="k-NN queries: this many test images (fixed subset)")
    add("--knn-protocol", default=None, metavar="PROTOCOL",
        help=f"what the online k-NN embeds, as evaluate's protocols: central (the whole image) or N (the mean of N "
             f"patches at the pretraining scale, drawn as evaluate draws them); default {KNN_PATCHES} for the patch "
             "methods (the measure their model cards judge), central for the others; a resumed run keeps its own")
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
    requested = cli.resolve_device(device_arg)
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


def _held_out_split(config: TrainConfig) -> ImageDataset | None:
    """The split the k-NN queries come from, or None when the data set has a single split."""
    key = config.data.lower()
    if key in ("cifar10", "cifar100"):
        return load_dataset(key, "test", root=config.data_root)
    if key in ARCHIVE_DATASETS:
        return None
    for split in ("val", "test"):
        if (Path(config.data).expanduser() / split).is_dir():
            return load_dataset(config.data, split, image_size=config.image_size,
                                skip_bad_images=config.skip_bad_images)
    return None


KNN_SEED = 0  # the online k-NN's subsets are drawn as for --seed 0, whatever --seed a run has


def load_training_data(config: TrainConfig, device: torch.device, show: bool) -> TrainingData:
    key = config.data.lower()
    if key in ARCHIVE_DATASETS and config.skip_bad_images:
        raise ValueError(f"--skip-bad-images is for image folders: {config.data} is read from an archive, checked as "
                         "a whole (it has no images to leave out); drop the flag")
    if key in ARCHIVE_DATASETS:
        train_split = ARCHIVE_DATASETS[key][0][0]
        train = load_dataset(key, train_split, root=config.data_root)
    else:
        train = load_dataset(config.data, "train", image_size=config.image_size,
                             skip_bad_images=config.skip_bad_images)
    held_out = _held_out_split(config)
    n = len(train)
    pick = torch.Generator().manual_seed(mixed_seed(config.seed, 1))
    if config.train_size is not None:
        if not 2 <= config.train_size <= n:
            raise ValueError(f"--train-size must lie in 2..{n} (the training split's size), got {config.train_size}")
        train_indices = torch.randperm(n, generator=pick)[:config.train_size].sort().values
    else:
        train_indices = torch.arange(n)
    # The online k-NN's bank and queries do not depend on --seed (they are --seed 0's): runs that continue one
    # another with other seeds (other training images) log numbers that compare.
    knn_order = torch.randperm(n, generator=torch.Generator().manual_seed(mixed_seed(KNN_SEED, 2)))
    bank = knn_order[:min(config.knn_train_size, n)].sort().values
    if held_out is not None:
        test_order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(mixed_seed(KNN_SEED, 3)))
        test = test_order[:min(config.knn_test_size, len(held_out))].sort().values
        test_source, knn_split = held_out, f"bank: {train.split or 'train'}, queries: {held_out.split}"
    else:
        # A single split: bank and queries are disjoint subsets of it.
        bank = knn_order[:min(config.knn_train_size, n // 2)].sort().values
        test = knn_order[len(bank):len(bank) + min(config.knn_test_size, n - len(bank))].sort().values
        test_source, knn_split = train, f"disjoint subsets of {train.split or 'the only split'}"
    knn_split += ", the same subsets for every --seed"
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


def build_vit_backbone(arch: str, input_size: int, width: float = 1.0) -> tuple[nn.Module, int]:
    """``vit_<tiny|small|base>_patch<P>``: timm's standard ViT of that size, position embeddings for
    ``input_size``."""
    from .vit import VIT_SIZES, ViTConfig, build_vit  # timm only when a ViT is trained

    match = re.fullmatch(r"vit_(tiny|small|base)_patch(\d+)", arch)
    if match is None:
        raise ValueError(f"unknown ViT {arch!r}: use vit_<tiny|small|base>_patch<P>")
    if width != 1.0:
        raise ValueError(f"--width applies to ResNets only; {arch} has timm's width")
    embed_dim, (_, depth, heads) = next((d, v) for d, v in VIT_SIZES.items() if v[0] == match.group(1))
    patch = int(match.group(2))
    if input_size % patch:
        raise ValueError(f"--input-size {input_size} is not a multiple of {arch}'s patch size {patch}")
    return build_vit(ViTConfig(patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=heads,
                               img_size=input_size))


def build_model(config: TrainConfig | argparse.Namespace, image_side: int) -> SSLModel:
    """The backbone (CIFAR stem on images of 64 px or less, or a ViT) and the method's projector."""
    small = image_side <= 64
    stem = "cifar" if small else "imagenet"
    if config.arch.startswith("vit_"):
        backbone, dim = build_vit_backbone(config.arch, config.input_size, config.width)
        stem = f"patch{backbone.config.patch_size}"
    else:
        backbone, dim = build_backbone(config.arch, stem=stem, cifar_padding=config.cifar_padding,
                                       width=config.width)
    dims = parse_dims(config.projector)
    pre_feature = None
    if METHODS[config.method].pre_feature:
        # EMP-SSL: h -> Linear-BN-ReLU (pre_feature) -> Linear-BN-ReLU-Linear -> L2 normalisation.
        pre_feature = nn.Sequential(nn.Linear(dim, config.pre_feature), nn.BatchNorm1d(config.pre_feature),
                                    nn.ReLU(inplace=True))
        projector = build_mlp([config.pre_feature, *dims])
        projector.append(L2Normalize())
    else:
        projector = build_mlp([dim, *dims])
    key = config.data.lower()
    if key in SOLO_LEARN_MEAN_STD:
        mean, std = SOLO_LEARN_MEAN_STD[key]
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    preprocess = Preprocess(input_size=config.input_size, mean=tuple(mean), std=tuple(std))
    info = ModelInfo(method=config.method, arch=config.arch, stem=stem,
                     cifar_padding=config.cifar_padding if small and stem == "cifar" else None, width=config.width,
                     embedding_dim=dim,
                     projector_dims=[config.pre_feature if pre_feature else dim, *dims],
                     pre_feature_dims=[dim, config.pre_feature] if pre_feature else None,
                     projection_normalized=pre_feature is not None)
    return SSLModel(backbone, projector, pre_feature, preprocess, info)


def build_loss(method: str) -> nn.Module:
    return METHODS[method].loss()


def loss_settings(loss: nn.Module) -> dict[str, Any]:
    """The loss's class and the numbers it was built with (NT-Xent's temperature, VICReg's coefficients...), for the
    log header and the checkpoint: a command line alone does not say them once a method's row changes."""
    numbers = {key: value for key, value in vars(loss).items()
               if not key.startswith("_") and key not in ("training", "gather_distributed")
               and isinstance(value, (bool, int, float, str))}
    return {"name": type(loss).__name__, **numbers}


def method_loss(method: str, loss: nn.Module, z: torch.Tensor) -> LossOutput:
    """The loss of projections ``z`` (``B x crops x D``): a bag of patches, or a pair of views."""
    if METHODS[method].patches:
        return loss(z)
    return loss(z[:, 0], z[:, 1])


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) in two flavours, as one multi-tensor update per group (no per-parameter loop).

    Groups with ``lars_exclude=True`` (biases and norm weights) get neither weight decay nor the
    trust ratio. For the others, with ``u = grad + weight_decay * w``:

    - ``clip=False``, facebookresearch/vicreg's: ``u *= eta * |w| / |u|``;
    - ``clip=True``, solo-learn's ``LARS(clip_lr=True)`` that EMP-SSL wraps around SGD:
      ``u *= min(eta * |w| / (|grad| + weight_decay * |w| + 1e-8) / lr, 1)``;

    (no scaling where ``|w|`` or the denominator is 0), then momentum ``mu = momentum * mu + u``
    and ``w -= lr * mu`` (``w -= lr * (u + momentum * mu)`` with ``nesterov``). The exclusion is a
    plain flag of the group, so the optimizer state loads with ``weights_only=True``.
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001, clip: bool = False, nesterov: bool = False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, clip=clip,
                                      nesterov=nesterov, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars_exclude"]:
                updates = list(grads)
            else:
                updates = self._scaled_updates(params, grads, group)
            moments = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                moments.append(state["mu"])
            torch._foreach_mul_(moments, group["momentum"])
            torch._foreach_add_(moments, updates)
            if group["nesterov"]:
                steps = torch._foreach_add(updates, moments, alpha=group["momentum"])
            else:
                steps = moments
            torch._foreach_add_(params, steps, alpha=-group["lr"])

    @staticmethod
    def _scaled_updates(params: list[torch.Tensor], grads: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        decay, eta, lr = group["weight_decay"], group["eta"], group["lr"]
        param_norms = torch.stack(torch._foreach_norm(params))
        if group["clip"]:
            # solo-learn leaves a gradient of norm 0 (or a weight of norm 0) as it is, without decay.
            grad_norms = torch.stack(torch._foreach_norm(grads))
            usable = (param_norms > 0) & (grad_norms > 0)
            decays = torch._foreach_mul(params, list((decay * usable).unbind()))
            updates = torch._foreach_add(grads, decays)
            trust = torch.clamp(eta * param_norms / (grad_norms + decay * param_norms + 1e-8) / lr, max=1.0)
        else:
            updates = torch._foreach_add(grads, params, alpha=decay)
            update_norms = torch.stack(torch._foreach_norm(updates))
            usable = (param_norms > 0) & (update_norms > 0)
            trust = eta * param_norms / torch.where(usable, update_norms, torch.ones_like(update_norms))
        trust = torch.where(usable, trust, torch.ones_like(trust))
        torch._foreach_mul_(updates, list(trust.unbind()))
        return updates


def build_optimizer(config: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # Biases and norm weights are the 1-D parameters (vicreg's exclude_bias_and_norm).
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    if config.optimizer == "lars":
        return LARS([{"params": weights}, {"params": others, "lars_exclude": True}], lr=lr,
                    weight_decay=config.weight_decay, eta=config.lars_eta, clip=config.lars_clip,
                    nesterov=METHODS[config.method].lars.nesterov)
    groups = [{"params": weights}, {"params": others, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)


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
        if METHODS[self.method].patches:
            sampler = random_fixed(self.num_crops, self.patch_size, seed=seed)
        else:
            sampler = random_resized(self.num_crops, scale=(self.min_scale, self.max_scale), seed=seed)
        return sampler.boxes(image_ids.cpu(), image_size)


def crops_of(images: torch.Tensor, boxes: torch.Tensor, size: int, exact: bool | None = None) -> torch.Tensor:
    """Float ``[0, 1]`` crops ``(B * P) x 3 x size x size`` of uint8 images ``B x 3 x H x W``.

    ``exact`` given means the boxes were checked already (:func:`.extract.check_boxes`) and whether
    they need resampling is known: then nothing here waits for the device.
    """
    pixels = images.float().div_(255)
    if exact is None:
        check_boxes(boxes, images.shape[-2:])
        exact = boxes_are_exact(boxes, size)
    return crop_checked_patches(pixels, boxes, size, exact=exact)


@torch.no_grad()
def monitor_embeddings(model: SSLModel, images: torch.Tensor, size: int, amp: bool, sampler: PatchSampler,
                       batch: int = 512) -> torch.Tensor:
    """The k-NN monitor's features: per uint8 image (``B x 3 x H x W``), the mean of the embeddings ``h`` of the
    ``sampler``'s patches, image ``i`` drawn as image id ``i`` (as :func:`.evaluate.protocol_features` draws them
    for a data set of these images); ``batch`` patches at a time."""
    was_training = model.training
    model.eval()
    image_size = tuple(images.shape[-2:])
    per_image = sampler.num_patches(image_size)
    step = max(1, batch // per_image)
    outputs = []
    for start in range(0, len(images), step):
        chunk = images[start:start + step]
        boxes = sampler.boxes(list(range(start, start + len(chunk))), image_size)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            embedded = model.embed(_device_layout(crops_of(chunk, boxes, size))).float()
        outputs.append(embedded.view(len(chunk), per_image, -1).mean(dim=1))
    model.train(was_training)
    return torch.cat(outputs)


def _device_layout(x: torch.Tensor) -> torch.Tensor:
    # channels_last on every device: oneDNN's CPU convolutions are faster in it too (benchmarks/RESULTS.md,
    # training throughput), as cuDNN's are under autocast.
    return x.contiguous(memory_format=torch.channels_last)


def knn_sampler(config: TrainConfig) -> PatchSampler:
    """The patches the online k-NN embeds (``--knn-protocol``), at the run's own pretraining scale."""
    scale = (PatchScale(patch_size=config.patch_size) if config.spec.patches
             else PatchScale(scale=(config.min_scale, config.max_scale)))
    return protocol_sampler(str(config.knn_protocol or "central"), scale)


def knn_top1(model: SSLModel, data: TrainingData, size: int, amp: bool, sampler: PatchSampler | None = None) -> float:
    """Weighted k-NN top-1 (%) of the fixed queries against the fixed bank, each image embedded as the mean of
    ``sampler``'s patches (default the central view)."""
    sampler = central() if sampler is None else sampler
    bank = monitor_embeddings(model, data.knn_bank_images, size, amp, sampler)
    queries = monitor_embeddings(model, data.knn_test_images, size, amp, sampler)
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


def log_line(record: dict[str, Any]) -> str:
    """One line of ``log.jsonl``: the record and the crc32 of its JSON, so that a changed digit is seen."""
    text = json.dumps(record)
    return json.dumps({**record, "crc32": f"{zlib.crc32(text.encode()):08x}"}) + "\n"


def _log_line_problem(raw: bytes, crc_required: bool) -> tuple[dict[str, Any] | None, str | None]:
    """A log line's record without its crc32, or what is wrong with the line."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "not JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    crc = record.pop("crc32", None)
    if crc is None:
        return (None, "no crc32") if crc_required else (record, None)
    if crc != f"{zlib.crc32(json.dumps(record).encode()):08x}":
        return None, "crc32 mismatch"
    return record, None


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``log.jsonl`` (header lines included), each line's crc32 checked and left out.

    Lines written before lines had a crc32 are read as they are: a whole old log, or the lines before the first
    run with a crc32 (a run started by an older trainer and resumed by this one, whose new header has one); every
    line of that run and after it must carry one, its header included (a header whose key was damaged is not taken
    for an older line). A damaged line raises ``ValueError`` naming the file and the line.
    """
    path = Path(path)
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    first_crc = next((n for n, line in enumerate(lines, 1) if b'"crc32": ' in line), len(lines) + 1)
    # A run's lines follow its header: the run of the first line with a crc32 begins at the header before it.
    while 1 < first_crc <= len(lines) and b'"command": ' not in lines[first_crc - 1]:
        first_crc -= 1
    records = []
    for number, raw in enumerate(lines, 1):
        record, problem = _log_line_problem(raw, number >= first_crc)
        if problem is not None:
            raise ValueError(f"{path} line {number} is damaged ({problem}): if its run folder still holds "
                             "resume.pt, run the train command again with --resume to restore it")
        records.append(record)
    return records


def _append_log(path: Path, line: str) -> None:
    """One record appended to log.jsonl (after the resume state, which holds a copy of the log: --resume restores a
    line a full disk kept out)."""
    try:
        with open(path, "a") as f:
            f.write(line)
    except OSError as error:
        if not is_disk_full(error):
            raise
        raise disk_full(path.parent, f"{path.name}'s last line", "the resume state holds a copy of the log",
                        "free some space, then continue the run with --resume (it restores the line)") from error


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    bf16 = "bf16 units" if cpu_has_bf16() else "no bf16 units"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {bf16})"


# The command line's number types: TrainConfig built in Python is checked by the same functions (one list of bounds).
_NUMBER_TYPES = (cli.positive_int, cli.non_negative_int, cli.positive_float, cli.non_negative_float, cli.probability)


def _check_values(config: TrainConfig) -> None:
    """The settings that need no data, checked before the run folder is made by the flag types of
    :func:`build_parser` (the command line checks them while parsing; this is for :class:`TrainConfig` built in
    Python)."""
    for action in build_parser()._actions:
        value = getattr(config, action.dest, None)
        if action.type not in _NUMBER_TYPES or value is None:
            continue
        try:
            action.type(repr(value) if isinstance(value, float) else str(value))
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"{action.option_strings[0]} must be {str(error).removeprefix('expected ')}") from None


def _check_args(config: TrainConfig, world_size: int, image_size: tuple[int, int]) -> None:
    if config.batch_size < 2 or config.batch_size % world_size:
        raise ValueError(f"--batch-size ({config.batch_size}) must be at least 2 and divisible by the number of "
                         f"processes ({world_size})")
    if config.batch_size // world_size < 2:
        raise ValueError("each process needs at least 2 images per step (the losses compare images of a batch)")
    if config.method in PATCH_METHODS:
        if config.num_patches < 2:
            raise ValueError(f"--num-patches must be at least 2 (patches of one image are the positives), "
                             f"got {config.num_patches}")
        if not 1 <= config.patch_size <= min(image_size):
            raise ValueError(f"--patch-size must lie in 1..{min(image_size)} for {image_size[0]}x{image_size[1]} "
                             f"images, got {config.patch_size}")
    if not 0 < config.min_scale <= config.max_scale <= 1:
        raise ValueError(f"need 0 < MIN <= MAX <= 1 in --scale MIN,MAX, got {config.min_scale},{config.max_scale}")
    if config.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {config.epochs}")
    kernel = config.blur_kernel_size
    if kernel is not None and (kernel < 1 or kernel % 2 == 0 or kernel // 2 >= config.input_size):
        raise ValueError(f"--blur-kernel-size must be an odd number of pixels under twice the {config.input_size} px "
                         f"input (reflect padding), got {kernel}")
    if config.schedule_epochs is not None and config.schedule_epochs < 1:
        raise ValueError(f"--schedule-epochs must be at least 1, got {config.schedule_epochs}")
    protocol = str(config.knn_protocol)
    if protocol != "central" and not (protocol.isdigit() and int(protocol) >= 1):
        raise ValueError(f"--knn-protocol must be central or a number of patches N >= 1 (e.g. {KNN_PATCHES}), "
                         f"got {config.knn_protocol!r}")


def _flag(action: argparse.Action, value: Any) -> str:
    """The command-line words that set ``action``'s destination to ``value``."""
    if isinstance(value, bool):
        return action.option_strings[0] if value else f"--no-{action.option_strings[0][2:]}"
    if isinstance(value, (tuple, list)):
        return f"{action.option_strings[0]} {','.join(f'{v:g}' for v in value)}"
    return f"{action.option_strings[0]} {value}"


def _flag_value(settings: TrainConfig | argparse.Namespace | dict[str, Any], dest: str, default: Any) -> Any:
    """The value of the flag ``dest`` in a config, a namespace or a recorded ``args`` dict (``--scale MIN,MAX`` holds
    min_scale and max_scale)."""
    get = settings.get if isinstance(settings, dict) else lambda key, fallback: getattr(settings, key, fallback)
    if dest == "scale":
        return None if get("min_scale", None) is None else (get("min_scale", None), get("max_scale", 1.0))
    return get(dest, default)


def command_line(config: TrainConfig | argparse.Namespace) -> str:
    """The command that runs ``config`` (every flag that differs from its default; ``--resume`` left out)."""
    parts = ["python -m ssl_patch_analysis.train"]
    for action in build_parser()._actions:
        left_out = action.dest in ("help", "resume", "debug") or "--no-amp" in action.option_strings
        if not action.option_strings or left_out:
            continue
        value = _flag_value(config, action.dest, action.default)
        if value != action.default:
            parts.append(_flag(action, value))
    return " ".join(parts)


def _nonfinite_message(step: int, record: torch.Tensor, names: list[str]) -> str:
    values = ", ".join(f"{name}={value:.4g}" for name, value in zip(names, record.tolist(), strict=True))
    return (f"the loss became NaN or infinite at step {step} ({values}); stopping. The last good checkpoint is kept. "
            "Try a lower --lr / --base-lr or a longer --warmup-epochs, and check that the images are valid.")


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainingRun:
    """A run set up and ready for its next epoch: data, model, optimiser and where it stands."""

    config: TrainConfig
    processes: Processes
    data: TrainingData
    image_size: tuple[int, int]
    out: Path
    ssl_model: SSLModel
    model: nn.Module
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    export_model: SSLModel
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    crop_plan: CropPlan
    augmentation: Augmentation
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    start_epoch: int
    step: int
    previous_wall: float
    start_time: float
    log_lines: list[str] = field(default_factory=list)
    rotate_resume: bool = True
    init_from: dict[str, Any] | None = None  # what --init-from loaded (path, sha256, heads), kept in checkpoints
    in_epoch: dict[str, Any] | None = None  # the progress of a resume state written within an epoch, till used
    checkpoint_train: dict[str, Any] | None = None  # the ``train`` dict of checkpoint.pt (the last finished epoch)
    writes: int = 0  # resume states written in the run folder, this one's included
    last_save: float = 0.0  # time.time() of the last resume state this process wrote (or of its start)
    knn_time: float = 0.0  # seconds the last online k-NN took (0 before the first)
    images_sha256: str | None = None  # of the training images (tensor_sha256), kept in resume states

    @property
    def local_batch(self) -> int:
        return self.config.batch_size // self.processes.world_size

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def resume_path(self) -> Path:
        return self.out / "resume.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"


@dataclass
class EpochResult:
    terms: dict[str, float]
    train_time: float
    lr: float
    stopped_after: int | None = None  # steps done when the time limit stopped the run within the epoch


def train(config: TrainConfig | argparse.Namespace) -> Path:
    """Run the training described by ``config`` (a :class:`TrainConfig`, or the namespace
    :func:`build_parser` gives); returns the checkpoint path.

    Raises :class:`TrainingDiverged` when the loss becomes NaN or infinite.
    """
    config = TrainConfig.from_namespace(config)
    _check_values(config)
    config.command = command_line(config)
    processes = setup_processes(config.device)
    try:
        with contextlib.ExitStack() as held:
            if processes.main:
                held.enter_context(run_folder_lock(run_folder(config), config.resume))
            return _train(config, processes)
    finally:
        if processes.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, processes: Processes) -> Path:
    """Set up, then one epoch after another until the last one or an early stop."""
    run = setup_run(config, processes)
    for epoch in range(run.start_epoch, config.epochs):
        result = train_one_epoch(run, epoch)
        if result.stopped_after is not None:
            if processes.main:
                print(f"stopping after step {result.stopped_after} of {run.steps_per_epoch} in epoch {epoch + 1} "
                      f"(time limit of {config.time_limit:g} s): {run.resume_path} holds it; continue with --resume")
                _mark_stopped_within(run, epoch, result.stopped_after)
            break
        stopped_early = end_of_epoch(run, epoch, result)
        if stopped_early:
            if processes.main:
                print(f"stopping after epoch {epoch + 1}: {stopped_early}; continue with --resume")
            break
    if processes.main:
        print(f"checkpoint: {run.checkpoint_path}" if run.checkpoint_path.is_file() else
              "no checkpoint yet: no epoch has finished")
    return run.checkpoint_path


def _mark_stopped_within(run: TrainingRun, epoch: int, steps_done: int) -> None:
    """After a time-limit stop within ``epoch``: the last finished epoch's ``checkpoint.pt`` (if any) says that the
    run stopped early and where, its weights unchanged (read back and written again, checksum renewed)."""
    if not run.checkpoint_path.is_file():
        return
    try:
        checkpoint = read_checkpoint(run.checkpoint_path)
        verify_checksum(checkpoint, run.checkpoint_path)
        checkpoint["train"]["stopped_early"] = (
            f"time limit of {run.config.time_limit:g} s, within epoch {epoch + 1} after step {steps_done} of "
            f"{run.steps_per_epoch} (this is epoch {epoch}'s model; continue with --resume)")
        atomic_torch_save(with_checksum(checkpoint), run.checkpoint_path)
    except (ValueError, OSError) as error:  # the resume state is written; --resume rewrites a damaged checkpoint
        print(f"warning: {run.checkpoint_path} is not marked as stopped early ({error})")


def run_folder(config: TrainConfig) -> Path:
    """``--run-dir``, or ``runs/<method>-<arch>-<data>``."""
    data_name = Path(config.data).name if config.data.lower() not in ARCHIVE_DATASETS else config.data.lower()
    return Path(config.out or f"runs/{config.method}-{config.arch}-{data_name}")


class RunFolderLockedError(FileExistsError):
    """Another process is training in this run folder."""


@contextlib.contextmanager
def run_folder_lock(out: Path, resume: bool) -> Iterator[None]:
    """One training process per run folder: an OS lock (``fcntl.flock`` on ``out/.lock``, released when the
    process ends or dies). A second run in the same folder stops at once, naming the process that holds it."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--run-dir {out} is a file: pass a folder")
    created = not out.is_dir()
    if created:
        if resume:  # nothing to lock: setup_run says there is no run to resume
            yield
            return
        out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise RunFolderLockedError(
                f"process {holder} is training in {out}: wait for it to finish (then --resume continues it), or "
                "choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    except BaseException:
        if created and [path.name for path in out.iterdir()] == [".lock"]:  # a run that stopped before its first
            (out / ".lock").unlink()  # record (a bad setting, unusable data) leaves no folder the next run trips on
            out.rmdir()
        raise
    finally:
        os.close(fd)


RESUME_KEYS = ("args", "model", "optimizer", "epoch", "step", "wall_time_s", "rng")
PREVIOUS_RESUME = "resume.prev.pt"


def notice(message: str) -> None:
    """A repair the trainer made, in one line on stderr."""
    print(f"notice: {message}", file=sys.stderr, flush=True)


def _resume_state_problem(path: Path, device: torch.device) -> tuple[dict[str, Any] | None, str | None]:
    """A resume state read and verified, or what is wrong with it (one phrase)."""
    if not path.is_file():
        return None, "missing"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever torch raises on a truncated or garbled file
        if "unsupported global" in str(error).lower():  # torch words it "Unsupported global" or "unsupported GLOBAL"
            return None, "damaged (it holds Python objects that are not tensors, refused for safety)"
        return None, "damaged (not a readable file: truncated or corrupt)"
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        return None, f"not this trainer's resume state (no {', '.join(missing)})"
    if "log" in state and CHECKSUM_KEY not in state:  # written by a trainer that always adds it
        return None, "damaged (its sha256 is gone)"
    try:
        verify_checksum(state, path)
    except ValueError:
        return None, "damaged (its contents no longer match their sha256)"
    return state, None


def _start_over(folder: Path) -> str:
    """What to do with a run folder that cannot be continued: its checkpoint.pt (if readable) can seed a new run."""
    checkpoint = folder / "checkpoint.pt"
    if _checkpoint_problem(checkpoint) is None:
        return (f"pass another --run-dir (with --init-from {checkpoint} to start from the weights of its last "
                f"finished epoch), or delete {folder} to start over")
    return f"pass another --run-dir, or delete {folder} to start over"


def _read_resume_state(path: Path, device: torch.device, say: bool = True) -> tuple[dict[str, Any], Path]:
    """The resume state for ``--resume`` and the file it came from: ``resume.pt``, or ``resume.prev.pt`` (with a
    notice, on the process that says things: ``say``) when ``resume.pt`` is missing or damaged; one line saying what
    to do when neither can be used."""
    start_over = f"it cannot be continued: {_start_over(path.parent)}"
    tell = notice if say else (lambda message: None)
    previous = path.with_name(PREVIOUS_RESUME)
    if not path.is_file() and not previous.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist, so {start_over}" if path.parent.is_dir() else
                                f"--resume: there is no run in {path.parent}; run without --resume to start one")
    state, problem = _resume_state_problem(path, device)
    if problem is None:
        assert state is not None
        # a trainer that keeps resume.prev.pt wrote it after an earlier state (counted from 2026-12-06 on)
        if int(state.get("writes", state["epoch"])) >= 2 and CHECKSUM_KEY in state:
            _, previous_problem = _resume_state_problem(previous, device)
            if previous_problem is not None:
                tell(f"{previous} (the previous epoch's resume state, used only when resume.pt is damaged) is "
                       f"{previous_problem}; the next epoch writes it again")
        return state, path
    if previous.is_file():
        fallback, previous_problem = _resume_state_problem(previous, device)
        if previous_problem is None:
            assert fallback is not None
            epoch = int(fallback["epoch"])
            if fallback.get("in_epoch"):
                tell(f"{path} is {problem}; continuing from {previous} (after step "
                       f"{int(fallback['in_epoch']['steps_done'])} in epoch {epoch + 1}): the steps after it are "
                       "trained again, with the same result")
            else:
                tell(f"{path} is {problem}; continuing from {previous} (epoch {epoch}): epoch {epoch + 1} is "
                       "trained again, with the same result")
            return fallback, previous
        problem = f"{problem}, and {previous} is {previous_problem} too"
    if problem == "missing":
        raise FileNotFoundError(f"--resume: {path} does not exist, so {start_over}")
    raise ValueError(f"--resume: {path} is {problem}, so {start_over}")


def _checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a run's checkpoint.pt (missing, unreadable, checksum mismatch), or None."""
    if not path.is_file():
        return "missing"
    try:
        verify_checksum(read_checkpoint(path), path)
    except DamagedCheckpointError:
        return "damaged (its contents no longer match their sha256)"
    except (ValueError, RuntimeError):
        return "damaged (not a readable checkpoint: truncated or corrupt)"
    return None


def _repair_log(path: Path, copy: list[str], source: Path, epoch: int) -> list[str]:
    """Make ``log.jsonl`` start with the resume state's copy of it: damaged or missing lines are restored from the
    copy (with a notice). Lines after the copy are kept when they are intact headers of runs that stopped before
    their first epoch; records of epochs after the resume state's are dropped, since they are trained again."""
    wanted = "".join(copy).encode()
    found = path.read_bytes() if path.is_file() else None
    if found is not None and found.startswith(wanted):
        head, tail = copy, found[len(wanted):]
    else:
        if found is None:
            notice(f"{path} is missing; rewritten from the copy in {source}")
        else:
            lines = found.splitlines(keepends=True)
            damaged = [f"{n} ({'missing' if n > len(lines) else _log_line_problem(lines[n - 1], True)[1] or 'changed'})"
                       for n, line in enumerate(copy, 1) if n > len(lines) or lines[n - 1] != line.encode()]
            notice(f"{path}: damaged line{'s' if len(damaged) > 1 else ''} {', '.join(damaged)}; restored from the "
                   f"copy in {source}")
        head, tail = copy, found[len(wanted):] if found is not None and len(found) > len(wanted) else b""
    kept, dropped = [], []
    for raw in tail.splitlines(keepends=True):
        record, problem = _log_line_problem(raw, True)
        if problem is None and ("epoch" not in record or int(record["epoch"]) <= epoch):
            kept.append(raw.decode())
        else:
            dropped.append(f"epoch {record['epoch']} (trained again)" if problem is None else problem)
    if dropped:
        notice(f"{path}: dropped {len(dropped)} line(s) after the copy in {source}: {', '.join(dropped)}")
    lines = [*head, *kept]
    if found is None or found != "".join(lines).encode():
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(lines))
        os.replace(tmp, path)
    return lines


def setup_run(config: TrainConfig, processes: Processes) -> TrainingRun:
    """Load the data, build the model and optimiser, and restore them from ``resume.pt`` with ``--resume``."""
    start_time = time.time()
    device, main = processes.device, processes.main
    data = load_training_data(config, device, show=main)
    image_size = (int(data.images.shape[2]), int(data.images.shape[3]))
    knn_protocol_given = config.knn_protocol is not None
    config.resolve(min(image_size), device)
    _check_args(config, processes.world_size, image_size)
    out = run_folder(config)

    torch.manual_seed(config.seed)
    ssl_model = build_model(config, min(image_size)).to(device).to(memory_format=torch.channels_last)
    # A plain copy on the CPU that checkpoints are written from: SyncBatchNorm layers (several GPUs)
    # are not the BatchNorm1d the checkpoint format describes, but their state_dicts are the same.
    export_model = build_model(config, min(image_size))
    steps_per_epoch = len(data.images) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {config.batch_size} is larger than the training set "
                         f"({len(data.images)} images)")
    init_from = None
    if config.init_from is not None and not config.resume:  # a resumed run's state already holds its weights
        init_from = _init_from(ssl_model, config.init_from, say=main)
    optimizer = build_optimizer(config, ssl_model, config.peak_lr)

    start_epoch, step, previous_wall, writes = 0, 0, 0.0, 0
    in_epoch: dict[str, Any] | None = None
    checkpoint_train: dict[str, Any] | None = None
    resume_path, log_path = out / "resume.pt", out / "log.jsonl"
    log_lines: list[str] = []
    resume_source = resume_path
    loss_fn = build_loss(config.method)
    images_sha256 = tensor_sha256(data.images)  # the pixels trained on, in order: a resumed run must train on them
    if config.resume:
        state, resume_source = _read_resume_state(resume_path, device, say=main)
        recorded = {**_unrecorded_settings(state["args"]), **state["args"]}
        unused = ("lars_eta", "lars_clip") if config.optimizer != "lars" else ()
        unused += ("blur_kernel_size",) if not config.blur_p else ()  # blur_p is fixed too: no blur then or now
        changed = [k for k in RESUME_FIXED_ARGS if k not in unused and recorded.get(k) != getattr(config, k)]
        if changed:
            raise ValueError("--resume needs the settings of the run it continues; these differ: " + ", ".join(
                f"{k} (was {recorded.get(k)!r}, now {getattr(config, k)!r})" for k in changed)
                + "; to continue it, add " + " ".join(_flags_for(recorded, changed)))
        _check_same_images(state, len(data.images), images_sha256)  # the same flags, other files
        schedule_was = recorded.get("schedule_epochs") or recorded.get("epochs")
        schedule_now = config.schedule_epochs or config.epochs
        if schedule_was is not None and int(schedule_was) != schedule_now:
            finished = int(state["epoch"]) >= int(recorded.get("epochs") or 0) and not state.get("in_epoch")
            if not finished:  # was: accepted, and the schedule stretched or cut mid-run without a word
                raise ValueError(f"--resume continues a run whose learning-rate schedule spans {schedule_was} "
                                 f"epochs; {_schedule_text(config)} would change it mid-run: to continue it, pass "
                                 f"--epochs {schedule_was}, or --schedule-epochs {schedule_was} with the --epochs to "
                                 "train")
            if main:  # a finished run trained on: its schedule is now another one, said
                print(f"note: the run finished its {state['epoch']} epochs; it trains on with a schedule of "
                      f"{schedule_now} epochs (the learning rate goes back up to that schedule's; --schedule-epochs "
                      f"{schedule_was} keeps the old one's end)", file=sys.stderr)
        if not knn_protocol_given:  # the online k-NN goes on measuring what it did (runs before the setting: central)
            config.knn_protocol = str(recorded.get("knn_protocol") or "central")
        ssl_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        # states from 2026-12-06 on carry it (one within the first epoch has no checkpoint record yet)
        init_from = state.get("init_from", (state.get("checkpoint_train") or {}).get("init_from"))
        if config.init_from is not None:  # every rank: a refusal stops them all before any step
            _check_resumed_init_from(config.init_from, init_from, recorded="init_from" in state, say=main)
        start_epoch, step, previous_wall = int(state["epoch"]), int(state["step"]), float(state["wall_time_s"])
        in_epoch, checkpoint_train = state.get("in_epoch"), state.get("checkpoint_train")
        writes = int(state.get("writes", start_epoch))
        _restore_rng_states(state["rng"])
        if main:
            problem = _checkpoint_problem(out / "checkpoint.pt")
            if problem is not None and in_epoch:
                # the state holds the weights of a step within the epoch, not those of the last finished one
                if start_epoch > 0 or problem != "missing":
                    notice(f"{out / 'checkpoint.pt'} was {problem}; {resume_source} holds the weights of a step "
                           f"within epoch {start_epoch + 1}, not those of epoch {start_epoch}, so checkpoint.pt is "
                           f"written again at the end of epoch {start_epoch + 1}")
            elif problem is not None:
                export_model.load_state_dict(state["model"])
                train_info = state.get("checkpoint_train") or _train_info(
                    config, data, start_epoch, previous_wall, device, None, None, loss=loss_settings(loss_fn))
                save_checkpoint(export_model, out / "checkpoint.pt", train=train_info)
                notice(f"{out / 'checkpoint.pt'} was {problem}; rewritten from {resume_source} (epoch {start_epoch})")
            if "log" in state:
                log_lines = _repair_log(log_path, list(state["log"]), resume_source, start_epoch)
    elif resume_path.is_file() and not (out / "checkpoint.pt").exists():
        raise FileExistsError(f"{resume_path} holds an interrupted run (stopped before its first epoch ended): pass "
                              "--resume to continue it, or another --run-dir")
    elif (out / "checkpoint.pt").exists():
        if resume_path.is_file() or (out / PREVIOUS_RESUME).is_file():
            raise FileExistsError(f"{out / 'checkpoint.pt'} exists: pass --resume to continue that run, or another "
                                  "--run-dir")
        raise FileExistsError(f"{out} holds a finished or foreign run (checkpoint.pt without resume.pt, so it cannot "
                              f"be continued): {_start_over(out)}")

    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not log_lines and log_path.is_file():  # a log the resume state holds no copy of: kept as it is
            log_lines = log_path.read_text(errors="replace").splitlines(keepends=True)
        header = log_line({
            "command": config.command, "args": _plain(config),
            "resumed_from_epoch": start_epoch if config.resume else None,
            "resumed_from_step": step if config.resume else None, "init_from": init_from,
            "loss": loss_settings(loss_fn),
            "data": data.description, "train_images": len(data.images), "knn": data.knn_split,
            "world_size": processes.world_size, "device": _device_name(device), "malloc": malloc_description()})
        log_lines.append(header)
        _append_log(log_path, header)

    model: nn.Module = ssl_model
    if processes.world_size > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ssl_model = model  # type: ignore[assignment]
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(model) if config.compile else model
    schedule_epochs = config.schedule_epochs or config.epochs
    return TrainingRun(
        config=config, processes=processes, data=data, image_size=image_size, out=out, ssl_model=ssl_model,
        model=model, forward=forward, export_model=export_model, optimizer=optimizer,
        loss_fn=loss_fn,
        crop_plan=CropPlan(config.method, config.seed, config.num_patches if config.method in PATCH_METHODS else 2,
                           config.patch_size, config.min_scale, config.max_scale),
        augmentation=config.augmentation(), steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * schedule_epochs,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        start_epoch=start_epoch, step=step, previous_wall=previous_wall, start_time=start_time, log_lines=log_lines,
        rotate_resume=resume_source == resume_path, init_from=init_from, in_epoch=in_epoch,
        checkpoint_train=checkpoint_train, writes=writes, last_save=time.time(), images_sha256=images_sha256)


def _check_same_images(state: dict[str, Any], count: int, sha256: str) -> None:
    """A resume state records the images it trained on (states from 2026-12-08 on): other images (a folder with
    files added or replaced, another --data-root) are refused; was: the run went on, its epoch's order and steps
    those of other data."""
    recorded = state.get("train_images_sha256")
    if recorded is not None and recorded != sha256:
        was = state.get("train_images")
        raise ValueError(f"--resume continues a run trained on other images ({was} then, {count} now, their pixels "
                         "differ): pass the --data, --data-root, --image-size and --train-size it was trained with, "
                         "and leave its images as they were")


def _init_from(model: SSLModel, path: str, say: bool = True) -> dict[str, Any]:
    """Load ``--init-from``'s weights into ``model`` (backbone, and the heads when the file has them); what was
    loaded, for the log and the checkpoint: path, file sha256, whether the heads came too."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"--init-from: {source} does not exist; pass a checkpoint.pt of a run (or a file of "
                                "pretrained/)")
    loaded = load_model(source, verbose=False)  # any format it reads; a damaged or foreign file: its one line
    hints = {"backbone": "--arch/--width/--cifar-padding", "projector": "--projector",
             "pre_feature": "--pre-feature"}
    heads = True
    for part, hint in hints.items():
        target, weights = getattr(model, part), getattr(loaded, part)
        if target is None:
            continue
        if weights is None:
            if part == "backbone":
                raise ValueError(f"--init-from: {source} has no backbone")
            if say:
                notice(f"--init-from: {source} has no {part}; the run's {part} starts from its random init")
            heads = False
            continue
        theirs, ours = weights.state_dict(), target.state_dict()
        if set(theirs) != set(ours) or any(theirs[k].shape != ours[k].shape for k in ours):
            raise ValueError(f"--init-from: the {part} of {source} ({_shape_words(loaded.info)}) has other shapes than "
                             f"this run's ({_shape_words(model.info)}): pass the {hint} of the run that made it")
        target.load_state_dict(theirs)
    return {"path": str(path), "sha256": file_sha256(source), "heads": heads}


def _check_resumed_init_from(path: str, started: dict[str, Any] | None, recorded: bool, say: bool = True) -> None:
    """``--resume --init-from``: the resumed run's weights come from its state, not from the file. The file the run
    started from (or a copy) goes on quietly; another file, or a run started from its random init, is refused (it
    was ignored without a word); the run's own path now holding other bytes goes on, said."""
    source = Path(path).expanduser()
    if started is None:
        if recorded:
            raise ValueError(f"--resume continues a run that started from its random init; --init-from {source} "
                             "would not be loaded: drop --init-from to continue the run, or pass another --run-dir "
                             "to start a new one from that file")
        return  # a state from before init_from was recorded: nothing to compare with
    same_path = Path(str(started.get("path", ""))).expanduser().resolve() == source.resolve()
    if not source.is_file():
        if same_path:
            return  # moved away since: the state holds its weights
        raise FileNotFoundError(f"--init-from: {source} does not exist (the run in this --run-dir started from "
                                f"{started.get('path')}); drop --init-from to continue the run")
    digest = file_sha256(source)
    if digest == started.get("sha256"):
        return  # the same weights
    if same_path:
        if say:
            notice(f"--init-from {source} holds other bytes than when the run started (sha256 {digest[:12]}, was "
                   f"{str(started.get('sha256'))[:12]}); not loaded: the run goes on from its own state")
        return
    raise ValueError(f"--init-from {source} is not the file the run in this --run-dir started from "
                     f"({started.get('path')}, sha256 {str(started.get('sha256'))[:12]}); the resumed run goes on "
                     "from its own state, so it would not be loaded: drop --init-from to continue the run, or pass "
                     "another --run-dir to start a new one from that file")


def _shape_words(info: Any) -> str:
    """A model's architecture in words, as --init-from's mismatch names the file's and the run's."""
    padding = f", cifar padding {info.cifar_padding}" if info.cifar_padding is not None else ""
    return f"{info.arch}, width {info.width:g}{padding}, projector {info.projector_dims}"


def _plain(config: TrainConfig) -> dict[str, Any]:
    """The config as plain values (it goes into the JSON log and into resume.pt, read with weights_only=True)."""
    return dataclasses.asdict(config)


def train_one_epoch(run: TrainingRun, epoch: int) -> EpochResult:
    """One pass over the training set (from the step a resume state within it stopped at); returns the epoch's
    mean loss terms, or where the time limit stopped it."""
    config, processes, device = run.config, run.processes, run.processes.device
    epoch_start = time.time()
    progress, run.in_epoch = run.in_epoch, None
    first = int(progress["steps_done"]) if progress else 0
    earlier_time = float(progress["train_time_s"]) if progress else 0.0
    run.model.train()
    order = torch.randperm(len(run.data.images),
                           generator=torch.Generator().manual_seed(mixed_seed(config.seed, 5, epoch)))
    # This rank's images of every step, and all their boxes drawn (and checked) at once: one
    # vectorised sampler call per epoch instead of CPU work, or waits for the device, between steps.
    epoch_ids = order[:run.steps_per_epoch * config.batch_size].view(run.steps_per_epoch, processes.world_size,
                                                                        run.local_batch)[:, processes.rank]
    epoch_boxes = run.crop_plan.boxes(epoch, epoch_ids.reshape(-1), run.image_size)
    check_boxes(epoch_boxes, run.image_size)
    exact = boxes_are_exact(epoch_boxes, config.input_size)
    epoch_boxes = epoch_boxes.to(device).view(run.steps_per_epoch, run.local_batch, run.crop_plan.num_crops, 4)
    epoch_ids = epoch_ids.to(device)
    monitor = LossMonitor(run.steps_per_epoch, run.step - first, processes)
    if progress:
        rows = progress["loss_rows"]  # (processes, steps done, terms)
        # the same number of processes: each its own rows (the same bits as an uninterrupted run); another number:
        # every rank the mean over the processes that wrote them, which keeps the epoch's mean of the global loss
        monitor.restore(list(progress["loss_names"]),
                        rows[processes.rank] if len(rows) == processes.world_size else rows.mean(dim=0))
    bar = tqdm(range(first, run.steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", initial=first,
               total=run.steps_per_epoch, disable=not processes.main, leave=False)
    lr = 0.0
    for i in bar:
        lr = learning_rate(run.step, run.total_steps, run.warmup_steps, config.peak_lr)
        output = training_step(run, run.data.images[epoch_ids[i]], epoch_boxes[i], exact, lr)
        monitor.record(i, output)
        run.step += 1
        if monitor.checked_loss is not None:
            bar.set_postfix(loss=f"{monitor.checked_loss:.4g}",
                            img_s=f"{(i + 1 - first) * config.batch_size / (time.time() - epoch_start):.0f}")
        if i + 1 < run.steps_per_epoch:
            save, stop = _decide_within_epoch(run, (time.time() - epoch_start) / (i + 1 - first))
            if save:
                _save_within_epoch(run, epoch, i + 1, monitor, earlier_time + time.time() - epoch_start)
            if stop:
                bar.close()
                return EpochResult({}, earlier_time + time.time() - epoch_start, lr, stopped_after=i + 1)
    bar.close()
    mean_terms = monitor.finish()
    _check_weights(run, epoch)
    train_time = earlier_time + time.time() - epoch_start
    if processes.world_size > 1:
        dist.all_reduce(mean_terms)
        mean_terms /= processes.world_size
    return EpochResult(dict(zip(monitor.names, mean_terms.tolist(), strict=True)), train_time, lr)


def _check_weights(run: TrainingRun, epoch: int) -> None:
    if not all(bool(torch.isfinite(p).all()) for p in run.ssl_model.parameters()):
        raise TrainingDiverged(f"the weights became NaN or infinite during epoch {epoch + 1} although the loss "
                               "stayed finite; the last good checkpoint is kept. Try a lower --lr / --base-lr.")


def _decide_within_epoch(run: TrainingRun, step_time: float) -> tuple[bool, bool]:
    """After a step within an epoch: whether to write the resume state (``--save-every`` has passed since the last
    one) and whether to stop (the next step, taking ``step_time``, would pass ``--time-limit``; the state is then
    written too). Rank 0's clock decides for all, every :data:`CHECK_EVERY` steps when there are several."""
    config, processes = run.config, run.processes
    if config.time_limit is None and not config.save_every:
        return False, False
    if processes.world_size > 1 and run.step % CHECK_EVERY:
        return False, False
    now = time.time()
    stop = config.time_limit is not None and now - run.start_time + step_time > config.time_limit
    save = stop or (bool(config.save_every) and now - run.last_save >= config.save_every)
    if processes.world_size > 1:
        decision = torch.tensor([float(save), float(stop)], device=processes.device)
        dist.broadcast(decision, src=0)
        save, stop = bool(decision[0].item()), bool(decision[1].item())
    return save, stop


def _save_within_epoch(run: TrainingRun, epoch: int, steps_done: int, monitor: LossMonitor,
                       train_time: float) -> None:
    """The resume state after ``steps_done`` steps of ``epoch``: the usual state (model, optimizer, step, RNG, the
    last finished epoch's checkpoint record and log) plus every rank's loss rows of the epoch so far, checked
    finite first, so that the resumed epoch's record equals an uninterrupted one's."""
    processes = run.processes
    rows = monitor.checked_rows(steps_done)
    _check_weights(run, epoch)
    if processes.world_size > 1:
        gathered = [torch.empty_like(rows) for _ in range(processes.world_size)]
        dist.all_gather(gathered, rows.contiguous())
        rows = torch.stack(gathered)
    else:
        rows = rows[None]
    if processes.main:
        wall = run.previous_wall + time.time() - run.start_time
        _write_resume_state(run, epoch, wall, in_epoch={
            "steps_done": steps_done, "loss_names": list(monitor.names), "loss_rows": rows.cpu(),
            "train_time_s": train_time})
    run.last_save = time.time()
    if processes.world_size > 1:
        dist.barrier()


def _write_resume_state(run: TrainingRun, epochs_done: int, wall: float,
                        in_epoch: dict[str, Any] | None = None) -> None:
    """``resume.pt``; the state written before it becomes ``resume.prev.pt``, except when it is the damaged one that
    --resume fell back from: then resume.prev.pt already holds the state this run started from."""
    run.writes += 1
    state = {
        "model": run.ssl_model.state_dict(), "optimizer": run.optimizer.state_dict(), "epoch": epochs_done,
        "step": run.step, "rng": _rng_states(), "args": _plain(run.config), "wall_time_s": wall,
        "checkpoint_train": run.checkpoint_train, "log": list(run.log_lines), "writes": run.writes,
        "init_from": run.init_from, "train_images": len(run.data.images), "train_images_sha256": run.images_sha256}
    if in_epoch is not None:
        state["in_epoch"] = in_epoch
    atomic_torch_save(with_checksum(state), run.resume_path,
                      previous=run.out / PREVIOUS_RESUME if run.rotate_resume else None, advice=_full_disk_advice(run))
    run.rotate_resume = True


def _full_disk_advice(run: TrainingRun) -> str:
    """What to do when the disk holding the run folder is full: --resume where a resume state was written."""
    if run.resume_path.is_file():
        return "free some space, then continue the run with --resume (it goes on from the last state kept)"
    return "free some space and run the same command again (no resume state was written yet)"


def training_step(run: TrainingRun, images: torch.Tensor, boxes: torch.Tensor, exact: bool, lr: float) -> LossOutput:
    """Crop, augment, forward, loss, backward and optimiser step for one batch of uint8 ``images``."""
    config, device = run.config, run.processes.device
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    generator = torch.Generator(device=device).manual_seed(mixed_seed(config.seed, 6, run.step, run.processes.rank))
    crops = crops_of(images, boxes, config.input_size, exact)
    crops = _device_layout(run.augmentation(crops, generator))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(config.amp)):
        z = run.forward(crops)["z"]
    output = method_loss(config.method, run.loss_fn, z.float().view(run.local_batch, run.crop_plan.num_crops, -1))
    run.optimizer.zero_grad(set_to_none=True)
    output.total.backward()
    run.optimizer.step()
    return output


class LossMonitor:
    """The loss terms of an epoch's steps, kept on the device, checked for NaN/inf every
    :data:`CHECK_EVERY` steps.

    On CUDA the rows are copied to the host without waiting and checked one interval later, when
    the copy has long finished: the training step never waits for the device.
    """

    def __init__(self, steps: int, first_step: int, processes: Processes):
        self.processes, self.first_step = processes, first_step
        self.device = processes.device
        self.records: torch.Tensor | None = None
        self.names: list[str] = []
        self.steps = steps
        self.sent = 0
        self.pending: tuple[torch.Tensor, Any, int] | None = None
        self.checked_loss: float | None = None

    def record(self, i: int, output: LossOutput) -> None:
        if self.records is None:
            self.names = ["loss", *output.terms]
            self.records = torch.zeros(self.steps, len(self.names), device=self.device)
        self.records[i] = torch.stack([output.total.detach(), *output.terms.values()])
        if (i + 1) % CHECK_EVERY == 0:
            self._check_pending()
            self._send(i + 1)

    def restore(self, names: list[str], rows: torch.Tensor) -> None:
        """The rows of the steps a resume state within the epoch recorded (already checked)."""
        self.names = names
        self.records = torch.zeros(self.steps, len(names), device=self.device)
        self.records[:len(rows)] = rows.to(self.device)
        self.sent = len(rows)

    def checked_rows(self, stop: int) -> torch.Tensor:
        """Rows ``[0, stop)``, every one checked (TrainingDiverged otherwise)."""
        assert self.records is not None
        self._check_pending()
        self._send(stop)
        self._check_pending()
        return self.records[:stop]

    def finish(self) -> torch.Tensor:
        """Check every remaining row; the epoch's mean of each term."""
        return self.checked_rows(self.steps).mean(dim=0)

    def _send(self, stop: int) -> None:
        assert self.records is not None
        rows = self.records[self.sent:stop]
        event = None
        if self.device.type == "cuda":
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = rows
        self.pending = (host, event, self.sent)
        self.sent = stop

    def _check_pending(self) -> None:
        if self.pending is None:
            return
        host, event, start = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        _check_finite(host, self.first_step + start, self.names, self.processes)
        if len(host):
            self.checked_loss = float(host[-1, 0])


def end_of_epoch(run: TrainingRun, epoch: int, result: EpochResult) -> str | None:
    """k-NN, checkpoint, resume state and log record after an epoch; says why to stop early, if so."""
    config, processes, device = run.config, run.processes, run.processes.device
    elapsed = time.time() - run.start_time
    last_epoch = epoch + 1 == config.epochs
    stopped_early = None
    if config.time_limit is not None and not last_epoch:
        # Stop when another epoch like this one would cross the limit, with this epoch's k-NN and the next one's
        # (as long as the last took) where they run; rank 0's clock decides for all.
        knn_runs = (config.knn_every > 0 and (epoch + 1) % config.knn_every == 0) + 1
        stop = torch.tensor([float(elapsed + result.train_time + knn_runs * run.knn_time > config.time_limit)],
                            device=device)
        if processes.world_size > 1:
            dist.broadcast(stop, src=0)
        if bool(stop.item()):
            stopped_early = f"time limit of {config.time_limit:g} s"
    finishing = last_epoch or stopped_early is not None
    if processes.main:
        knn = None
        if finishing or (config.knn_every > 0 and (epoch + 1) % config.knn_every == 0):
            knn_start = time.time()
            knn = knn_top1(run.ssl_model, run.data, config.input_size, bool(config.amp), knn_sampler(config))
            run.knn_time = time.time() - knn_start
        wall = run.previous_wall + time.time() - run.start_time
        record = {"epoch": epoch + 1, "step": run.step, "lr": result.lr, **result.terms,
                  "images_per_s": run.steps_per_epoch * config.batch_size / result.train_time,
                  "epoch_time_s": result.train_time, "knn_top1": knn, "knn_protocol": config.knn_protocol,
                  "wall_time_s": wall}
        if processes.world_size > 1:
            record["rank_param_max_diff"] = _rank_param_max_diff(run.ssl_model)
        train_info = _train_info(config, run.data, epoch + 1, wall, device, knn, stopped_early, run.init_from,
                                 loss=loss_settings(run.loss_fn))
        run.export_model.load_state_dict(run.ssl_model.state_dict())
        save_checkpoint(run.export_model, run.checkpoint_path, train=train_info, advice=_full_disk_advice(run))
        run.checkpoint_train = train_info
        line = log_line(record)
        run.log_lines.append(line)
        _write_resume_state(run, epoch + 1, wall)
        _append_log(run.log_path, line)
        tqdm.write(f"epoch {epoch + 1}/{config.epochs}  loss {record['loss']:.4g}  lr {result.lr:.3g}  "
                   f"{record['images_per_s']:.0f} img/s  k-NN top-1 ({protocol_title(config.knn_protocol)}) "
                   f"{'-' if knn is None else f'{knn:.2f}%'}  ({result.train_time:.1f} s)")
    elif processes.world_size > 1:
        _rank_param_max_diff(run.ssl_model)
    run.last_save = time.time()
    if processes.world_size > 1:
        dist.barrier()
    return stopped_early


def _check_finite(records: torch.Tensor, first_step: int, names: list[str], processes: Processes) -> None:
    """Raise TrainingDiverged naming the first step whose loss terms are not finite (on any rank)."""
    bad = ~torch.isfinite(records[:, :len(names)]).all(dim=1)
    flag = bad.any().float().view(1)
    if processes.world_size > 1:
        flag = flag.to(processes.device)
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


def _knn_view(config: TrainConfig) -> str:
    """What the online k-NN embeds, in words ("central view", "mean of 16 patches of 16x16 px")."""
    protocol = str(config.knn_protocol or "central")
    if protocol == "central":
        return "central view"
    scale = (f"{config.patch_size}x{config.patch_size} px" if config.spec.patches
             else f"RandomResizedCrop scale ({config.min_scale:g}, {config.max_scale:g})")
    return f"mean of {protocol_title(protocol)} of {scale} (evaluate's protocol {protocol}, seed 0)"


def _train_info(config: TrainConfig, data: TrainingData, epochs_done: int, wall: float, device: torch.device,
                knn: float | None, stopped_early: str | None, init_from: dict[str, Any] | None = None,
                loss: dict[str, Any] | None = None) -> dict[str, Any]:
    """What made the model, stored in its checkpoint's ``train`` dict (plain values only)."""
    patch = config.method in PATCH_METHODS
    return {
        "method": config.method, "arch": config.arch, "width": config.width, "data": data.description,
        "train_images": len(data.images), "input_size": config.input_size,
        "patch_size": config.patch_size if patch else None, "num_patches": config.num_patches if patch else None,
        "min_scale": None if patch else config.min_scale, "max_scale": None if patch else config.max_scale,
        "projector": config.projector, "epochs": epochs_done, "epochs_planned": config.epochs,
        "schedule_epochs": config.schedule_epochs or config.epochs,
        "batch_size": config.batch_size, "lr": config.peak_lr, "base_lr": config.base_lr,
        "optimizer": config.optimizer, "weight_decay": config.weight_decay, "amp": bool(config.amp),
        "lars": {"eta": config.lars_eta, "clip": config.lars_clip, "nesterov": config.spec.lars.nesterov}
        if config.optimizer == "lars" else None,
        "augmentation": dataclasses.asdict(config.augmentation()),
        "seed": config.seed,
        "wall_time_s": wall, "device": _device_name(device), "knn_top1": knn,
        "knn": f"weighted k-NN k={KNN_K} T={KNN_TEMPERATURE}, {_knn_view(config)}, {data.knn_split}",
        "stopped_early": stopped_early, "command": config.command, "init_from": init_from,
        "loss": loss,
    }


KEEP_NOTE = f" (a faster CPU step, a higher peak of memory; {MALLOC_ENV}=default for glibc's own)"


@cli.command
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if cli.resolve_device(args.device).type == "cpu":   # a CPU step without millions of page faults (allocator.py)
        done = keep_freed_memory()
        if os.environ.get("RANK", "0") == "0":
            print(f"malloc: {done}{KEEP_NOTE if done == KEPT else ''}")
    try:
        train(TrainConfig.from_namespace(args))
    except TrainingDiverged as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
