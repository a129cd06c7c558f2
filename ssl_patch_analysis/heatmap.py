"""Projection-vs-embedding similarity heatmaps (paper Fig. 4) and a locality score.

A query patch is compared, by cosine similarity, with every patch of a dense grid over its image,
once in projection space (``z``) and once in embedding space (``h``). The paper shows that the
embedding keeps locality (similarity falls with distance from the query) while the projection is
more invariant; it shows this in pictures only. :func:`locality_score` turns it into a number:

    rho(image) = Spearman correlation, over all pairs (query patch q, other patch j != q) of the
                 image, between cos(e_q, e_j) and the distance between the two patch centres;
    locality   = -rho  (positive: similarity falls with distance; 0: no relation).

It is averaged over images, with its spread, per layer. Similarities of a query with itself are
left out (they are 1 at distance 0 whatever the representation).

:func:`heatmap_analysis` measures what the command line does, from Python: the figure's maps
(:func:`figure_heatmaps`) and the locality score over random images (:func:`locality_over_images`),
set by a :class:`HeatmapSettings` and returned as a :class:`HeatmapAnalysis`, whose ``to_json()``
is the command's JSON (less the command line).

Command line (figure and JSON to ``figures/heatmap_<model>_<data>.{png,json}``)::

    python -m ssl_patch_analysis.heatmap --model vicreg --data cifar10
    python -m ssl_patch_analysis.heatmap --model bagssl --queries "6,6;0,0" --image-ids 0,1,3
    python -m ssl_patch_analysis.heatmap --model vicreg --data imagenette --resize-to 32
    python -m ssl_patch_analysis.heatmap --model dino-vits16-full --tokens  # a ViT's own tokens
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from scipy.stats import rankdata

from . import cli
from .cli import non_negative_int, positive_int
from .data import ImageDataset
from .extract import TokenSampler, extract_patch_embeddings, token_sampler
from .models import SSLModel
from .patches import PatchSampler, grid
from .report import _plain, data_label, format_table, model_label, save_figure_and_json

LAYER_TITLES = {"z": "projection z", "h": "embedding h", "pre_feature": "pre-feature"}
LOCALITY_DEFINITION = (
    "locality = -rho, rho = Spearman correlation between the cosine similarity of a query patch to another "
    "patch of the same image and the distance between their centres (pixels), pooled over all (query, other "
    "patch) pairs of one image; mean, std and sem over images. Positive: similarity falls with distance."
)


def default_grid(image_size: tuple[int, int]) -> tuple[int, int]:
    """``(patch_size, stride)`` of a 13 x 13 grid on a square image: side / 4 and side / 16 (8, 2 at 32 px)."""
    side = min(int(image_size[0]), int(image_size[1]))
    return max(1, side // 4), max(1, side // 16)


@dataclass
class HeatmapResult:
    """Cosine-similarity maps of query patches against every patch of a grid over their image.

    ``maps[layer][q, r, c]`` is the similarity, in ``layer``, of grid patch ``(r, c)`` to query ``q``.
    Query ``q`` is cell ``(queries[q, 1], queries[q, 2])`` of image ``image_ids[queries[q, 0]]``.
    Grid cell ``(r, c)`` is the box ``boxes[r * cols + c]`` (``x0, y0, x1, y1`` pixels), the same on
    every image. With a ViT's own tokens (``tokens``: what they are, :func:`~.extract.describe_tokens`)
    the grid is the token grid, and ``patch_size`` = ``stride`` is a token's side in image pixels.
    """

    maps: dict[str, np.ndarray]
    queries: np.ndarray
    image_ids: np.ndarray
    labels: np.ndarray
    images: np.ndarray
    boxes: np.ndarray
    grid_shape: tuple[int, int]
    patch_size: int
    stride: int
    resize_to: int
    class_names: list[str]
    tokens: dict[str, Any] | None = None

    @property
    def layers(self) -> list[str]:
        return list(self.maps)

    @property
    def num_queries(self) -> int:
        return int(self.queries.shape[0])

    def query_box(self, q: int) -> np.ndarray:
        """The box ``x0, y0, x1, y1`` of query ``q``."""
        _, row, col = (int(v) for v in self.queries[q])
        return self.boxes[row * self.grid_shape[1] + col]

    def query_description(self, q: int) -> str:
        """``"#12 cat, cell (6, 6)"``: the image, its class and the query cell."""
        index, row, col = (int(v) for v in self.queries[q])
        label = int(self.labels[index])
        name = self.class_names[label] if 0 <= label < len(self.class_names) else "unlabelled"
        return f"#{int(self.image_ids[index])} {name}, cell ({row}, {col})"

    def to_dict(self) -> dict[str, Any]:
        """Everything but the pixels, as JSON-able values (maps rounded to 4 decimals)."""
        queries = []
        for q in range(self.num_queries):
            index, row, col = (int(v) for v in self.queries[q])
            label = int(self.labels[index])
            queries.append({
                "image_id": int(self.image_ids[index]), "label": label,
                "class": self.class_names[label] if 0 <= label < len(self.class_names) else None,
                "cell": [row, col], "box": self.query_box(q).tolist(),
                "maps": {layer: np.round(self.maps[layer][q], 4).tolist() for layer in self.layers},
            })
        return {"grid_shape": list(self.grid_shape), "patch_size": self.patch_size, "stride": self.stride,
                "resize_to": self.resize_to, "tokens": self.tokens, "layers": self.layers, "queries": queries}


def _source_images(data: ImageDataset | torch.Tensor | np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """The images ``image_ids`` as uint8 ``N x H x W x 3`` for display."""
    if hasattr(data, "get_batch"):
        pixels = data.get_batch(image_ids.tolist())
    else:
        pixels = torch.as_tensor(data)[torch.as_tensor(image_ids)]
    if pixels.is_floating_point():
        pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def _image_size(data: ImageDataset | torch.Tensor | np.ndarray) -> tuple[int, int]:
    size = getattr(data, "image_size", None) if hasattr(data, "get_batch") else tuple(np.shape(data)[2:4])
    if size is None or len(size) != 2:
        raise ValueError("the images vary in size: load the data set with image_size=S (--image-size S) so that "
                         "one grid fits every image")
    return int(size[0]), int(size[1])


def query_cells(queries: Sequence[tuple[int, int]] | int | None, grid_shape: tuple[int, int],
                image_ids: Sequence[int], seed: int = 0) -> np.ndarray:
    """Queries as rows ``(image index, row, col)``: the cells ``queries`` on every image in turn.

    ``queries`` is a list of grid cells ``(row, col)``, an int ``K`` (``K`` distinct random cells per
    image, drawn from ``(seed, image id)`` so that an image gets the same cells in any batch), or
    ``None`` (the centre cell).
    """
    rows, cols = grid_shape
    if queries is None:
        queries = [(rows // 2, cols // 2)]
    out = []
    for index, image_id in enumerate(image_ids):
        if isinstance(queries, (int, np.integer)):
            if not 1 <= queries <= rows * cols:
                raise ValueError(f"the number of random queries must be between 1 and {rows * cols} (the cells of "
                                 f"the {rows} x {cols} grid), got {queries}")
            picks = np.random.default_rng((seed, int(image_id))).choice(rows * cols, int(queries), replace=False)
            cells = [(int(p) // cols, int(p) % cols) for p in picks]
        else:
            cells = [tuple(int(v) for v in cell) for cell in queries]
        for cell in cells:
            if len(cell) != 2 or not (0 <= cell[0] < rows and 0 <= cell[1] < cols):
                raise ValueError(f"query cell {cell} is not (row, col) inside the {rows} x {cols} grid: rows run "
                                 f"0..{rows - 1}, columns 0..{cols - 1}")
            out.append((index, *cell))
    if not out:
        raise ValueError("no queries: pass at least one image id and one query cell")
    return np.asarray(out, dtype=np.int64)


def _check_layers(model: SSLModel, layers: Sequence[str]) -> list[str]:
    available = ["h"] + (["pre_feature"] if model.pre_feature is not None else []) + \
        (["z"] if model.has_projector else [])
    layers = list(layers)
    missing = [name for name in layers if name not in available]
    if missing or not layers:
        raise ValueError(f"layers {layers} are not all available: the model "
                         f"({model.info.source or 'in memory'}) has {', '.join(available)}; pass layers among those "
                         f"(--layers {','.join(available)})")
    return layers


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def patch_similarity_maps(
    model: SSLModel,
    data: ImageDataset | torch.Tensor | np.ndarray,
    image_ids: Sequence[int],
    patch_size: int | None = None,
    stride: int | None = None,
    queries: Sequence[tuple[int, int]] | int | None = None,
    layers: Sequence[str] = ("z", "h"),
    resize_to: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    tokens: bool = False,
    block: int | None = None,
) -> HeatmapResult:
    """Cosine similarity of each query patch to every patch of a grid over its image, per layer.

    - ``data``: a data set or ``N x 3 x H x W`` images (uint8, or float in [0, 1]);
      ``image_ids`` the images to use.
    - ``patch_size``, ``stride``: the grid (default :func:`default_grid`, a 13 x 13 grid).
    - ``queries``: see :func:`query_cells` (cells on every image, ``K`` random cells, or the centre).
    - ``resize_to``: side the patches are resized to for the model (default its input size).
    - ``tokens``: a Vision Transformer's own patch tokens of block ``block`` (default the last) instead of
      crops: one forward pass per image fed whole at ``resize_to``, the grid the token grid (no
      ``patch_size`` / ``stride``), ``z`` of a token the projector applied to it.
    """
    layers = _check_layers(model, layers)
    image_size = _image_size(data)
    if tokens:
        tokens_grid = _token_grid(model, resize_to, block, patch_size, stride)
        sampler: PatchSampler = tokens_grid
        grid_shape = tokens_grid.grid
        patch_size = stride = _token_side(tokens_grid, image_size)
    else:
        default_patch, default_stride = default_grid(image_size)
        patch_size = default_patch if patch_size is None else int(patch_size)
        stride = default_stride if stride is None else int(stride)
        sampler = grid(patch_size, stride)
        grid_shape = sampler.grid_shape(image_size)
    ids = np.asarray(list(image_ids), dtype=np.int64)
    cells = query_cells(queries, grid_shape, ids, seed=seed)

    extract_layers = ["h"] + [name for name in layers if name != "h"]
    embeddings = extract_patch_embeddings(model, data, sampler, layers=extract_layers, image_ids=ids,
                                          resize_to=resize_to, device=device, dtype="float32", progress=False)
    maps = {}
    for layer in layers:
        unit = _unit_rows(embeddings.layer(layer))
        query_vectors = unit[cells[:, 0], cells[:, 1] * grid_shape[1] + cells[:, 2]]
        maps[layer] = np.einsum("qpd,qd->qp", unit[cells[:, 0]], query_vectors).reshape(len(cells), *grid_shape)
    class_names = list(getattr(data, "class_names", []) or [])
    labels = (np.asarray(data.labels)[ids] if hasattr(data, "labels") else np.full(len(ids), -1)).astype(np.int64)
    return HeatmapResult(
        maps=maps, queries=cells, image_ids=ids, labels=labels, images=_source_images(data, ids),
        boxes=np.asarray(embeddings.boxes[0], dtype=np.float32), grid_shape=grid_shape, patch_size=patch_size,
        stride=stride, resize_to=int(resize_to if resize_to is not None else model.preprocess.input_size),
        class_names=class_names, tokens=embeddings.meta.get("tokens"),
    )


def _token_grid(model: SSLModel, resize_to: int | None, block: int | None, patch_size: int | None,
                stride: int | None) -> TokenSampler:
    """The token grid of ``model`` (a ViT), refusing a patch size or stride (tokens have the ViT's own)."""
    if patch_size is not None or stride is not None:
        raise ValueError("the patches of tokens=True (--tokens) are the ViT's own tokens: --patch-size and --stride "
                         "do not apply")
    return token_sampler(model, resize_to, block)


def _token_side(sampler: TokenSampler, image_size: tuple[int, int]) -> int | float:
    """A token's side in pixels of the image (an int where it is whole)."""
    side = image_size[0] / sampler.grid[0]
    return int(side) if side == int(side) else side


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def locality_score(
    embeddings: np.ndarray,
    boxes: np.ndarray,
    queries: int | Sequence[int] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """How local a patch representation is: ``-rho``, rho = Spearman(similarity, centre distance) per image.

    - ``embeddings``: ``N x P x D`` (``P`` patches of each of ``N`` images; cosine similarity is used).
    - ``boxes``: ``N x P x 4`` or ``P x 4`` (``x0, y0, x1, y1``), the patches' places in their image.
    - ``queries``: which patches serve as queries: ``None`` all, an int ``K`` (``K`` distinct random
      patches per image, from ``seed``), or a list of patch indices used on every image.

    Each query is paired with every other patch of its image; the pairs of an image give one rho.
    Returns per-image ``rho`` and ``locality`` (= -rho), their mean / std / sem over the images
    with a defined rho, and ``mean_similarity`` (mean cosine similarity over the pairs: higher means
    more invariant within an image).
    """
    embeddings = np.asarray(embeddings)
    boxes = np.asarray(boxes, dtype=np.float64)
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be N x P x D (images x patches x dims), got shape {embeddings.shape}")
    num_images, num_patches = embeddings.shape[:2]
    if boxes.ndim == 2:
        boxes = np.broadcast_to(boxes, (num_images, *boxes.shape))
    if boxes.shape != (num_images, num_patches, 4):
        raise ValueError(f"boxes must be {num_images} x {num_patches} x 4 or {num_patches} x 4 (x0, y0, x1, y1) to "
                         f"match the embeddings, got shape {boxes.shape}")
    if num_images < 1:
        raise ValueError("locality needs at least one image")
    if num_patches < 2:
        raise ValueError("locality needs at least 2 patches per image (a query and another patch)")
    rng = np.random.default_rng(seed)
    rhos, similarities = np.full(num_images, np.nan), np.full(num_images, np.nan)
    for i in range(num_images):
        query_index = _query_indices(queries, num_patches, rng)
        unit = _unit_rows(embeddings[i])
        centers = (boxes[i, :, :2] + boxes[i, :, 2:]) / 2
        # Rounded so that the pairs (q, j) and (j, q) tie exactly: the matrix product can give them
        # different last bits, which would break their tie in the ranks.
        similarity = np.round(unit[query_index] @ unit.T, 10)
        distance = np.linalg.norm(centers[query_index, None, :] - centers[None, :, :], axis=-1)
        others = np.ones(similarity.shape, dtype=bool)
        others[np.arange(len(query_index)), query_index] = False
        rhos[i] = spearman_rho(similarity[others], distance[others])
        similarities[i] = similarity[others].mean()
    defined = rhos[~np.isnan(rhos)]
    locality = -defined
    return {
        "rho": rhos, "locality": -rhos,
        "locality_mean": float(locality.mean()) if len(locality) else float("nan"),
        "locality_std": float(locality.std(ddof=1)) if len(locality) > 1 else float("nan"),
        "locality_sem": float(locality.std(ddof=1) / np.sqrt(len(locality))) if len(locality) > 1 else float("nan"),
        "num_images": len(defined), "num_undefined": int(num_images - len(defined)),
        "queries_per_image": len(query_index),
        "mean_similarity": float(np.mean(similarities)),
    }


def _query_indices(queries: int | Sequence[int] | None, num_patches: int, rng: np.random.Generator) -> np.ndarray:
    if queries is None:
        return np.arange(num_patches)
    if isinstance(queries, (int, np.integer)):
        if not 1 <= queries <= num_patches:
            raise ValueError(f"queries per image must be between 1 and {num_patches} (the patches per image), "
                             f"got {queries}")
        return rng.choice(num_patches, int(queries), replace=False)
    index = np.asarray(list(queries), dtype=np.int64)
    if index.ndim != 1 or len(index) == 0 or index.min() < 0 or index.max() >= num_patches:
        raise ValueError(f"query patch indices must be a non-empty list in 0..{num_patches - 1}, got {list(index)}")
    return index


def compare_locality(layer_embeddings: dict[str, np.ndarray], boxes: np.ndarray,
                     queries: int | Sequence[int] | None = None, seed: int = 0) -> dict[str, Any]:
    """:func:`locality_score` of each layer on the same queries, plus the paired comparison h vs z.

    ``paired_h_minus_z``: per-image locality of h minus that of z (mean, std, and the fraction of
    images where h is the more local), present when both layers are given.
    """
    scores = {name: locality_score(array, boxes, queries=queries, seed=seed) for name, array in
              layer_embeddings.items()}
    result: dict[str, Any] = {"definition": LOCALITY_DEFINITION, "layers": scores}
    if "h" in scores and "z" in scores:
        difference = scores["h"]["locality"] - scores["z"]["locality"]
        difference = difference[~np.isnan(difference)]
        if len(difference):
            result["paired_h_minus_z"] = {
                "mean": float(difference.mean()),
                "std": float(difference.std(ddof=1)) if len(difference) > 1 else float("nan"),
                "fraction_h_more_local": float((difference > 0).mean()), "num_images": len(difference),
            }
    return result


# ---------------------------------------------------------------------- the analysis: settings in, a result out
@dataclass(frozen=True)
class HeatmapSettings:
    """What :func:`heatmap_analysis` measures; the defaults are the heatmap command's.

    - ``patch_size``, ``stride``: the grid (``None``: :func:`default_grid`'s, 13 x 13 patches);
      ``resize_to``: the side patches are resized to for the model (``None``: its input size);
      ``layers``: among ``z``, ``h``, ``pre_feature``.
    - The figure: ``image_ids`` (``None``: the first ``figure_images`` images of distinct classes,
      :func:`first_of_each_class`) and ``queries``: grid cells ``(row, col)`` used on every image, an
      int ``K`` (``K`` random cells per image), or ``None`` (the centre cell and the top-left cell).
    - The locality score: ``locality_images`` random images of the data (0: no score), with
      ``locality_queries`` random query patches per image (``None``: every patch).
    - ``seed``: the random query cells and patches, and the locality images.
    - ``tokens``: a Vision Transformer's own patch tokens of ``block`` (default the last) instead of crops
      (``patch_size`` and ``stride`` must be ``None``; ``resize_to`` is the side the whole image is fed at).
    """

    patch_size: int | None = None
    stride: int | None = None
    resize_to: int | None = None
    layers: tuple[str, ...] = ("z", "h")
    image_ids: tuple[int, ...] | None = None
    figure_images: int = 3
    queries: tuple[tuple[int, int], ...] | int | None = None
    locality_images: int = 64
    locality_queries: int | None = None
    seed: int = 0
    tokens: bool = False
    block: int | None = None

    def grid_on(self, data: ImageDataset | torch.Tensor | np.ndarray) -> tuple[int, int]:
        """``(patch_size, stride)`` on the images of ``data``: the settings', :func:`default_grid`'s where ``None``."""
        default_patch, default_stride = default_grid(_image_size(data))
        return (default_patch if self.patch_size is None else int(self.patch_size),
                default_stride if self.stride is None else int(self.stride))

    def figure_image_ids(self, data: ImageDataset | torch.Tensor | np.ndarray) -> list[int]:
        """The figure's images: ``image_ids``, or the first ``figure_images`` of distinct classes (the first
        images, for unlabelled images)."""
        if self.image_ids:
            return [int(i) for i in self.image_ids]
        labels = getattr(data, "labels", None)
        if labels is None:
            return list(range(min(self.figure_images, len(data))))
        return first_of_each_class(labels, self.figure_images)


@dataclass(frozen=True, eq=False)
class LayerLocality:
    """:func:`locality_score` of one layer: per image ``rho`` and ``locality`` (``-rho``; NaN where rho is
    undefined), the mean / std / sem of the locality over the ``num_images`` images with a defined rho,
    and ``mean_similarity``, the mean cosine similarity of the (query, other patch) pairs."""

    rho: np.ndarray
    locality: np.ndarray
    locality_mean: float
    locality_std: float
    locality_sem: float
    num_images: int
    num_undefined: int
    queries_per_image: int
    mean_similarity: float


@dataclass(frozen=True)
class PairedLocality:
    """Per-image locality of h minus that of z, over the ``num_images`` images where both are defined: its
    mean and std, and the fraction of images where h is the more local."""

    mean: float
    std: float
    fraction_h_more_local: float
    num_images: int


LOCALITY_TABLE_HEADERS = ["layer", "locality (-rho) mean", "std", "sem", "mean cos sim", "images"]


@dataclass(frozen=True, eq=False)
class LocalityResult:
    """The locality score of each layer on the same images (``image_ids``) and query patches, over a grid of
    ``patch_size`` px patches with stride ``stride`` (:func:`locality_over_images`).

    ``paired_h_minus_z`` is there when both h and z were scored. :meth:`to_dict` is the heatmap
    command's ``locality`` record.
    """

    image_ids: np.ndarray
    patch_size: int
    stride: int
    layers: dict[str, LayerLocality]
    paired_h_minus_z: PairedLocality | None = None
    definition: str = LOCALITY_DEFINITION

    @classmethod
    def from_scores(cls, scores: dict[str, Any], image_ids: np.ndarray, patch_size: int,
                    stride: int) -> LocalityResult:
        """From :func:`compare_locality`'s dictionary, measured on ``image_ids``."""
        paired = scores.get("paired_h_minus_z")
        return cls(image_ids=np.asarray(image_ids), patch_size=int(patch_size), stride=int(stride),
                   layers={name: LayerLocality(**score) for name, score in scores["layers"].items()},
                   paired_h_minus_z=PairedLocality(**paired) if paired else None, definition=scores["definition"])

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"definition": self.definition,
                             "layers": {name: asdict(score) for name, score in self.layers.items()}}
        if self.paired_h_minus_z is not None:
            d["paired_h_minus_z"] = asdict(self.paired_h_minus_z)
        d["image_ids"] = self.image_ids
        return d

    def table_rows(self) -> list[list[Any]]:
        """Rows of :func:`~.report.format_table` under :data:`LOCALITY_TABLE_HEADERS`: one per layer."""
        return [[name, s.locality_mean, s.locality_std, s.locality_sem, s.mean_similarity, s.num_images]
                for name, s in self.layers.items()]


@dataclass(frozen=True, eq=False)
class HeatmapAnalysis:
    """What the heatmap command measures: the figure's maps and the locality score (``None`` when not
    measured), with the model and the data they are of. :meth:`to_json` is the command's JSON less its
    ``command`` line."""

    model: str
    model_info: dict[str, Any]
    data: str
    heatmaps: HeatmapResult
    locality: LocalityResult | None

    @classmethod
    def of(cls, model: SSLModel, data: Any, heatmaps: HeatmapResult,
           locality: LocalityResult | None) -> HeatmapAnalysis:
        return cls(model=model_label(model), model_info=model.info.to_dict(), data=data_label(data),
                   heatmaps=heatmaps, locality=locality)

    def to_dict(self) -> dict[str, Any]:
        """The numbers as Python and numpy values (NaN where a score is undefined)."""
        return {"model": self.model, "model_info": self.model_info, "data": self.data,
                "heatmaps": self.heatmaps.to_dict(),
                "locality": None if self.locality is None else self.locality.to_dict()}

    def to_json(self) -> dict[str, Any]:
        """:meth:`to_dict` as the command's JSON file holds it: lists, and null for NaN."""
        return _plain(self.to_dict())


def figure_heatmaps(model: SSLModel, data: ImageDataset | torch.Tensor | np.ndarray,
                    settings: HeatmapSettings = HeatmapSettings(), *,
                    device: str | torch.device | None = None) -> HeatmapResult:
    """The heatmap command's figure: :func:`patch_similarity_maps` of the settings' images and query cells.

    Raises ``ValueError`` for image ids outside ``data``, a grid that does not fit its images, query
    cells outside the grid, or layers the model lacks.
    """
    image_ids = settings.figure_image_ids(data)
    if not image_ids or min(image_ids) < 0 or max(image_ids) >= len(data):
        raise ValueError(f"image ids must lie in 0..{len(data) - 1} (the images of {data_label(data)}), got "
                         f"{image_ids}")
    if settings.tokens:
        patch_size, stride = settings.patch_size, settings.stride
        rows, cols = _token_grid(model, settings.resize_to, settings.block, patch_size, stride).grid
    else:
        patch_size, stride = settings.grid_on(data)
        rows, cols = grid(patch_size, stride).grid_shape(_image_size(data))
    queries = [(rows // 2, cols // 2), (0, 0)] if settings.queries is None else settings.queries
    return patch_similarity_maps(model, data, image_ids, patch_size, stride, queries=queries, layers=settings.layers,
                                 resize_to=settings.resize_to, device=device, seed=settings.seed,
                                 tokens=settings.tokens, block=settings.block)


def locality_over_images(model: SSLModel, data: ImageDataset | torch.Tensor | np.ndarray,
                         settings: HeatmapSettings = HeatmapSettings(), *, device: str | torch.device | None = None,
                         progress: bool = False) -> LocalityResult:
    """The locality score of each of ``settings.layers`` over ``settings.locality_images`` random images.

    The images are drawn from ``data`` without replacement (from ``settings.seed``; all of them when
    it holds fewer); every patch of the settings' grid is embedded, and :func:`compare_locality`
    scores the layers on the same query patches (``settings.locality_queries`` per image).
    """
    layers = _check_layers(model, settings.layers)
    if settings.locality_images < 1:
        raise ValueError(f"locality_images must be at least 1 (the images scored), got {settings.locality_images}")
    if settings.tokens:
        tokens_grid = _token_grid(model, settings.resize_to, settings.block, settings.patch_size, settings.stride)
        sampler: PatchSampler = tokens_grid
        patch_size = stride = _token_side(tokens_grid, _image_size(data))
    else:
        patch_size, stride = settings.grid_on(data)
        sampler = grid(patch_size, stride)
    count = min(settings.locality_images, len(data))
    image_ids = np.sort(np.random.default_rng(settings.seed).choice(len(data), count, replace=False))
    embeddings = extract_patch_embeddings(model, data, sampler,
                                          layers=["h"] + [name for name in layers if name != "h"], image_ids=image_ids,
                                          resize_to=settings.resize_to, device=device, dtype="float32",
                                          progress=progress)
    scores = compare_locality({name: embeddings.layer(name) for name in layers}, embeddings.boxes,
                              queries=settings.locality_queries, seed=settings.seed)
    return LocalityResult.from_scores(scores, image_ids, patch_size, stride)


def heatmap_analysis(model: SSLModel, data: ImageDataset | torch.Tensor | np.ndarray,
                     settings: HeatmapSettings = HeatmapSettings(), *, device: str | torch.device | None = None,
                     progress: bool = False) -> HeatmapAnalysis:
    """What ``python -m ssl_patch_analysis.heatmap`` measures: :func:`figure_heatmaps` and, unless
    ``settings.locality_images`` is 0, :func:`locality_over_images`."""
    heatmaps = figure_heatmaps(model, data, settings, device=device)
    locality = (locality_over_images(model, data, settings, device=device, progress=progress)
                if settings.locality_images > 0 else None)
    return HeatmapAnalysis.of(model, data, heatmaps, locality)


def _cell_extent(result: HeatmapResult) -> tuple[float, float, float, float]:
    """``imshow`` extent putting cell ``(r, c)`` as a stride-wide square centred on its patch centre (a token's
    cell is its own pixel square: the token grid tiles the image)."""
    rows, cols = result.grid_shape
    if result.tokens is not None:
        height, width = result.images.shape[1:3]
        return (0, width, height, 0)
    half_patch, half_stride = result.patch_size / 2, result.stride / 2
    left = half_patch - half_stride
    top = half_patch - half_stride
    return (left, left + cols * result.stride, top + rows * result.stride, top)


def plot_heatmaps(result: HeatmapResult, title: str, layers: Sequence[str] | None = None,
                  cmap: str = "viridis") -> Figure:
    """Fig. 4's layout: one row per query; the image with the query patch outlined (red dashes), then
    one similarity map per layer, all maps on one colour scale with one colour bar."""
    layers = list(layers or result.layers)
    maps = [result.maps[layer] for layer in layers]
    norm = Normalize(vmin=float(min(m.min() for m in maps)), vmax=float(max(m.max() for m in maps)))
    height, width = result.images.shape[1:3]
    rows, columns = result.num_queries, 1 + len(layers)
    # A bare Figure (no pyplot): no display backend is needed, and notebooks show it as it is.
    fig = Figure(figsize=(2.3 * columns + 1.2, 2.3 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    extent = _cell_extent(result)
    heatmap_axes = []
    for q in range(rows):
        index = int(result.queries[q, 0])
        x0, y0, x1, y1 = (float(v) for v in result.query_box(q))
        center = ((x0 + x1) / 2, (y0 + y1) / 2)
        for column, ax in enumerate(axes[q]):
            if column == 0:
                ax.imshow(result.images[index], extent=(0, width, height, 0), interpolation="nearest")
                ax.set_title(result.query_description(q), fontsize=8)
                ax.set_ylabel("y (px)")
            else:
                layer = layers[column - 1]
                image = ax.imshow(result.maps[layer][q], extent=extent, norm=norm, cmap=cmap,
                                  interpolation="nearest")
                image.set_label(layer)
                ax.set_facecolor("0.85")
                ax.set_title(LAYER_TITLES.get(layer, layer), fontsize=9)
                ax.plot(*center, marker="+", color="red", markersize=7, markeredgewidth=1.5)
                heatmap_axes.append(ax)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linestyle="--",
                                   linewidth=1.5))
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
            ax.tick_params(labelsize=7)
            if q == rows - 1:
                ax.set_xlabel("x (px)")
    colorbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=heatmap_axes, shrink=0.6, aspect=40)
    colorbar.set_label("cosine similarity to the query patch (one scale for all maps)")
    handles = [
        Line2D([], [], color="red", linestyle="--", linewidth=1.5, label="query patch"),
        Line2D([], [], color="red", marker="+", linestyle="none", markersize=7, label="query patch centre"),
    ]
    if result.tokens is None:  # the token grid tiles the whole image
        handles.append(Rectangle((0, 0), 1, 1, facecolor="0.85", label="outside the grid of patch centres"))
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    return fig


def _analysis_title(analysis: HeatmapAnalysis) -> str:
    result, locality = analysis.heatmaps, analysis.locality
    height, width = result.images.shape[1:3]
    lines = [f"Patch similarity heatmaps: {analysis.model} on {analysis.data}",
             f"grid of {result.grid_shape[0]} x {result.grid_shape[1]} patches of {result.patch_size} px, stride "
             f"{result.stride} px, each resized to {result.resize_to} px for the model"]
    if result.tokens is not None:
        lines[0] = f"Token similarity heatmaps: {analysis.model} on {analysis.data}"
        lines[1] = (f"ViT tokens of block {result.tokens['block']}: {result.grid_shape[0]} x {result.grid_shape[1]} "
                    f"grid of {result.tokens['token_size']} px patches of the image fed whole at {result.resize_to} "
                    f"px (each token {result.patch_size:.3g} px of the image)")
    if analysis.model_info.get("stem") == "cifar" and min(height, width) > 64:
        lines[-1] += f" (a CIFAR-trained model on {height} px images)"
    if locality is not None:
        scores = ", ".join(f"{name} {s.locality_mean:.3f} ± {s.locality_std:.3f}"
                           for name, s in locality.layers.items())
        count = next(iter(locality.layers.values())).num_images
        lines.append(f"locality = -Spearman(similarity, centre distance), mean ± std over {count} images: {scores}")
    return "\n".join(lines)


def plot_heatmap_analysis(analysis: HeatmapAnalysis, cmap: str = "viridis") -> Figure:
    """:func:`plot_heatmaps` of a :class:`HeatmapAnalysis`, titled as the heatmap command titles its figure
    (model, data, grid, and the locality scores when measured)."""
    return plot_heatmaps(analysis.heatmaps, _analysis_title(analysis), cmap=cmap)


def _parse_cells(text: str) -> list[tuple[int, int]]:
    cells = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            row, col = (int(v) for v in part.split(","))
        except ValueError:
            raise ValueError(f"--queries must be grid cells 'row,col;row,col' (e.g. '6,6;0,0'), got {text!r}") from None
        cells.append((row, col))
    return cells


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--image-ids must be comma-separated dataset indices (e.g. 0,1,3), got {text!r}") from None


def first_of_each_class(labels: np.ndarray, count: int) -> list[int]:
    """The first ``count`` images, in data set order, whose classes all differ."""
    chosen, seen = [], set()
    for index, label in enumerate(np.asarray(labels).tolist()):
        if label not in seen:
            chosen.append(index)
            seen.add(label)
        if len(chosen) == count:
            break
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m ssl_patch_analysis.heatmap", renamed=cli.RENAMED_FLAGS["heatmap"],
        description="Cosine similarity of query patches to every patch of a grid, in projection (z) and embedding "
                    "(h) space (paper Fig. 4), and a locality score: -Spearman(similarity, centre distance).")
    cli.add_analysis_args(parser)
    parser.add_argument("--patch-size", type=positive_int, default=None,
                        help="grid patch side in pixels (default: image side / 4, i.e. 8 at 32 px, 56 at 224 px)")
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="grid stride (default: image side / 16, i.e. 2 at 32 px, 14 at 224 px: a 13 x 13 grid)")
    cli.add_resize_arg(parser)
    parser.add_argument("--image-ids", default=None,
                        help="comma-separated images of the figure (default: the first --figure-images of distinct "
                             "classes)")
    parser.add_argument("--figure-images", type=positive_int, default=3,
                        help="images in the figure when --image-ids is not given (default 3)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--queries", default=None,
                       help="query grid cells 'row,col;row,col', used on every image (default: the centre cell "
                            "and the top-left cell)")
    which.add_argument("--random-queries", type=positive_int, default=None, metavar="K",
                       help="K random query cells per image instead of --queries")
    cli.add_layers_arg(parser, ["z", "h"])
    parser.add_argument("--locality-images", type=non_negative_int, default=64,
                        help="random images of the split for the locality score (default 64; 0 skips it)")
    parser.add_argument("--locality-queries", type=positive_int, default=None, metavar="K",
                        help="K random query patches per image for the locality score (default: every patch)")
    cli.add_tokens_args(parser)
    return parser


