"""Every command the project tells a user to run parses with today's flags.

The README, the model cards, the Makefile, the shell scripts and the modules' docstrings spell out
``python -m ssl_patch_analysis.<command>`` lines (and ``python pretrained/model_card.py`` / ``pretrained/ship.py``
ones). A renamed flag (``train --out``
became ``--run-dir``) leaves such a line failing for whoever copies it, so each one is handed to its command's own
parser here (nothing runs: parsing only). Records of past runs (``benchmarks/RESULTS.md``, ``*.log.jsonl``) keep
the flags they ran with and are not checked.
"""
from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import GPU_MODELS, gpu_recipe, load_script

ROOT = Path(__file__).resolve().parents[1]
# Where the project tells a user what to type.
DOCUMENTS = ["README.md", "pretrained/README.md", "ssl_patch_analysis/sample_data/README.md", "docs/design.md",
             "Makefile",
             # the modules' docstrings (their python -m ssl_patch_analysis.<command> examples)
             *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "ssl_patch_analysis").glob("*.py")),
             *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.sh")),
             *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pretrained").glob("*.sh"))]
# python -m ssl_patch_analysis.X (or python -m ssl_patch_analysis X), or one of the scripts of pretrained/ run by a
# python ($py in the scripts)
COMMAND = re.compile(r"-m\s+ssl_patch_analysis(?:\.|[ \t]+)(\w+)"
                     r"|(?:python\S*|\$py|\$PYTHON)\s+(pretrained/(?:model_card|ship)\.py)")
# A run's record quoted as stored (`"command": "python -m ..."`), not advice to type.
RECORD = re.compile(r'"command":\s*"(?:python\S*\s+)?$')
# A shell or make variable stands for one word; "$@" / "${@:2}" / ... for the caller's further flags.
CALLER_FLAGS = re.compile(r'"\$(?:@|\{@[^}]*\})"')
DEFAULTED = re.compile(r"\$\{\w+:-([^}]*)\}")  # ${NAME:-default}: its default
# NAME=${OTHER:-default} at the start of a line of a script: $NAME / ${NAME} later stand for that default
SCRIPT_DEFAULT = re.compile(r"^(\w+)=\$\{\w+:-([^}]*)\}\s*$", re.MULTILINE)
VARIABLE = re.compile(r"\$\([^)]*\)|\$\{\w+[^}]*\}|\$\w+")


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined, each with the number of its first line."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def documented_commands(path: str) -> list[tuple[str, str, list[str]]]:
    """``(where, module, argv)`` for each ``python -m ssl_patch_analysis.X ...`` in one document."""
    found = []
    text = (ROOT / path).read_text(encoding="utf-8")
    if path.endswith(".py"):  # a module: the examples of its docstring (the code's strings are not commands)
        text = ast.get_docstring(ast.parse(text), clean=False) or ""
    defaults = dict(SCRIPT_DEFAULT.findall(text)) if path.endswith(".sh") else {}
    lines = logical_lines(text)
    for (number, line), (_, after) in zip(lines, [*lines[1:], (0, "")], strict=True):
        if after.lstrip().startswith("error:"):  # an example of a refused command, shown with its error
            continue
        for match in COMMAND.finditer(line):
            if RECORD.search(line[:match.start()]):  # a record of a past run, quoted: it keeps the flags it ran with
                continue
            rest = DEFAULTED.sub(r"\1", CALLER_FLAGS.sub("", line[match.end():]).replace("...", ""))
            for name, value in defaults.items():
                rest = re.sub(rf"\$\{{{name}\}}|\${name}\b", lambda _, v=value: v, rest)
            rest = VARIABLE.sub("VAR", rest)
            rest = re.split(r"`|\s(?:&&|\|\||\||;|>|2>|#)\s?|\)\s*$", rest)[0]  # end of the command in prose/shell
            try:
                argv = shlex.split(rest)
            except ValueError:
                argv = rest.split()
            # a variable after --device stands for a device; one on its own (`$control`) for optional flags
            argv = ["cpu" if word == "VAR" and i and argv[i - 1] == "--device" else word for i, word in enumerate(argv)
                    if not (word == "VAR" and (i == 0 or not argv[i - 1].startswith("-")))]
            found.append((f"{path}:{number}", match.group(1) or match.group(2), argv))
    return found


CASES = [case for document in DOCUMENTS if (ROOT / document).is_file() for case in documented_commands(document)]


def test_the_documents_name_commands():
    """The scan finds the commands (a broken pattern would make every case below vanish)."""
    modules = {module for _, module, _ in CASES}
    assert {"train", "evaluate", "extract", "convergence", "heatmap", "retrieval", "pretrained/model_card.py",
            "pretrained/ship.py"} <= modules
    assert len(CASES) > 50


