"""Patch-protocol evaluation (paper Fig. 2 and 3b): k-NN and a linear probe on central / 1 / n patches.

A *protocol* says how one image becomes one feature vector; the same protocol builds the training
and the test features of the classifiers:

- ``"central"``: the standard single view (the whole square image), resized to the model's input;
- ``"N"`` (a positive integer): the mean embedding of ``N`` patches drawn at the pretraining scale
  (a fixed side for BagSSL-style models, ``RandomResizedCrop``'s area range for multi-scale ones),
  each resized to the model's input; ``"1"`` is the single-patch protocol;
- ``"grid:P"``: the mean embedding of every patch of a non-overlapping ``P``-pixel tiling grid.

Each feature set is classified by a weighted k-NN (cosine, temperature 0.07, as DINO and
solo-learn do; :mod:`.knn`) and by a linear probe: multinomial logistic regression on the frozen
features, standardised with the training mean and standard deviation, trained with Adam
(``lr`` 1e-3, cosine decay to 0, L2 weight decay 1e-4, batch 256, 100 epochs, zero init, seeded
shuffling) on the device. The probe is deliberately plain and fixed, not tuned per model: the
protocols are compared with one classifier.

EMP-SSL's own evaluation (its ``evaluate.py`` and ``func.py``'s ``linear``) is a preset of both
halves: :meth:`ProbeSchedule.emp_ssl` (SGD on the raw features) and :data:`EMP_SSL_AUGMENTATION`,
the training augmentation applied to every patch before the embeddings are averaged.

Command line::

    python -m ssl_patch_analysis.evaluate --model bagssl --protocols central,1,16 --train-size 2000 --test-size 1000
    python -m ssl_patch_analysis.evaluate --model vicreg --boost          # + central vs n-patch figure
    python -m ssl_patch_analysis.evaluate --model dino-vits16 --tokens --protocols central,1,16,all  # a ViT's tokens
    python -m ssl_patch_analysis.evaluate --model runs/emp-ssl-resnet18-cifar10/checkpoint.pt --layers pre_feature \
        --protocols 20 --probe emp-ssl --augment-patches emp-ssl          # EMP-SSL's protocol

writes ``figures/evaluate_<model>_<data>.png`` and ``.json`` (and ``evaluate_boost_*`` with
``--boost``), and prints the Fig. 2 table (protocol x {kNN k=20, kNN k=200, linear}).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from . import cli
from .augment import Augmentation, resolve_blur_kernel
from .cli import resolve_device
from .data import ImageDataset
from .extract import (
    describe_tokens,
    extract_patch_embeddings,
    extraction_precision,
    model_sha256,
    token_sampler,
    tokens_and_whole_image_embeddings,
)
from .knn import weighted_knn_predict
from .models import SSLModel
from .patches import PatchSampler, central, grid, random_fixed, random_resized
from .report import data_label, format_table, model_label, save_figure_and_json, slug

DEFAULT_PROTOCOLS = ("central", "1", "16")
DEFAULT_KS = (20, 200)
DEFAULT_TEMPERATURE = 0.07
# Patches embedded per in-memory block: bounds the memory of one protocol's raw embeddings
# (65536 x 512 float32 = 128 MiB for a ResNet-18) whatever the number of images.
PATCHES_PER_BLOCK = 65536
# SGD's momentum in the probe (EMP-SSL's func.py; no Nesterov).
SGD_MOMENTUM = 0.9

# The augmentation EMP-SSL's evaluation gives every patch (its dataset/aug.py, the training one):
# flip p=0.5, ColorJitter(0.4, 0.4, 0.4, 0.2) with p=0.8, grayscale p=0.2, Gaussian blur p=0.1
# (sigma 0.1 to 2), solarization p=0.1.
EMP_SSL_AUGMENTATION = Augmentation(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2, blur_p=0.1,
                                    solarize_p=0.1)
PATCH_AUGMENTATIONS: dict[str, Augmentation | None] = {"none": None, "emp-ssl": EMP_SSL_AUGMENTATION}


def describe_augmentation(augmentation: Augmentation | None) -> str:
    """What ``augmentation`` does to each patch, in words ("none" for None)."""
    if augmentation is None:
        return "none"
    a = augmentation
    kernel = (f"{a.blur_kernel_size} px kernel" if a.blur_kernel_size
              else "kernel to 3 sigma and at least 10% of the patch side, 13 px at 32 px")
    return (f"flip p={a.flip_p:g}, colour jitter p={a.jitter_p:g} (brightness {a.brightness:g}, contrast "
            f"{a.contrast:g}, saturation {a.saturation:g}, hue {a.hue:g}), grayscale p={a.grayscale_p:g}, "
            f"Gaussian blur p={a.blur_p:g} (sigma {a.blur_sigma[0]:g}-{a.blur_sigma[1]:g}, {kernel}), "
            f"solarize p={a.solarize_p:g}")


@dataclass(frozen=True)
class PatchScale:
    """The scale patches are drawn at: a fixed side in pixels (BagSSL), or an area range (multi-scale)."""

    patch_size: int | None = None
    scale: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if (self.patch_size is None) == (self.scale is None):
            raise ValueError("a patch scale is either a fixed patch_size or an area range scale=(min, max), "
                             f"exactly one of them; got patch_size={self.patch_size}, scale={self.scale}")

    def describe(self) -> str:
        if self.patch_size is not None:
            return f"{self.patch_size}x{self.patch_size} px patches"
        low, high = self.scale  # type: ignore[misc]
        return f"RandomResizedCrop scale ({low:g}, {high:g})"


def pretraining_scale(model: SSLModel) -> PatchScale:
    """The patch scale ``model`` was trained with, as its checkpoint records it (``info.extra["train"]``)."""
    train = model.info.extra.get("train") or {}
    if train.get("patch_size"):
        return PatchScale(patch_size=int(train["patch_size"]))
    if train.get("min_scale") is not None and train.get("max_scale") is not None:
        return PatchScale(scale=(float(train["min_scale"]), float(train["max_scale"])))
    raise ValueError(
        f"the checkpoint {model.info.source or ''} does not record the patch scale it was trained with "
        "(no patch_size or min_scale/max_scale in its training settings): pass it, e.g. --patch-size 16 "
        "(fixed-scale patches) or --scale 0.08,1 (multi-scale crops)"
    )


def protocol_sampler(protocol: str, patch_scale: PatchScale | None = None, seed: int = 0) -> PatchSampler:
    """The patch sampler of ``protocol`` (``"central"``, ``"N"``, ``"grid:P"``; see the module docstring)."""
    text = protocol.strip().lower()
    if text == "central":
        return central()
    if text.startswith("grid:"):
        size = text.removeprefix("grid:")
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"protocol {protocol!r}: grid:P needs a positive patch side P in pixels, e.g. grid:8")
        return grid(int(size))
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"unknown protocol {protocol!r}: use central, a number of patches N >= 1 (e.g. 1 or 16), "
                         "or grid:P (every patch of a P-pixel tiling grid)")
    if patch_scale is None:
        raise ValueError(f"protocol {protocol!r} draws patches at the pretraining scale: pass patch_scale")
    if patch_scale.patch_size is not None:
        return random_fixed(int(text), patch_scale.patch_size, seed=seed)
    return random_resized(int(text), scale=patch_scale.scale, seed=seed)  # type: ignore[arg-type]


# Mixed into the seed of each image's token subsets: a stream apart from the samplers' and the augmentation's.
_TOKEN_STREAM = 0x746F6B656E73  # "tokens"


def token_protocol(protocol: str) -> str | int:
    """A protocol on a ViT's own tokens (``--tokens``): ``"central"`` (the standard whole-image view, as without
    tokens), an int ``N`` (the mean of ``N`` of the image's tokens, drawn without replacement) or ``"all"`` (the
    mean of every token)."""
    text = protocol.strip().lower()
    if text in ("central", "all"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"protocol {protocol!r} does not apply to tokens: use central, a number of tokens N >= 1 (e.g. "
                     "1 or 16) or all (every token of the image)")


def token_subset(num_tokens: int, n: int, seed: int, image_id: int) -> np.ndarray:
    """The ``n`` token indices (sorted, distinct) of the image ``image_id`` under ``seed``: the same in any batch."""
    if not 1 <= n <= num_tokens:
        raise ValueError(f"cannot draw {n} of the {num_tokens} tokens of an image without replacement: pass a protocol "
                         f"N <= {num_tokens}, or all")
    rng = np.random.default_rng([_TOKEN_STREAM, seed & 0xFFFFFFFFFFFFFFFF, int(image_id)])
    return np.sort(rng.choice(num_tokens, n, replace=False))


def _mean_of_tokens(embeddings: np.ndarray, image_ids: np.ndarray, choice: str | int, seed: int,
                    rows_per_block: int = 4096) -> np.ndarray:
    """``N x P x D`` tokens -> ``N x D`` float32: the mean of every token (``"all"``) or of :func:`token_subset`."""
    out = np.empty((embeddings.shape[0], embeddings.shape[2]), dtype=np.float32)
    for start in range(0, embeddings.shape[0], rows_per_block):
        rows = np.asarray(embeddings[start:start + rows_per_block], dtype=np.float32)
        if choice == "all":
            out[start:start + len(rows)] = rows.mean(axis=1)
            continue
        index = np.stack([token_subset(rows.shape[1], int(choice), seed, i)
                          for i in image_ids[start:start + len(rows)]])
        out[start:start + len(rows)] = np.take_along_axis(rows, index[..., None], axis=1).mean(axis=1)
    return out


def _token_features(model: SSLModel, data: ImageDataset, choice: str | int, *, layer: str, block: int | None,
                    ids: np.ndarray, seed: int, resize_to: int | None, batch_size: int,
                    device: str | torch.device | None, store_dir: str | Path | None,
                    progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`protocol_features` of the token protocols: every token of each image embedded once (one forward
    pass), then the mean of the protocol's tokens. All token protocols of a model share one cached store; without
    a store, :func:`_shared_token_features` of this one protocol."""
    if store_dir is None:
        return _shared_token_features(model, data, [str(choice)], layer=layer, block=block, ids=ids, seed=seed,
                                      resize_to=resize_to, batch_size=batch_size, device=device,
                                      progress=progress)[str(choice)]
    sampler = token_sampler(model, resize_to, block)
    if choice != "all":  # N larger than the token grid: said before any embedding
        token_subset(sampler.num_patches(tuple(data.image_size)), int(choice), seed, 0)
    path = _store_path(Path(store_dir), model, data, f"tokens-block{sampler.block}", sampler, ids, layer,
                       sampler.input_size, precision=extraction_precision(device))
    embeddings = extract_patch_embeddings(model, data, sampler, image_ids=ids, out=path, overwrite=True,
                                          layers=["h"] if layer == "h" else ["h", layer], batch_size=batch_size,
                                          resize_to=sampler.input_size, device=device, dtype="float32",
                                          progress=progress)
    return _mean_of_tokens(embeddings.layer(layer), ids, choice, seed), np.asarray(embeddings.labels, dtype=np.int64)


