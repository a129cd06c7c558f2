"""Aggregation convergence (paper Fig. 3a): does the mean of N patch embeddings approach the whole image's?

For each image, the whole-image embedding (the central view: the whole image on CIFAR) is compared,
by cosine similarity, with the mean embedding of N patches of one fixed size, for N = 1, 2, 4, 8,
16 and all the patches of a grid. For a multi-scale pretrained model the similarity rises towards 1
as N grows. Beside it, the chance level: the same similarity to the whole-image embedding of a
*different* image (a random derangement of the images, with the same patch subsets), so that a high
similarity is read against what any image would give.

Efficient design: every grid patch of an image is embedded once (:func:`~.extract.extract_patch_embeddings`);
an N-patch mean is then the mean of a random subset (without replacement) of those rows, so many
random draws cost no forward passes.

- Patch sizes: default 1/4, 1/2 and 3/4 of the image side (8, 16, 24 px on CIFAR; 56, 112, 168 on
  224 px images).
- Grid stride (:func:`default_stride`): the smaller of side/8 and (side - patch)/4 pixels, so each
  grid holds at least 5 x 5 = 25 positions (N = 16 stays measurable) and steps at most 4 px on
  CIFAR: 7x7, 5x5 and 5x5 grids for 8, 16 and 24 px patches on 32 px images.
- Patches are resized to the model's input size (the paper's patch evaluation); ``resize_to="native"``
  feeds every patch, and the whole image, at its own size.
- Spread: ``std`` is the standard deviation over images of each image's similarity (averaged over
  the draws); ``ci95`` is the half-width of the 95% confidence interval of the mean over images
  (Student t). The figure shades mean +- std.

Command line (writes ``figures/convergence_<model>_<data>.png`` and ``.json``)::

    python -m ssl_patch_analysis.convergence --model vicreg
    python -m ssl_patch_analysis.convergence --model bagssl --patch-sizes 8,16,24 --n-values 1,2,4,8,16,all
    python -m ssl_patch_analysis.convergence --model dino-vits16 --tokens  # a ViT's own tokens vs its class token
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import stats

from . import cli
from .extract import (
    describe_tokens,
    extract_patch_embeddings,
    token_sampler,
    tokens_and_whole_image_embeddings,
)
from .models import SSLModel
from .patches import central, grid
from .report import data_label, format_table, model_label, save_figure_and_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_N_VALUES: tuple[int | str, ...] = (1, 2, 4, 8, 16, "all")
DEFAULT_PATCH_FRACTIONS = (1 / 4, 1 / 2, 3 / 4)
DEFAULT_NUM_IMAGES = 128
DEFAULT_DRAWS = 20
LAYER_CHOICES = ("h", "z", "pre_feature")
LAYER_NAMES = {"h": "embedding h", "z": "projection z", "pre_feature": "pre-feature layer"}
ALL = "all"

NValue = int | str


def default_patch_sizes(image_side: int) -> list[int]:
    """1/4, 1/2 and 3/4 of the image side: 8, 16, 24 on 32 px images; 56, 112, 168 on 224 px ones."""
    return [max(1, round(image_side * fraction)) for fraction in DEFAULT_PATCH_FRACTIONS]


def default_stride(patch_size: int, image_side: int) -> int:
    """The smaller of ``image_side / 8`` and ``(image_side - patch_size) / 4`` pixels, at least 1.

    The first bound keeps the grid dense (4 px on CIFAR, 28 px at 224 px); the second gives every
    grid at least 5 positions per axis, so that N = 16 patches can be drawn without replacement.
    """
    return max(1, min(image_side // 8, (image_side - patch_size) // 4))


def parse_n_values(text: str) -> list[NValue]:
    """``"1,2,4,8,16,all"`` -> ``[1, 2, 4, 8, 16, "all"]``."""
    values: list[NValue] = []
    for item in text.split(","):
        item = item.strip().lower()
        if item == ALL:
            values.append(ALL)
        elif item.isdigit() and int(item) >= 1:
            values.append(int(item))
        else:
            raise ValueError(f"N values must be positive integers or 'all', separated by commas "
                             f"(e.g. 1,2,4,8,16,all); got {item!r} in {text!r}")
    return values


def _check_n_values(n_values: Sequence[NValue]) -> list[NValue]:
    checked: list[NValue] = []
    for n in n_values:
        if n == ALL:
            checked.append(ALL)
        elif isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1:
            checked.append(int(n))
        else:
            raise ValueError(f"each N must be a positive integer or 'all', got {n!r}")
    if not checked:
        raise ValueError("n_values is empty: pass at least one N (e.g. [1, 2, 4, 8, 16, 'all'])")
    return checked


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of ``0..n-1`` without fixed points: ``partner[i] != i`` for every ``i``.

    One random cycle through all images (``n >= 2``), so every image is paired with another one.
    """
    if n < 2:
        raise ValueError(f"a chance level needs at least 2 images (each is compared with another), got {n}")
    order = rng.permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity along the last axis (0 where a vector is zero)."""
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.einsum("...k,...k->...", a, b) / np.maximum(norms, 1e-30)


def cosine_to_whole_image(patch_embeddings: np.ndarray, whole: np.ndarray, n_values: Sequence[NValue], draws: int,
                          rng: np.random.Generator, partner: np.ndarray | None = None
                          ) -> dict[str, dict[str, np.ndarray]]:
    """Cosine similarity between the mean of N patch embeddings of each image and its whole-image embedding.

    - ``patch_embeddings``: ``I x P x D``, the ``P`` patches of each of ``I`` images; ``whole``: ``I x D``.
    - ``n_values``: positive integers ``N <= P`` and/or ``"all"`` (the mean of all ``P`` patches).
    - ``draws``: random subsets per image and integer N. For each integer N, in the order given, the
      keys ``rng.random((draws, I, P))`` are drawn; the subset of draw ``d`` and image ``i`` is the N
      patches with the smallest keys ``[d, i]`` (a uniform subset without replacement). ``"all"``
      draws nothing.
    - ``partner``: optional image indices (a derangement): the chance level compares the same patch
      means of image ``i`` with ``whole[partner[i]]``.

    Returns ``{str(N): {"similarity": draws x I, "chance": draws x I (with partner)}}`` (one row for
    ``"all"``), computed in float64.
    """
    patches = np.asarray(patch_embeddings, dtype=np.float64)
    whole = np.asarray(whole, dtype=np.float64)
    if patches.ndim != 3 or whole.ndim != 2 or whole.shape != (patches.shape[0], patches.shape[2]):
        raise ValueError(f"patch_embeddings must be I x P x D and whole I x D for the same I and D, got shapes "
                         f"{patches.shape} and {whole.shape}")
    num_images, num_patches, _ = patches.shape
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    if partner is not None:
        partner = np.asarray(partner)
        if partner.shape != (num_images,) or partner.min() < 0 or partner.max() >= num_images:
            raise ValueError(f"partner must hold one image index in 0..{num_images - 1} per image, got {partner!r}")
    results: dict[str, dict[str, np.ndarray]] = {}
    for n in _check_n_values(n_values):
        if n == ALL:
            means = patches.mean(axis=1)[None]
        else:
            if n > num_patches:
                raise ValueError(f"cannot draw N={n} of the {num_patches} patches of each image without replacement: "
                                 f"pass N <= {num_patches} (or 'all')")
            keys = rng.random((draws, num_images, num_patches))
            chosen = np.argsort(keys, axis=-1)[..., :n]
            weights = np.zeros_like(keys)
            np.put_along_axis(weights, chosen, 1.0 / n, axis=-1)
            # One draw at a time keeps memory at I x D whatever the number of draws.
            means = np.stack([np.einsum("ip,ipk->ik", w, patches) for w in weights])
        entry = {"similarity": _cosine(means, whole[None])}
        if partner is not None:
            entry["chance"] = _cosine(means, whole[partner][None])
        results[str(n)] = entry
    return results


@dataclass
class Summary:
    """Mean over images of the per-image similarity (averaged over draws), its spread over images, and the
    per-image values themselves (in ``image_ids`` order), so that two points of the same images can be compared
    image by image (the claims table's paired intervals)."""

    mean: float
    std: float
    ci95: float
    per_image: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: np.ndarray) -> Summary:
        """``values``: draws x I similarities."""
        per_image = np.asarray(values, dtype=np.float64).mean(axis=0)
        count = per_image.size
        std = float(per_image.std(ddof=1)) if count > 1 else 0.0
        ci95 = float(stats.t.ppf(0.975, count - 1) * std / math.sqrt(count)) if count > 1 else float("nan")
        return cls(float(per_image.mean()), std, ci95, [float(v) for v in per_image])


