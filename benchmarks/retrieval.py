"""Exact cosine k-NN over a large vector database: FAISS vs scikit-learn vs torch matmul + topk.

The database is ``--size`` random standard-normal float32 vectors of ``--dim`` dimensions (default
1,000,000 x 512), the queries ``--queries`` more of them (default 10,000), ``k = 16``. Each method
finds the ``k`` most cosine-similar database vectors of every query:
  (a) faiss   - L2-normalise, ``IndexFlatIP`` (exact inner product), one ``search`` call;
  (b) sklearn - ``NearestNeighbors(algorithm="brute", metric="cosine")``, ``fit`` + ``kneighbors``;
  (c) torch   - L2-normalise, ``queries @ database.T`` in chunks of queries, ``topk`` per chunk.
Each method runs in its own fresh subprocess, which builds the same database from the same seed
(not timed) and reports its time and its peak resident memory (``resource.getrusage`` ``ru_maxrss``
of that process: native allocations of FAISS/BLAS/torch included, which ``tracemalloc`` would miss),
so no method inherits another's memory. scikit-learn may be timed on only the first
``--sklearn-queries`` queries and extrapolated linearly to all of them (the table says so). The
neighbours of the first ``--check`` queries are compared with FAISS's (recall@k).

    python benchmarks/retrieval.py                                     # the full size (minutes)
    python benchmarks/retrieval.py --size 100000 --queries 1000        # a quick run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("faiss", "sklearn", "torch")


def make_vectors(size: int, queries: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((size, dim), dtype=np.float32),
            rng.standard_normal((queries, dim), dtype=np.float32))


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def run_faiss(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, float]]:
    import faiss

    start = time.perf_counter()
    faiss.normalize_L2(database)
    faiss.normalize_L2(queries)
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    built = time.perf_counter()
    _, neighbours = index.search(queries, k)
    return neighbours, {"build_s": built - start, "search_s": time.perf_counter() - built}


def run_sklearn(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, float]]:
    from sklearn.neighbors import NearestNeighbors

    start = time.perf_counter()
    knn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine").fit(database)
    built = time.perf_counter()
    neighbours = knn.kneighbors(queries, return_distance=False)
    return neighbours, {"build_s": built - start, "search_s": time.perf_counter() - built}


def run_torch(database: np.ndarray, queries: np.ndarray, k: int, chunk: int) -> tuple[np.ndarray, dict[str, float]]:
    import torch
    import torch.nn.functional as F

    start = time.perf_counter()
    bank = F.normalize(torch.from_numpy(database), dim=1)
    query = F.normalize(torch.from_numpy(queries), dim=1)
    built = time.perf_counter()
    with torch.inference_mode():
        neighbours = torch.cat([torch.topk(q @ bank.T, k, dim=1).indices for q in query.split(chunk)])
    return neighbours.numpy(), {"build_s": built - start, "search_s": time.perf_counter() - built}


def child(args: argparse.Namespace) -> None:
    """One method in this (fresh) process; prints its result as one JSON line."""
    database, queries = make_vectors(args.size, args.queries, args.dim, args.seed)
    if args.method == "sklearn":
        queries = queries[: args.sklearn_queries or None]
    rss_before = peak_rss_mib()
    if args.method == "faiss":
        neighbours, times = run_faiss(database, queries, args.k)
    elif args.method == "sklearn":
        neighbours, times = run_sklearn(database, queries, args.k)
    else:
        neighbours, times = run_torch(database, queries, args.k, args.torch_chunk)
    np.save(args.neighbours_out, np.asarray(neighbours[: args.check], dtype=np.int64))
    print(json.dumps({**times, "queries_timed": len(queries), "peak_rss_mib": peak_rss_mib(),
                      "rss_with_data_mib": rss_before}))


def versions() -> str:
    import faiss
    import sklearn
    import torch

    return (f"faiss {faiss.__version__}, scikit-learn {sklearn.__version__}, torch {torch.__version__}, "
            f"numpy {np.__version__}")


def recall(found: np.ndarray, reference: np.ndarray) -> float:
    rows = min(len(found), len(reference))
    pairs = zip(found[:rows], reference[:rows], strict=True)
    return float(np.mean([len(set(a) & set(b)) / reference.shape[1] for a, b in pairs]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1_000_000, help="database vectors (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=10_000, help="query vectors (default 10,000)")
    parser.add_argument("--dim", type=int, default=512, help="dimension (default 512)")
    parser.add_argument("--k", type=int, default=16, help="neighbours per query (default 16)")
    parser.add_argument("--sklearn-queries", type=int, default=1000,
                        help="time scikit-learn on this many queries and extrapolate (0: all; default 1000)")
    parser.add_argument("--torch-chunk", type=int, default=256, help="queries per torch matmul (default 256)")
    parser.add_argument("--check", type=int, default=500, help="queries whose neighbours are compared (default 500)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated among faiss,sklearn,torch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--neighbours-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method:
        child(args)
        return
    methods = args.methods.split(",")
    if "faiss" not in methods or any(m not in METHODS for m in methods):
        raise SystemExit(f"--methods must include faiss (the reference) and be among {', '.join(METHODS)}")
    if args.sklearn_queries:
        args.check = min(args.check, args.sklearn_queries)

    results: dict[str, dict] = {}
    neighbours: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            out = Path(tmp) / f"{method}.npy"
            command = [sys.executable, __file__, "--method", method, "--neighbours-out", str(out),
                       *[f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
                         ("size", "queries", "dim", "k", "sklearn_queries", "torch_chunk", "check", "seed")]]
            print(f"running {method} ...", file=sys.stderr, flush=True)
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
            neighbours[method] = np.load(out)

    rows = []
    faiss_total = None
    for method in methods:
        r = results[method]
        scale = args.queries / r["queries_timed"]
        search_all = r["search_s"] * scale
        total = r["build_s"] + search_all
        if method == "faiss":
            faiss_total = total
        note = (f"timed on {r['queries_timed']} queries, search x{scale:g} (linear extrapolation)"
                if scale != 1 else "all queries timed")
        rows.append([method, f"{r['build_s']:.2f}", f"{search_all:.1f}", f"{total:.1f}",
                     f"{r['peak_rss_mib']:,.0f}", f"{r['peak_rss_mib'] - r['rss_with_data_mib']:,.0f}",
                     f"{recall(neighbours[method], neighbours['faiss']):.4f}", note])
    for row in rows:
        total = float(row[3])
        row.insert(4, f"{total / faiss_total:.1f}x")

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ssl_patch_analysis.report import format_table

    print(f"# exact cosine k-NN: {args.size:,} x {args.dim} float32 random-normal database, {args.queries:,} queries, "
          f"k={args.k}")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU; {versions()}")
    print(f"# peak RSS = ru_maxrss of the method's own subprocess; 'above data' subtracts its RSS once the "
          f"database and queries were generated; recall@{args.k} vs faiss on the first {args.check} queries")
    print(format_table(rows, ["method", "build s", "search s (all queries)", "total s", "time / faiss",
                              "peak RSS MiB", "above data MiB", f"recall@{args.k} vs faiss", "note"]))


if __name__ == "__main__":
    main()
