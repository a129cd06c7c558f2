"""Patch retrieval (paper Fig. 5): the nearest patches of a query patch among all patches of a data set.

A :class:`PatchIndex` holds the L2-normalised embeddings of every patch of a
:class:`~ssl_patch_analysis.store.PatchEmbeddings` (layer ``h`` or ``z``) in a FAISS index, exact
inner product (``IndexFlatIP``: cosine similarity) by default, ``IndexIVFFlat`` for large patch
sets, product-quantised ``IndexIVFPQ`` (optionally behind OPQ) for patch sets larger than memory
(:mod:`.index` says which to choose), on the GPU when the installed faiss has GPU support and the
device is CUDA, or on every GPU (``multi_gpu``). Beside every vector it keeps where the patch came
from (image id, patch index, box, label), so results are patches, not row numbers;
``save(dir)`` / ``PatchIndex.load(dir)`` keep both.

A compressed index only estimates similarities from its codes: its top ``rerank`` candidates are
re-ranked by their exact cosine to the query, computed from the exact vectors (the store it was
built from, read row by row; or the array in memory), so the neighbours and similarities it returns
are exact ones among those candidates. Built from a store (:meth:`PatchIndex.from_store`, or
:meth:`PatchIndex.from_embeddings` of a store opened from disk), the vectors are streamed in chunks,
never held whole, and with ``save_to`` the build is checkpointed in the index's folder and resumed
after an interruption; info.json records the store, and loading re-opens it for re-ranking.

A saved index is a folder::

    index.faiss    the FAISS index (``faiss.write_index``)
    metadata.npz   image_ids, patch_index, boxes, labels: one row per vector
    info.json      settings, how to rebuild it (the retrieval command that saved it), the size and
                   sha256 of the two files above, and the sha256 of its own content (info_sha256)
    .lock          the writer's lock (fcntl.flock); holds only the writer's process id

Loading verifies every file against info.json by default (``verify=False`` skips the checksums,
not the checks of structure) and reports damage naming the file and how to rebuild the index
(:class:`DamagedIndexError`). Saving takes the folder's lock, so one process writes it at a time,
writes the new files beside the old ones (``.index.faiss.tmp`` ...), flushes them to disk, and
only then moves them in, info.json last; a reader takes the lock shared, so it sees the old index
or the new one, never half of each. Only the index's own files are replaced; replacing an index
needs ``overwrite=True`` (``--overwrite``). A search that cannot find ``k`` neighbours raises
(:class:`FewerNeighboursError`) instead of returning short lists.

:func:`neighbour_statistics` measures, over many random query patches, which fraction of their
``k`` neighbours come from the query's own image and from other images of its class: the
projection ``z`` is expected to be more invariant (more same-class neighbours from other images),
the embedding ``h`` more local (more neighbours from the same image).

:func:`patch_retrieval` measures what the command line does, from Python: the indexes of every
grid patch, their statistics and the figure query's neighbours, set by a
:class:`RetrievalSettings` and returned as a :class:`RetrievalResult` (one
:class:`LayerRetrieval` per layer), whose ``to_json()`` is the command's JSON.

Command line (writes ``figures/retrieval_<model>_<data>.png`` and ``.json``, prints the table)::

    python -m ssl_patch_analysis.retrieval --model vicreg --data cifar10 --patch-size 16 --stride 8 \\
        --num-images 1000 --neighbours 8
    python -m ssl_patch_analysis.retrieval --model vicreg-resnet50 --download --data imagenette --num-images all \\
        --patch-size 64 --stride 32 --store stores/imagenette-val --index ivfpq --pq-m 64 --rerank 100 \\
        --save-index indexes/imagenette-val
"""
from __future__ import annotations

# faiss before torch: both bring an OpenMP runtime, and loading faiss's first avoids clashes (DESIGN.md).
import faiss  # isort: skip

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import cli
from .extract import extract_patch_embeddings, extract_token_embeddings
from .index import (  # noqa: F401  (IVF_TRAIN_POINTS_PER_LIST: imported from here by users of older versions)
    CHECKPOINT_PREFIX,
    COMPRESSED_KINDS,
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHUNK_VECTORS,
    DEFAULT_NBITS,
    DEFAULT_RERANK,
    INDEX_KINDS,
    IVF_KINDS,
    IVF_TRAIN_POINTS_PER_LIST,
    MULTI_GPU_MODES,
    ArrayVectors,
    BuildCheckpoint,
    IndexSpec,
    IndexVectors,
    StoreVectors,
    VectorSource,
    build_faiss_index,
    check_multi_gpu,
    exact_search,
    file_sha256,
    fsync_path,
    index_kind,
    index_metric,
    normalised_float32,
    place_index,
    set_nprobe,
    source_of_layer,
)
from .models import SSLModel
from .patches import grid
from .report import _plain, data_label, format_table, model_label, save_figure_and_json
from .store import PatchEmbeddings

RETRIEVAL_LAYERS = ("z", "h")  # the figure's row order: projection first, as in the paper
KIND_NAMES = {"flat": "flat", "ivf": "IVF", "ivfpq": "IVF-PQ", "opq-ivfpq": "OPQ + IVF-PQ"}
_INDEX_FILE, _METADATA_FILE, _INFO_FILE = "index.faiss", "metadata.npz", "info.json"
_INDEX_FILES = (_INDEX_FILE, _METADATA_FILE, _INFO_FILE)  # in the order a save moves them in: info.json last
_CHECKSUMMED_FILES = (_INDEX_FILE, _METADATA_FILE)
_LOCK_FILE = ".lock"
INDEX_FORMAT = "ssl_patch_analysis.patch_index"
INDEX_VERSION = 1  # 1: checksums in info.json
_METADATA_ARRAYS = {"image_ids": (), "patch_index": (), "boxes": (4,), "labels": ()}  # name: shape of one row
_SAVED_ONLY = ("format", "version", "files", "command", "cwd", "info_sha256")  # in info.json, not in PatchIndex.info
_RERANK_ROWS = 16384  # candidate vectors re-ranked at a time (32 MiB of float32 at 512-d)
REBUILD_ADVICE = ("rebuild it: re-run the retrieval command that saved it with --overwrite "
                  "(`python -m ssl_patch_analysis.retrieval ... --save-index DIR --overwrite`), or build the index "
                  "again and save it with PatchIndex.save(dir, overwrite=True)")


@dataclass(frozen=True)
class Neighbour:
    """One retrieved patch: where it is (image, patch index, box ``x0, y0, x1, y1``) and how similar it is."""

    image_id: int
    patch_index: int
    box: tuple[float, float, float, float]
    label: int
    similarity: float
    row: int


class DamagedIndexError(ValueError):
    """A saved index whose files fail their checks: ``file`` is the one at fault, ``advice`` how to rebuild."""

    def __init__(self, path: str | os.PathLike, file: str, problem: str, advice: str = REBUILD_ADVICE):
        self.path, self.file, self.problem, self.advice = Path(path), file, problem, advice
        super().__init__(f"the patch index at {self.path} is damaged ({file}: {problem}): {advice}")


class IndexLockedError(BlockingIOError):
    """Another process is saving the index (raised by ``save(..., wait=False)``)."""


class FewerNeighboursError(ValueError):
    """A search found fewer than ``k`` neighbours of a query (NaN vectors, or an IVF index probing too few lists)."""


class RetrievalSettingError(ValueError):
    """A :class:`RetrievalSettings` value the data does not allow: ``setting`` names the field, ``value`` is what
    was given, ``requirement`` says what it must be (so that a command line can name its own flag instead)."""

    def __init__(self, setting: str, value: Any, requirement: str):
        self.setting, self.value, self.requirement = setting, value, requirement
        super().__init__(f"{setting} {value} must be {requirement}")


def _faiss_gpu_device(device: str | torch.device | None) -> int | None:
    """The GPU number FAISS should use, or ``None`` for the CPU (no CUDA device asked, or no GPU faiss)."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    return device.index or 0


# ---------------------------------------------------------------------- saved indexes: files, checks, the lock


def _json_value(value: Any) -> Any:
    """``json.dumps``'s ``default``: numpy scalars and arrays, paths."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"info value {value!r} ({type(value).__name__}) cannot be written to info.json")


