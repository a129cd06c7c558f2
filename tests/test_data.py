"""Data sets: real CIFAR-10 / Imagenette archives, the decode cache, torchvision's CIFAR folders,
image folders, and the errors a user gets for missing or wrong data."""
import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import helpers
from ssl_patch_analysis import data
from ssl_patch_analysis.data import (
    DataFileError,
    ImageFolderDataset,
    TensorImageDataset,
    cache_dir,
    default_data_root,
    load_dataset,
)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Images per class in Imagenette2's validation split (fast.ai), in label order.
IMAGENETTE_VAL_COUNTS = [387, 395, 357, 386, 409, 394, 389, 419, 399, 390]


def pil_decode(jpeg: np.ndarray, offsets: np.ndarray, i: int) -> np.ndarray:
    """The data README's reference decode of archive image ``i`` (H x W x 3)."""
    return np.asarray(Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))


def chw_to_hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def jpeg_bytes(image: torch.Tensor) -> bytes:
    """``image`` (3 x H x W, uint8) as a JPEG file."""
    buffer = io.BytesIO()
    Image.fromarray(chw_to_hwc(image)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_jpeg_archive(path: Path, splits: dict[str, tuple[Sequence[torch.Tensor], list[int]]],
                       class_names: list[str]) -> None:
    """An archive in the shared data folder's layout: <split>_jpeg, <split>_offsets, <split>_labels.
    Each split's images are 3 x H x W uint8 tensors (a batch from :func:`helpers.random_images`)."""
    arrays: dict[str, np.ndarray] = {"class_names": np.array(class_names)}
    for split, (images, labels) in splits.items():
        files = [np.frombuffer(jpeg_bytes(im), dtype=np.uint8) for im in images]
        arrays[f"{split}_jpeg"] = np.concatenate(files)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.int64)
    np.savez(path, **arrays)


@pytest.fixture(scope="session")
def cifar10_archive(cifar10_npz):
    with np.load(cifar10_npz) as archive:
        return {k: archive[k] for k in archive.files}


@pytest.fixture(scope="session")
def cifar10_test(cifar10_npz):
    return load_dataset("cifar10", "test", root=cifar10_npz.parent)


@pytest.fixture(scope="session")
def cifar10_train(cifar10_npz):
    # Decoding the 50,000 training images takes seconds: once per test session.
    return load_dataset("cifar10", "train", root=cifar10_npz.parent)


@pytest.fixture(scope="session")
def imagenette_archive(imagenette_npz):
    with np.load(imagenette_npz) as archive:
        return {k: archive[k] for k in archive.files}


@pytest.mark.parametrize("split,per_class", [("train", 5000), ("test", 1000)])
def test_cifar10_archive_contents(split, per_class, request, cifar10_archive):
    dataset = request.getfixturevalue(f"cifar10_{split}")
    n = 10 * per_class
    assert isinstance(dataset, TensorImageDataset)
    assert (dataset.name, dataset.split, len(dataset)) == ("cifar10", split, n)
    assert dataset.class_names == CIFAR10_CLASSES
    assert dataset.description == "CIFAR-10 (JPEG copy)"
    assert dataset.images.dtype == torch.uint8 and dataset.images.shape == (n, 3, 32, 32)
    assert dataset.image_size == (32, 32)
    assert dataset.labels.dtype == torch.int64
    assert torch.bincount(dataset.labels).tolist() == [per_class] * 10
    assert torch.equal(dataset.labels, torch.from_numpy(cifar10_archive[f"{split}_labels"]))
    assert int(dataset.images.min()) == 0 and int(dataset.images.max()) == 255
    jpeg, offsets = cifar10_archive[f"{split}_jpeg"], cifar10_archive[f"{split}_offsets"]
    for i in (0, 1, 1234, n - 1):
        image, label = dataset[i]
        assert isinstance(label, int) and label == cifar10_archive[f"{split}_labels"][i]
        np.testing.assert_array_equal(chw_to_hwc(image), pil_decode(jpeg, offsets, i))


