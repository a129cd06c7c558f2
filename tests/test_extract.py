"""Patch extraction: crops equal independent crops, stores equal in-memory runs, resume and ranks lose nothing."""
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision.transforms.functional as TF
from PIL import Image

from helpers import random_images, tiny_model
from ssl_patch_analysis import extract
from ssl_patch_analysis.checkpoints import save_checkpoint
from ssl_patch_analysis.data import ImageFolderDataset, TensorImageDataset
from ssl_patch_analysis.extract import (
    SlowBf16Warning,
    cpu_has_bf16,
    crop_patches,
    default_num_workers,
    extract_patch_embeddings,
    extraction_options,
)
from ssl_patch_analysis.models import (
    SSLModel,
)
from ssl_patch_analysis.patches import central, grid, random_fixed, random_resized
from ssl_patch_analysis.store import PatchEmbeddings, done_batches


def smooth_image(size: int = 64, period: float = 64.0) -> torch.Tensor:
    """3 x size x size in [0.25, 0.75], one slow wave per channel: bilinear variants nearly agree on it."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                          indexing="ij")
    channels = [0.5 + 0.25 * torch.sin(2 * math.pi * (x / period + c / 3))
                * torch.cos(2 * math.pi * (y / (1.3 * period) + c / 5)) for c in range(3)]
    return torch.stack(channels).float()


# ----------------------------------------------------------------------------- crops


def test_same_size_boxes_are_exact_pixel_slices():
    images = torch.rand(2, 3, 20, 24)
    boxes = torch.tensor([[[0, 0, 8, 8], [16, 12, 24, 20]], [[3, 5, 11, 13], [9, 1, 17, 9]]], dtype=torch.float32)
    crops = crop_patches(images, boxes, 8)
    assert crops.shape == (4, 3, 8, 8)
    for k, (x0, y0, x1, y1) in enumerate(boxes.reshape(-1, 4).long().tolist()):
        assert torch.equal(crops[k], images[k // 2, :, y0:y1, x0:x1])


def test_roi_align_convention_pixel_i_spans_i_to_i_plus_1():
    # A box shifted by half a pixel samples exactly halfway between two pixel centres.
    image = torch.rand(1, 3, 16, 16, dtype=torch.float32)
    crops = crop_patches(image, torch.tensor([[[2.5, 3.0, 10.5, 11.0]]]), 8)
    expected = (image[0, :, 3:11, 2:10] + image[0, :, 3:11, 3:11]) / 2
    assert torch.allclose(crops[0], expected, atol=1e-6)


def test_resized_crops_match_torchvision_resized_crop():
    image = smooth_image()
    boxes = torch.tensor([[[0, 0, 64, 64], [5, 7, 53, 55], [10, 3, 42, 35], [20, 30, 28, 38], [3, 9, 27, 49]]],
                         dtype=torch.float32)
    crops = crop_patches(image[None], boxes, 16)
    for k, (x0, y0, x1, y1) in enumerate(boxes[0].long().tolist()):
        expected = TF.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [16, 16], antialias=True)
        error = (crops[k] - expected).abs()
        # Both are bilinear with antialiasing, but roi_align averages ceil(box/16)^2 points per output
        # pixel (a box filter) where torchvision uses a triangle filter, and near the crop border it reads
        # the true neighbours where torchvision clamps to the crop. On this wave (|grad| <= 0.035/px,
        # |curvature| <= 0.001/px^2) that is at most about 0.01 at the border and 0.003 inside.
        assert error.max() < 0.012, (k, float(error.max()))
        assert error[:, 2:-2, 2:-2].max() < 0.004, (k, float(error[:, 2:-2, 2:-2].max()))


def test_shrinking_does_not_alias():
    # One-pixel checkerboard shrunk 4x: an antialiased resize gives flat grey; point sampling would keep
    # picking one colour.
    y, x = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    board = ((x + y) % 2).float().expand(3, 64, 64)
    boxes = torch.tensor([[[0, 0, 64, 64], [8, 8, 40, 40]]], dtype=torch.float32)
    crops = crop_patches(board[None].contiguous(), boxes, 16)
    assert torch.allclose(crops, torch.full_like(crops, 0.5), atol=1e-6)


# ----------------------------------------------------------------------------- embeddings


def test_embeddings_equal_the_model_on_independently_cut_patches():
    model = tiny_model()
    images = random_images(3)
    emb = extract_patch_embeddings(model, images, grid(16, 8), batch_size=2, chunk_size=5, resize_to=16,
                                   dtype="float32", progress=False)
    assert emb.h.shape == (3, 9, 64) and emb.z.shape == (3, 9, 16) and emb.labels.tolist() == [-1, -1, -1]
    patches = torch.stack([images[i, :, y:y + 16, x:x + 16] for i in range(3) for y in (0, 8, 16) for x in (0, 8, 16)])
    with torch.no_grad():
        expected = model(patches.float() / 255)
    assert np.allclose(emb.h.reshape(-1, 64), expected["h"].numpy(), rtol=1e-4, atol=1e-5)
    assert np.allclose(emb.z.reshape(-1, 16), expected["z"].numpy(), rtol=1e-4, atol=1e-5)
    assert np.array_equal(emb.boxes, grid(16, 8).boxes([0, 1, 2], (32, 32)).numpy())


def test_multiscale_embeddings_match_model_on_resized_crops():
    model = tiny_model()
    image = smooth_image(64)
    images = (image * 255).round().to(torch.uint8)[None]
    sampler = random_resized(6, scale=(0.2, 1.0), seed=3)
    emb = extract_patch_embeddings(model, images, sampler, dtype="float32", progress=False)
    pixels = images[0].float() / 255
    boxes = sampler.boxes([0], (64, 64))[0].long().tolist()
    crops = torch.stack([TF.resized_crop(pixels, y0, x0, y1 - y0, x1 - x0, [32, 32], antialias=True)
                         for x0, y0, x1, y1 in boxes])
    with torch.no_grad():
        expected = model(crops)["h"].numpy()
    got = emb.h[0]
    # The crops differ by <~0.01 of the pixel range (test above), so the embeddings nearly coincide;
    # embeddings of two different crops of the image are much further apart.
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    relative = np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.999 and relative.max() < 0.03, (cosine, relative)
    assert np.linalg.norm(got[0] - got[1]) / np.linalg.norm(got[1]) > 5 * relative.max()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_store_equals_in_memory_result(tmp_path, dtype):
    model, images = tiny_model(), random_images(10)
    sampler = random_fixed(4, 12, seed=1)
    memory = extract_patch_embeddings(model, images, sampler, batch_size=4, dtype="float32", progress=False)
    stored = extract_patch_embeddings(model, images, sampler, batch_size=4, dtype=dtype, progress=False,
                                      out=tmp_path / "s")
    reloaded = PatchEmbeddings.load(tmp_path / "s")
    for emb in (stored, reloaded):
        assert isinstance(emb.h, np.memmap) and emb.h.dtype == np.dtype(dtype)
        assert np.array_equal(emb.h, memory.h.astype(dtype)) and np.array_equal(emb.z, memory.z.astype(dtype))
        assert np.array_equal(emb.boxes, memory.boxes) and np.array_equal(emb.image_ids, np.arange(10))
    assert reloaded.meta["sampler"] == sampler.to_dict() and reloaded.meta["resize_to"] == 32
    assert reloaded.meta["model"]["method"] == "test" and reloaded.meta["dtype"] == dtype


def test_nan_pixels_and_nan_embeddings_stop_extraction_naming_the_image(tmp_path):
    # Was: an all-NaN store and a table of nan, exit 0.
    model = tiny_model()
    images = random_images(10).float() / 255
    images[6, 1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite pixels \(image 6 first, 1 images"):
        extract_patch_embeddings(model, images, grid(16), progress=False)
    # A model that turns one image's embedding into NaN: the batch holding it is not stored.
    clean = random_images(10)
    target = clean[7].float().div(255)

    def poison(module, inputs, output):
        hit = (inputs[0][:, :, :4, :4] - model.normalize_pixels(target[None])[:, :, :4, :4]).abs().flatten(1)
        output[hit.amax(dim=1) < 1e-5] = float("nan")
        return output

    model.backbone.register_forward_hook(poison)
    with pytest.raises(ValueError, match=r"the h embedding of image 7 holds NaN or infinity .*float32"):
        extract_patch_embeddings(model, clean, grid(32), batch_size=4, out=tmp_path / "s", progress=False)
    assert done_batches(tmp_path / "s").tolist() == [True, False, False]  # images 0-3 stored, 4-7 not


def test_complete_store_is_reused_and_other_settings_are_refused(tmp_path):
    model, images = tiny_model(projector=False), random_images(6)
    first = extract_patch_embeddings(model, images, grid(16), batch_size=4, out=tmp_path / "s", progress=False)
    assert first.layers == ["h"]
    embedded = []
    model.backbone.register_forward_hook(lambda module, inputs, output: embedded.append(len(output)))
    again = extract_patch_embeddings(model, images, grid(16), batch_size=4, out=tmp_path / "s", progress=False)
    assert sum(embedded) <= 1  # at most the one-patch probe of the output sizes; no image re-embedded
    assert np.array_equal(again.h, first.h)
    with pytest.raises(ValueError, match=r"different: sampler.*--overwrite"):
        extract_patch_embeddings(model, images, grid(8), out=tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match=r"different: model_sha256"):
        extract_patch_embeddings(tiny_model(seed=1, projector=False), images, grid(16), out=tmp_path / "s",
                                 progress=False)
    replaced = extract_patch_embeddings(model, images, grid(8), out=tmp_path / "s", overwrite=True, progress=False)
    assert replaced.h.shape == (6, 16, 64)



def test_a_refused_store_blames_the_images_only_when_nothing_else_differs(tmp_path):
    # was: asked for other images (image_ids), the refusal said "the images' pixels changed since the store was made"
    model, images = tiny_model(projector=False), random_images(6)
    extract_patch_embeddings(model, images, grid(16), batch_size=4, image_ids=[0, 1, 2], out=tmp_path / "s",
                             progress=False)
    with pytest.raises(ValueError, match=r"different: dataset, image_ids_sha256\); choose another --store") as other:
        extract_patch_embeddings(model, images, grid(16), batch_size=4, image_ids=[0, 1, 2, 3], out=tmp_path / "s",
                                 progress=False)
    assert "changed since" not in str(other.value)
    changed = images.clone()
    changed[1] = 255 - changed[1]
    with pytest.raises(ValueError, match=r"different: dataset\) \(the images' pixels changed since the store was "
                                         r"made\); choose another --store"):
        extract_patch_embeddings(model, changed, grid(16), batch_size=4, image_ids=[0, 1, 2], out=tmp_path / "s",
                                 progress=False)


def test_a_store_that_failed_before_its_first_batch_is_replaced_by_other_settings(tmp_path, capsys):
    # Was: a start that failed at once (out of memory at a huge --resize-to, a bad first image) left a store that
    # refused the corrected command ("made with other settings"). It holds nothing, so it is replaced, said on stderr;
    # a store with a finished batch is still only replaced with overwrite=True.
    model, images = tiny_model(projector=False), random_images(6)

    def failing_after(passes):
        calls = []

        def hook(*_):
            calls.append(1)
            if len(calls) > passes:
                raise MemoryError("simulated")
        return hook

    hook = model.backbone.register_forward_hook(failing_after(1))  # the probe of the output sizes, then the batch
    with pytest.raises(MemoryError):
        extract_patch_embeddings(model, images, grid(16), batch_size=4, out=tmp_path / "s", progress=False)
    hook.remove()
    assert (tmp_path / "s" / "meta.json").is_file()
    made = extract_patch_embeddings(model, images, grid(8), batch_size=4, out=tmp_path / "s", progress=False)
    assert made.h.shape == (6, 16, 64) and made.meta["complete"]
    assert "holds no finished batch" in capsys.readouterr().err

    hook = model.backbone.register_forward_hook(failing_after(2))  # the probe, the first batch, then the second
    with pytest.raises(MemoryError):
        extract_patch_embeddings(model, images, grid(16), batch_size=4, out=tmp_path / "t", progress=False)
    hook.remove()
    with pytest.raises(ValueError, match=r"different: sampler.*--overwrite"):
        extract_patch_embeddings(model, images, grid(8), batch_size=4, out=tmp_path / "t", progress=False)


def test_cuda_out_of_memory_halves_the_chunk_and_changes_nothing():
    class FailsOnLargeChunks(SSLModel):
        def forward(self, x):
            if len(x) > 8:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().forward(x)

    reference = tiny_model()
    model = FailsOnLargeChunks(reference.backbone, reference.projector, preprocess=reference.preprocess,
                               info=reference.info)
    images = random_images(4)
    expected = extract_patch_embeddings(reference, images, grid(16, 8), chunk_size=6, dtype="float32", progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = extract_patch_embeddings(model, images, grid(16, 8), chunk_size=64, dtype="float32", progress=False)
    messages = [str(w.message) for w in caught if "out of memory" in str(w.message)]
    assert len(messages) == 1, messages  # said once, although the chunk was halved three times (64 -> 8)
    assert np.allclose(got.h, expected.h, rtol=1e-5, atol=1e-6)

    calls = []

    def fails_after_the_probe(x):  # the first pass (one blank patch) reads the layers' sizes
        calls.append(len(x))
        if len(calls) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return SSLModel.forward(model, x)

    model.forward = fails_after_the_probe
    with pytest.raises(RuntimeError, match="out of memory embedding a single patch: use a smaller --resize-to"), \
            pytest.warns(RuntimeWarning, match="out of memory"):
        extract_patch_embeddings(model, images, grid(16, 8), chunk_size=64, dtype="float32", progress=False)


@pytest.mark.slow  # torch.compile
def test_compiled_and_bf16_runs_agree_with_float32():
    model, images = tiny_model(), random_images(3)
    # 27 patches in chunks of 10: the last chunk (7) is padded to the compiled shape and cut back.
    options = dict(chunk_size=10, dtype="float32", progress=False)
    eager = extract_patch_embeddings(model, images, grid(16, 8), **options)
    compiled = extract_patch_embeddings(model, images, grid(16, 8), compile=True, **options)
    assert compiled.h.shape == eager.h.shape == (3, 9, 64)
    assert np.allclose(compiled.h, eager.h, rtol=1e-3, atol=1e-4) and np.allclose(compiled.z, eager.z, rtol=1e-3,
                                                                                   atol=1e-4)
    bf16 = extract_patch_embeddings(model, images, grid(16, 8), amp=True, compile=True, **options)
    assert eager.meta["precision"] == "float32" and bf16.meta["precision"] == "bfloat16"
    assert bf16.meta["last_run"]["compile"] is True
    got, want = bf16.h.reshape(27, -1), eager.h.reshape(27, -1)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.99, cosine.min()
    # bf16 is not float32: the difference is real, so the precision is part of what a store records
    assert not np.allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # torch.compile
def test_compile_never_serves_a_graph_of_old_weights():
    # Compiled graphs hold the weights as constants; after the weights change the extractor must
    # compile again rather than reuse torch.compile's cached graph for the same module.
    model, images = tiny_model(), random_images(2)
    options = dict(chunk_size=8, dtype="float32", progress=False)
    before = extract_patch_embeddings(model, images, grid(16, 8), compile=True, **options)
    with torch.no_grad():
        model.projector[0].weight.mul_(-1)
    after = extract_patch_embeddings(model, images, grid(16, 8), compile=True, **options)
    eager = extract_patch_embeddings(model, images, grid(16, 8), **options)
    assert np.allclose(after.h, before.h, rtol=1e-3, atol=1e-4)  # the backbone did not change
    assert np.allclose(after.z, eager.z, rtol=1e-3, atol=1e-4)
    assert not np.allclose(after.z, before.z, rtol=1e-2, atol=1e-3)


def test_store_of_another_precision_is_not_resumed(tmp_path):
    model, images = tiny_model(projector=False), random_images(4)
    extract_patch_embeddings(model, images, grid(16), out=tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match=r"different: precision"):
        extract_patch_embeddings(model, images, grid(16), out=tmp_path / "s", amp=True, progress=False)


def test_extraction_options_set_defaults_inside_the_block_only():
    model, images = tiny_model(projector=False), random_images(2)

    def precision(**kwargs):
        return extract_patch_embeddings(model, images, grid(16), progress=False, **kwargs).meta["precision"]

    with extraction_options(amp=True):
        assert precision() == "bfloat16"
        assert precision(amp=False) == "float32"  # an explicit argument wins
        with extraction_options(compile=None):  # None keeps the enclosing default
            assert precision() == "bfloat16"
        with extraction_options(amp=False):
            assert precision() == "float32"
    assert precision() == "float32"


def test_cpu_defaults():
    assert default_num_workers(torch.device("cpu")) == 0  # workers would only compete with the forward pass
    assert default_num_workers(torch.device("cuda")) == min(4, os.cpu_count() or 1)
    assert isinstance(cpu_has_bf16(), bool)


@pytest.mark.parametrize("has_bf16_units", [False, True])
def test_bf16_on_a_cpu_without_bf16_units_runs_with_one_warning(monkeypatch, has_bf16_units):
    """amp=True on a CPU that emulates bf16 (several times slower than float32) still gives bf16 embeddings, with a
    warning that says to leave --amp out; a CPU with bf16 units, or float32, gives none."""
    monkeypatch.setattr(extract, "cpu_has_bf16", lambda: has_bf16_units)
    model, images = tiny_model(projector=False), random_images(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embeddings = extract_patch_embeddings(model, images, grid(16), amp=True, progress=False)
        extract_patch_embeddings(model, images, grid(16), amp=False, progress=False)
        with extraction_options(amp=True):  # how the command lines pass --amp
            extract_patch_embeddings(model, images, grid(16), progress=False)
    assert embeddings.meta["precision"] == "bfloat16"
    slow = [w for w in caught if issubclass(w.category, SlowBf16Warning)]
    if has_bf16_units:
        assert slow == []
    else:
        assert len(slow) == 2 and all("leave out --amp" in str(w.message) for w in slow)
        assert {w.filename for w in slow} == {__file__}  # the user's line, not the package's


# ----------------------------------------------------------------------------- bad input


def test_bad_images_are_explained():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"N x 3 x H x W.*permute"):
        extract_patch_embeddings(model, torch.zeros(2, 32, 32, 3, dtype=torch.uint8), grid(8), progress=False)
    with pytest.raises(ValueError, match=r"N x 3 x H x W"):
        extract_patch_embeddings(model, torch.zeros(3, 32, 32, dtype=torch.uint8), grid(8), progress=False)
    with pytest.raises(ValueError, match=r"uint8 \(0..255\) or float"):
        extract_patch_embeddings(model, torch.zeros(2, 3, 32, 32, dtype=torch.int32), grid(8), progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\].*divide by 255"):
        extract_patch_embeddings(model, torch.full((2, 3, 32, 32), 255.0), grid(8), progress=False)
    with pytest.raises(ValueError, match="does not fit"):
        extract_patch_embeddings(model, random_images(2), grid(40), progress=False)
    with pytest.raises(ValueError, match=r"image_ids must lie in 0..1"):
        extract_patch_embeddings(model, random_images(2), grid(8), image_ids=[0, 2], progress=False)


@pytest.mark.parametrize("sampler", [central(40), grid(40), random_fixed(2, 40)])
def test_a_patch_that_does_not_fit_leaves_no_store(tmp_path, sampler):
    # Was: the store was created first, so the corrected command was refused ("made with other settings").
    model, images = tiny_model(), random_images(2)
    with pytest.raises(ValueError, match="does not fit"):
        extract_patch_embeddings(model, images, sampler, out=tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
    extract_patch_embeddings(model, images, central(16), out=tmp_path / "store", progress=False)
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError, match="does not fit"):  # --overwrite of a store: nothing built beside it either
        extract_patch_embeddings(model, images, sampler, out=tmp_path / "store", overwrite=True, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kept", "store"]
    assert not [path for path in (tmp_path / "store").iterdir() if path.name.endswith(".new")]
    with pytest.raises(ValueError, match=r"layers must .*\(h, z\)"):
        extract_patch_embeddings(model, random_images(2), grid(8), layers=["h", "pre_feature"], progress=False)


def test_images_of_mixed_sizes_ask_for_image_size(tmp_path):
    for name, size in (("a", (40, 30)), ("b", (32, 32))):
        (tmp_path / "cls").mkdir(exist_ok=True)
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / "cls" / f"{name}.png")
    with pytest.raises(ValueError, match=r"vary in size.*image_size"):
        extract_patch_embeddings(tiny_model(), ImageFolderDataset(tmp_path), grid(8), progress=False)
    same_size = ImageFolderDataset(tmp_path, image_size=24)
    emb = extract_patch_embeddings(tiny_model(), same_size, grid(8), progress=False, num_workers=0)
    assert emb.h.shape == (2, 9, 64) and emb.labels.tolist() == [0, 0]


# ----------------------------------------------------------------------------- resume, ranks, CLI


@pytest.mark.slow  # SIGKILL of a command-line run
def test_killed_cli_run_resumes_to_the_uninterrupted_result(tmp_path, cifar10_npz):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model(), checkpoint)
    num_images, batch_size = 240, 4
    num_batches = num_images // batch_size

    def command(out):
        return [sys.executable, "-m", "ssl_patch_analysis.extract", "--model", str(checkpoint), "--data", "cifar10",
                "--data-root", str(cifar10_npz.parent), "--grid", "8", "--stride", "4", "--num-images",
                str(num_images), "--batch-size", str(batch_size), "--device", "cpu", "--store", str(out)]

    # One thread each: the two final runs share the CPUs, and compute bit-identical numbers.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "store"
    victim = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    written = 0
    while time.monotonic() < deadline and victim.poll() is None and written < 3:
        try:
            written = int(done_batches(out).sum())
        except (FileNotFoundError, ValueError, OSError):
            written = 0  # the store is not created yet
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert 3 <= written < num_batches, f"could not interrupt the run part-way ({written} batches written)"
    with pytest.raises(RuntimeError, match="re-run the same extract command"):
        PatchEmbeddings.load(out)

    resumed = subprocess.Popen(command(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fresh = subprocess.Popen(command(tmp_path / "fresh"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    # a guard against a hang only: on 2 busy cores (beside a training run) the two runs took over 120 s
    (resumed_out, resumed_err), (_, fresh_err) = resumed.communicate(timeout=600), fresh.communicate(timeout=600)
    assert resumed.returncode == 0, resumed_err
    assert fresh.returncode == 0, fresh_err
    already = int(resumed_err.split("resuming")[1].split(":")[1].split("of")[0])
    assert written <= already < num_batches
    assert f"h: ({num_images}, 49, 64) float16" in resumed_out and f"z: ({num_images}, 49, 16)" in resumed_out

    got, want = PatchEmbeddings.load(out), PatchEmbeddings.load(tmp_path / "fresh")
    assert np.array_equal(got.image_ids, np.arange(num_images)) and np.array_equal(got.labels, want.labels)
    assert np.array_equal(got.boxes, want.boxes)
    assert np.array_equal(got.h, want.h) and np.array_equal(got.z, want.z)
    assert len(np.unique(got.h.reshape(num_images, -1), axis=0)) == num_images  # no row written twice or left empty
    # the command that completed it, as typed (python -m runs the module as __main__: still named by its own name)
    assert got.meta["last_run"]["command"] == "python -m " + shlex.join(command(out)[2:])


def _rank_worker(rank: int, world_size: int, rendezvous: str, weights: str, images: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        model = tiny_model()
        model.load_state_dict(torch.load(weights, weights_only=True))
        data = torch.load(images, weights_only=True)
        dataset = TensorImageDataset(data["images"], data["labels"], [str(c) for c in range(10)], name="synthetic")
        extract_patch_embeddings(model, dataset, grid(16, 8), batch_size=4, dtype="float32", out=out,
                                 progress=False, device="cpu")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes
def test_two_gloo_ranks_write_one_store_equal_to_a_single_process(tmp_path):
    model = tiny_model(seed=5)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    images, labels = random_images(18, seed=2), torch.arange(18) % 10
    torch.save({"images": images, "labels": labels}, tmp_path / "images.pt")
    out = tmp_path / "ranks"
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path / "weights.pt"), str(tmp_path / "images.pt"),
                                 str(out)), nprocs=2, join=True)
    dataset = TensorImageDataset(images, labels, [str(c) for c in range(10)], name="synthetic")
    single = extract_patch_embeddings(model, dataset, grid(16, 8), batch_size=4, dtype="float32", progress=False)
    shared = PatchEmbeddings.load(out)
    assert shared.meta["last_run"]["world_size"] == 2
    # Batches 0..4 (the last one short), dealt out in turn: each rank wrote its own.
    assert done_batches(out, rank=0).tolist() == [True, False, True, False, True]
    assert done_batches(out, rank=1).tolist() == [False, True, False, True, False]
    assert np.array_equal(shared.image_ids, single.image_ids) and np.array_equal(shared.labels, labels.numpy())
    assert np.array_equal(shared.boxes, single.boxes)
    # Each rank ran one thread, this process may run two: equal up to float32 summation order.
    assert np.allclose(shared.h, single.h, rtol=1e-5, atol=1e-6)
    assert np.allclose(shared.z, single.z, rtol=1e-5, atol=1e-6)


def test_no_progress_silences_the_extraction_bar_and_the_store_records_its_command(tmp_path, cifar10_npz, capsys):
    # extract had no --no-progress (every other command has it)
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model(), checkpoint)
    argv = ["--model", str(checkpoint), "--data-root", str(cifar10_npz.parent), "--device", "cpu", "--grid", "16",
            "--num-images", "4", "--batch-size", "2"]
    extract.main([*argv, "--store", str(tmp_path / "quiet"), "--no-progress"])
    assert "img/s" not in capsys.readouterr().err
    extract.main([*argv, "--store", str(tmp_path / "shown")])
    assert "img" in capsys.readouterr().err
    quiet = PatchEmbeddings.load(tmp_path / "quiet")
    shown = PatchEmbeddings.load(tmp_path / "shown")
    assert np.array_equal(np.asarray(quiet.layer("h")), np.asarray(shown.layer("h")))
    # the store records the command line that wrote it (it had none: "re-run the command that made it" named none)
    assert shown.meta["last_run"]["command"] == "python -m ssl_patch_analysis.extract " + " ".join(
        [*argv, "--store", str(tmp_path / "shown")])
    in_python = extract_patch_embeddings(tiny_model(), torch.rand(2, 3, 32, 32), grid(16), out=tmp_path / "api",
                                         progress=False)
    assert "command" not in in_python.meta["last_run"]  # a Python caller: no command line to record
    in_memory = extract_patch_embeddings(tiny_model(), torch.rand(2, 3, 32, 32), grid(16), progress=False)
    assert "command" not in in_memory.meta["last_run"]  # only a store records it (analyses record their own)
