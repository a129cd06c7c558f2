"""Build the ignored .gpu_data/ folder that benchmarks/gpu_session.sh carries to a lent GPU machine.

The device tool carries at most 64 MiB, so it holds CIFAR-10 (without the unused file-name array,
56 MB) and a seeded 400-image subset of Imagenette val (4 MB), in the same archive format as
../shared/data. Add `/.gpu_data/` to .git/info/exclude.

    python benchmarks/make_gpu_data.py [--data-root ../shared/data]
"""
import argparse
from pathlib import Path

import numpy as np

from ssl_patch_analysis.data import data_roots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--imagenette-images", type=int, default=400,
                        help="a seeded subset of Imagenette val (0: none; the 'models' step needs CIFAR-10 only)")
    parser.add_argument("--out", type=Path, default=Path(".gpu_data"))
    args = parser.parse_args()
    root = args.data_root or next(r for r in data_roots() if (r / "cifar10_jpeg.npz").is_file())
    args.out.mkdir(exist_ok=True)
    cifar = np.load(root / "cifar10_jpeg.npz")
    np.savez(args.out / "cifar10_jpeg.npz", **{k: cifar[k] for k in cifar.files if k != "test_tiny_images_filename"})
    if args.imagenette_images == 0:
        return
    nette = np.load(root / "imagenette_jpeg.npz")
    offsets = nette["val_offsets"]
    ids = np.sort(np.random.default_rng(0).choice(len(offsets) - 1, args.imagenette_images, replace=False))
    parts = [nette["val_jpeg"][offsets[i]:offsets[i + 1]] for i in ids]
    new_offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    np.savez(args.out / "imagenette_jpeg.npz", val_jpeg=np.concatenate(parts), val_offsets=new_offsets,
             val_labels=nette["val_labels"][ids], class_names=nette["class_names"], wnids=nette["wnids"])


if __name__ == "__main__":
    main()
