"""The patch-embedding store: exact round trips, batch-wise progress, settings checks, full disks."""
import errno
import json
import os

import numpy as np
import pytest

from ssl_patch_analysis import store
from ssl_patch_analysis.errors import DiskFullError
from ssl_patch_analysis.store import (
    PatchEmbeddings,
    StoreLayout,
    StoreWriter,
    done_batches,
    prepare_store,
)

N, P, DH, DZ = 7, 5, 6, 3


def random_embeddings(dtype=np.float32, with_z=True) -> PatchEmbeddings:
    rng = np.random.default_rng(0)
    return PatchEmbeddings(
        h=rng.standard_normal((N, P, DH)).astype(dtype),
        z=rng.standard_normal((N, P, DZ)).astype(dtype) if with_z else None,
        pre_feature=None,
        boxes=rng.uniform(0, 32, (N, P, 4)).astype(np.float32),
        image_ids=np.arange(10, 10 + N, dtype=np.int64),
        labels=rng.integers(0, 10, N).astype(np.int64),
        meta={"sampler": {"kind": "grid", "patch_size": 8, "stride": 8}},
    )


def layout(batch_size=3, dtype="float16") -> StoreLayout:
    return StoreLayout(num_patches=P, layer_dims={"h": DH, "z": DZ}, image_ids=np.arange(N) * 2,
                       labels=np.arange(N) % 3, batch_size=batch_size, dtype=dtype)


def rows_of(emb: PatchEmbeddings, span: slice) -> dict:
    return {"h": emb.h[span], "z": emb.z[span], "boxes": emb.boxes[span]}


SETTINGS = {"sampler": {"kind": "grid", "patch_size": 8, "stride": 4}, "dtype": "float16", "resize_to": 32}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    emb = random_embeddings(dtype)
    emb.save(tmp_path / "s")
    for mmap in (True, False):
        back = PatchEmbeddings.load(tmp_path / "s", mmap=mmap)
        assert isinstance(back.h, np.memmap) == mmap
        for name in ("h", "z", "boxes", "image_ids", "labels"):
            got, want = getattr(back, name), getattr(emb, name)
            assert got.dtype == want.dtype and np.array_equal(got, want), name
        assert back.pre_feature is None and back.layers == ["h", "z"]
        assert back.meta["sampler"] == emb.meta["sampler"] and back.meta["complete"] is True


def test_layer_names_what_is_missing():
    emb = random_embeddings(with_z=False)
    assert emb.layer("h") is emb.h
    with pytest.raises(ValueError, match=r"no layer 'z'.*available: h"):
        emb.layer("z")
    with pytest.raises(ValueError, match="unknown layer 'q'"):
        emb.layer("q")