@dataclass
class CurvePoint:
    """One N of one patch size: the similarity to the image's own whole-image embedding, and chance."""

    n: str
    num_averaged: int
    similarity: Summary
    chance: Summary
    num_images: int
    draws: int


@dataclass
class PatchSizeCurve:
    """The convergence curve of one patch size over its grid."""

    patch_size: int
    stride: int
    grid_shape: tuple[int, int]
    num_patches: int
    fed_size: int
    points: list[CurvePoint]
    skipped: list[str] = field(default_factory=list)
    tokens: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        """How tables name the curve: ``"8 px (7x7 grid)"``, or ``"8 px tokens, block 11 (4x4)"`` for a ViT's tokens."""
        rows, cols = self.grid_shape
        if self.tokens is not None:
            return f"{self.patch_size} px tokens, block {self.tokens['block']} ({rows}x{cols})"
        return f"{self.patch_size} px ({rows}x{cols} grid)"


@dataclass
class ConvergenceResult:
    """Everything :func:`convergence_curve` measured, with the settings that decide it."""

    model: str
    model_info: dict[str, Any]
    data: str
    layer: str
    num_images: int
    image_ids: list[int]
    draws: int
    seed: int
    resize_to: int | str | None
    whole_image_size: int
    pretraining_patch_size: int | None
    curves: list[PatchSizeCurve]
    tokens: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spread"] = ("std: standard deviation over images of each image's similarity averaged over the draws; "
                       "ci95: half-width of the Student-t 95% confidence interval of the mean over images; "
                       "per_image: each image's similarity averaged over the draws, in image_ids order")
        d["chance_level"] = ("cosine similarity of the same patch means to the whole-image embedding of another "
                             "image (a random derangement of the images)")
        return d

    def table_rows(self) -> list[list[Any]]:
        """Rows of :func:`~.report.format_table`: patch size x N, mean +- std, 95% CI, chance, mean - chance."""
        rows = []
        for curve in self.curves:
            for point in curve.points:
                rows.append([curve.label,
                             f"{point.n} ({point.num_averaged})" if point.n == ALL else point.n,
                             f"{point.similarity.mean:.3f} ± {point.similarity.std:.3f}",
                             f"± {point.similarity.ci95:.3f}",
                             f"{point.chance.mean:.3f} ± {point.chance.std:.3f}",
                             point.similarity.mean - point.chance.mean])
        return rows


