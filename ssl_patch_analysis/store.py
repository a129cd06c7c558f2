"""Patch embeddings in memory and on disk: a verified, resumable store of ``.npy`` files plus ``meta.json``.

A store is a directory::

    meta.json            settings, shapes, "complete": true|false, checksums of the small files, the
                         store's random id, and the sha256 of meta.json's own content
    h.npy                N x P x Dh     (float16 by default)
    z.npy                N x P x Dz     (when the model has a projector)
    pre_feature.npy      N x P x Dp     (EMP-SSL models)
    boxes.npy            float32 N x P x 4, pixel boxes x0, y0, x1, y1 in the source image
    image_ids.npy        int64 N, the dataset index of each row
    labels.npy           int64 N (-1 when unknown)
    batches.rank<r>.npy  uint32, one record per batch of rows, written by process r only
    .lock                the writer's lock (fcntl.flock); holds only the writer's process id

Rows are written batch by batch with ``os.pwrite`` (an ``OSError`` on a full disk, where a
memory map would die of SIGBUS) into files whose space was reserved when the store was created.
A batch's record -- the CRC-32 of its rows in each array, then the CRC-32 of those values and of
the store's id -- is written only after its rows are on disk (``fsync``): a batch is done when it
has a valid record, so an interrupted run leaves a store whose done batches are all valid, and
re-running the same command writes the rest. Each process writes its own record file, so several
processes (``torchrun``) share a store without writing the same bytes. The store is marked
complete by replacing ``meta.json`` atomically.

Reading checks a store (:func:`verify_store`, by default on every load): meta.json against its
digest, every ``.npy`` header against the one its shape and dtype give, file sizes, the records,
each batch's rows against its record (one CRC-32 pass over the data, several GB/s), the small
files against meta.json. Damage is reported naming the file and the batches
(:class:`DamagedStoreError`). Re-running the extract command that made the store repairs it in
place: headers and the small files are rewritten, damaged batches lose their records and are
re-extracted by the normal resume. A damaged meta.json can only be replaced (``overwrite=True``):
nothing else says what made the data.

Replacing a store (``overwrite=True``) builds the new one in ``.<name>.new`` beside it, resumable,
and moves it in file by file only once it is complete, meta.json last (the records carry the
store's id, so a swap cut short reads as damage, never as a valid mix). Only the store's own files
are replaced or deleted; anything else in the folder stays. One process at a time writes a store
(:func:`store_lock`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sys
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DiskFullError, is_disk_full

STORE_FORMAT = "ssl_patch_analysis.patch_embeddings"
STORE_VERSION = 2  # 2: checksums (records per batch, meta.json digest); version 1 stores are re-extracted
LAYERS = ("h", "z", "pre_feature")
STORE_DTYPES = ("float16", "float32")
LOCK_FILE = ".lock"
# Written first by a store's creation and removed once its meta.json is in: files named like a store's without
# meta.json are leftovers to replace only where it is there (else they may be a user's own h.npy, kept).
CREATING_FILE = ".creating"
SMALL_FILES = ("image_ids.npy", "labels.npy")
_ROW_ARRAYS = ("boxes",)  # written per batch beside the layers
_RECORD_DTYPE = np.dtype("<u4")
_RECORD_FILE = "batches.rank{}.npy"
# Every name a store writes (done.rank<r>.npy: version 1); nothing else in its folder is ever touched.
_OWN_FILE = re.compile(
    r"(meta\.json|(h|z|pre_feature|boxes|image_ids|labels)\.npy|(batches|done)\.rank\d+\.npy)(\.tmp)?|\.lock|\.creating"
)
# A store whose meta.json cannot be trusted (or read) can only be replaced.
_REPLACE_ADVICE = ("re-extract it: re-run the command that made it with --overwrite (overwrite=True), which replaces "
                   "only the store's own files, or delete {path}")
_CONTENT_DIGESTS = {"files_sha256": "the image files changed since the store was made (their sizes or modification "
                                    "times differ)",
                    "pixels_sha256": "the images' pixels changed since the store was made",
                    "jpeg_sha256": "the images' JPEG bytes changed since the store was made"}


def _sync_data(fd: int) -> None:
    # fdatasync skips the metadata flush fsync does; macOS has only fsync.
    getattr(os, "fdatasync", os.fsync)(fd)


def _write_file_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_roundtrip(value: Any) -> Any:
    """The value as it will read back from meta.json (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def _meta_digest(meta: Mapping[str, Any]) -> str:
    content = {key: value for key, value in meta.items() if key != "meta_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_meta(path: Path, meta: Mapping[str, Any]) -> None:
    """meta.json, atomically, with the digest of its content (``meta_sha256``) that reading checks."""
    content = _json_roundtrip({key: value for key, value in meta.items() if key != "meta_sha256"})
    content["meta_sha256"] = _meta_digest(content)
    _write_file_atomically(path / "meta.json", json.dumps(content, indent=1).encode())


def _npy_header(shape: Sequence[int], dtype: np.dtype | str) -> bytes:
    """The ``.npy`` header numpy writes for a C-ordered array of ``shape`` and ``dtype``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    return _npy_header(array.shape, array.dtype) + array.tobytes()


# ----------------------------------------------------------------------------- damage


def _ranges(values: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted integers as inclusive runs: [0, 1, 2, 5] -> [(0, 2), (5, 5)]."""
    runs: list[tuple[int, int]] = []
    for value in sorted(values):
        if runs and value == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


def _runs_text(runs: list[tuple[int, int]], limit: int = 6) -> str:
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:limit])
    return shown + (f", ... ({len(runs) - limit} more)" if len(runs) > limit else "")


