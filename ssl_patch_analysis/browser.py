"""An interactive k-NN patch browser for JupyterLab (ipywidgets): paper Fig. 5, one click at a time.

Choose a data set, an image, a grid patch (row, column) and a space (projection ``z`` or embedding
``h``), and see the ``k`` nearest patches of that patch among all grid patches of the indexed
images, each boxed in its source image: blue from the query's own image, green from another image
of its class, grey from another class (:func:`.retrieval.plot_retrieval`).

The patches are embedded once per data set (:func:`.extract.extract_patch_embeddings`, streamed to
an on-disk store under the cache folder, so a re-run reads them back) into one
:class:`.retrieval.PatchIndex` per layer; a click is then one FAISS query and one redraw.

In a notebook::

    from ssl_patch_analysis.browser import build_browser
    browser = build_browser("vicreg", datasets=("cifar10", "imagenette"), num_images={"cifar10": 500})
    browser.widget          # display it
    browser.select(image_id=0, row=1, col=1, layer="h")   # or drive it from code (a data-set image id)
    browser.neighbours      # the last result, nearest first
"""
from __future__ import annotations

# faiss before torch (see retrieval.py): both bring an OpenMP runtime.
from .retrieval import Neighbour, PatchIndex, RETRIEVAL_LAYERS, plot_retrieval  # isort: skip

import hashlib
import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoints import load_model
from .cli import resolve_device
from .data import ImageDataset, cache_dir, load_dataset
from .extract import extract_patch_embeddings, model_sha256
from .models import SSLModel
from .patches import grid
from .report import data_label, model_label, slug
from .store import PatchEmbeddings

# The grid of every data set: patches of half the image side every quarter side, a 3 x 3 grid
# (16 px patches, stride 8 on CIFAR; 112 px, stride 56 on 224 px Imagenette).
PATCH_FRACTION = 0.5
STRIDE_FRACTION = 0.25
DEFAULT_NUM_IMAGES = 500
SPLITS = {"imagenette": "val"}
LAYER_LABELS = {"z": "projection z", "h": "embedding h"}
_RELATION_MARKS = {"same image": "■ same image", "same class, other image": "● same class",
                   "other class": "· other class"}


@dataclass
class BrowsedData:
    """One data set of the browser: its images, their grid-patch embeddings and one index per layer."""

    name: str
    data: ImageDataset
    embeddings: PatchEmbeddings
    indexes: dict[str, PatchIndex]
    patch_size: int
    stride: int
    grid_shape: tuple[int, int]

    @property
    def num_images(self) -> int:
        return len(self.embeddings.image_ids)

    def position(self, image_id: int) -> int:
        """Where data-set image ``image_id`` is among the indexed images (the image slider's value)."""
        found = np.flatnonzero(np.asarray(self.embeddings.image_ids) == int(image_id))
        if len(found) == 0:
            ids = np.asarray(self.embeddings.image_ids)
            raise ValueError(f"image {image_id} of {self.name} is not indexed; the browser holds {len(ids)} images, "
                             f"ids {ids[:5].tolist()}... (browser.sources[{self.name!r}].embeddings.image_ids)")
        return int(found[0])


def default_grid(image_size: Sequence[int]) -> tuple[int, int]:
    """``(patch_size, stride)``: half the image side, every quarter side (a 3 x 3 grid)."""
    side = min(int(image_size[0]), int(image_size[1]))
    return max(1, round(side * PATCH_FRACTION)), max(1, round(side * STRIDE_FRACTION))


def spread_ids(total: int, count: int) -> np.ndarray:
    """``count`` distinct image ids spread evenly over ``0 .. total - 1`` (all of them when ``count >= total``)."""
    return np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(np.int64))