@cli.command
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli.extraction_flags(args):
        return _main(args, parser)


def _main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        cells = _parse_cells(args.queries) if args.queries else None
        chosen_ids = _parse_ids(args.image_ids) if args.image_ids else None
    except ValueError as error:
        parser.error(str(error))
    model, data, device = cli.load_model_and_data(args)
    of = cli.output_of(args, model, data)
    stem = cli.output_stem_for(args, "heatmap", of, default_layers=("z", "h"))  # refused before the work
    settings = HeatmapSettings(
        patch_size=args.patch_size, stride=args.stride, resize_to=args.resize_to, layers=tuple(args.layers),
        image_ids=tuple(chosen_ids) if chosen_ids else None, figure_images=args.figure_images,
        queries=args.random_queries if args.random_queries is not None else (tuple(cells) if cells else None),
        locality_images=args.locality_images, locality_queries=args.locality_queries, seed=args.seed,
        tokens=args.tokens, block=cli.token_block(args))
    patch_size, stride = settings.grid_on(data)  # first: images of one size, or the error that says --image-size
    if not settings.tokens:  # was found only after the figure, by the locality score, without naming a flag
        height, width = _image_size(data)
        try:
            per_image = grid(patch_size, stride).num_patches((height, width))
        except ValueError as error:  # a patch larger than the images
            parser.error(f"--patch-size {patch_size}: {error}")
        if per_image < 2:
            parser.error(f"--patch-size {patch_size} at --stride {stride} gives 1 patch on the {height} x {width} "
                         f"images of {data_label(data)}: a heatmap needs at least 2 (a query and another patch); "
                         "pass a smaller --patch-size or --stride")
    else:
        tokens_grid = _token_grid(model, settings.resize_to, settings.block, settings.patch_size, settings.stride)
        per_image = tokens_grid.num_patches(_image_size(data))
    if settings.locality_images > 0 and (settings.locality_queries or 0) > per_image:  # was found after the figure
        parser.error(f"--locality-queries {settings.locality_queries}: each image has {per_image} "
                     f"{'tokens' if settings.tokens else 'patches'} on this grid; pass at most {per_image}")
    image_ids = settings.figure_image_ids(data)
    if not image_ids or min(image_ids) < 0 or max(image_ids) >= len(data):
        parser.error(f"--image-ids must lie in 0..{len(data) - 1} (the images of {data_label(data)}), got {image_ids}")
    try:
        heatmaps = figure_heatmaps(model, data, settings, device=device)
    except ValueError as error:
        parser.error(str(error))
    # heatmap_analysis's second step, called apart: a failure while scoring locality is not a usage error.
    locality = (locality_over_images(model, data, settings, device=device, progress=sys.stderr.isatty())
                if settings.locality_images > 0 else None)
    analysis = HeatmapAnalysis.of(model, data, heatmaps, locality)

    record = {"command": cli.running_command(), **analysis.to_dict(), "output_of": of}
    paths = save_figure_and_json(plot_heatmap_analysis(analysis), record, stem, pdf=args.pdf)

    if heatmaps.tokens is not None:
        print(f"{analysis.model} on {analysis.data}: {heatmaps.grid_shape[0]} x {heatmaps.grid_shape[1]} tokens of "
              f"block {heatmaps.tokens['block']}, the image fed whole at {heatmaps.resize_to} px")
    else:
        print(f"{analysis.model} on {analysis.data}: {heatmaps.grid_shape[0]} x {heatmaps.grid_shape[1]} grid, "
              f"{patch_size} px patches, stride {stride}, resized to {heatmaps.resize_to} px")
    if locality is not None:
        print(format_table(locality.table_rows(), LOCALITY_TABLE_HEADERS))
        paired = locality.paired_h_minus_z
        if paired:
            print(f"h - z locality per image: mean {paired.mean:.3f} (std {paired.std:.3f}); h more local on "
                  f"{paired.fraction_h_more_local:.0%} of {paired.num_images} images")
    for path in paths:
        print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
