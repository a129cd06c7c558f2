"""``python -m ssl_patch_analysis``: the toolkit's commands, one line each.

    python -m ssl_patch_analysis                       # the commands and what each does
    python -m ssl_patch_analysis convergence --model vicreg   # the same as python -m ssl_patch_analysis.convergence ...
    python -m ssl_patch_analysis --version

A command run this way is the module's own ``main``: the same flags, outputs and exit statuses, and its JSON records
the command as ``python -m ssl_patch_analysis.<name> ...``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence
from pathlib import Path

# In the order of a study: embed, analyse, judge, train; then the checkpoint inspector.
COMMANDS = ("extract", "convergence", "heatmap", "retrieval", "evaluate", "claims", "train", "checkpoints")
PROG = "python -m ssl_patch_analysis"
# Where a module's docstring describes the module rather than its command.
SUMMARIES = {"checkpoints": "Inspect a checkpoint: the format detected, architecture, dims and preprocessing."}


def summary(name: str) -> str:
    """The first paragraph of a command's module docstring, read without importing it (torch, faiss: seconds)."""
    if name in SUMMARIES:
        return SUMMARIES[name]
    source = (Path(__file__).parent / f"{name}.py").read_text(encoding="utf-8")
    docstring = ast.get_docstring(ast.parse(source)) or ""
    return " ".join(docstring.split("\n\n", 1)[0].split()).replace("``", "")


def version() -> str:
    try:
        return importlib.metadata.version("ssl_patch_analysis")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that pip has not installed
        return "unknown (not installed: pip install -e .)"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [FLAGS ...]   (or {PROG}.COMMAND [FLAGS ...])", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary(name)}" for name in COMMANDS]
    lines += ["", f"{PROG} COMMAND --help lists a command's flags; --version gives the installed version."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the commands (no arguments, -h, --help) or the version, or run one command with the words after it."""
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] in ("-h", "--help"):
        print(usage())
        return 0
    if words[0] == "--version":
        print(f"ssl_patch_analysis {version()}")
        return 0
    name, rest = words[0], words[1:]
    if name not in COMMANDS:
        print(f"error: {name!r} is not a command; the commands are {', '.join(COMMANDS)} (see {PROG} --help)",
              file=sys.stderr)
        return 2
    importlib.import_module(f"ssl_patch_analysis.{name}").main(rest)
    return 0


def not_a_command(module: str) -> None:
    """What ``python -m ssl_patch_analysis.<library module>`` answers: one line, exit status 2 (it ran nothing, and
    exiting 0 in silence would read as a command that did its work)."""
    print(f"error: {module} is a library module, not a command: nothing was run; the commands are "
          f"{', '.join(COMMANDS)} (see {PROG} --help)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
