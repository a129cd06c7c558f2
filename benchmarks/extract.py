"""Patch-embedding throughput: naive hand-written loop vs the extractor vs the bare forward pass.

Same images, same boxes, same model for all three:
  (a) naive   - per image, per patch: PIL crop + resize + to_tensor, one forward per image;
  (b) extract - ssl_patch_analysis.extract.extract_patch_embeddings (roi_align on the device, chunked);
  (c) forward - the model's forward pass alone on ready tensors of the same shape (the ceiling).
Prints one table: patches/s for each, (b)/(a) and (b)/(c).

    python benchmarks/extract.py                      # CPU, both set-ups
    python benchmarks/extract.py --device cuda --scale 20
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ssl_patch_analysis.data import load_dataset
from ssl_patch_analysis.extract import default_chunk_size, extract_patch_embeddings
from ssl_patch_analysis.models import (
    CIFAR10_MEAN, CIFAR10_STD, ModelInfo, Preprocess, SSLModel, build_backbone,
)
from ssl_patch_analysis.patches import grid


def make_model(arch: str, stem: str, images_uint8: torch.Tensor) -> SSLModel:
    """A randomly initialised network whose BatchNorm statistics are calibrated on real images.

    With the initial statistics (mean 0, variance 1) activations of a random ResNet drift into
    subnormal floats, which run 50-100x slower on a CPU and would make every timing meaningless.
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


def naive(model, images_uint8, boxes, size, device) -> None:
    with torch.inference_mode():
        for image, image_boxes in zip(images_uint8, boxes):
            pil = Image.fromarray(image.permute(1, 2, 0).numpy())
            crops = [TF.to_tensor(pil.crop(tuple(int(v) for v in b)).resize((size, size), Image.BILINEAR))
                     for b in image_boxes.tolist()]
            model.embed(torch.stack(crops).to(device))
    sync(device)


def forward_only(model, num_patches, size, chunk, device) -> None:
    # the extractor's own settings: channels_last and bf16 autocast on CUDA, plain float32 on the CPU
    x = torch.rand(chunk, 3, size, size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), amp:
        done = 0
        while done < num_patches:
            n = min(chunk, num_patches - done)
            model(x[:n])
            done += n
    sync(device)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_setup(name, data, model, sampler, num_images, device, repeats):
    ids = list(range(num_images))
    size = model.preprocess.input_size
    chunk = default_chunk_size(size, device)
    images = data.get_batch(ids)
    boxes = sampler.boxes(ids, data.image_size)
    patches = boxes.shape[0] * boxes.shape[1]
    model = model.to(device)

    def extract():
        extract_patch_embeddings(model, data, sampler, image_ids=ids, chunk_size=chunk, device=device,
                                 progress=False)
        sync(device)

    # warm-up: the first calls pay for allocator growth and kernel selection
    extract_patch_embeddings(model, data, sampler, image_ids=ids[: max(1, num_images // 8)], chunk_size=chunk,
                             device=device, progress=False)
    forward_only(model, chunk, size, chunk, device)
    t_naive = median_time(lambda: naive(model, images, boxes, size, device), repeats)
    t_extract = median_time(extract, repeats)
    t_forward = median_time(lambda: forward_only(model, patches, size, chunk, device), repeats)
    return {
        "setup": name, "patches": patches, "chunk": chunk,
        "naive": patches / t_naive, "extract": patches / t_extract, "forward": patches / t_forward,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=int, default=1, help="multiply the number of images (use >1 on a GPU)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is reported")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True

    rows = []
    cifar = load_dataset("cifar10", "test", root=args.data_root)
    rows.append(run_setup("CIFAR-10 (JPEG copy) test, 32 px, CIFAR ResNet-18, grid 16/4 -> 32 px",
                          cifar, make_model("resnet18", "cifar", cifar.get_batch(range(64))), grid(16, 4),
                          64 * args.scale, device, args.repeats))
    imagenette = load_dataset("imagenette", "val", root=args.data_root)
    rows.append(run_setup("Imagenette val, 224 px, ResNet-50, grid 112/56 -> 224 px",
                          imagenette, make_model("resnet50", "imagenet", imagenette.get_batch(range(32))), grid(112, 56),
                          8 * args.scale, device, args.repeats))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}")
    print(f"| set-up | patches | chunk | (a) naive p/s | (b) extract p/s | (c) forward p/s | (b)/(a) | (b)/(c) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setup']} | {r['patches']} | {r['chunk']} | {r['naive']:.1f} | {r['extract']:.1f} | {r['forward']:.1f} "
              f"| {r['extract'] / r['naive']:.2f} | {r['extract'] / r['forward']:.2f} |")


if __name__ == "__main__":
    main()
