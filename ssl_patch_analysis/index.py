"""FAISS indexes of patch vectors: which kind, how it is built (streamed from a store, resumable), where it searches.

:class:`~.retrieval.PatchIndex` keeps the patches' metadata beside one of these indexes; this module
makes the FAISS part. Every kind is one of FAISS's own, made by ``faiss.index_factory`` for the inner
product of unit vectors (cosine similarity):

=============  ===============================  ===================================================================
``flat``       ``Flat`` (IndexFlatIP)           exact; ``4 x D`` bytes a vector, all in memory
``ivf``        ``IVF{nlist},Flat``              IndexIVFFlat: ``nlist`` inverted lists of the full vectors (as
                                                large as flat); searches ``nprobe`` lists
``ivfpq``      ``IVF{nlist},PQ{m}x{nbits}np``   IndexIVFPQ: each vector as ``m`` codes of ``nbits`` bits (``m``
                                                bytes at 8 bits). ``nbits=4`` is FAISS's SIMD fast-scan layout,
                                                ``PQ{m}x4fs`` (IndexIVFPQFastScan): half the bytes, several times
                                                faster to scan on a CPU, coarser codes; no GPU version
``opq-ivfpq``  ``OPQ{m},IVF...,PQ...``          the same behind an OPQ rotation (OPQMatrix in an
                                                IndexPreTransform), which balances the variance over the ``m``
                                                sub-vectors: it helps when a few directions hold most of it
=============  ===============================  ===================================================================

The compressed kinds (``ivfpq``, ``opq-ivfpq``) only estimate similarities; ``PatchIndex`` re-ranks
their top candidates against the exact vectors (``rerank``), so what it returns are exact cosines.

Vectors come from a :class:`VectorSource`: :class:`ArrayVectors` (an array in memory) or
:class:`StoreVectors` (one layer of a patch-embedding store, read with positional reads, never mapped
or held whole). :func:`build_faiss_index` trains the quantisers on a seeded sample, then adds the
vectors chunk by chunk (a progress bar); from a store it is resumable: every ``checkpoint_every``
chunks the partial index is written into the folder being built, atomically, with the count of
vectors it holds, and a later build with the same settings continues from there.

Which kind at which scale (``V`` vectors of ``D`` dimensions; memory is the index's, the process adds
~0.7 GB of imports and, while building, one chunk):

- up to a few million vectors, when ``4 x V x D`` bytes fit in RAM: ``flat`` (exact);
- the same size, many queries: ``ivf`` (``nlist ~ sqrt(V)``, ``nprobe`` 8-32);
- larger than RAM (ImageNet patch sets: 2.45M x 2048 = 20 GB as float32): ``ivfpq`` built from a store,
  ``pq_m`` bytes a vector (``nbits=8``; ``nbits=4`` halves it and scans faster on a CPU) plus 16 for the id
  and the direct map, re-ranked against the store (``rerank`` 100-400); ``opq-ivfpq`` when the
  variance is concentrated in a few directions (OPQ's training is slow on a CPU).

:func:`place_index` puts an index on one GPU or, with ``multi_gpu``, on every visible GPU when the
installed faiss has GPU support (``faiss-gpu`` / ``faiss-gpu-cu12`` from PyPI: check which one imports
beside this torch and sees the GPU). FAISS's own wrapper ``faiss.index_cpu_to_all_gpus`` makes either
``IndexShards`` (``multi_gpu="shard"``: each GPU holds ``1/n`` of the vectors, for indexes larger than
one GPU's memory; every query goes to every GPU) or ``IndexReplicas`` (``"replicate"``: each GPU holds
it all, the queries are split: the most queries a second). Compressed kinds use float16 lookup tables
there (FAISS's GPU IVF-PQ needs them for many sub-quantisers). The fast-scan layout (``nbits=4``) has
no GPU version: one GPU asked for searches on the CPU, saying so; ``multi_gpu`` refuses it, as it
refuses a faiss without GPU support or without a visible GPU (:func:`check_multi_gpu`). The CPU index
stays beside the GPU copies: it is what is saved, and what gives stored vectors back. Building
(training and adding) always runs on the CPU.
"""
from __future__ import annotations

