"""Stores are the user's results (issue 14): damage is detected, named and repaired, --overwrite loses nothing,
an image folder's store follows its images, and one writer at a time holds a store."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_model
from ssl_patch_analysis import extract, store
from ssl_patch_analysis.checkpoints import save_checkpoint
from ssl_patch_analysis.data import ImageFolderDataset, TensorImageDataset
from ssl_patch_analysis.extract import extract_patch_embeddings
from ssl_patch_analysis.patches import grid
from ssl_patch_analysis.store import PatchEmbeddings

NUM_IMAGES, BATCH_SIZE, PATCHES = 6, 2, 4  # 3 batches of 2 images, 4 patches (grid 16 on 32 px) each


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (NUM_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, model, images):
    """A complete, intact store and its arrays, to compare repaired stores against."""
    path = tmp_path_factory.mktemp("fresh") / "store"
    extract_patch_embeddings(model, images, grid(16), batch_size=BATCH_SIZE, out=path, progress=False)
    return path


class Counter:
    """Counts the patches the model embeds (the one-patch probe of each run included)."""

    def __init__(self, model):
        self.patches = []
        self.handle = model.backbone.register_forward_hook(lambda m, i, o: self.patches.append(len(o)))

    def images(self) -> int:
        # Each run starts with a one-patch forward pass that measures the output sizes.
        return sum(n for n in self.patches if n > 1) // PATCHES

    def close(self):
        self.handle.remove()


def run(model, images, path, counter=None, **kwargs):
    counter = counter or Counter(model)
    try:
        result = extract_patch_embeddings(model, images, grid(16), batch_size=BATCH_SIZE, out=path, progress=False,
                                          **kwargs)
    finally:
        counter.close()
    return result, counter.images()


def assert_same_store(path, reference):
    got, want = PatchEmbeddings.load(path), PatchEmbeddings.load(reference)
    for name in ("h", "z", "boxes", "image_ids", "labels"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    settings = ("model_sha256", "sampler", "dataset", "image_ids_sha256", "dtype", "precision", "layers")
    assert {k: got.meta[k] for k in settings} == {k: want.meta[k] for k in settings}
    assert store.verify_store(path) == []


def copy_store(source, target):
    shutil.copytree(source, target)
    (target / ".lock").unlink(missing_ok=True)
    return target


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def data_offset(path) -> int:
    return np.load(path, mmap_mode="r").offset


def batch_offset(path, name, batch) -> int:
    """Byte offset of the middle of ``batch``'s rows in the array file ``name``."""
    array = np.load(path / f"{name}.npy", mmap_mode="r")
    row_bytes = array[0].nbytes
    return array.offset + batch * BATCH_SIZE * row_bytes + row_bytes


# ----------------------------------------------------------------------------- 1: checksums


def test_random_bytes_in_h_are_named_and_only_their_batch_is_re_extracted(tmp_path, model, images, fresh):
    path = copy_store(fresh, tmp_path / "s")
    flip(path / "h.npy", batch_offset(path, "h", 1))
    with pytest.raises(ValueError, match=r"h\.npy batch 1\b.*checksum.*re-run the command that made it"):
        PatchEmbeddings.load(path)
    damage = store.verify_store(path)
    assert [(d.file, d.batches) for d in damage] == [("h.npy", (1,))]
    _, embedded = run(model, images, path)
    assert embedded == BATCH_SIZE  # batch 1 only
    assert_same_store(path, fresh)


def test_load_verifies_by_default_and_verify_false_checks_only_the_structure(tmp_path, fresh):
    path = copy_store(fresh, tmp_path / "s")
    flip(path / "z.npy", batch_offset(path, "z", 2))
    with pytest.raises(store.DamagedStoreError, match=r"z\.npy batch 2\b"):
        PatchEmbeddings.load(path)
    assert PatchEmbeddings.load(path, verify=False).z.shape == (NUM_IMAGES, PATCHES, 16)
    (path / "boxes.npy").write_bytes((path / "boxes.npy").read_bytes()[:-10])
    with pytest.raises(store.DamagedStoreError, match=r"boxes\.npy.*truncated"):
        PatchEmbeddings.load(path, verify=False)


