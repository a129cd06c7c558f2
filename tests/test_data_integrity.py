"""Data that are not what they should be (issue 14): images of every Pillow mode decode to the right
8-bit RGB pixels or are refused naming the file, a damaged decoded-image cache is decoded again, and
damaged archives, CIFAR batch files and image files give one line naming the file and what to do
(image folders can skip their unreadable images instead)."""
import argparse
import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import helpers
from ssl_patch_analysis import cli, data
from ssl_patch_analysis.data import DataFileError, ImageFolderDataset, load_dataset
from ssl_patch_analysis.extract import extract_patch_embeddings
from ssl_patch_analysis.patches import central
from test_data import CIFAR10_CLASSES, write_fake_cifar10_folder, write_jpeg_archive

# 16-bit values around every rounding boundary of v * 255 / 65535, and the ends.
SIXTEEN_BIT_VALUES = np.array([0, 1, 128, 129, 256, 257, 385, 386, 32767, 32768, 65149, 65150, 65407, 65408, 65534,
                               65535], dtype=np.uint16)


def as_8_bit(values: np.ndarray) -> np.ndarray:
    """The reference reduction: scale by 255 / 65535 and round to the nearest integer."""
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def folder_with(tmp_path: Path, name: str, image: Image.Image, **save_args) -> ImageFolderDataset:
    path = tmp_path / "images" / "a" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_args)
    return ImageFolderDataset(tmp_path / "images")


# --- item 4: every mode to 8-bit RGB, or refused ----------------------------------------------------------------

def sixteen_bit_gradient() -> np.ndarray:
    """A 4 x 64 gradient through every 16-bit value class, the special values in the first row."""
    gradient = np.linspace(0, 65535, 4 * 64).round().astype(np.uint16).reshape(4, 64)
    gradient[0, :len(SIXTEEN_BIT_VALUES)] = SIXTEEN_BIT_VALUES
    return gradient


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_decodes_to_rounded_8_bit(tmp_path, fmt):
    gradient = sixteen_bit_gradient()
    written = Image.fromarray(gradient)
    assert written.mode == "I;16"
    dataset = folder_with(tmp_path, f"gradient.{fmt.lower()}", written, format=fmt)
    with Image.open(dataset.paths[0]) as check:
        assert check.mode.startswith("I;16")  # Pillow reads it back as 16 bits: the case that came out white
    image = hwc(dataset[0][0])
    assert image.dtype == np.uint8 and image.shape == (4, 64, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], as_8_bit(gradient))


def test_16_bit_greyscale_with_a_transparent_value(tmp_path):
    grey = np.array([[0, 1000, 1001, 65535]], dtype=np.uint16)
    dataset = folder_with(tmp_path, "keyed.png", Image.fromarray(grey), transparency=1000)
    assert hwc(dataset[0][0])[..., 0].tolist() == [[0, 255, 4, 255]]  # 1000 is transparent: white


def test_32_bit_integer_image_opened_from_a_png_is_read_as_16_bit():
    # Pillow before 10 opened 16-bit greyscale PNGs in mode I (32-bit integers, values 0..65535).
    gradient = sixteen_bit_gradient()
    image = Image.fromarray(gradient.astype(np.int32))
    assert image.mode == "I"
    image.format = "PNG"
    assert data._no_rgb_form(image) is None
    np.testing.assert_array_equal(np.asarray(data._as_rgb(image))[..., 1], as_8_bit(gradient))
    image.putpixel((0, 0), 70000)  # no longer a 16-bit value
    assert "values 1..70000, beyond 16 bits" in data._no_rgb_form(image)
    image.format = "TIFF"  # where mode I may hold any 32-bit value
    assert data._no_rgb_form(image) == "32-bit integer pixels (mode I)"


