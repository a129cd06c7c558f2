"""Patch retrieval at scale: compressed FAISS indexes built by streaming from a float16 store, in bounded memory.

The data: ``--num-vectors`` (default 10,000,000, rounded up to whole images) 512-d vectors written as a
float16 patch-embedding store (``ssl_patch_analysis.store``), one layer ``h``, 49 patches per image (a 7 x 7
grid, as a ResNet-50's ImageNet grid), batches of 1,024 images. A clustered synthetic set, of this structure:

- ``--clusters`` (4,096) centres ``c_k`` uniform on the unit sphere of R^512;
- every cluster has its own random 16-dimensional subspace (orthonormal basis ``U_k``);
- every image belongs to one cluster (uniformly drawn, its label); each of its patches is
  ``normalise(c_k + U_k a + e)`` with ``a ~ N(0, spread^2 / 16 I_16)`` (``--spread`` 0.5: the in-cluster
  offset has length ~0.5, cosine ~0.89 to the centre) and ``e ~ N(0, noise^2 / 512 I_512)`` (``--noise``
  0.05: isotropic, length ~0.05);
- the 1,000 queries are one patch of each of 1,000 further images drawn the same way (not in the store), of
  clusters drawn uniformly among those the store holds (all 4,096 at 10M; at 200,000 vectors, 4,082
  images, only ~2,600 clusters have an image).

So the vectors are well-separated clusters with a low-dimensional (16-d) spread inside each, as
embeddings of natural images are (locally low-dimensional); isotropic 512-d clusters are a much harder
case for product quantisation (``--subspace-dim 512`` makes them).

Ground truth: the exact cosine top 10 of every query, by streaming exact inner products over the
whole store (``ssl_patch_analysis.index.exact_search``), cached beside the data.

Each index configuration is built in its own subprocess (``PatchIndex.from_store``: quantisers trained
on a seeded sample, vectors added in chunks read from the store, checkpointed), saved, then loaded
and queried in another subprocess, so that each peak RSS (``VmHWM`` from ``/proc/self/status``) is
that step's alone. Queries run in one batch of 1,000 on all cores, at several ``nprobe``, with and
without exact re-ranking of the top candidates against the float16 store (``rerank``). Recall@10 is
the mean fraction of the exact top 10 found. Flat and IVF-Flat hold every vector as float32; they run
only where that fits in ``--max-float32-gib`` (default 2.5), otherwise the table says why not.

    python benchmarks/retrieval_scale.py --num-vectors 200000       # a check first (minutes)
    nice -n 5 python benchmarks/retrieval_scale.py                   # 10M (about an hour on 2 cores)

Everything is written under ``--data`` (default /tmp/retrieval_scale/<size>), never in the repository;
a re-run reuses the store, the ground truth and the finished indexes there (``--rebuild`` builds again).
"""
from __future__ import annotations

import faiss  # isort: skip  # before torch (DESIGN.md)

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_patch_analysis import store as store_module
from ssl_patch_analysis.index import StoreVectors, exact_search, normalised_float32
from ssl_patch_analysis.report import format_table

DIM, PATCHES, BATCH_IMAGES, K = 512, 49, 1024, 10
NPROBES = (4, 8, 16, 32)
RERANKS = (0, 100, 400)
# name: (kind, nbits, what it is)
CONFIGS = {
    "flat": ("flat", None, "IndexFlatIP (exact)"),
    "ivf": ("ivf", None, "IVF-Flat"),
    "ivfpq-fs": ("ivfpq", 4, "IVF-PQ, 64 x 4-bit fast-scan codes (32 B/vector)"),
    "ivfpq": ("ivfpq", 8, "IVF-PQ, 64 x 8-bit codes (64 B/vector)"),
    "opq-ivfpq-fs": ("opq-ivfpq", 4, "OPQ + IVF-PQ, 64 x 4-bit fast-scan codes"),
}


