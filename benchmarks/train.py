"""Training throughput: EMP-SSL's own loop vs the trainer vs the bare training step (the ceiling).

Same network (CIFAR ResNet-18 with the method's projector), same loss, same optimiser, same
CIFAR-10 images, for two settings: ``emp-ssl`` (20 patches of 16x16 resized to 32, EMP-SSL's loss,
batch of images x 20 crops) and ``vicreg`` (two RandomResizedCrop(0.08, 1) views, VICReg's loss):

  (a) loop    - EMP-SSL's loop as its public code (tsb0601/EMP-SSL main.py, dataset/aug.py) runs it:
                per-crop PIL transforms (RandomResizedCrop, flip, ColorJitter, grayscale, blur,
                solarize, ToTensor, Normalize) in a DataLoader with worker processes, ``torch.cat`` of
                the crop lists, a float32 forward in PyTorch's default layout, loss, backward and
                step. For vicreg the same loop with its two-view transforms.
  (b) trainer - ``ssl_patch_analysis.train.train`` as a user runs it (crops and augmentation on the
                device), crops/s of its second epoch from its log.
  (c) bare    - forward + loss + backward + optimiser step of the same model on crops already on the
                device, with the trainer's settings (precision, layout): the hardware's ceiling.
On a CPU, (b) and (c) run with glibc's malloc keeping freed memory, as ``python -m ssl_patch_analysis.train`` does
there (``ssl_patch_analysis.allocator``); (a) runs before that, with glibc as it comes.

Prints one table: crops (patches or views) per second, (b)/(a) and (b)/(c).

    python benchmarks/train.py                                   # CPU, small batches
    python benchmarks/train.py --device cuda --emp-batch 100 --vicreg-batch 1024 --steps 20
    python benchmarks/train.py --bare-modes --emp-batch 100 --steps 2   # (c) only: layouts x torch.compile
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset

from ssl_patch_analysis.allocator import keep_freed_memory
from ssl_patch_analysis.data import load_dataset
from ssl_patch_analysis.extract import cpu_has_bf16
from ssl_patch_analysis.train import (
    METHODS,
    TrainConfig,
    build_loss,
    build_model,
    build_optimizer,
    crops_of,
    method_loss,
    read_log,
    train,
)

# ----------------------------------------------------------------------------- (a) EMP-SSL's data path


class _RandomBlur:
    """EMP-SSL's ``GBlur``: PIL Gaussian blur with probability ``p``, radius uniform in [0.1, 2.0]."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        # EMP-SSL draws from NumPy's global generator (seeded per DataLoader worker): kept as written.
        if np.random.rand() < self.p:  # noqa: NPY002
            return image.filter(ImageFilter.GaussianBlur(np.random.rand() * 1.9 + 0.1))  # noqa: NPY002
        return image


def emp_ssl_transform(crop: T.RandomResizedCrop) -> T.Compose:
    """One crop's transform, as EMP-SSL's ``ContrastiveLearningViewGenerator`` composes it."""
    return T.Compose([
        crop,
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.8),
        T.RandomGrayscale(p=0.2),
        _RandomBlur(p=0.1),
        T.RandomApply([T.Lambda(ImageOps.solarize)], p=0.1),
        T.ToTensor(),
        T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])


class MultiCropDataset(Dataset):
    """PIL images, each returned as a list of ``num_crops`` independently transformed crops."""

    def __init__(self, images: torch.Tensor, num_crops: int, transform: T.Compose):
        self.images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
        self.num_crops, self.transform = num_crops, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        return [self.transform(self.images[i]) for _ in range(self.num_crops)], 0


