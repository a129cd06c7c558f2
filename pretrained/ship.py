"""Turn a training run's checkpoint into a shipped model: float16, the project's own format, under 25 MB.

    python pretrained/ship.py runs/vicreg/checkpoint.pt pretrained/vicreg-resnet18-cifar10.pt
    python pretrained/ship.py runs/emp-ssl/checkpoint.pt pretrained/emp-ssl-resnet18-cifar10.pt --backbone-only

``--backbone-only`` keeps the embedding h and drops the heads (projector, and EMP-SSL's pre_feature layer):
EMP-SSL's 4096-wide heads alone are 46 MB in float16. Such a model answers every analysis of h; one that asks
for z or pre_feature says that the model has none. An existing target (a model shipped before) is replaced only
with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ssl_patch_analysis import cli
from ssl_patch_analysis.checkpoints import load_model, save_checkpoint

MAX_MB = 25.0


def ship(source: str | Path, target: str | Path, backbone_only: bool = False, max_mb: float = MAX_MB,
         overwrite: bool = False) -> Path:
    """Write ``source``'s model as float16 to ``target``; refuse (writing nothing) a file over ``max_mb`` MB, and an
    existing ``target`` unless ``overwrite``."""
    target = Path(target)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder: name the shipped file, e.g. {target / 'model.pt'}")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists: pass --overwrite (overwrite=True) to replace it, or choose another "
                              "target")
    model = load_model(source, verbose=False)
    train = dict(model.info.extra.get("train", {}))
    if backbone_only:
        model.projector, model.pre_feature = None, None
        train["heads_dropped"] = "projector and pre_feature not shipped (pretrained/ship.py --backbone-only)"
    draft = target.with_name(f".{target.name}.ship{os.getpid()}")
    try:
        save_checkpoint(model, draft, train=train, half=True)
        size_mb = draft.stat().st_size / 1e6
        if size_mb > max_mb:
            heads = "" if backbone_only else "; --backbone-only drops the heads (projector, pre_feature)"
            raise ValueError(f"{target} would be {size_mb:.1f} MB, over the {max_mb:g} MB a shipped model may "
                             f"take{heads}")
        draft.replace(target)
    finally:
        draft.unlink(missing_ok=True)
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python pretrained/ship.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run's checkpoint.pt (or any checkpoint load_model reads)")
    parser.add_argument("target", help="the shipped file, e.g. pretrained/<method>-<arch>-<data>.pt")
    parser.add_argument("--backbone-only", action="store_true", help="drop the projector and pre_feature layer")
    parser.add_argument("--max-mb", type=cli.positive_float, default=MAX_MB, help="refuse a file larger than this")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing target")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    try:
        target = ship(args.source, args.target, args.backbone_only, args.max_mb, args.overwrite)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


if __name__ == "__main__":
    cli.command(main)()  # one line and exit status 2 for a user's error, the traceback with --debug