@dataclass(frozen=True)
class StoreDamage:
    """One problem of a store: the file, what is wrong with it, and the batches whose rows it costs."""

    file: str
    problem: str
    batches: tuple[int, ...] = ()
    rows: str = ""  # e.g. "rows 0-63, 128-191", for reports

    def describe(self, with_rows: bool = False) -> str:
        where = ""
        if self.batches:
            where = f" batch{'es' if len(self.batches) > 1 else ''} {_runs_text(_ranges(self.batches))}"
            if with_rows and self.rows:
                where += f" ({self.rows})"
        return f"{self.file}{where}: {self.problem}"


def repair_advice(path: Path, damage: Sequence[StoreDamage], meta: Mapping[str, Any] | None) -> str:
    """What repairs ``damage``: re-extracting the damaged batches, or replacing the store."""
    if meta is None or any(d.file == "meta.json" for d in damage):
        return _REPLACE_ADVICE.format(path=path)
    if meta.get("saved_by") == "PatchEmbeddings.save":
        return "it was written by PatchEmbeddings.save: save the embeddings again, into a new folder"
    return ("re-run the command that made it (same settings) to re-extract only the damaged batches; "
            f"`python -m ssl_patch_analysis.extract --verify --store {path}` lists the damage")


class DamagedStoreError(ValueError):
    """A store whose files fail their checks; ``damage`` names each file and the batches it costs."""

    def __init__(self, path: str | os.PathLike, damage: Sequence[StoreDamage], meta: Mapping[str, Any] | None):
        self.path, self.damage = Path(path), list(damage)
        self.advice = repair_advice(self.path, self.damage, meta)
        shown = "; ".join(d.describe() for d in self.damage[:3])
        if len(self.damage) > 3:
            shown += f"; and {len(self.damage) - 3} more"
        super().__init__(f"the store at {self.path} is damaged ({shown}): {self.advice}")


class StoreVersionError(ValueError):
    """A store written by another version of this code."""


# ----------------------------------------------------------------------------- meta.json


def _has_records(path: Path) -> bool:
    return any(path.glob("batches.rank*.npy")) or any(path.glob("done.rank*.npy"))


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        if _has_records(path):  # batches were written: the meta.json that said what they are is gone
            raise DamagedStoreError(path, [StoreDamage("meta.json", "missing")], None)
        raise FileNotFoundError(
            f"no patch-embedding store at {path} (meta.json is missing): run "
            "`python -m ssl_patch_analysis.extract ... --store DIR` to make one"
        )
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as error:  # not JSON, or not UTF-8
        raise DamagedStoreError(path, [StoreDamage("meta.json", f"not readable JSON ({error})")], None) from None
    if not isinstance(meta, dict):
        raise DamagedStoreError(path, [StoreDamage("meta.json", "not a JSON object")], None)
    digest = meta.get("meta_sha256")
    if digest is not None and digest != _meta_digest(meta):
        raise DamagedStoreError(path, [StoreDamage("meta.json", "its content does not match its checksum")], None)
    if meta.get("format") != STORE_FORMAT:
        if digest is not None or "store_id" in meta:
            raise DamagedStoreError(path, [StoreDamage("meta.json", f"format {meta.get('format')!r}")], None)
        raise ValueError(f"{meta_path} is not a patch-embedding store (format {meta.get('format')!r})")
    if meta.get("version") != STORE_VERSION:
        raise StoreVersionError(
            f"the store at {path} has version {meta.get('version')}, this code reads version {STORE_VERSION} "
            f"(stores with checksums): {_REPLACE_ADVICE.format(path=path)}"
        )
    if digest is None:
        raise DamagedStoreError(path, [StoreDamage("meta.json", "its checksum (meta_sha256) is missing")], None)
    return meta


def read_store_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The meta.json of the store at ``path``, checked against its digest (DamagedStoreError otherwise)."""
    return _read_meta(Path(path))


def _read_meta_if_any(path: Path) -> dict[str, Any] | None:
    """meta.json, or None where there is no store yet (no folder, or only leftovers of an unfinished creation)."""
    if not (path / "meta.json").is_file() and not _has_records(path):
        return None
    return _read_meta(path)


def _check_writable_folder(path: Path, overwrite: bool = False) -> None:
    """FileExistsError unless ``path`` is absent, empty, or holds a store (damaged too) or leftovers of one (files
    named like a store's without meta.json: only a creation's own, or any with ``overwrite``)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder: choose another --store")
    meta_path = path / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError:
            meta = None
        if isinstance(meta, dict) and (meta.get("format") == STORE_FORMAT or "meta_sha256" in meta):
            return
        # a meta.json damaged beyond an object (not JSON, or a list) is a store's when the store's data are beside it
        if not isinstance(meta, dict) and ((path / "h.npy").exists() or _has_records(path)):
            return
        raise FileExistsError(f"{path} holds a meta.json that is not a patch-embedding store's; refusing to write "
                              "into it: choose another --store")
    names = [entry.name for entry in path.iterdir()]
    if any(not _OWN_FILE.fullmatch(name) for name in names):
        raise FileExistsError(
            f"{path} exists and is not a patch-embedding store (no meta.json); refusing to write into it: "
            "choose another --store"
        )
    data = sorted(name for name in names if name not in (LOCK_FILE, CREATING_FILE))
    # a store's own batch records (valid ones) beside the files: a store that lost its meta.json, said when read
    if data and CREATING_FILE not in names and not overwrite and not _has_records(path):
        raise FileExistsError(f"{path} holds {', '.join(data)} without a store's meta.json, not written by a store "
                              "being created (it marks its folder first); refusing to replace them: choose another "
                              "--store, or pass --overwrite to replace them (a store whose meta.json was lost)")


def _own_files(path: Path) -> list[Path]:
    return sorted(entry for entry in path.iterdir() if _OWN_FILE.fullmatch(entry.name)) if path.is_dir() else []


def _remove_own_files(path: Path) -> None:
    for entry in _own_files(path):
        if entry.name != LOCK_FILE:
            entry.unlink()


