"""The command-line vocabulary every command shares: one flag per idea, with one type and one meaning.

Every command (``python -m ssl_patch_analysis.<extract|convergence|heatmap|retrieval|evaluate|train|
checkpoints>``) builds its parser from :class:`ArgumentParser` and the flag builders below, so that a
flag means the same thing wherever it appears:

=====================  =========================================================================
``--model``            shipped name, published name or checkpoint path (default ``vicreg``);
                       ``--arch`` / ``--stem`` / ``--cifar-padding`` / ``--num-heads`` override what the
                       weights cannot show;
                       ``--download`` allows fetching published weights / data sets;
                       ``--random-init`` the control: the same architecture with fresh weights
``--data``             ``cifar10``, ``cifar100``, ``imagenette`` or an image folder (default ``cifar10``);
                       ``--split`` (default :func:`~.data.default_split`), ``--data-root``,
                       ``--image-size``, ``--skip-bad-images``
``--device``           ``cpu``, ``cuda``, ``cuda:1`` (default: cuda when available);
                       ``--amp`` / ``--no-amp``, ``--compile``
``--num-images``       how many images of the data set the command works on (a count or ``all``)
``--layers``           comma-separated among ``h``, ``z``, ``pre_feature``
``--scale``            multi-scale crops' area range ``MIN,MAX`` (e.g. ``0.08,1``)
``--resize-to``        side in pixels every patch is resized to for the model
``--tokens``           Vision Transformers: the model's own patch tokens (one forward pass per image) instead
                       of crops; ``--block K`` the transformer block they are taken from (default the last)
``--store``            one patch-embedding store folder (``extract``, ``retrieval``);
                       ``--cache-dir`` a folder in which a command keeps its stores (``evaluate``)
``--out``              the folder a command writes its figures and numbers to (default ``figures/``);
                       ``train`` writes a run folder, ``--run-dir``
``--seed``, ``--batch-size``, ``--no-progress``, ``--pdf``, ``--debug``
=====================  =========================================================================

Errors a user can fix (a bad value, a missing file, a damaged checkpoint, ``--device cuda`` without a GPU)
end the command with one line on stderr and exit status 2 (:func:`command`); ``--debug`` (or
``SSL_PATCH_ANALYSIS_DEBUG=1``) shows the traceback instead. A flag of an older version is named with the
flag that replaced it.
"""
from __future__ import annotations

import argparse
import contextvars
import functools
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import is_disk_full

DEBUG_ENV = "SSL_PATCH_ANALYSIS_DEBUG"
DEFAULT_OUT = Path("figures")
LAYER_NAMES = ("h", "z", "pre_feature")
RANDOM_INIT_CALIBRATION_IMAGES = 512

# Flags of earlier versions -> what replaced them (said in one line when an old flag is used).
RENAMED_FLAGS = {
    "extract": {"--out": "--store DIR"},
    "train": {"--out": "--run-dir DIR", "--min-scale": "--scale MIN,MAX", "--max-scale": "--scale MIN,MAX"},
    "evaluate": {"--store-dir": "--cache-dir DIR", "--epochs": "--probe-epochs", "--lr": "--probe-lr",
                 "--weight-decay": "--probe-weight-decay", "--layer": "--layers"},
    "convergence": {"--layer": "--layers"},
    "retrieval": {"--k": "--neighbours N"},
    "heatmap": {"--num-images": "--figure-images N (the images shown; --num-images is not used by heatmap)"},
}


class UserError(ValueError):
    """A mistake in what the user asked for, said in one line (exit status 2)."""


# What a user can act on: said in one line, exit status 2. Anything else is a bug: one line, exit status 1.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, torch.OutOfMemoryError)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` speaking the shared vocabulary: ``--debug`` on every command, no abbreviated
    flags (``--layer`` is not ``--layers``), errors in one line naming the bad value and ``--help``, and flags of
    earlier versions named with their replacement."""

    def __init__(self, *args: Any, renamed: dict[str, str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.renamed = dict(renamed or {})
        self.add_argument("--debug", action="store_true",
                          help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        for word in argv:
            flag = word.split("=", 1)[0]
            if flag in self.renamed and not any(flag in action.option_strings for action in self._actions):
                self.error(f"{flag} is now {self.renamed[flag]}")
        return super().parse_args(argv, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        one_line = " ".join(message.split())
        self.exit(2, f"error: {one_line} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------------ types


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


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _bounded_float(text, 0.0, "a number >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _bounded_float(text, 0.0, "a positive number")
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's formatter that appends each option's default, except where there is none to say (None, a switch
    that is off) and where the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def folder(text: str) -> Path:
    """argparse type of a folder the command writes into (``--out``, ``--cache-dir``, ``--run-dir``): a path that is
    not an existing file, that can be made when missing (no file on the way to it) and that can be written into,
    said before any work instead of an errno after it (and the results lost)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a folder, but {text} is a file")
    _check_can_write_under(path, text)
    return path