def _info_digest(info: Mapping[str, Any]) -> str:
    content = {key: value for key, value in info.items() if key != "info_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _short(error: BaseException) -> str:
    """An exception as a short single line (FAISS's messages carry the C++ function and source line first)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text.rsplit("Error: ", 1)[-1][:200]


def _rebuild_advice(info: Mapping[str, Any]) -> str:
    """How to rebuild the index: the command recorded in its (verified) info.json, with --overwrite."""
    command, cwd = info.get("command"), info.get("cwd")
    try:
        words = shlex.split(command) if isinstance(command, str) else []
    except ValueError:
        words = []
    if words[:3] != ["python", "-m", "ssl_patch_analysis.retrieval"]:
        return REBUILD_ADVICE
    if "--overwrite" not in words:
        command = f"{command} --overwrite"
    return f"rebuild it: re-run `{command}`" + (f" in {cwd}" if isinstance(cwd, str) else "")


def _read_info(path: Path, verify: bool) -> dict[str, Any]:
    """info.json, checked against its digest (``verify``) and for the keys loading needs."""
    file = path / _INFO_FILE
    if not file.is_file():
        raise DamagedIndexError(path, _INFO_FILE, "missing")
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:  # not JSON, or not UTF-8
        raise DamagedIndexError(path, _INFO_FILE, f"not readable JSON ({_short(error)})") from None
    if not isinstance(info, dict):
        raise DamagedIndexError(path, _INFO_FILE, "not a JSON object")
    if verify:
        _check_info(path, info)
    kind = info.get("index")
    if kind is None:
        raise DamagedIndexError(path, _INFO_FILE, f"lacks 'index' (the index kind: {', '.join(INDEX_KINDS)})")
    if kind not in INDEX_KINDS:
        raise DamagedIndexError(path, _INFO_FILE, f"names an unknown index kind {kind!r}")
    if kind in IVF_KINDS and not (isinstance(info.get("nprobe"), int) and info["nprobe"] >= 1):
        raise DamagedIndexError(path, _INFO_FILE, "lacks 'nprobe' (the IVF lists searched per query)")
    rerank = info.get("rerank", 0)
    if not (isinstance(rerank, int) and rerank >= 0) or not isinstance(info.get("vectors", {}), dict):
        raise DamagedIndexError(path, _INFO_FILE, "has a 'rerank' or 'vectors' entry of the wrong type")
    return info


def _check_info(path: Path, info: Mapping[str, Any]) -> None:
    if "info_sha256" not in info and "files" not in info:
        raise ValueError(f"the patch index at {path} was saved by an older version ({_INFO_FILE} has no checksums "
                         f"to verify it by): {REBUILD_ADVICE}; or load it unchecked with "
                         "PatchIndex.load(dir, verify=False)")
    if info.get("info_sha256") != _info_digest(info):
        raise DamagedIndexError(path, _INFO_FILE, "its content does not match its checksum (info_sha256)")
    if info.get("format") != INDEX_FORMAT or info.get("version") != INDEX_VERSION:
        raise ValueError(f"the patch index at {path} has format {info.get('format')!r} version "
                         f"{info.get('version')!r}; this code reads {INDEX_FORMAT!r} version {INDEX_VERSION}: "
                         f"{REBUILD_ADVICE}")
    files = info.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(files.get(name), dict) and isinstance(files[name].get("bytes"), int)
            and isinstance(files[name].get("sha256"), str) for name in _CHECKSUMMED_FILES):
        raise DamagedIndexError(path, _INFO_FILE, "its checksums of the other files ('files') are incomplete")


def _check_checksums(path: Path, info: Mapping[str, Any], advice: str) -> None:
    for name in _CHECKSUMMED_FILES:
        expected, size = info["files"][name], (path / name).stat().st_size
        if size != expected["bytes"]:
            raise DamagedIndexError(path, name, f"{size:,} bytes where {expected['bytes']:,} were saved "
                                                "(truncated, or written over)", advice)
        if file_sha256(path / name) != expected["sha256"]:
            raise DamagedIndexError(path, name, "its content does not match its checksum (sha256)", advice)


def _read_faiss_index(path: Path, info: Mapping[str, Any], advice: str) -> faiss.Index:
    """index.faiss, checked to be the kind, size and dimension info.json says."""
    try:
        index = faiss.read_index(str(path / _INDEX_FILE))
    except (RuntimeError, MemoryError, ValueError) as error:
        raise DamagedIndexError(path, _INDEX_FILE, f"FAISS cannot read it ({_short(error)})", advice) from None
    inner_product = index_metric(index) == faiss.METRIC_INNER_PRODUCT
    kind = index_kind(index)
    if kind is None or not inner_product:
        raise DamagedIndexError(path, _INDEX_FILE, f"holds a {type(index).__name__} (metric {index_metric(index)}), "
                                                   "not one of the inner-product indexes PatchIndex saves", advice)
    if index.ntotal == 0:
        raise DamagedIndexError(path, _INDEX_FILE, "holds no vectors", advice)
    if info["index"] != kind:
        name = KIND_NAMES[kind]
        raise DamagedIndexError(path, _INFO_FILE, f"says a {info['index']} index but {_INDEX_FILE} holds "
                                                  f"{'an' if name[0] in 'IO' else 'a'} {name} index", advice)
    for key, found in (("num_vectors", index.ntotal), ("dim", index.d)):
        said = info.get(key, found)
        if said != found:
            what = "vectors" if key == "num_vectors" else "dimensions"
            raise DamagedIndexError(path, _INFO_FILE, f"says {said} {what} but {_INDEX_FILE} holds {found}", advice)
    return index


def _read_metadata(path: Path, count: int, advice: str) -> dict[str, np.ndarray]:
    """metadata.npz's arrays, one row per vector of the index."""
    file = path / _METADATA_FILE
    try:
        archive = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DamagedIndexError(path, _METADATA_FILE, f"not a readable .npz archive ({_short(error)})",
                                advice) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DamagedIndexError(path, _METADATA_FILE, "not an .npz archive", advice)
    with archive:
        missing = [name for name in _METADATA_ARRAYS if name not in archive.files]
        if missing:
            raise DamagedIndexError(path, _METADATA_FILE, f"lacks the array{'s' * (len(missing) > 1)} "
                                                          f"{', '.join(map(repr, missing))}", advice)
        try:
            arrays = {name: archive[name] for name in _METADATA_ARRAYS}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise DamagedIndexError(path, _METADATA_FILE, f"not a readable .npz archive ({_short(error)})",
                                    advice) from None
    for name, row_shape in _METADATA_ARRAYS.items():
        array = arrays[name]
        if array.ndim >= 1 and array.shape[0] != count:
            raise DamagedIndexError(path, _METADATA_FILE, f"{name!r} has {array.shape[0]} rows, for an index of "
                                                          f"{count} vectors", advice)
        if array.shape != (count, *row_shape) or not np.issubdtype(array.dtype, np.number):
            raise DamagedIndexError(path, _METADATA_FILE, f"{name!r} is {array.dtype} {array.shape}, "
                                                          f"numbers of shape {(count, *row_shape)} expected", advice)
    return arrays


def _lock_holder(path: Path) -> str:
    """Who holds the lock and why: the writer whose process id is in the lock file, if it is alive, or readers."""
    try:
        pid = int((path / _LOCK_FILE).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return "another process, which is reading"
    return f"process {pid}, which is saving"


def _take_lock(fd: int, mode: int, path: Path, wait: bool) -> None:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(path)
        if not wait:
            raise IndexLockedError(f"{holder.replace(', which', '')} the index at {path}: wait for it to finish, "
                                   "or save into another folder") from None
        print(f"waiting for {holder} the index at {path} (one writer at a time)", file=sys.stderr, flush=True)
        fcntl.flock(fd, mode)


@contextlib.contextmanager
def _writer_lock(path: Path, wait: bool) -> Iterator[None]:
    """Hold the folder for writing: an exclusive ``fcntl.flock`` on its lock file, released when the process dies."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _take_lock(fd, fcntl.LOCK_EX, path, wait)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # no writer now: a process still waiting is waiting for readers
    finally:
        os.close(fd)


@contextlib.contextmanager
def _reader_lock(path: Path) -> Iterator[None]:
    """Hold the folder for reading (a shared lock): no writer moves files in meanwhile."""
    try:
        fd = os.open(path / _LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file (saved by an older version, or copied without it): nobody is writing
        fd = None
    try:
        if fd is not None:
            _take_lock(fd, fcntl.LOCK_SH, path, wait=True)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _check_metadata_shapes(count: int, image_ids: np.ndarray, patch_index: np.ndarray, boxes: np.ndarray,
                           labels: np.ndarray) -> None:
    for name, array, shape in (("image_ids", image_ids, (count,)), ("patch_index", patch_index, (count,)),
                               ("boxes", boxes, (count, 4)), ("labels", labels, (count,))):
        if np.shape(array) != shape:
            raise ValueError(f"{name} must have shape {shape} (one per indexed vector), got {np.shape(array)}")


def _embeddings_info(meta: Mapping[str, Any], layer: str, num_images: int, num_patches: int) -> dict[str, Any]:
    """What an index of a store's (or embeddings') layer records of where its vectors came from."""
    return {"layer": layer, "num_images": int(num_images), "patches_per_image": int(num_patches),
            "model": meta.get("model"), "sampler": meta.get("sampler"), "dataset": meta.get("dataset"),
            "class_names": meta.get("class_names")}


def _refuse_to_replace(path: Path, overwrite: bool) -> None:
    existing = [name for name in _INDEX_FILES if (path / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{path} already holds a saved patch index ({', '.join(existing)}): pass "
                              "overwrite=True (--overwrite) to replace it, or save into another folder")


def _open_vectors(path: Path, info: Mapping[str, Any], index: faiss.Index,
                  vectors: VectorSource | np.ndarray | str | os.PathLike | None, needed: bool,
                  advice: str) -> VectorSource | None:
    """The exact vectors of a loaded index: ``vectors`` as given, or the store info.json names (for a compressed
    index, or where re-ranking ``needed`` them). A missing or different store is an error only when ``needed``."""
    if vectors is not None:
        if isinstance(vectors, VectorSource):
            source = vectors
        elif isinstance(vectors, (str, os.PathLike)):
            source = StoreVectors(vectors, str(info.get("layer") or (info.get("vectors") or {}).get("layer", "h")))
        else:
            source = ArrayVectors(np.asarray(vectors).reshape(-1, index.d) if np.ndim(vectors) == 3 else vectors)
        if (source.num_vectors, source.dim) != (index.ntotal, index.d):
            raise ValueError(f"vectors of shape {source.num_vectors} x {source.dim} are not those of the index at "
                             f"{path} ({index.ntotal} x {index.d})")
        return source
    record = info.get("vectors") or {}
    if not needed and info["index"] not in COMPRESSED_KINDS:
        return None
    instead = "pass vectors=STORE (--store) where it is now, or rerank=0 (--rerank 0) to search with the codes' " \
              "approximate similarities"
    if record.get("source") != "store":
        if needed:
            raise ValueError(f"the index at {path} re-ranks against exact vectors that were in memory when it was "
                             "built: pass them (PatchIndex.load(dir, vectors=ARRAY)), or rerank=0")
        return None
    try:
        source = StoreVectors(record["store"], record["layer"])
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        if needed:
            raise ValueError(f"the index at {path} re-ranks against the store at {record.get('store')}, which cannot "
                             f"be read ({_short(error)}): {instead}") from None
        return None
    if source.identity() != {key: record.get(key) for key in ("store_id", "layer", "num_vectors", "dim")}:
        if needed:
            raise ValueError(f"the store at {source.path} is not the one the index at {path} was built from (its id or "
                             f"shape differ: it was made again since): {advice}")
        return None
    return source


class PatchIndex:
    """Cosine k-NN over patch vectors, with each vector's image id, patch index, box and label.

    Build it with :meth:`from_embeddings` (a patch-embedding store) or :meth:`from_vectors`. The
    CPU index is kept even when searches run on a GPU copy: it is what is saved and what gives a
    stored vector back (:meth:`vector`).
    """

    def __init__(self, cpu_index: faiss.Index, image_ids: np.ndarray, patch_index: np.ndarray, boxes: np.ndarray,
                 labels: np.ndarray, info: dict[str, Any], device: str | torch.device | None = None, *,
                 vectors: VectorSource | None = None, multi_gpu: str | None = None):
        count = cpu_index.ntotal
        if count == 0:
            raise ValueError("the index is empty: build it from at least one patch vector")
        _check_metadata_shapes(count, image_ids, patch_index, boxes, labels)
        if vectors is not None and (vectors.num_vectors, vectors.dim) != (count, cpu_index.d):
            raise ValueError(f"the exact vectors ({vectors.num_vectors} x {vectors.dim}) are not those of the index "
                             f"({count} x {cpu_index.d})")
        self.cpu_index = cpu_index
        self.exact_vectors = vectors
        self.rebuild_advice = "rebuild it from its embeddings (PatchIndex.from_embeddings or from_vectors)"
        self.image_ids = np.asarray(image_ids, dtype=np.int64)
        self.patch_index = np.asarray(patch_index, dtype=np.int64)
        self.boxes = np.asarray(boxes, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.int64)
        unique_ids, counts = np.unique(self.image_ids, return_counts=True)
        self._patches_per_image = dict(zip(unique_ids.tolist(), counts.tolist(), strict=True))
        kind = info.get("index", "flat")
        gpu = _faiss_gpu_device(device)
        # The GPU resources must outlive the GPU index.
        self.search_index, where, self._gpu_resources = place_index(cpu_index, kind, gpu, multi_gpu)
        if gpu is None and multi_gpu is None and device is not None and torch.device(device).type == "cuda":
            where = "cpu (this faiss has no GPU support)"
        self.nprobe: int | None = None
        if kind in IVF_KINDS:
            self.nprobe = int(info["nprobe"])
            set_nprobe(self.search_index, self.nprobe)
        self.rerank = int(info.get("rerank", 0))
        if self.rerank and vectors is None:
            raise ValueError(f"rerank={self.rerank} needs the exact vectors to re-rank against (vectors=...): pass "
                             "them, or rerank=0")
        info = {**info, "rerank": self.rerank}
        if vectors is not None:
            info["vectors"] = vectors.describe()
        self.info = {**info, "num_vectors": count, "dim": cpu_index.d, "faiss_device": where,
                     "metric": "cosine (inner product of L2-normalised float32 vectors)"}

    def set_search(self, nprobe: int | None = None, rerank: int | None = None) -> None:
        """Search ``nprobe`` lists (IVF kinds) and re-rank the top ``rerank`` candidates exactly (0: not at all)."""
        kind = self.info["index"]
        if nprobe is not None:
            if kind not in IVF_KINDS:
                raise ValueError(f"nprobe applies to the IVF kinds ({', '.join(IVF_KINDS)}), not to a {kind} index")
            if int(nprobe) < 1:
                raise ValueError(f"nprobe must be at least 1, got {nprobe}")
            self.nprobe = min(int(nprobe), int(self.info["nlist"]))
            set_nprobe(self.search_index, self.nprobe)
            self.info["nprobe"] = self.nprobe
        if rerank is not None:
            if int(rerank) < 0:
                raise ValueError(f"rerank must be at least 0, got {rerank}")
            if rerank and self.exact_vectors is None:
                raise ValueError("this index has no exact vectors to re-rank against: load it with its store "
                                 "(PatchIndex.load(dir, vectors=STORE)) or build it with them")
            self.rerank = int(rerank)
            self.info["rerank"] = self.rerank

    # ------------------------------------------------------------------ building
    @classmethod
    def from_vectors(cls, vectors: np.ndarray, image_ids: np.ndarray, patch_index: np.ndarray, boxes: np.ndarray,
                     labels: np.ndarray, kind: str = "flat", nlist: int | None = None, nprobe: int = 8,
                     device: str | torch.device | None = None, seed: int = 0,
                     info: dict[str, Any] | None = None, **options: Any) -> PatchIndex:
        """Index ``vectors`` (``V x D``; normalised here) of the patches described by the other arrays.

        ``kind="ivf"`` clusters the vectors into ``nlist`` lists (default ``~sqrt(V)``), trained on
        a random sample of at most ``256 * nlist`` of them (``seed``), and searches ``nprobe`` lists;
        ``"ivfpq"`` and ``"opq-ivfpq"`` also compress them (``options``: see :meth:`from_source`). The
        compressed kinds keep a reference to ``vectors`` to re-rank against.
        """
        return cls.from_source(ArrayVectors(vectors), image_ids, patch_index, boxes, labels, kind=kind, nlist=nlist,
                               nprobe=nprobe, device=device, seed=seed, info=info, **options)

    @classmethod
    def from_embeddings(cls, embeddings: PatchEmbeddings, layer: str = "h", kind: str = "flat",
                        nlist: int | None = None, nprobe: int = 8, device: str | torch.device | None = None,
                        seed: int = 0, **options: Any) -> PatchIndex:
        """Index every patch of ``embeddings`` in ``layer`` (``"h"`` embedding or ``"z"`` projection).

        Vector ``row = i * P + j`` is patch ``j`` of image ``embeddings.image_ids[i]``. Embeddings opened
        from a store (memory-mapped) are read from the store in chunks, never whole, and the index
        re-ranks against it (as :meth:`from_store`); ``options``: see :meth:`from_source`.
        """
        array = embeddings.layer(layer)
        num_images, num_patches = array.shape[:2]
        return cls.from_source(
            source_of_layer(array, layer, embeddings.meta),
            image_ids=np.repeat(np.asarray(embeddings.image_ids, dtype=np.int64), num_patches),
            patch_index=np.tile(np.arange(num_patches, dtype=np.int64), num_images),
            boxes=np.asarray(embeddings.boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.repeat(np.asarray(embeddings.labels, dtype=np.int64), num_patches),
            kind=kind, nlist=nlist, nprobe=nprobe, device=device, seed=seed,
            info=_embeddings_info(embeddings.meta, layer, num_images, num_patches), **options)

    @classmethod
    def from_store(cls, store: str | os.PathLike, layer: str = "h", kind: str = "flat", nlist: int | None = None,
                   nprobe: int = 8, device: str | torch.device | None = None, seed: int = 0,
                   **options: Any) -> PatchIndex:
        """Index every patch of the complete store at ``store`` in ``layer``, reading it in chunks (never mapped,
        never whole: memory holds one chunk, the index and the per-vector metadata). ``options``: see
        :meth:`from_source`; with ``save_to`` the build is resumable."""
        source = StoreVectors(store, layer)
        meta = source.layer_file.meta
        num_images, num_patches = source.layer_file.shape[:2]
        path = source.path
        boxes = np.load(path / "boxes.npy")
        if boxes.shape != (num_images, num_patches, 4):
            raise ValueError(f"the store at {path} is damaged (boxes.npy has shape {boxes.shape}): re-extract it")
        return cls.from_source(
            source, image_ids=np.repeat(np.load(path / "image_ids.npy").astype(np.int64), num_patches),
            patch_index=np.tile(np.arange(num_patches, dtype=np.int64), num_images),
            boxes=boxes.reshape(-1, 4).astype(np.float32, copy=False),
            labels=np.repeat(np.load(path / "labels.npy").astype(np.int64), num_patches),
            kind=kind, nlist=nlist, nprobe=nprobe, device=device, seed=seed,
            info=_embeddings_info(meta, layer, num_images, num_patches), **options)

    @classmethod
    def from_source(cls, source: VectorSource, image_ids: np.ndarray, patch_index: np.ndarray, boxes: np.ndarray,
                    labels: np.ndarray, kind: str = "flat", nlist: int | None = None, nprobe: int = 8,
                    device: str | torch.device | None = None, seed: int = 0, info: dict[str, Any] | None = None, *,
                    pq_m: int | None = None, nbits: int = DEFAULT_NBITS, rerank: int | None = None,
                    train_size: int | None = None, multi_gpu: str | None = None,
                    chunk_vectors: int = DEFAULT_CHUNK_VECTORS, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                    progress: bool = False, save_to: str | os.PathLike | None = None, overwrite: bool = False,
                    command: str | None = None, wait: bool = True) -> PatchIndex:
        """Index the vectors of ``source`` (:mod:`.index`), row ``i`` being the patch of the metadata's row ``i``.

        - ``kind``, ``nlist``, ``pq_m``, ``nbits``, ``train_size``: the index (:class:`~.index.IndexSpec`;
          its quantisers trained on a sample drawn with ``seed``); ``nprobe`` lists searched.
        - ``rerank``: candidates re-ranked by their exact cosine (default 100 for the compressed kinds, 0
          otherwise).
        - ``multi_gpu``: ``"shard"`` or ``"replicate"`` over every visible GPU (faiss with GPU support).
        - ``chunk_vectors``: vectors added at a time; ``progress``: a progress bar.
        - ``save_to``: build in this folder and save the index there (:meth:`save`, with ``overwrite``,
          ``command``, ``wait``). Its lock is held throughout; vectors of a store are checkpointed there
          every ``checkpoint_every`` chunks, and a build interrupted is resumed by the same call.
        """
        count = source.num_vectors
        _check_metadata_shapes(count, image_ids, patch_index, boxes, labels)
        spec = IndexSpec(kind, nlist, pq_m, nbits, train_size).resolved(count, source.dim)
        if multi_gpu is not None:  # before the build, not after it
            check_multi_gpu(multi_gpu, spec.kind, spec.fast_scan)
        if isinstance(nprobe, bool) or int(nprobe) < 1:
            raise ValueError(f"nprobe must be at least 1, got {nprobe}")
        rerank = (DEFAULT_RERANK if kind in COMPRESSED_KINDS else 0) if rerank is None else int(rerank)
        if rerank < 0:
            raise ValueError(f"rerank must be at least 0, got {rerank}")
        info = {**(info or {}), **spec.info(), "rerank": rerank}
        if kind in IVF_KINDS:
            info["nprobe"] = min(int(nprobe), int(spec.nlist))
        keep = source if isinstance(source, StoreVectors) or kind in COMPRESSED_KINDS or rerank else None

        def build() -> PatchIndex:
            cpu_index, built = build_faiss_index(source, spec, seed=seed, chunk_vectors=chunk_vectors,
                                                 checkpoint=save_to, checkpoint_every=checkpoint_every,
                                                 progress=progress)
            return cls(cpu_index, image_ids, patch_index, boxes, labels, {**info, **built}, device=device,
                       vectors=keep, multi_gpu=multi_gpu)

        if save_to is None:
            return build()
        path = Path(save_to)
        with _writer_lock(path, wait):
            _refuse_to_replace(path, overwrite)
            index = build()
            index._save_locked(path, command)
            BuildCheckpoint(path, {}).clear()
        return index

    # ------------------------------------------------------------------ disk
    def save(self, path: str | os.PathLike, overwrite: bool = False, wait: bool = True,
             command: str | None = None) -> Path:
        """Write the index (``index.faiss``), the per-vector metadata (``metadata.npz``) and ``info.json``.

        The folder may hold other files (they stay); an index already there is replaced only with
        ``overwrite=True``. Another process saving into the same folder is waited for (said on
        stderr), or with ``wait=False`` raises :class:`IndexLockedError`. ``command`` (the command
        line that built the index) is recorded so that damage reports can say how to rebuild it.
        """
        path = Path(path)
        with _writer_lock(path, wait):
            _refuse_to_replace(path, overwrite)
            self._save_locked(path, command)
        return path

    def _save_locked(self, path: Path, command: str | None) -> None:
        """:meth:`save`'s writing, the folder's lock held."""
        staged = {name: path / f".{name}.tmp" for name in _INDEX_FILES}
        try:
            self._write_staged(staged, command)
            for name in _INDEX_FILES:  # info.json last: until it is in, it checks the old files, not a mix
                os.replace(staged[name], path / name)
            fsync_path(path)
        finally:
            for file in staged.values():
                file.unlink(missing_ok=True)

    def _write_staged(self, staged: dict[str, Path], command: str | None) -> None:
        """The three files under their temporary names, each on disk (fsync) before info.json records it."""
        faiss.write_index(self.cpu_index, str(staged[_INDEX_FILE]))
        fsync_path(staged[_INDEX_FILE])
        with open(staged[_METADATA_FILE], "wb") as f:
            np.savez(f, image_ids=self.image_ids, patch_index=self.patch_index, boxes=self.boxes, labels=self.labels)
            f.flush()
            os.fsync(f.fileno())
        info = {key: value for key, value in self.info.items() if key not in ("faiss_device", *_SAVED_ONLY)}
        info.update(format=INDEX_FORMAT, version=INDEX_VERSION,
                    files={name: {"bytes": staged[name].stat().st_size, "sha256": file_sha256(staged[name])}
                           for name in _CHECKSUMMED_FILES})
        if command:
            info.update(command=command, cwd=os.getcwd())
        content = json.loads(json.dumps(info, default=_json_value))
        content["info_sha256"] = _info_digest(content)
        with open(staged[_INFO_FILE], "wb") as f:
            f.write((json.dumps(content, indent=1) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None, verify: bool = True, *,
             vectors: VectorSource | np.ndarray | str | os.PathLike | None = None, rerank: int | None = None,
             multi_gpu: str | None = None) -> PatchIndex:
        """Read an index written by :meth:`save` (searches on ``device``'s GPU when faiss supports it, or on
        every GPU with ``multi_gpu``).

        Every file is checked against the checksums in info.json (``verify=False``: only their
        structure); damage raises :class:`DamagedIndexError`, naming the file and how to rebuild the
        index. A process saving into the folder is waited for.

        A compressed index re-opens the store it was built from (recorded in info.json; checked to be
        that store, by its id and shape, and its files but the rows) to re-rank its top ``rerank``
        candidates (default: as saved). ``vectors`` gives them instead: the store's folder where it is
        now, or the array the index was built from. ``rerank=0`` searches without them.
        """
        path = Path(path)
        if not any((path / name).is_file() for name in _INDEX_FILES):
            raise FileNotFoundError(f"no patch index at {path} (missing {', '.join(_INDEX_FILES)}): write one with "
                                    "PatchIndex.save(dir) or `python -m ssl_patch_analysis.retrieval ... "
                                    "--save-index DIR` (which saves DIR/z and DIR/h)")
        with _reader_lock(path):
            info = _read_info(path, verify)
            advice = _rebuild_advice(info)
            for name in _CHECKSUMMED_FILES:
                if not (path / name).is_file():
                    raise DamagedIndexError(path, name, "missing", advice)
            if verify:
                _check_checksums(path, info, advice)
            index = _read_faiss_index(path, info, advice)
            arrays = _read_metadata(path, index.ntotal, advice)
        rerank = int(info.get("rerank", 0)) if rerank is None else int(rerank)
        source = _open_vectors(path, info, index, vectors, rerank > 0, advice)
        kept = {key: value for key, value in info.items() if key not in _SAVED_ONLY}
        loaded = cls(index, info={**kept, "rerank": rerank}, device=device, vectors=source, multi_gpu=multi_gpu,
                     **arrays)
        loaded.rebuild_advice = advice
        return loaded

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return int(self.cpu_index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.cpu_index.d)

    def row(self, image_id: int, patch_index: int | None = None, box: Sequence[float] | None = None) -> int:
        """The vector row of patch ``patch_index`` (or the patch with box ``box``) of image ``image_id``."""
        if (patch_index is None) == (box is None):
            raise ValueError("give exactly one of patch_index and box to name the query patch")
        in_image = self.image_ids == int(image_id)
        if not in_image.any():
            raise ValueError(f"image {image_id} is not in the index (it holds {len(self._patches_per_image)} images, "
                             f"ids {self.image_ids.min()}..{self.image_ids.max()})")
        if patch_index is not None:
            rows = np.flatnonzero(in_image & (self.patch_index == int(patch_index)))
            what = f"patch {patch_index}"
        else:
            rows = np.flatnonzero(in_image & (self.boxes == np.asarray(box, dtype=np.float32)).all(axis=1))
            what = f"a patch with box {list(box)}"
        if len(rows) == 0:
            raise ValueError(f"image {image_id} has no {what} in the index (it has patches 0.."
                             f"{self._patches_per_image[int(image_id)] - 1}); to search with any other patch, "
                             "embed it and use query_vectors")
        return int(rows[0])

    def vector(self, row: int) -> np.ndarray:
        """The stored (unit) vector of ``row``."""
        if not 0 <= int(row) < len(self):
            raise ValueError(f"row must be in 0..{len(self) - 1}, got {row}")
        return self.vectors_of(np.array([int(row)]))[0]

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """The unit vectors of ``rows``: exact ones (the exact vectors, or a flat / IVF-Flat index's own), or for a
        compressed index without its exact vectors the normalised reconstruction from its codes."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.exact_vectors is not None:
            return self.exact_vectors.rows(rows)
        stored = self.cpu_index.reconstruct_batch(rows)
        return normalised_float32(stored) if self.info["index"] in COMPRESSED_KINDS else stored

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int, exclude_rows: np.ndarray | None = None,
               exclude_image_ids: np.ndarray | None = None,
               allow_fewer: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most cosine-similar vectors of each query: ``(similarities, rows)``, each ``Q x k``.

        ``exclude_rows[q]`` (a row, or -1 for none) and every vector of image ``exclude_image_ids[q]``
        are left out of query ``q``'s results; more neighbours are fetched so that ``k`` remain. A
        query with fewer than ``k`` neighbours (an IVF index that probes too few lists, NaN vectors of
        a damaged index) raises :class:`FewerNeighboursError`; with ``allow_fewer`` its list is padded
        with row -1, similarity NaN.
        """
        queries = np.atleast_2d(np.asarray(queries))
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be Q x {self.dim} (the index's dimension), got shape {queries.shape}: "
                             "query with vectors of the layer the index was built from")
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        num_queries = len(queries)
        skip_rows = np.full(num_queries, -1, np.int64) if exclude_rows is None else \
            np.asarray(exclude_rows, np.int64).reshape(num_queries)
        skip_images = (None if exclude_image_ids is None
                       else np.asarray(exclude_image_ids, np.int64).reshape(num_queries))
        excluded = (skip_rows >= 0).astype(np.int64)
        if skip_images is not None:
            excluded = np.array([self._patches_per_image.get(int(i), 0) for i in skip_images], np.int64)
            excluded += [(r >= 0 and self.image_ids[r] != i) for r, i in zip(skip_rows, skip_images, strict=True)]
        available = len(self) - (int(excluded.max()) if num_queries else 0)
        if k > available:
            raise ValueError(f"k={k} is larger than the {available} vectors a query can be given (the index holds "
                             f"{len(self)}, minus the excluded ones): pass k <= {available}")
        fetch = k + (int(excluded.max()) if num_queries else 0)
        unit = normalised_float32(queries)
        similarities, rows = self.search_index.search(unit, min(max(fetch, self.rerank), len(self)))
        if self.rerank:
            similarities, rows = self._reranked(unit, rows)
        keep = (rows != skip_rows[:, None]) & (rows >= 0)
        if skip_images is not None:
            keep &= self.image_ids[np.maximum(rows, 0)] != skip_images[:, None]
        out_rows = np.full((num_queries, k), -1, np.int64)
        out_similarities = np.full((num_queries, k), np.nan, np.float32)
        for q in range(num_queries):
            kept = np.flatnonzero(keep[q])[:k]
            out_rows[q, :len(kept)] = rows[q, kept]
            out_similarities[q, :len(kept)] = similarities[q, kept]
        found = (out_rows >= 0).sum(axis=1)
        if not allow_fewer and (found < k).any():
            short = int(np.argmax(found < k))
            raise FewerNeighboursError(self._fewer_neighbours_message(int(found[short]), k, short))
        return out_similarities, out_rows

    def _reranked(self, unit: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The candidates ``rows`` of each query ordered by their exact cosine to it: ``(similarities, rows)``,
        missing candidates (row -1) last."""
        similarities = np.full(rows.shape, -np.inf, np.float32)
        block = max(1, _RERANK_ROWS // max(1, rows.shape[1]))  # queries at a time: bounded memory
        for start in range(0, len(rows), block):
            part = rows[start:start + block]
            found = part >= 0
            unique, inverse = np.unique(part[found], return_inverse=True)
            exact = self.exact_vectors.rows(unique)
            queries = np.nonzero(found)[0] + start
            similarities[start:start + block][found] = np.einsum("ij,ij->i", exact[inverse], unit[queries])
        order = np.argsort(-similarities, axis=1, kind="stable")
        rows = np.take_along_axis(rows, order, axis=1)
        similarities = np.take_along_axis(similarities, order, axis=1)
        similarities[rows < 0] = np.nan
        return similarities, rows

    def _fewer_neighbours_message(self, found: int, k: int, query: int) -> str:
        if self.info.get("index") in IVF_KINDS:
            nlist, nprobe = int(self.info["nlist"]), int(self.nprobe)
            name = KIND_NAMES[self.info["index"]]
            return (f"the {name} index found only {found} of the k={k} neighbours of query {query} in the {nprobe} of "
                    f"its {nlist} lists it probes: probe more lists (nprobe, --nprobe; {nlist} probes them all), "
                    "ask for a smaller k, or pass allow_fewer=True to take the short lists (padded with row -1)")
        return (f"the index returned only {found} of the k={k} neighbours of query {query}, although a flat index "
                f"compares every one of its {len(self)} vectors: some of them are NaN, the index is damaged: "
                f"{self.rebuild_advice}")

    def neighbours(self, similarities: np.ndarray, rows: np.ndarray) -> list[Neighbour]:
        """One query's ``(similarities, rows)`` (from :meth:`search`) as :class:`Neighbour` records."""
        return [Neighbour(int(self.image_ids[r]), int(self.patch_index[r]),
                          tuple(float(v) for v in self.boxes[r]), int(self.labels[r]), float(s), int(r))
                for s, r in zip(similarities, rows, strict=True) if r >= 0]

    def query(self, image_id: int, patch_index: int | None = None, box: Sequence[float] | None = None, k: int = 8,
              exclude_same_image: bool = False, include_query: bool = False) -> list[Neighbour]:
        """The ``k`` nearest patches of an indexed patch (by ``patch_index`` or ``box``), nearest first.

        The query patch itself (similarity 1) is left out unless ``include_query``; with
        ``exclude_same_image`` every patch of its image is.
        """
        row = self.row(image_id, patch_index, box)
        similarities, rows = self.search(self.vector(row)[None], k,
                                         exclude_rows=None if include_query else np.array([row]),
                                         exclude_image_ids=np.array([image_id]) if exclude_same_image else None)
        return self.neighbours(similarities[0], rows[0])

    def query_vectors(self, vectors: np.ndarray, k: int = 8,
                      exclude_image_ids: Sequence[int] | None = None) -> list[list[Neighbour]]:
        """The ``k`` nearest patches of each vector (``Q x D`` or ``D``), leaving out image ``exclude_image_ids[q]``."""
        similarities, rows = self.search(vectors, k, exclude_image_ids=None if exclude_image_ids is None
                                         else np.asarray(exclude_image_ids))
        return [self.neighbours(s, r) for s, r in zip(similarities, rows, strict=True)]

    def recall_at_k(self, k: int = 10, num_queries: int = 1000, seed: int = 0) -> float:
        """Mean fraction of the exact top-``k`` this index finds (re-ranking included), over random stored vectors
        as queries. 1.0 for an exact index; below 1 for an IVF index that probes too few lists, or compressed
        codes whose candidates miss some of the nearest. The exact top ``k`` is found by streaming exact inner
        products over the exact vectors a chunk at a time (:func:`~.index.exact_search`)."""
        if len(self) < k:
            raise ValueError(f"k={k} is larger than the index ({len(self)} vectors)")
        source = self.exact_vectors
        if source is None:
            if self.info["index"] in COMPRESSED_KINDS:
                raise ValueError("the recall of a compressed index needs its exact vectors: load it with its store "
                                 "(PatchIndex.load(dir, vectors=STORE))")
            source = IndexVectors(self.cpu_index)
        picks = np.random.default_rng(seed).choice(len(self), size=min(num_queries, len(self)), replace=False)
        queries = source.rows(np.sort(picks))
        _, exact = exact_search(source, queries, k)
        _, found = self.search(queries, k, allow_fewer=True)
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact, strict=True)]))