TABLE_HEADERS = ["patch", "N", "cos(mean of N, whole) ± std", "95% CI", "chance ± std", "above chance"]


def _image_size(data: Any) -> tuple[int, int]:
    if isinstance(data, (torch.Tensor, np.ndarray)):
        if data.ndim != 4:
            raise ValueError(f"images must be N x 3 x H x W, got shape {tuple(data.shape)}")
        return int(data.shape[2]), int(data.shape[3])
    size = getattr(data, "image_size", None)
    if size is None:
        raise ValueError("the images of this data set vary in size; load it with image_size=S (--image-size S) "
                         "so that every image is S x S")
    return int(size[0]), int(size[1])


def _embed(model: SSLModel, data: Any, sampler: Any, layer: str, ids: np.ndarray, resize_to: int | None,
           device: Any, batch_size: int, progress: bool) -> np.ndarray:
    layers = ["h"] if layer == "h" else ["h", layer]
    embeddings = extract_patch_embeddings(model, data, sampler, layers=layers, image_ids=ids, batch_size=batch_size,
                                          resize_to=resize_to, device=device, dtype="float32", progress=progress)
    return np.asarray(embeddings.layer(layer), dtype=np.float32)


def convergence_curve(model: SSLModel, data: Any, patch_sizes: Sequence[int] | None = None,
                      n_values: Sequence[NValue] = DEFAULT_N_VALUES, *, stride: int | None = None,
                      layer: str = "h", num_images: int | None = DEFAULT_NUM_IMAGES, draws: int = DEFAULT_DRAWS,
                      seed: int = 0, device: str | torch.device | None = None, resize_to: int | str | None = None,
                      batch_size: int = 64, progress: bool = False, tokens: bool = False,
                      block: int | None = None) -> ConvergenceResult:
    """Measure the aggregation-convergence curves of ``model`` on the first ``num_images`` images of ``data``.

    - ``data``: an :class:`~.data.ImageDataset` or an ``N x 3 x H x W`` tensor (uint8, or float in [0, 1]).
    - ``patch_sizes``: patch sides in pixels (default :func:`default_patch_sizes`), one curve each.
    - ``n_values``: patches averaged, positive integers and/or ``"all"`` (the whole grid); an N
      larger than a grid is skipped and noted in ``PatchSizeCurve.skipped``.
    - ``stride``: grid step in pixels for every patch size (default :func:`default_stride` per size).
    - ``layer``: ``"h"`` (embedding), ``"z"`` (projection) or ``"pre_feature"`` (EMP-SSL).
    - ``num_images``: the first images of ``data`` (None: all; at least 2 for the chance level).
    - ``draws``: random N-subsets per image; ``seed`` fixes them and the chance pairing.
    - ``resize_to``: side the patches are fed at (default the model's input size, as the paper's
      patch evaluation); ``"native"`` feeds each patch, and the whole image, at its own size. The
      whole image is otherwise fed at the model's input size.
    - ``tokens``: a Vision Transformer's own patch tokens instead of crops (one curve, labelled by the
      token size: patch sizes and strides do not apply): the mean of N tokens of block ``block``
      (default the last) against the whole-image embedding of the same forward pass, the class token
      after the final norm (:func:`~.extract.whole_image_embeddings`); ``resize_to`` is the side the
      whole image is fed at.
    """
    if tokens and (patch_sizes is not None or stride is not None or resize_to == "native"):
        raise ValueError("the patches of tokens=True (--tokens) are the ViT's own tokens: patch sizes, --stride and "
                         "--resize-to native do not apply (--resize-to N sets the side the whole image is fed at)")
    if block is not None and not tokens:
        raise ValueError(f"block={block} applies to tokens=True (--tokens) only: the ViT block whose tokens are taken")
    if layer not in LAYER_CHOICES:
        raise ValueError(f"layer must be one of {', '.join(LAYER_CHOICES)}, got {layer!r}")
    if isinstance(resize_to, str) and resize_to != "native":
        raise ValueError(f"resize_to must be a number of pixels, 'native' or None, got {resize_to!r}")
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    n_values = _check_n_values(n_values)
    height, width = _image_size(data)
    side = min(height, width)
    patch_sizes = default_patch_sizes(side) if patch_sizes is None else [int(p) for p in patch_sizes]
    for p in patch_sizes:
        if not 1 <= p <= side:
            raise ValueError(f"patch size {p} does not fit in the {height}x{width} images: pass sizes between 1 and "
                             f"{side}")
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be a positive number of pixels, got {stride}")
    total = len(data)
    count = total if num_images is None else int(num_images)
    if not 2 <= count <= total:
        raise ValueError(f"num_images must be between 2 (the chance level pairs each image with another) and "
                         f"{total} (the size of the data), got {count}")
    ids = np.arange(count)
    if tokens:
        return _token_convergence(model, data, n_values, ids, block=block, layer=layer, draws=draws, seed=seed,
                                  device=device, resize_to=resize_to, batch_size=batch_size, progress=progress)
    native = resize_to == "native"

    whole_size = side if native else int(model.preprocess.input_size)
    whole = _embed(model, data, central(), layer, ids, whole_size, device, batch_size, progress)[:, 0]
    partner = derangement(count, np.random.default_rng(seed))

    curves = []
    for p in patch_sizes:
        sampler = grid(p, stride if stride is not None else default_stride(p, side))
        rows, cols = sampler.grid_shape((height, width))
        num_patches = rows * cols
        usable = [n for n in n_values if n == ALL or n <= num_patches]
        skipped = [f"N={n} skipped: the {rows}x{cols} grid of {p} px patches has only {num_patches} patches"
                   for n in n_values if n not in usable]
        if not usable:  # said before the embedding, not as an empty list after it
            raise ValueError(f"--n-values: every N asked for ({', '.join(map(str, n_values))}) is larger than the "
                             f"{rows}x{cols} grid of {p} px patches ({num_patches} patches): pass N <= "
                             f"{num_patches}, or all")
        fed = p if native else int(resize_to) if resize_to is not None else model.preprocess.input_size
        patches = _embed(model, data, sampler, layer, ids, fed, device, batch_size, progress)
        # Each patch size draws from its own stream, so its numbers do not depend on the other sizes.
        sims = cosine_to_whole_image(patches, whole, usable, draws, np.random.default_rng([seed, p]), partner)
        points = [CurvePoint(n=key, num_averaged=num_patches if key == ALL else int(key),
                             similarity=Summary.of(value["similarity"]), chance=Summary.of(value["chance"]),
                             num_images=count, draws=value["similarity"].shape[0])
                  for key, value in sims.items()]
        curves.append(PatchSizeCurve(patch_size=p, stride=sampler.stride, grid_shape=(rows, cols),
                                     num_patches=num_patches, fed_size=fed, points=points, skipped=skipped))

    train = model.info.extra.get("train") or {}
    data_name = "tensor images" if isinstance(data, (torch.Tensor, np.ndarray)) else data_label(data)
    return ConvergenceResult(
        model=model_label(model), model_info=model.info.to_dict(), data=data_name, layer=layer, num_images=count,
        image_ids=ids.tolist(), draws=draws, seed=seed, resize_to=resize_to, whole_image_size=whole_size,
        pretraining_patch_size=train.get("patch_size"), curves=curves)


