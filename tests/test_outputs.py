"""An analysis's outputs are named ``<analysis>_<model>_<data>``: two models whose files share a name (the trainer's
``runs/a/checkpoint.pt`` and ``runs/b/checkpoint.pt``) name their outputs alike, and a run of one never replaces the
other's (refused before the work, in one line); another ``--split`` is another name."""
import json

import pytest
from PIL import Image

import helpers
from ssl_patch_analysis import convergence, evaluate, heatmap, retrieval
from ssl_patch_analysis.checkpoints import save_checkpoint

TRAIN = {"method": "vicreg", "min_scale": 0.2, "max_scale": 1.0}
ANALYSES = {  # each as small as it runs
    "convergence": (convergence, ["--num-images", "4", "--patch-sizes", "16", "--n-values", "1,all", "--draws", "2"],
                    "convergence_curve"),
    "heatmap": (heatmap, ["--figure-images", "1", "--locality-images", "0", "--patch-size", "16", "--stride", "8"],
                "figure_heatmaps"),
    "retrieval": (retrieval, ["--num-images", "4", "--patch-size", "16", "--stride", "8", "--neighbours", "2",
                              "--num-queries", "2"], "embed_grid_patches"),
    "evaluate": (evaluate, ["--protocols", "central", "--train-size", "4", "--test-size", "4", "--k", "2",
                            "--probe-epochs", "1", "--probe-batch-size", "2"], "evaluate_protocols"),
}


@pytest.fixture
def folder(tmp_path):
    """8 images of 32 x 32 px in two class folders."""
    root = tmp_path / "tiles"
    for i, image in enumerate(helpers.random_images(8)):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / f"class{i % 2}" / f"{i}.png")
    return root


def _two_runs(tmp_path):
    """Two trained models, each saved as its run folder's checkpoint.pt."""
    paths = []
    for seed, run in enumerate("ab"):
        path = tmp_path / "runs" / run / "checkpoint.pt"
        path.parent.mkdir(parents=True)
        save_checkpoint(helpers.tiny_model(seed=seed, train=TRAIN), path, train=TRAIN)
        paths.append(path)
    return paths


@pytest.mark.parametrize("analysis", list(ANALYSES))
def test_a_model_never_replaces_the_outputs_of_another_model_of_the_same_file_name(
        analysis, tmp_path, folder, monkeypatch, capsys):
    module, flags, work = ANALYSES[analysis]
    a, b = _two_runs(tmp_path)
    out = tmp_path / "figures"
    common = ["--data", str(folder), "--device", "cpu", "--no-progress", "--out", str(out), *flags]
    module.main(["--model", str(a), *common])
    (written,) = out.glob(f"{analysis}_checkpoint_tiles.json")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert json.loads(written.read_text())["output_of"] == {"model": str(a.resolve()), "data": "tiles"}

    def no_work(*args, **kwargs):
        raise AssertionError("the work ran before the outputs were checked")

    monkeypatch.setattr(module, work, no_work)
    with pytest.raises(SystemExit) as stopped:
        module.main(["--model", str(b), *common])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {written} holds the outputs of model {a.resolve()}, and this run's model {b.resolve()} "
                   f"would replace them (the same file names): pass another --out, or move {written.name} and its "
                   "figures away")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # nothing replaced, nothing new
    monkeypatch.undo()
    module.main(["--model", str(b), *common[:-len(flags)], "--out", str(tmp_path / "other"), *flags])
    assert json.loads((tmp_path / "other" / written.name).read_text())["output_of"]["model"] == str(b.resolve())


def test_the_same_model_replaces_its_outputs_and_another_split_goes_beside_them(tmp_path, cifar10_npz):
    (a, _) = _two_runs(tmp_path)
    out = tmp_path / "figures"
    common = ["--model", str(a), "--data", "cifar10", "--data-root", str(cifar10_npz.parent), "--device", "cpu",
              "--no-progress", "--out", str(out), *ANALYSES["convergence"][1]]
    convergence.main(common)
    test_json = out / "convergence_checkpoint_cifar10.json"
    first = json.loads(test_json.read_text())
    assert first["output_of"] == {"model": str(a.resolve()), "data": "CIFAR-10 (JPEG copy) test"}
    convergence.main([*common, "--draws", "3"])  # the same model again: its outputs are replaced
    assert json.loads(test_json.read_text())["draws"] == 3
    convergence.main([*common, "--split", "train"])  # was: written over the test split's outputs
    assert json.loads(test_json.read_text())["data"] == "CIFAR-10 (JPEG copy) test"
    train_json = out / "convergence_checkpoint_cifar10-train.json"
    assert json.loads(train_json.read_text())["data"] == "CIFAR-10 (JPEG copy) train"
    convergence.main([*common, "--split", "test"])  # the default split named: the default's name
    assert not (out / "convergence_checkpoint_cifar10-test.json").exists()