def neighbour_statistics(index: PatchIndex, k: int = 8, num_queries: int = 200, seed: int = 0) -> dict[str, Any]:
    """Where the ``k`` nearest neighbours of random query patches come from, the query itself excluded.

    Returns the mean fractions of neighbours from the query's own image (``same_image``), from other
    images of its class (``same_class_other_image``) and from other classes (``other_class``), each
    beside its chance level (the fraction of the index's other vectors in that group). Class
    fractions are NaN when labels are unknown (-1). ``per_query`` keeps each query's counts (neighbours
    ``found``, and of them ``same_image`` and ``same_class_other_image``, the latter only with labels),
    so that two layers measured on the same ``query_rows`` can be compared query by query (paired).
    """
    if num_queries < 1:
        raise ValueError(f"num_queries must be at least 1, got {num_queries}")
    picks = np.sort(np.random.default_rng(seed).choice(len(index), size=min(num_queries, len(index)), replace=False))
    queries = index.vectors_of(picks)
    similarities, rows = index.search(queries, k, exclude_rows=picks)
    found = rows >= 0
    same_image = (index.image_ids[rows] == index.image_ids[picks][:, None]) & found
    same_class = (index.labels[rows] == index.labels[picks][:, None]) & found
    per_query = found.sum(axis=1)
    others = len(index) - 1
    image_sizes = np.array([index._patches_per_image[int(i)] for i in index.image_ids[picks]])
    labels_known = bool((index.labels >= 0).all())
    class_sizes = np.bincount(index.labels, minlength=1)[index.labels[picks]] if labels_known else np.zeros(len(picks))

    def fraction(mask: np.ndarray) -> float:
        return float(np.mean(mask.sum(axis=1) / np.maximum(per_query, 1)))

    nan = float("nan")
    counts = {"found": per_query, "same_image": same_image.sum(axis=1)}
    if labels_known:
        counts["same_class_other_image"] = (same_class & ~same_image).sum(axis=1)
    return {
        "k": k, "num_queries": len(picks), "query_rows": picks,
        "same_image": fraction(same_image),
        "same_class_other_image": fraction(same_class & ~same_image) if labels_known else nan,
        "other_class": fraction(~same_class & found) if labels_known else nan,
        "chance_same_image": float(np.mean((image_sizes - 1) / others)),
        "chance_same_class_other_image": float(np.mean((class_sizes - image_sizes) / others)) if labels_known else nan,
        "mean_similarity": float(np.nanmean(similarities)),
        "per_query": {key: [int(c) for c in values] for key, values in counts.items()},
    }