def _token_convergence(model: SSLModel, data: Any, n_values: list[NValue], ids: np.ndarray, *, block: int | None,
                       layer: str, draws: int, seed: int, device: Any, resize_to: int | None, batch_size: int,
                       progress: bool) -> ConvergenceResult:
    """:func:`convergence_curve` with ``tokens=True``: one forward pass per image gives its tokens and, from the
    same pass, the whole-image embedding they are compared with."""
    sampler = token_sampler(model, resize_to, block)
    description = describe_tokens(model, sampler)
    token_rows, whole_rows = tokens_and_whole_image_embeddings(
        model, data, block=sampler.block, layers=[layer], image_ids=ids, resize_to=sampler.input_size,
        batch_size=batch_size, device=device, progress=progress)
    patches, whole = token_rows[layer], whole_rows[layer]
    rows, cols = description["grid"]
    num_patches, size = rows * cols, int(description["token_size"])
    usable = [n for n in n_values if n == ALL or n <= num_patches]
    skipped = [f"N={n} skipped: the {rows}x{cols} token grid has only {num_patches} tokens"
               for n in n_values if n not in usable]
    if not usable:
        raise ValueError(f"--n-values: every N asked for ({', '.join(map(str, n_values))}) is larger than the "
                         f"{rows}x{cols} token grid ({num_patches} tokens): pass N <= {num_patches}, or all")
    partner = derangement(len(ids), np.random.default_rng(seed))
    sims = cosine_to_whole_image(patches, whole, usable, draws, np.random.default_rng([seed, size]), partner)
    points = [CurvePoint(n=key, num_averaged=num_patches if key == ALL else int(key),
                         similarity=Summary.of(value["similarity"]), chance=Summary.of(value["chance"]),
                         num_images=len(ids), draws=value["similarity"].shape[0])
              for key, value in sims.items()]
    curve = PatchSizeCurve(patch_size=size, stride=size, grid_shape=(rows, cols), num_patches=num_patches,
                           fed_size=int(description["input_size"]), points=points, skipped=skipped,
                           tokens=description)
    train = model.info.extra.get("train") or {}
    data_name = "tensor images" if isinstance(data, (torch.Tensor, np.ndarray)) else data_label(data)
    return ConvergenceResult(
        model=model_label(model), model_info=model.info.to_dict(), data=data_name, layer=layer, num_images=len(ids),
        image_ids=ids.tolist(), draws=draws, seed=seed, resize_to=resize_to,
        whole_image_size=int(description["input_size"]), pretraining_patch_size=train.get("patch_size"),
        curves=[curve], tokens=description)


