"""Saved patch indexes are verified, named when damaged, rebuilt as advised, and written by one process at a time.

Every test here reproduces a defect of issue 14 (items 5, 10, 12 and 13, the index's part): a damaged
index that loaded and searched silently, raw numpy/json/KeyError tracebacks for damaged metadata, store
errors in ``retrieval`` that named flags it does not have, and concurrent writers and readers that
saw half-written indexes.
"""
import inspect
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss  # isort: skip

import numpy as np
import pytest

from helpers import tiny_model
from ssl_patch_analysis import retrieval
from ssl_patch_analysis.checkpoints import save_checkpoint
from ssl_patch_analysis.retrieval import PatchIndex

INDEX_FILES = ("index.faiss", "metadata.npz", "info.json")
TESTS = Path(__file__).resolve().parent


def synthetic_index_data(seed=0, num_images=30, patches=5, dim=16):
    """Random vectors and their metadata; the same seed gives the same data in any process."""
    rng = np.random.default_rng(seed)
    count = num_images * patches
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    meta = dict(image_ids=np.repeat(np.arange(num_images) * 7 + seed, patches),
                patch_index=np.tile(np.arange(patches), num_images),
                boxes=rng.integers(0, 30, (count, 4)).astype(np.float32),
                labels=np.repeat(rng.integers(0, 3, num_images), patches))
    return vectors, meta


def same_index(a, b, k=6):
    """Whether two indexes hold the same vectors and metadata: same neighbours of every stored vector."""
    if len(a) != len(b) or a.dim != b.dim:
        return False
    if not all(np.array_equal(getattr(a, name), getattr(b, name))
               for name in ("image_ids", "patch_index", "boxes", "labels")):
        return False
    queries = a.cpu_index.reconstruct_n(0, len(a))
    if not np.array_equal(queries, b.cpu_index.reconstruct_n(0, len(b))):
        return False
    return all(np.array_equal(x, y) for x, y in zip(a.search(queries, k), b.search(queries, k), strict=True))


def one_line(text):
    return bool(text.strip()) and "\n" not in text.strip()


