"""``python -m ssl_patch_analysis``: the list of commands, and a command run through it as through its own module."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_patch_analysis import __main__ as package_main
from ssl_patch_analysis import checkpoints, claims, cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ssl_patch_analysis"


def modules_run_as_commands() -> set[str]:
    """The package's modules with a ``main`` that ``if __name__ == "__main__"`` calls (read from the source)."""
    found = set()
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        has_main = any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)
        guarded = any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)
        if has_main and guarded and path.stem != "__main__":
            found.add(path.stem)
    return found


def test_the_list_holds_every_command_of_the_package():
    # A new command module that the list forgets (or a listed one that lost its main) fails here.
    assert set(package_main.COMMANDS) == modules_run_as_commands()
    assert len(package_main.COMMANDS) == len(set(package_main.COMMANDS)) == 8


def test_from_the_shell_no_arguments_lists_each_command_with_its_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "ssl_patch_analysis"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    for name in package_main.COMMANDS:
        (line,) = [line for line in lines if line.split()[:1] == [name]]
        assert line.split(None, 1)[1] == package_main.summary(name)
    # the first paragraph of the module docstring, on one line and without reST markup
    assert package_main.summary("heatmap") == ("Projection-vs-embedding similarity heatmaps (paper Fig. 4) and a "
                                               "locality score.")
    assert "``" not in package_main.summary("claims") and "figures/" in package_main.summary("claims")


def test_version_is_the_installed_one(capsys):
    assert package_main.main(["--version"]) == 0
    assert capsys.readouterr().out == f"ssl_patch_analysis {importlib.metadata.version('ssl_patch_analysis')}\n"


def test_an_unknown_command_is_one_line_and_status_2(capsys):
    assert package_main.main(["convergenc", "--model", "vicreg"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("error: 'convergenc' is not a command; the commands are extract, convergence,")


def test_a_command_runs_as_its_module_does(capsys):
    shipped = str(ROOT / "pretrained" / "bagssl-resnet18-cifar10.pt")
    checkpoints.main(["--model", shipped])
    direct = capsys.readouterr().out
    assert package_main.main(["checkpoints", "--model", shipped]) == 0
    assert capsys.readouterr().out == direct and "method:        bagssl" in direct


def test_a_bad_flag_through_the_package_is_the_modules_one_line(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as stop:
        package_main.main(["convergence", "--seed", "-1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "argument --seed" in err and "python -m ssl_patch_analysis.convergence --help" in err


def test_outputs_record_the_command_in_the_one_shape(tmp_path, capsys):
    # The JSON of a command run through the package names the module, as the same command run directly would.
    (tmp_path / "figures").mkdir()
    argv = ["--figures", str(tmp_path / "figures"), "--out", str(tmp_path / "out")]
    assert package_main.main(["claims", *argv]) == 0
    through_package = json.loads((tmp_path / "out" / "claims.json").read_text())
    claims.main(argv)
    direct = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert through_package["command"] == direct["command"] == cli.command_line("python -m ssl_patch_analysis.claims",
                                                                                argv)
    capsys.readouterr()


def library_modules() -> list[str]:
    return sorted(path.stem for path in PACKAGE.glob("*.py")
                  if path.stem not in {"__init__", "__main__"} and path.stem not in package_main.COMMANDS)


@pytest.mark.filterwarnings("ignore:'ssl_patch_analysis.:RuntimeWarning")  # runpy: the module is imported already
@pytest.mark.parametrize("module", library_modules())
def test_a_library_module_run_as_a_command_says_so(module, capsys):
    # python -m ssl_patch_analysis.models used to import the module and exit 0 in silence, as if it had run
    import runpy

    with pytest.raises(SystemExit) as stopped:
        runpy.run_module(f"ssl_patch_analysis.{module}", run_name="__main__", alter_sys=True)
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: ssl_patch_analysis.{module} is a library module, not a command")
    assert "checkpoints" in line


def test_a_library_module_from_the_shell_exits_2_in_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "ssl_patch_analysis.patches"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: ssl_patch_analysis.patches is a library module, not a command: nothing was run; the commands are "
        + ", ".join(package_main.COMMANDS) + " (see python -m ssl_patch_analysis --help)"]