def loop_rate(method: str, images: torch.Tensor, batch: int, steps: int, workers: int, device: torch.device) -> float:
    """(a): crops/s of EMP-SSL's loop over ``steps`` timed steps after one warm-up step."""
    config = _config(method, batch)
    num_crops = config.num_patches if METHODS[method].patches else 2
    if METHODS[method].patches:
        crop = T.RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    else:
        crop = T.RandomResizedCrop(32, scale=(config.min_scale, config.max_scale))
    dataset = MultiCropDataset(images[:batch * (steps + 1)], num_crops, emp_ssl_transform(crop))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=False)
    torch.manual_seed(0)
    model = build_model(config, 32).to(device)
    optimizer = build_optimizer(config, model, config.peak_lr)
    loss_fn = build_loss(method)
    started = None
    for step, (crops, _) in enumerate(loader):
        if step == 1:
            _sync(device)
            started = time.perf_counter()
        # EMP-SSL: torch.cat of the crop lists, i.e. crop-major order: row k * batch + b is crop k of image b.
        x = torch.cat(crops, dim=0).to(device)
        z = model(x)["z"]
        output = method_loss(method, loss_fn, z.view(num_crops, batch, -1).transpose(0, 1))
        optimizer.zero_grad()
        output.total.backward()
        optimizer.step()
    _sync(device)
    return steps * batch * num_crops / (time.perf_counter() - started)


# ----------------------------------------------------------------------------- (b) the trainer, (c) the bare step


def _config(method: str, batch: int, **extra) -> TrainConfig:
    config = TrainConfig(method=method, batch_size=batch, **extra)
    config.resolve(32, torch.device(extra.get("device") or "cpu"))
    return config


def trainer_rate(method: str, data_root: str | None, batch: int, steps: int, device: torch.device,
                 compile: bool) -> tuple[float, bool]:
    """(b): crops/s of the trainer's second epoch of ``steps`` steps (the first one warms up)."""
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(method=method, data_root=data_root, out=out, batch_size=batch, train_size=batch * steps,
                             epochs=2, knn_every=0, knn_train_size=100, knn_test_size=100, device=str(device),
                             compile=compile)
        train(config)
        records = read_log(Path(out) / "log.jsonl")
        header, second = records[0], records[2]
    num_crops = header["args"]["num_patches"] if METHODS[method].patches else 2
    return second["images_per_s"] * num_crops, bool(header["args"]["amp"])