def flip_bytes(path, offsets):
    data = bytearray(path.read_bytes())
    for offset in offsets:
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_offsets(size):
    """First, last and middle byte, and a few in between."""
    return sorted({0, 1, size // 7, size // 3, size // 2, (2 * size) // 3, size - 2, size - 1})


# ----------------------------------------------------------------------------- item 5: a damaged index loads
def test_index_with_rows_turned_to_nan_is_refused_on_load(tmp_path):
    # The case: some stored vectors become NaN; they used to drop out of the neighbour lists.
    vectors, meta = synthetic_index_data(num_images=30, patches=5)
    PatchIndex.from_vectors(vectors, **meta).save(tmp_path / "index")
    file = tmp_path / "index" / "index.faiss"
    data = bytearray(file.read_bytes())
    row_bytes = vectors.shape[1] * 4  # IndexFlatIP ends with its float32 vectors, row after row
    nan_rows = np.full(5 * vectors.shape[1], np.nan, np.float32).tobytes()
    data[len(data) - 5 * row_bytes:] = nan_rows
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"index\.faiss.*does not match its checksum.*rebuild") as error:
        PatchIndex.load(tmp_path / "index")
    assert one_line(str(error.value)) and str(tmp_path / "index") in str(error.value)
    assert isinstance(error.value, retrieval.DamagedIndexError) and error.value.file == "index.faiss"
    # Unchecked, it loads; its NaN rows then stop a search instead of shortening the neighbour lists.
    unchecked = PatchIndex.load(tmp_path / "index", verify=False)
    with pytest.raises(retrieval.FewerNeighboursError, match=r"only 145 of the k=148 neighbours.*damaged"):
        unchecked.query(int(meta["image_ids"][0]), 0, k=148, include_query=True)


def nan_row_index(num_nan=5):
    """A flat index of unit vectors in which ``num_nan`` rows are NaN (what a damaged file gave)."""
    vectors, meta = synthetic_index_data()
    unit = retrieval.normalised_float32(vectors)
    unit[-num_nan:] = np.nan
    cpu_index = faiss.IndexFlatIP(unit.shape[1])
    cpu_index.add(unit)
    return PatchIndex(cpu_index, info={"index": "flat"}, **meta), vectors


def test_a_search_that_finds_fewer_than_k_neighbours_raises():
    index, vectors = nan_row_index(num_nan=5)
    k = len(index) - 2  # more than the 145 comparable vectors
    with pytest.raises(ValueError, match=rf"only 145 of the k={k} neighbours.*damaged.*rebuild") as error:
        index.search(vectors[:3], k)
    assert one_line(str(error.value))
    with pytest.raises(ValueError, match=rf"only 144 of the k={k} neighbours"):  # the query itself left out
        index.query(int(index.image_ids[0]), 0, k=k)
    with pytest.raises(ValueError, match=rf"only 14\d of the k={k} neighbours"):
        retrieval.neighbour_statistics(index, k=k, num_queries=5)
    # Asked for explicitly, the short lists come back padded with row -1 and similarity NaN.
    similarities, rows = index.search(vectors[:3], k, allow_fewer=True)
    assert ((rows >= 0).sum(axis=1) == 145).all() and np.isnan(similarities[rows < 0]).all()
    # k within the comparable vectors: nothing is missing, nothing is raised.
    assert (index.search(vectors[:3], 140)[1] >= 0).all()


def test_an_ivf_index_probing_too_few_lists_says_to_probe_more():
    vectors, meta = synthetic_index_data(num_images=100, patches=4)
    index = PatchIndex.from_vectors(vectors, **meta, kind="ivf", nlist=16, nprobe=1)
    with pytest.raises(ValueError, match=r"found only \d+ of the k=200 neighbours.*1 of its 16 lists.*--nprobe"):
        index.search(vectors[:4], 200)
    assert (PatchIndex.from_vectors(vectors, **meta, kind="ivf", nlist=16, nprobe=16).search(vectors[:4], 200)[1]
            >= 0).all()


# ----------------------------------------------------------------------------- fault injection, Python API
def test_every_byte_flip_in_every_file_is_detected_named_and_repaired_by_saving_again(tmp_path):
    vectors, meta = synthetic_index_data()
    original = PatchIndex.from_vectors(vectors, **meta, kind="ivf", nlist=4, nprobe=4)
    folder = original.save(tmp_path / "index")
    pristine = tmp_path / "pristine"
    shutil.copytree(folder, pristine)
    for name in INDEX_FILES:
        size = (folder / name).stat().st_size
        for offset in damage_offsets(size):
            flip_bytes(folder / name, [offset])
            with pytest.raises(retrieval.DamagedIndexError) as error:
                PatchIndex.load(folder)
            message = str(error.value)
            assert error.value.file == name and f"({name}: " in message, (name, offset, message)
            assert one_line(message) and "PatchIndex.save(dir, overwrite=True)" in message
            shutil.copyfile(pristine / name, folder / name)
        # The advice: build it again and save it over the damaged one.
        flip_bytes(folder / name, [size // 2])
        PatchIndex.from_vectors(vectors, **meta, kind="ivf", nlist=4, nprobe=4).save(folder, overwrite=True)
        assert same_index(PatchIndex.load(folder), original)
    # The lock file holds only a process id: damage to it costs nothing.
    (folder / ".lock").write_bytes(b"\xff\xfe garbage")
    assert same_index(PatchIndex.load(folder), original)


@pytest.mark.parametrize("name", INDEX_FILES)
def test_a_missing_or_truncated_file_is_named(tmp_path, name):
    vectors, meta = synthetic_index_data()
    folder = PatchIndex.from_vectors(vectors, **meta).save(tmp_path / "index")
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    for options in ({}, {"verify": False}):
        with pytest.raises(ValueError, match=rf"\({re.escape(name)}: .*rebuild") as error:
            PatchIndex.load(folder, **options)
        assert one_line(str(error.value))
    (folder / name).unlink()
    with pytest.raises(retrieval.DamagedIndexError, match=rf"\({re.escape(name)}: missing\).*rebuild"):
        PatchIndex.load(folder)


def test_an_index_saved_without_checksums_is_refused_unless_verify_is_off(tmp_path):
    vectors, meta = synthetic_index_data()
    original = PatchIndex.from_vectors(vectors, **meta)
    folder = tmp_path / "old"
    folder.mkdir()
    faiss.write_index(original.cpu_index, str(folder / "index.faiss"))  # what save() wrote before checksums
    np.savez(folder / "metadata.npz", image_ids=original.image_ids, patch_index=original.patch_index,
             boxes=original.boxes, labels=original.labels)
    (folder / "info.json").write_text(json.dumps({"index": "flat"}))
    with pytest.raises(ValueError, match=r"info\.json.*no checksums.*rebuild.*verify=False"):
        PatchIndex.load(folder)
    assert same_index(PatchIndex.load(folder, verify=False), original)


# ----------------------------------------------------------------------------- item 10: one clear line
def rewrite_info(folder, change):
    info = json.loads((folder / "info.json").read_text())
    change(info)
    (folder / "info.json").write_text(json.dumps(info))


@pytest.mark.parametrize("damage, file, problem", [
    (lambda f: (f / "metadata.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 64), "metadata.npz", r"not a readable"),
    (lambda f: (f / "metadata.npz").write_bytes((f / "metadata.npz").read_bytes()[:300]), "metadata.npz",
     r"not a readable"),
    (lambda f: np.savez(f / "metadata.npz", image_ids=np.zeros(150, np.int64)), "metadata.npz",
     r"lacks the arrays? .*labels"),
    (lambda f: np.savez(f / "metadata.npz", image_ids=np.zeros(3), patch_index=np.zeros(3), boxes=np.zeros((3, 4)),
                        labels=np.zeros(3)), "metadata.npz", r"3 rows.*150 vectors"),
    (lambda f: (f / "info.json").write_text('{"index": "ivf", "npro'), "info.json", r"not readable JSON"),
    (lambda f: (f / "info.json").write_bytes(b"\xff\xfe\x00{}"), "info.json", r"not readable JSON"),
    (lambda f: (f / "info.json").write_text("[1, 2]"), "info.json", r"not a JSON object"),
    (lambda f: rewrite_info(f, lambda i: i.pop("nprobe")), "info.json", r"lacks 'nprobe'"),
    (lambda f: rewrite_info(f, lambda i: i.pop("index")), "info.json", r"lacks 'index'"),
    (lambda f: rewrite_info(f, lambda i: i.update(index="flat")), "info.json", r"says a flat index.*IVF"),
    (lambda f: rewrite_info(f, lambda i: i.update(num_vectors=7)), "info.json", r"7 vectors.*index\.faiss holds 150"),
])
def test_damaged_metadata_or_info_gives_one_line_naming_the_file(tmp_path, damage, file, problem):
    vectors, meta = synthetic_index_data()
    folder = PatchIndex.from_vectors(vectors, **meta, kind="ivf", nlist=4, nprobe=2).save(tmp_path / "index")
    damage(folder)
    for options in ({}, {"verify": False}):  # without checksums too: never a raw numpy / json / KeyError traceback
        with pytest.raises(ValueError) as error:  # noqa: PT011 - the message is checked below, per damage
            PatchIndex.load(folder, **options)
        message = str(error.value)
        assert one_line(message) and str(folder) in message and "rebuild it" in message, message
        assert isinstance(error.value, retrieval.DamagedIndexError) and error.value.file == file, message
        if options:
            assert re.search(problem, message), message


# ----------------------------------------------------------------------------- item 13: one writer at a time
WRITER = """
import sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, {tests!r})
from ssl_patch_analysis.retrieval import PatchIndex
from test_retrieval_integrity import synthetic_index_data

folder, seed, signals = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
vectors, meta = synthetic_index_data(seed)
index = PatchIndex.from_vectors(vectors, **meta)
savez = np.savez

def paused_savez(*args, **kwargs):  # stops the writer half-way: the FAISS index written, not the metadata
    (signals / "paused").touch()
    while not (signals / "go").exists():
        time.sleep(0.02)
    return savez(*args, **kwargs)

np.savez = paused_savez
options = {{"overwrite": True}} if "overwrite" in __import__("inspect").signature(PatchIndex.save).parameters else {{}}
index.save(folder, **options)
"""


def start_paused_writer(tmp_path, folder, seed):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(TESTS)))
    signals = tmp_path / f"signals{seed}"
    signals.mkdir()
    process = subprocess.Popen([sys.executable, str(script), str(folder), str(seed), str(signals)])
    deadline = time.monotonic() + 120
    while not (signals / "paused").exists():
        assert process.poll() is None, "the writer died before pausing"
        assert time.monotonic() < deadline, "the writer never paused"
        time.sleep(0.05)
    return process, signals


def save_options(**options):
    """Options of PatchIndex.save that exist (the tests must run, and fail, on the code before the fix)."""
    parameters = inspect.signature(PatchIndex.save).parameters
    return {key: value for key, value in options.items() if key in parameters}


def synthetic_index(seed):
    vectors, meta = synthetic_index_data(seed)
    return PatchIndex.from_vectors(vectors, **meta)


def test_a_reader_never_sees_half_a_saved_index(tmp_path):
    folder = tmp_path / "index"
    old, new = synthetic_index(0), synthetic_index(1)
    old.save(folder)
    writer, signals = start_paused_writer(tmp_path, folder, seed=1)
    seen = {}
    try:
        reader = threading.Thread(target=lambda: seen.update(index=PatchIndex.load(folder)))
        reader.start()
        time.sleep(0.5)
        (signals / "go").touch()
        assert writer.wait(timeout=120) == 0
        reader.join(timeout=120)
    finally:
        (signals / "go").touch()
        writer.wait(timeout=120)
    # The old index or the new one, never the FAISS file of one with the metadata of the other.
    assert same_index(seen["index"], old) or same_index(seen["index"], new)
    assert same_index(PatchIndex.load(folder), new)


def test_a_second_writer_waits_or_refuses_with_one_line(tmp_path, capsys):
    folder = tmp_path / "index"
    synthetic_index(0).save(folder)
    last = synthetic_index(2)
    writer, signals = start_paused_writer(tmp_path, folder, seed=1)
    try:
        busy = rf"process {writer.pid} is saving the index at {re.escape(str(folder))}: wait for it"
        with pytest.raises(BlockingIOError, match=busy) as error:
            last.save(folder, **save_options(overwrite=True, wait=False))
        assert one_line(str(error.value))
        waiting_writer = threading.Thread(target=lambda: last.save(folder, **save_options(overwrite=True)))
        waiting_writer.start()
        time.sleep(0.5)
        assert waiting_writer.is_alive()  # it waits for the first writer
        (signals / "go").touch()
        assert writer.wait(timeout=120) == 0
        waiting_writer.join(timeout=120)
    finally:
        (signals / "go").touch()
        writer.wait(timeout=120)
    assert same_index(PatchIndex.load(folder), last)  # the waiting writer went after the first
    assert f"waiting for process {writer.pid}, which is saving the index at {folder}" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == [".lock", *sorted(INDEX_FILES)]


def test_a_writer_killed_half_way_leaves_the_old_index_and_releases_the_lock(tmp_path):
    folder = tmp_path / "index"
    old = synthetic_index(0)
    old.save(folder)
    (folder / "notes.txt").write_text("my notes")
    writer, _ = start_paused_writer(tmp_path, folder, seed=1)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    assert same_index(PatchIndex.load(folder), old)
    new = synthetic_index(2)
    new.save(folder, **save_options(overwrite=True, wait=False))  # the dead writer's lock is gone with it
    assert same_index(PatchIndex.load(folder), new)
    # The dead writer's unfinished files are cleared; what the index did not write stays.
    assert sorted(p.name for p in folder.iterdir()) == [".lock", *sorted(INDEX_FILES), "notes.txt"]
    assert (folder / "notes.txt").read_text() == "my notes"


def test_saving_over_an_index_needs_overwrite_and_keeps_other_files(tmp_path):
    vectors, meta = synthetic_index_data()
    folder = PatchIndex.from_vectors(vectors, **meta).save(tmp_path / "index")
    (folder / "notes.txt").write_text("my notes")
    other = synthetic_index(1)
    with pytest.raises(FileExistsError, match=r"already holds a saved patch index.*overwrite=True"):
        other.save(folder)
    other.save(folder, overwrite=True)
    assert same_index(PatchIndex.load(folder), other) and (folder / "notes.txt").read_text() == "my notes"


# ----------------------------------------------------------------------------- the command line
def flags_of(module_name):
    module = __import__(f"ssl_patch_analysis.{module_name}", fromlist=["build_parser"])
    return {option for action in module.build_parser()._actions for option in action.option_strings}


def assert_names_only_existing_flags(message):
    """Every --flag of ``message`` exists: in a quoted `python -m ssl_patch_analysis.X ...` command, in X; else in
    retrieval."""
    for command in re.findall(r"`python -m ssl_patch_analysis\.(\w+)([^`]*)`", message):
        module_name, rest = command
        unknown = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest)) - flags_of(module_name)
        assert not unknown, f"{module_name} has no {unknown}: {message}"
    outside = re.sub(r"`python -m ssl_patch_analysis\.[^`]*`", "", message)
    unknown = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", outside)) - flags_of("retrieval")
    assert not unknown, f"retrieval has no {unknown}: {message}"


@pytest.fixture
def command(cifar10_npz, data_root, tmp_path):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model(), checkpoint)
    return ["--model", str(checkpoint), "--data", "cifar10", "--data-root", str(data_root), "--device", "cpu",
            "--num-images", "6", "--num-queries", "10", "--neighbours", "4", "--out", str(tmp_path / "figures")]