# ---------------------------------------------------------------------- the analysis: settings in, a result out
@dataclass(frozen=True)
class RetrievalSettings:
    """What :func:`patch_retrieval` measures; the defaults are the retrieval command's.

    - ``patch_size``, ``stride``: the grid whose every patch is indexed; ``resize_to``: the side the
      patches are resized to for the model (``None``: its input size).
    - ``num_images``: the first images of the data whose patches are indexed (``None``: all).
    - ``k``: neighbours per query; ``num_queries``: random query patches for the statistics.
    - ``query_image``, ``query_patch``: the figure's query patch (``None``: the grid patch nearest the
      image centre); ``exclude_same_image`` leaves the query's image out of the figure's neighbours.
    - ``index``, ``nlist``, ``nprobe``, ``pq_m``, ``nbits``, ``train_size``: the FAISS index
      (:meth:`PatchIndex.from_source`, :mod:`.index`); ``rerank``: candidates of a compressed index
      re-ranked exactly (``None``: 100 for the compressed kinds, 0 otherwise); ``multi_gpu``: ``"shard"``
      or ``"replicate"`` the index over every GPU (faiss with GPU support).
    - ``seed``: the random queries and the IVF training sample; ``batch_size``: images per extraction batch.
    """

    patch_size: int = 16
    stride: int = 8
    resize_to: int | None = None
    num_images: int | None = 1000
    k: int = 8
    num_queries: int = 200
    query_image: int = 0
    query_patch: int | None = None
    exclude_same_image: bool = False
    index: str = "flat"
    nlist: int | None = None
    nprobe: int = 8
    seed: int = 0
    batch_size: int = 64
    tokens: bool = False  # a ViT's own patch tokens of `block` (default the last) instead of the grid's crops
    block: int | None = None
    pq_m: int | None = None
    nbits: int = DEFAULT_NBITS
    rerank: int | None = None
    train_size: int | None = None
    multi_gpu: str | None = None

    def index_options(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`PatchIndex.from_embeddings` these settings give."""
        return {"kind": self.index, "nlist": self.nlist, "nprobe": self.nprobe, "seed": self.seed, "pq_m": self.pq_m,
                "nbits": self.nbits, "rerank": self.rerank, "train_size": self.train_size,
                "multi_gpu": self.multi_gpu}

    @property
    def grid_description(self) -> str:
        """``"16x16 patches, stride 8"``, as titles and tables say it."""
        if self.tokens:
            return "ViT tokens of the last block" if self.block is None else f"ViT tokens of block {self.block}"
        return f"{self.patch_size}x{self.patch_size} patches, stride {self.stride}"

    def indexed_images(self, data: Any) -> int:
        """How many images of ``data`` are indexed; :class:`RetrievalSettingError` for a ``num_images`` or
        ``query_image`` that ``data`` does not allow."""
        total = len(data)
        if self.num_images is not None and not 1 <= self.num_images <= total:
            raise RetrievalSettingError("num_images", self.num_images,
                                        f"between 1 and {total} (the images of the data), or None (all)")
        count = total if self.num_images is None else int(self.num_images)
        if not 0 <= self.query_image < count:
            raise RetrievalSettingError("query_image", self.query_image, f"one of the indexed images 0..{count - 1}")
        return count


@dataclass(frozen=True)
class LayerRetrievalStats:
    """Where the ``k`` nearest neighbours of random query patches come from, in one layer's index.

    :func:`neighbour_statistics` over ``num_queries`` query patches (the index rows ``query_rows``,
    each left out of its own neighbours): the mean fraction of neighbours from the query's own image,
    from other images of its class and from other classes, the first two beside their chance level
    (the fraction of the other vectors in that group), and ``mean_similarity`` over all neighbours.
    Class fractions are NaN when labels are unknown. ``per_query``: each query's counts behind the
    fractions (:func:`neighbour_statistics`). ``recall_at_k``: the mean fraction of the exact
    top ``k`` that an IVF index finds (:meth:`PatchIndex.recall_at_k`); ``None`` for the exact flat index.
    """

    k: int
    num_queries: int
    query_rows: tuple[int, ...]
    same_image: float
    same_class_other_image: float
    other_class: float
    chance_same_image: float
    chance_same_class_other_image: float
    mean_similarity: float
    per_query: dict[str, tuple[int, ...]] = field(default_factory=dict)
    recall_at_k: float | None = None

    @classmethod
    def measure(cls, index: PatchIndex, settings: RetrievalSettings) -> LayerRetrievalStats:
        """The statistics of ``index`` with ``settings``' ``k``, ``num_queries`` and ``seed`` (recall but for flat)."""
        stats = neighbour_statistics(index, k=settings.k, num_queries=settings.num_queries, seed=settings.seed)
        stats["query_rows"] = tuple(int(row) for row in stats["query_rows"])
        stats["per_query"] = {key: tuple(values) for key, values in stats["per_query"].items()}
        recall = (index.recall_at_k(settings.k, num_queries=settings.num_queries, seed=settings.seed)
                  if settings.index != "flat" else None)
        return cls(**stats, recall_at_k=recall)

    def to_dict(self) -> dict[str, Any]:
        """The fields, ``recall_at_k`` only where it was measured."""
        d = asdict(self)
        if self.recall_at_k is None:
            del d["recall_at_k"]
        return d


@dataclass(frozen=True)
class RetrievalQuery:
    """The figure's query patch: its image, patch index, box ``x0, y0, x1, y1`` (pixels) and label."""

    image_id: int
    patch_index: int
    box: tuple[float, float, float, float]
    label: int


@dataclass(frozen=True)
class LayerRetrieval:
    """One layer of a :class:`RetrievalResult`: its index (``index_info``, :attr:`PatchIndex.info`), the
    statistics of random queries, and the ``k`` nearest patches of the figure's query, nearest first."""

    layer: str
    index_info: dict[str, Any]
    statistics: LayerRetrievalStats
    figure_neighbours: tuple[Neighbour, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index_info, "statistics": self.statistics.to_dict(),
                "figure_neighbours": [asdict(n) for n in self.figure_neighbours]}


@dataclass(frozen=True)
class RetrievalResult:
    """Everything :func:`patch_retrieval` measured, with the settings that decide it.

    ``layers`` in the figure's order (``z`` then ``h``, those the model has); ``num_images`` the images
    indexed and ``num_indexed_patches`` the vectors of each layer's index; ``extraction`` how the
    embeddings were computed (device, precision, speed). :meth:`to_json` is the JSON the retrieval
    command writes, :meth:`table_rows` its table.
    """

    model: str
    data: str
    settings: RetrievalSettings
    num_images: int
    num_indexed_patches: int
    query: RetrievalQuery
    extraction: dict[str, Any] | None
    layers: dict[str, LayerRetrieval]

    @property
    def faiss_device(self) -> str:
        """Where the searches ran (``cpu``, or the GPU of a faiss with GPU support)."""
        return list(self.layers.values())[-1].index_info["faiss_device"]

    @property
    def num_queries(self) -> int:
        """The query patches the statistics used: ``settings.num_queries``, or every indexed patch where there are
        fewer."""
        return min((layer.statistics.num_queries for layer in self.layers.values()), default=self.settings.num_queries)

    def to_dict(self) -> dict[str, Any]:
        """The numbers as Python values (tuples, NaN where a fraction is undefined). ``num_queries`` is the number
        used; ``num_queries_asked`` is there when fewer were used than asked for."""
        s = self.settings
        asked = {"num_queries_asked": s.num_queries} if self.num_queries != s.num_queries else {}
        return {"model": self.model, "data": self.data, "patch_size": s.patch_size, "stride": s.stride,
                "num_images": self.num_images, "k": s.k, "num_queries": self.num_queries, **asked,
                "query": asdict(self.query), "extraction": self.extraction,
                "layers": {name: layer.to_dict() for name, layer in self.layers.items()}}

    def to_json(self) -> dict[str, Any]:
        """:meth:`to_dict` as the command's JSON file holds it: lists, and null for NaN."""
        return _plain(self.to_dict())

    def table_headers(self) -> list[str]:
        headers = ["layer", "same image", "chance", "same class, other image", "chance", "other class", "mean cos"]
        return headers + ([f"recall@{self.settings.k}"] if self.settings.index != "flat" else [])

    def table_rows(self) -> list[list[Any]]:
        """Rows of :func:`~.report.format_table` under :meth:`table_headers`: one per layer."""
        rows = []
        for name, layer in self.layers.items():
            s = layer.statistics
            row = [name, s.same_image, s.chance_same_image, s.same_class_other_image, s.chance_same_class_other_image,
                   s.other_class, s.mean_similarity]
            rows.append(row + ([s.recall_at_k] if self.settings.index != "flat" else []))
        return rows


def _central_patch(boxes: np.ndarray, image_size: Sequence[int]) -> int:
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    target = np.array([image_size[1], image_size[0]], dtype=np.float32) / 2
    return int(np.argmin(((centres - target) ** 2).sum(axis=1)))


def embed_grid_patches(model: SSLModel, data: Any, settings: RetrievalSettings = RetrievalSettings(), *,
                       device: str | torch.device | None = None, store: str | os.PathLike | None = None,
                       overwrite: bool = False, progress: bool = True) -> PatchEmbeddings:
    """Every grid patch of the images :func:`patch_retrieval` indexes (the first ``settings.num_images``), embedded
    (``progress``: the extraction's progress bar).

    In memory, or in the store folder ``store``: a store of these embeddings is reused, a partial one
    resumed, and one of other settings (or damaged beyond repair) replaced only with ``overwrite``.
    Raises :class:`RetrievalSettingError`, before any work, for a ``num_images`` or ``query_image``
    that ``data`` does not allow.
    """
    count = settings.indexed_images(data)
    if settings.tokens:
        return extract_token_embeddings(model, data, block=settings.block, image_ids=np.arange(count),
                                        batch_size=settings.batch_size, device=device, out=store,
                                        resize_to=settings.resize_to, overwrite=overwrite, progress=progress)
    return extract_patch_embeddings(model, data, grid(settings.patch_size, settings.stride),
                                    image_ids=np.arange(count), batch_size=settings.batch_size, device=device,
                                    out=store, resize_to=settings.resize_to, overwrite=overwrite, progress=progress)


def patch_retrieval(model: SSLModel, data: Any, settings: RetrievalSettings = RetrievalSettings(), *,
                    device: str | torch.device | None = None, embeddings: PatchEmbeddings | None = None,
                    store: str | os.PathLike | None = None, overwrite: bool = False,
                    save_index: str | os.PathLike | None = None, command: str | None = None,
                    progress: bool = True) -> RetrievalResult:
    """Paper Fig. 5 and where the neighbours of random patches come from: what the retrieval command measures.

    Every grid patch of the first ``settings.num_images`` images of ``data`` (an
    :class:`~.data.ImageDataset`) is indexed by cosine similarity, once per layer (``z``, then ``h``;
    those the model has). Per layer: :class:`LayerRetrievalStats` of ``settings.num_queries`` random
    query patches, and the ``k`` nearest patches of the figure's query (``settings.query_image``,
    ``settings.query_patch``).

    - ``embeddings``: the grid patches already embedded by :func:`embed_grid_patches` with the same
      settings (no extraction then); otherwise they are extracted, in memory or into ``store``
      (``overwrite``: see :func:`embed_grid_patches`).
    - ``save_index``: also save each layer's index to ``save_index/<layer>`` (:meth:`PatchIndex.save`;
      an index already there is replaced only with ``overwrite``), with ``command``, the command line
      that rebuilds it. Indexes of embeddings in a store are built there resumably.
    - ``progress``: progress bars while patches are embedded and while vectors are added to an index.

    Raises :class:`RetrievalSettingError` for a ``num_images``, ``query_image`` or ``query_patch`` that
    the data does not allow.
    """
    count = settings.indexed_images(data)
    if embeddings is None:
        embeddings = embed_grid_patches(model, data, settings, device=device, store=store, overwrite=overwrite,
                                        progress=progress)
    elif not np.array_equal(np.asarray(embeddings.image_ids), np.arange(count)):
        raise ValueError(f"embeddings must hold the grid patches of images 0..{count - 1} (those these settings "
                         f"index), got {len(embeddings.image_ids)} images: make them with embed_grid_patches(model, "
                         "data, settings)")
    query_boxes = np.asarray(embeddings.boxes[settings.query_image])
    query_patch = _central_patch(query_boxes, data.image_size) if settings.query_patch is None else \
        int(settings.query_patch)
    if not 0 <= query_patch < len(query_boxes):
        raise RetrievalSettingError("query_patch", query_patch, f"in 0..{len(query_boxes) - 1} (patches per image)")
    query = RetrievalQuery(image_id=int(settings.query_image), patch_index=query_patch,
                           box=tuple(float(v) for v in query_boxes[query_patch]),
                           label=int(embeddings.labels[settings.query_image]))
    layers: dict[str, LayerRetrieval] = {}
    for layer in (name for name in RETRIEVAL_LAYERS if name in embeddings.layers):
        # Saved as it is built: a build from a store checkpoints there, and an interrupted one resumes.
        index = PatchIndex.from_embeddings(embeddings, layer, device=device, progress=progress,
                                           save_to=None if save_index is None else Path(save_index) / layer,
                                           overwrite=overwrite, command=command, **settings.index_options())
        statistics = LayerRetrievalStats.measure(index, settings)
        neighbours = index.query(query.image_id, query.patch_index, k=settings.k,
                                 exclude_same_image=settings.exclude_same_image)
        layers[layer] = LayerRetrieval(layer, dict(index.info), statistics, tuple(neighbours))
    return RetrievalResult(model=model_label(model), data=data_label(data), settings=settings, num_images=count,
                           num_indexed_patches=len(index), query=query, extraction=embeddings.meta.get("last_run"),
                           layers=layers)


# ---------------------------------------------------------------------- figure
_RELATION_COLOURS = {"same image": "tab:blue", "same class, other image": "tab:green", "other class": "tab:gray"}


def _relation(neighbour: Neighbour, query_image: int, query_label: int) -> str:
    if neighbour.image_id == query_image:
        return "same image"
    return "same class, other image" if neighbour.label == query_label else "other class"


def _draw_box(ax, box: Sequence[float], colour: str, linestyle: str = "-") -> None:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = box
    # imshow centres pixel i on i, so the pixel edges of columns x0..x1-1 are x0-0.5 and x1-0.5.
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2,
                           linestyle=linestyle))


