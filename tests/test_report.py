"""The shared output helpers: file names, JSON of arrays/tensors, tables, figures."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_patch_analysis import cli
from ssl_patch_analysis.report import (
    data_label,
    format_table,
    output_stem,
    save_figure,
    save_figure_and_json,
    save_json,
    slug,
)


def test_output_stem_names_analysis_model_and_data(tmp_path):
    stem = output_stem(tmp_path / "figs", "convergence", "pretrained/vicreg-resnet18-cifar10.pt", "cifar10")
    assert stem == tmp_path / "figs" / "convergence_vicreg-resnet18-cifar10_cifar10"
    assert stem.parent.is_dir()
    assert slug("/data/My Images!") == "data-my-images"


def test_save_json_converts_arrays_tensors_and_nan(tmp_path):
    path = save_json({"a": np.arange(3), "b": torch.tensor([1.5]), "c": float("nan"), 4: np.float32(2.5)},
                     tmp_path / "x.json")
    assert json.loads(path.read_text()) == {"a": [0, 1, 2], "b": [1.5], "c": None, "4": 2.5}
    assert not list(tmp_path.glob(".*tmp*"))


def test_format_table_aligns_columns():
    lines = format_table([["h", 0.12345, 3], ["z", 1.0, 40]], ["layer", "score", "n"]).splitlines()
    assert lines[0] == "| layer | score | n  |"
    assert lines[2] == "| h     | 0.123 | 3  |"
    assert len({len(line) for line in lines}) == 1


def test_save_figure_writes_png_and_pdf(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    paths = save_figure(fig, tmp_path / "plot", pdf=True)
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:4] == b"%PDF"


@pytest.mark.parametrize("description, split, expected", [("CIFAR-10 (JPEG copy)", "test", "CIFAR-10 (JPEG copy) test"),
                                                          ("Imagenette", "", "Imagenette")])
def test_data_label(description, split, expected):
    class Data:
        pass
    data = Data()
    data.description, data.split = description, split
    assert data_label(data) == expected


@pytest.mark.parametrize("command", ["convergence", "heatmap", "retrieval", "evaluate"])
@pytest.mark.parametrize("flags, expected", [
    ([], {}),
    (["--amp", "--compile"], {"amp": True, "compile": True}),
    (["--no-amp"], {"amp": False}),
])
def test_analysis_commands_hand_amp_and_compile_to_the_extractor(monkeypatch, command, flags, expected):
    import importlib

    from ssl_patch_analysis import extract

    module = importlib.import_module(f"ssl_patch_analysis.{command}")
    seen = []
    monkeypatch.setattr(module, "_main", lambda *args: seen.append(dict(extract._OPTIONS.get())) or "done")
    assert module.main(flags) == "done"
    assert seen == [expected]
    assert extract._OPTIONS.get() == {}  # nothing leaks past the command


def test_amp_and_no_amp_exclude_each_other(capsys):
    from ssl_patch_analysis import convergence

    with pytest.raises(SystemExit):
        convergence.build_parser().parse_args(["--amp", "--no-amp"])
    assert "not allowed with argument" in capsys.readouterr().err


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_title(title)
    return fig


def test_figure_and_numbers_are_replaced_together_or_not_at_all(tmp_path):
    stem = tmp_path / "convergence_x_cifar10"
    written = save_figure_and_json(_figure("one"), {"n": 1}, stem, pdf=True)
    assert [p.name for p in written] == [f"{stem.name}.png", f"{stem.name}.pdf", f"{stem.name}.json"]
    old_png = stem.with_suffix(".png").read_bytes()
    # Was: a new figure beside the old numbers when the JSON could not be written. A folder in the JSON's place
    # cannot be replaced by a file: the whole pair stays as it was, and no draft is left.
    stem.with_suffix(".json").unlink()
    stem.with_suffix(".json").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_figure_and_json(_figure("two, a longer title"), {"n": 2}, stem)
    assert stem.with_suffix(".png").read_bytes() == old_png
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    stem.with_suffix(".json").rmdir()
    save_figure_and_json(_figure("two, a longer title"), {"n": 2}, stem)
    assert json.loads(stem.with_suffix(".json").read_text()) == {"n": 2}
    assert stem.with_suffix(".png").read_bytes() != old_png


def test_a_write_that_fails_half_way_moves_nothing_in(tmp_path):
    stem = tmp_path / "heatmap_x_cifar10"
    save_figure_and_json(_figure("one"), {"n": 1}, stem, pdf=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    fig = _figure("two, a longer title")
    png_only = fig.savefig

    def full_disk_for_the_pdf(path, **kwargs):
        if str(path).endswith(".pdf"):
            raise OSError(28, "No space left on device", str(path))
        png_only(path, **kwargs)

    fig.savefig = full_disk_for_the_pdf
    # one line naming the folder, the files and what is kept (was the bare "[Errno 28] No space left on device")
    with pytest.raises(OSError, match=rf"the disk holding {tmp_path} is full: heatmap_x_cifar10.png and "
                                      r"heatmap_x_cifar10.pdf and heatmap_x_cifar10.json was not written \(the "
                                      r"earlier files are kept as they were\); free some space \(or pass another "
                                      r"--out\)") as caught:
        save_figure_and_json(fig, {"n": 2}, stem, pdf=True)
    assert caught.value.errno == 28 and "Errno" not in cli.one_line(caught.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # the PNG written as a draft, not moved in


def test_save_json_on_a_full_disk_keeps_the_earlier_file_and_says_where(tmp_path, monkeypatch):
    import builtins

    from ssl_patch_analysis import report

    if not Path("/dev/full").exists():
        pytest.skip("/dev/full is not available on this system (needed to simulate a full disk)")
    path = save_json({"n": 1}, tmp_path / "retrieval_x_cifar10.json")
    real_open = builtins.open
    monkeypatch.setattr(report, "open", lambda p, mode="r", *a, **k: real_open("/dev/full", mode, *a, **k),
                        raising=False)
    with pytest.raises(OSError, match=rf"the disk holding {tmp_path} is full: retrieval_x_cifar10.json was not "
                                      r"written \(the earlier retrieval_x_cifar10.json is kept\)"):
        save_json({"n": 2}, path)
    assert json.loads(path.read_text()) == {"n": 1} and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("first_time, hard_links", [(False, True), (True, True), (False, False)])
def test_a_rename_that_fails_after_another_puts_the_earlier_pair_back(tmp_path, monkeypatch, first_time,
                                                                      hard_links):
    # The figure is moved in, then the JSON's rename fails (a file made immutable, chattr +i): the earlier figure
    # comes back (or, the first time, the new one goes), so a figure never stands beside other numbers.
    stem = tmp_path / "retrieval_x_cifar10"
    if not first_time:
        save_figure_and_json(_figure("one"), {"n": 1}, stem)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    rename = os.replace

    def immutable_json(source, target):
        if str(target).endswith(".json"):
            raise PermissionError(1, "Operation not permitted", str(source), None, str(target))
        rename(source, target)

    monkeypatch.setattr(os, "replace", immutable_json)
    def no_hard_links(source, target):
        raise OSError(1, "Operation not permitted", str(source), None, str(target))

    if not hard_links:  # a file system without them: the earlier files are kept as copies
        monkeypatch.setattr(os, "link", no_hard_links)
    with pytest.raises(PermissionError):
        save_figure_and_json(_figure("two, a longer title"), {"n": 2}, stem)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no draft or kept copy left either
