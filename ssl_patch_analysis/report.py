"""What every analysis command shares: its model/data flags, and how it writes what a person reads.

Each analysis (``python -m ssl_patch_analysis.<name>``) takes the same ``--model``, ``--data``,
``--split``, ``--data-root``, ``--skip-bad-images``, ``--device``, ``--download``, ``--seed``, ``--random-init``,
``--amp``/``--no-amp``, ``--compile`` and ``--out`` flags (:func:`add_model_data_args`, :func:`load_model_and_data`,
:func:`extraction_flags`), and writes a figure (PNG, plus PDF with
``--pdf``) and the numbers behind it (JSON) to ``--out`` (default ``figures/``), then prints a short
table (:func:`format_table`). Figure titles name the model and the data (:func:`model_label`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .extract import add_speed_args, amp_from_args, extraction_options

DEFAULT_OUT = Path("figures")
RANDOM_INIT_CALIBRATION_IMAGES = 512


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the message names the bad value)."""
    return _bounded_int(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (the message names the bad value)."""
    return _bounded_int(text, 0, "an integer >= 0")


def _bounded_int(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def add_model_data_args(parser: argparse.ArgumentParser, model_default: str | None = "vicreg",
                        data_default: str = "cifar10", split_default: str = "test") -> None:
    """The flags that choose a model and a data set, with the shipped defaults (offline)."""
    parser.add_argument("--model", default=model_default, required=model_default is None,
                        help="shipped name (vicreg, bagssl), published name (vicreg-resnet50, ...) or checkpoint "
                             f"path (default: {model_default})")
    parser.add_argument("--data", default=data_default,
                        help=f"cifar10, cifar100, imagenette, or an image folder (default: {data_default})")
    parser.add_argument("--split", default=None,
                        help=f"data split (default: {split_default}; val for imagenette)")
    parser.add_argument("--data-root", default=None,
                        help="folder holding the data sets (default: $SSL_PATCH_ANALYSIS_DATA)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize + centre-crop the images of a folder data set to this square")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="image folders: check every file first and leave out those that cannot be read, listing "
                             "them (default: stop at the first, naming it)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--download", action="store_true",
                        help="allow downloading published weights / CIFAR (needs internet)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    parser.add_argument("--random-init", action="store_true",
                        help="the control: --model's architecture with fresh random weights (seeded by --seed), "
                             f"BatchNorm statistics calibrated on the first {RANDOM_INIT_CALIBRATION_IMAGES} images "
                             "of the data; results are named <model>-random-init")
    add_speed_args(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT}/)")
    parser.add_argument("--pdf", action="store_true", help="also write the figure as PDF")


def extraction_flags(args: argparse.Namespace):
    """An :func:`~.extract.extraction_options` block from ``--amp`` / ``--no-amp`` / ``--compile``."""
    return extraction_options(amp=amp_from_args(args), compile=True if getattr(args, "compile", False) else None)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model_and_data(args: argparse.Namespace, split_default: str = "test"):
    """``(model, dataset, device)`` from :func:`add_model_data_args`'s flags."""
    from .checkpoints import load_model
    from .data import load_dataset

    device = resolve_device(args.device)
    split = args.split or ("val" if args.data == "imagenette" else split_default)
    model = load_model(args.model, device=device, download=args.download)
    data = load_dataset(args.data, split, root=args.data_root, download=args.download, image_size=args.image_size,
                        skip_bad_images=args.skip_bad_images)
    if getattr(args, "random_init", False):
        model = random_init_control(model, data, args.seed)
    return model, data, device


def random_init_control(model, data, seed: int):
    """``--random-init``: :func:`~.models.randomly_initialised` with BatchNorm calibrated on ``data``'s first images."""
    from .models import randomly_initialised

    count = min(len(data), RANDOM_INIT_CALIBRATION_IMAGES)
    images = data.get_batch(list(range(count)))
    model = randomly_initialised(model, seed=seed, calibration_images=images)
    print(f"random-init control: {model.info.arch} with fresh weights (seed {seed}), BatchNorm calibrated on "
          f"{count} images of {data_label(data)}")
    return model


def model_label(model) -> str:
    """A short name for titles: the shipped/published name or checkpoint file, and the method."""
    name = Path(str(model.info.source or "model")).stem
    method = model.info.method
    return name if method in ("unknown", "") or method in name else f"{name} ({method})"


def data_label(data) -> str:
    """The data set as a figure should name it (e.g. "CIFAR-10 (JPEG copy) test")."""
    description = getattr(data, "description", None) or getattr(data, "name", "data")
    split = getattr(data, "split", "")
    return f"{description} {split}".strip()


def slug(text: str) -> str:
    """A file-name-safe form of ``text`` (``vicreg-resnet18-cifar10``, ``cifar10``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-").lower() or "x"


def model_name(args: argparse.Namespace) -> str:
    """``--model`` as output files name it: ``vicreg``, or ``vicreg-random-init`` for the control."""
    if getattr(args, "random_init", False):
        return f"{Path(str(args.model)).stem}-random-init"
    return str(args.model)


def output_stem(out: Path | str, analysis: str, model_name: str, data_name: str) -> Path:
    """``out/<analysis>_<model>_<data>`` (no suffix); creates ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{analysis}_{slug(Path(str(model_name)).stem)}_{slug(Path(str(data_name)).name)}"


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _plain(obj.detach().cpu().numpy())
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_json(obj: Any, path: Path | str) -> Path:
    """Write ``obj`` (dicts, lists, numbers, arrays, tensors) as indented JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(_plain(obj), indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig, stem: Path | str, pdf: bool = False, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``stem.png`` (and ``stem.pdf``); returns the paths written and closes it."""
    import matplotlib.pyplot as plt

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png")] + ([stem.with_suffix(".pdf")] if pdf else [])
    for path in paths:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return paths


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], floatfmt: str = ".3f") -> str:
    """A plain aligned text table (also valid Markdown) for the terminal and the README."""
    def cell(value: Any) -> str:
        if isinstance(value, (float, np.floating)):
            return format(float(value), floatfmt)
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