@pytest.mark.parametrize("mode,values", [("F", np.float32), ("I", np.int32)])
def test_images_without_a_defined_8_bit_range_are_refused_naming_the_file(tmp_path, mode, values):
    pixels = (np.arange(16).reshape(4, 4) * 1000).astype(values)
    dataset = folder_with(tmp_path, "deep.tiff", Image.fromarray(pixels, mode=mode), format="TIFF")
    with Image.open(dataset.paths[0]) as check:
        assert check.mode == mode
    with pytest.raises(DataFileError) as error:
        dataset[0]
    message = str(error.value)
    assert str(dataset.paths[0]) in message and f"mode {mode}" in message
    assert "16-bit PNG" in message and "--skip-bad-images" in message and "\n" not in message


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128], [0, 0, 0, 51]]], dtype=np.uint8)
    dataset = folder_with(tmp_path, "alpha.png", Image.fromarray(rgba, mode="RGBA"))
    alpha = rgba[..., 3:].astype(np.float64) / 255
    expected = np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    np.testing.assert_array_equal(hwc(dataset[0][0]), expected)
    assert hwc(dataset[0][0])[0, 1].tolist() == [255, 255, 255]  # fully transparent: white, not the hidden colour


def test_grey_with_alpha(tmp_path):
    la = np.array([[[40, 255], [40, 0], [90, 102]]], dtype=np.uint8)
    dataset = folder_with(tmp_path, "la.png", Image.fromarray(la, mode="LA"))
    assert hwc(dataset[0][0]).tolist() == [[[40] * 3, [255] * 3, [189] * 3]]  # 90 * 0.4 + 255 * 0.6 = 189


def test_palette_with_a_transparent_entry(tmp_path):
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 0] + [0] * (3 * 253))
    image.putdata([0, 1, 2])
    dataset = folder_with(tmp_path, "palette.png", image, transparency=2)  # entry 2 (black) is transparent
    with Image.open(dataset.paths[0]) as check:
        assert check.mode == "P" and check.info["transparency"] == 2
    assert hwc(dataset[0][0]).tolist() == [[[255, 0, 0], [0, 255, 0], [255, 255, 255]]]


def test_rgb_png_with_a_transparent_colour(tmp_path):
    rgb = np.array([[[10, 20, 30], [1, 2, 3]]], dtype=np.uint8)
    dataset = folder_with(tmp_path, "trns.png", Image.fromarray(rgb), transparency=(1, 2, 3))
    assert hwc(dataset[0][0]).tolist() == [[[10, 20, 30], [255, 255, 255]]]


