"""Patch-embedding throughput: naive hand-written loop vs the extractor vs the bare forward pass.

Same images, same boxes, same model for all three:
  (a) naive   - per image, per patch: PIL crop + resize + to_tensor, one float32 forward per image
                (the loop a user writes, on its own copy of the model in PyTorch's default layout);
  (b) extract - ssl_patch_analysis.extract.extract_patch_embeddings (roi_align on the device, chunked);
  (c) forward - the model's forward pass alone on ready tensors of the same shape, with the
                extractor's settings (the ceiling).
(b) and (c) run once per mode: the extractor's default ("float32" on a CPU, "bf16" autocast on
CUDA), on a CPU "bf16" (amp=True: --amp, emulated and slow on a CPU without bf16 units) and
"bf16+compile" (amp=True, compile=True: bf16 autocast and torch.compile, --amp --compile on the
command line). "min cos (b)~(a)" is the smallest cosine similarity between the extractor's and
the naive loop's embedding of the same patch (interpolation and precision differences).
Prints one table: patches/s for each, (b)/(a) and (b)/(c).

    python benchmarks/extract.py                      # CPU, both set-ups, every mode
    python benchmarks/extract.py --device cuda --scale 5 --repeats 5
    python benchmarks/extract.py --setups cifar --repeats 1   # the CIFAR set-up alone
"""
from __future__ import annotations

import argparse
import copy
import functools
import platform
import time

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ssl_patch_analysis.data import load_dataset
from ssl_patch_analysis.extract import (
    _autocast_dtype,
    _Embedder,
    cpu_has_bf16,
    default_chunk_size,
    extract_patch_embeddings,
)
from ssl_patch_analysis.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ModelInfo,
    Preprocess,
    SSLModel,
    build_backbone,
)
from ssl_patch_analysis.patches import grid

# The extractor's default on the device, then its fastest settings.
MODES = {
    "cpu": {"float32": dict(amp=False, compile=False), "bf16": dict(amp=True, compile=False),
            "bf16+compile": dict(amp=True, compile=True)},
    "cuda": {"bf16": dict(amp=True, compile=False), "bf16+compile": dict(amp=True, compile=True)},
}


def make_model(arch: str, stem: str, images_uint8: torch.Tensor) -> SSLModel:
    """A randomly initialised network whose BatchNorm statistics are calibrated on real images.

    With the initial statistics (mean 0, variance 1) activations of a random ResNet drift into
    subnormal floats, which run slowly on a CPU and would make every timing meaningless (RESULTS.md,
    "Numbers quoted in the code").
    """
    torch.manual_seed(0)
    backbone, dim = build_backbone(arch, stem=stem)
    size = images_uint8.shape[-1]
    pre = Preprocess(input_size=size, mean=CIFAR10_MEAN, std=CIFAR10_STD) if stem == "cifar" else Preprocess()
    model = SSLModel(backbone, preprocess=pre, info=ModelInfo(arch=arch, stem=stem, embedding_dim=dim))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for batch in images_uint8.split(16):
            model(batch.float() / 255)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive(model, images_uint8, boxes, size, device) -> torch.Tensor:
    outputs = []
    with torch.inference_mode():
        for image, image_boxes in zip(images_uint8, boxes, strict=True):
            pil = Image.fromarray(image.permute(1, 2, 0).numpy())
            crops = [TF.to_tensor(pil.crop(tuple(int(v) for v in b)).resize((size, size), Image.BILINEAR))
                     for b in image_boxes.tolist()]
            outputs.append(model.embed(torch.stack(crops).to(device)))
    sync(device)
    return torch.cat(outputs).float().cpu()


def forward_only(embedder: _Embedder, num_patches, size, device) -> None:
    """The extractor's own forward (channels_last, autocast, compiled or not) on ready patches."""
    chunk = embedder.chunk_size
    x = torch.rand(chunk, 3, size, size, device=device)
    with torch.inference_mode():
        done = 0
        while done < num_patches:
            n = min(chunk, num_patches - done)
            embedder.forward(x[:n])
            done += n
    sync(device)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).min())