def bare_rate(method: str, images: torch.Tensor, batch: int, steps: int, device: torch.device, compile: bool,
              channels_last: bool = True) -> float:
    """(c): crops/s of forward + loss + backward + step on crops already on the device (the trainer's layout,
    channels_last, unless told otherwise)."""
    config = _config(method, batch, device=str(device))
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(config, 32).to(device).to(memory_format=layout)
    forward = torch.compile(model) if compile else model
    optimizer = build_optimizer(config, model, config.peak_lr)
    loss_fn = build_loss(method)
    num_crops = config.num_patches if METHODS[method].patches else 2
    from ssl_patch_analysis.train import CropPlan  # the trainer's own crops, made once, outside the timing
    plan = CropPlan(method, 0, num_crops, config.patch_size, config.min_scale, config.max_scale)
    chunk = images[:batch].to(device)
    boxes = plan.boxes(0, torch.arange(batch), (32, 32)).to(device)
    crops = config.augmentation()(crops_of(chunk, boxes, 32), torch.Generator(device=device).manual_seed(0))
    crops = crops.contiguous(memory_format=layout)
    started = None
    for step in range(steps + 1):
        if step == 1:
            _sync(device)
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(config.amp)):
            z = forward(crops)["z"]
        output = method_loss(method, loss_fn, z.float().view(batch, num_crops, -1))
        optimizer.zero_grad(set_to_none=True)
        output.total.backward()
        optimizer.step()
    _sync(device)
    return steps * batch * num_crops / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_modes(images: torch.Tensor, args: argparse.Namespace, device: torch.device) -> None:
    """One table: the bare emp-ssl step (c) in each layout, eager and compiled, against the trainer's default."""
    if device.type == "cpu":
        print(f"# malloc: {keep_freed_memory()}")
    precision = "bf16" if _config("emp-ssl", args.emp_batch, device=str(device)).amp else "float32"
    rows = []
    for channels_last in (True, False):
        for compile in (False, True):
            started = time.perf_counter()
            rate = bare_rate("emp-ssl", images, args.emp_batch, args.steps, device, compile, channels_last)
            rows.append(dict(layout="channels_last" if channels_last else "default (NCHW)", compile=compile,
                             precision=precision, crops_per_s=rate, seconds=time.perf_counter() - started))
    default = rows[0]["crops_per_s"]
    print("| step (images x patches) | precision | layout | torch.compile | bare step crops/s | vs the trainer's "
          "default | wall s (with warm-up) |")
    print("|---|---|---|---|---:|---:|---:|")
    for r in rows:
        compiled = "yes" if r["compile"] else "no"
        print(f"| emp-ssl ({args.emp_batch} x 20) | {r['precision']} | {r['layout']} | {compiled} "
              f"| {r['crops_per_s']:.1f} | {r['crops_per_s'] / default:.2f} | {r['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "torch": torch.__version__, "rows": rows},
                                              indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", default=None, help="folder holding cifar10_jpeg.npz (default: as the toolkit)")
    parser.add_argument("--emp-batch", type=int, default=16, help="emp-ssl images per step (x 20 patches)")
    parser.add_argument("--vicreg-batch", type=int, default=160, help="vicreg images per step (x 2 views)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per column")
    parser.add_argument("--workers", type=int, default=2, help="(a): DataLoader worker processes")
    parser.add_argument("--compile", action="store_true", help="(b) and (c) through torch.compile")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--bare-modes", action="store_true",
                        help="instead: only the bare emp-ssl step (c), in channels_last and PyTorch's default layout, "
                             "eager and through torch.compile, side by side (what the trainer's defaults rest on)")
    args = parser.parse_args()
    device = torch.device(args.device)
    train_images = load_dataset("cifar10", "train", root=args.data_root)
    images = train_images.images[:max(args.emp_batch, args.vicreg_batch) * (args.steps + 1)]
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " \
          f"{'bf16 units' if cpu_has_bf16() else 'no bf16 units'}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu})"
    print(f"# {name}; torch {torch.__version__}; {args.steps} timed steps per column after one warm-up step")
    if args.bare_modes:
        bare_modes(images, args, device)
        return
    rows = []
    settings = (("emp-ssl", args.emp_batch), ("vicreg", args.vicreg_batch))
    # (a) with glibc's malloc as it comes (as EMP-SSL's code runs); (b) and (c) as `python -m ssl_patch_analysis.train`
    # runs on a CPU, freed memory kept (ssl_patch_analysis.allocator)
    loop = {method: loop_rate(method, images, batch, args.steps, args.workers, device) for method, batch in settings}
    if device.type == "cpu":
        print(f"# (b), (c): malloc: {keep_freed_memory()}")
    for method, batch in settings:
        a = loop[method]
        b, amp = trainer_rate(method, args.data_root, batch, args.steps, device, args.compile)
        c = bare_rate(method, images, batch, args.steps, device, args.compile)
        crops = batch * (20 if method == "emp-ssl" else 2)
        mode = ("bf16" if amp else "float32") + ", channels_last" + (", compile" if args.compile else "")
        rows.append(dict(setting=method, batch=batch, crops_per_step=crops, mode=mode, loop=a, trainer=b, bare=c,
                         b_over_a=b / a, b_over_c=b / c))
    print("| setting | images x crops per step | (b), (c) mode | (a) EMP-SSL loop crops/s | (b) trainer crops/s "
          "| (c) bare step crops/s | (b)/(a) | (b)/(c) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['batch']} x {r['crops_per_step'] // r['batch']} | {r['mode']} | {r['loop']:.1f} "
              f"| {r['trainer']:.1f} | {r['bare']:.1f} | {r['b_over_a']:.2f} | {r['b_over_c']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