def _x_positions(points: Sequence[CurvePoint], all_position: float) -> list[float]:
    return [all_position if point.n == ALL else math.log2(int(point.n)) for point in points]


def plot_convergence(result: ConvergenceResult, title: str | None = None) -> Figure:
    """The curves on one figure: x = N (log2 scale, then "all"), y = cosine similarity to the whole image.

    One colour per patch size, mean +- std over images shaded, chance level dashed in the same colour.
    """
    # A bare Figure, not pyplot: no global backend or figure state, so notebooks and the CLI share it.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.6), layout="constrained")
    draw_convergence(fig.subplots(), result, title)
    return fig


def plot_convergence_panels(results: Sequence[ConvergenceResult], titles: Sequence[str]) -> Figure:
    """Several results side by side on one shared y axis (e.g. a ResNet and a ViT, crops and tokens)."""
    from matplotlib.figure import Figure

    if len(results) != len(titles):
        raise ValueError(f"got {len(results)} results and {len(titles)} titles")
    fig = Figure(figsize=(6.2 * len(results), 5.8), layout="constrained")
    axes = fig.subplots(1, len(results), sharey=True, squeeze=False)[0]
    for ax, result, title in zip(axes, results, titles, strict=True):
        draw_convergence(ax, result, title)
    return fig