def test_verify_command_names_file_and_batch(tmp_path, fresh, capsys):
    path = copy_store(fresh, tmp_path / "s")
    with pytest.raises(SystemExit) as exit_status:
        extract.main(["--verify", "--store", str(path)])
    assert exit_status.value.code == 0 and "intact" in capsys.readouterr().out
    flip(path / "h.npy", batch_offset(path, "h", 0))
    flip(path / "boxes.npy", batch_offset(path, "boxes", 2))
    with pytest.raises(SystemExit) as exit_status:
        extract.main(["--verify", "--store", str(path)])
    out = capsys.readouterr().out
    assert exit_status.value.code == 1
    assert "h.npy batch 0 (rows 0-1)" in out and "boxes.npy batch 2 (rows 4-5)" in out
    assert "re-run the command that made it" in out
    with pytest.raises(SystemExit) as exit_status:
        extract.main(["--verify", "--store", str(tmp_path / "nothing")])
    assert exit_status.value.code == 2 and "meta.json is missing" in capsys.readouterr().err


def test_interrupted_then_damaged_store_resumes_and_repairs(tmp_path, model, images, fresh, monkeypatch):
    path = tmp_path / "s"
    real_write = store.StoreWriter.write_batch
    written = []

    def write_two_then_die(self, batch, rows):
        if len(written) == 2:
            raise KeyboardInterrupt
        real_write(self, batch, rows)
        written.append(batch)

    monkeypatch.setattr(store.StoreWriter, "write_batch", write_two_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(model, images, path)
    monkeypatch.undo()
    assert store.done_batches(path).tolist() == [True, True, False]
    flip(path / "z.npy", batch_offset(path, "z", 0))  # a written batch damaged while the store was incomplete
    assert [(d.file, d.batches) for d in store.verify_store(path)] == [("z.npy", (0,))]
    _, embedded = run(model, images, path)
    assert embedded == 2 * BATCH_SIZE  # batch 0 again and batch 2 for the first time
    assert_same_store(path, fresh)


# ----------------------------------------------------------------------------- fault injection


def _faults(fresh):
    """(file, how, offset or None) for every file of the store: bytes flipped in the header and the data,
    the file truncated, the file deleted."""
    for file in sorted(p.name for p in fresh.iterdir() if p.name != ".lock"):
        size = (fresh / file).stat().st_size
        if file == "meta.json":
            offsets = [0, size // 3, size // 2, size - 2]
        else:
            start = data_offset(fresh / file)
            offsets = [8, start // 2, start - 1, start, (start + size) // 2, size - 1]
        for offset in offsets:
            yield file, "flip", offset
        yield file, "truncate", None
        yield file, "delete", None


def test_fault_injection_every_file_detected_named_and_repaired_with_nothing_lost(tmp_path, model, images, fresh):
    cases = list(_faults(fresh))
    assert {file for file, _, _ in cases} == {"meta.json", "h.npy", "z.npy", "boxes.npy", "image_ids.npy",
                                              "labels.npy", "batches.rank0.npy"}
    for k, (file, how, offset) in enumerate(cases):
        label = f"{file} {how} {offset}"
        path = copy_store(fresh, tmp_path / f"case{k}")
        target = path / file
        if how == "flip":
            flip(target, offset)
        elif how == "truncate":
            target.write_bytes(target.read_bytes()[:target.stat().st_size * 2 // 3])
        else:
            target.unlink()
        damage = store.verify_store(path)
        assert damage and all(d.file == file or file == "batches.rank0.npy" for d in damage), (label, damage)
        with pytest.raises(ValueError, match=file.replace(".", r"\.")) as error:
            PatchEmbeddings.load(path)
        message = str(error.value)
        assert "\n" not in message, label
        if file == "meta.json":
            assert "--overwrite" in message, label
            with pytest.raises(ValueError, match=r"meta\.json.*--overwrite"):
                run(model, images, path)
            _, embedded = run(model, images, path, overwrite=True)
            assert embedded == NUM_IMAGES, label
        else:
            assert "re-run the command that made it" in message, label
            _, embedded = run(model, images, path)
            # Only what the damage report named is computed again (a header is rewritten, not re-extracted).
            named = {b for d in damage for b in d.batches}
            assert embedded == BATCH_SIZE * len(named), (label, damage, embedded)
        assert_same_store(path, fresh)
        shutil.rmtree(path)


# ----------------------------------------------------------------------------- 10: one line that helps


def test_damaged_files_give_one_line_naming_the_file_and_the_advice_works(tmp_path, model, images, fresh):
    truncated = copy_store(fresh, tmp_path / "truncated")
    (truncated / "h.npy").write_bytes((truncated / "h.npy").read_bytes()[:200])
    with pytest.raises(ValueError, match=r"h\.npy batches 0-2.*truncated.*re-run the command that made it"):
        PatchEmbeddings.load(truncated)

    garbled = copy_store(fresh, tmp_path / "garbled")
    (garbled / "h.npy").write_bytes(b"\x93NUMPY garbage" + (garbled / "h.npy").read_bytes()[14:])
    with pytest.raises(ValueError, match=r"h\.npy: the \.npy header is damaged.*re-run the command that made it"):
        PatchEmbeddings.load(garbled)

    broken = copy_store(fresh, tmp_path / "broken")
    (broken / "meta.json").write_text((broken / "meta.json").read_text()[:-40])
    with pytest.raises(ValueError, match=r"damaged \(meta\.json: not readable JSON.*--overwrite"):
        PatchEmbeddings.load(broken)

    # --overwrite with the same settings repairs too (it used to hand the damaged store back).
    truncated_again = copy_store(truncated, tmp_path / "truncated_again")
    for path, expected, overwrite in ((truncated, NUM_IMAGES, False), (garbled, 0, False),
                                      (truncated_again, NUM_IMAGES, True)):
        _, embedded = run(model, images, path, overwrite=overwrite)  # the advice: re-run the same command
        assert embedded == expected
        assert_same_store(path, fresh)
    with pytest.raises(ValueError, match=r"meta\.json.*--overwrite"):
        run(model, images, broken)
    run(model, images, broken, overwrite=True)  # the advice: --overwrite
    assert_same_store(broken, fresh)


def test_extract_command_reports_a_damaged_store_in_one_line(tmp_path, model):
    folder = tmp_path / "pictures"
    for i in range(3):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"class{i % 2}" / f"{i}.png")
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(model, checkpoint)
    out = tmp_path / "store"
    argv = ["--model", str(checkpoint), "--data", str(folder), "--grid", "16", "--device", "cpu", "--store", str(out)]
    extract.main(argv)
    # Valid JSON that is no object too: --verify called it damaged and advised --overwrite, which then refused it.
    for damaged in ("{ not json", "[1, 2]"):
        (out / "meta.json").write_text(damaged)
        with pytest.raises(SystemExit) as exit_status:
            extract.main(argv)
        assert exit_status.value.code == 2
        with pytest.raises(store.DamagedStoreError, match="--overwrite"):
            store.read_store_meta(out)
        extract.main([*argv, "--overwrite"])
        assert store.verify_store(out) == []


def test_old_store_version_asks_for_re_extraction_and_overwrite_does_it(tmp_path, model, images, fresh):
    path = copy_store(fresh, tmp_path / "s")
    meta = json.loads((path / "meta.json").read_text())
    for key in ("meta_sha256", "store_id", "arrays", "checksums", "record_files"):  # what version 1 lacked
        del meta[key]
    meta["version"] = 1
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "done.rank0.npy").write_bytes(b"old flags")
    with pytest.raises(ValueError, match=r"version 1.*re-extract it.*--overwrite"):
        PatchEmbeddings.load(path)
    with pytest.raises(ValueError, match=r"version 1.*--overwrite"):
        run(model, images, path)
    run(model, images, path, overwrite=True)
    assert_same_store(path, fresh)
    assert not (path / "done.rank0.npy").exists()  # a file of the old store: replaced with it


# ----------------------------------------------------------------------------- 2: image folders go stale


def _write_image(path, value):
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(path)


def test_replacing_an_image_of_a_folder_is_noticed(tmp_path, model):
    folder = tmp_path / "pictures"
    for i in range(4):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        _write_image(folder / f"class{i % 2}" / f"{i}.png", 30 + 50 * i)
    out = tmp_path / "store"

    def extract_folder(**kwargs):
        return extract_patch_embeddings(model, ImageFolderDataset(folder), grid(16), out=out, progress=False,
                                        num_workers=0, **kwargs)

    before = extract_folder()
    replaced = folder / "class1" / "3.png"
    _write_image(replaced, 250)
    stat = replaced.stat()
    os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse clock would not see it
    with pytest.raises(ValueError, match=r"different: dataset.*image files changed.*--overwrite"):
        extract_folder()
    after = extract_folder(overwrite=True)
    fresh = extract_patch_embeddings(model, ImageFolderDataset(folder), grid(16), progress=False, num_workers=0)
    assert np.array_equal(after.h, fresh.h) and not np.array_equal(after.h[3], before.h[3])
    assert np.array_equal(after.h[:3], before.h[:3])


def test_store_of_some_images_ignores_changes_to_the_others(tmp_path, model):
    folder = tmp_path / "pictures"
    (folder / "a").mkdir(parents=True)
    for i in range(3):
        _write_image(folder / "a" / f"{i}.png", 60 * i)
    out = tmp_path / "store"
    kwargs = dict(image_ids=[0, 1], out=out, progress=False, num_workers=0)
    extract_patch_embeddings(model, ImageFolderDataset(folder), grid(16), **kwargs)
    _write_image(folder / "a" / "2.png", 255)
    os.utime(folder / "a" / "2.png", ns=(0, 10**18))
    extract_patch_embeddings(model, ImageFolderDataset(folder), grid(16), **kwargs)  # image 2 is not in the store


def test_in_memory_data_sets_are_identified_by_their_pixels(tmp_path, model, images):
    out = tmp_path / "store"
    labels = torch.zeros(NUM_IMAGES, dtype=torch.int64)
    dataset = TensorImageDataset(images, labels, ["a"], name="cifar10", split="test")
    extract_patch_embeddings(model, dataset, grid(16), out=out, progress=False)
    changed = images.clone()
    changed[4] = 255 - changed[4]  # same names, sizes and labels: only the pixels tell
    other = TensorImageDataset(changed, labels, ["a"], name="cifar10", split="test")
    with pytest.raises(ValueError, match=r"different: dataset"):
        extract_patch_embeddings(model, other, grid(16), out=out, progress=False)


# ----------------------------------------------------------------------------- 9: --overwrite loses nothing


def _user_files(path):
    (path / "notes.txt").write_text("my notes")
    (path / "figures").mkdir()
    (path / "figures" / "fig.png").write_bytes(b"png")


def _assert_user_files(path):
    assert (path / "notes.txt").read_text() == "my notes"
    assert (path / "figures" / "fig.png").read_bytes() == b"png"


def test_overwrite_replaces_only_the_stores_own_files(tmp_path, model, images, fresh):
    path = tmp_path / "s"
    extract_patch_embeddings(model, images, grid(8), batch_size=BATCH_SIZE, out=path, progress=False)
    _user_files(path)
    run(model, images, path, overwrite=True)
    _assert_user_files(path)
    assert_same_store(path, fresh)
    assert sorted(p.name for p in path.parent.iterdir()) == ["s"]  # no staging folder left behind


def test_failed_overwrite_keeps_the_old_store_and_resumes_beside_it(tmp_path, model, images, fresh, monkeypatch):
    path = tmp_path / "s"
    old = extract_patch_embeddings(model, images, grid(8), batch_size=BATCH_SIZE, out=path, progress=False)
    old_h = np.array(old.h)
    _user_files(path)
    real_write = store.StoreWriter.write_batch
    calls = []

    def fail_on_second(self, batch, rows):
        calls.append(batch)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_write(self, batch, rows)

    monkeypatch.setattr(store.StoreWriter, "write_batch", fail_on_second)
    with pytest.raises(OSError):  # noqa: PT011 - the injected failure is a bare OSError
        run(model, images, path, overwrite=True)
    monkeypatch.undo()
    kept = PatchEmbeddings.load(path)  # the old store, whole and verified
    assert np.array_equal(kept.h, old_h) and kept.meta["sampler"] == grid(8).to_dict()
    _assert_user_files(path)
    _, embedded = run(model, images, path, overwrite=True)
    assert embedded == NUM_IMAGES - BATCH_SIZE  # the new store resumed where the failed run stopped
    _assert_user_files(path)
    assert_same_store(path, fresh)


def test_a_swap_cut_short_reads_as_damage_never_as_a_valid_mix(tmp_path, model, images, fresh, monkeypatch):
    path = tmp_path / "s"
    extract_patch_embeddings(model, images, grid(8), batch_size=BATCH_SIZE, out=path, progress=False)
    real_replace = os.replace

    def die_before_the_commit(source, target):
        if Path(target) == path / "meta.json" and Path(source).parent.name == ".s.new":
            raise KeyboardInterrupt  # killed between moving the new files in and replacing meta.json
        real_replace(source, target)

    monkeypatch.setattr(store.os, "replace", die_before_the_commit)
    with pytest.raises(KeyboardInterrupt):
        run(model, images, path, overwrite=True)
    monkeypatch.undo()
    # The old meta.json beside the new files: their records carry the new store's id, so nothing passes.
    with pytest.raises(store.DamagedStoreError, match="a record fails its checksum"):
        PatchEmbeddings.load(path)
    run(model, images, path, overwrite=True)
    assert_same_store(path, fresh)


def test_overwrite_still_refuses_foreign_folders(tmp_path, model, images):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(FileExistsError, match="not a patch-embedding store"):
        run(model, images, folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg"]


# ----------------------------------------------------------------------------- 13: one writer at a time


def test_a_second_extract_on_the_same_store_waits_and_computes_nothing(tmp_path, model, images, capfd):
    path = tmp_path / "s"
    entered, release = threading.Event(), threading.Event()

    def block_first_batch(module, inputs, output):
        if len(output) > 1 and not entered.is_set():
            entered.set()
            release.wait(30)

    handle = model.backbone.register_forward_hook(block_first_batch)
    counter = Counter(model)
    results = {}

    def extract_into(key):
        results[key] = extract_patch_embeddings(model, images, grid(16), batch_size=BATCH_SIZE, out=path,
                                                progress=False)

    first = threading.Thread(target=extract_into, args=("first",))
    second = threading.Thread(target=extract_into, args=("second",))
    try:
        first.start()
        assert entered.wait(30)
        second.start()
        deadline = time.monotonic() + 30
        while "waiting" not in capfd.readouterr().err and time.monotonic() < deadline:
            time.sleep(0.05)
        assert time.monotonic() < deadline, "the second run did not say it waits"
        assert second.is_alive()
        release.set()
        first.join(60)
        second.join(60)
    finally:
        release.set()
        handle.remove()
        counter.close()
    assert counter.images() == NUM_IMAGES  # every image embedded once, by the first run
    assert np.array_equal(results["first"].h, results["second"].h)


def test_the_lock_is_released_when_its_process_dies(tmp_path):
    path = tmp_path / "s"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ssl_patch_analysis.store import store_lock\n"
         "with store_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(store.StoreLockedError, match=rf"process {holder.pid} is writing the store at .*s\b"), \
                store.store_lock(path, wait=False):
            pass
    finally:
        holder.kill()
        holder.wait()
    with store.store_lock(path, wait=False):
        pass


@pytest.mark.slow  # several processes
def test_synchronised_starts_of_one_command_embed_each_image_once(tmp_path, model):
    folder = tmp_path / "pictures"
    (folder / "a").mkdir(parents=True)
    for i in range(8):
        _write_image(folder / "a" / f"{i}.png", 30 * i)
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(model, checkpoint)
    out = tmp_path / "store"
    command = [sys.executable, "-m", "ssl_patch_analysis.extract", "--model", str(checkpoint), "--data", str(folder),
               "--grid", "16", "--batch-size", "2", "--device", "cpu", "--store", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(3)]
    results = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, results, strict=True):
        assert run.returncode == 0, err
    assert sum("embedding" in err for _, err in results) == 1  # one run computed, the others waited and read it
    assert store.verify_store(out) == []
