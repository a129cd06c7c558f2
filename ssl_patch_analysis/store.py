"""Patch embeddings in memory and on disk: a resumable store of ``.npy`` files plus ``meta.json``.

A store is a directory::

    meta.json            settings, shapes, "complete": true|false
    h.npy                N x P x Dh     (float16 by default)
    z.npy                N x P x Dz     (when the model has a projector)
    pre_feature.npy      N x P x Dp     (EMP-SSL models)
    boxes.npy            float32 N x P x 4, pixel boxes x0, y0, x1, y1 in the source image
    image_ids.npy        int64 N, the dataset index of each row
    labels.npy           int64 N (-1 when unknown)
    done.rank<r>.npy     bool, one flag per batch of rows, written by process r only

Rows are written batch by batch with ``os.pwrite`` (an ``OSError`` on a full disk, where a
memory map would die of SIGBUS) into files whose space was reserved when the store was created.
A batch's flag is set only after its rows are on disk (``fsync``), so an interrupted run leaves
a store whose flagged batches are all valid; re-running the same command writes the rest. Each
process writes its own flag file, so several processes (``torchrun``) share a store without
writing the same bytes. The store is marked complete by replacing ``meta.json`` atomically.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

STORE_FORMAT = "ssl_patch_analysis.patch_embeddings"
STORE_VERSION = 1
LAYERS = ("h", "z", "pre_feature")
STORE_DTYPES = ("float16", "float32")
_ROW_ARRAYS = ("boxes",)  # written per batch beside the layers


def _sync_data(fd: int) -> None:
    # fdatasync skips the metadata flush fsync does; macOS has only fsync.
    getattr(os, "fdatasync", os.fsync)(fd)


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"no patch-embedding store at {path} (meta.json is missing): run "
            "`python -m ssl_patch_analysis.extract ... --out DIR` to make one"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != STORE_FORMAT:
        raise ValueError(f"{meta_path} is not a patch-embedding store (format {meta.get('format')!r})")
    if meta.get("version") != STORE_VERSION:
        raise ValueError(
            f"store {path} has version {meta.get('version')}, this code reads version {STORE_VERSION}: "
            "re-extract it with this version"
        )
    return meta


def _json_roundtrip(value: Any) -> Any:
    """The value as it will read back from meta.json (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def _done_files(path: Path) -> list[Path]:
    return sorted(path.glob("done.rank*.npy"))


def done_batches(path: str | os.PathLike) -> np.ndarray:
    """Which batches of a store (being) written are finished: the union of every process's flags."""
    path = Path(path)
    meta = _read_meta(path)
    done = np.zeros(meta["num_batches"], dtype=bool)
    for done_file in _done_files(path):
        done |= np.load(done_file)
    return done


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
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> "PatchEmbeddings":
        """Open a complete store; arrays are read-only memory maps unless ``mmap=False``."""
        path = Path(path)
        meta = _read_meta(path)
        if not meta.get("complete"):
            done = done_batches(path)
            raise RuntimeError(
                f"the store at {path} is incomplete ({int(done.sum())} of {done.size} batches written): "
                "re-run the same extract command to resume it"
            )
        mode = "r" if mmap else None
        arrays: dict[str, np.ndarray | None] = {}
        for name in LAYERS:
            arrays[name] = np.load(path / f"{name}.npy", mmap_mode=mode) if name in meta["layers"] else None
            if arrays[name] is not None and list(arrays[name].shape) != meta["layers"][name]:
                raise RuntimeError(
                    f"{path / (name + '.npy')} has shape {arrays[name].shape}, meta.json says "
                    f"{meta['layers'][name]}: the store is damaged, re-extract it with --overwrite"
                )
        return cls(
            h=arrays["h"],  # type: ignore[arg-type]
            z=arrays["z"],
            pre_feature=arrays["pre_feature"],
            boxes=np.load(path / "boxes.npy", mmap_mode=mode),
            image_ids=np.load(path / "image_ids.npy"),
            labels=np.load(path / "labels.npy"),
            meta=meta,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write a complete store to the new (or empty) directory ``path``."""
        path = Path(path)
        _check_free_target(path)
        meta = {
            **self.meta,
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "layers": {name: list(self.layer(name).shape) for name in self.layers},
            "num_images": self.num_images,
            "num_patches": self.num_patches,
            "batch_size": self.num_images,
            "num_batches": 1,
            "complete": True,
        }
        meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        staging = _staging_dir(path)
        try:
            for name in self.layers:
                np.save(staging / f"{name}.npy", np.ascontiguousarray(self.layer(name)))
            np.save(staging / "boxes.npy", np.asarray(self.boxes, dtype=np.float32))
            np.save(staging / "image_ids.npy", np.asarray(self.image_ids, dtype=np.int64))
            np.save(staging / "labels.npy", np.asarray(self.labels, dtype=np.int64))
            _write_json_atomically(staging / "meta.json", meta)
            os.replace(staging, path)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise _explain_os_error(error, path) from error


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
    if error.errno == errno.ENOSPC:
        return OSError(
            errno.ENOSPC,
            f"the disk holding {path} is full: free some space (or choose another --out) and re-run "
            "the same command; an interrupted store resumes where it stopped",
        )
    return error


def _array_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """Byte offset of the data in an ``.npy`` file (after its header), its shape and dtype."""
    header = np.load(path, mmap_mode="r")
    return header.offset, header.shape, header.dtype


def _create_array(path: Path, shape: tuple[int, ...], dtype: str) -> None:
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
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


def prepare_store(
    path: str | os.PathLike,
    settings: Mapping[str, Any],
    layout: StoreLayout,
    overwrite: bool = False,
    info: Mapping[str, Any] | None = None,
) -> bool:
    """Create the store at ``path``, or check that the one there was made with the same ``settings``.

    Returns True when the store there is already complete. ``settings`` are the meta.json entries
    that decide the contents (weights, sampler, data, dtype, ...); any difference is an error that
    names the differing entries, unless ``overwrite`` replaces the old store. ``info`` entries are
    stored in meta.json too but not compared (e.g. where the checkpoint file was).
    """
    path = Path(path)
    settings = _json_roundtrip(dict(settings))
    if (path / "meta.json").exists():
        meta = _read_meta(path)
        differing = sorted(key for key in settings if meta.get(key) != settings[key])
        if not differing:
            return bool(meta.get("complete"))
        if not overwrite:
            shown = [f"{key} (store {meta.get(key)!r}, now {settings[key]!r})"
                     if len(repr(meta.get(key))) + len(repr(settings[key])) < 80 else key for key in differing]
            hint = (" (to resume, match the store's precision: --amp/--no-amp, amp=True/False)"
                    if "precision" in differing else "")
            raise ValueError(
                f"the store at {path} was made with other settings (different: {', '.join(shown)}){hint}; "
                "choose another --out, or pass --overwrite (overwrite=True) to replace it"
            )
        shutil.rmtree(path)
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"{path} exists and is not a patch-embedding store (no meta.json); refusing to write into it: "
            "choose another --out"
        )
    _create_store(path, {**(info or {}), **settings}, layout)
    return False


def _create_store(path: Path, entries: Mapping[str, Any], layout: StoreLayout) -> None:
    n, p = layout.num_images, layout.num_patches
    staging = _staging_dir(path)
    try:
        for name, dim in layout.layer_dims.items():
            _create_array(staging / f"{name}.npy", (n, p, dim), layout.dtype)
        _create_array(staging / "boxes.npy", (n, p, 4), "float32")
        np.save(staging / "image_ids.npy", np.asarray(layout.image_ids, dtype=np.int64))
        np.save(staging / "labels.npy", np.asarray(layout.labels, dtype=np.int64))
        meta = {
            **entries,
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "complete": False,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dtype": layout.dtype,
            "layers": {name: [n, p, dim] for name, dim in layout.layer_dims.items()},
            "num_images": n,
            "num_patches": p,
            "batch_size": layout.batch_size,
            "num_batches": layout.num_batches,
        }
        _write_json_atomically(staging / "meta.json", meta)
        os.replace(staging, path)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise _explain_os_error(error, path) from error


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
        for name in (*self.meta["layers"], *_ROW_ARRAYS):
            file = self.path / f"{name}.npy"
            self._offsets[name], self._shapes[name], self._dtypes[name] = _array_layout(file)
            self._fds[name] = os.open(file, os.O_WRONLY)
        done_file = self.path / f"done.rank{rank}.npy"
        if not done_file.exists():
            # Via a temporary name: a run killed right here must not leave a truncated flag file.
            tmp = done_file.with_name(done_file.name + ".tmp")
            with open(tmp, "wb") as f:
                np.save(f, np.zeros(self.num_batches, dtype=bool))
            os.replace(tmp, done_file)
        self._done_offset = _array_layout(done_file)[0]
        self._done_fd = os.open(done_file, os.O_WRONLY)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in (*self._fds.values(), self._done_fd):
            os.close(fd)
        self._fds.clear()

    @property
    def layer_names(self) -> list[str]:
        return list(self.meta["layers"])

    def pending_batches(self) -> list[int]:
        """Batches no process has finished yet."""
        return [int(b) for b in np.flatnonzero(~done_batches(self.path))]

    def batch_rows(self, batch: int) -> slice:
        return slice(batch * self.batch_size, min((batch + 1) * self.batch_size, self.num_images))

    def write_batch(self, batch: int, rows: Mapping[str, np.ndarray]) -> None:
        """Write the rows of ``batch`` (every layer and ``boxes``), then flag the batch done."""
        span = self.batch_rows(batch)
        missing = sorted(set(self._fds) - set(rows))
        if missing:
            raise ValueError(f"write_batch needs rows for {missing}")
        try:
            for name, fd in self._fds.items():
                shape, dtype = self._shapes[name], self._dtypes[name]
                values = np.ascontiguousarray(rows[name], dtype=dtype)
                expected = (span.stop - span.start, *shape[1:])
                if values.shape != expected:
                    raise ValueError(
                        f"rows of {name!r} for batch {batch} must have shape {expected}, got {values.shape}"
                    )
                row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
                _pwrite_all(fd, memoryview(values).cast("B"), self._offsets[name] + span.start * row_bytes)
            for fd in self._fds.values():
                _sync_data(fd)
            # The flag goes down only after the rows are on disk: a flagged batch is always valid.
            _pwrite_all(self._done_fd, b"\x01", self._done_offset + batch)
            _sync_data(self._done_fd)
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
        meta = {**_read_meta(self.path), **(extra_meta or {}), "complete": True}
        try:
            _write_json_atomically(self.path / "meta.json", meta)
        except OSError as error:
            raise _explain_os_error(error, self.path) from error


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