def draw_convergence(ax, result: ConvergenceResult, title: str | None = None) -> None:
    """:func:`plot_convergence`'s drawing, on the matplotlib axes ``ax``."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    numeric = sorted({int(point.n) for curve in result.curves for point in curve.points if point.n != ALL})
    all_position = (math.log2(numeric[-1]) + 1) if numeric else 0.0
    colours = colormaps["tab10"]
    for index, curve in enumerate(result.curves):
        colour = colours(index % 10)
        x = _x_positions(curve.points, all_position)
        mean = np.array([point.similarity.mean for point in curve.points])
        std = np.array([point.similarity.std for point in curve.points])
        chance = np.array([point.chance.mean for point in curve.points])
        label = (f"{curve.patch_size}×{curve.patch_size} px patches, {curve.grid_shape[0]}×{curve.grid_shape[1]} grid "
                 f"(stride {curve.stride})")
        if curve.tokens is not None:
            label = (f"ViT tokens of block {curve.tokens['block']}: {curve.grid_shape[0]}×{curve.grid_shape[1]} grid "
                     f"of {curve.patch_size}×{curve.patch_size} px patches ({curve.fed_size} px input)")
        elif result.pretraining_patch_size == curve.patch_size:
            label += ", pretraining scale"
        ax.plot(x, mean, "o-", color=colour, label=label)
        ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.18, linewidth=0)
        ax.plot(x, chance, "--", color=colour, alpha=0.8)
    ticks = [math.log2(n) for n in numeric] + ([all_position] if any(
        point.n == ALL for curve in result.curves for point in curve.points) else [])
    ax.set_xticks(ticks, [str(n) for n in numeric] + (["all"] if len(ticks) > len(numeric) else []))
    what = "token embeddings" if result.tokens is not None else "patch embeddings"
    every = "every token" if result.tokens is not None else "every grid patch"
    ax.set_xlabel(f"N, {what} averaged (log2 scale; all = {every})")
    ax.set_ylabel(f"cosine similarity to the whole-image {LAYER_NAMES[result.layer]}")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="grey", linestyle="--",
                          label="chance: another image's whole-image embedding"))
    # Below the axes: the curves span the whole height, from chance to near 1.
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
              title=f"shaded: ±1 std over {result.num_images} images, {result.draws} draws", title_fontsize=8)
    whole = f" ({result.tokens['whole_image']})" if result.tokens is not None else ""
    ax.set_title(title or f"Mean of N {what} vs the whole image{whole}\n{result.model} · {result.data}",
                 fontsize=11)


def _parse_resize(text: str | None) -> int | str | None:
    if text is None or text == "native":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"--resize-to must be a positive number of pixels or 'native', got {text!r}")


def resize_or_native(text: str) -> int | str:
    """argparse type of convergence's ``--resize-to``: pixels, or ``native`` (each patch at its own size)."""
    try:
        return _parse_resize(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("--resize-to must be", "expected")) from None


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m ssl_patch_analysis.convergence", renamed=cli.RENAMED_FLAGS["convergence"],
        description="Paper Fig. 3a: cosine similarity between the mean of N patch embeddings and the whole-image "
                    "embedding, against N, per patch size, with the chance level of another image.")
    cli.add_analysis_args(parser)
    cli.add_num_images_arg(parser, DEFAULT_NUM_IMAGES, "images measured")
    parser.add_argument("--n-values", default="1,2,4,8,16,all",
                        help="patches averaged, integers and 'all' (default 1,2,4,8,16,all)")
    parser.add_argument("--patch-sizes", type=cli.int_list, default=None,
                        help="patch sides in pixels (default 1/4, 1/2, 3/4 of the image side: 8,16,24 on CIFAR)")
    parser.add_argument("--stride", type=cli.positive_int, default=None,
                        help="grid stride in pixels (default per size: min(side/8, (side - patch)/4), at least a 5x5 "
                             "grid)")
    cli.add_layers_arg(parser, ["h"], one=True)
    parser.add_argument("--draws", type=cli.positive_int, default=DEFAULT_DRAWS,
                        help=f"random N-subsets per image (default {DEFAULT_DRAWS})")
    cli.add_resize_arg(parser, type=resize_or_native,
                       help="side patches are fed at: pixels, or 'native' (own size); default the model's input size")
    cli.add_batch_size_arg(parser)
    cli.add_tokens_args(parser)
    return parser