def test_cmyk(tmp_path):
    cmyk = np.array([[[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8)
    dataset = folder_with(tmp_path, "cmyk.tiff", Image.fromarray(cmyk, mode="CMYK"), format="TIFF")
    assert hwc(dataset[0][0]).tolist() == [[[0, 255, 255], [255, 0, 255], [0, 0, 0], [255, 255, 255]]]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def sixteen_bit_colour_png(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def test_16_bit_colour_png_is_within_one_level_of_rounding(tmp_path):
    # Pillow reduces 16-bit colour PNGs itself, to the high byte; never more than 1 level from rounding.
    pixels = np.stack([SIXTEEN_BIT_VALUES, SIXTEEN_BIT_VALUES[::-1], np.full_like(SIXTEEN_BIT_VALUES, 65535)], -1)[None]
    path = tmp_path / "images" / "a" / "colour16.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(sixteen_bit_colour_png(pixels))
    image = hwc(ImageFolderDataset(tmp_path / "images")[0][0]).astype(int)
    assert np.abs(image - as_8_bit(pixels)).max() <= 1
    assert image[0, :, 2].tolist() == [255] * len(SIXTEEN_BIT_VALUES)


def test_archive_images_use_the_same_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(tmp_path / "cache"))
    gradient = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="PNG")
    png = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    np.savez(tmp_path / "cifar10_jpeg.npz", class_names=np.array(CIFAR10_CLASSES), test_jpeg=png,
             test_offsets=np.array([0, len(png)]), test_labels=np.array([4]))
    image = hwc(load_dataset("cifar10", "test", root=tmp_path)[0][0])
    np.testing.assert_array_equal(image[..., 0], as_8_bit(gradient))


# --- item 7: the decoded-image cache is verified ----------------------------------------------------------------

def flip_a_pixel_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x55  # the pixels fill nearly all of the file
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) * 2 // 3])


def overwrite_with_other_pixels(path: Path) -> None:
    with np.load(path) as cached:
        arrays = {k: cached[k] for k in cached.files}
    arrays["images"][-1] = 0  # a valid file whose checksum no longer matches
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage", [flip_a_pixel_byte, truncate, overwrite_with_other_pixels])
def test_damaged_cache_is_decoded_again_with_a_notice(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(tmp_path / "cache"))
    calls = []
    real_decode = data.decode_jpegs
    monkeypatch.setattr(data, "decode_jpegs", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    write_jpeg_archive(tmp_path / "cifar10_jpeg.npz", {"test": (helpers.random_images(6, seed=10), [0, 1, 2, 3, 4, 5])},
                       CIFAR10_CLASSES)
    first = load_dataset("cifar10", "test", root=tmp_path)
    cache, = (tmp_path / "cache" / "decoded").glob("cifar10_jpeg-*-test-*")
    assert capsys.readouterr().err == ""

    damage(cache)
    again = load_dataset("cifar10", "test", root=tmp_path)
    assert torch.equal(again.images, first.images)
    assert len(calls) == 2
    notice = capsys.readouterr().err.splitlines()
    assert len(notice) == 1 and str(cache) in notice[0] and "decoding" in notice[0] and "again" in notice[0]

    # The damaged cache was replaced: the next load uses it, silently.
    third = load_dataset("cifar10", "test", root=tmp_path)
    assert torch.equal(third.images, first.images) and len(calls) == 2
    assert capsys.readouterr().err == ""
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]


def test_cache_of_an_older_version_is_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "cifar10_jpeg.npz"
    write_jpeg_archive(archive, {"test": (helpers.random_images(2, seed=11), [0, 1])}, CIFAR10_CLASSES)
    cache = data._decoded_cache_path(archive, "test")
    cache.parent.mkdir(parents=True)
    unverified = cache.with_suffix(".npy")  # the format before checksums: its pixels cannot be trusted
    np.save(unverified, np.zeros((2, 3, 32, 32), dtype=np.uint8))
    dataset = load_dataset("cifar10", "test", root=tmp_path)
    assert int(dataset.images.max()) > 0
    assert not unverified.exists() and cache.exists()
    assert capsys.readouterr().err == ""


# --- item 10: damaged archives, CIFAR batch files and image files -----------------------------------------------

def archive_bytes(tmp_path: Path, name: str, split: str) -> bytes:
    source = tmp_path / "source" / name
    source.parent.mkdir(exist_ok=True)
    size = 224 if name.startswith("imagenette") else 32
    write_jpeg_archive(source, {split: (helpers.random_images(3, size=size, seed=12), [0, 1, 2])}, CIFAR10_CLASSES)
    return source.read_bytes()


def write_damaged(path: Path, raw: bytes) -> None:
    path.write_bytes(raw)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new cache key on coarse clocks too


def assert_names_file_and_fix(error: pytest.ExceptionInfo, path: Path, fix: str) -> None:
    message = str(error.value)
    assert isinstance(error.value, DataFileError), repr(error.value)
    assert str(path) in message and fix in message and "\n" not in message, message


ARCHIVES = [("cifar10", "test", "cifar10_jpeg.npz", "--download"),
            ("imagenette", "val", "imagenette_jpeg.npz", "imagenette2")]


@pytest.mark.parametrize("name,split,file,fix", ARCHIVES)
def test_truncated_archive_names_the_file(tmp_path, monkeypatch, name, split, file, fix):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(tmp_path / "cache"))
    raw = archive_bytes(tmp_path, file, split)
    path = tmp_path / file
    for length in (0, 10, len(raw) // 3, len(raw) - 30):
        write_damaged(path, raw[:length])
        with pytest.raises(DataFileError) as error:
            load_dataset(name, split, root=tmp_path)
        assert_names_file_and_fix(error, path, "replace it with a fresh copy")
        assert fix in str(error.value)
    write_damaged(path, raw)  # the advice works
    assert len(load_dataset(name, split, root=tmp_path)) == 3


@pytest.mark.parametrize("name,split,file,fix", ARCHIVES)
def test_garbled_bytes_across_an_archive_are_caught_or_harmless(tmp_path, monkeypatch, name, split, file, fix):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(tmp_path / "cache"))
    raw = archive_bytes(tmp_path, file, split)
    path = tmp_path / file
    write_damaged(path, raw)
    reference = load_dataset(name, split, root=tmp_path)
    expected = [reference[i][0] for i in range(3)]
    caught = 0
    for position in range(0, len(raw), max(1, len(raw) // 150)):
        garbled = bytearray(raw)
        garbled[position] ^= 0xA5
        write_damaged(path, bytes(garbled))
        try:
            dataset = load_dataset(name, split, root=tmp_path)
            images = [dataset[i][0] for i in range(len(dataset))]
        except DataFileError as error:
            # a clear refusal or the same data are both right here: no pytest.raises
            assert str(path) in str(error) and "\n" not in str(error), (position, str(error))  # noqa: PT017
            caught += 1
            continue
        # Bytes the reader never uses (zip timestamps, padding) may change: the data may not.
        assert dataset.labels.tolist() == [0, 1, 2] and dataset.class_names == CIFAR10_CLASSES, position
        assert all(torch.equal(a, b) for a, b in zip(images, expected, strict=True)), position
    assert caught > 100


def jpeg_archive_with(tmp_path: Path, file: str, split: str, bad: bytes, offsets=None) -> Path:
    """An archive of three images, the middle one ``bad`` (stored intact: only its decode fails)."""
    good = [np.frombuffer(data_jpeg(v), dtype=np.uint8) for v in (10, 20)]
    files = [good[0], np.frombuffer(bad, dtype=np.uint8), good[1]]
    jpeg = np.concatenate(files)
    if offsets is None:
        offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])])
    path = tmp_path / file
    arrays = {f"{split}_jpeg": jpeg, f"{split}_offsets": np.array(offsets), f"{split}_labels": np.array([0, 1, 2])}
    np.savez(path, class_names=np.array(CIFAR10_CLASSES), **arrays)
    return path