def store_path(root: Path, model: SSLModel, data: ImageDataset, patch_size: int, stride: int,
               image_ids: np.ndarray, resize_to: int, layers: Sequence[str]) -> Path:
    """One store per (model weights, data, grid, images, patch input size, layers): a re-run reuses only its own."""
    ids_digest = hashlib.sha256(np.ascontiguousarray(image_ids, dtype=np.int64).tobytes()).hexdigest()
    key = json.dumps([model_sha256(model), data.name, data.split, patch_size, stride, ids_digest, resize_to,
                      list(layers)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return root / f"{slug(data.name)}-{slug(data.split)}-grid{patch_size}s{stride}-{len(image_ids)}img-{digest}"


def embed_data(model: SSLModel, data: ImageDataset, num_images: int = DEFAULT_NUM_IMAGES,
               patch_size: int | None = None, stride: int | None = None, resize_to: int | None = None,
               layers: Sequence[str] = RETRIEVAL_LAYERS, cache: str | Path | None = None,
               device: str | torch.device | None = None, batch_size: int = 64, progress: bool = True) -> BrowsedData:
    """Embed every grid patch of ``num_images`` images of ``data`` and index each layer.

    The images are spread evenly over the split (:func:`spread_ids`), so that a split sorted by
    class (Imagenette) shows every class.

    The embeddings go to a store under ``cache`` (default ``<cache_dir()>/browser``), so a second
    call with the same settings reads them back instead of running the model.
    """
    if data.image_size is None:
        raise ValueError(f"the images of {data_label(data)} vary in size: load it with --image-size S (image_size=S) "
                         "so that one grid fits every image")
    if not 1 <= num_images <= len(data):
        raise ValueError(f"num_images must be between 1 and {len(data)} (the images of {data_label(data)}), "
                         f"got {num_images}")
    default_patch, default_stride = default_grid(data.image_size)
    patch_size, stride = patch_size or default_patch, stride or default_stride
    sampler = grid(patch_size, stride)
    grid_shape = sampler.grid_shape(tuple(data.image_size))
    if grid_shape[0] * grid_shape[1] * num_images < 2:
        raise ValueError("the browser needs at least 2 patches to search: index more images or a finer grid")
    missing = [layer for layer in layers if layer != "h" and not (layer == "z" and model.has_projector)]
    if missing or not layers:
        raise ValueError(f"layers {list(layers)} are not all available: the model has h"
                         f"{' and z' if model.has_projector else ' only (no projector)'}")
    size = int(resize_to or model.preprocess.input_size)
    root = Path(cache) if cache is not None else cache_dir() / "browser"
    image_ids = spread_ids(len(data), num_images)
    extracted = ["h"] + [layer for layer in layers if layer != "h"]
    path = store_path(root, model, data, patch_size, stride, image_ids, size, extracted)
    embeddings = extract_patch_embeddings(model, data, sampler, layers=extracted,
                                          image_ids=image_ids, batch_size=batch_size,
                                          resize_to=size, device=device, out=path, progress=progress,
                                          overwrite=True,  # a cache: a stale or damaged one is rebuilt
                                          # Decode in this process: a few hundred images are quick, and worker
                                          # processes forked from a busy Jupyter kernel have hung its runs.
                                          num_workers=0)
    indexes = {layer: PatchIndex.from_embeddings(embeddings, layer, device=device) for layer in layers}
    return BrowsedData(data.name, data, embeddings, indexes, patch_size, stride, grid_shape)


class PatchBrowser:
    """The widgets and their callbacks: every change of a control runs one :meth:`update`.

    ``sources`` maps a data-set name to its :class:`BrowsedData`. After each update,
    ``neighbours`` holds the ``k`` nearest patches (nearest first, the query itself left out),
    ``figure`` the matplotlib figure, ``png`` its bytes, ``seconds`` how long the update took, and
    ``output`` (an ``ipywidgets.Image``) shows the figure. An Image widget, not an Output widget:
    each update is one state change of the widget, with no captured display messages to route.
    """

    def __init__(self, model: SSLModel, sources: Mapping[str, BrowsedData], k: int = 8, layer: str = "z",
                 exclude_same_image: bool = False):
        import ipywidgets as widgets

        if not sources:
            raise ValueError("the browser needs at least one data set (see embed_data)")
        self.model = model
        self.sources = dict(sources)
        self.neighbours: list[Neighbour] = []
        self.figure = None
        self.png = b""
        self.seconds = float("nan")
        self._quiet = False
        first = next(iter(self.sources.values()))
        layers = list(first.indexes)
        if layer not in layers:
            raise ValueError(f"layer must be one of {', '.join(layers)}, got {layer!r}")

        self.data_choice = widgets.Dropdown(options=list(self.sources), value=next(iter(self.sources)),
                                            description="data set")
        # The slider walks through the indexed images; the summary names the data-set id.
        self.image_slider = widgets.IntSlider(value=0, min=0, max=first.num_images - 1, description="image #",
                                              continuous_update=False)
        self.row_slider = widgets.IntSlider(value=first.grid_shape[0] // 2, min=0, max=first.grid_shape[0] - 1,
                                            description="patch row", continuous_update=False)
        self.col_slider = widgets.IntSlider(value=first.grid_shape[1] // 2, min=0, max=first.grid_shape[1] - 1,
                                            description="patch col", continuous_update=False)
        self.layer_buttons = widgets.ToggleButtons(options=[(LAYER_LABELS.get(name, name), name) for name in layers],
                                                   value=layer, description="space")
        self.k_slider = widgets.IntSlider(value=k, min=1, max=max(16, k), description="k", continuous_update=False)
        self.exclude_box = widgets.Checkbox(value=exclude_same_image, description="leave out the query's image")
        self.summary = widgets.HTML()
        self.output = widgets.Image(format="png")
        for control in (self.data_choice, self.image_slider, self.row_slider, self.col_slider, self.layer_buttons,
                        self.k_slider, self.exclude_box):
            control.observe(self._on_change, names="value")
        self.widget = widgets.VBox([
            widgets.HBox([self.data_choice, self.layer_buttons]),
            widgets.HBox([self.image_slider, self.row_slider, self.col_slider]),
            widgets.HBox([self.k_slider, self.exclude_box]),
            self.summary, self.output,
        ])
        self.update()

    @property
    def source(self) -> BrowsedData:
        return self.sources[self.data_choice.value]

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _on_change(self, change) -> None:
        if self._quiet:
            return
        if change["owner"] is self.data_choice:
            self._quiet = True
            try:
                self._fit_controls()
            finally:
                self._quiet = False
        self.update()

    def _fit_controls(self) -> None:
        """Ranges of the image and patch sliders for the chosen data set (values clamped into them).

        Called with the callbacks silenced, so that the moves make no update of their own."""
        source = self.source
        for slider, top in ((self.image_slider, source.num_images - 1), (self.row_slider, source.grid_shape[0] - 1),
                            (self.col_slider, source.grid_shape[1] - 1)):
            slider.value = min(slider.value, top)
            slider.max = top

    def select(self, image_id: int, row: int, col: int, layer: str | None = None, data: str | None = None,
               k: int | None = None) -> list[Neighbour]:
        """Set the controls as a user's clicks would (one update), and return the neighbours shown.

        ``image_id`` is the image's index in the data set (one of ``source.embeddings.image_ids``);
        ``row``, ``col`` its grid cell; ``data`` switches the data set first.
        """
        if data is not None and data not in self.sources:
            raise ValueError(f"unknown data set {data!r}: the browser holds {', '.join(self.sources)}")
        source = self.sources[data] if data is not None else self.source
        rows, cols = source.grid_shape
        position = source.position(image_id)
        if not (0 <= row < rows and 0 <= col < cols):
            raise ValueError(f"(row, col) must lie in the {rows} x {cols} grid: rows 0..{rows - 1}, cols 0..{cols - 1}")
        if layer is not None and layer not in source.indexes:
            raise ValueError(f"layer must be one of {', '.join(source.indexes)}, got {layer!r}")
        self._quiet = True
        try:
            if data is not None:
                self.data_choice.value = data
                self._fit_controls()
            self.image_slider.value, self.row_slider.value, self.col_slider.value = position, row, col
            if layer is not None:
                self.layer_buttons.value = layer
            if k is not None:
                self.k_slider.value = k
        finally:
            self._quiet = False
        self.update()
        return self.neighbours

    def update(self) -> None:
        """Query the chosen patch in the chosen layer's index and redraw."""
        started = time.perf_counter()
        source, layer = self.source, self.layer_buttons.value
        image_id = int(source.embeddings.image_ids[self.image_slider.value])
        patch_index = self.row_slider.value * source.grid_shape[1] + self.col_slider.value
        index = source.indexes[layer]
        self.neighbours = index.query(image_id, patch_index, k=self.k_slider.value,
                                      exclude_same_image=self.exclude_box.value)
        query_box = index.boxes[index.row(image_id, patch_index)]
        label = int(source.data.labels[image_id])
        title = (f"{model_label(self.model)} on {data_label(source.data)}: {source.patch_size} px patches, stride "
                 f"{source.stride}, {len(index)} patches of {source.num_images} images")
        self.figure = plot_retrieval(source.data, image_id, query_box, label, {layer: self.neighbours},
                                     class_names=source.data.class_names, title=title)
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=90)
        self.png = buffer.getvalue()
        self.seconds = time.perf_counter() - started
        self.summary.value = self._summary_html(source, image_id, label, layer)
        self._show()

    def _summary_html(self, source: BrowsedData, image_id: int, label: int, layer: str) -> str:
        names = source.data.class_names
        counts = {"same image": 0, "same class, other image": 0, "other class": 0}
        for n in self.neighbours:
            relation = ("same image" if n.image_id == image_id else
                        "same class, other image" if n.label == label else "other class")
            counts[relation] += 1
        marks = ", ".join(f"{_RELATION_MARKS[r]}: {c}" for r, c in counts.items())
        return (f"<b>query</b>: data-set image {image_id} ({names[label]}), patch ({self.row_slider.value}, "
                f"{self.col_slider.value}) in {LAYER_LABELS.get(layer, layer)} &nbsp; | &nbsp; {len(self.neighbours)} "
                f"nearest: {marks} &nbsp; | &nbsp; {self.seconds * 1000:.0f} ms")

    def _show(self) -> None:
        self.output.value = self.png


def build_browser(model: str | Path | SSLModel = "vicreg", datasets: Sequence[str] = ("cifar10", "imagenette"),
                  num_images: int | Mapping[str, int] = DEFAULT_NUM_IMAGES, k: int = 8, layer: str = "z",
                  root: str | Path | None = None, cache: str | Path | None = None,
                  device: str | torch.device | None = None, progress: bool = True) -> PatchBrowser:
    """Load the model and the data sets, embed and index their grid patches (cached), and build the browser.

    ``model``: a shipped name (``vicreg``, ``bagssl``), a checkpoint path or a loaded model.
    ``num_images``: images indexed per data set (one number for all, or per name).
    ``root``: the data folder (default ``$SSL_PATCH_ANALYSIS_DATA``).
    """
    device = resolve_device(device)
    ssl_model = model if isinstance(model, SSLModel) else load_model(model, device=device, verbose=False)
    sources = {}
    for name in datasets:
        data = load_dataset(name, SPLITS.get(name, "test"), root=root)
        count = num_images.get(name, DEFAULT_NUM_IMAGES) if isinstance(num_images, Mapping) else num_images
        sources[name] = embed_data(ssl_model, data, num_images=min(int(count), len(data)), cache=cache,
                                   device=device, progress=progress)
    return PatchBrowser(ssl_model, sources, k=k, layer=layer)


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.browser says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