def test_cifar10_official_order(cifar10_test, cifar10_train):
    # Official order: test image 0 is a cat, training images 0..2 are a frog and two trucks.
    assert cifar10_test[0][1] == 3 and cifar10_test.class_names[3] == "cat"
    assert [cifar10_train[i][1] for i in range(3)] == [6, 9, 9]


def test_decode_is_cached_once_and_reused(cifar10_npz, cifar10_test, monkeypatch):
    cached = sorted((cache_dir() / "decoded").glob("cifar10_jpeg-*-test-*.npz"))
    assert len(cached) == 1
    assert not list(cifar10_npz.parent.glob("*-test-*")), "caches must never be written beside the data"

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cached decode should have been used")

    monkeypatch.setattr(data, "decode_jpegs", no_decoding)
    again = load_dataset("cifar10", "test", root=cifar10_npz.parent)
    assert torch.equal(again.images, cifar10_test.images)
    assert torch.equal(again.labels, cifar10_test.labels)


def test_changed_archive_is_decoded_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(tmp_path / "cache"))
    calls = []
    real_decode = data.decode_jpegs
    monkeypatch.setattr(data, "decode_jpegs", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    archive = tmp_path / "cifar10_jpeg.npz"
    splits = {"train": (helpers.random_images(4, seed=0), [0, 1, 2, 3]),
              "test": (helpers.random_images(3, seed=1), [9, 8, 7])}
    write_jpeg_archive(archive, splits, CIFAR10_CLASSES)

    first = load_dataset("cifar10", "test", root=tmp_path)
    second = load_dataset("cifar10", "test", root=tmp_path)
    assert len(calls) == 1
    assert torch.equal(first.images, second.images)
    assert first.labels.tolist() == [9, 8, 7]

    splits["test"] = (helpers.random_images(2, seed=2), [5, 6])
    write_jpeg_archive(archive, splits, CIFAR10_CLASSES)
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    third = load_dataset("cifar10", "test", root=tmp_path)
    assert len(calls) == 2
    assert third.labels.tolist() == [5, 6]
    with np.load(archive) as a:
        for i in range(2):
            np.testing.assert_array_equal(chw_to_hwc(third[i][0]), pil_decode(a["test_jpeg"], a["test_offsets"], i))
    assert len(list((tmp_path / "cache" / "decoded").glob("cifar10_jpeg-*-test-*.npz"))) == 1


def test_unwritable_cache_warns_and_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(blocker / "cache"))
    write_jpeg_archive(tmp_path / "cifar10_jpeg.npz", {"test": (helpers.random_images(2, seed=1), [1, 2])},
                       CIFAR10_CLASSES)
    with pytest.warns(UserWarning, match="SSL_PATCH_ANALYSIS_CACHE"):
        dataset = load_dataset("cifar10", "test", root=tmp_path)
    assert dataset.labels.tolist() == [1, 2]


def test_archive_with_mixed_image_sizes_is_refused(tmp_path):
    images = [*helpers.random_images(1, seed=2), *helpers.random_images(1, size=16, seed=3)]
    write_jpeg_archive(tmp_path / "cifar10_jpeg.npz", {"test": (images, [0, 1])}, CIFAR10_CLASSES)
    with pytest.raises(ValueError, match="image 1 is 16x16"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_imagenette_val(imagenette_npz, imagenette_archive):
    dataset = load_dataset("imagenette", "val", root=imagenette_npz.parent)
    assert (dataset.name, dataset.split, len(dataset)) == ("imagenette", "val", 3925)
    assert dataset.description == "Imagenette"
    assert dataset.class_names == imagenette_archive["class_names"].tolist()
    assert dataset.class_names[:3] == ["tench", "English springer", "cassette player"]
    assert torch.bincount(dataset.labels).tolist() == IMAGENETTE_VAL_COUNTS
    assert dataset.image_size == (224, 224)

    jpeg, offsets = imagenette_archive["val_jpeg"], imagenette_archive["val_offsets"]
    modes = [Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).mode for i in range(len(dataset))]
    greyscale = [i for i, mode in enumerate(modes) if mode == "L"]
    assert len(greyscale) == 69
    for i in greyscale:
        image, label = dataset[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 224, 224)
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
        assert label == imagenette_archive["val_labels"][i]
    colour = next(i for i, mode in enumerate(modes) if mode == "RGB")
    np.testing.assert_array_equal(chw_to_hwc(dataset[colour][0]), pil_decode(jpeg, offsets, colour))
    batch = dataset.get_batch([colour, greyscale[0]])
    assert batch.dtype == torch.uint8 and batch.shape == (2, 3, 224, 224)
    assert torch.equal(batch[1], dataset[greyscale[0]][0])