def user_error(capsys, argv):
    """Run retrieval, expecting a user error: the one line it printed."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        retrieval.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert_names_only_existing_flags(lines[0])
    return lines[0]


def test_store_errors_in_retrieval_name_only_flags_retrieval_has(command, tmp_path, capsys):
    store = tmp_path / "store"
    retrieval.main([*command, "--store", str(store)])
    (store / "notes.txt").write_text("my notes")
    # Other settings: the advice is --overwrite (retrieval has it) or another --store (not extract's --out).
    message = user_error(capsys, [*command, "--store", str(store), "--patch-size", "8"])
    assert "other settings" in message and "--store" in message and "--overwrite" in message
    retrieval.main([*command, "--store", str(store), "--patch-size", "8", "--overwrite"])
    # A folder that holds no store.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("...")
    message = user_error(capsys, [*command, "--store", str(tmp_path / "mine")])
    assert "choose another --store" in message
    # A damaged meta.json: the advice is --overwrite, and following it works and keeps the user's file.
    (store / "meta.json").write_text("{garbled")
    message = user_error(capsys, [*command, "--store", str(store), "--patch-size", "8"])
    assert "meta.json" in message and "--overwrite" in message
    retrieval.main([*command, "--store", str(store), "--patch-size", "8", "--overwrite"])
    assert (store / "notes.txt").read_text() == "my notes"


def test_save_index_refuses_a_folder_that_holds_other_things_even_with_overwrite(command, tmp_path, capsys):
    # was: --save-index into any existing folder (a folder of images, of notes) wrote z/ and h/ into it
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8 a photo")
    for extra in ([], ["--overwrite"]):
        message = user_error(capsys, [*command, "--save-index", str(photos), *extra])
        assert f"--save-index {photos} holds files that are not saved indexes ({photos / 'cat.jpg'})" in message
    assert sorted(p.name for p in photos.iterdir()) == ["cat.jpg"]  # nothing written, nothing computed
    assert not (tmp_path / "figures").exists()
    # A z/ that is someone's folder is not taken for an index's either.
    mine = tmp_path / "mine"
    (mine / "z").mkdir(parents=True)
    (mine / "z" / "notes.txt").write_text("my notes")
    message = user_error(capsys, [*command, "--save-index", str(mine), "--overwrite"])
    assert str(mine / "z" / "notes.txt") in message
    # An empty folder, and one holding saved indexes (with --overwrite), are written into.
    (tmp_path / "empty").mkdir()
    retrieval.main([*command, "--save-index", str(tmp_path / "empty")])
    retrieval.main([*command, "--save-index", str(tmp_path / "empty"), "--overwrite"])
    assert {p.name for p in (tmp_path / "empty").iterdir()} == {"z", "h"}


def test_damage_to_every_file_of_a_saved_index_is_named_and_the_advised_command_rebuilds_it(command, tmp_path,
                                                                                                capsys):
    saved = tmp_path / "indexes"
    argv = [*command, "--store", str(tmp_path / "store"), "--save-index", str(saved)]
    retrieval.main(argv)
    originals = {layer: PatchIndex.load(saved / layer) for layer in ("z", "h")}
    folder = saved / "z"
    # Saving again into a folder that holds an index needs --overwrite (said before anything is computed).
    message = user_error(capsys, argv)
    assert f"--save-index {saved}" in message and "--overwrite" in message
    pristine = tmp_path / "pristine"
    for name in INDEX_FILES:
        shutil.rmtree(pristine, ignore_errors=True)
        shutil.copytree(folder, pristine)  # a rebuild records its command, with --overwrite: info.json changes
        for offset in damage_offsets((folder / name).stat().st_size):
            flip_bytes(folder / name, [offset])
            with pytest.raises(retrieval.DamagedIndexError) as error:
                PatchIndex.load(folder)
            assert error.value.file == name and one_line(str(error.value))
            shutil.copyfile(pristine / name, folder / name)
        flip_bytes(folder / name, [(folder / name).stat().st_size // 2])
        with pytest.raises(retrieval.DamagedIndexError) as error:
            PatchIndex.load(folder)
        message = str(error.value)
        assert_names_only_existing_flags(message)
        # Follow the advice: the command quoted in it (info.json's own damage gives the general form).
        quoted = re.findall(r"`(python -m ssl_patch_analysis\.retrieval [^`]*)`", message)
        assert len(quoted) == 1 and "--overwrite" in quoted[0], message
        advised = shlex.split(quoted[0])[3:]
        if "..." in advised:
            assert name == "info.json" and advised == ["...", "--save-index", "DIR", "--overwrite"]
            advised = [*argv, "--overwrite"]
        retrieval.main(advised)
        for layer, original in originals.items():
            assert same_index(PatchIndex.load(saved / layer), original), (name, layer)