# faiss before torch: both bring an OpenMP runtime (DESIGN.md).
import faiss  # isort: skip

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .store import LayerFile, file_sha256, layer_file, read_layer_batches

INDEX_KINDS = ("flat", "ivf", "ivfpq", "opq-ivfpq")
IVF_KINDS = ("ivf", "ivfpq", "opq-ivfpq")
COMPRESSED_KINDS = ("ivfpq", "opq-ivfpq")
MULTI_GPU_MODES = ("shard", "replicate")
# FAISS's k-means wants at least 39 training points per centroid; more than 256 per centroid adds little.
IVF_TRAIN_POINTS_PER_LIST = 256
PQ_MIN_TRAIN_POINTS_PER_CENTROID = 39
DEFAULT_PQ_M = 64  # at most: the largest divisor of the dimension up to this
DEFAULT_NBITS = 8
DEFAULT_RERANK = 100  # candidates of a compressed index re-ranked exactly, unless told otherwise
DEFAULT_CHUNK_VECTORS = 65536
DEFAULT_CHECKPOINT_EVERY = 16  # chunks
_NORMALISE_ROWS = 65536  # rows converted to float32 at a time, so a float16 memmap is never copied whole
_CHECKPOINT_FORMAT = "ssl_patch_analysis.index_build"
CHECKPOINT_PREFIX = ".build"  # .build.json and .build.<vectors>.faiss in the folder being built


