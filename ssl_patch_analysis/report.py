"""How every analysis writes what a person reads: figures, the numbers behind them, tables and names.

Each analysis (``python -m ssl_patch_analysis.<name>``) writes a figure (PNG, plus PDF with ``--pdf``) and
the numbers behind it (JSON) to ``--out`` (default ``figures/``), then prints a short table
(:func:`format_table`). Figure titles name the model and the data (:func:`model_label`,
:func:`data_label`); files are named ``<analysis>_<model>_<data>`` (:func:`output_stem`). The flags
themselves live in :mod:`.cli`.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import disk_full, is_disk_full


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


OUTPUT_ADVICE = "free some space (or pass another --out) and run the same command again"


def save_json(obj: Any, path: Path | str) -> Path:
    """Write ``obj`` (dicts, lists, numbers, arrays, tensors) as indented JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(_plain(obj), indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as error:
        if not is_disk_full(error):
            raise
        kept = f"the earlier {path.name} is kept" if path.is_file() else f"no {path.name} was there before"
        raise disk_full(path.parent, path.name, kept, "free some space and run the same command again") from error
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig, stem: Path | str, pdf: bool = False, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``stem.png`` (and ``stem.pdf``); returns the paths written and closes it."""
    return save_figure_and_json(fig, None, stem, pdf=pdf, dpi=dpi)


def save_figure_and_json(fig, numbers: Any, stem: Path | str, pdf: bool = False, dpi: int = 150) -> list[Path]:
    """``fig`` as ``stem.png`` (and ``stem.pdf``) and ``numbers`` as ``stem.json`` (none if None), as one: each file is
    written beside its target first and all are moved in (renames in one folder) only once every one is written, so a
    failure while writing (a full disk) or a target in the way (a folder) leaves the earlier figure and numbers as
    they were, never a new figure beside old numbers. A rename that fails after others succeeded (a file made
    immutable) puts the earlier files back (each kept as a hard link, or a copy, until all are in). Returns the
    paths written (figures first); closes the figure."""
    import matplotlib.pyplot as plt

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png")] + ([stem.with_suffix(".pdf")] if pdf else [])
    if numbers is not None:
        paths.append(stem.with_suffix(".json"))
    drafts = [path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}") for path in paths]
    earlier = [path.with_name(f".{path.stem}.old{os.getpid()}{path.suffix}") for path in paths]
    try:
        for path in paths:
            if path.is_dir():
                raise IsADirectoryError(f"{path} is a folder: move it away, or pass another --out")
        try:
            for path, draft in zip(paths, drafts, strict=True):
                if path.suffix == ".json":
                    with open(draft, "w") as f:
                        f.write(json.dumps(_plain(numbers), indent=1) + "\n")
                else:
                    fig.savefig(draft, dpi=dpi, bbox_inches="tight")
        except OSError as error:
            if not is_disk_full(error):
                raise
            raise disk_full(stem.parent, " and ".join(p.name for p in paths), "the earlier files are kept as they were",
                            OUTPUT_ADVICE) from error
        for path, kept in zip(paths, earlier, strict=True):
            if path.exists():
                try:
                    os.link(path, kept)
                except OSError:  # a file system without hard links (FAT, some network mounts): a copy keeps it
                    shutil.copy2(path, kept)
        moved: list[Path] = []
        try:
            for path, draft in zip(paths, drafts, strict=True):
                os.replace(draft, path)
                moved.append(path)
        except OSError:
            for path in moved:  # the pair as it was: the earlier file back, or none where there was none
                kept = earlier[paths.index(path)]
                if kept.exists():
                    os.replace(kept, path)
                else:
                    path.unlink()
            raise
    finally:
        plt.close(fig)
        for leftover in (*drafts, *earlier):
            leftover.unlink(missing_ok=True)
    return paths


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], floatfmt: str = ".3f") -> str:
    """A plain aligned text table (also valid Markdown) for the terminal and the README."""
    def cell(value: Any) -> str:
        if isinstance(value, (float, np.floating)):
            return format(float(value), floatfmt)
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.report says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