# ----------------------------------------------------------------------------- records


def _record_seed(store_id: str) -> int:
    return zlib.crc32(store_id.encode())


def _record(store_id: str, checksums: Sequence[int]) -> np.ndarray:
    values = np.asarray(checksums, dtype=_RECORD_DTYPE)
    return np.append(values, np.asarray(zlib.crc32(values.tobytes(), _record_seed(store_id)), dtype=_RECORD_DTYPE))


def _valid_records(records: np.ndarray, store_id: str) -> np.ndarray:
    seed = _record_seed(store_id)
    return np.array([bool(r.any()) and int(r[-1]) == zlib.crc32(r[:-1].tobytes(), seed) for r in records],
                    dtype=bool)


def _record_files(path: Path) -> list[Path]:
    return sorted(path.glob("batches.rank*.npy"))


def _record_shape(meta: Mapping[str, Any]) -> tuple[int, int]:
    return int(meta["num_batches"]), len(meta["arrays"]) + 1


def _read_records(file: Path, meta: Mapping[str, Any]) -> tuple[np.ndarray, bool, int]:
    """A record file's records (missing ones zero), whether its header is intact, and its size."""
    shape = _record_shape(meta)
    header = _npy_header(shape, _RECORD_DTYPE)
    data = file.read_bytes()
    body = bytearray(data[len(header):len(header) + shape[0] * shape[1] * _RECORD_DTYPE.itemsize])
    body.extend(bytes(shape[0] * shape[1] * _RECORD_DTYPE.itemsize - len(body)))
    records = np.frombuffer(bytes(body), dtype=_RECORD_DTYPE).reshape(shape)
    return records, data[:len(header)] == header, len(data)


def _write_records(file: Path, records: np.ndarray) -> None:
    _write_file_atomically(file, _npy_bytes(records.astype(_RECORD_DTYPE)))


def done_batches(path: str | os.PathLike, rank: int | None = None) -> np.ndarray:
    """Which batches of a store (being) written are finished: those with a valid record, of process ``rank``
    or (default) of any process."""
    path = Path(path)
    meta = _read_meta(path)
    done = np.zeros(meta["num_batches"], dtype=bool)
    files = _record_files(path) if rank is None else [path / _RECORD_FILE.format(rank)]
    for file in files:
        if file.exists():
            done |= _valid_records(_read_records(file, meta)[0], meta["store_id"])
    return done


# ----------------------------------------------------------------------------- verification


def _batch_span(batch: int, meta: Mapping[str, Any]) -> tuple[int, int]:
    size = int(meta["batch_size"])
    return batch * size, min((batch + 1) * size, int(meta["num_images"]))


def _rows_text(batches: Sequence[int], meta: Mapping[str, Any]) -> str:
    spans = [_batch_span(b, meta) for b in sorted(batches)]
    runs: list[tuple[int, int]] = []
    for start, stop in spans:
        if runs and start == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], stop - 1)
        else:
            runs.append((start, stop - 1))
    return "rows " + _runs_text(runs)


@dataclass
class _Inspection:
    """What checking a store found, and what repairing it needs."""

    damage: list[StoreDamage] = field(default_factory=list)
    redo: set[int] = field(default_factory=set)  # done batches whose rows are lost or wrong
    array_files: set[str] = field(default_factory=set)  # array files whose header or size needs fixing
    small_files: set[str] = field(default_factory=set)  # image_ids.npy / labels.npy to rewrite
    records: dict[str, np.ndarray] = field(default_factory=dict)  # record file -> records, invalid ones zeroed
    record_files: set[str] = field(default_factory=set)  # record files to rewrite

    def add(self, meta: Mapping[str, Any], file: str, problem: str, batches: Sequence[int] = ()) -> None:
        batches = tuple(sorted(int(b) for b in batches))
        self.damage.append(StoreDamage(file, problem, batches, _rows_text(batches, meta) if batches else ""))


def _array_layout(meta: Mapping[str, Any], name: str) -> tuple[bytes, int, int]:
    """The header of array ``name``'s file, the bytes of one row, and the file's size."""
    spec = meta["arrays"][name]
    shape, dtype = spec["shape"], np.dtype(spec["dtype"])
    header = _npy_header(shape, dtype)
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    return header, row_bytes, len(header) + int(shape[0]) * row_bytes


