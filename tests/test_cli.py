"""One command-line vocabulary, and every user error as one line with exit status 2 (ssl_patch_analysis.cli).

The table below runs every command on bad inputs of each kind (a bad flag value, a flag of an older version, a
missing or unknown data set, a damaged or missing checkpoint, ``--device cuda`` without a GPU) and checks the
promise: exit status 2, exactly one line on stderr, starting with ``error:``, naming the bad value or path, no
traceback. ``--debug`` shows the traceback instead.
"""
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import helpers
from ssl_patch_analysis import cli
from ssl_patch_analysis.checkpoints import save_checkpoint
from ssl_patch_analysis.data import default_split

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("extract", "convergence", "heatmap", "retrieval", "evaluate", "train", "checkpoints")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is valid here")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A damaged checkpoint, a foreign file, a good tiny checkpoint and an empty folder."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    (folder / "damaged.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    (folder / "notes.txt").write_text("not weights")
    save_checkpoint(helpers.tiny_model(), folder / "tiny.pt")
    (folder / "empty").mkdir()
    return folder


def bad_inputs(folder: Path) -> list[tuple[str, list[str], str]]:
    """(command, argv, what the one line must name)."""
    damaged, missing, tiny = str(folder / "damaged.pt"), str(folder / "missing.pt"), str(folder / "tiny.pt")
    nowhere = str(folder / "no-such-folder")
    store = ["--store", str(folder / "store")]
    model = ["--model", tiny, "--device", "cpu"]
    table = [
        # bad flag values (argparse's types): the flag and the value are named
        ("extract", [*model, *store, "--grid", "0"], "--grid"),
        ("extract", [*model, *store, "--grid", "8", "--num-images", "none"], "'none'"),
        ("extract", [*model, *store, "--multiscale", "4", "--scale", "0.9,0.1"], "'0.9,0.1'"),
        ("convergence", [*model, "--layers", "q"], "'q'"),
        ("convergence", [*model, "--resize-to", "big"], "'big'"),
        ("heatmap", [*model, "--figure-images", "0"], "--figure-images"),
        ("retrieval", [*model, "--neighbours", "-1"], "-1"),
        ("evaluate", [*model, "--k", "20,x"], "'20,x'"),
        ("evaluate", [*model, "--probe-lr", "-1"], "'-1'"),
        ("train", ["--epochs", "0", "--device", "cpu"], "--epochs"),
        ("train", ["--scale", "0.5,0.2", "--device", "cpu"], "'0.5,0.2'"),
        ("checkpoints", ["--model", tiny, "--arch", "resnet9"], "'resnet9'"),
        # flags of an older version: named with what replaced them
        ("extract", [*model, "--grid", "8", "--out", "s"], "--store"),
        ("train", ["--out", "runs/x"], "--run-dir"),
        ("train", ["--min-scale", "0.2"], "--scale"),
        ("evaluate", [*model, "--store-dir", "cache"], "--cache-dir"),
        ("evaluate", [*model, "--epochs", "3"], "--probe-epochs"),
        ("evaluate", [*model, "--layer", "z"], "--layers"),
        ("convergence", [*model, "--layer", "z"], "--layers"),
        ("retrieval", [*model, "--k", "4"], "--neighbours"),
        ("heatmap", [*model, "--num-images", "3"], "--figure-images"),
        # numbers out of range, named by their flag before any work (--seed -1 was numpy's "expected non-negative
        # integer" after the extraction)
        ("convergence", [*model, "--seed=-1"], "--seed"),
        ("convergence", [*model, "--n-values", "1000"], "--n-values: every N asked for (1000) is larger"),
        ("evaluate", [*model, "--seed=-1"], "--seed"),
        ("evaluate", [*model, "--probe-weight-decay", "inf"], "--probe-weight-decay"),  # was a probe at 10%
        # a folder to write into that is a file: said before the work, not as an errno after it
        ("convergence", [*model, "--out", str(folder / "notes.txt")], "--out: expected a folder"),
        ("evaluate", [*model, "--cache-dir", str(folder / "notes.txt")], "--cache-dir: expected a folder"),
        ("train", ["--run-dir", str(folder / "notes.txt"), "--device", "cpu"], "--run-dir: expected a folder"),
        # ... or a folder that cannot be made (a file on the way to it): said before the work, not after it
        ("convergence", [*model, "--out", str(folder / "notes.txt" / "figures")], "notes.txt is a file, not a folder"),
        ("heatmap", [*model, "--out", str(folder / "notes.txt" / "figures")], "--out: "),
        ("evaluate", [*model, "--cache-dir", str(folder / "notes.txt" / "c")], "--cache-dir: "),
        ("retrieval", [*model, "--save-index", str(folder / "notes.txt")], "--save-index: expected a folder"),
        ("retrieval", [*model, "--save-index", str(folder / "notes.txt" / "i")], "--save-index: "),
        ("train", ["--run-dir", str(folder / "notes.txt" / "run"), "--device", "cpu"], "--run-dir: "),
        # values that parse but do not fit
        ("convergence", [*model, "--layers", "h,z"], "h,z"),
        ("evaluate", [*model, "--protocols", "central,lots"], "lots"),
        ("evaluate", [*model, "--train-size", "60000", "--patch-size", "16"],
         "--train-size 60000 (CIFAR-10 (JPEG copy) train): subset size must be between 1 and 50000"),
        ("evaluate", [*model, "--test-size", "20000", "--patch-size", "16"],
         "--test-size 20000 (CIFAR-10 (JPEG copy) test): subset size must be between 1 and 10000"),
        ("evaluate", [*model, "--patch-size", "8", "--scale", "0.2,1"], "--scale"),
        ("extract", [*model, *store, "--random", "4"], "--patch-size"),
        # a flag of another sampler: refused, not ignored (--grid 8 --patch-size 16 embedded 8 px patches)
        ("extract", [*model, *store, "--grid", "8", "--patch-size", "16"], "--patch-size is for --random; --grid"),
        ("extract", [*model, *store, "--random", "4", "--patch-size", "8", "--stride", "4"], "--stride is for --grid"),
        ("extract", [*model, *store, "--central", "--scale=0.2,1"], "--scale is for --multiscale; --central"),
        ("retrieval", [*model, "--num-images", "20000"], "20000"),
        ("heatmap", [*model, "--image-ids", "99999"], "99999"),
        ("heatmap", [*model, "--patch-size", "32", "--stride", "32"], "gives 1 patch on the 32 x 32 images"),
        ("heatmap", [*model, "--patch-size", "40"], "--patch-size 40: patch of side 40 does not fit"),
        ("heatmap", [*model, "--locality-queries", "500"], "--locality-queries 500: each image has"),
        ("train", ["--resume", "--run-dir", nowhere, "--device", "cpu"], nowhere),
        # a missing or unknown data set
        ("extract", [*model, *store, "--grid", "8", "--data", nowhere], nowhere),
        ("convergence", [*model, "--data", nowhere], nowhere),
        ("heatmap", [*model, "--data", "mnist"], "mnist"),
        ("retrieval", [*model, "--data", nowhere], nowhere),
        ("evaluate", [*model, "--data", nowhere], nowhere),
        ("train", ["--data", nowhere, "--device", "cpu", "--run-dir", str(folder / "run")], nowhere),
        ("convergence", [*model, "--data", "imagenette", "--split", "train"], "train"),
        ("extract", ["--verify", "--store", nowhere], nowhere),
        ("extract", ["--verify", nowhere], f"--verify {nowhere} is now --verify --store {nowhere}"),  # renamed
        # damaged, foreign or missing checkpoints
        ("extract", ["--model", damaged, *store, "--grid", "8", "--device", "cpu"], damaged),
        ("convergence", ["--model", damaged, "--device", "cpu"], damaged),
        ("heatmap", ["--model", str(folder / "notes.txt"), "--device", "cpu"], "notes.txt"),
        ("retrieval", ["--model", missing, "--device", "cpu"], "missing.pt"),
        ("evaluate", ["--model", damaged, "--device", "cpu"], damaged),
        ("checkpoints", ["--model", damaged], damaged),
        ("checkpoints", ["--model", missing], "missing.pt"),
        ("checkpoints", [tiny], f"the checkpoint is passed with --model: python -m ssl_patch_analysis.checkpoints "
                                f"--model {tiny}"),  # the positional form of earlier versions
    ]
    return table


def run_command(name: str, argv: list[str]) -> int:
    module = importlib.import_module(f"ssl_patch_analysis.{name}")
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    return stop.value.code


def assert_one_line(err: str, named: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    assert named in lines[0], (named, lines[0])


@pytest.mark.parametrize("index", range(len(bad_inputs(Path("/tmp")))))
def test_every_bad_input_is_one_line_and_status_2(index, files, data_root, monkeypatch, capsys):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_DATA", str(data_root))
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    name, argv, named = bad_inputs(files)[index]
    capsys.readouterr()
    code = run_command(name, argv)
    err = capsys.readouterr().err
    # Progress bars and notices (the built-in sample standing in for CIFAR-10) come before, and are not errors.
    err = "\n".join(line for line in err.splitlines()
                    if not line.startswith(("notice:", "note: ")) and not re.search(r"\d+%\|", line))
    assert code == 2, (name, argv, err)
    assert_one_line(err, named)


def test_the_table_covers_every_command(files):
    assert {name for name, _, _ in bad_inputs(files)} == set(COMMANDS)


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into: a read-only one (mode 555), or where permissions do not bind (root),
    one of the system's that refuses new files (/sys); skips when there is none."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            with open(candidate / ".probe", "x"):
                pass
        except OSError:
            return candidate
        (candidate / ".probe").unlink()
    pytest.skip("no folder here refuses a new file (a root user and no read-only /sys)")


@pytest.mark.parametrize("name", ["convergence", "heatmap", "retrieval", "evaluate", "claims"])
def test_an_out_that_cannot_be_written_is_refused_before_the_work(name, files, tmp_path, capsys):
    # was: the figure's or JSON's write failed after the whole extraction and analysis, and the numbers were lost
    target = unwritable_folder(tmp_path)
    argv = [] if name == "claims" else ["--model", str(files / "tiny.pt"), "--device", "cpu"]
    for out in (target, target / "figures"):
        code = run_command(name, [*argv, "--out", str(out)])
        assert code == 2
        assert_one_line(capsys.readouterr().err, f"--out: cannot write into {target}")


def test_the_default_out_is_checked_too(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(unwritable_folder(tmp_path))  # its figures/ cannot be made
    assert run_command("convergence", ["--model", str(files / "tiny.pt"), "--device", "cpu"]) == 2
    assert_one_line(capsys.readouterr().err, "--out: cannot write into")


def test_a_writable_out_is_accepted_and_not_made_by_parsing(tmp_path):
    out = tmp_path / "new" / "figures"
    assert cli.folder(str(out)) == out and not (tmp_path / "new").exists()
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind
    assert cli.output_file(str(tmp_path / "card.json")) == tmp_path / "card.json"
    with pytest.raises(Exception, match="is a folder"):
        cli.output_file(str(tmp_path))


@NO_GPU
@pytest.mark.parametrize("name", COMMANDS[:-1])
def test_device_cuda_without_a_gpu_says_pass_cpu(name, files, capsys):
    argv = ["--device", "cuda"] + ([] if name == "train" else ["--model", str(files / "tiny.pt")])
    if name == "extract":
        argv += ["--store", str(files / "store"), "--grid", "8"]
    code = run_command(name, argv)
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line(err, "pass --device cpu")


@pytest.mark.parametrize("device", ["mps", "meta", "xpu"])
def test_a_device_torch_names_but_this_machine_lacks_is_one_line(device, files, capsys):
    # was "internal error (RuntimeError): PyTorch is not linked with support for mps devices ... please report it"
    if device == "xpu" and getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        pytest.skip("this machine has an XPU")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(cli.UserError, match=rf"^--device {device}: this machine cannot run on {device}; pass --device"):
        cli.resolve_device(device)
    code = run_command("convergence", ["--device", device, "--model", str(files / "tiny.pt")])
    assert code == 2
    assert_one_line(capsys.readouterr().err, "pass --device cpu")


def test_debug_shows_the_traceback_instead(files, monkeypatch, capsys):
    from ssl_patch_analysis import convergence

    with pytest.raises(ValueError, match=r"damaged\.pt"):
        convergence.main(["--model", str(files / "damaged.pt"), "--device", "cpu", "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match=r"damaged\.pt"):
        convergence.main(["--model", str(files / "damaged.pt"), "--device", "cpu"])


def test_a_bug_is_one_line_with_status_1_and_the_way_to_see_more(files, monkeypatch, capsys):
    from ssl_patch_analysis import convergence

    def broken(*args, **kwargs):
        raise TypeError("an internal mistake")

    monkeypatch.setattr(convergence, "convergence_curve", broken)
    with pytest.raises(SystemExit) as stop:
        convergence.main(["--model", str(files / "tiny.pt"), "--device", "cpu", "--num-images", "2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 1
    assert err.startswith("internal error (TypeError): an internal mistake") and "--debug" in err


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 12000000000000 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_out_of_memory_on_the_host_is_a_users_error(files, monkeypatch, capsys, error):
    # Was: "internal error (RuntimeError) ...", exit status 1, for --resize-to 1000000.
    from ssl_patch_analysis import convergence

    def too_big(*args, **kwargs):
        raise error

    monkeypatch.setattr(convergence, "convergence_curve", too_big)
    with pytest.raises(SystemExit) as stop:
        convergence.main(["--model", str(files / "tiny.pt"), "--device", "cpu", "--num-images", "2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and err.startswith("error: out of memory") and "--batch-size" in err
    if isinstance(error, RuntimeError):
        assert "(11,175.9 GiB at once)" in err  # 12e12 bytes / 2**30


@pytest.mark.parametrize("name, stage", [("train", "load_training_data"), ("convergence", "convergence_curve"),
                                         ("evaluate", "evaluate_protocols")])
def test_out_of_memory_advice_names_only_flags_the_command_has(name, stage, files, tmp_path, monkeypatch, capsys):
    # was: train's advice named --resize-to and --num-images, flags train does not have (and not --num-patches)
    module = importlib.import_module(f"ssl_patch_analysis.{name}")

    def too_big(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(module, stage, too_big)
    argv = ["--run-dir", str(tmp_path / "run")] if name == "train" else ["--model", str(files / "tiny.pt")]
    argv += ["--patch-size", "16"] if name == "evaluate" else []
    assert run_command(name, [*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    advised = set(re.findall(r"--[a-z-]+", err.split("ask for less at once")[1]))
    has = {option for action in parser_of(name)._actions for option in action.option_strings}
    assert "--batch-size" in advised and advised <= has, (advised - has, err)
    if name == "train":
        assert "--num-patches" in advised


def test_from_the_shell_one_line_and_status_2(files):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(cli.DEBUG_ENV, None)
    command = [sys.executable, "-m", "ssl_patch_analysis.checkpoints", "--model", str(files / "damaged.pt")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert_one_line(done.stderr, "damaged.pt")


# ----------------------------------------------------------------------------------------------- vocabulary

SHARED_FLAGS = {  # flag -> commands that take it (each with the same type and meaning)
    "--model": COMMANDS[:-2] + ("checkpoints",), "--arch": COMMANDS, "--data": COMMANDS[:-1],
    "--data-root": COMMANDS[:-1], "--image-size": COMMANDS[:-1], "--device": COMMANDS[:-1],
    "--amp": COMMANDS[:-1], "--no-amp": COMMANDS[:-1], "--compile": COMMANDS[:-1], "--seed": COMMANDS[:-1],
    "--batch-size": ("extract", "convergence", "retrieval", "evaluate", "train"), "--debug": COMMANDS,
    "--download": COMMANDS[:-2] + ("checkpoints",),
    "--split": COMMANDS[:-2], "--skip-bad-images": COMMANDS[:-1], "--random-init": COMMANDS[:-2],
    "--resize-to": COMMANDS[:-2], "--out": COMMANDS[1:-2], "--cifar-padding": COMMANDS,
    "--num-images": ("extract", "convergence", "retrieval"),
    "--layers": ("extract", "convergence", "heatmap", "evaluate"),
    "--scale": ("extract", "evaluate", "train"), "--store": ("extract", "retrieval"),
}


def parser_of(name: str):
    return importlib.import_module(f"ssl_patch_analysis.{name}").build_parser()


@pytest.mark.parametrize("name", [*COMMANDS, "claims"])
def test_help_says_each_default_once_and_never_none(name):
    # was: train --help printed "(default: None)", and "(default: ...)" after helps that state their default
    parser = parser_of(name)
    assert "default: None" not in " ".join(parser.format_help().split())
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help and "default" in action.help.lower():
            assert formatter._get_help_string(action) == action.help, action.option_strings


def test_shared_flags_are_where_they_belong_with_one_type():
    flags = {name: {option: action for action in parser_of(name)._actions for option in action.option_strings}
             for name in COMMANDS}
    for flag, commands in SHARED_FLAGS.items():
        for name in commands:
            assert flag in flags[name], f"{name} lacks {flag}"
        types = {getattr(flags[name][flag].type, "__name__", None) for name in commands}
        if flag != "--resize-to":  # convergence's also takes 'native' (each patch at its own size)
            assert len(types) == 1, (flag, types)
    for name in COMMANDS:  # no command keeps a flag of an older version
        assert not set(cli.RENAMED_FLAGS.get(name, {})) & set(flags[name]), name


ANALYSES = ("convergence", "heatmap", "retrieval", "evaluate")


def readme_flag_table() -> list[tuple[list[str], set[str], dict[str, set[str]]]]:
    """The README's flag table: ``(flags, commands that take them all, {command: the only ones of them it takes})``
    per row (``all but A and B``, ``analyses``, ``extract (train: `--data`)`` in its commands column)."""
    from ssl_patch_analysis.__main__ import COMMANDS as ALL

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| flag | meaning | commands |"):]
    table = table[:table.index("\n\n")]
    rows = []
    for line in table.splitlines()[2:]:
        flags_cell, _, commands_cell = (cell.strip() for cell in line.strip("|").split(" | "))
        if commands_cell == "where they apply":
            continue
        flags = re.findall(r"(--[a-z-]+)", flags_cell)
        main, _, note = commands_cell.partition(" (")
        if main.startswith("all"):
            taking = set(ALL) - set(re.findall(r"[a-z]+", main.removeprefix("all").replace("but", "").replace(
                "and", "")))
        else:
            taking = {c for word in main.split(", ") for c in (ANALYSES if word == "analyses" else (word,))}
        partial = {}
        if note:
            command, _, named = note.rstrip(")").partition(": ")
            partial[command] = set(re.findall(r"`(--[a-z-]+)`", named))
        rows.append((flags, taking, partial))
    return rows


def test_the_readme_flag_table_says_which_commands_take_each_flag():
    from ssl_patch_analysis.__main__ import COMMANDS as ALL

    rows = readme_flag_table()
    assert len(rows) >= 15 and any(partial for _, _, partial in rows)
    flags = {name: {option for action in parser_of(name)._actions for option in action.option_strings}
             for name in ALL}
    for row_flags, taking, partial in rows:
        for name in ALL:
            for flag in row_flags:
                expected = flag in partial[name] if name in partial else name in taking
                assert (flag in flags[name]) == expected, (
                    f"README flag table: {flag} {'is' if expected else 'is not'} said to be a flag of {name}")


def test_amp_help_says_each_commands_own_cpu_default(monkeypatch):
    # The trainer autocasts by default on CPUs with bf16 units; extract and the analyses keep float32 on a CPU (the
    # shared help used to claim the trainer's default for all of them).
    from ssl_patch_analysis import extract, train

    def amp_help(name: str) -> str:
        (action,) = [a for a in parser_of(name)._actions if "--amp" in a.option_strings]
        return " ".join(action.help.split())

    monkeypatch.setattr(train, "cpu_has_bf16", lambda: True)
    config = train.TrainConfig()
    config.resolve(32, torch.device("cpu"))
    assert config.amp is True and "on CPUs with bf16 units" in amp_help("train")
    assert extract._autocast_choice(torch.device("cpu"), None) is None
    for name in ("extract", *ANALYSES):
        assert "float32 on a CPU" in amp_help(name) and "on CPUs with bf16 units" not in amp_help(name), name


def test_no_abbreviations_so_old_singular_flags_do_not_slip_through(capsys):
    with pytest.raises(SystemExit):
        parser_of("convergence").parse_args(["--layer", "z"])
    assert "--layer is now --layers" in capsys.readouterr().err


def test_an_operating_system_error_is_path_and_reason():
    assert cli.one_line(FileExistsError(17, "File exists", "/tmp/x")) == "/tmp/x: File exists"
    assert cli.one_line(PermissionError(1, "Operation not permitted", "/a/.j.tmp1", None, "/a/j")) == \
        "/a/.j.tmp1 -> /a/j: Operation not permitted"
    assert cli.one_line(FileExistsError("x exists: pass --overwrite")) == "x exists: pass --overwrite"  # our own


def test_types_say_what_they_expect():
    assert cli.count_or_all("all") is None and cli.count_or_all("12") == 12
    assert cli.layer_list("z, h,z") == ["z", "h"]
    assert cli.scale_range("0.08,1") == (0.08, 1.0)
    assert cli.int_list("20,200") == [20, 200]
    assert cli.non_negative_float("0") == 0.0 and cli.non_negative_float("600") == 600.0
    assert cli.probability("0") == 0.0 and cli.probability("1") == 1.0
    for parse, text in [(cli.count_or_all, "0"), (cli.layer_list, "h,x"), (cli.scale_range, "0,1"),
                        (cli.int_list, "3,-1"), (cli.positive_float, "nan"), (cli.device_name, "gpu"),
                        (cli.non_negative_float, "-1"), (cli.non_negative_float, "inf"), (cli.probability, "1.5"),
                        (cli.probability, "nan"), (cli.non_negative_int, "-1")]:
        with pytest.raises(Exception, match=text.replace("(", r"\(")):
            parse(text)


def test_one_default_split():
    assert default_split("imagenette") == "val" and default_split("cifar10") == "test"
    assert default_split("/some/folder") == "test"


def test_outputs_record_the_command_in_one_shape():
    assert cli.command_line("python -m ssl_patch_analysis.heatmap", ["--model", "my model.pt", "--layers", "z"]) == (
        "python -m ssl_patch_analysis.heatmap --model 'my model.pt' --layers z")


def test_an_os_error_without_a_file_name_is_said_without_its_errno_and_a_full_disk_says_what_to_do():
    """Was "[Errno 28] No space left on device" (a writer that names no file): the number only repeats the words,
    and a full disk needs the advice a user can act on."""
    import errno

    from ssl_patch_analysis.errors import disk_full

    bare = cli.one_line(OSError(errno.ENOSPC, "No space left on device"))
    assert bare == "the disk is full (No space left on device): free some space and run the same command again"
    named = disk_full("/runs/x", "resume.pt", "resume.pt as it was is kept", "free some space")
    assert cli.one_line(named) == ("the disk holding /runs/x is full: resume.pt was not written (resume.pt as it was "
                                   "is kept); free some space")
    assert cli.one_line(OSError(errno.EACCES, "Permission denied", "/x/y")) == "/x/y: Permission denied"