def _shared_token_features(model: SSLModel, data: ImageDataset, protocols: Sequence[str], *, layer: str,
                           block: int | None, ids: np.ndarray, seed: int, resize_to: int | None, batch_size: int,
                           device: str | torch.device | None,
                           progress: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{protocol: (features, labels)}`` of several token protocols from one forward pass per image, in memory:
    each protocol's features are :func:`protocol_features`'s with ``tokens`` (which would run a pass per protocol
    without a store). ``"central"`` is among them when the tokens are the last block's: the whole-image embedding
    of that pass is then the model's embedding of the whole image at that size, i.e. the central view; for an
    earlier block it is not, and ``"central"`` is left out (for :func:`protocol_features` to embed)."""
    sampler = token_sampler(model, resize_to, block)
    last = describe_tokens(model, sampler)["last_block"]
    choices = {p: token_protocol(p) for p in protocols if token_protocol(p) != "central" or last}
    count = sampler.num_patches(tuple(data.image_size))
    for choice in choices.values():
        if choice not in ("central", "all"):
            token_subset(count, int(choice), seed, 0)  # N larger than the token grid: said before any embedding
    features: dict[str, list[np.ndarray]] = {p: [] for p in choices}
    images_per_block = max(batch_size, PATCHES_PER_BLOCK // count)
    for start in range(0, len(ids), images_per_block):
        block_ids = ids[start:start + images_per_block]
        tokens, whole = tokens_and_whole_image_embeddings(model, data, block=sampler.block, layers=[layer],
                                                          image_ids=block_ids, resize_to=sampler.input_size,
                                                          batch_size=batch_size, device=device, progress=progress)
        for protocol, choice in choices.items():
            features[protocol].append(whole[layer] if choice == "central"
                                      else _mean_of_tokens(tokens[layer], block_ids, choice, seed))
    labels = np.asarray(data.labels, dtype=np.int64)[ids]
    return {p: (np.concatenate(features[p]), labels) for p in choices}


def protocol_title(protocol: str, tokens: bool = False) -> str:
    """How a figure or table names a protocol: "central", "1 patch", "16 patches", "grid 8 px"; with ``tokens``
    "1 token", "16 tokens", "all tokens"."""
    text = protocol.strip().lower()
    if tokens and text != "central":
        choice = token_protocol(text)
        return f"{choice} token" if choice == 1 else f"{choice} tokens"
    if text.isdigit():
        return f"{int(text)} patch" if int(text) == 1 else f"{int(text)} patches"
    if text.startswith("grid:"):
        return f"all {text.removeprefix('grid:')} px grid patches"
    return text


def _needs_scale(protocol: str) -> bool:
    return protocol.strip().isdigit()


def _subset_of_flag(flag: str, data: Any, size: int | None, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """:func:`subset_ids` for the command line: a size the split cannot give is said with its flag."""
    try:
        return subset_ids(data.labels, size, seed, exclude=exclude)
    except ValueError as error:
        raise cli.UserError(f"{flag} {size} ({data_label(data)}): {error}") from None


def subset_ids(labels: np.ndarray, size: int | None, seed: int = 0, exclude: np.ndarray | None = None) -> np.ndarray:
    """A fixed, seeded, class-stratified random subset of ``size`` indices (sorted); ``None``: all.

    Each class gets ``floor(size * its share)`` images, and the remainder goes to the first unused
    indices of one seeded permutation. ``exclude``: indices not to draw (a test subset taken from
    the split that holds the training subset).
    """
    labels = np.asarray(labels)
    pool = np.setdiff1d(np.arange(len(labels)), exclude) if exclude is not None else np.arange(len(labels))
    if size is None:
        return pool
    if not 1 <= size <= len(pool):
        raise ValueError(f"subset size must be between 1 and {len(pool)} (the images available), got {size}")
    order = np.random.default_rng(seed).permutation(pool)
    chosen = np.zeros(len(labels), dtype=bool)
    classes, counts = np.unique(labels[pool], return_counts=True)
    for label, count in zip(classes, counts, strict=True):
        quota = (size * int(count)) // len(pool)
        chosen[order[labels[order] == label][:quota]] = True
    remainder = size - int(chosen.sum())
    chosen[order[~chosen[order]][:remainder]] = True
    return np.flatnonzero(chosen)


def _store_path(store_dir: Path, model: SSLModel, data: ImageDataset, protocol: str, sampler: PatchSampler,
                ids: np.ndarray, layer: str, resize_to: int, augmentation: Augmentation | None = None,
                augmentation_seed: int = 0, precision: str = "float32") -> Path:
    """One store per (model weights, data, sampler, images, layer, size, augmentation and its seed, precision), so
    re-runs reuse only their own, and a float32 and a bf16 run (``--amp``) keep a store each instead of rebuilding
    one in turn. Without augmentation, in float32, the key is the one from before those existed: old caches stay
    valid."""
    parts: list[Any] = [model_sha256(model), data.name, data.split, sampler.to_dict(), layer, resize_to,
                        hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()]
    if augmentation is not None:
        # The seed too: the central and grid samplers ignore theirs, the augmentation does not.
        parts.append({**asdict(augmentation), "seed": augmentation_seed})
    if precision != "float32":
        parts.append({"precision": precision})
    key = json.dumps(parts)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return store_dir / f"{slug(data.name)}-{slug(data.split)}-{slug(protocol)}-{layer}-{len(ids)}img-{digest}"


def _mean_over_patches(embeddings: np.ndarray, rows_per_block: int = 4096) -> np.ndarray:
    """``N x P x D`` -> ``N x D`` float32, block by block (the array may be a memory map)."""
    out = np.empty((embeddings.shape[0], embeddings.shape[2]), dtype=np.float32)
    for start in range(0, embeddings.shape[0], rows_per_block):
        out[start:start + rows_per_block] = embeddings[start:start + rows_per_block].astype(np.float32).mean(axis=1)
    return out


def protocol_features(
    model: SSLModel,
    data: ImageDataset,
    protocol: str,
    *,
    patch_scale: PatchScale | None = None,
    layer: str = "h",
    image_ids: np.ndarray | Sequence[int] | None = None,
    seed: int = 0,
    resize_to: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    store_dir: str | Path | None = None,
    progress: bool = True,
    augmentation: Augmentation | None = None,
    tokens: bool = False,
    block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(features N x D float32, labels N)``: one feature per image of ``data`` under ``protocol``.

    The feature is the mean of the ``layer`` embeddings of the protocol's patches (one patch for
    ``"central"``). ``patch_scale`` defaults to the model's :func:`pretraining_scale` (only the
    ``"N"`` protocols need it); ``resize_to`` is the side every patch is resized to (default the
    model's input size). With ``store_dir`` the patch embeddings are cached on disk (float32), so
    a re-run reads them back instead of embedding again.

    ``augmentation`` (e.g. :data:`EMP_SSL_AUGMENTATION`) is applied to every resized patch before
    the model sees it, as EMP-SSL's evaluation does, drawn per image from ``seed``
    (:func:`.extract.augment_patches`): the same seed gives the same features.

    ``tokens``: a Vision Transformer's own patch tokens of ``block`` (default the last) instead of
    crops (:func:`token_protocol`): ``"N"`` is the mean of ``N`` of the image's tokens
    (:func:`token_subset`, drawn from ``seed`` and the image id), ``"all"`` the mean of every token;
    ``"central"`` stays the standard whole-image view. ``resize_to`` is then the side the whole image
    is fed at; patch scales and augmentations do not apply.
    """
    if tokens and token_protocol(protocol) != "central":
        if augmentation is not None:
            raise ValueError("a patch augmentation does not apply to tokens (they are not cropped): leave it out")
        ids = np.arange(len(data)) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
        return _token_features(model, data, token_protocol(protocol), layer=layer, block=block, ids=ids, seed=seed,
                               resize_to=resize_to, batch_size=batch_size, device=device, store_dir=store_dir,
                               progress=progress)
    if _needs_scale(protocol) and patch_scale is None:
        patch_scale = pretraining_scale(model)
    sampler = protocol_sampler(protocol, patch_scale, seed=seed)
    ids = np.arange(len(data)) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
    size = int(resize_to or model.preprocess.input_size)
    if augmentation is not None:  # its blur kernel named in the cache's key (it changed on 2026-12-07)
        augmentation = resolve_blur_kernel(augmentation, size)
    layers = ["h"] if layer == "h" else ["h", layer]
    options = dict(layers=layers, batch_size=batch_size, resize_to=size, device=device, dtype="float32",
                   progress=progress, augmentation=augmentation, augmentation_seed=seed)
    if store_dir is not None:
        path = _store_path(Path(store_dir), model, data, protocol, sampler, ids, layer, size, augmentation, seed,
                           extraction_precision(device))
        # A cache keyed by its settings: one that is stale (changed image files), damaged beyond repair or of an
        # older store version is rebuilt, never handed back (overwrite only ever touches the store's own files).
        embeddings = extract_patch_embeddings(model, data, sampler, image_ids=ids, out=path, overwrite=True,
                                              **options)
        return _mean_over_patches(embeddings.layer(layer)), np.asarray(embeddings.labels, dtype=np.int64)
    images_per_block = max(batch_size, PATCHES_PER_BLOCK // sampler.num_patches(tuple(data.image_size)))
    features, labels = [], []
    for start in range(0, len(ids), images_per_block):
        block = extract_patch_embeddings(model, data, sampler, image_ids=ids[start:start + images_per_block],
                                         **options)
        features.append(_mean_over_patches(block.layer(layer)))
        labels.append(np.asarray(block.labels, dtype=np.int64))
    return np.concatenate(features), np.concatenate(labels)


def knn_eval(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    test_y: np.ndarray | torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    device: str | torch.device | None = None,
) -> dict[int, float]:
    """Top-1 accuracy (percent) of the weighted cosine k-NN (:func:`.knn.knn_accuracy`) for each ``k``.

    Keyed by the k actually used: a k larger than the bank is clamped to the bank's size
    (:func:`effective_ks`), so ``ks=(20, 200)`` on a bank of 20 images gives ``{20: ...}`` alone.
    """
    return {k: 100.0 * float(torch.from_numpy(correct).float().mean())
            for k, correct in knn_correct(train_x, train_y, test_x, test_y, num_classes, ks, temperature,
                                          device).items()}


def knn_correct(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    test_y: np.ndarray | torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    device: str | torch.device | None = None,
) -> dict[int, np.ndarray]:
    """Whether the weighted cosine k-NN classifies each test feature right (bool, test order), for each ``k``
    (clamped to the bank as in :func:`knn_eval`): the per-image values behind its accuracies."""
    device = resolve_device(device)
    bank = torch.as_tensor(train_x, dtype=torch.float32, device=device)
    bank_labels = torch.as_tensor(train_y, dtype=torch.int64, device=device)
    queries = torch.as_tensor(test_x, dtype=torch.float32, device=device)
    query_labels = torch.as_tensor(test_y, dtype=torch.int64)
    if query_labels.shape != (queries.shape[0],):
        raise ValueError(f"test_labels must hold one label per test feature ({queries.shape[0]}), got "
                         f"shape {tuple(query_labels.shape)}")
    if queries.shape[0] == 0:
        raise ValueError("no test features: k-NN accuracy needs at least one")
    return {k: (weighted_knn_predict(bank, bank_labels, queries, num_classes, k=k, temperature=temperature).cpu()
                == query_labels.cpu()).numpy() for k in effective_ks(ks, len(bank))}


def effective_ks(ks: Sequence[int], bank_size: int) -> list[int]:
    """The k-NN neighbour counts as they run on a bank of ``bank_size`` vectors: each k clamped to the
    bank's size, duplicates dropped, in the order given (``(20, 200)`` on 50 images -> ``[20, 50]``)."""
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"k-NN needs k >= 1, got {list(ks)}")
    if bank_size < 1:
        raise ValueError("the k-NN bank is empty")
    used: list[int] = []
    for k in ks:
        k = min(int(k), bank_size)
        if k not in used:
            used.append(k)
    return used


@dataclass(frozen=True)
class ProbeSchedule:
    """How the linear probe is trained.

    The default: Adam, cosine decay of ``lr`` to 0 over every step, L2 ``weight_decay``, zero init,
    features standardised with the training mean and standard deviation. The other choices:

    - ``optimizer``: ``"adam"`` or ``"sgd"`` (momentum :data:`SGD_MOMENTUM`, no Nesterov);
    - ``lr_step``: the cosine schedule stepped once per minibatch (``"step"``: ``T_max`` = all the
      steps, ends at 0) or once per epoch (``"epoch"``: ``T_max`` = ``epochs``, as EMP-SSL's
      ``CosineAnnealingLR(optimizer, 100)``; the last epoch runs at a small, non-zero lr);
    - ``init``: ``"zeros"`` or ``"default"`` (PyTorch's ``nn.Linear`` init, drawn after
      ``torch.manual_seed(seed)``, without touching the global random state);
    - ``standardize``: False trains on the raw features;
    - ``drop_last``: drop each epoch's last, partial minibatch (as a ``DataLoader(drop_last=True)``).
    """

    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    optimizer: Literal["adam", "sgd"] = "adam"
    lr_step: Literal["step", "epoch"] = "step"
    init: Literal["zeros", "default"] = "zeros"
    standardize: bool = True
    drop_last: bool = False

    def __post_init__(self) -> None:
        finite = 0 < self.lr < math.inf and 0 <= self.weight_decay < math.inf
        if self.epochs < 1 or self.batch_size < 1 or not finite:
            raise ValueError(f"the probe needs epochs >= 1, batch_size >= 1, a finite lr > 0 and weight_decay >= 0; "
                             f"got epochs {self.epochs}, batch_size {self.batch_size}, lr {self.lr}, weight_decay "
                             f"{self.weight_decay}")
        for name, allowed in (("optimizer", ("adam", "sgd")), ("lr_step", ("step", "epoch")),
                              ("init", ("zeros", "default"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"the probe's {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("standardize", "drop_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"the probe's {name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def emp_ssl(cls) -> ProbeSchedule:
        """EMP-SSL's probe (``func.py``'s ``linear`` with ``evaluate.py``'s lr 0.03): SGD, momentum 0.9,
        weight decay 5e-5, batch 100 with the last partial batch dropped, 100 epochs, cosine stepped
        per epoch, PyTorch's default init, raw features."""
        return cls(epochs=100, lr=0.03, weight_decay=5e-5, batch_size=100, optimizer="sgd", lr_step="epoch",
                   init="default", standardize=False, drop_last=True)

    def describe(self) -> str:
        optimizer = "Adam" if self.optimizer == "adam" else f"SGD (momentum {SGD_MOMENTUM:g}, no Nesterov)"
        batch = f"batch {self.batch_size}" + (" (last partial batch dropped)" if self.drop_last else "")
        decay = ("cosine to 0" if self.lr_step == "step"
                 else f"cosine, T_max {self.epochs} epochs, stepped once per epoch")
        init = "zero init" if self.init == "zeros" else "PyTorch's default init (seeded)"
        features = ("features standardised with train mean/std" if self.standardize
                    else "raw features (not standardised)")
        return (f"{optimizer}, {self.epochs} epochs, {batch}, lr {self.lr:g} ({decay}), "
                f"weight decay {self.weight_decay:g} (L2), {init}, {features}")


# The --probe presets.
PROBE_PRESETS: dict[str, ProbeSchedule] = {"adam": ProbeSchedule(), "emp-ssl": ProbeSchedule.emp_ssl()}


@dataclass
class ProbeResult:
    """A trained linear probe: test and train accuracy (percent), its final training loss and schedule.

    ``accuracy`` is the test accuracy after the last epoch, the number to report.
    ``epoch_accuracies`` holds the test accuracy after each epoch; its maximum (what EMP-SSL's
    ``func.py`` prints as "best linear test acc") selects an epoch on the test set, so it is no
    unbiased estimate. ``weight`` (``C x D``) and ``bias`` (``C``) act on the features
    ``(x - mean) / std`` (``mean`` 0 and ``std`` 1 when the schedule does not standardise).
    """

    accuracy: float
    train_accuracy: float
    final_loss: float
    schedule: ProbeSchedule
    seed: int
    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    epoch_accuracies: list[float] = dataclasses.field(default_factory=list)
    correct: np.ndarray | None = None  # per test feature, after the last epoch: classified right (bool)

    @property
    def best_epoch_accuracy_on_test(self) -> float:
        """The best test accuracy over the epochs: selected on the test set (EMP-SSL's "best")."""
        return max(self.epoch_accuracies)


def _as_labels(labels: np.ndarray | torch.Tensor, count: int, num_classes: int, what: str) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.shape != (count,) or labels.is_floating_point():
        raise ValueError(f"{what} labels must be {count} integers (one per feature), got {labels.dtype} "
                         f"of shape {tuple(labels.shape)}")
    if count and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
        raise ValueError(f"{what} labels must lie in 0..{num_classes - 1} (num_classes={num_classes}), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    return labels.to(torch.int64)


def linear_probe(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    test_y: np.ndarray | torch.Tensor,
    num_classes: int,
    schedule: ProbeSchedule = ProbeSchedule(),
    seed: int = 0,
    device: str | torch.device | None = None,
) -> ProbeResult:
    """Multinomial logistic regression on frozen features (see :class:`ProbeSchedule`), deterministic given ``seed``.

    ``seed`` orders the minibatches (a fresh permutation each epoch from ``torch.Generator().manual_seed(seed)``)
    and, with ``init="default"``, draws the initial weights (after ``torch.manual_seed(seed)``); zero
    init starts from zero. With ``standardize`` the features are standardised with the training mean
    and standard deviation (constant features stay 0).
    """
    device = resolve_device(device)
    x = torch.as_tensor(train_x, dtype=torch.float32, device=device)
    x_test = torch.as_tensor(test_x, dtype=torch.float32, device=device)
    if x.ndim != 2 or x_test.ndim != 2 or x.shape[1] != x_test.shape[1] or len(x) == 0 or len(x_test) == 0:
        raise ValueError(f"features must be non-empty N x D arrays of one dimension D, got train "
                         f"{tuple(x.shape)} and test {tuple(x_test.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(x_test).all()):
        raise ValueError("the features hold NaN or infinite values: check the model and the extraction")
    y = _as_labels(train_y, len(x), num_classes, "train").to(device)
    y_test = _as_labels(test_y, len(x_test), num_classes, "test").to(device)

    batches = len(x) // schedule.batch_size if schedule.drop_last else math.ceil(len(x) / schedule.batch_size)
    if batches == 0:
        raise ValueError(f"dropping the last partial batch leaves nothing to train on: {len(x)} training features "
                         f"are fewer than one batch of {schedule.batch_size}; pass a smaller batch size")

    if schedule.standardize:
        mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False)
        # A constant feature carries nothing: dividing by 1 keeps it at 0 after centring.
        std = torch.where(std > 0, std, torch.ones_like(std))
        x, x_test = (x - mean) / std, (x_test - mean) / std
    else:
        mean, std = torch.zeros(x.shape[1], device=device), torch.ones(x.shape[1], device=device)

    classifier = _initial_classifier(x.shape[1], num_classes, schedule.init, seed).to(device)
    if schedule.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(classifier.parameters(), lr=schedule.lr,
                                                            weight_decay=schedule.weight_decay)
    else:
        optimizer = torch.optim.SGD(classifier.parameters(), lr=schedule.lr, momentum=SGD_MOMENTUM,
                                    weight_decay=schedule.weight_decay)
    per_step = schedule.lr_step == "step"
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=schedule.epochs * batches if per_step else schedule.epochs)
    shuffler = torch.Generator().manual_seed(seed)
    # Filled on the device, read once at the end: no wait for the device between epochs.
    epoch_accuracies = torch.empty(schedule.epochs, device=device)
    for epoch in range(schedule.epochs):
        order = torch.randperm(len(x), generator=shuffler).to(device)
        for start in range(0, batches * schedule.batch_size, schedule.batch_size):
            batch = order[start:start + schedule.batch_size]
            loss = F.cross_entropy(classifier(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if per_step:
                scheduler.step()
        if not per_step:
            scheduler.step()
        with torch.no_grad():
            epoch_accuracies[epoch] = 100.0 * (classifier(x_test).argmax(1) == y_test).float().mean()

    with torch.no_grad():
        train_logits = classifier(x)
        final_loss = float(F.cross_entropy(train_logits, y))
        train_accuracy = 100.0 * float((train_logits.argmax(1) == y).float().mean())
        correct = classifier(x_test).argmax(1) == y_test
        accuracy = 100.0 * float(correct.float().mean())
    return ProbeResult(
        accuracy=accuracy, train_accuracy=train_accuracy, final_loss=final_loss, schedule=schedule, seed=seed,
        weight=classifier.weight.detach().cpu().numpy(), bias=classifier.bias.detach().cpu().numpy(),
        mean=mean.cpu().numpy(), std=std.cpu().numpy(), epoch_accuracies=epoch_accuracies.cpu().tolist(),
        correct=correct.cpu().numpy(),
    )


def _initial_classifier(dim: int, num_classes: int, init: str, seed: int) -> torch.nn.Linear:
    """The probe's ``nn.Linear`` before training, on the CPU: zeros, or PyTorch's default init drawn
    after ``torch.manual_seed(seed)``; the caller's global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = torch.nn.Linear(dim, num_classes)
    if init == "zeros":
        torch.nn.init.zeros_(classifier.weight)
        torch.nn.init.zeros_(classifier.bias)
    return classifier


def evaluate_features(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    schedule: ProbeSchedule = ProbeSchedule(),
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Both classifiers on one feature set: ``{"knn": {k: acc}, "linear": acc, "linear_train": acc, ...}``.

    ``"linear"`` is the probe's test accuracy after its last epoch; ``"linear_each_epoch"`` lists it
    after every epoch, and ``"linear_best_epoch_selected_on_test"`` is their maximum (EMP-SSL's
    "best", which picks the epoch on the test set). ``"correct"`` keeps, per test feature in order, whether each
    classifier got it right (``{"knn": {k: "0110..."}, "linear": "..."}``, :func:`correct_string`).
    """
    started = time.perf_counter()
    knn_right = knn_correct(train_x, train_y, test_x, test_y, num_classes, ks, temperature, device)
    knn = {k: 100.0 * float(torch.from_numpy(right).float().mean()) for k, right in knn_right.items()}
    knn_seconds = time.perf_counter() - started
    probe = linear_probe(train_x, train_y, test_x, test_y, num_classes, schedule, seed=seed, device=device)
    return {"knn": knn, "linear": probe.accuracy, "linear_train": probe.train_accuracy,
            "linear_final_loss": probe.final_loss, "linear_each_epoch": probe.epoch_accuracies,
            "linear_best_epoch_selected_on_test": probe.best_epoch_accuracy_on_test,
            "correct": {"knn": {k: correct_string(right) for k, right in knn_right.items()},
                        "linear": correct_string(probe.correct)},
            "seconds": {"knn": knn_seconds, "probe": time.perf_counter() - started - knn_seconds}}


def correct_string(correct: np.ndarray) -> str:
    """Per-item right/wrong as a string of "1"/"0" in test order (how evaluate JSONs keep them: paired intervals
    of differences between protocols or models on the same test images, ``claims``)."""
    return "".join("1" if c else "0" for c in np.asarray(correct, dtype=bool).reshape(-1))


def read_correct(text: str) -> np.ndarray:
    """The bool array of :func:`correct_string`."""
    if set(text) - {"0", "1"}:
        raise ValueError("per-item correctness must be a string of 0 and 1")
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) == ord("1")


def ids_digest(ids: np.ndarray) -> str:
    """sha256 of image ids (int64): two evaluations with the same digest classified the same test images."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(ids, dtype=np.int64)).tobytes()).hexdigest()


def _same_images(a: ImageDataset, b: ImageDataset) -> bool:
    """The same data set and split (one object, or loaded twice: name, split, size and labels agree)."""
    return a is b or (a.name == b.name and a.split == b.split and len(a) == len(b)
                      and torch.equal(torch.as_tensor(a.labels), torch.as_tensor(b.labels)))


def _check_test_images_not_in_bank(train_data: ImageDataset, test_data: ImageDataset, train_ids: np.ndarray,
                                   test_ids: np.ndarray) -> None:
    """A test image in the k-NN bank is its own nearest neighbour (and the probe trains on it): refused."""
    if not _same_images(train_data, test_data):
        return
    shared = np.intersect1d(train_ids, test_ids)
    if len(shared):
        raise ValueError(f"train_ids and test_ids share {len(shared)} images of {train_data.name} {train_data.split}: "
                         "a test image in the k-NN bank is its own nearest neighbour (and the linear probe trains on "
                         "it); pass disjoint ids (subset_ids(labels, size, exclude=train_ids) draws them), or a test "
                         "split")


def evaluate_protocols(
    model: SSLModel,
    train_data: ImageDataset,
    test_data: ImageDataset,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    *,
    patch_scale: PatchScale | None = None,
    layer: str = "h",
    train_ids: np.ndarray | None = None,
    test_ids: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    schedule: ProbeSchedule = ProbeSchedule(),
    seed: int = 0,
    resize_to: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    store_dir: str | Path | None = None,
    progress: bool = True,
    augmentation: Augmentation | None = None,
    tokens: bool = False,
    block: int | None = None,
) -> dict[str, Any]:
    """k-NN and linear probe for every protocol; the train and test features are built the same way
    (``augmentation``, if any, applied to the patches of both: see :func:`protocol_features`).
    ``tokens``: the protocols on a ViT's own tokens of ``block`` (:func:`token_protocol`). Without a
    ``store_dir`` they all come from one forward pass per image (and ``"central"`` too when ``block`` is the
    last: the whole-image embedding of that pass); with one, the tokens are cached in one store and
    ``"central"`` in a store of its own.

    Returns the numbers behind the Fig. 2 table as plain values: ``results["protocols"]`` holds, per
    protocol, ``{"protocol", "title", "sampler", "patches_per_image", "feature_dim", "knn": {k: acc},
    "linear", "linear_train", "linear_final_loss", "linear_each_epoch",
    "linear_best_epoch_selected_on_test", "correct", "seconds"}``; accuracies are top-1 percent; ``correct``
    holds each test image's right/wrong (in ``test_ids`` order, whose sha256 is ``results["test_ids_sha256"]``);
    ``seconds["features"]`` of protocols that share a forward pass is an even share of that pass.
    """
    if not protocols:
        raise ValueError("pass at least one protocol (central, N, grid:P)")
    if set(train_data.class_names) != set(test_data.class_names) or len(train_data.class_names) == 0:
        raise ValueError(f"train ({train_data.name} {train_data.split}) and test ({test_data.name} "
                         f"{test_data.split}) data must share their classes")
    tokens_grid = token_sampler(model, resize_to, block) if tokens else None  # a ViT, or a one-line error
    if tokens:
        for protocol in protocols:
            token_protocol(protocol)
    elif patch_scale is None and any(_needs_scale(p) for p in protocols):
        patch_scale = pretraining_scale(model)
    for protocol in protocols:
        if not tokens or token_protocol(protocol) == "central":
            protocol_sampler(protocol, patch_scale, seed)  # reject a bad protocol before any embedding
    num_classes = len(train_data.class_names)
    train_ids = np.arange(len(train_data)) if train_ids is None else np.asarray(train_ids)
    test_ids = np.arange(len(test_data)) if test_ids is None else np.asarray(test_ids)
    _check_test_images_not_in_bank(train_data, test_data, train_ids, test_ids)
    requested_ks = [int(k) for k in ks]
    ks = effective_ks(requested_ks, len(train_ids))
    if ks != requested_ks:
        print(f"k-NN: the bank holds {len(train_ids)} training images, so k = {', '.join(map(str, requested_ks))} "
              f"runs as k = {', '.join(map(str, ks))} (the tables and the JSON name the k used)", file=sys.stderr)
    options = dict(patch_scale=patch_scale, layer=layer, seed=seed, resize_to=resize_to, batch_size=batch_size,
                   device=device, store_dir=store_dir, progress=progress, augmentation=augmentation, tokens=tokens,
                   block=block)
    shared: dict[str, tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {}
    shared_seconds = 0.0
    if tokens and store_dir is None and any(token_protocol(p) != "central" for p in protocols):
        started = time.perf_counter()  # every token protocol (and central, of the last block) from one pass
        pass_options = dict(layer=layer, block=block, seed=seed, resize_to=resize_to, batch_size=batch_size,
                            device=device, progress=progress)
        on_train = _shared_token_features(model, train_data, protocols, ids=train_ids, **pass_options)
        on_test = _shared_token_features(model, test_data, protocols, ids=test_ids, **pass_options)
        shared = {p: (on_train[p], on_test[p]) for p in on_train}
        shared_seconds = (time.perf_counter() - started) / len(shared)
    rows = []
    for protocol in protocols:
        started = time.perf_counter()
        if protocol in shared:
            (train_x, train_y), (test_x, test_y) = shared[protocol]
        else:
            train_x, train_y = protocol_features(model, train_data, protocol, image_ids=train_ids, **options)
            test_x, test_y = protocol_features(model, test_data, protocol, image_ids=test_ids, **options)
        feature_seconds = shared_seconds if protocol in shared else time.perf_counter() - started
        scores = evaluate_features(train_x, train_y, test_x, test_y, num_classes, ks, temperature, schedule,
                                   seed, device)
        on_tokens = tokens_grid is not None and token_protocol(protocol) != "central"
        sampler = tokens_grid if on_tokens else protocol_sampler(protocol, patch_scale, seed)
        per_image = sampler.num_patches(tuple(test_data.image_size))
        if on_tokens and token_protocol(protocol) != "all":
            per_image = int(token_protocol(protocol))
        rows.append({"protocol": protocol, "title": protocol_title(protocol, tokens), "sampler": sampler.to_dict(),
                     "patches_per_image": per_image,
                     "feature_dim": int(train_x.shape[1]), **scores,
                     "seconds": {"features": feature_seconds, **scores["seconds"]}})
    return {
        "model": model_label(model), "model_source": model.info.source, "method": model.info.method,
        "train_data": data_label(train_data), "test_data": data_label(test_data),
        "train_size": len(train_ids), "test_size": len(test_ids), "num_classes": num_classes,
        "test_ids_sha256": ids_digest(test_ids),
        "layer": layer, "seed": seed, "resize_to": int(resize_to or model.preprocess.input_size),
        "patch_scale": asdict(patch_scale) if patch_scale is not None else None,
        "patch_scale_text": patch_scale.describe() if patch_scale is not None else None,
        "knn_settings": {"ks": ks, "ks_requested": requested_ks, "temperature": temperature, "similarity": "cosine"},
        "probe_schedule": {**asdict(schedule), "text": schedule.describe()},
        "augmentation": asdict(augmentation) if augmentation is not None else None,
        "augmentation_text": describe_augmentation(augmentation),
        "tokens": describe_tokens(model, tokens_grid) if tokens_grid is not None else None,
        "protocols": rows,
    }


def patch_boost(results: dict[str, Any]) -> dict[str, Any]:
    """Central vs the largest n-patch protocol of the same model: accuracies and the gain, per classifier."""
    by_protocol = {row["protocol"]: row for row in results["protocols"]}
    many = [p for p in by_protocol if p.strip().isdigit() and int(p) > 1]
    if "central" not in by_protocol or not many:
        raise ValueError("the patch boost compares the central view with n > 1 patches: evaluate the protocols "
                         "central and N (e.g. --protocols central,1,16)")
    patches = max(many, key=int)
    rows = []
    for name, pick in _classifiers(results):
        before, after = pick(by_protocol["central"]), pick(by_protocol[patches])
        rows.append({"classifier": name, "central": before, "patches": after, "delta": after - before})
    return {"patch_protocol": patches, "patch_title": protocol_title(patches), "rows": rows}


def _classifiers(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(name, accuracy of a protocol row)`` for each classifier evaluated, in table order."""
    knn = [(f"kNN k={k}", lambda row, k=k: _knn_score(row, k)) for k in results["knn_settings"]["ks"]]
    return knn + [("linear", lambda row: row["linear"])]


def _knn_score(row: dict[str, Any], k: int) -> float:
    # JSON turns the integer keys into strings; accept both so results read back from disk work too.
    return row["knn"][k] if k in row["knn"] else row["knn"][str(k)]


def results_table(results: dict[str, Any]) -> str:
    """The Fig. 2 table: one row per protocol, one column per classifier (top-1 %)."""
    classifiers = _classifiers(results)
    rows = [[row["title"], row["patches_per_image"], *(pick(row) for _, pick in classifiers)]
            for row in results["protocols"]]
    return format_table(rows, ["protocol", "patches", *(name for name, _ in classifiers)], floatfmt=".1f")


def boost_table(boost: dict[str, Any]) -> str:
    rows = [[row["classifier"], row["central"], row["patches"], f"{row['delta']:+.1f}"] for row in boost["rows"]]
    return format_table(rows, ["classifier", "central", boost["patch_title"], "gain (points)"], floatfmt=".1f")


def _subtitle(results: dict[str, Any]) -> str:
    scale = f", {results['patch_scale_text']}" if results.get("patch_scale_text") else ""
    augmented = ", augmented patches" if results.get("augmentation") else ""
    tokens = f", ViT tokens of block {results['tokens']['block']}" if results.get("tokens") else ""
    return (f"train {results['train_size']} / test {results['test_size']} images, layer {results['layer']}"
            f"{scale}{augmented}{tokens}")


def plot_evaluation(results: dict[str, Any]):
    """Grouped bars: one group per protocol, one bar per classifier, with the chance level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classifiers = _classifiers(results)
    protocols = results["protocols"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(protocols) + 2), 4.6))
    width = 0.8 / len(classifiers)
    positions = np.arange(len(protocols))
    for i, (name, pick) in enumerate(classifiers):
        values = [pick(row) for row in protocols]
        bars = ax.bar(positions + (i - (len(classifiers) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.axhline(100.0 / results["num_classes"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(positions, [row["title"] for row in protocols])
    ax.set_xlabel("evaluation protocol (same for train and test features)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{results['model']} on {results['test_data']}: k-NN and linear probe per protocol\n"
                 f"{_subtitle(results)}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, ncols=2)
    fig.tight_layout()
    return fig


def plot_boost(results: dict[str, Any], boost: dict[str, Any]):
    """Central view vs the n-patch mean for each classifier, with the gain written above the pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = boost["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    positions = np.arange(len(rows))
    for offset, key, label in ((-0.2, "central", "central view"), (0.2, "patches", f"mean of {boost['patch_title']}")):
        bars = ax.bar(positions + offset, [row[key] for row in rows], 0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    for x, row in zip(positions, rows, strict=True):
        top = max(row["central"], row["patches"])
        ax.annotate(f"{row['delta']:+.1f} pts", (x, top + 6), ha="center", fontsize=9, fontweight="bold")
    ax.axhline(100.0 / results["num_classes"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(positions, [row["classifier"] for row in rows])
    ax.set_xlabel("classifier on frozen features")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{results['model']} on {results['test_data']}: patch aggregation boost\n{_subtitle(results)}",
                 fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def _patch_scale_from_args(args: argparse.Namespace) -> PatchScale | None:
    if args.patch_size is not None and args.scale is not None:
        raise cli.UserError("pass --patch-size (fixed-scale patches) or --scale (multi-scale crops), not both")
    if args.patch_size is not None:
        return PatchScale(patch_size=args.patch_size)
    if args.scale is not None:
        return PatchScale(scale=args.scale)
    return None


def probe_schedule_from_args(args: argparse.Namespace) -> ProbeSchedule:
    """The ``--probe`` preset, with the numbers that ``--probe-epochs --probe-lr --probe-weight-decay
    --probe-batch-size`` give."""
    given = {"epochs": args.probe_epochs, "lr": args.probe_lr, "weight_decay": args.probe_weight_decay,
             "batch_size": args.probe_batch_size}
    return dataclasses.replace(PROBE_PRESETS[args.probe], **{k: v for k, v in given.items() if v is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m ssl_patch_analysis.evaluate", renamed=cli.RENAMED_FLAGS["evaluate"],
        description="k-NN and linear-probe accuracy of a self-supervised model under the central, 1-patch and "
                    "n-patch protocols (paper Fig. 2, 3b).",
    )
    cli.add_analysis_args(parser)
    parser.add_argument("--train-split", default="train",
                        help="split the classifiers are fitted on (default: train; with the test split itself, "
                             "the two subsets are disjoint)")
    parser.add_argument("--protocols", default=",".join(DEFAULT_PROTOCOLS),
                        help="comma-separated: central, N (mean of N patches at the pretraining scale), grid:P "
                             "(every patch of a P-px tiling grid); with --tokens: central, N (mean of N tokens), all "
                             f"(every token) (default: {','.join(DEFAULT_PROTOCOLS)})")
    parser.add_argument("--patch-size", type=cli.positive_int, default=None,
                        help="fixed patch side in pixels (default: the checkpoint's pretraining patch size)")
    cli.add_scale_arg(parser, None, "multi-scale crops' area range, e.g. 0.08,1; none: the checkpoint's pretraining "
                                    "crops")
    cli.add_layers_arg(parser, ["h"], one=True)
    parser.add_argument("--train-size", type=cli.positive_int, default=None,
                        help="seeded class-stratified subset of the train split (default: all)")
    parser.add_argument("--test-size", type=cli.positive_int, default=None,
                        help="seeded class-stratified subset of the test split (default: all)")
    cli.add_batch_size_arg(parser, 64, "images per embedding batch")
    cli.add_resize_arg(parser)
    cli.add_tokens_args(parser)
    parser.add_argument("--k", type=cli.int_list, default=list(DEFAULT_KS),
                        help=f"k-NN neighbours, comma-separated (default {','.join(map(str, DEFAULT_KS))})")
    parser.add_argument("--temperature", type=cli.positive_float, default=DEFAULT_TEMPERATURE,
                        help=f"k-NN vote temperature (default {DEFAULT_TEMPERATURE})")
    adam, emp_ssl = PROBE_PRESETS["adam"], PROBE_PRESETS["emp-ssl"]
    parser.add_argument("--probe", default="adam", choices=tuple(PROBE_PRESETS),
                        help="linear probe: adam (default; Adam on standardised features, cosine per step, zero "
                             "init) or emp-ssl (EMP-SSL's func.py linear: SGD momentum 0.9 on raw features, cosine "
                             "per epoch, PyTorch's default init, last partial batch dropped)")
    parser.add_argument("--probe-epochs", type=cli.positive_int, default=None,
                        help=f"linear probe epochs (default: the --probe preset's, {adam.epochs} / {emp_ssl.epochs})")
    parser.add_argument("--probe-lr", type=cli.positive_float, default=None,
                        help=f"linear probe lr (default: the --probe preset's, {adam.lr:g} / {emp_ssl.lr:g})")
    parser.add_argument("--probe-weight-decay", type=cli.non_negative_float, default=None,
                        help=f"linear probe L2 weight decay (default: the --probe preset's, {adam.weight_decay:g} / "
                             f"{emp_ssl.weight_decay:g})")
    parser.add_argument("--probe-batch-size", type=cli.positive_int, default=None,
                        help=f"linear probe minibatch (default: the --probe preset's, {adam.batch_size} / "
                             f"{emp_ssl.batch_size})")
    parser.add_argument("--augment-patches", default="none", choices=tuple(PATCH_AUGMENTATIONS),
                        help="augment every patch before embedding it (train and test features alike, seeded by "
                             "--seed): none (default) or emp-ssl (EMP-SSL's evaluation: its training augmentation)")
    parser.add_argument("--boost", action="store_true",
                        help="also write evaluate_boost_<model>_<data>: central vs the n-patch mean, with the gain")
    parser.add_argument("--cache-dir", type=cli.folder, default=None,
                        help="keep the patch-embedding stores in this folder, so that a re-run does not embed again")
    return parser


@cli.command
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    with cli.extraction_flags(args):
        return _main(args)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    ks = args.k
    layer = cli.one_layer(args, "evaluate")
    patch_scale = _patch_scale_from_args(args)
    schedule = probe_schedule_from_args(args)
    augmentation = PATCH_AUGMENTATIONS[args.augment_patches]
    block = cli.token_block(args)
    if args.tokens and (patch_scale is not None or augmentation is not None):
        raise cli.UserError("--patch-size, --scale and --augment-patches apply to crops, not to --tokens (the ViT's "
                            "own tokens of the whole image)")
    model, test_data, device = cli.load_model_and_data(args)
    of = cli.output_of(args, model, test_data)  # another model's outputs there: refused before the work
    stem = cli.output_stem_for(args, "evaluate", of)
    boost_stem = cli.output_stem_for(args, "evaluate_boost", of) if args.boost else None
    if args.tokens:  # before the (larger) training split is read
        tokens_grid = token_sampler(model, args.resize_to, block)
        for protocol in protocols:
            choice = token_protocol(protocol)
            if isinstance(choice, int):  # more tokens than the grid has: said now
                token_subset(tokens_grid.num_patches(tuple(test_data.image_size)), choice, args.seed, 0)
    elif patch_scale is None and any(_needs_scale(p) for p in protocols):
        patch_scale = pretraining_scale(model)
    for protocol in protocols:  # before the (larger) training split is read
        if not args.tokens or token_protocol(protocol) == "central":
            protocol_sampler(protocol, patch_scale, args.seed)
    train_data = cli.load_data_from_args(args, args.train_split)
    train_ids = _subset_of_flag("--train-size", train_data, args.train_size, args.seed)
    same_split = train_data.split == test_data.split
    test_ids = _subset_of_flag("--test-size", test_data, args.test_size, args.seed + 1,
                               exclude=train_ids if same_split else None)
    if schedule.drop_last and len(train_ids) < schedule.batch_size:
        raise cli.UserError(f"the {args.probe} probe drops the last partial batch, and {len(train_ids)} "
                            f"training images are fewer than one batch of {schedule.batch_size}: pass a smaller "
                            "--probe-batch-size or a larger --train-size")
    print(f"model: {model_label(model)}; train: {data_label(train_data)} ({len(train_ids)} images), "
          f"test: {data_label(test_data)} ({len(test_ids)} images); layer {layer}; device {device}")
    if patch_scale is not None:
        print(f"patches: {patch_scale.describe()}, seed {args.seed}")
    if args.tokens:
        print(f"tokens: the {tokens_grid.grid[0]} x {tokens_grid.grid[1]} tokens of block {tokens_grid.block}, each "
              f"image fed whole at {tokens_grid.input_size} px; token subsets seeded by {args.seed}")
    print(f"k-NN: cosine, k = {', '.join(map(str, ks))}, temperature {args.temperature:g}")
    print(f"patch augmentation: {args.augment_patches}"
          + (f" ({describe_augmentation(augmentation)}), seed {args.seed}" if augmentation is not None else ""))
    print(f"linear probe ({args.probe}): {schedule.describe()}, seed {args.seed}")
    started = time.perf_counter()
    results = evaluate_protocols(
        model, train_data, test_data, protocols, patch_scale=patch_scale, layer=layer, train_ids=train_ids,
        test_ids=test_ids, ks=ks, temperature=args.temperature, schedule=schedule, seed=args.seed,
        resize_to=args.resize_to, batch_size=args.batch_size, device=device, store_dir=args.cache_dir,
        progress=not args.no_progress, augmentation=augmentation, tokens=args.tokens, block=block,
    )
    results["probe"] = args.probe
    results["patch_augmentation"] = args.augment_patches
    results["wall_seconds"] = time.perf_counter() - started
    results["command"] = cli.running_command()
    results["output_of"] = of
    print()
    print(results_table(results))
    if args.probe == "emp-ssl":
        best = ", ".join(f"{row['title']} {row['linear_best_epoch_selected_on_test']:.1f}"
                         for row in results["protocols"])
        print(f"linear, best epoch selected on the test set (what EMP-SSL's func.py prints as best; the table "
              f"reports the last epoch): {best}")
    written = []
    if args.boost:
        results["boost"] = patch_boost(results)
        print()
        print(boost_table(results["boost"]))
        context = {key: value for key, value in results.items() if key != "protocols"}
        written += save_figure_and_json(plot_boost(results, results["boost"]), context, boost_stem, pdf=args.pdf)
    written = save_figure_and_json(plot_evaluation(results), results, stem, pdf=args.pdf) + written
    print(f"\n{results['wall_seconds']:.0f} s; wrote " + ", ".join(str(p) for p in written))
    return results


if __name__ == "__main__":
    main()