def run_setup(name, data, model, sampler, num_images, device, repeats):
    ids = list(range(num_images))
    size = model.preprocess.input_size
    chunk = default_chunk_size(size, device)
    images = data.get_batch(ids)
    boxes = sampler.boxes(ids, data.image_size)
    patches = boxes.shape[0] * boxes.shape[1]
    # The hand-written loop gets its own copy: the extractor switches its model to channels_last.
    user_model = copy.deepcopy(model).to(device)
    model = model.to(device)

    naive(user_model, images[:2], boxes[:2], size, device)  # warm-up
    t_naive = median_time(lambda: naive(user_model, images, boxes, size, device), repeats)
    reference = naive(user_model, images, boxes, size, device)
    rows = []
    for mode, options in MODES[device.type].items():
        def extract(options: dict = options):  # bound now: timed within this iteration
            result = extract_patch_embeddings(model, data, sampler, image_ids=ids, chunk_size=chunk, device=device,
                                              progress=False, layers=["h"], dtype="float32", **options)
            sync(device)
            return result

        # warm-up: allocator growth, kernel selection, and for compile=True the compilation itself
        extract_patch_embeddings(model, data, sampler, image_ids=ids[: max(1, num_images // 8)], chunk_size=chunk,
                                 device=device, progress=False, layers=["h"], **options)
        t_extract = median_time(extract, repeats)
        agreement = min_cosine(torch.from_numpy(extract().h.reshape(patches, -1)), reference)
        embedder = _Embedder(model, device, ["h"], chunk, _autocast_dtype(device, options["amp"]), options["compile"])
        forward_only(embedder, chunk, size, device)  # warm-up (compiles)
        t_forward = median_time(functools.partial(forward_only, embedder, patches, size, device), repeats)
        rows.append({
            "setup": name, "mode": mode, "patches": patches, "chunk": chunk, "naive": patches / t_naive,
            "extract": patches / t_extract, "forward": patches / t_forward, "cos": agreement,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=int, default=1, help="multiply the number of images (use >1 on a GPU)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is reported")
    parser.add_argument("--setups", default="cifar,imagenette",
                        help="comma-separated set-ups to run: cifar (ResNet-18, 32 px), imagenette (ResNet-50, 224 px)")
    args = parser.parse_args()
    setups = {name.strip() for name in args.setups.split(",") if name.strip()}
    if not setups or not setups <= {"cifar", "imagenette"}:
        parser.error(f"--setups takes cifar and/or imagenette, got {args.setups!r}")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True

    rows = []
    if "cifar" in setups:
        cifar = load_dataset("cifar10", "test", root=args.data_root)
        rows.extend(run_setup("CIFAR-10 (JPEG copy) test, 32 px, CIFAR ResNet-18, grid 16/4 -> 32 px",
                              cifar, make_model("resnet18", "cifar", cifar.get_batch(range(64))), grid(16, 4),
                              128 * args.scale, device, args.repeats))
    if "imagenette" in setups:
        imagenette = load_dataset("imagenette", "val", root=args.data_root)
        rows.extend(run_setup("Imagenette val, 224 px, ResNet-50, grid 112/56 -> 224 px",
                              imagenette, make_model("resnet50", "imagenet", imagenette.get_batch(range(32))),
                              grid(112, 56),
                              64 * args.scale, device, args.repeats))

    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads, "
             f"bf16 matrix units (AMX/AVX512-BF16): {'yes' if cpu_has_bf16() else 'no'}")
    print(f"device: {where}; torch {torch.__version__}")
    print("| set-up | mode | patches | chunk | (a) naive p/s | (b) extract p/s | (c) forward p/s | (b)/(a) | (b)/(c) "
          "| min cos (b)~(a) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setup']} | {r['mode']} | {r['patches']} | {r['chunk']} | {r['naive']:.1f} | {r['extract']:.1f} "
              f"| {r['forward']:.1f} | {r['extract'] / r['naive']:.2f} | {r['extract'] / r['forward']:.2f} "
              f"| {r['cos']:.4f} |")


if __name__ == "__main__":
    main()
