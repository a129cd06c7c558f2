"""A ViT's tokens and its class token for aggregation convergence: one forward pass per image vs two.

``convergence --tokens`` compares the mean of N patch tokens of each image with the class token of the
same block. Side by side on the same images, each the median of ``--repeats`` timed runs after one
untimed warm-up:
  (a) two passes  - ``extract_token_embeddings`` (float32, in memory) then ``whole_image_embeddings``:
                    what ``convergence --tokens`` ran before, and what a user calling the two runs;
  (b) one pass    - ``tokens_and_whole_image_embeddings``: both from one forward pass per image (what
                    ``convergence --tokens`` runs now);
  (c) bare pass   - ``backbone.embed_tokens`` on images already resized and normalised in memory, in the
                    same chunks: the ceiling for (b) (no decoding, resizing, heads or copies).
Images per second; (b) and (a) must give the same numbers (the largest difference is printed).

    python benchmarks/tokens.py --data-root ../shared/data          # CPU: the shipped ViT-Tiny/4 on CIFAR-10
    python benchmarks/tokens.py --device cuda --scale 8              # a GPU: 8x the images
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from ssl_patch_analysis.checkpoints import load_model
from ssl_patch_analysis.data import load_dataset
from ssl_patch_analysis.extract import (
    _autocast_dtype,
    _crop,
    cpu_has_bf16,
    default_chunk_size,
    extract_token_embeddings,
    tokens_and_whole_image_embeddings,
    whole_image_embeddings,
)


def random_vit_small(folder: str):
    """A random-init ViT-S/16 at 224 px in DINO's raw layout (timm's weights, no head): DINO's usual size."""
    import timm

    path = os.path.join(folder, "dino_deitsmall16_pretrain.pth")
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).state_dict(), path)
    return load_model(path, verbose=False)


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: first-call allocations, oneDNN kernel selection
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run_setup(name: str, model, data, num_images: int, device: torch.device, amp: bool, repeats: int) -> dict:
    ids = np.arange(num_images)
    size = int(model.preprocess.input_size)
    chunk = default_chunk_size(size, device)
    options = dict(image_ids=ids, device=device, amp=amp)

    def two_passes():
        tokens = extract_token_embeddings(model, data, dtype="float32", progress=False, **options)
        return tokens.h, whole_image_embeddings(model, data, layers=["h"], **options)["h"]

    def one_pass():
        tokens, whole = tokens_and_whole_image_embeddings(model, data, layers=["h"], progress=False, **options)
        return tokens["h"], whole["h"]

    model.eval().to(device)
    pixels = data.get_batch(list(ids)).float().div(255).to(device)
    height, width = pixels.shape[-2:]
    frame = torch.tensor([0.0, 0.0, float(width), float(height)], device=device).expand(num_images, 4)
    with torch.inference_mode():
        images = pixels if height == width == size else _crop(pixels, frame, torch.arange(num_images, device=device),
                                                               size, False)
        images = model.normalize_pixels(images)
    dtype = _autocast_dtype(device, amp)

    def bare():
        autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        with torch.inference_mode(), autocast:
            for start in range(0, num_images, chunk):
                model.backbone.embed_tokens(images[start:start + chunk])
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a, (tokens_a, whole_a) = timed(two_passes, repeats)
    b, (tokens_b, whole_b) = timed(one_pass, repeats)
    c, _ = timed(bare, repeats)
    difference = max(float(np.abs(tokens_a - tokens_b).max()), float(np.abs(whole_a - whole_b).max()))
    return {"setup": name, "mode": str(dtype).removeprefix("torch.") if dtype else "float32", "images": num_images,
            "a": num_images / a, "b": num_images / b, "c": num_images / c, "difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--scale", type=int, default=1, help="multiply the number of images (use >1 on a GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is reported")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (the extractor's default on CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    amp = args.amp or device.type == "cuda"
    rows = [run_setup("CIFAR-10 test, 32 px, shipped ViT-Tiny/4 (vicreg-vit), 8x8 tokens",
                      load_model("vicreg-vit", verbose=False), load_dataset("cifar10", "test", root=args.data_root),
                      256 * args.scale, device, amp, args.repeats)]
    with tempfile.TemporaryDirectory() as folder:
        rows.append(run_setup("Imagenette val, 224 px, random-init ViT-S/16, 14x14 tokens", random_vit_small(folder),
                              load_dataset("imagenette", "val", root=args.data_root), 16 * args.scale, device, amp,
                              args.repeats))
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads, "
             f"bf16 matrix units (AMX/AVX512-BF16): {'yes' if cpu_has_bf16() else 'no'}")
    print(f"device: {where}; torch {torch.__version__}")
    print("| set-up | mode | images | (a) two passes img/s | (b) one pass img/s | (c) bare pass img/s | (b)/(a) "
          "| (b)/(c) | max abs difference (a) vs (b) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setup']} | {r['mode']} | {r['images']} | {r['a']:.1f} | {r['b']:.1f} | {r['c']:.1f} "
              f"| {r['b'] / r['a']:.2f} | {r['b'] / r['c']:.2f} | {r['difference']:.1e} |")


if __name__ == "__main__":
    main()