def data_jpeg(value: int, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("name,split,file,fix", ARCHIVES)
def test_undecodable_image_inside_an_archive_names_it(tmp_path, monkeypatch, name, split, file, fix):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(tmp_path / "cache"))
    path = jpeg_archive_with(tmp_path, file, split, data_jpeg(30)[:200])  # a truncated JPEG, stored intact
    with pytest.raises(DataFileError) as error:  # when loading or when reading the image, either is fine
        load_dataset(name, split, root=tmp_path)[1]
    assert_names_file_and_fix(error, path, "replace it with a fresh copy")
    assert "image 1 of" in str(error.value)


@pytest.mark.parametrize("name,split,file,fix", ARCHIVES)
def test_archive_offsets_that_do_not_fit_are_refused(tmp_path, monkeypatch, name, split, file, fix):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(tmp_path / "cache"))
    size = len(data_jpeg(10))
    for offsets in ([0, size, 5, 3 * size], [0, size, 2 * size, 10**9], [7, size, 2 * size, 3 * size]):
        path = jpeg_archive_with(tmp_path, file, split, data_jpeg(30), offsets=offsets)
        with pytest.raises(DataFileError) as error:
            load_dataset(name, split, root=tmp_path)
        assert_names_file_and_fix(error, path, "offsets")


def test_archive_labels_out_of_range_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(tmp_path / "cache"))
    jpeg = np.frombuffer(data_jpeg(5, size=224), dtype=np.uint8)
    path = tmp_path / "imagenette_jpeg.npz"
    np.savez(path, class_names=np.array(CIFAR10_CLASSES), val_jpeg=jpeg, val_offsets=np.array([0, len(jpeg)]),
             val_labels=np.array([10]))
    with pytest.raises(DataFileError) as error:
        load_dataset("imagenette", "val", root=tmp_path)
    assert_names_file_and_fix(error, path, "labels")