def _inspect(path: Path, meta: dict[str, Any], data: bool = True) -> _Inspection:
    """Check every file of the store at ``path`` (its rows too when ``data``) against ``meta``."""
    found = _Inspection()
    num_batches = int(meta["num_batches"])
    complete = bool(meta.get("complete"))
    names = list(meta["arrays"])

    # Records: a batch is done when some process's file holds a valid record of it.
    done = np.zeros(num_batches, dtype=bool)
    problems: list[tuple[str, str, np.ndarray]] = []  # (file, problem, the batches it may cost)
    record_header = _npy_header(_record_shape(meta), _RECORD_DTYPE)
    for file in _record_files(path):
        records, header_ok, size = _read_records(file, meta)
        valid = _valid_records(records, meta["store_id"])
        found.records[file.name] = np.where(valid[:, None], records, 0).astype(_RECORD_DTYPE)
        done |= valid
        expected = len(record_header) + records.nbytes
        if not header_ok:
            problems.append((file.name, "the .npy header is damaged", np.zeros(num_batches, dtype=bool)))
        invalid = records.any(axis=1) & ~valid
        if invalid.any():
            problems.append((file.name, "a record fails its checksum", invalid))
        if size < expected:
            cut = np.zeros(num_batches, dtype=bool)
            # Records cut off may have been empty (not written yet): only a complete store knows they were not.
            cut[max(0, size - len(record_header)) // (records.shape[1] * _RECORD_DTYPE.itemsize):] = complete
            problems.append((file.name, f"truncated ({size} of {expected} bytes)", cut))
        elif size > expected:
            problems.append((file.name, f"{size - expected} bytes longer than its records",
                             np.zeros(num_batches, dtype=bool)))
    attributed = np.zeros(num_batches, dtype=bool)
    for name, problem, batches in problems:
        found.add(meta, name, problem, np.flatnonzero(batches & ~done))
        found.record_files.add(name)
        attributed |= batches
    unrecorded = np.flatnonzero(~done & ~attributed) if complete else []
    if len(unrecorded):
        missing = [name for name in meta.get("record_files", []) if not (path / name).exists()]
        found.add(meta, missing[0] if len(missing) == 1 else "batches.rank*.npy",
                  "missing" if missing else "no record of these batches", unrecorded)

    # Array files: header, size, then the rows of every done batch against its records.
    lost: dict[str, set[int]] = {}
    for name in names:
        file = path / f"{name}.npy"
        header, row_bytes, expected = _array_layout(meta, name)
        done_list = [int(b) for b in np.flatnonzero(done)]
        if not file.exists():
            lost[name] = set(range(num_batches))
            found.add(meta, file.name, "missing", done_list)
            found.array_files.add(name)
            continue
        size = file.stat().st_size
        with open(file, "rb") as f:
            if f.read(len(header)) != header:
                found.add(meta, file.name, "the .npy header is damaged")
                found.array_files.add(name)
        lost[name] = set()
        if size < expected:
            whole_rows = max(0, size - len(header)) // row_bytes
            lost[name] = {b for b in range(num_batches) if _batch_span(b, meta)[1] > whole_rows}
            found.add(meta, file.name, f"truncated ({size} of {expected} bytes)",
                      [b for b in done_list if b in lost[name]])
            found.array_files.add(name)
        elif size > expected:
            found.add(meta, file.name, f"{size - expected} bytes longer than its rows")
            found.array_files.add(name)
    for name in names:
        found.redo.update(b for b in lost[name] if done[b])
    if data:
        failing = _check_rows(path, meta, found.records, done, lost)
        for name in names:
            if failing[name]:
                found.add(meta, f"{name}.npy", "fails its checksum", failing[name])
                found.redo.update(failing[name])

    for name in SMALL_FILES:
        file = path / name
        if not file.exists():
            found.add(meta, name, "missing")
            found.small_files.add(name)
        elif zlib.crc32(file.read_bytes()) != meta["checksums"][name]:
            found.add(meta, name, "fails its checksum")
            found.small_files.add(name)
    return found


def _check_rows(path: Path, meta: Mapping[str, Any], records: Mapping[str, np.ndarray], done: np.ndarray,
                lost: Mapping[str, set[int]]) -> dict[str, list[int]]:
    """Per array, the done batches whose rows match none of their records' checksums."""
    names = list(meta["arrays"])
    maps: dict[str, np.ndarray] = {}
    row_bytes: dict[str, int] = {}
    for name in names:
        header, row_bytes[name], expected = _array_layout(meta, name)
        file = path / f"{name}.npy"
        available = min(file.stat().st_size, expected) - len(header) if file.exists() else 0
        if available > 0:
            maps[name] = np.memmap(file, dtype=np.uint8, mode="r", offset=len(header), shape=(available,))
    wanted = {int(b): {tuple(int(v) for v in r[b]) for r in records.values() if r[b].any()}
              for b in np.flatnonzero(done)}
    tasks = [(k, name, b) for b in wanted for k, name in enumerate(names) if b not in lost[name] and name in maps]

    def matches(task: tuple[int, str, int]) -> bool:
        k, name, batch = task
        start, stop = _batch_span(batch, meta)
        crc = zlib.crc32(maps[name][start * row_bytes[name]:stop * row_bytes[name]])
        return any(record[k] == crc for record in wanted[batch])

    # zlib releases the GIL on large buffers: threads check batches in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(matches, tasks))
    failing: dict[str, list[int]] = {name: [] for name in names}
    for (_, name, batch), ok in zip(tasks, results, strict=True):
        if not ok:
            failing[name].append(batch)
    return failing


def verify_store(path: str | os.PathLike, data: bool = True) -> list[StoreDamage]:
    """Every problem of the store at ``path`` (empty: intact); ``data=False`` skips the pass over the rows.

    Raises FileNotFoundError where there is no store, StoreVersionError for a store of another version.
    """
    path = Path(path)
    try:
        meta = _read_meta(path)
    except DamagedStoreError as error:
        return error.damage
    return _inspect(path, meta, data).damage


def _repair(path: Path, meta: dict[str, Any], layout: StoreLayout, found: _Inspection) -> None:
    """Fix what ``found`` lists, so that the normal resume re-extracts exactly the damaged batches."""
    for name in sorted(found.array_files):
        header, _, expected = _array_layout(meta, name)
        file = path / f"{name}.npy"
        if not file.exists():
            _create_array(file, meta["arrays"][name]["shape"], meta["arrays"][name]["dtype"])
            continue
        with open(file, "r+b") as f:
            f.write(header)
            f.truncate(expected)
            f.flush()
            os.fsync(f.fileno())
    small = {"image_ids.npy": np.asarray(layout.image_ids, dtype=np.int64),
             "labels.npy": np.asarray(layout.labels, dtype=np.int64)}
    for name in sorted(found.small_files):
        content = _npy_bytes(small[name])
        if zlib.crc32(content) != meta["checksums"][name]:
            raise ValueError(f"{path / name} cannot be rewritten: this run's {name[:-4]} differ from the store's; "
                             "pass --overwrite (overwrite=True) to replace the store")
        _write_file_atomically(path / name, content)
    redo = sorted(found.redo)
    for name, records in found.records.items():
        if redo and records[redo].any():
            records[redo] = 0
            found.record_files.add(name)
        if name in found.record_files:
            _write_records(path / name, records)
    _write_meta(path, {**meta, "complete": False})


# ----------------------------------------------------------------------------- the lock


class StoreLockedError(BlockingIOError):
    """Another process holds the store's lock."""


def _lock_holder(path: Path) -> str:
    try:
        pid = int((path / LOCK_FILE).read_text().strip())
    except (OSError, ValueError):
        return "another process"
    return f"process {pid}"


@contextlib.contextmanager
def store_lock(path: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """Hold the store at ``path`` for writing: an OS lock (``fcntl.flock``) on its ``.lock`` file, released
    on exit and when the process dies. Held by another process: wait for it (saying so on stderr), or with
    ``wait=False`` raise StoreLockedError naming it. A store this process may not write (a read-only
    folder) is not locked: it can only be read, and readers need no lock."""
    path = Path(path)
    _check_writable_folder(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(path)
            if not wait:
                raise StoreLockedError(
                    errno.EWOULDBLOCK,
                    f"{holder} is writing the store at {path}: wait for it to finish, or choose another --store",
                ) from None
            print(f"waiting for {holder}, which is writing the store at {path} (one writer at a time)",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- in memory, and whole stores


@dataclass
class PatchEmbeddings:
    """Embeddings of ``P`` patches of each of ``N`` images, with where the patches came from.

    Row ``i`` belongs to dataset image ``image_ids[i]`` (class ``labels[i]``); patch ``j`` of that
    row is the box ``boxes[i, j]`` (``x0, y0, x1, y1`` pixels of the source image). Arrays are
    ``np.memmap`` when the store was opened from disk with ``mmap=True``.
    """

    h: np.ndarray
    z: np.ndarray | None
    pre_feature: np.ndarray | None
    boxes: np.ndarray
    image_ids: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(self.h.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.h.shape[1])

    @property
    def layers(self) -> list[str]:
        """Names of the layers present, among ``"h"``, ``"z"``, ``"pre_feature"``."""
        return [name for name in LAYERS if getattr(self, name) is not None]

    def layer(self, name: str) -> np.ndarray:
        """The ``N x P x D`` array of layer ``name`` (``"h"``, ``"z"`` or ``"pre_feature"``)."""
        if name not in LAYERS:
            raise ValueError(f"unknown layer {name!r}; layers are {', '.join(LAYERS)}")
        array = getattr(self, name)
        if array is None:
            raise ValueError(
                f"these patch embeddings have no layer {name!r} (the model "
                f"{self.meta.get('model', {}).get('source') or ''} lacks it, or it was not extracted); "
                f"available: {', '.join(self.layers)}"
            )
        return array

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> PatchEmbeddings:
        """Open a complete store; arrays are read-only memory maps unless ``mmap=False``.

        Every file is checked first (:func:`verify_store`): with ``verify=True`` (default) the rows too,
        one CRC-32 pass over the data; ``verify=False`` checks all but the rows (meta.json, headers,
        sizes, records, the small files). Damage raises :class:`DamagedStoreError` naming the file and
        the batches, and what repairs it.
        """
        path = Path(path)
        meta = _read_meta(path)
        if not meta.get("complete"):
            done = done_batches(path)
            raise RuntimeError(
                f"the store at {path} is incomplete ({int(done.sum())} of {done.size} batches written): "
                "re-run the same extract command to resume it"
            )
        found = _inspect(path, meta, data=verify)
        if found.damage:
            raise DamagedStoreError(path, found.damage, meta)
        mode = "r" if mmap else None
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode=mode) for name in meta["arrays"]}
        return cls(
            h=arrays["h"],
            z=arrays.get("z"),
            pre_feature=arrays.get("pre_feature"),
            boxes=arrays["boxes"],
            image_ids=np.load(path / "image_ids.npy"),
            labels=np.load(path / "labels.npy"),
            meta=meta,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write a complete store (one batch) to the new (or empty) directory ``path``."""
        path = Path(path)
        _check_free_target(path)
        rows = {name: np.ascontiguousarray(self.layer(name)) for name in self.layers}
        rows["boxes"] = np.ascontiguousarray(self.boxes, dtype=np.float32)
        volatile = {"complete", "last_run", "record_files", "meta_sha256", "store_id", "checksums"}
        entries = {key: value for key, value in self.meta.items() if key not in volatile}
        entries["saved_by"] = "PatchEmbeddings.save"
        staging = _staging_dir(path)
        try:
            _create_store(staging, entries, {name: (array.shape, array.dtype) for name, array in rows.items()},
                          self.image_ids, self.labels, batch_size=max(1, self.num_images), dtype=str(self.h.dtype))
            with StoreWriter(staging) as writer:
                writer.write_batch(0, rows)
                writer.mark_complete()
            try:
                os.replace(staging, path)
            except OSError as error:
                if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise FileExistsError(f"{path} was filled while saving: choose another path") from None
                raise
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            explained = _explain_os_error(error, path)
            if explained is error:
                raise
            raise explained from error


def _check_free_target(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not empty: choose another path")


def _staging_dir(path: Path) -> Path:
    """A fresh directory beside ``path`` (same file system) that ``os.replace`` can move into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _explain_os_error(error: OSError, path: Path) -> OSError:
    if is_disk_full(error):
        return DiskFullError(f"the disk holding {path} is full: free some space (or choose another --store) and "
                             "re-run the same command; an interrupted store resumes where it stopped")
    return error


def _create_array(path: Path, shape: Sequence[int], dtype: np.dtype | str) -> None:
    header = _npy_header(shape, dtype)
    size = len(header) + int(np.prod(shape)) * np.dtype(dtype).itemsize
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, header)
        os.ftruncate(fd, size)
        try:
            # Reserve the space now: a full disk then fails here, before any work, not mid-run.
            os.posix_fallocate(fd, 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate
                raise
    finally:
        os.close(fd)


@dataclass
class StoreLayout:
    """What a new store holds: ``layer_dims`` maps layer name to embedding dimension."""

    num_patches: int
    layer_dims: dict[str, int]
    image_ids: np.ndarray
    labels: np.ndarray
    batch_size: int
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {self.dtype!r}")
        unknown = sorted(set(self.layer_dims) - set(LAYERS))
        if unknown or "h" not in self.layer_dims:
            raise ValueError(f"layers must include 'h' and be among {LAYERS}, got {sorted(self.layer_dims)}")
        if len(self.image_ids) == 0:
            raise ValueError("a store needs at least one image")

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_batches(self) -> int:
        return -(-self.num_images // self.batch_size)

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype of each array written batch by batch: the layers, then ``boxes``."""
        n, p = self.num_images, self.num_patches
        specs = {name: ((n, p, dim), self.dtype) for name, dim in self.layer_dims.items()}
        specs["boxes"] = ((n, p, 4), "float32")
        return specs


@dataclass
class StorePlan:
    """Where a run writes: into the store ``target`` itself, or into ``path``, the folder beside it where
    its replacement is built; ``complete``: nothing is left to write."""

    path: Path
    target: Path
    complete: bool

    def finish(self) -> None:
        """Move a replacement built beside the store into place (once it is complete)."""
        if self.path != self.target:
            _install(self.path, self.target)
            self.path = self.target


def prepare_store(
    path: str | os.PathLike,
    settings: Mapping[str, Any],
    layout: StoreLayout,
    overwrite: bool = False,
    info: Mapping[str, Any] | None = None,
) -> StorePlan:
    """Create the store at ``path``, or check that the one there was made with the same ``settings``
    and repair it; hold :func:`store_lock` around this and the writing.

    ``settings`` are the meta.json entries that decide the contents (weights, sampler, data, dtype,
    ...); any difference is an error that names the differing entries, unless ``overwrite`` replaces
    the old store (built beside it, moved in when complete: :meth:`StorePlan.finish`). A store with
    the same settings is checked in full, and damage repaired in place: its damaged batches are left
    for the writer to extract again. ``info`` entries are stored in meta.json too but not compared
    (e.g. where the checkpoint file was).
    """
    path = Path(path)
    settings = _json_roundtrip(dict(settings))
    entries = {**(info or {}), **settings}
    _check_writable_folder(path, overwrite)
    try:
        meta = _read_meta_if_any(path)
    except (DamagedStoreError, StoreVersionError):
        if not overwrite:
            raise
        return _replace_beside(path, entries, settings, layout)
    if meta is None:
        _remove_own_files(path)  # leftovers of a creation that did not finish
        _create_store(path, entries, layout.arrays(), layout.image_ids, layout.labels, layout.batch_size,
                      layout.dtype)
        return StorePlan(path, path, False)
    differing = sorted(key for key in settings if meta.get(key) != settings[key])
    if not differing:
        _say_unfinished_replacement(path)
        return StorePlan(path, path, _check_and_repair(path, meta, layout))
    if overwrite or _holds_no_batch(path, meta):
        if not overwrite:  # a start that failed (a bad image, memory) before its first batch: nothing is lost
            print(f"replacing the store at {path}: it was started with other settings ({', '.join(differing)}) and "
                  "holds no finished batch", file=sys.stderr)
        return _replace_beside(path, entries, settings, layout)
    shown = [f"{key} (store {meta.get(key)!r}, now {settings[key]!r})"
             if len(repr(meta.get(key))) + len(repr(settings[key])) < 80 else key for key in differing]
    hint = (" (to resume, match the store's precision: --amp/--no-amp, amp=True/False)"
            if "precision" in differing else "")
    # The content digests cover the images used: other images (--num-images) change them too, so only a store whose
    # every other setting agrees had its images changed (was: blamed on the pixels when --num-images changed)
    if differing == ["dataset"] and isinstance(meta.get("dataset"), dict):
        changed = [key for key in _CONTENT_DIGESTS if meta["dataset"].get(key) != settings["dataset"].get(key)]
        same_otherwise = all(meta["dataset"].get(k) == v for k, v in settings["dataset"].items() if k not in changed)
        if changed and same_otherwise:
            hint += f" ({_CONTENT_DIGESTS[changed[0]]})"
    raise ValueError(
        f"the store at {path} was made with other settings (different: {', '.join(shown)}){hint}; "
        "choose another --store, or pass --overwrite (overwrite=True) to replace it"
    )


def _holds_no_batch(path: Path, meta: Mapping[str, Any]) -> bool:
    """Whether an incomplete store has not one finished batch (records unreadable count as holding some)."""
    if meta.get("complete"):
        return False
    try:
        return not done_batches(path).any()
    except (ValueError, OSError, KeyError):
        return False


def _check_and_repair(path: Path, meta: dict[str, Any], layout: StoreLayout) -> bool:
    """Whether the store (same settings) is complete and intact; damage is repaired first, on stderr."""
    found = _inspect(path, meta, data=True)
    if not found.damage:
        return bool(meta.get("complete"))
    again = sorted({b for d in found.damage for b in d.batches})
    action = (f"re-extracting batch{'es' if len(again) > 1 else ''} {_runs_text(_ranges(again))}" if again
              else "no batch to re-extract")
    print(f"repairing the store at {path} ({'; '.join(d.describe() for d in found.damage[:3])}"
          f"{'; ...' if len(found.damage) > 3 else ''}): {action}", file=sys.stderr, flush=True)
    _repair(path, meta, layout, found)
    return False


def _replacement_path(path: Path) -> Path:
    """Where ``--overwrite`` builds the replacement of the store at ``path``: ``.<name>.new`` beside it."""
    return path.resolve().with_name(f".{path.resolve().name}.new")


def _say_unfinished_replacement(path: Path) -> None:
    """An interrupted --overwrite left its replacement beside the store (as large as a store): said where the store
    is used as it is, so that it is neither forgotten on the disk nor removed behind its command's back."""
    staging = _replacement_path(path)
    if not staging.is_dir():
        return
    size = sum(entry.stat().st_size for entry in staging.iterdir() if entry.is_file())
    print(f"note: {staging} holds an unfinished replacement of {path} ({size / 2**20:,.1f} MiB; an interrupted "
          "--overwrite with other settings); the store is used as it is: run that --overwrite command again to "
          f"finish it, or delete {staging}", file=sys.stderr)


def _replace_beside(path: Path, entries: Mapping[str, Any], settings: Mapping[str, Any],
                    layout: StoreLayout) -> StorePlan:
    """Build (or resume building) the replacement of the store at ``path`` in ``.<name>.new`` beside it."""
    staging = _replacement_path(path)
    _check_writable_folder(staging)
    try:
        meta = _read_meta_if_any(staging)
    except (DamagedStoreError, StoreVersionError):
        meta = None
    if meta is not None and all(meta.get(key) == value for key, value in settings.items()):
        plan = StorePlan(staging, path, _check_and_repair(staging, meta, layout))
    else:
        _remove_own_files(staging)
        _create_store(staging, entries, layout.arrays(), layout.image_ids, layout.labels, layout.batch_size,
                      layout.dtype)
        plan = StorePlan(staging, path, False)
    if plan.complete:
        plan.finish()
    return plan


def _install(staging: Path, path: Path) -> None:
    """Move the complete store ``staging`` into ``path`` over the old one: its files first, then the old
    store's files it lacks go, then meta.json, the commit. Files the store did not write stay."""
    new = {entry.name for entry in _own_files(staging)}
    for entry in _own_files(staging):
        if entry.name not in ("meta.json", LOCK_FILE):
            os.replace(entry, path / entry.name)
    for entry in _own_files(path):
        if entry.name not in new and entry.name not in ("meta.json", LOCK_FILE):
            entry.unlink()
    os.replace(staging / "meta.json", path / "meta.json")
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    _remove_own_files(staging)
    (staging / LOCK_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # a user's file inside it keeps it
        staging.rmdir()


def _create_store(path: Path, entries: Mapping[str, Any], arrays: Mapping[str, tuple[Sequence[int], Any]],
                  image_ids: np.ndarray, labels: np.ndarray, batch_size: int, dtype: str) -> None:
    """A new, empty store in the folder ``path`` (meta.json last: until then the folder holds no store)."""
    image_ids = np.asarray(image_ids, dtype=np.int64)
    n, p = len(image_ids), int(arrays["h"][0][1])
    made_folder = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / CREATING_FILE).write_text(f"{os.getpid()}\n")  # until meta.json: the files here are this creation's
        for name, (shape, array_dtype) in arrays.items():
            _create_array(path / f"{name}.npy", shape, array_dtype)
        small = {"image_ids.npy": _npy_bytes(image_ids), "labels.npy": _npy_bytes(np.asarray(labels, dtype=np.int64))}
        for name, content in small.items():
            _write_file_atomically(path / name, content)
        meta = {
            **entries,
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "store_id": uuid.uuid4().hex,
            "complete": False,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dtype": dtype,
            "layers": {name: list(shape) for name, (shape, _) in arrays.items() if name in LAYERS},
            "arrays": {name: {"shape": list(shape), "dtype": np.dtype(array_dtype).name}
                       for name, (shape, array_dtype) in arrays.items()},
            "checksums": {name: zlib.crc32(content) for name, content in small.items()},
            "num_images": n,
            "num_patches": p,
            "batch_size": batch_size,
            "num_batches": -(-n // batch_size),
        }
        _write_meta(path, meta)
        (path / CREATING_FILE).unlink()
    except OSError as error:
        _remove_own_files(path)
        if made_folder:
            path.rmdir()
        explained = _explain_os_error(error, path)
        if explained is error:
            raise
        raise explained from error


class StoreWriter:
    """Writes batches of rows into an existing store, as process ``rank``; use as a context manager."""

    def __init__(self, path: str | os.PathLike, rank: int = 0):
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        self.rank = rank
        self.batch_size = int(self.meta["batch_size"])
        self.num_batches = int(self.meta["num_batches"])
        self.num_images = int(self.meta["num_images"])
        self.image_ids = np.load(self.path / "image_ids.npy")
        self.labels = np.load(self.path / "labels.npy")
        self._fds: dict[str, int] = {}
        self._offsets: dict[str, int] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, np.dtype] = {}
        for name, spec in self.meta["arrays"].items():
            self._shapes[name], self._dtypes[name] = tuple(spec["shape"]), np.dtype(spec["dtype"])
            self._offsets[name] = len(_npy_header(spec["shape"], spec["dtype"]))
            self._fds[name] = os.open(self.path / f"{name}.npy", os.O_WRONLY)
        record_file = self.path / _RECORD_FILE.format(rank)
        if not record_file.exists():
            # Via a temporary name: a run killed right here must not leave a truncated record file.
            _write_records(record_file, np.zeros(_record_shape(self.meta), dtype=_RECORD_DTYPE))
        self._record_offset = len(_npy_header(_record_shape(self.meta), _RECORD_DTYPE))
        self._record_fd = os.open(record_file, os.O_WRONLY)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in (*self._fds.values(), self._record_fd):
            os.close(fd)
        self._fds.clear()

    @property
    def layer_names(self) -> list[str]:
        return [name for name in self.meta["arrays"] if name in LAYERS]

    def pending_batches(self) -> list[int]:
        """Batches no process has finished yet."""
        return [int(b) for b in np.flatnonzero(~done_batches(self.path))]

    def batch_rows(self, batch: int) -> slice:
        return slice(batch * self.batch_size, min((batch + 1) * self.batch_size, self.num_images))

    def write_batch(self, batch: int, rows: Mapping[str, np.ndarray]) -> None:
        """Write the rows of ``batch`` (every layer and ``boxes``), then its record: the batch is done."""
        span = self.batch_rows(batch)
        missing = sorted(set(self._fds) - set(rows))
        if missing:
            raise ValueError(f"write_batch needs rows for {missing}")
        checksums = []
        try:
            for name, fd in self._fds.items():
                shape, dtype = self._shapes[name], self._dtypes[name]
                values = np.ascontiguousarray(rows[name], dtype=dtype)
                expected = (span.stop - span.start, *shape[1:])
                if values.shape != expected:
                    raise ValueError(
                        f"rows of {name!r} for batch {batch} must have shape {expected}, got {values.shape}"
                    )
                data = memoryview(values).cast("B")
                checksums.append(zlib.crc32(data))
                row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
                _pwrite_all(fd, data, self._offsets[name] + span.start * row_bytes)
            for fd in self._fds.values():
                _sync_data(fd)
            # The record goes down only after the rows are on disk: a recorded batch is always valid.
            record = _record(self.meta["store_id"], checksums)
            _pwrite_all(self._record_fd, record.tobytes(), self._record_offset + batch * record.nbytes)
            _sync_data(self._record_fd)
        except OSError as error:
            raise _explain_os_error(error, self.path) from error

    def mark_complete(self, extra_meta: Mapping[str, Any] | None = None) -> None:
        """Check every batch is written and mark the store complete (atomic replace of meta.json)."""
        done = done_batches(self.path)
        if not done.all():
            raise RuntimeError(
                f"cannot mark {self.path} complete: {int((~done).sum())} of {done.size} batches are missing; "
                "re-run the same command to write them"
            )
        meta = _read_meta(self.path)
        writers = [file.name for file in _record_files(self.path)
                   if _valid_records(_read_records(file, meta)[0], meta["store_id"]).any()]
        try:
            _write_meta(self.path, {**meta, **(extra_meta or {}), "complete": True, "record_files": writers})
        except OSError as error:
            raise _explain_os_error(error, self.path) from error


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# ----------------------------------------------------------------------------- positional reads of one layer


@dataclass(frozen=True)
class LayerFile:
    """Where a complete, checked store keeps the rows of one layer, for reads that do not map the file.

    Vector ``r`` (patch ``r % P`` of image row ``r // P``) is ``shape[2]`` values of ``dtype`` at byte
    ``offset + r * row_bytes`` of ``file``. Positional reads (``os.pread``) keep the process's memory to
    what it asked for: the pages of a memory map stay in its resident set once touched, so reading a
    whole store through one charges the whole store to the reader.
    """

    store: Path
    layer: str
    file: Path
    offset: int
    shape: tuple[int, int, int]
    dtype: np.dtype
    meta: dict[str, Any]

    @property
    def num_vectors(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def row_bytes(self) -> int:
        return self.shape[2] * self.dtype.itemsize


def layer_file(path: str | os.PathLike, layer: str) -> LayerFile:
    """The layer ``layer`` of the complete store at ``path``, every file checked but the rows (those are checked
    batch by batch as :func:`read_layer_batches` reads them); :class:`DamagedStoreError` otherwise."""
    path = Path(path)
    meta = _read_meta(path)
    if not meta.get("complete"):
        done = done_batches(path)
        raise RuntimeError(f"the store at {path} is incomplete ({int(done.sum())} of {done.size} batches written): "
                           "re-run the same extract command to resume it")
    if layer not in meta.get("layers", {}):
        raise ValueError(f"the store at {path} has no layer {layer!r}; available: {', '.join(meta['layers'])}")
    found = _inspect(path, meta, data=False)
    if found.damage:
        raise DamagedStoreError(path, found.damage, meta)
    header, _, _ = _array_layout(meta, layer)
    spec = meta["arrays"][layer]
    return LayerFile(path, layer, path / f"{layer}.npy", len(header), tuple(int(s) for s in spec["shape"]),
                     np.dtype(spec["dtype"]), meta)


def read_layer_batches(layer: LayerFile, first_batch: int = 0, verify: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """``(batch, rows)`` for every batch of the store from ``first_batch`` on: its image rows of the layer
    (``n x P x D``, read-only), read with ``os.pread``; with ``verify`` each is checked against its batch
    record (CRC-32) before it is given, :class:`DamagedStoreError` naming the file and the batch otherwise."""
    meta = layer.meta
    column = list(meta["arrays"]).index(layer.layer)
    records = [_read_records(file, meta)[0] for file in _record_files(layer.store)]
    valid = [_valid_records(r, meta["store_id"]) for r in records]
    row_bytes = layer.shape[1] * layer.row_bytes
    fd = os.open(layer.file, os.O_RDONLY)
    try:
        for batch in range(first_batch, int(meta["num_batches"])):
            start, stop = _batch_span(batch, meta)
            size = (stop - start) * row_bytes
            data = os.pread(fd, size, layer.offset + start * row_bytes)
            problem = None
            if len(data) != size:
                problem = f"truncated (batch {batch} has {len(data)} of its {size} bytes)"
            elif verify and not any(ok[batch] and int(r[batch, column]) == zlib.crc32(data)
                                    for r, ok in zip(records, valid, strict=True)):
                problem = "fails its checksum"
            if problem:
                damage = StoreDamage(layer.file.name, problem, (batch,), _rows_text([batch], meta))
                raise DamagedStoreError(layer.store, [damage], meta)
            yield batch, np.frombuffer(data, layer.dtype).reshape(stop - start, *layer.shape[1:])
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 4 MiB blocks (saved indexes, build checkpoints and --init-from record it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.store says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