def plot_retrieval(data, query_image: int, query_box: Sequence[float], query_label: int,
                   neighbours_by_layer: dict[str, list[Neighbour]], class_names: Sequence[str] | None = None,
                   title: str = "Patch retrieval"):
    """Paper Fig. 5: the query patch in its image (red dashed box), then one row of nearest patches per layer.

    ``data`` gives the pixels (``data.get_batch(ids)``, uint8 ``B x 3 x H x W``). Every neighbour is
    shown as its source image with the patch boxed in the colour of its relation to the query: same
    image (blue), same class from another image (green), other class (grey). Returns a matplotlib
    ``Figure`` made without pyplot, so it draws the same on any backend.
    """
    # A bare Figure (no pyplot): the same on any backend, in a script or a notebook.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    layers = list(neighbours_by_layer)
    columns = 1 + max(len(n) for n in neighbours_by_layer.values())
    ids = sorted({query_image} | {n.image_id for ns in neighbours_by_layer.values() for n in ns})
    pixels = dict(zip(ids, data.get_batch(ids).permute(0, 2, 3, 1).numpy(), strict=True))

    def name(label: int) -> str:
        return class_names[label] if class_names and 0 <= label < len(class_names) else str(label)

    layer_names = {"z": "projection z", "h": "embedding h", "pre_feature": "pre-feature"}

    fig = Figure(figsize=(1.6 * columns, 2.2 * len(layers) + 0.8))
    axes = fig.subplots(len(layers), columns, squeeze=False)
    for r, layer in enumerate(layers):
        axes[r, 0].imshow(pixels[query_image], interpolation="nearest")
        _draw_box(axes[r, 0], query_box, "red", "--")
        axes[r, 0].set_title(f"query: image {query_image}", fontsize=8)
        axes[r, 0].set_xlabel(name(query_label), fontsize=8)
        axes[r, 0].set_ylabel(layer_names.get(layer, layer), fontsize=9)
        for c in range(1, columns):
            ax = axes[r, c]
            if c - 1 >= len(neighbours_by_layer[layer]):
                ax.axis("off")
                continue
            neighbour = neighbours_by_layer[layer][c - 1]
            ax.imshow(pixels[neighbour.image_id], interpolation="nearest")
            _draw_box(ax, neighbour.box, _RELATION_COLOURS[_relation(neighbour, query_image, query_label)])
            ax.set_title(f"#{c}  cos {neighbour.similarity:.2f}", fontsize=8)
            ax.set_xlabel(f"{name(neighbour.label)} (img {neighbour.image_id})", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Line2D([], [], color="red", linestyle="--", linewidth=2, label="query patch")]
    handles += [Line2D([], [], color=colour, linewidth=2, label=label) for label, colour in _RELATION_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def plot_retrieval_result(result: RetrievalResult, data):
    """:func:`plot_retrieval` of a :class:`RetrievalResult` (``data``: the images it indexed), titled as the
    retrieval command titles its figure."""
    title = (f"Nearest patches: {result.model} on {result.data}\n{result.settings.grid_description}, "
             f"{result.num_images} images ({result.num_indexed_patches} patches), k={result.settings.k}")
    query = result.query
    return plot_retrieval(data, query.image_id, query.box, query.label,
                          {name: list(layer.figure_neighbours) for name, layer in result.layers.items()},
                          class_names=getattr(data, "class_names", None), title=title)


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m ssl_patch_analysis.retrieval", renamed=cli.RENAMED_FLAGS["retrieval"],
        description="Nearest patches of a query patch among all grid patches of a data set, in projection (z) and "
                    "embedding (h) space (paper Fig. 5), and where the neighbours of many random queries come from.")
    cli.add_analysis_args(parser)
    parser.add_argument("--patch-size", type=cli.positive_int, default=16, help="side of the grid patches (default 16)")
    parser.add_argument("--stride", type=cli.positive_int, default=8,
                        help="grid stride (default 8: 9 patches per CIFAR image)")
    cli.add_num_images_arg(parser, 1000, "images whose patches are indexed")
    cli.add_resize_arg(parser)
    parser.add_argument("--neighbours", dest="k", type=cli.positive_int, default=8, metavar="N",
                        help="neighbours per query (default 8)")
    parser.add_argument("--num-queries", type=cli.positive_int, default=200,
                        help="random query patches for the statistics (default 200)")
    parser.add_argument("--query-image", type=cli.non_negative_int, default=0,
                        help="image of the figure's query patch (default 0)")
    parser.add_argument("--query-patch", type=cli.non_negative_int, default=None,
                        help="patch index of the figure's query (default: the grid patch nearest the image centre)")
    parser.add_argument("--exclude-same-image", action="store_true",
                        help="leave the query's own image out of the figure's neighbours")
    parser.add_argument("--index", choices=INDEX_KINDS, default="flat",
                        help="flat: exact search (default; up to a few million patches: 4 bytes x dimension each, in "
                             "RAM); ivf: inverted lists of the full vectors (as large, faster); ivfpq: inverted lists "
                             "of product-quantised codes (--pq-m bytes each at --nbits 8: patch sets larger than "
                             "RAM, built by streaming from --store), re-ranked exactly (--rerank); opq-ivfpq: the "
                             "same behind an OPQ rotation")
    parser.add_argument("--nlist", type=cli.positive_int, default=None,
                        help="IVF lists (default ~sqrt(number of patches))")
    parser.add_argument("--nprobe", type=cli.positive_int, default=8, help="IVF lists searched per query (default 8)")
    parser.add_argument("--pq-m", type=cli.positive_int, default=None,
                        help="ivfpq: sub-quantisers, bytes per vector at --nbits 8; must divide the dimension "
                             "(default: its largest divisor up to 64)")
    parser.add_argument("--nbits", type=cli.positive_int, default=DEFAULT_NBITS,
                        help=f"ivfpq: bits per sub-quantiser code (default {DEFAULT_NBITS}; 4 selects FAISS's "
                             "fast-scan layout: several times faster on a CPU, coarser, no GPU version)")
    parser.add_argument("--rerank", type=cli.non_negative_int, default=None, metavar="K",
                        help=f"re-rank the top K candidates of the index by their exact cosine, read from the store "
                             f"(default {DEFAULT_RERANK} for ivfpq and opq-ivfpq, 0 otherwise; 0: the codes' "
                             "approximate similarities)")
    parser.add_argument("--train-size", type=cli.positive_int, default=None,
                        help="IVF kinds: vectors the quantisers are trained on, a seeded sample (default 256 per "
                             "list; at least 39 x 2^nbits for ivfpq)")
    parser.add_argument("--multi-gpu", choices=MULTI_GPU_MODES, default=None,
                        help="search on every visible GPU (faiss with GPU support only): shard the index (each GPU "
                             "holds a part: the largest indexes) or replicate it (each holds all: the most queries/s)")
    parser.add_argument("--store", type=Path, default=None,
                        help="patch-embedding store directory to reuse, or to write (and resume) the extraction in")
    parser.add_argument("--save-index", type=cli.folder, default=None,
                        help="also save the indexes to DIR/z and DIR/h (checksummed; loading verifies them)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the indexes already saved in --save-index DIR (a damaged one too), and a --store "
                             "made with other settings or damaged beyond repair; only their own files are replaced")
    cli.add_batch_size_arg(parser)
    cli.add_tokens_args(parser)
    return parser