@pytest.mark.parametrize("file", ["test_batch", "batches.meta"])
def test_damaged_cifar_batch_file_names_it(tmp_path, monkeypatch, file):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(tmp_path / "cache"))
    write_fake_cifar10_folder(tmp_path, np.random.default_rng(13))
    path = tmp_path / "cifar-10-batches-py" / file
    raw = path.read_bytes()
    caught = 0
    damaged = [raw[:0], raw[:len(raw) // 2], raw[:-1], b"not a pickle"]
    damaged += [raw[:p] + bytes([raw[p] ^ 0xA5]) + raw[p + 1:] for p in range(0, len(raw), max(1, len(raw) // 80))]
    for garbled in damaged:
        path.write_bytes(garbled)
        try:
            load_dataset("cifar10", "test", root=tmp_path)
        except DataFileError as error:
            message = str(error)
            assert str(path) in message and "--download" in message and "\n" not in message, message
            caught += 1
    assert caught >= 4  # at least every truncation; a flipped pixel byte cannot be told from a real pixel


def test_damaged_cifar_folder_advice_works(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_CACHE", str(tmp_path / "cache"))
    write_fake_cifar10_folder(tmp_path, np.random.default_rng(14))
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DataFileError, match=r"remove the folder .*cifar-10-batches-py.*--download"):
        load_dataset("cifar10", "test", root=tmp_path)

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False):
            write_fake_cifar10_folder(Path(root), np.random.default_rng(15))

    monkeypatch.setattr(data.torchvision.datasets, "CIFAR10", FakeCIFAR10)
    for f in batch.parent.iterdir():
        f.unlink()
    batch.parent.rmdir()
    assert len(load_dataset("cifar10", "test", root=tmp_path, download=True)) == 3


def test_cifar_labels_that_do_not_fit_are_refused(tmp_path):
    write_fake_cifar10_folder(tmp_path, np.random.default_rng(16))
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(path.read_bytes())
    entry[b"labels"] = [0, 11, 2]
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataFileError, match=r"test_batch.*labels"):
        load_dataset("cifar10", "test", root=tmp_path)
    entry[b"labels"] = [0, 1]
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataFileError, match=r"test_batch.*2 labels for 3 images"):
        load_dataset("cifar10", "test", root=tmp_path)


def good_png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def garbled_png_crc() -> bytes:
    raw = bytearray(good_png(77))
    raw[-20] ^= 0x01  # inside IDAT: the chunk's CRC no longer matches
    return bytes(raw)


BAD_FILES = {
    "truncated.jpg": lambda: data_jpeg(40, size=64)[:300],
    "empty.png": lambda: b"",
    "text.jpg": lambda: b"these are not pixels",
    "header.png": lambda: good_png(5)[:30] + b"\0" * 60,
}


def folder_with_bad_files(root: Path, bad: dict) -> dict[str, int]:
    """Good 8 x 8 images of known grey values in two classes, and the bad files ``bad`` in class b."""
    good = {"a/1.png": 10, "a/2.png": 20, "b/3.png": 30, "b/9.png": 90}
    for name, value in good.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(good_png(value))
    for name, make in bad.items():
        (root / "b" / name).write_bytes(make())
    return good


@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_bad_image_in_a_folder_is_named_at_first_use(tmp_path, bad):
    folder_with_bad_files(tmp_path, {bad: BAD_FILES[bad]})
    dataset = load_dataset(str(tmp_path))
    index = [p.name for p in dataset.paths].index(bad)
    assert torch.all(dataset[0][0] == 10)  # the good images load
    for use in (lambda: dataset[index], lambda: dataset.get_batch([0, index]), lambda: dataset.image_size):
        with pytest.raises(DataFileError) as error:
            use()
        assert_names_file_and_fix(error, tmp_path / "b" / bad, "--skip-bad-images")


def test_skip_bad_images_leaves_them_out_and_lists_them(tmp_path, capsys):
    bad = {**BAD_FILES, "crc.png": garbled_png_crc}
    good = folder_with_bad_files(tmp_path, bad)
    dataset = load_dataset(str(tmp_path), skip_bad_images=True)
    assert [p.relative_to(tmp_path).as_posix() for p in dataset.paths] == sorted(good)
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    for i, value in enumerate(good[k] for k in sorted(good)):
        assert torch.all(dataset[i][0] == value)
    assert dataset.image_size == (8, 8)
    assert sorted(p.name for p, _ in dataset.skipped) == sorted(bad)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert f"skipped {len(bad)} of {len(bad) + len(good)} images of {tmp_path}" in lines[0]
    assert all(f"b/{name}" in lines[0] for name in bad)


def test_skip_bad_images_names_the_first_few_of_many(tmp_path, capsys):
    folder_with_bad_files(tmp_path, {f"bad{i:02d}.jpg": BAD_FILES["text.jpg"] for i in range(12)})
    dataset = load_dataset(str(tmp_path), skip_bad_images=True)
    assert len(dataset) == 4 and len(dataset.skipped) == 12
    line, = capsys.readouterr().err.splitlines()
    assert "skipped 12 of 16 images" in line and "b/bad00.jpg" in line and "b/bad11.jpg" not in line
    assert "and 7 more" in line


def test_skip_bad_images_skips_unsupported_modes(tmp_path, capsys):
    folder_with_bad_files(tmp_path, {})
    Image.fromarray(np.ones((8, 8), np.float32), mode="F").save(tmp_path / "a" / "float.tiff")
    dataset = load_dataset(str(tmp_path), skip_bad_images=True)
    assert len(dataset) == 4 and "a/float.tiff (32-bit floating-point" in capsys.readouterr().err


def test_skip_bad_images_is_silent_when_nothing_is_bad(tmp_path, capsys):
    folder_with_bad_files(tmp_path, {})
    assert len(load_dataset(str(tmp_path), skip_bad_images=True)) == 4
    assert capsys.readouterr().err == ""


def test_a_folder_of_only_bad_images_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(DataFileError, match=f"none of the 1 images of {tmp_path} can be read"):
        load_dataset(str(tmp_path), skip_bad_images=True)


def test_a_bad_image_met_while_filling_a_store_says_how_to_go_on(tmp_path):
    # The store keeps the batches written before the bad file; the data set it was made for is then gone (the file
    # removed, or skipped), so the same command with the images fixed needs --overwrite: the message says so.
    folder_with_bad_files(tmp_path / "pictures", {"text.jpg": BAD_FILES["text.jpg"]})
    model, store = helpers.tiny_model(), tmp_path / "store"
    options = dict(out=store, batch_size=2, progress=False, device="cpu")
    with pytest.raises(DataFileError, match=r"text\.jpg") as err:
        extract_patch_embeddings(model, load_dataset(str(tmp_path / "pictures"), image_size=8), central(), **options)
    message = str(err.value)
    assert "\n" not in message and f"the store {store}" in message and "--overwrite" in message
    (tmp_path / "pictures" / "b" / "text.jpg").unlink()
    fixed = load_dataset(str(tmp_path / "pictures"), image_size=8)
    with pytest.raises(ValueError, match="other settings"):
        extract_patch_embeddings(model, fixed, central(), **options)
    made = extract_patch_embeddings(model, fixed, central(), overwrite=True, **options)
    assert made.meta["complete"] and len(made.image_ids) == 4


def test_skip_bad_images_is_for_folders_only(tmp_path):
    with pytest.raises(ValueError, match=r"skip_bad_images.*image folders"):
        load_dataset("cifar10", "test", root=tmp_path, skip_bad_images=True)


def test_skip_bad_images_flag_reaches_the_loader(tmp_path, monkeypatch, capsys):
    folder_with_bad_files(tmp_path / "pictures", {"text.jpg": BAD_FILES["text.jpg"]})
    monkeypatch.setattr("ssl_patch_analysis.checkpoints.load_model", lambda *a, **k: "model")
    parser = argparse.ArgumentParser()
    cli.add_analysis_args(parser)
    args = parser.parse_args(["--data", str(tmp_path / "pictures"), "--device", "cpu"])
    assert args.skip_bad_images is False
    _, dataset, _ = cli.load_model_and_data(args)
    assert len(dataset) == 5
    args = parser.parse_args(["--data", str(tmp_path / "pictures"), "--device", "cpu", "--skip-bad-images"])
    _, dataset, _ = cli.load_model_and_data(args)
    assert len(dataset) == 4 and "b/text.jpg" in capsys.readouterr().err
