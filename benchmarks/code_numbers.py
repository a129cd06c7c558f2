"""Re-measure the timings that code comments rely on (benchmarks/RESULTS.md, "Numbers quoted in the code").

Process CPU time, the best of a few runs: a shared machine's load inflates it far less than wall time.

    python benchmarks/code_numbers.py [--data-root ../shared/data]
"""
from __future__ import annotations

import argparse
import functools
import io
import subprocess
import sys
import time
import zlib
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ssl_patch_analysis.data import default_data_root
from ssl_patch_analysis.models import build_backbone


def cpu_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return min(times)


def crc32_of_cifar10_train() -> None:
    images = np.random.default_rng(0).integers(0, 256, (50000, 3, 32, 32), dtype=np.uint8)
    seconds = cpu_seconds(lambda: zlib.crc32(images), repeats=5)
    print(f"data._checksum: zlib.crc32 of {images.nbytes / 1e6:.1f} MB: {seconds:.3f} s "
          f"({images.nbytes / seconds / 1e9:.1f} GB/s)")


def imagenette_jpegs(root: str) -> None:
    with np.load(f"{root}/imagenette_jpeg.npz") as archive:
        jpeg, offsets = archive["val_jpeg"], archive["val_offsets"]
    files = [jpeg[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]
    seconds = cpu_seconds(lambda: [np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in files[:200]])
    print(f"data (docstring): Pillow decode of a 224 px Imagenette JPEG: {seconds / 200 * 1000:.2f} ms")
    seconds = cpu_seconds(lambda: [Image.open(io.BytesIO(f)).size for f in files])
    print(f"data (image_size): the JPEG headers of all {len(files)} Imagenette images: {seconds:.3f} s")


def timm_import() -> None:
    code = "import time, torch; t = time.process_time(); import timm; print(time.process_time() - t)"
    seconds = min(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout) for _ in range(3))
    print(f"checkpoints (ViT loading): import timm after torch: {seconds:.2f} s")


def initial_vs_calibrated_batch_norm() -> None:
    """Eval-mode forward of a random ResNet with BatchNorm's initial statistics (mean 0, variance 1)
    and with statistics calibrated on random images, after torchvision's initialisation and after
    PyTorch's default ``reset_parameters()`` (what ``models.randomly_initialised`` does)."""
    for arch, stem, width, side, count in (("resnet18", "cifar", 0.125, 32, 64), ("resnet50", "imagenet", 1.0, 224, 4)):
        for reset in (False, True):
            torch.manual_seed(0)
            net, _ = build_backbone(arch, stem=stem, width=width)
            if reset:
                for module in net.modules():
                    if module is not net and hasattr(module, "reset_parameters"):
                        module.reset_parameters()
            x = torch.rand(count, 3, side, side)
            largest = []
            hook = net.layer4.register_forward_hook(lambda _m, _i, out, largest=largest: largest.append(
                float(out.abs().max())))
            with torch.no_grad():
                net.eval()
                net(x)
                hook.remove()
                initial = cpu_seconds(functools.partial(net, x), repeats=5)
                for module in net.modules():
                    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                        module.momentum = None
                        module.reset_running_stats()
                net.train()(torch.rand(32, 3, side, side))
                net.eval()
                calibrated = cpu_seconds(functools.partial(net, x), repeats=5)
            init = "reset_parameters()" if reset else "torchvision init"
            print(f"models (random init): {arch} x{width:g} {side} px, {init}: max |layer4| {largest[0]:.3g} with the "
                  f"initial statistics; {initial:.3f} s vs {calibrated:.3f} s calibrated ({initial / calibrated:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="the folder holding imagenette_jpeg.npz")
    args = parser.parse_args()
    torch.set_num_threads(2)
    crc32_of_cifar10_train()
    imagenette_jpegs(str(args.data_root or default_data_root()))
    timm_import()
    initial_vs_calibrated_batch_norm()


if __name__ == "__main__":
    main()
