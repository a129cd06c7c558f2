"""Make ``cifar10_test_sample.npz``, the built-in sample: the first 1,000 CIFAR-10 test images.

The JPEG bytes, labels, class names and original file names are copied unchanged from the full
archive ``cifar10_jpeg.npz`` (so decoded pixels are identical to the full copy's), into the same
plain ``numpy.savez`` layout (no pickles): ``test_jpeg``, ``test_offsets``, ``test_labels``,
``class_names``, ``test_tiny_images_filename``.

    python ssl_patch_analysis/sample_data/make_sample.py --source ../shared/data/cifar10_jpeg.npz
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SAMPLE_SIZE = 1000
OUT = Path(__file__).resolve().parent / "cifar10_test_sample.npz"


def make_sample(source: Path, out: Path, count: int = SAMPLE_SIZE) -> dict[str, np.ndarray]:
    """Write the first ``count`` test images of the archive ``source`` to ``out``; return the arrays."""
    with np.load(source) as archive:
        offsets = archive["test_offsets"]
        if not 1 <= count < len(offsets):
            raise ValueError(f"{source} holds {len(offsets) - 1} test images; count must lie in 1..{len(offsets) - 1}, "
                             f"got {count}")
        sample = {
            "test_jpeg": archive["test_jpeg"][offsets[0]:offsets[count]],
            "test_offsets": (offsets[:count + 1] - offsets[0]).astype(np.int64),
            "test_labels": archive["test_labels"][:count].astype(np.int64),
            "class_names": archive["class_names"],
            "test_tiny_images_filename": archive["test_tiny_images_filename"][:count],
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **sample)
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the full archive cifar10_jpeg.npz")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write the sample (default {OUT})")
    parser.add_argument("--count", type=int, default=SAMPLE_SIZE,
                        help=f"the first test images to keep (default {SAMPLE_SIZE})")
    args = parser.parse_args()
    sample = make_sample(args.source, args.out, args.count)
    print(f"wrote {args.out}: {len(sample['test_labels'])} images, {len(sample['test_jpeg']):,} JPEG bytes, "
          f"{args.out.stat().st_size:,} bytes on disk")


if __name__ == "__main__":
    main()