def output_file(text: str) -> Path:
    """argparse type of a file the command writes (``--json``): not a folder, and its folder can be made and written
    into, said before any work."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file, but {text} is a folder")
    _check_can_write_under(path.parent, text)
    return path


def _check_can_write_under(path: Path, text: str) -> None:
    """ArgumentTypeError unless ``path`` exists as a folder that can be written into, or its nearest existing
    ancestor is such a folder (``path`` is made there later). Probed by making an unnamed temporary file: permissions
    alone do not say it (a read-only file system, a root user, an immutable folder)."""
    import tempfile

    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text} cannot be made: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write into {existing} ({error.strerror or error}): pass a folder "
                                         "you can write to") from None


def probability(text: str) -> float:
    """argparse type: a probability, 0 <= p <= 1."""
    value = _bounded_float(text, 0.0, "a probability between 0 and 1")
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}")
    return value


def _bounded_float(text: str, low: float, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not low <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def count_or_all(text: str) -> int | None:
    """argparse type of ``--num-images``: a positive integer, or ``all`` (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers (``20,200``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def layer_list(text: str) -> list[str]:
    """argparse type of ``--layers``: comma-separated among h, z, pre_feature."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [name for name in names if name not in LAYER_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected comma-separated layers among {', '.join(LAYER_NAMES)}, got "
                                         f"{text!r}")
    return list(dict.fromkeys(names))


def scale_range(text: str) -> tuple[float, float]:
    """argparse type of ``--scale``: ``MIN,MAX`` area fractions with 0 < MIN <= MAX <= 1."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers MIN,MAX (e.g. 0.08,1), got {text!r}") from None
    if not 0 < low <= high <= 1:
        raise argparse.ArgumentTypeError(f"expected 0 < MIN <= MAX <= 1, got {text!r}")
    return low, high


def device_name(text: str) -> str:
    """argparse type of ``--device``: a name torch understands (cpu, cuda, cuda:1, mps)."""
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, got {text!r}") from None
    return text


# --------------------------------------------------------------------------------------------- flag builders


def add_model_args(parser: argparse.ArgumentParser, default: str | None = "vicreg", random_init: bool = True) -> None:
    """``--model`` and what loading it may need: overrides of what the weights do not say, ``--download`` and
    the ``--random-init`` control."""
    from .models import ARCHS

    parser.add_argument("--model", default=default, required=default is None,
                        help="shipped name (vicreg, bagssl), published name (vicreg-resnet50, ...) or checkpoint "
                             "path" + (" (required)" if default is None else f" (default: {default})"))
    parser.add_argument("--arch", choices=list(ARCHS), default=None,
                        help="override the architecture inferred from the weights' shapes")
    parser.add_argument("--stem", choices=["imagenet", "cifar"], default=None,
                        help="override the stem inferred from conv1 (cifar: 3x3 conv, no max-pool)")
    parser.add_argument("--cifar-padding", type=int, choices=[1, 2], default=None,
                        help="padding of a CIFAR stem's conv1, which the weights cannot show (default: the "
                             "checkpoint's record, else 1)")
    parser.add_argument("--num-heads", type=positive_int, default=None,
                        help="Vision Transformers: attention heads, which the weights cannot show (default: the "
                             "format's, else timm's for the width: ViT-Ti 3, ViT-S 6, ViT-B 12)")
    parser.add_argument("--download", action="store_true",
                        help="allow downloading published weights and data sets (needs internet)")
    if random_init:
        parser.add_argument("--random-init", action="store_true",
                            help="the control: --model's architecture with fresh random weights (seeded by --seed), "
                                 f"BatchNorm statistics calibrated on the first {RANDOM_INIT_CALIBRATION_IMAGES} "
                                 "images of the data; results are named <model>-random-init")


def add_data_args(parser: argparse.ArgumentParser, default: str = "cifar10") -> None:
    """``--data`` and how to read it."""
    parser.add_argument("--data", default=default,
                        help=f"cifar10, cifar100, imagenette, or an image folder (default: {default})")
    parser.add_argument("--split", default=None,
                        help="data split (default: test; val for imagenette, the only split it has)")
    parser.add_argument("--data-root", default=None,
                        help="folder holding the data sets (default: $SSL_PATCH_ANALYSIS_DATA)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="image folders: resize and centre-crop every image to this square")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="image folders: check every file first and leave out those that cannot be read, listing "
                             "them (default: stop at the first, naming it)")


def add_device_args(parser: argparse.ArgumentParser, cpu_amp_default: bool = False) -> None:
    """``--device``, ``--amp`` / ``--no-amp`` and ``--compile``. ``cpu_amp_default``: the command autocasts by
    default on CPUs with bf16 units (the trainer); the analyses and extract keep float32 on every CPU unless asked."""
    parser.add_argument("--device", type=device_name, default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    precision = parser.add_mutually_exclusive_group()
    default = ("on CUDA, and on CPUs with bf16 units, AMX or AVX512-BF16" if cpu_amp_default else
               "on CUDA; float32 on a CPU, where --amp is fast with bf16 units, AMX or AVX512-BF16")
    precision.add_argument("--amp", action="store_true", default=None, help=f"bf16 autocast (default: {default})")
    precision.add_argument("--no-amp", dest="amp", action="store_false", help="float32 everywhere (no autocast)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (a one-off compilation, then faster)")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--out`` (the folder of figures and numbers) and ``--pdf``."""
    parser.add_argument("--out", type=folder, default=str(DEFAULT_OUT),  # a string: argparse checks it as typed
                        help=f"folder the figures and numbers are written to (default: {DEFAULT_OUT}/)")
    parser.add_argument("--pdf", action="store_true", help="also write the figures as PDF")


def add_seed_arg(parser: argparse.ArgumentParser, help: str = "seed of every random choice") -> None:
    parser.add_argument("--seed", type=non_negative_int, default=0, help=f"{help} (default: 0)")


def add_batch_size_arg(parser: argparse.ArgumentParser, default: int | None = 64,
                       help: str = "images per extraction batch") -> None:
    parser.add_argument("--batch-size", type=positive_int, default=default,
                        help=help + ("" if default is None else f" (default: {default})"))


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_num_images_arg(parser: argparse.ArgumentParser, default: int | None, what: str) -> None:
    """``--num-images N|all``: how many images of the data set (the first ones) the command works on."""
    shown = "all" if default is None else default
    parser.add_argument("--num-images", type=count_or_all, default=default, metavar="N|all",
                        help=f"{what}: the first N images of the split, or all (default: {shown})")


def add_layers_arg(parser: argparse.ArgumentParser, default: Sequence[str] | None, one: bool = False) -> None:
    """``--layers``: comma-separated among h, z, pre_feature (``one``: the command takes a single layer)."""
    shown = "all the model has" if default is None else ",".join(default)
    what = "the layer (one of" if one else "comma-separated among"
    parser.add_argument("--layers", type=layer_list, default=None if default is None else list(default),
                        help=f"{what} h (embedding), z (projection), pre_feature (EMP-SSL's){')' if one else ''} "
                             f"(default: {shown})")


def one_layer(args: argparse.Namespace, command: str) -> str:
    """The single layer of a command that analyses one layer per run."""
    if len(args.layers) != 1:
        raise UserError(f"{command} analyses one layer per run, got --layers {','.join(args.layers)}: run it once per "
                        "layer")
    return args.layers[0]


def add_resize_arg(
    parser: argparse.ArgumentParser, type: Callable[[str], Any] = positive_int,
    help: str = "side in pixels every patch is resized to for the model (default: its input size)",
) -> None:
    parser.add_argument("--resize-to", type=type, default=None, help=help)


def add_scale_arg(parser: argparse.ArgumentParser, default: tuple[float, float] | None, help: str) -> None:
    shown = "none" if default is None else f"{default[0]:g},{default[1]:g}"
    parser.add_argument("--scale", type=scale_range, default=default, metavar="MIN,MAX",
                        help=f"{help} (default: {shown})")


def add_tokens_args(parser: argparse.ArgumentParser) -> None:
    """``--tokens`` (a Vision Transformer's own patch tokens instead of crops through the network) and ``--block K``
    (the transformer block whose tokens are taken); read them back with :func:`token_block`."""
    parser.add_argument("--tokens", action="store_true",
                        help="Vision Transformers: the model's own patch tokens, one forward pass per whole image (fed "
                             "at --resize-to, default the input size), each token's box its pixel square, instead of "
                             "crops through the network")
    parser.add_argument("--block", type=non_negative_int, default=None, metavar="K",
                        help="with --tokens: the transformer block whose tokens are taken, 0 = the first (default: "
                             "the last); every block's tokens go through the final norm")


def token_block(args: argparse.Namespace) -> int | None:
    """``--block``, refused without ``--tokens`` (it names the ViT block whose tokens are taken)."""
    if getattr(args, "block", None) is not None and not getattr(args, "tokens", False):
        raise UserError(f"--block {args.block} applies to --tokens only (the ViT block whose tokens are taken): add "
                        "--tokens, or leave out --block")
    return getattr(args, "block", None)


def analysis_name(analysis: str, args: argparse.Namespace, default_layers: Sequence[str] = ("h",)) -> str:
    """The name output files of ``analysis`` take: ``convergence``, ``convergence_tokens`` (``_block<K>``) with
    ``--tokens``, and the layers after it where ``--layers`` is not the command's default (``convergence_z``,
    ``heatmap_h``), so a token figure never replaces the figure of crops, nor a figure of z the figure of h (the
    layer the claims are about)."""
    name = analysis
    if getattr(args, "tokens", False):
        block = getattr(args, "block", None)
        name = f"{analysis}_tokens" + ("" if block is None else f"_block{block}")
    layers = getattr(args, "layers", None)
    if isinstance(layers, (list, tuple)) and set(layers) != set(default_layers):
        name += "_" + "_".join(layers)
    return name


def add_analysis_args(parser: argparse.ArgumentParser) -> None:
    """What every analysis command takes: model, data, device, seed, progress and outputs."""
    add_model_args(parser)
    add_data_args(parser)
    add_device_args(parser)
    add_seed_arg(parser)
    add_progress_arg(parser)
    add_output_args(parser)


# ----------------------------------------------------------------------------------------- from flags


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``--device`` as a torch device (default: cuda when available); cuda without a GPU is a user error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible on this machine; pass --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        available = getattr(getattr(torch, device.type, None), "is_available", None)  # torch.mps, torch.xpu, ...
        if available is None or not available():
            raise UserError(f"--device {device}: this machine cannot run on {device.type}; pass --device cpu"
                            + (" or cuda" if torch.cuda.is_available() else ""))
    return device


def split_of(args: argparse.Namespace) -> str:
    """``--split``, or the data set's default split."""
    from .data import default_split

    return args.split or default_split(args.data)


def load_model_from_args(args: argparse.Namespace, device: torch.device | str, verbose: bool = True):
    """``--model`` with its overrides, as :func:`~.checkpoints.load_model` reads it."""
    from .checkpoints import load_model

    return load_model(args.model, device=device, download=args.download, arch=args.arch, stem=args.stem,
                      cifar_padding=args.cifar_padding, num_heads=args.num_heads, verbose=verbose)


def load_data_from_args(args: argparse.Namespace, split: str | None = None):
    """``--data`` (``split`` or ``--split``) as :func:`~.data.load_dataset` reads it; ``--split`` on an image folder
    without split sub-folders is refused (was ignored: every split was the whole folder)."""
    from .data import ARCHIVE_DATASETS, SPLIT_FOLDER_NAMES, load_dataset

    folder = Path(str(args.data)).expanduser()
    if (split is None and args.split is not None and str(args.data).lower() not in ARCHIVE_DATASETS
            and folder.is_dir() and not (folder / args.split).is_dir()
            and not any((folder / name).is_dir() for name in SPLIT_FOLDER_NAMES)):
        raise UserError(f"--split {args.split}: the image folder {args.data} has no split sub-folders (its images are "
                        "one set, whatever --split says): leave --split out, or give the folder train/ and test/ "
                        "sub-folders")
    return load_dataset(args.data, split or split_of(args), root=args.data_root, download=args.download,
                        image_size=args.image_size, skip_bad_images=args.skip_bad_images)


def load_model_and_data(args: argparse.Namespace):
    """``(model, dataset, device)`` from the shared model, data and device flags (with ``--random-init``)."""
    device = resolve_device(args.device)
    model = load_model_from_args(args, device)
    data = load_data_from_args(args)
    if getattr(args, "random_init", False):
        model = random_init_control(model, data, args.seed)
    return model, data, device


def random_init_control(model, data, seed: int):
    """``--random-init``: :func:`~.models.randomly_initialised` with BatchNorm calibrated on ``data``'s first images."""
    from .models import randomly_initialised
    from .report import data_label

    count = min(len(data), RANDOM_INIT_CALIBRATION_IMAGES)
    images = data.get_batch(list(range(count)))
    model = randomly_initialised(model, seed=seed, calibration_images=images)
    print(f"random-init control: {model.info.arch} with fresh weights (seed {seed}), BatchNorm calibrated on "
          f"{count} images of {data_label(data)}")
    return model


def extraction_flags(args: argparse.Namespace):
    """An :func:`~.extract.extraction_options` block from ``--amp`` / ``--no-amp`` / ``--compile``."""
    from .extract import extraction_options

    return extraction_options(amp=getattr(args, "amp", None), compile=True if getattr(args, "compile", False) else None)


def model_name(args: argparse.Namespace) -> str:
    """``--model`` as output files name it: ``vicreg``, or ``vicreg-random-init`` for the control."""
    if getattr(args, "random_init", False):
        return f"{Path(str(args.model)).stem}-random-init"
    return str(args.model)


def data_name(args: argparse.Namespace) -> str:
    """``--data`` as output files name it: ``cifar10``, or ``cifar10-train`` where ``--split`` is not the data set's
    default, so a figure of the training images never replaces the figure of the test images."""
    from .data import default_split

    split = getattr(args, "split", None)
    return str(args.data) if split in (None, default_split(args.data)) else f"{args.data}-{split}"


def output_of(args: argparse.Namespace, model, data) -> dict[str, str]:
    """What an analysis's outputs are of, as its JSON records it (``"output_of"``): the model (a shipped or published
    name, else the checkpoint's absolute path) and the data (:func:`~.report.data_label`). Two models whose files
    share a name (``runs/a/checkpoint.pt``, ``runs/b/checkpoint.pt``) name their outputs alike;
    :func:`output_stem_for` refuses to let one replace the other's."""
    from .report import data_label

    path = Path(str(args.model)).expanduser()
    name = model.info.extra.get("name")
    return {"model": str(path.resolve()) if path.is_file() or not name else str(name), "data": data_label(data)}


def output_stem_for(args: argparse.Namespace, analysis: str, of: dict[str, str],
                    default_layers: Sequence[str] = ("h",)) -> Path:
    """``--out/<analysis>_<model>_<data>`` (:func:`~.report.output_stem` with :func:`analysis_name`,
    :func:`model_name` and :func:`data_name`), checked before the work: a JSON already there that records other
    outputs (``output_of``: another model or data under the same file names) is refused in one line, since the run
    would replace it. A JSON without the record (written before it was kept) is replaced as before."""
    from .report import output_stem

    stem = output_stem(args.out, analysis_name(analysis, args, default_layers), model_name(args), data_name(args))
    path = stem.with_suffix(".json")
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("output_of") if path.is_file() else None
    except (OSError, ValueError, AttributeError):  # unreadable or not an analysis's: replaced, as before
        recorded = None
    if isinstance(recorded, dict):
        for key in ("model", "data"):
            if key in recorded and recorded[key] != of[key]:
                raise UserError(f"{path} holds the outputs of {key} {recorded[key]}, and this run's {key} "
                                f"{of[key]} would replace them (the same file names): pass another --out, or move "
                                f"{path.name} and its figures away")
    return stem


def command_line(prog: str, argv: Sequence[str] | None = None) -> str:
    """The command as outputs record it: ``python -m ssl_patch_analysis.<name> <arguments>``, shell-quoted."""
    words = list(sys.argv[1:] if argv is None else argv)
    return f"{prog} {shlex.join(words)}".strip()


# ----------------------------------------------------------------------------------------------- errors

F = TypeVar("F", bound=Callable[..., Any])


def debug_requested(argv: Sequence[str] | None) -> bool:
    words = sys.argv[1:] if argv is None else argv
    return "--debug" in words or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (without the ``error:`` some messages already carry); an operating
    system's error as ``PATH: what`` (``[Errno 17] File exists: 'x'`` -> ``x: File exists``)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
        if error.filename2 is not None:
            text = f"{error.filename} -> {error.filename2}: {error.strerror}"
    elif isinstance(error, OSError) and error.errno is not None and error.strerror:
        text = " ".join(str(error.strerror).split())  # without "[Errno 28] ", which only repeats what it says
    if is_disk_full(error) and "is full" not in text:  # a writer that does not name its folder: what to do, still
        text = f"the disk is full ({text}): free some space and run the same command again"
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    return text[len("error: "):] if text.startswith("error: ") else text


def _out_of_host_memory(error: BaseException) -> bool:
    """A MemoryError, or torch's CPU allocator refusing a request (a RuntimeError)."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


MEMORY_FLAGS = ("--batch-size", "--num-patches", "--resize-to", "--image-size", "--num-images")


def _memory_flags(main: Callable[..., Any]) -> str:
    """The flags of ``main``'s command (its module's ``build_parser``) that ask for less memory at once, in words:
    only flags the command has (train has no --resize-to)."""
    build = getattr(sys.modules.get(main.__module__), "build_parser", None)
    try:
        flags = {option for action in build()._actions for option in action.option_strings} if build else set()
    except Exception:  # noqa: BLE001 - advice only: the error being reported matters more
        flags = set()
    named = [flag for flag in MEMORY_FLAGS if flag in flags] or ["--batch-size"]
    return named[0] if len(named) == 1 else f"{', '.join(named[:-1])} or {named[-1]}"


_RUNNING = contextvars.ContextVar("ssl_patch_analysis_command_line", default=None)


def _module_name(main: Callable[..., Any]) -> str:
    """The module of a command's ``main``: ``ssl_patch_analysis.extract``, also when it runs as ``__main__``
    (``python -m ssl_patch_analysis.extract``)."""
    name = main.__module__
    if name == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = spec.name if spec is not None else name
    return name


def running_command() -> str | None:
    """The command line of the command running now (``python -m ssl_patch_analysis.extract ...``), or None outside
    one (a Python caller): what the analyses' JSON files, saved indexes and stores record they were made by."""
    return _RUNNING.get()


def command(main: F) -> F:
    """Wrap a command's ``main(argv)``: a user's error ends it with one line on stderr and exit status 2 (a bug
    with one line and status 1), unless ``--debug`` or ``SSL_PATCH_ANALYSIS_DEBUG=1`` asks for the traceback.
    What ``main`` returns is returned unchanged, so that Python callers get the results."""

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None, *args: Any, **kwargs: Any) -> Any:
        from .data import progress_bars

        debug = debug_requested(argv)
        words = list(sys.argv[1:] if argv is None else argv)
        running = _RUNNING.set(command_line(f"python -m {_module_name(main)}", words))
        try:
            with progress_bars("--no-progress" not in words):
                return main(argv, *args, **kwargs)
        except SystemExit as stop:
            if isinstance(stop.code, str):  # SystemExit("message"): a user's error said by the command
                if debug:
                    raise
                print(f"error: {one_line(stop)}", file=sys.stderr)
                raise SystemExit(2) from None
            raise
        except KeyboardInterrupt:
            if debug:
                raise
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except USER_ERRORS as error:
            if debug:
                raise
            print(f"error: {one_line(error)}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception as error:  # a bug: still one line, and how to see more
            if debug:
                raise
            if _out_of_host_memory(error):  # what was asked for does not fit this machine: the user can ask less
                asked = re.search(r"tried to allocate (\d+) bytes", str(error))
                size = f" ({int(asked.group(1)) / 2**30:,.1f} GiB at once)" if asked else ""
                print(f"error: out of memory{size}: ask for less at once (a smaller {_memory_flags(main)})",
                      file=sys.stderr)
                raise SystemExit(2) from None
            print(f"internal error ({type(error).__name__}): {one_line(error)}; run again with --debug for the "
                  "traceback, and please report it", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            _RUNNING.reset(running)

    return wrapper  # type: ignore[return-value]


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.cli says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
