"""The built-in sample (the first 1,000 CIFAR-10 test images): its contents, when load_dataset falls
back to it, the errors beyond it, and the demo on a fresh clone with no data beside it."""
import configparser
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_patch_analysis import data
from ssl_patch_analysis.data import DataSetNotFoundError, SampleDataset, load_dataset, load_sample

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT / "ssl_patch_analysis" / "sample_data"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The official labels of CIFAR-10 test images 0..9, and the class counts of images 0..999.
OFFICIAL_FIRST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
SAMPLE_CLASS_COUNTS = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]
# The demo (make demo) with fewer images, to keep the test short; its images are the first ones either way.
DEMO = [sys.executable, "-m", "ssl_patch_analysis.convergence", "--model", "vicreg", "--device", "cpu",
        "--num-images", "8"]


def run_demo(data_root: Path, out: Path) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "SSL_PATCH_ANALYSIS_DATA": str(data_root)}
    done = subprocess.run([*DEMO, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads((out / "convergence_vicreg_cifar10.json").read_text())


@pytest.fixture(scope="module")
def sample() -> SampleDataset:
    return load_sample()


@pytest.fixture(scope="module")
def demo_on_sample(tmp_path_factory):
    """The demo run as on a fresh clone: the Makefile's data folder (../shared/data) does not exist."""
    base = tmp_path_factory.mktemp("fresh")
    return run_demo(base / "shared" / "data", base / "figures")


def test_sample_is_the_official_start_of_the_test_split(sample):
    assert isinstance(sample, SampleDataset)
    assert (sample.name, sample.split, len(sample), sample.image_size) == ("cifar10", "test", 1000, (32, 32))
    assert sample.class_names == CIFAR10_CLASSES
    assert sample.labels[:10].tolist() == OFFICIAL_FIRST_LABELS
    assert torch.bincount(sample.labels).tolist() == SAMPLE_CLASS_COUNTS
    assert sample.images.dtype == torch.uint8 and sample.images.shape == (1000, 3, 32, 32)
    assert sample.description == "CIFAR-10 (JPEG copy, 1,000-image sample)"
    with np.load(SAMPLE_DIR / "cifar10_test_sample.npz") as archive:  # allow_pickle=False: plain arrays only
        assert sorted(archive.files) == ["class_names", "test_jpeg", "test_labels", "test_offsets",
                                         "test_tiny_images_filename"]
        assert archive["test_tiny_images_filename"][0] == "domestic_cat_s_000907.png"


def test_sample_equals_the_full_copys_first_1000_test_images(sample, cifar10_npz):
    full = load_dataset("cifar10", "test", root=cifar10_npz.parent)
    assert len(full) == 10_000 and not isinstance(full, SampleDataset)
    assert torch.equal(sample.images, full.images[:1000])
    assert torch.equal(sample.labels, full.labels[:1000])
    assert sample.class_names == full.class_names
    with np.load(cifar10_npz) as whole, np.load(SAMPLE_DIR / "cifar10_test_sample.npz") as part:
        end = whole["test_offsets"][1000]
        np.testing.assert_array_equal(part["test_jpeg"], whole["test_jpeg"][:end])
        np.testing.assert_array_equal(part["test_offsets"], whole["test_offsets"][:1001])
        np.testing.assert_array_equal(part["test_tiny_images_filename"], whole["test_tiny_images_filename"][:1000])


def test_make_sample_reproduces_the_shipped_file(cifar10_npz, tmp_path):
    out = tmp_path / "sample.npz"
    command = [sys.executable, str(SAMPLE_DIR / "make_sample.py"), "--source", str(cifar10_npz), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    with np.load(out) as made, np.load(SAMPLE_DIR / "cifar10_test_sample.npz") as shipped:
        assert made.files == shipped.files
        for key in made.files:
            np.testing.assert_array_equal(made[key], shipped[key], err_msg=key)


@pytest.mark.parametrize("where", ["absent folder", "empty folder", "root argument"])
def test_missing_cifar10_test_falls_back_to_the_sample_with_a_notice(where, no_data_root, tmp_path, capsys):
    root = None
    if where == "empty folder":
        no_data_root.mkdir(parents=True)
    elif where == "root argument":
        root = tmp_path / "empty"
        root.mkdir()
    dataset = load_dataset("cifar10", "test", root=root)
    assert isinstance(dataset, SampleDataset) and len(dataset) == 1000
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1, notice
    assert "built-in sample" in notice[0] and str(root or no_data_root) in notice[0]
    assert "--download" in notice[0] and "SSL_PATCH_ANALYSIS_DATA" in notice[0]


def test_full_data_is_preferred_to_the_sample(cifar10_npz, monkeypatch, capsys):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_DATA", str(cifar10_npz.parent))
    dataset = load_dataset("cifar10", "test")
    assert len(dataset) == 10_000 and not isinstance(dataset, SampleDataset)
    assert "built-in sample" not in capsys.readouterr().err


@pytest.mark.parametrize("name,split", [("cifar10", "train"), ("cifar100", "test"), ("imagenette", "val")])
def test_requests_the_sample_cannot_serve_keep_the_not_found_error(name, split, no_data_root, capsys):
    with pytest.raises(DataSetNotFoundError) as error:
        load_dataset(name, split)
    message = str(error.value)
    assert f"data set {name!r} not found" in message and str(no_data_root) in message
    assert f"cannot stand in for {name} {split}" in message and "first 1,000 CIFAR-10 test images" in message
    assert "built-in sample" not in capsys.readouterr().err


def test_images_beyond_the_sample_are_refused(sample):
    assert torch.equal(sample[999][0], sample.images[999])
    for index in (1000, 9999, -1):
        with pytest.raises(IndexError, match=rf"image {index} is not in the built-in CIFAR-10 sample.*0\.\.999.*"
                                             "--download.*SSL_PATCH_ANALYSIS_DATA"):
            sample[index]
    with pytest.raises(IndexError, match="image 1000 is not in the built-in"):
        sample.get_batch([998, 999, 1000])
    assert len(list(sample)) == 1000


def test_a_damaged_cifar10_folder_is_reported_not_replaced(tmp_path, capsys):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match="test_batch is missing from torchvision's CIFAR folder"):
        load_dataset("cifar10", "test", root=tmp_path)
    assert "built-in sample" not in capsys.readouterr().err


def test_a_missing_sample_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "sample_path", lambda: tmp_path / "cifar10_test_sample.npz")
    with pytest.raises(FileNotFoundError, match=r"data set 'cifar10' not found(.|\n)*sample .* is missing too"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_sample_ships_as_package_data():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in config["options.package_data"]["ssl_patch_analysis"].split(",")]
    for shipped in ("sample_data/cifar10_test_sample.npz", "sample_data/README.md"):
        assert any(fnmatch.fnmatch(shipped, p) for p in patterns), (shipped, patterns)
    assert data.sample_path().is_file()


@pytest.mark.slow  # the demo in a subprocess
def test_demo_runs_on_a_fresh_clone_without_data(demo_on_sample):
    done, numbers = demo_on_sample
    notices = [line for line in done.stderr.splitlines() if "built-in sample" in line]
    assert len(notices) == 1 and notices[0].startswith("note: CIFAR-10 not found")
    assert numbers["data"] == "CIFAR-10 (JPEG copy, 1,000-image sample) test"
    assert numbers["num_images"] == 8 and numbers["image_ids"] == list(range(8))


@pytest.mark.slow  # the demo in two subprocesses
def test_demo_numbers_on_the_sample_equal_the_full_run(demo_on_sample, cifar10_npz, tmp_path):
    _, on_sample = demo_on_sample
    done, on_full = run_demo(cifar10_npz.parent, tmp_path / "figures")
    assert "built-in sample" not in done.stderr
    assert on_full["data"] == "CIFAR-10 (JPEG copy) test"
    for key in ("curves", "image_ids", "num_images", "draws", "seed", "model_info", "whole_image_size"):
        assert on_sample[key] == on_full[key], key