@pytest.mark.parametrize(("where", "module", "argv"), CASES, ids=[f"{w} {m}" for w, m, _ in CASES])
def test_documented_command_parses(where, module, argv, capsys):
    if module.endswith(".py"):
        parser, command = load_script(module).build_parser(), f"python {module}"
    else:
        parser = importlib.import_module(f"ssl_patch_analysis.{module}").build_parser()
        command = f"python -m ssl_patch_analysis.{module}"
    try:
        parser.parse_args(argv)
    except SystemExit as stop:
        if stop.code:
            pytest.fail(f"{where}: `{command} {shlex.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")


def test_a_stale_flag_is_caught():
    """The check itself: a line with a renamed flag fails to parse."""
    parser = importlib.import_module("ssl_patch_analysis.train").build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "runs/x"])
    with pytest.raises(SystemExit):
        load_script("pretrained/model_card.py").build_parser().parse_args(["x.pt", "--fp16"])


def test_the_scripts_of_pretrained_are_found_as_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "doc.md").write_text("`pretrained/model_card.py` measures a card:\n\n"
                                     "    python pretrained/model_card.py runs/x.pt --amp --json a.json\n"
                                     '  $py pretrained/ship.py "$RUN"/checkpoint.pt out.pt --backbone-only\n')
    assert [(m, argv) for _, m, argv in documented_commands("doc.md")] == [
        ("pretrained/model_card.py", ["runs/x.pt", "--amp", "--json", "a.json"]),
        ("pretrained/ship.py", ["VAR/checkpoint.pt", "out.pt", "--backbone-only"])]


@pytest.mark.parametrize("model", GPU_MODELS)
def test_gpu_session_model_recipes_parse(model):
    """benchmarks/gpu_session.sh keeps each issue-12 model's trainer flags in a function, not on a command line."""
    args = importlib.import_module("ssl_patch_analysis.train").build_parser().parse_args(gpu_recipe(model))
    assert args.method == model and args.epochs >= 10


def test_a_quoted_record_of_a_past_run_is_not_a_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "doc.md").write_text('"command": "python -m ssl_patch_analysis.train --out /tmp/runs/x"\n'
                                     "python -m ssl_patch_analysis.train --run-dir /tmp/runs/x\n")
    assert [argv for _, _, argv in documented_commands("doc.md")] == [["--run-dir", "/tmp/runs/x"]]


def test_the_package_form_is_found_as_a_command(tmp_path, monkeypatch):
    """``python -m ssl_patch_analysis convergence ...`` runs the module's main: checked with its parser too."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "doc.md").write_text("`python -m ssl_patch_analysis` lists the commands\n"
                                     "    python -m ssl_patch_analysis --version\n"
                                     "    python -m ssl_patch_analysis convergence --model vicreg\n")
    assert [(m, argv) for _, m, argv in documented_commands("doc.md")] == [("convergence", ["--model", "vicreg"])]


def test_a_script_variable_stands_for_its_default(tmp_path, monkeypatch):
    """``N=${N:-2}`` then ``--epochs "$N"``: the command is checked with 2, so a wrong type still fails."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "run.sh").write_text('EPOCHS=${EPOCHS:-2}\nWHERE=${WHERE:-runs/x}\n'
                                     'python -m ssl_patch_analysis.train --epochs "$EPOCHS" --run-dir ${WHERE}/y\n'
                                     'BAD=${BAD:-two}\npython -m ssl_patch_analysis.train --epochs $BAD\n')
    (_, _, argv), (_, _, bad) = documented_commands("run.sh")
    assert argv == ["--epochs", "2", "--run-dir", "runs/x/y"]
    assert bad == ["--epochs", "two"]


def test_the_shell_scripts_run_as_documented():
    """The documents call the scripts by their path (``benchmarks/simclr_cpu.sh``, ``STEPS=card benchmarks/...``):
    each must be executable in the checkout, or the documented line answers "Permission denied"."""
    scripts = sorted([*ROOT.glob("benchmarks/*.sh"), *ROOT.glob("pretrained/*.sh"), ROOT / ".ci" / "run"])
    assert scripts
    not_executable = [str(p.relative_to(ROOT)) for p in scripts if not os.access(p, os.X_OK)]
    assert not not_executable, f"not executable (git update-index --chmod=+x): {not_executable}"


def test_simclr_promote_never_replaces_a_kept_card(tmp_path):
    """``benchmarks/simclr_cpu.sh`` step ``promote`` keeps the card it replaces under ``KEPT``; a second promotion with
    the same ``KEPT`` would have overwritten the first kept card (the control source of the shipped card): refused
    before anything is copied."""
    kept = tmp_path / "kept.json"
    kept.write_text("[]")
    shipped = {p: p.read_bytes() for p in (ROOT / "pretrained").glob("simclr-resnet18-cifar10.*")}
    run = subprocess.run([str(ROOT / "benchmarks" / "simclr_cpu.sh")], capture_output=True, text=True,
                         env={**os.environ, "STEPS": "promote", "KEPT": str(kept), "ONWARD": str(tmp_path / "none")})
    assert run.returncode == 2 and f"KEPT={kept} already holds a kept card" in run.stderr
    assert kept.read_text() == "[]"
    assert {p: p.read_bytes() for p in shipped} == shipped