def peak_rss_mib() -> float:
    """VmHWM (the peak resident set) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# ---------------------------------------------------------------------- the synthetic data
class Clusters:
    """The clustered synthetic set of the module docstring (all of it a function of ``seed``)."""

    def __init__(self, clusters: int, subspace_dim: int, spread: float, noise: float, seed: int):
        self.spread, self.noise, self.seed, self.subspace_dim = spread, noise, seed, min(subspace_dim, DIM)
        rng = np.random.default_rng([seed, 1])
        centres = rng.standard_normal((clusters, DIM), dtype=np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.bases = None  # isotropic spread: no subspace to draw
        if subspace_dim < DIM:
            self.bases = np.empty((clusters, subspace_dim, DIM), np.float32)  # orthonormal rows
            for k in range(clusters):
                self.bases[k] = np.linalg.qr(rng.standard_normal((DIM, subspace_dim)))[0].T

    def patches(self, labels: np.ndarray, patches: int, rng: np.random.Generator) -> np.ndarray:
        """``len(labels) x patches x DIM`` unit float32 patches of images of clusters ``labels``."""
        offsets = rng.standard_normal((len(labels), patches, self.subspace_dim), dtype=np.float32)
        offsets *= self.spread / np.sqrt(self.subspace_dim)
        x = offsets if self.bases is None else np.matmul(offsets, self.bases[labels])
        x += self.centres[labels][:, None, :]
        x += rng.standard_normal(x.shape, dtype=np.float32) * (self.noise / np.sqrt(DIM))
        x /= np.linalg.norm(x, axis=2, keepdims=True)
        return x


def structure(args: argparse.Namespace) -> dict:
    return {"clusters": args.clusters, "subspace_dim": args.subspace_dim, "spread": args.spread,
            "noise": args.noise, "seed": args.seed, "dim": DIM, "patches_per_image": PATCHES}


def make_store(path: Path, num_images: int, args: argparse.Namespace) -> None:
    """Write (or finish writing: batches are resumable) the float16 store of the synthetic set."""
    labels = store_labels(args, num_images)
    layout = store_module.StoreLayout(num_patches=PATCHES, layer_dims={"h": DIM}, image_ids=np.arange(num_images),
                                      labels=labels, batch_size=BATCH_IMAGES, dtype="float16")
    step = 32
    grid = np.array([[x, y, x + step, y + step] for y in range(0, 7 * step, step) for x in range(0, 7 * step, step)],
                    np.float32)
    with store_module.store_lock(path):
        plan = store_module.prepare_store(path, {"synthetic": structure(args)}, layout)
        if not plan.complete:
            generator = Clusters(args.clusters, args.subspace_dim, args.spread, args.noise, args.seed)
            with store_module.StoreWriter(plan.path) as writer:
                pending = writer.pending_batches()
                started = time.perf_counter()
                for done, batch in enumerate(pending, start=1):
                    span = writer.batch_rows(batch)
                    rng = np.random.default_rng([args.seed, 3, batch])
                    x = generator.patches(labels[span], PATCHES, rng)
                    writer.write_batch(batch, {"h": x.astype(np.float16),
                                               "boxes": np.broadcast_to(grid, (len(x), PATCHES, 4))})
                    if done % 10 == 0 or done == len(pending):
                        rate = done * BATCH_IMAGES * PATCHES / (time.perf_counter() - started)
                        print(f"  store: batch {done}/{len(pending)} ({rate:,.0f} vectors/s)", file=sys.stderr,
                              flush=True)
                writer.mark_complete()
        plan.finish()


def store_labels(args: argparse.Namespace, num_images: int) -> np.ndarray:
    return np.random.default_rng([args.seed, 0]).integers(args.clusters, size=num_images)


def make_queries(args: argparse.Namespace, count: int, num_images: int) -> np.ndarray:
    """One patch of each of ``count`` further images, of clusters drawn uniformly among those the store holds (all
    of them once the store has many more images than clusters), rounded to float16 as the store is."""
    generator = Clusters(args.clusters, args.subspace_dim, args.spread, args.noise, args.seed)
    present = np.unique(store_labels(args, num_images))
    rng = np.random.default_rng([args.seed, 2])
    labels = present[rng.integers(len(present), size=count)]
    return normalised_float32(generator.patches(labels, 1, rng)[:, 0].astype(np.float16))


def prepare(args: argparse.Namespace) -> tuple[Path, np.ndarray, np.ndarray, dict]:
    """The store, the queries and their exact top K (cached in ``args.data``)."""
    args.data.mkdir(parents=True, exist_ok=True)
    num_images = -(-args.num_vectors // PATCHES)
    store = args.data / "store"
    started = time.perf_counter()
    print(f"store: {num_images:,} images x {PATCHES} patches x {DIM} float16 -> {store}", file=sys.stderr, flush=True)
    make_store(store, num_images, args)
    timings = {"store_s": time.perf_counter() - started}
    source = StoreVectors(store, "h")
    queries = make_queries(args, args.queries, num_images)
    digest = hashlib.sha256(queries.tobytes()).hexdigest()[:12]
    truth_file = args.data / f"truth_{source.store_id}_{digest}_k{K}.npz"
    if not truth_file.is_file():
        started = time.perf_counter()
        _, truth = exact_search(source, queries, K, progress=True)
        timings["exact_search_s"] = time.perf_counter() - started
        np.savez(truth_file, rows=truth)
        print(f"exact top {K} of {len(queries)} queries by streaming the store: {timings['exact_search_s']:.0f} s",
              file=sys.stderr, flush=True)
    return store, queries, truth_file, timings


# ---------------------------------------------------------------------- one configuration, in its own process
def child_build(args: argparse.Namespace) -> dict:
    from ssl_patch_analysis.retrieval import PatchIndex

    kind, nbits, _ = CONFIGS[args.config]
    baseline = rss_mib()
    started = time.perf_counter()
    index = PatchIndex.from_store(args.data / "store", "h", kind=kind, nlist=args.nlist_value, nbits=nbits or 8,
                                  train_size=args.train_value, seed=args.seed, save_to=args.index_dir,
                                  overwrite=True, progress=True)
    return {"build_s": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": baseline,
            "index_bytes": (args.index_dir / "index.faiss").stat().st_size, "info": index.info}


def child_query(args: argparse.Namespace) -> dict:
    from ssl_patch_analysis.retrieval import PatchIndex

    queries = np.load(args.data / "queries.npy")
    truth = np.load(args.truth)["rows"]
    baseline = rss_mib()
    started = time.perf_counter()
    index = PatchIndex.load(args.index_dir)
    load_s = time.perf_counter() - started
    kind = index.info["index"]
    rows = []
    for nprobe in (NPROBES if kind != "flat" else (None,)):
        for rerank in (RERANKS if kind in ("ivfpq", "opq-ivfpq") else (0,)):  # the others' similarities are exact
            index.set_search(nprobe=nprobe, rerank=rerank)
            index.search(queries[:50], K, allow_fewer=True)  # warm-up
            started = time.perf_counter()
            _, found = index.search(queries, K, allow_fewer=True)
            seconds = time.perf_counter() - started
            recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth, strict=True)]))
            rows.append({"nprobe": nprobe, "rerank": rerank, "qps": len(queries) / seconds, "recall": recall})
    return {"load_s": load_s, "peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": baseline, "rows": rows,
            "threads": faiss.omp_get_max_threads()}


def run_child(args: argparse.Namespace, step: str, config: str, extra: list[str]) -> dict:
    command = [sys.executable, __file__, "--child", step, "--config", config, "--data", str(args.data),
               "--num-vectors", str(args.num_vectors), "--seed", str(args.seed), *extra]
    print(f"{config}: {step} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{config} {step} failed (exit status {done.returncode}); see its stderr above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_nlist(count: int) -> int:
    """About sqrt(V) / 3, a power of two: few enough lists for a 2-core build (assigning a vector costs nlist dot
    products), enough that a query scans a small fraction of the vectors."""
    return int(2 ** max(4, round(np.log2(np.sqrt(count) / 3))))


def versions() -> str:
    import torch

    return (f"faiss {faiss.__version__}, numpy {np.__version__}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def machine() -> str:
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:")) / 2**20
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return f"{model}, {os.cpu_count()} CPUs, {memory:.0f} GiB RAM, no GPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-vectors", type=int, default=10_000_000, help="vectors (default 10,000,000)")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of the store, ground truth and indexes (default /tmp/retrieval_scale/<size>)")
    parser.add_argument("--queries", type=int, default=1000, help="queries (default 1,000)")
    parser.add_argument("--configs", default="flat,ivf,ivfpq-fs",
                        help=f"comma-separated among {', '.join(CONFIGS)} (default flat,ivf,ivfpq-fs)")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~sqrt(V)/3, a power of two)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="training vectors (default 64 per list, at least 39 x 2**nbits)")
    parser.add_argument("--max-float32-gib", type=float, default=2.5,
                        help="run flat and IVF-Flat only when V x 512 float32 take at most this (default 2.5)")
    parser.add_argument("--clusters", type=int, default=4096)
    parser.add_argument("--subspace-dim", type=int, default=16)
    parser.add_argument("--spread", type=float, default=0.5)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true", help="build the indexes again even where they are saved")
    parser.add_argument("--only-data", action="store_true", help="make the store and the ground truth, then stop")
    parser.add_argument("--child", choices=("build", "query"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--truth", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.data = args.data or Path("/tmp/retrieval_scale") / f"{args.num_vectors}"
    args.nlist_value = args.nlist or default_nlist(args.num_vectors)
    if args.child:
        args.index_dir = args.data / f"index-{args.config}"
        kind, nbits, _ = CONFIGS[args.config]
        args.train_value = args.train_size or max(64 * args.nlist_value, 39 * 2 ** (nbits or 0))
        result = child_build(args) if args.child == "build" else child_query(args)
        print(json.dumps(result, default=str))
        return

    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {', '.join(unknown)}; choose among {', '.join(CONFIGS)}")
    load_before = os.getloadavg()
    store, queries, truth_file, timings = prepare(args)
    np.save(args.data / "queries.npy", queries)
    count = StoreVectors(store, "h").num_vectors
    store_gib = sum(f.stat().st_size for f in store.iterdir()) / 2**30
    if args.only_data:
        print(json.dumps({"vectors": count, "store_gib": store_gib, **timings}))
        return

    table, notes = [], []
    float32_gib = count * DIM * 4 / 2**30
    for config in configs:
        kind, nbits, what = CONFIGS[config]
        if kind in ("flat", "ivf") and float32_gib > args.max_float32_gib:
            table.append([config, what, "-", "-", "-", "-", "-", "-", "-", "-", "-"])
            notes.append(f"{config} not run: it holds every vector as float32, {float32_gib:.1f} GiB for "
                         f"{count:,} x {DIM} (above --max-float32-gib {args.max_float32_gib:g}; the target is a "
                         f"3 GB peak, and this machine has {machine().split(', ')[2]} shared with other jobs)")
            continue
        index_dir = args.data / f"index-{config}"
        build_file = args.data / f"build-{config}.json"
        if args.rebuild or not build_file.is_file() or not (index_dir / "info.json").is_file():
            built = run_child(args, "build", config, [])
            build_file.write_text(json.dumps(built))
        else:
            built = json.loads(build_file.read_text())
            notes.append(f"{config}: the index saved by an earlier run was reused (its build figures are that run's)")
        queried = run_child(args, "query", config, ["--truth", str(truth_file)])
        for row in queried["rows"]:
            table.append([config, what, row["nprobe"] if row["nprobe"] is not None else "-", row["rerank"] or "-",
                          f"{built['build_s']:.0f}", f"{built['peak_rss_mib']:,.0f}", f"{queried['peak_rss_mib']:,.0f}",
                          f"{built['index_bytes'] / 2**20:,.0f}", f"{queried['load_s']:.1f}", f"{row['qps']:,.0f}",
                          f"{row['recall']:.3f}"])
        notes.append(f"{config}: {built['info'].get('faiss_factory')}, train {built['info'].get('train_vectors', '-')} "
                     f"vectors; RSS after imports {built['rss_after_imports_mib']:.0f} MiB (build), "
                     f"{queried['rss_after_imports_mib']:.0f} MiB (query); {queried['threads']} threads")

    load_after = os.getloadavg()
    print(f"# patch retrieval at scale: {count:,} x {DIM} float16 vectors ({store_gib:.1f} GiB store), "
          f"{len(queries):,} queries, recall@{K} vs exact search")
    print(f"# data: {args.clusters} clusters on the unit sphere, {args.subspace_dim}-d spread {args.spread:g} inside "
          f"each, isotropic noise {args.noise:g}; seed {args.seed}; nlist {args.nlist_value}")
    print(f"# machine: {machine()}; {versions()}; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after")
    print(f"# store written in {timings['store_s']:.0f} s" + (f"; exact ground truth by streaming the store in "
                                                              f"{timings['exact_search_s']:.0f} s"
                                                              if "exact_search_s" in timings else ""))
    print(format_table(table, ["config", "index", "nprobe", "rerank", "build s", "build peak RSS MiB",
                               "query peak RSS MiB", "index MiB", "load s", "queries/s", f"recall@{K}"]))
    for note in notes:
        print(f"# {note}")


if __name__ == "__main__":
    main()
