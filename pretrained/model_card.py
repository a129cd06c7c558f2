"""The numbers of the model cards in pretrained/README.md: weighted k-NN top-1 on CIFAR-10 test.

For each checkpoint, and for a randomly initialised network of the same architecture measured the
same way: the central view (the whole 32x32 image), and for patch-trained models also the mean
embedding of ``--num-patches`` fixed-scale patches at the pretraining patch size (the paper's
"n patches" protocol; the bank is built from the training split the same way). Weighted k-NN as in
DINO/solo-learn: cosine similarity, k = 20, temperature 0.07.

    python pretrained/model_card.py pretrained/vicreg-resnet18-cifar10.pt pretrained/bagssl-resnet18-cifar10.pt
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from ssl_patch_analysis.checkpoints import load_model
from ssl_patch_analysis.data import TensorImageDataset, load_dataset
from ssl_patch_analysis.extract import extract_patch_embeddings
from ssl_patch_analysis.knn import knn_accuracy
from ssl_patch_analysis.models import SSLModel
from ssl_patch_analysis.patches import central, random_fixed


def randomly_initialised(model: SSLModel, seed: int) -> SSLModel:
    """The same architecture with fresh weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def image_features(model, data, sampler, device, amp) -> torch.Tensor:
    emb = extract_patch_embeddings(model, data, sampler, layers=["h"], device=device, dtype="float32",
                                   progress=False, amp=amp)
    return torch.from_numpy(emb.layer("h")).float().mean(dim=1)


def amp_agreement(model, data, protocols, device) -> dict[str, dict[str, float]]:
    """Cosine similarity between bf16-autocast and float32 patch embeddings, per protocol."""
    result = {}
    for name, sampler in protocols.items():
        runs = [extract_patch_embeddings(model, data, sampler, layers=["h"], device=device, dtype="float32",
                                         progress=False, amp=amp).layer("h") for amp in (True, False)]
        cosine = F.cosine_similarity(*(torch.from_numpy(r).float().flatten(0, 1) for r in runs), dim=1)
        result[name] = {"min": float(cosine.min()), "mean": float(cosine.mean())}
    return result


def evaluate(model, train, test, protocols, device, amp) -> dict[str, float]:
    results = {}
    for name, sampler in protocols.items():
        bank = image_features(model, train, sampler, device, amp)
        queries = image_features(model, test, sampler, device, amp)
        results[name] = knn_accuracy(bank.to(device), train.labels.to(device), queries.to(device),
                                     test.labels.to(device), num_classes=len(train.class_names))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-patches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (default float32)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--max-images", type=int, default=None, help="use the first N images of each split (quick checks)")
    parser.add_argument("--amp-check", action="store_true",
                        help="also compare bf16-autocast embeddings with float32 ones (test split, central view)")
    args = parser.parse_args()
    device = torch.device(args.device)
    train = load_dataset("cifar10", "train", root=args.data_root)
    test = load_dataset("cifar10", "test", root=args.data_root)
    if args.max_images:
        train, test = (TensorImageDataset(d.images[:args.max_images], d.labels[:args.max_images], d.class_names,
                                          d.name, d.split) for d in (train, test))

    rows = []
    for path in args.checkpoints:
        model = load_model(path, device=device)
        patch_size = model.info.extra.get("train", {}).get("patch_size")
        method = model.info.method
        protocols = {"central": central()}
        if method in ("bagssl", "emp-ssl") and patch_size:
            protocols[f"{args.num_patches} patches"] = random_fixed(args.num_patches, int(patch_size), seed=args.seed)
        start = time.perf_counter()
        trained = evaluate(model, train, test, protocols, device, args.amp)
        agreement = amp_agreement(model, test, protocols, device) if args.amp_check else None
        random = evaluate(randomly_initialised(model, args.seed), train, test, protocols, device, args.amp)
        rows.append({"checkpoint": path, "method": method, "trained": trained, "random_init": random, "bf16_vs_fp32_cosine": agreement,
                     "seconds": round(time.perf_counter() - start, 1)})

    print("| checkpoint | protocol | k-NN top-1 trained | k-NN top-1 random init |")
    print("|---|---|---:|---:|")
    for row in rows:
        for name in row["trained"]:
            print(f"| {row['checkpoint']} | {name} | {row['trained'][name]:.2f} | {row['random_init'][name]:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