def normalised_float32(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` (``V x D``, any float dtype, memmap allowed) as a new C-contiguous float32 array of unit rows.

    All-zero rows stay zero (their cosine similarity to anything is 0), instead of becoming NaN.
    """
    vectors = np.asarray(vectors) if not isinstance(vectors, np.memmap) else vectors
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be 2-D (V x D), got shape {vectors.shape}")
    out = np.empty(vectors.shape, dtype=np.float32)
    for start in range(0, len(vectors), _NORMALISE_ROWS):
        block = out[start:start + _NORMALISE_ROWS]
        block[...] = vectors[start:start + _NORMALISE_ROWS]  # converted in place: no temporary copy
        squared = np.einsum("ij,ij->i", block, block)
        if not np.isfinite(squared).all():  # NaN or inf somewhere, or finite values whose squares overflow
            if not np.isfinite(block).all():
                raise ValueError("vectors contain NaN or infinite values: the embeddings are damaged, re-extract them")
            wide = block.astype(np.float64)
            squared = np.einsum("ij,ij->i", wide, wide)
        block /= np.maximum(np.sqrt(squared), np.finfo(np.float32).tiny)[:, None]
    return out


# ---------------------------------------------------------------------- where the exact vectors are
class VectorSource:
    """The exact vectors of an index, by row: ``rows(ids)`` and ``chunks(start, size)`` give float32 unit rows."""

    num_vectors: int
    dim: int

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The unit vectors of ``rows`` (any order, repeats allowed), ``len(rows) x dim`` float32."""
        raise NotImplementedError

    def chunks(self, start: int, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, unit vectors)`` of consecutive chunks of about ``size`` rows from row ``start`` to the end."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any] | None:
        """What names these vectors across processes (a store's id and layer), or None for vectors in memory."""
        return None

    def describe(self) -> dict[str, Any]:
        """What ``info.json`` records of the vectors (where a loaded index finds them again)."""
        return {"source": "memory", "num_vectors": self.num_vectors, "dim": self.dim}


class ArrayVectors(VectorSource):
    """Vectors of an array in memory (``V x D``, any float dtype; a memory map is read a chunk at a time)."""

    def __init__(self, vectors: np.ndarray):
        if np.ndim(vectors) != 2 or len(vectors) == 0:
            raise ValueError(f"vectors must be a non-empty V x D array, got shape {np.shape(vectors)}; "
                             "the index needs at least one patch vector")
        self.vectors = vectors
        self.num_vectors, self.dim = (int(s) for s in vectors.shape)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")  # sorted reads of a memory map touch each page once
        out = np.empty((len(rows), self.dim), np.float32)
        if len(rows):
            out[order] = normalised_float32(self.vectors[rows[order]])
        return out

    def chunks(self, start: int, size: int) -> Iterator[tuple[int, np.ndarray]]:
        for first in range(start, self.num_vectors, size):
            yield first, normalised_float32(self.vectors[first:first + size])


class StoreVectors(VectorSource):
    """One layer of a complete patch-embedding store, read with positional reads (``os.pread``).

    Nothing is memory-mapped: only the rows asked for are in memory, so a store many times the RAM can
    be indexed and re-ranked against. ``chunks`` gives whole store batches, each checked against its
    record (CRC-32) as it is read; ``rows`` (re-ranking, training samples) reads single rows unchecked,
    as a memory-mapped store's rows are read.
    """

    def __init__(self, path: str | os.PathLike, layer: str):
        self._fd: int | None = None
        self.layer_file: LayerFile = layer_file(path, layer)
        num_images, patches, dim = self.layer_file.shape
        self.num_vectors, self.dim, self.patches_per_image = num_images * patches, dim, patches

    @property
    def path(self) -> Path:
        return self.layer_file.store

    @property
    def store_id(self) -> str:
        return str(self.layer_file.meta["store_id"])

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.layer_file.file, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def raw_rows(self, rows: np.ndarray) -> np.ndarray:
        """The stored values (the store's dtype) of ``rows``, in the order asked."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_vectors):
            raise ValueError(f"rows must be in 0..{self.num_vectors - 1}, got {rows.min()}..{rows.max()}")
        out = np.empty((len(rows), self.dim), self.layer_file.dtype)
        fd, size, offset = self._file(), self.layer_file.row_bytes, self.layer_file.offset
        buffer = memoryview(out.reshape(-1).view(np.uint8))  # slices of it are cheaper than numpy row views
        for i, row in enumerate(rows.tolist()):
            if os.preadv(fd, [buffer[i * size:(i + 1) * size]], offset + row * size) != size:
                raise ValueError(f"the store at {self.path} is damaged ({self.layer_file.file.name} ends before row "
                                 f"{row}): re-run the command that made it")
        return out

    def rows(self, rows: np.ndarray) -> np.ndarray:
        return normalised_float32(self.raw_rows(rows))

    def chunks(self, start: int, size: int) -> Iterator[tuple[int, np.ndarray]]:
        meta, patches = self.layer_file.meta, self.patches_per_image
        batch_vectors = int(meta["batch_size"]) * patches
        if start % batch_vectors and start != self.num_vectors:
            raise ValueError(f"a chunk of {self.path} starts at a whole batch (every {batch_vectors} vectors), not at "
                             f"vector {start}")
        first_row, pending = start, []  # whole batches, at most ``size`` vectors (or one batch, if larger)
        for _, rows in read_layer_batches(self.layer_file, first_batch=start // batch_vectors):
            rows = rows.reshape(-1, self.dim)
            if pending and sum(len(p) for p in pending) + len(rows) > size:
                block = normalised_float32(np.concatenate(pending) if len(pending) > 1 else pending[0])
                yield first_row, block
                first_row, pending = first_row + len(block), []
            pending.append(rows)
        if pending:
            yield first_row, normalised_float32(np.concatenate(pending) if len(pending) > 1 else pending[0])

    def identity(self) -> dict[str, Any]:
        return {"store_id": self.store_id, "layer": self.layer_file.layer, "num_vectors": self.num_vectors,
                "dim": self.dim}

    def describe(self) -> dict[str, Any]:
        return {"source": "store", "store": str(self.path.resolve()), **self.identity()}


def source_of_layer(array: np.ndarray, layer: str, store_meta: dict[str, Any] | None) -> VectorSource:
    """The vectors of an ``N x P x D`` layer array: the store behind it when it is a memory map of a complete store
    with the same id (read without the map then), else the array itself."""
    filename = getattr(array, "filename", None)
    if isinstance(array, np.memmap) and filename and store_meta and store_meta.get("store_id"):
        path = Path(filename).parent
        try:
            source = StoreVectors(path, layer)
        except (OSError, ValueError, RuntimeError):
            source = None
        if source is not None and source.store_id == store_meta["store_id"] and \
                source.layer_file.shape == tuple(array.shape):
            return source
    return ArrayVectors(array.reshape(-1, array.shape[-1]))


def exact_search(source: VectorSource, queries: np.ndarray, k: int, chunk_vectors: int = DEFAULT_CHUNK_VECTORS,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The exact cosine top ``k`` of each unit query among all vectors of ``source``, streamed a chunk at a time:
    ``(similarities, rows)``, each ``Q x k``, nearest first (memory: one chunk and the running top ``k``)."""
    from tqdm import tqdm

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_similarities = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    with tqdm(total=source.num_vectors, unit="vec", unit_scale=True, disable=not progress, dynamic_ncols=True,
              mininterval=1.0, desc="exact search") as bar:
        for first, chunk in source.chunks(0, chunk_vectors):
            similarities, rows = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
            best_similarities = np.concatenate([best_similarities, similarities], axis=1)
            best_rows = np.concatenate([best_rows, rows + first], axis=1)
            order = np.argsort(-best_similarities, axis=1, kind="stable")[:, :k]
            best_similarities = np.take_along_axis(best_similarities, order, axis=1)
            best_rows = np.take_along_axis(best_rows, order, axis=1)
            bar.update(len(chunk))
    return best_similarities, best_rows


# ---------------------------------------------------------------------- the kinds
@dataclass(frozen=True)
class IndexSpec:
    """The FAISS index to build: ``kind`` (:data:`INDEX_KINDS`), ``nlist`` inverted lists (IVF kinds; default
    ``~sqrt(V)``), ``pq_m`` sub-quantisers of ``nbits`` bits (compressed kinds; default the largest divisor of the
    dimension up to 64), ``train_size`` training vectors (default ``256 x nlist``, at least ``39 x 2**nbits`` for
    the compressed kinds, at most all)."""

    kind: str = "flat"
    nlist: int | None = None
    pq_m: int | None = None
    nbits: int = DEFAULT_NBITS
    train_size: int | None = None

    def resolved(self, count: int, dim: int) -> IndexSpec:
        """This spec with every default filled in for ``count`` vectors of ``dim`` dimensions; a ValueError names a
        setting those vectors do not allow, and what to pass instead."""
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        if self.kind == "flat":
            return IndexSpec("flat", nbits=self.nbits)
        nlist = int(self.nlist) if self.nlist is not None else max(1, round(np.sqrt(count)))
        if not 1 <= nlist <= count:
            raise ValueError(f"nlist must be between 1 and the number of vectors ({count}), got {nlist}")
        pq_m, nbits = None, self.nbits
        wanted = IVF_TRAIN_POINTS_PER_LIST * nlist
        if self.kind in COMPRESSED_KINDS:
            divisors = [m for m in range(1, dim + 1) if dim % m == 0]
            pq_m = int(self.pq_m) if self.pq_m is not None else max(m for m in divisors if m <= DEFAULT_PQ_M)
            if pq_m not in divisors:
                shown = ", ".join(map(str, [m for m in divisors if m <= 256]))
                raise ValueError(f"pq_m (--pq-m) must divide the dimension {dim}: one of {shown}; got {pq_m}")
            if not 1 <= nbits <= 16:
                raise ValueError(f"nbits (--nbits) must be between 1 and 16, got {nbits}")
            wanted = max(wanted, PQ_MIN_TRAIN_POINTS_PER_CENTROID * 2 ** nbits)
        train_size = min(count, int(self.train_size) if self.train_size is not None else wanted)
        if train_size < nlist:
            raise ValueError(f"train_size {train_size} must be at least nlist ({nlist}): k-means needs a training "
                             "vector per list")
        if pq_m is not None and train_size < 2 ** nbits:
            largest = int(np.floor(np.log2(train_size)))
            raise ValueError(f"{nbits}-bit codes need at least 2**{nbits} = {2 ** nbits} training vectors, "
                             f"{'the index has' if train_size == count else 'train_size is'} {train_size}: pass "
                             f"nbits (--nbits) <= {largest}" + ("" if train_size == count else ", or a larger "
                                                                 "train_size"))
        return IndexSpec(self.kind, nlist, pq_m, nbits, train_size)

    @property
    def fast_scan(self) -> bool:
        return self.kind in COMPRESSED_KINDS and self.nbits == 4

    def factory(self) -> str:
        """The ``faiss.index_factory`` description of a resolved spec."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "ivf":
            return f"IVF{self.nlist},Flat"
        # "np": no polysemous training (a slow annealing of the code order, for a search mode not used here).
        codes = f"PQ{self.pq_m}x4fs" if self.fast_scan else f"PQ{self.pq_m}x{self.nbits}np"
        rotation = f"OPQ{self.pq_m}," if self.kind == "opq-ivfpq" else ""
        return f"{rotation}IVF{self.nlist},{codes}"

    def info(self) -> dict[str, Any]:
        """What ``PatchIndex.info`` records of a resolved spec."""
        info: dict[str, Any] = {"index": self.kind, "faiss_factory": self.factory()}
        if self.kind != "flat":
            info.update(nlist=self.nlist, train_vectors=self.train_size)
        if self.kind in COMPRESSED_KINDS:
            info.update(pq_m=self.pq_m, nbits=self.nbits, code_bytes=(self.pq_m * self.nbits + 7) // 8)
        return info


def index_metric(index: faiss.Index) -> int:
    """The metric an index compares by (that of the index behind a pre-transform, which keeps its own default)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return int(index.metric_type)


def index_kind(index: faiss.Index) -> str | None:
    """Which of :data:`INDEX_KINDS` a (read-back) FAISS index is, or None for anything else."""
    index = faiss.downcast_index(index)
    opq = False
    if isinstance(index, faiss.IndexPreTransform):
        chain = [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]
        # A trained OPQMatrix is written as the LinearTransform it is, and read back as one.
        if len(chain) != 1 or not isinstance(chain[0], faiss.LinearTransform):
            return None
        index, opq = faiss.downcast_index(index.index), True
    if isinstance(index, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)):
        return "opq-ivfpq" if opq else "ivfpq"
    if opq:
        return None
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    return "flat" if isinstance(index, faiss.IndexFlat) else None


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Search ``nprobe`` lists of an IVF index, wherever it is (behind OPQ, on one GPU, sharded over several)."""
    # GpuParameterSpace knows GPU indexes, shards and replicas, and hands every other index to ParameterSpace.
    space = getattr(faiss, "GpuParameterSpace", faiss.ParameterSpace)()
    space.set_index_parameter(index, "nprobe", int(nprobe))


# ---------------------------------------------------------------------- building, resumable
def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (renames into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BuildCheckpoint:
    """The partial index of a build, in the folder the index is built in: ``.build.<vectors>.faiss`` (the index
    holding the first ``vectors`` vectors) and ``.build.json`` (which file, its sha256, the build's settings),
    each written under a temporary name, flushed and renamed, ``.build.json`` last: an interrupted build
    leaves the last complete checkpoint, never half of one."""

    def __init__(self, folder: str | os.PathLike, key: dict[str, Any]):
        self.folder, self.key = Path(folder), json.loads(json.dumps(key))
        self.record = self.folder / f"{CHECKPOINT_PREFIX}.json"

    def files(self) -> list[Path]:
        """The checkpoint's own files in the folder (nothing else is ever removed)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.name == self.record.name or (
            p.name.startswith(f"{CHECKPOINT_PREFIX}.") and p.name.endswith((".faiss", ".faiss.tmp", ".json.tmp"))))

    def load(self) -> faiss.Index | None:
        """The checkpointed partial index of a build with these settings, or None (said on stderr when one of
        other settings, or damaged, is there: the build then starts again)."""
        if not self.record.is_file():
            return None
        try:
            record = json.loads(self.record.read_text(encoding="utf-8"))
            file = self.folder / record["file"]
            if record.get("format") != _CHECKPOINT_FORMAT or record.get("key") != self.key:
                reason = "it was made with other settings or from other vectors"
            elif not file.is_file() or file.stat().st_size != record["bytes"] or file_sha256(file) != record["sha256"]:
                reason = f"{file.name} does not match its checksum"
            else:
                index = faiss.read_index(str(file))
                if index.ntotal == record["vectors"]:
                    return index
                reason = f"{file.name} holds {index.ntotal} vectors, not the {record['vectors']} recorded"
        except (ValueError, KeyError, TypeError, OSError, RuntimeError) as error:
            reason = f"it cannot be read ({' '.join(str(error).split())[:120]})"
        print(f"not resuming the partial index in {self.folder}: {reason}; building it again", file=sys.stderr,
              flush=True)
        self.clear()
        return None

    def save(self, index: faiss.Index) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        vectors = int(index.ntotal)
        file = self.folder / f"{CHECKPOINT_PREFIX}.{vectors}.faiss"
        staged = file.with_name(file.name + ".tmp")
        faiss.write_index(index, str(staged))
        fsync_path(staged)
        os.replace(staged, file)
        record = {"format": _CHECKPOINT_FORMAT, "key": self.key, "vectors": vectors, "file": file.name,
                  "bytes": file.stat().st_size, "sha256": file_sha256(file)}
        staged_record = self.record.with_name(self.record.name + ".tmp")
        with open(staged_record, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged_record, self.record)
        fsync_path(self.folder)
        for old in self.files():  # earlier checkpoints, now superseded
            if old not in (file, self.record):
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        for path in self.files():
            path.unlink(missing_ok=True)


def _new_trained_index(source: VectorSource, spec: IndexSpec, seed: int) -> faiss.Index:
    index = faiss.index_factory(source.dim, spec.factory(), faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "flat":
        return index
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    sample = np.sort(np.random.default_rng(seed).permutation(source.num_vectors)[:spec.train_size])
    index.train(source.rows(sample))
    return index


def build_faiss_index(source: VectorSource, spec: IndexSpec, *, seed: int = 0,
                      chunk_vectors: int = DEFAULT_CHUNK_VECTORS, checkpoint: str | os.PathLike | None = None,
                      checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                      progress: bool = False) -> tuple[faiss.Index, dict[str, Any]]:
    """A FAISS index of every vector of ``source`` (row ``i`` is FAISS id ``i``) and what ``info`` records of it.

    The quantisers of the IVF kinds are trained on ``spec.train_size`` rows drawn with ``seed``; then the
    vectors are added ``chunk_vectors`` at a time (a store's whole batches), so memory holds one chunk
    and the index, never the vectors. With ``checkpoint`` (a folder) and a :class:`StoreVectors` source,
    the trained index and then every ``checkpoint_every`` chunks are checkpointed there
    (:class:`BuildCheckpoint`); a build with the same settings resumes from the last one. The caller
    removes the checkpoint once the index is saved (:meth:`BuildCheckpoint.clear`).
    """
    from tqdm import tqdm

    spec = spec.resolved(source.num_vectors, source.dim)
    if chunk_vectors < 1 or checkpoint_every < 1:
        raise ValueError(f"chunk_vectors and checkpoint_every must be positive, got {chunk_vectors}, "
                         f"{checkpoint_every}")
    saver = None
    if checkpoint is not None and source.identity() is not None:
        saver = BuildCheckpoint(checkpoint, {"factory": spec.factory(), "train_size": spec.train_size, "seed": seed,
                                             "chunk_vectors": chunk_vectors, "vectors": source.identity()})
    index = saver.load() if saver is not None else None
    if index is not None:
        print(f"resuming the index build in {saver.folder}: {index.ntotal:,} of {source.num_vectors:,} vectors "
              "already added", file=sys.stderr, flush=True)
    else:
        index = _new_trained_index(source, spec, seed)
        if saver is not None and spec.kind != "flat":
            saver.save(index)  # training can be the longest part: never repeat it
    try:
        with tqdm(total=source.num_vectors, initial=index.ntotal, unit="vec", unit_scale=True, disable=not progress,
                  dynamic_ncols=True, mininterval=1.0, desc=f"adding to {spec.factory()}") as bar:
            for done, (first, chunk) in enumerate(source.chunks(int(index.ntotal), chunk_vectors), start=1):
                if first != index.ntotal:
                    raise RuntimeError(f"chunk at row {first} while the index holds {index.ntotal} vectors")
                index.add(chunk)
                bar.update(len(chunk))
                if saver is not None and done % checkpoint_every == 0 and index.ntotal < source.num_vectors:
                    saver.save(index)
    except ValueError:  # damaged vectors (a store batch failing its checksum): its training sample may be too
        if saver is not None:
            saver.clear()
        raise
    if spec.kind in IVF_KINDS:
        faiss.extract_index_ivf(index).make_direct_map()  # stored vectors can be read back without the source
    return index, {**spec.info(), "seed": seed}


# ---------------------------------------------------------------------- where searches run
def faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _gpu_refusal(kind: str, fast_scan: bool) -> str | None:
    if fast_scan:
        return f"FAISS has no GPU version of the fast-scan {kind} layout (nbits=4): build it with --nbits 8"
    return None


def check_multi_gpu(multi_gpu: str, kind: str, fast_scan: bool) -> int:
    """How many GPUs ``multi_gpu`` will use for an index of ``kind``; a ValueError (one line, what to do instead)
    when this faiss has no GPU support, sees no GPU, or has no GPU version of the index."""
    if multi_gpu not in MULTI_GPU_MODES:
        raise ValueError(f"multi_gpu must be one of {', '.join(MULTI_GPU_MODES)}, got {multi_gpu!r}")
    if not hasattr(faiss, "StandardGpuResources"):
        raise ValueError(f"--multi-gpu {multi_gpu} needs faiss with GPU support; this faiss {faiss.__version__} is "
                         "CPU-only (pip install faiss-gpu, or faiss-gpu-cu12 for CUDA 12: see the README): leave "
                         "--multi-gpu out to search on the CPU")
    count = faiss.get_num_gpus()
    if count == 0:
        raise ValueError(f"--multi-gpu {multi_gpu}: faiss sees no GPU (check CUDA_VISIBLE_DEVICES and the driver); "
                         "leave --multi-gpu out to search on the CPU")
    refusal = _gpu_refusal(kind, fast_scan)
    if refusal:
        raise ValueError(f"--multi-gpu {multi_gpu}: {refusal}")
    return count


def place_index(cpu_index: faiss.Index, kind: str, gpu: int | None = None,
                multi_gpu: str | None = None) -> tuple[faiss.Index, str, Any]:
    """The index searches run on and where that is: ``cpu_index`` itself, a copy on GPU ``gpu``, or with
    ``multi_gpu`` (``"shard"``: each GPU holds a part of the vectors; ``"replicate"``: each holds all and the
    queries are split) copies on every visible GPU (``faiss.index_cpu_to_all_gpus``). The third value keeps
    the GPU resources alive as long as the index.

    ``multi_gpu`` with a faiss without GPU support, or with no GPU visible, is refused (ValueError); one
    GPU asked of such a faiss searches on the CPU, saying so.
    """
    inner = faiss.downcast_index(cpu_index.index) if isinstance(cpu_index, faiss.IndexPreTransform) else cpu_index
    fast_scan = isinstance(faiss.downcast_index(inner), faiss.IndexIVFPQFastScan)
    if multi_gpu is not None:
        count = check_multi_gpu(multi_gpu, kind, fast_scan)
        options = faiss.GpuMultipleClonerOptions()
        options.shard = multi_gpu == "shard"
        options.useFloat16 = kind in COMPRESSED_KINDS  # float16 lookup tables: GPU IVF-PQ needs them for large m
        placed = faiss.index_cpu_to_all_gpus(cpu_index, co=options)  # keeps its GpuResources referenced
        how = {"shard": "sharded", "replicate": "replicated"}[multi_gpu]
        return placed, f"{count} GPU{'s' * (count > 1)} ({how}, faiss GPU)", None
    if gpu is None:
        return cpu_index, "cpu", None
    if _gpu_refusal(kind, fast_scan):
        return cpu_index, "cpu (FAISS has no GPU fast-scan IVF-PQ)", None
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = kind in COMPRESSED_KINDS
    return faiss.index_cpu_to_gpu(resources, gpu, cpu_index, options), f"cuda:{gpu} (faiss GPU)", resources


class IndexVectors(VectorSource):
    """The vectors a flat or IVF-Flat index holds (its unit float32 copies: exact), read back a chunk at a time."""

    def __init__(self, index: faiss.Index):
        self.index, self.num_vectors, self.dim = index, int(index.ntotal), int(index.d)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))

    def chunks(self, start: int, size: int) -> Iterator[tuple[int, np.ndarray]]:
        for first in range(start, self.num_vectors, size):
            yield first, self.index.reconstruct_n(first, min(size, self.num_vectors - first))


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.index says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