def cifar_row(image_chw: np.ndarray) -> np.ndarray:
    """One row of torchvision's CIFAR batches: the red plane, then green, then blue, each row-major."""
    return np.concatenate([image_chw[c].reshape(-1) for c in range(3)])


def write_fake_cifar10_folder(root: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A tiny cifar-10-batches-py folder (2 images per training batch, 3 test images), written as
    Python 3 does with bytes keys; returns the CHW images and labels of each split."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected = {}
    for split, files, per_file in (("train", [f"data_batch_{i}" for i in range(1, 6)], 2), ("test", ["test_batch"], 3)):
        images, labels = [], []
        for f in files:
            batch_images = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
            batch_labels = rng.integers(0, 10, per_file).tolist()
            entry = {b"batch_label": f.encode(), b"labels": batch_labels,
                     b"data": np.stack([cifar_row(im) for im in batch_images]),
                     b"filenames": [f"{f}_{k}.png".encode() for k in range(per_file)]}
            (folder / f).write_bytes(pickle.dumps(entry, protocol=2))
            images.append(batch_images)
            labels += batch_labels
        expected[split] = (np.concatenate(images), labels)
    meta = {b"num_cases_per_batch": 2, b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return expected


def test_torchvision_cifar10_folder_is_read_and_preferred(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(3)
    expected = write_fake_cifar10_folder(tmp_path, rng)
    # A JPEG archive beside it must be ignored: torchvision's files hold the official pixels.
    write_jpeg_archive(tmp_path / "cifar10_jpeg.npz", {"train": (helpers.random_images(1, seed=4), [0]),
                                                       "test": (helpers.random_images(1, seed=5), [0])},
                       CIFAR10_CLASSES)
    for split in ("train", "test"):
        dataset = load_dataset("cifar10", split, root=tmp_path)
        images, labels = expected[split]
        assert isinstance(dataset, TensorImageDataset)
        assert dataset.class_names == CIFAR10_CLASSES and dataset.description == "CIFAR-10"
        assert dataset.labels.tolist() == labels
        assert torch.equal(dataset.images, torch.from_numpy(images))
    assert not (tmp_path / "cache").exists(), "the JPEG archive must not even be decoded"


def test_torchvision_cifar100_folder_with_str_keys(tmp_path):
    # The official files were pickled by Python 2; read with latin1 their keys come back as str.
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    entry = {"data": np.stack([cifar_row(im) for im in images]), "fine_labels": [99, 0, 42], "coarse_labels": [1, 2, 3]}
    (folder / "test").write_bytes(pickle.dumps(entry, protocol=2))
    names = [f"class{i:02d}" for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": names[:20]}))
    dataset = load_dataset("cifar100", "test", root=tmp_path)
    assert dataset.class_names == names
    assert dataset.labels.tolist() == [99, 0, 42]
    assert torch.equal(dataset.images, torch.from_numpy(images))
    with pytest.raises(FileNotFoundError, match=r"train.*download=True"):
        load_dataset("cifar100", "train", root=tmp_path)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_tampered_cifar_pickle_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "code_ran"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _RunsCode(marker)}, protocol=2))
    with pytest.raises(DataFileError, match=r"test_batch is damaged or not an official CIFAR file .*refusing"):
        load_dataset("cifar10", "test", root=tmp_path)
    assert not marker.exists()


def test_download_fetches_torchvision_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    calls = []

    class FakeCIFAR10:
        """Stands in for torchvision.datasets.CIFAR10: tests never touch the network."""

        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            write_fake_cifar10_folder(Path(root), rng)

    monkeypatch.setattr(data.torchvision.datasets, "CIFAR10", FakeCIFAR10)
    root = tmp_path / "new_root"
    dataset = load_dataset("cifar10", "test", root=root, download=True)
    assert calls == [(str(root), True)]
    assert len(dataset) == 3 and dataset.class_names == CIFAR10_CLASSES
    load_dataset("cifar10", "train", root=root, download=True)
    assert len(calls) == 1, "files already downloaded must not be fetched again"


def test_failed_download_says_why(tmp_path, monkeypatch):
    class OfflineCIFAR10:
        def __init__(self, root, train=True, download=False):
            raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(data.torchvision.datasets, "CIFAR10", OfflineCIFAR10)
    with pytest.raises(RuntimeError, match="needs internet access"):
        load_dataset("cifar10", "test", root=tmp_path, download=True)


def test_missing_data_lists_every_path_tried(tmp_path, monkeypatch):
    # The training split: the test split would be served by the built-in sample (test_sample_data.py).
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("cifar10", "train", root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and str(tmp_path / "cifar10_jpeg.npz") in message
    assert "download=True" in message and "SSL_PATCH_ANALYSIS_DATA" in message

    empty = tmp_path / "empty"
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_DATA", str(empty))
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("imagenette", "val")
    message = str(error.value)
    assert str(empty / "imagenette_jpeg.npz") in message and "imagenette2" in message


def test_without_the_variable_the_user_cache_then_the_shared_folder_beside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("SSL_PATCH_ANALYSIS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    beside = Path(data.__file__).resolve().parents[2] / "shared" / "data"
    assert data.data_roots() == [tmp_path / "cache" / "ssl_patch_analysis" / "data", beside]
    archive = beside / "cifar10_jpeg.npz"
    if archive.is_file():
        # The checkout sits beside the project's shared/ folder (as in CI): found with no set-up at all.
        assert len(load_dataset("cifar10", "test")) == 10_000
    else:
        with pytest.raises(FileNotFoundError) as error:
            load_dataset("cifar10", "train")
        assert str(tmp_path / "cache" / "ssl_patch_analysis" / "data" / "cifar10_jpeg.npz") in str(error.value)
        assert str(archive) in str(error.value)


def test_wrong_names_splits_and_sizes(tmp_path):
    with pytest.raises(ValueError, match="valid splits: train, test"):
        load_dataset("cifar10", "val", root=tmp_path)
    with pytest.raises(ValueError, match="valid splits: val"):
        load_dataset("imagenette", "test", root=tmp_path)
    with pytest.raises(ValueError, match="cifar10, cifar100, imagenette"):
        load_dataset("mnist", root=tmp_path)
    # the flag a command-line user passed is named (the message named only the Python argument, image_size=224)
    with pytest.raises(ValueError, match=r"32x32; --image-size 224 \(image_size=\) is only for image folders"):
        load_dataset("cifar10", "test", root=tmp_path, image_size=224)
    with pytest.raises(FileNotFoundError, match=r"--data-root \(root=") as caught:
        load_dataset("imagenette", "val", root=tmp_path)
    assert "--data /path/to/imagenette2 --image-size 224" in str(caught.value)


def test_default_locations_follow_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(tmp_path / "c"))
    assert default_data_root() == tmp_path / "d" and cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SSL_PATCH_ANALYSIS_DATA")
    monkeypatch.delenv("SSL_PATCH_ANALYSIS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_root() == tmp_path / "xdg" / "ssl_patch_analysis" / "data"
    assert cache_dir() == tmp_path / "xdg" / "ssl_patch_analysis"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "ssl_patch_analysis"


def save_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def test_image_folder_round_trips_pixels(tmp_path):
    rng = np.random.default_rng(6)
    images = {"dog/1.png": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
              "cat/b.png": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
              "cat/a.png": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)}
    for name, image in images.items():
        save_png(tmp_path / name, image)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    dataset = load_dataset(str(tmp_path))
    assert isinstance(dataset, ImageFolderDataset)
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.labels.tolist() == [0, 0, 1]
    assert dataset.image_size == (5, 7)
    for i, name in enumerate(["cat/a.png", "cat/b.png", "dog/1.png"]):
        image, _ = dataset[i]
        assert image.dtype == torch.uint8
        np.testing.assert_array_equal(chw_to_hwc(image), images[name])
    batch = dataset.get_batch(torch.tensor([2, 0]))
    np.testing.assert_array_equal(chw_to_hwc(batch[0]), images["dog/1.png"])
    with pytest.raises(IndexError):
        dataset[3]


def test_image_folder_sizes_resize_and_batches(tmp_path):
    save_png(tmp_path / "a" / "small.png", np.full((4, 4, 3), 10, dtype=np.uint8))
    halves = np.zeros((8, 16, 3), dtype=np.uint8)
    halves[:, :8, 0] = 255  # red left half
    halves[:, 8:, 2] = 255  # blue right half
    save_png(tmp_path / "b" / "wide.png", halves)
    greyscale = tmp_path / "b" / "zgrey.png"
    Image.fromarray(np.full((6, 6), 77, dtype=np.uint8), mode="L").save(greyscale)

    native = ImageFolderDataset(tmp_path)
    assert native.image_size is None
    assert native[2][0].shape == (3, 6, 6) and int(native[2][0].min()) == int(native[2][0].max()) == 77
    with pytest.raises(ValueError, match=r"--image-size S \(image_size=S\)"):
        native.get_batch([0, 1])

    resized = ImageFolderDataset(tmp_path, image_size=4)
    assert resized.image_size == (4, 4)
    batch = resized.get_batch([0, 1, 2])
    assert batch.shape == (3, 3, 4, 4)
    assert torch.all(batch[0] == 10) and torch.all(batch[2] == 77)
    # 8x16 -> 4x8 -> centre columns 2..5: the outer ones lie wholly inside the red / blue halves.
    assert batch[1][:, :, 0].T.tolist() == [[255, 0, 0]] * 4
    assert batch[1][:, :, 3].T.tolist() == [[0, 0, 255]] * 4


def test_image_folder_splits(tmp_path):
    for split in ("train", "val"):
        save_png(tmp_path / split / "x" / "0.png", np.zeros((2, 2, 3), dtype=np.uint8))
    save_png(tmp_path / "val" / "y" / "0.png", np.zeros((2, 2, 3), dtype=np.uint8))
    val = load_dataset(str(tmp_path), split="val")
    assert (val.split, val.class_names, len(val)) == ("val", ["x", "y"], 2)
    assert val.description == f"{tmp_path.name}/val"
    with pytest.raises(ValueError, match="train, val"):
        load_dataset(str(tmp_path), split="test")
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "absent")



def test_the_splits_of_an_image_folder_share_one_numbering_of_the_classes(tmp_path):
    # was: each split numbered its own class folders, so val's "fish" (1 of cat, fish) was train's "dog" (1 of cat,
    # dog, fish), and train's online k-NN scored val against train with the labels misaligned, without a word
    for split, classes in (("train", ("cat", "dog", "fish")), ("val", ("cat", "fish"))):
        for name in classes:
            save_png(tmp_path / split / name / "0.png", np.full((2, 2, 3), len(name), dtype=np.uint8))
    (tmp_path / "val" / ".ipynb_checkpoints").mkdir()  # hidden: no class
    train, val = (load_dataset(str(tmp_path), split=split) for split in ("train", "val"))
    assert train.class_names == val.class_names == ["cat", "dog", "fish"]
    assert [train.class_names[label] for label in train.labels] == ["cat", "dog", "fish"]
    assert [val.class_names[label] for label in val.labels] == ["cat", "fish"]
    assert [path.parent.name for path in val.paths] == ["cat", "fish"]


def test_split_on_an_image_folder_without_split_folders_is_refused(tmp_path, capsys):
    # was: ignored, every --split the whole folder (a train-vs-test comparison compared the images with themselves)
    from ssl_patch_analysis import extract
    from ssl_patch_analysis.checkpoints import save_checkpoint

    for name in ("a", "b"):
        save_png(tmp_path / "flat" / name / "0.png", np.zeros((32, 32, 3), dtype=np.uint8))
    save_checkpoint(helpers.tiny_model(), tmp_path / "tiny.pt")
    with pytest.raises(SystemExit) as stopped:
        extract.main(["--model", str(tmp_path / "tiny.pt"), "--data", str(tmp_path / "flat"), "--split", "train",
                      "--central", "--store", str(tmp_path / "store"), "--device", "cpu"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --split train: the image folder {tmp_path / 'flat'} has no split sub-folders (its images are one "
        "set, whatever --split says): leave --split out, or give the folder train/ and test/ sub-folders")
    assert not (tmp_path / "store").exists()


def test_an_image_folder_without_class_folders_says_the_layout(tmp_path):
    # was torchvision's "Couldn't find any class folder in ..." / "Found no valid file for the classes ..."
    for i in range(3):
        save_png(tmp_path / "flat" / f"{i}.png", np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match=r"flat has no class sub-folders \(it holds 3 images directly\); "
                                                r"expected <folder>/<class>/<image>"):
        load_dataset(str(tmp_path / "flat"))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"its class sub-folders \(cat\) hold no images"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "flat" / "all").mkdir()  # the advice followed: one folder for unlabelled images
    for i in range(3):
        (tmp_path / "flat" / f"{i}.png").rename(tmp_path / "flat" / "all" / f"{i}.png")
    assert len(load_dataset(str(tmp_path / "flat"))) == 3


def test_tensor_dataset_validates_and_batches():
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).reshape(4, 3, 2, 2)
    dataset = TensorImageDataset(images, [0, 1, 1, 0], ["a", "b"], name="toy")
    assert dataset.image_size == (2, 2) and len(dataset) == 4
    assert torch.equal(dataset.get_batch([3, -4]), images[[3, 0]])
    assert dataset[-1][1] == 0
    with pytest.raises(IndexError):
        dataset[4]
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    batch_images, batch_labels = next(iter(loader))
    assert torch.equal(batch_images, images[:3]) and batch_labels.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(images.float(), [0, 1, 1, 0], ["a", "b"])
    with pytest.raises(ValueError, match="N=4"):
        TensorImageDataset(images, [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match=r"0\.\.1"):
        TensorImageDataset(images, [0, 1, 2, 0], ["a", "b"])


def test_a_folder_named_like_a_data_set_is_said_not_to_be_read(cifar10_npz, tmp_path, monkeypatch, capsys):
    """``cifar10`` is the named data set even where ./cifar10/ is an image folder (the user's own CIFAR-10 as PNGs):
    it was read from the archive without a word. It still is (the name is documented), and stderr says the folder was
    not read and how to read it; no notice where ./cifar10/ holds no class folders."""
    monkeypatch.chdir(tmp_path)
    save_png(tmp_path / "cifar10" / "cat" / "a.png", np.zeros((4, 4, 3), dtype=np.uint8))
    capsys.readouterr()
    loaded = load_dataset("cifar10", "test", root=cifar10_npz.parent)
    assert len(loaded) == 10_000  # the archive's test split, as the name says
    err = capsys.readouterr().err
    assert "cifar10" in err and "not read" in err and "./cifar10" in err
    assert len(load_dataset("./cifar10", "test")) == 1  # the hint's spelling reads the folder
    capsys.readouterr()
    (tmp_path / "cifar10" / "cat" / "a.png").unlink()
    (tmp_path / "cifar10" / "cat").rmdir()
    load_dataset("cifar10", "test", root=cifar10_npz.parent)
    assert "not read" not in capsys.readouterr().err