def test_save_refuses_non_empty_target_and_load_needs_a_store(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        random_embeddings().save(tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match=r"meta\.json is missing"):
        PatchEmbeddings.load(tmp_path / "nowhere")


def test_batches_written_in_any_order_by_two_writers_give_the_exact_rows(tmp_path):
    path = tmp_path / "s"
    emb = random_embeddings()
    assert prepare_store(path, SETTINGS, layout(), info={"model": {"arch": "resnet18"}}).complete is False
    meta = json.loads((path / "meta.json").read_text())
    assert meta["complete"] is False and meta["num_batches"] == 3 and meta["model"] == {"arch": "resnet18"}
    with pytest.raises(RuntimeError, match=r"incomplete \(0 of 3 batches.*re-run the same"):
        PatchEmbeddings.load(path)

    with StoreWriter(path, rank=1) as second, StoreWriter(path, rank=0) as first:
        assert first.pending_batches() == [0, 1, 2]
        second.write_batch(2, rows_of(emb, second.batch_rows(2)))  # the short last batch (1 row)
        first.write_batch(0, rows_of(emb, first.batch_rows(0)))
        assert done_batches(path).tolist() == [True, False, True]
        assert first.pending_batches() == [1]
        with pytest.raises(RuntimeError, match="1 of 3 batches are missing"):
            first.mark_complete()
        first.write_batch(1, rows_of(emb, first.batch_rows(1)))
        first.mark_complete({"last_run": {"seconds": 1.0}})
    # Each process records only its own batches.
    assert done_batches(path, rank=0).tolist() == [True, True, False]
    assert done_batches(path, rank=1).tolist() == [False, False, True]

    back = PatchEmbeddings.load(path)
    assert back.h.dtype == np.float16
    assert np.array_equal(back.h, emb.h.astype(np.float16)) and np.array_equal(back.z, emb.z.astype(np.float16))
    assert np.array_equal(back.boxes, emb.boxes)
    assert back.image_ids.tolist() == (np.arange(N) * 2).tolist()
    assert back.labels.tolist() == (np.arange(N) % 3).tolist()
    assert back.meta["last_run"] == {"seconds": 1.0} and back.meta["sampler"] == SETTINGS["sampler"]


def test_write_batch_checks_row_shapes(tmp_path):
    prepare_store(tmp_path / "s", SETTINGS, layout())
    emb = random_embeddings()
    with StoreWriter(tmp_path / "s") as writer, pytest.raises(ValueError, match="must have shape"):
        writer.write_batch(0, rows_of(emb, slice(0, 2)))


def test_settings_decide_resume_refuse_or_overwrite(tmp_path):
    path = tmp_path / "s"
    prepare_store(path, SETTINGS, layout())
    with StoreWriter(path) as writer:
        writer.write_batch(0, rows_of(random_embeddings(), writer.batch_rows(0)))
    # Same settings (a tuple reads back from JSON as a list): the partial store is resumed.
    same = {**SETTINGS, "sampler": {"kind": "grid", "patch_size": 8, "stride": 4}}
    assert prepare_store(path, same, layout()).complete is False
    assert done_batches(path).tolist() == [True, False, False]
    other = {**SETTINGS, "dtype": "float32"}
    with pytest.raises(ValueError, match=r"different: dtype.*another --store.*--overwrite"):
        prepare_store(path, other, layout(dtype="float32"))
    # The replacement is built beside the store, which stays as it was until the new one is complete.
    plan = prepare_store(path, other, layout(dtype="float32"), overwrite=True)
    assert plan.complete is False and plan.target == path and plan.path == tmp_path / ".s.new"
    assert done_batches(plan.path).tolist() == [False, False, False]
    assert np.load(plan.path / "h.npy", mmap_mode="r").dtype == np.float32
    assert done_batches(path).tolist() == [True, False, False]
    assert np.load(path / "h.npy", mmap_mode="r").dtype == np.float16


def test_prepare_store_never_writes_into_a_foreign_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a patch-embedding store"):
            prepare_store(tmp_path / "photos", SETTINGS, layout(), overwrite=overwrite)
    assert (tmp_path / "photos" / "cat.jpg").exists()


def test_full_disk_while_writing_leaves_a_resumable_store(tmp_path, monkeypatch):
    path = tmp_path / "s"
    emb = random_embeddings()
    prepare_store(path, SETTINGS, layout())
    real_pwrite = os.pwrite
    calls = []

    def pwrite_until_full(fd, data, offset):
        calls.append(offset)
        if len(calls) > 4:  # batch 0 (h, z, boxes, record) fits, batch 1 does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    with StoreWriter(path) as writer:
        monkeypatch.setattr(store.os, "pwrite", pwrite_until_full)
        writer.write_batch(0, rows_of(emb, writer.batch_rows(0)))
        with pytest.raises(OSError, match=r"full.*re-run the same command") as error:
            writer.write_batch(1, rows_of(emb, writer.batch_rows(1)))
        assert error.value.errno == errno.ENOSPC
        # the one mechanism every writer uses (it was a plain OSError, said as "[Errno 28] the disk holding ...")
        assert isinstance(error.value, DiskFullError) and "Errno" not in str(error.value)
        monkeypatch.setattr(store.os, "pwrite", real_pwrite)
        assert done_batches(path).tolist() == [True, False, False]
        for batch in writer.pending_batches():
            writer.write_batch(batch, rows_of(emb, writer.batch_rows(batch)))
        writer.mark_complete()
    assert np.array_equal(PatchEmbeddings.load(path).h, emb.h.astype(np.float16))


def test_full_disk_at_creation_fails_early_and_leaves_nothing(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match="full"):
        prepare_store(tmp_path / "s", SETTINGS, layout())
    assert list(tmp_path.iterdir()) == []


def test_layout_rejects_bad_requests():
    with pytest.raises(ValueError, match="dtype must be one of"):
        layout(dtype="int8")
    with pytest.raises(ValueError, match="include 'h'"):
        StoreLayout(num_patches=1, layer_dims={"z": 3}, image_ids=np.arange(2), labels=np.zeros(2), batch_size=1)


def write_all(path, emb, ranks=(0,)):
    """Every batch written, dealt out to the processes ``ranks`` in turn, and the store marked complete."""
    writers = {rank: StoreWriter(path, rank=rank) for rank in ranks}
    try:
        first = writers[ranks[0]]
        for k, batch in enumerate(first.pending_batches()):
            writer = writers[ranks[k % len(ranks)]]
            writer.write_batch(batch, rows_of(emb, writer.batch_rows(batch)))
        first.mark_complete()
    finally:
        for writer in writers.values():
            writer.close()


def test_damage_in_a_store_of_two_processes_is_repaired_batch_by_batch(tmp_path):
    path = tmp_path / "s"
    emb = random_embeddings()
    prepare_store(path, SETTINGS, layout())
    write_all(path, emb, ranks=(0, 1))  # batches 0 and 2 by rank 0, batch 1 by rank 1
    with open(path / "h.npy", "r+b") as f:  # a byte of batch 1 (rows 3-5)
        f.seek(np.load(path / "h.npy", mmap_mode="r").offset + 4 * P * DH * 2)
        f.write(b"\x7f")
    records = (path / "batches.rank0.npy").read_bytes()
    (path / "batches.rank0.npy").write_bytes(records[:-1] + bytes([records[-1] ^ 0xFF]))  # batch 2's record
    damage = store.verify_store(path)
    assert [(d.file, d.batches) for d in damage] == [("batches.rank0.npy", (2,)), ("h.npy", (1,))]
    assert damage[1].describe(with_rows=True) == "h.npy batch 1 (rows 3-5): fails its checksum"
    plan = prepare_store(path, SETTINGS, layout())
    assert plan.complete is False and plan.path == path
    assert done_batches(path).tolist() == [True, False, False]
    assert done_batches(path, rank=1).tolist() == [False, False, False]  # its damaged batch lost its record
    write_all(path, emb, ranks=(0,))
    back = PatchEmbeddings.load(path)
    assert np.array_equal(back.h, emb.h.astype(np.float16)) and back.meta["record_files"] == ["batches.rank0.npy"]


def test_saved_stores_are_verified_and_say_how_to_repair(tmp_path):
    emb = random_embeddings()
    emb.save(tmp_path / "s")
    assert store.verify_store(tmp_path / "s") == []
    with open(tmp_path / "s" / "z.npy", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00")
    with pytest.raises(store.DamagedStoreError, match=r"z\.npy batch 0: fails its checksum.*save the embeddings again"):
        PatchEmbeddings.load(tmp_path / "s")
    assert np.array_equal(PatchEmbeddings.load(tmp_path / "s", verify=False).h, emb.h)  # the data pass skipped


def test_lock_of_a_folder_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    path = tmp_path / "s"
    random_embeddings().save(path)
    real_open = os.open

    def read_only(file, flags, *args):
        if str(file).endswith(store.LOCK_FILE):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, flags, *args)

    monkeypatch.setattr(store.os, "open", read_only)
    with store.store_lock(path):  # a reader of a store it may not write: nothing to lock
        assert store.verify_store(path) == []


def test_a_users_own_arrays_named_like_a_stores_are_never_replaced(tmp_path):
    """A folder holding h.npy / labels.npy of the user's own (no meta.json) was taken for the leftovers of an
    unfinished store and replaced without a word. Leftovers are only what a creation marks as its own (it writes a
    marker first); anything else is refused in one line, and the files are kept, unless --overwrite asks (the advice
    for a store whose meta.json was lost)."""
    own = tmp_path / "mine"
    own.mkdir()
    np.save(own / "h.npy", np.arange(6.0))
    np.save(own / "labels.npy", np.arange(3))
    before = {p.name: p.read_bytes() for p in own.iterdir()}
    with pytest.raises(FileExistsError, match=r"h.npy, labels.npy .*not written by a store being created.*"
                                              r"--overwrite") as e:
        prepare_store(own, SETTINGS, layout())
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in own.iterdir()} == before
    assert prepare_store(own, SETTINGS, layout(), overwrite=True).complete is False  # asked for: replaced
    assert (own / "meta.json").is_file()

    # a creation stopped before its meta.json (killed): its own leftovers are replaced by the next run
    path = tmp_path / "s"
    real = store._write_meta

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    store._write_meta = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare_store(path, SETTINGS, layout())
    finally:
        store._write_meta = real
    assert (path / "h.npy").exists() and not (path / "meta.json").exists()
    plan = prepare_store(path, SETTINGS, layout())
    assert plan.complete is False and (path / "meta.json").is_file()
    assert not (path / store.CREATING_FILE).exists()


def test_an_unfinished_replacement_beside_a_store_is_said_when_the_store_is_used(tmp_path, capsys):
    """An --overwrite with other settings, interrupted, leaves its replacement in a hidden folder beside the store
    (as large as a store); the old command, run again, used the store as it was and never mentioned it."""
    path = tmp_path / "s"
    prepare_store(path, SETTINGS, layout())
    other = {**SETTINGS, "dtype": "float32"}
    staging = prepare_store(path, other, layout(dtype="float32"), overwrite=True).path  # then interrupted
    capsys.readouterr()
    assert prepare_store(path, SETTINGS, layout()).path == path
    err = capsys.readouterr().err
    assert f"{staging} holds an unfinished replacement of {path}" in err and "--overwrite" in err
    assert "delete" in err and staging.is_dir()  # said, not removed: that run can still finish it
    prepare_store(path, other, layout(dtype="float32"), overwrite=True)  # resuming the replacement: no notice
    assert "unfinished replacement" not in capsys.readouterr().err