@cli.command
def main(argv: Sequence[str] | None = None) -> ConvergenceResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli.extraction_flags(args):
        return _main(args, parser)


def _main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ConvergenceResult:
    started = time.perf_counter()
    try:
        n_values = parse_n_values(args.n_values)
    except ValueError as error:
        parser.error(f"argument --n-values: {error}")
    layer = cli.one_layer(args, "convergence")
    block = cli.token_block(args)
    if args.tokens and (args.patch_sizes is not None or args.stride is not None or args.resize_to == "native"):
        raise cli.UserError("--patch-sizes, --stride and --resize-to native do not apply to --tokens (the patches are "
                            "the ViT's own tokens; --resize-to N sets the side the whole image is fed at)")
    model, data, device = cli.load_model_and_data(args)
    of = cli.output_of(args, model, data)
    stem = cli.output_stem_for(args, "convergence", of)  # another model's outputs there: refused before the work
    result = convergence_curve(model, data, args.patch_sizes, n_values, stride=args.stride, layer=layer,
                               num_images=args.num_images, draws=args.draws, seed=args.seed, device=device,
                               resize_to=args.resize_to, batch_size=args.batch_size, progress=not args.no_progress,
                               tokens=args.tokens, block=block)
    seconds = time.perf_counter() - started

    numbers = {**result.to_dict(), "command": cli.running_command(), "seconds": round(seconds, 1),
               "device": str(device), "output_of": of}
    *figures, json_path = save_figure_and_json(plot_convergence(result), numbers, stem, pdf=args.pdf)

    print(f"\n{result.model} on {result.data}, layer {result.layer}: {result.num_images} images, {result.draws} draws")
    print(format_table(result.table_rows(), TABLE_HEADERS))
    for curve in result.curves:
        for note in curve.skipped:
            print(f"note: {note}")
    print(f"std: over images; 95% CI: of the mean over images (Student t); chance: another image's whole-image "
          f"embedding. {seconds:.0f} s on {device}")
    for path in [*figures, json_path]:
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