@cli.command
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    # Recorded with the saved indexes: a damaged one is rebuilt by re-running it (with --overwrite).
    args.command = cli.running_command()
    with cli.extraction_flags(args):
        return _main(args)


# a saved index's files, their staged names (.<name>.tmp), its lock, and a build's checkpoint files
_OWN_INDEX_FILE = re.compile("|".join([*(rf"\.?{re.escape(name)}(?:\.tmp)?" for name in _INDEX_FILES),
                                       re.escape(_LOCK_FILE), rf"{re.escape(CHECKPOINT_PREFIX)}\..+"]))


def _check_save_index_folder(save_index: Path, overwrite: bool) -> None:
    """Before any work: --save-index DIR holds nothing but saved indexes (DIR/z, DIR/h: it is not someone's folder of
    images or notes, written into even with --overwrite); already holding indexes, it needs --overwrite."""
    if save_index.is_dir():
        foreign = [entry for entry in sorted(save_index.iterdir())
                   if entry.name not in RETRIEVAL_LAYERS or not entry.is_dir()]
        foreign += [entry for layer in RETRIEVAL_LAYERS if (save_index / layer).is_dir()
                    for entry in sorted((save_index / layer).iterdir()) if not _OWN_INDEX_FILE.fullmatch(entry.name)]
        if foreign:
            raise FileExistsError(f"--save-index {save_index} holds files that are not saved indexes ({foreign[0]}"
                                  f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); refusing to write "
                                  "into it: choose a new or empty folder")
    if overwrite:
        return
    held = [str(save_index / layer) for layer in RETRIEVAL_LAYERS
            if any((save_index / layer / name).exists() for name in _INDEX_FILES)]
    if held:
        raise FileExistsError(f"--save-index {save_index} already holds saved indexes ({', '.join(held)}): pass "
                              "--overwrite to replace them, or choose another --save-index")


_BACKTICKED = re.compile(r"(`[^`]*`)")
_IN_RETRIEVAL_TERMS = ((re.compile(r"(?<![\w-])--out\b"), "--store"),
                       (re.compile(r"the extract command that made it"), "this retrieval command"))


def _in_retrieval_terms(message: str) -> str:
    """A store's error as retrieval's user reads it: its store folder is --store here, not extract's --out.

    Quoted commands (`python -m ssl_patch_analysis.extract ...`) keep their own flags.
    """
    parts = _BACKTICKED.split(message)
    for i in range(0, len(parts), 2):
        for pattern, replacement in _IN_RETRIEVAL_TERMS:
            parts[i] = pattern.sub(replacement, parts[i])
    return "".join(parts)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    if args.save_index is not None:
        _check_save_index_folder(args.save_index, args.overwrite)
    if args.multi_gpu is not None:  # before any work
        check_multi_gpu(args.multi_gpu, args.index, args.index in COMPRESSED_KINDS and args.nbits == 4)
    model, data, device = cli.load_model_and_data(args)
    of = cli.output_of(args, model, data)
    stem = cli.output_stem_for(args, "retrieval", of)  # another model's outputs there: refused before the work
    if args.num_images is not None and args.num_images > len(data):
        raise cli.UserError(f"--num-images {args.num_images}: {data_label(data)} has only {len(data)} images (pass at "
                            "most that, or all)")
    num_images = args.num_images or len(data)
    if not 0 <= args.query_image < num_images:
        raise cli.UserError(f"--query-image {args.query_image} must be one of the indexed images 0..{num_images - 1}")
    settings = RetrievalSettings(
        patch_size=args.patch_size, stride=args.stride, resize_to=args.resize_to, num_images=args.num_images,
        k=args.k, num_queries=args.num_queries, query_image=args.query_image, query_patch=args.query_patch,
        exclude_same_image=args.exclude_same_image, index=args.index, nlist=args.nlist, nprobe=args.nprobe,
        seed=args.seed, batch_size=args.batch_size, tokens=args.tokens, block=cli.token_block(args),
        pq_m=args.pq_m, nbits=args.nbits, rerank=args.rerank, train_size=args.train_size, multi_gpu=args.multi_gpu)
    try:
        embeddings = embed_grid_patches(model, data, settings, device=device, store=args.store,
                                        overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, OSError) as error:
        if args.store is None:
            raise
        raise ValueError(_in_retrieval_terms(str(error))) from error
    try:
        result = patch_retrieval(model, data, settings, device=device, embeddings=embeddings, overwrite=args.overwrite,
                                 save_index=args.save_index, command=getattr(args, "command", None),
                                 progress=not args.no_progress)
    except RetrievalSettingError as error:  # the query patch, checked once the grid is known
        raise SystemExit(f"--{error.setting.replace('_', '-')} must be {error.requirement}") from None

    summary = {**result.to_dict(), "command": args.command, "output_of": of}
    paths = save_figure_and_json(plot_retrieval_result(result, data), summary, stem, pdf=args.pdf)[:-1]

    print(f"{result.model} on {result.data}: {settings.grid_description}; {settings.k} nearest of "
          f"{result.num_queries} random query patches among {result.num_indexed_patches} ({settings.index} index "
          f"on {result.faiss_device})")
    print(format_table(result.table_rows(), result.table_headers()))
    print("wrote " + ", ".join(str(p) for p in [*paths, stem.with_suffix(".json")]))
    return summary


if __name__ == "__main__":
    main()
