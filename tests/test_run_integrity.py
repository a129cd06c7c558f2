"""Training run folders are the user's results (issue 14): every damage to checkpoint.pt, resume.pt,
resume.prev.pt or log.jsonl is detected and named, and --resume repairs it with nothing lost: the finished run
equals an uninterrupted one bit for bit."""
import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from ssl_patch_analysis import train as train_module
from ssl_patch_analysis.checkpoints import load_model
from ssl_patch_analysis.train import read_log, train
from test_train import TINY, _one_thread, tiny_args  # noqa: F401 - the fixture keeps tiny runs on one thread

# Interrupted after epoch 2 of 3, so that the folder holds resume.prev.pt (the state after epoch 1) too.
SCHEDULE = ("--schedule-epochs", "3")
TIMINGS = ("images_per_s", "epoch_time_s", "wall_time_s")


@pytest.fixture(scope="module")
def uninterrupted(cifar10_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_args(cifar10_npz.parent, out, "--epochs", "3", *SCHEDULE))
    return out


@pytest.fixture(scope="module")
def interrupted(cifar10_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("interrupted")
    train(tiny_args(cifar10_npz.parent, out, "--epochs", "2", *SCHEDULE))
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint.pt", "log.jsonl", "resume.prev.pt",
                                                     "resume.pt"]
    return out


def resume(cifar10_npz, out):
    return train(tiny_args(cifar10_npz.parent, out, "--epochs", "3", *SCHEDULE, "--resume"))


def state(path):
    return torch.load(path, weights_only=True)


def assert_same_run(out, reference, states=("resume.pt", "resume.prev.pt"), epochs=3):
    """Model, optimizer, RNG and step of the resume states, the checkpoint's weights and the log records (apart
    from timings) equal those of the uninterrupted run."""
    for name in states:
        got, want = state(out / name), state(reference / name)
        assert (got["epoch"], got["step"]) == (want["epoch"], want["step"]), name
        for key, tensor in want["model"].items():
            assert torch.equal(got["model"][key], tensor), f"{name} model {key}"
        assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"], name
        for index, moments in want["optimizer"]["state"].items():
            assert torch.equal(got["optimizer"]["state"][index]["mu"], moments["mu"]), f"{name} optimizer {index}"
        assert torch.equal(got["rng"]["torch"], want["rng"]["torch"]), name
    got, want = state(out / "checkpoint.pt"), state(reference / "checkpoint.pt")
    for part in ("backbone", "projector"):
        for key, tensor in want[part].items():
            assert torch.equal(got[part][key], tensor), f"checkpoint {part} {key}"
    assert got["train"]["epochs"] == epochs and got["train"]["knn_top1"] == want["train"]["knn_top1"]

    def epochs(folder):
        return [{k: v for k, v in record.items() if k not in TIMINGS} for record in read_log(folder / "log.jsonl")
                if "epoch" in record]
    assert epochs(out) == epochs(reference)
    load_model(out / "checkpoint.pt", verbose=False)


def test_a_clean_resume_equals_the_uninterrupted_run(cifar10_npz, tmp_path, interrupted, uninterrupted, capsys):
    out = shutil.copytree(interrupted, tmp_path / "run")
    log_before = (out / "log.jsonl").read_bytes()
    resume(cifar10_npz, out)
    assert "notice" not in capsys.readouterr().err
    assert (out / "log.jsonl").read_bytes().startswith(log_before)
    assert_same_run(out, uninterrupted)


# ----------------------------------------------------------------------------- each file on its own


def flip(path, offset, mask=0xFF):
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def entry_offset(path, entry_name: str, middle: bool = True) -> int:
    """Byte offset of the middle (or first byte) of one entry's data inside a torch zip file."""
    with zipfile.ZipFile(path) as archive:
        entries = archive.infolist()
    if entry_name == "largest tensor":
        entry = max((e for e in entries if "/data/" in e.filename), key=lambda e: e.file_size)
    elif entry_name == "smallest tensor":
        entry = min((e for e in entries if "/data/" in e.filename), key=lambda e: e.file_size)
    else:
        entry = next(e for e in entries if e.filename.endswith(entry_name))
    with open(path, "rb") as f:
        f.seek(entry.header_offset)
        header = f.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return entry.header_offset + 30 + name_length + extra_length + (entry.file_size // 2 if middle else 0)


def largest_tensor_offset(path) -> int:
    return entry_offset(path, "largest tensor")


def pickled_name_offset(path) -> int:
    """Byte offset of a letter of the first "train" (a key or a string value) in the pickled structure."""
    start = entry_offset(path, "data.pkl", middle=False)
    return path.read_bytes().index(b"train", start) + 2


def digit_offset(path, line: int) -> int:
    """Byte offset of a digit of the loss in a log line: changing it keeps the line valid JSON."""
    lines = path.read_bytes().splitlines(keepends=True)
    start = sum(len(text) for text in lines[:line])
    return start + lines[line].index(b'"loss": ') + len(b'"loss": ') + 3


def faults(folder):
    """(file, how, offset, mask) for every file of the run folder: bytes flipped in the zip structure, one bit of
    a pickled name and of the largest and smallest tensor's data (torch reads those files without error); a digit
    changed and bytes flipped in the log; each file truncated and deleted."""
    for name in ("checkpoint.pt", "resume.pt", "resume.prev.pt"):
        path = folder / name
        size = path.stat().st_size
        for offset, mask in ((0, 0xFF), (pickled_name_offset(path), 0x01), (largest_tensor_offset(path), 0x01),
                             (entry_offset(path, "smallest tensor", middle=False), 0x01), (size - 30, 0xFF)):
            yield name, "flip", offset, mask
        yield name, "truncate", None, None
        yield name, "delete", None, None
    log = folder / "log.jsonl"
    yield "log.jsonl", "flip", digit_offset(log, 1), 0x01  # '3' <-> '2' and the like: still JSON
    yield "log.jsonl", "flip", digit_offset(log, 2), 0x01
    for offset in (0, log.stat().st_size // 2, log.read_bytes().index(b"\n"), log.stat().st_size - 1):
        yield "log.jsonl", "flip", offset, 0xFF
    yield "log.jsonl", "truncate", None, None
    yield "log.jsonl", "delete", None, None


def damage(path, how, offset, mask):
    if how == "flip":
        flip(path, offset, mask)
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:path.stat().st_size * 2 // 3])
    else:
        path.unlink()


@pytest.mark.slow  # dozens of damaged copies, each resumed
def test_fault_injection_every_file_detected_named_and_repaired_with_nothing_lost(
        cifar10_npz, tmp_path, interrupted, uninterrupted, capsys):
    cases = list(faults(interrupted))
    assert {file for file, *_ in cases} == {p.name for p in interrupted.iterdir()} - {".lock"}
    log_before = (interrupted / "log.jsonl").read_bytes()
    for k, (file, how, offset, mask) in enumerate(cases):
        label = f"{file} {how} {offset}"
        out = shutil.copytree(interrupted, tmp_path / f"case{k}")
        damage(out / file, how, offset, mask)
        capsys.readouterr()
        resume(cifar10_npz, out)
        notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice: ")]
        assert len(notices) >= 1 and str(out / file) in notices[0], (label, notices)
        expected = {"checkpoint.pt": "rewritten from", "resume.pt": "continuing from",
                    "resume.prev.pt": "the next epoch writes it again", "log.jsonl": "from the copy in"}[file]
        assert expected in notices[0], (label, notices)
        assert_same_run(out, uninterrupted)
        # Every line written before is back, bit for bit (after resume.pt's damage, up to the epoch trained again).
        kept = log_before if file != "resume.pt" else b"".join(log_before.splitlines(keepends=True)[:2])
        assert (out / "log.jsonl").read_bytes().startswith(kept), label
        shutil.rmtree(out)


def test_the_lock_file_holds_only_a_pid_and_damage_to_it_is_harmless(cifar10_npz, tmp_path, interrupted,
                                                                      uninterrupted, capsys):
    for how in ("flip", "delete"):
        out = shutil.copytree(interrupted, tmp_path / how)
        damage(out / ".lock", how, 0, 0xFF)
        resume(cifar10_npz, out)
        assert "notice" not in capsys.readouterr().err
        assert_same_run(out, uninterrupted)


# ----------------------------------------------------------------------------- what the messages say


def test_load_model_names_a_damaged_run_checkpoint_and_says_resume_repairs_it(tmp_path, interrupted):
    out = shutil.copytree(interrupted, tmp_path / "run")
    flip(out / "checkpoint.pt", largest_tensor_offset(out / "checkpoint.pt"), 0x01)
    with pytest.raises(ValueError, match=rf"{out / 'checkpoint.pt'} is damaged: .*sha256.*again with --resume"):
        load_model(out / "checkpoint.pt", verbose=False)
    (out / "checkpoint.pt").write_bytes((interrupted / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"checkpoint\.pt is not a readable .*again with --resume: it rewrites"):
        load_model(out / "checkpoint.pt", verbose=False)


def test_both_resume_states_damaged_say_so_in_one_line(cifar10_npz, tmp_path, interrupted):
    out = shutil.copytree(interrupted, tmp_path / "run")
    flip(out / "resume.pt", largest_tensor_offset(out / "resume.pt"), 0x01)
    (out / "resume.prev.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot be continued") as error:
        resume(cifar10_npz, out)
    message = str(error.value)
    assert "\n" not in message
    assert f"{out / 'resume.pt'} is damaged (its contents no longer match their sha256), and " \
           f"{out / 'resume.prev.pt'} is damaged" in message
    assert f"cannot be continued: pass another --run-dir (with --init-from {out / 'checkpoint.pt'}" in message
    # the advice works: a new run starts from the intact checkpoint's weights
    train(tiny_args(cifar10_npz.parent, tmp_path / "new", "--epochs", "1", "--init-from", str(out / "checkpoint.pt")))
    assert read_log(tmp_path / "new" / "log.jsonl")[0]["init_from"]["path"] == str(out / "checkpoint.pt")


def test_read_log_checks_each_lines_crc(tmp_path, interrupted):
    records = read_log(interrupted / "log.jsonl")
    assert [r.get("epoch") for r in records] == [None, 1, 2] and all("crc32" not in r for r in records)
    log = shutil.copy(interrupted / "log.jsonl", tmp_path / "log.jsonl")
    flip(Path(log), digit_offset(Path(log), 2), 0x01)  # still valid JSON: only the crc32 sees it
    with pytest.raises(ValueError, match=r"log\.jsonl line 3 is damaged \(crc32 mismatch\).*--resume"):
        read_log(log)
    # Logs written before lines had a crc32 (the shipped ones) are read as they are.
    shipped = Path(__file__).resolve().parents[1] / "pretrained" / "bagssl-resnet18-cifar10.log.jsonl"
    assert [r["epoch"] for r in read_log(shipped)[1:]][:2] == [1, 2]


def test_a_log_begun_before_crc32_and_continued_after_it_reads(tmp_path, interrupted):
    """A run started by a trainer that wrote no crc32 and resumed by one that does (the shipped emp-ssl log): the
    older lines are read as they are; once a line carries a crc32, every later line must."""
    old = json.dumps({"command": "python -m ssl_patch_analysis.train", "args": {}}) + "\n" + \
        json.dumps({"epoch": 1, "loss": -1.0}) + "\n"
    log = tmp_path / "log.jsonl"
    log.write_bytes(old.encode() + (interrupted / "log.jsonl").read_bytes())
    records = read_log(log)
    assert [r.get("epoch") for r in records] == [None, 1, None, 1, 2] and all("crc32" not in r for r in records)
    log.write_bytes((interrupted / "log.jsonl").read_bytes() + old.encode())
    with pytest.raises(ValueError, match=r"log\.jsonl line 4 is damaged \(no crc32\)"):
        read_log(log)
    shipped = Path(__file__).resolve().parents[1] / "pretrained" / "emp-ssl-resnet18-cifar10.log.jsonl"
    assert [r["epoch"] for r in read_log(shipped) if "epoch" in r][:2] == [1, 2]


def test_records_of_epochs_after_the_fallback_state_are_trained_again_not_repeated(cifar10_npz, tmp_path,
                                                                                     interrupted, uninterrupted,
                                                                                     capsys):
    out = shutil.copytree(interrupted, tmp_path / "run")
    flip(out / "resume.pt", largest_tensor_offset(out / "resume.pt"), 0x01)
    resume(cifar10_npz, out)
    err = capsys.readouterr().err
    assert "continuing from" in err and "dropped 1 line(s)" in err and "epoch 2 (trained again)" in err
    assert [r.get("epoch") for r in read_log(out / "log.jsonl")] == [None, 1, None, 2, 3]
    assert_same_run(out, uninterrupted)


def test_a_header_that_lost_its_crc32_key_is_damage_not_an_older_log(tmp_path, interrupted):
    """The header of a run whose later lines carry a crc32 was written by a trainer that writes them: a damaged key
    name (a flipped byte) must not make it read as a line from before crc32."""
    lines = (interrupted / "log.jsonl").read_bytes().splitlines(keepends=True)
    assert b'"command": ' in lines[0] and b'"crc32": ' in lines[0]
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(lines))
    flip(log, lines[0].index(b'"crc32": ') + 4, 0x01)  # "crc32" -> "crc22": still valid JSON
    with pytest.raises(ValueError, match=r"log\.jsonl line 1 is damaged \(no crc32\)"):
        read_log(log)
    # The same header after the lines of a run from before crc32 (a resumed older run) is found too.
    old = json.dumps({"command": "python -m ssl_patch_analysis.train", "args": {}}) + "\n" + \
        json.dumps({"epoch": 1, "loss": -1.0}) + "\n"
    log.write_bytes(old.encode() + log.read_bytes())
    with pytest.raises(ValueError, match=r"log\.jsonl line 3 is damaged \(no crc32\)"):
        read_log(log)


def test_resume_states_hold_the_checkpoint_record_and_the_log(interrupted):
    resume_state = state(interrupted / "resume.pt")
    assert resume_state["checkpoint_train"] == state(interrupted / "checkpoint.pt")["train"]
    assert "".join(resume_state["log"]).encode() == (interrupted / "log.jsonl").read_bytes()
    assert train_module.PREVIOUS_RESUME == "resume.prev.pt" and state(interrupted / "resume.prev.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- within an epoch
# A run of one long epoch (EMP-SSL's recipe on a CPU) must not lose the epoch when it is killed or stopped in it:
# --save-every writes resume states between steps. 3 steps per epoch (48 images, batch 16), 2 epochs.
WITHIN = ("--train-size", "48", "--epochs", "2")


class Killed(BaseException):
    """What a SIGKILL or a VM shut down does to a run: it ends between two steps, with no cleanup of its own."""


@pytest.fixture(scope="module")
def uninterrupted_within(cifar10_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted-within")
    train(tiny_args(cifar10_npz.parent, out, *WITHIN))
    return out


@pytest.fixture(scope="module")
def killed_within(cifar10_npz, tmp_path_factory):
    """A run writing a resume state after every step, killed just before global step 5 (the third of epoch 2)."""
    out = tmp_path_factory.mktemp("killed-within")
    real = train_module.training_step

    def step_or_die(run, *args):
        if run.step == 5:
            raise Killed
        return real(run, *args)

    train_module.training_step = step_or_die
    try:
        with pytest.raises(Killed):
            train(tiny_args(cifar10_npz.parent, out, *WITHIN, "--save-every", "1e-9"))
    finally:
        train_module.training_step = real
    return out


def test_a_run_killed_within_an_epoch_keeps_the_steps_before_its_last_state(killed_within):
    now, before = state(killed_within / "resume.pt"), state(killed_within / "resume.prev.pt")
    assert (now["epoch"], now["step"], now["in_epoch"]["steps_done"]) == (1, 5, 2)
    assert (before["epoch"], before["step"], before["in_epoch"]["steps_done"]) == (1, 4, 1)
    assert now["in_epoch"]["loss_rows"].shape[:2] == (1, 2) and now["in_epoch"]["train_time_s"] > 0
    assert torch.isfinite(now["in_epoch"]["loss_rows"]).all()
    # checkpoint.pt is still the model of the last finished epoch, and the log holds that epoch's record
    assert state(killed_within / "checkpoint.pt")["train"]["epochs"] == 1
    assert [r.get("epoch") for r in read_log(killed_within / "log.jsonl")] == [None, 1]


def test_a_run_killed_within_an_epoch_resumes_to_the_uninterrupted_run(cifar10_npz, tmp_path, killed_within,
                                                                      uninterrupted_within, capsys):
    out = shutil.copytree(killed_within, tmp_path / "run")
    train(tiny_args(cifar10_npz.parent, out, *WITHIN, "--save-every", "1e-9", "--resume"))
    assert "notice" not in capsys.readouterr().err
    assert_same_run(out, uninterrupted_within, states=("resume.pt",), epochs=2)
    headers = [r for r in read_log(out / "log.jsonl") if "command" in r]
    assert [h["resumed_from_step"] for h in headers] == [None, 5]


def test_damaged_state_and_checkpoint_within_an_epoch_fall_back_and_lose_nothing(cifar10_npz, tmp_path,
                                                                               killed_within, uninterrupted_within,
                                                                               capsys):
    out = shutil.copytree(killed_within, tmp_path / "run")
    flip(out / "resume.pt", largest_tensor_offset(out / "resume.pt"), 0x01)
    flip(out / "checkpoint.pt", largest_tensor_offset(out / "checkpoint.pt"), 0x01)
    # the other processes of a torchrun read the same state and fall back too, without saying so again (each said
    # it: the notice came once per process)
    _, source = train_module._read_resume_state(out / "resume.pt", torch.device("cpu"), say=False)
    assert source == out / "resume.prev.pt" and capsys.readouterr().err == ""
    train(tiny_args(cifar10_npz.parent, out, *WITHIN, "--resume"))
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice: ")]
    assert len(notices) == 2, notices
    assert f"continuing from {out / 'resume.prev.pt'} (after step 1 in epoch 2)" in notices[0]
    # the fallback state holds the weights of a step within epoch 2, not epoch 1's: checkpoint.pt waits for epoch 2
    assert str(out / "checkpoint.pt") in notices[1] and "written again at the end of epoch 2" in notices[1]
    assert_same_run(out, uninterrupted_within, states=("resume.pt",), epochs=2)


def test_save_every_zero_writes_resume_states_only_at_epoch_ends(cifar10_npz, tmp_path, monkeypatch):
    written = []
    real = train_module.atomic_torch_save
    monkeypatch.setattr(train_module, "atomic_torch_save",
                        lambda obj, path, **kw: (written.append((obj["epoch"], obj["step"])), real(obj, path, **kw)))
    train(tiny_args(cifar10_npz.parent, tmp_path, *WITHIN, "--save-every", "0"))
    assert written == [(1, 3), (2, 6)]


def test_a_state_written_within_an_epoch_by_two_processes_resumes_on_one(cifar10_npz, tmp_path, killed_within,
                                                                       uninterrupted_within):
    """One process continuing two processes' epoch takes the mean of their loss rows for the steps done: here the
    rows of a second rank made 1.0 higher, so epoch 2's mean loss is 0.5 x 2/3 above the uninterrupted run's."""
    out = shutil.copytree(killed_within, tmp_path / "run")
    two = state(out / "resume.pt")
    rows = two["in_epoch"]["loss_rows"]
    two["in_epoch"]["loss_rows"] = torch.cat([rows, rows + 1.0])
    two.pop(train_module.CHECKSUM_KEY)
    torch.save(train_module.with_checksum(two), out / "resume.pt")
    train(tiny_args(cifar10_npz.parent, out, *WITHIN, "--resume"))
    got, want = read_log(out / "log.jsonl")[-1], read_log(uninterrupted_within / "log.jsonl")[-1]
    assert got["epoch"] == want["epoch"] == 2
    assert got["loss"] == pytest.approx(want["loss"] + 0.5 * 2 / 3, rel=1e-6)


def _full_disk_for_writes(monkeypatch, module, modes="w"):
    """Every file ``module`` opens for writing (a mode with one of ``modes``) is /dev/full: its writes fail as on a
    full disk (ENOSPC)."""
    import builtins

    if not Path("/dev/full").exists():
        pytest.skip("/dev/full is not available on this system (needed to simulate a full disk)")
    real_open = builtins.open

    def full(path, mode="r", *args, **kwargs):
        full = any(m in mode for m in modes)
        return real_open("/dev/full", mode, *args, **kwargs) if full else real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(module, "open", full, raising=False)


def test_a_full_disk_while_saving_stops_in_one_line_and_the_run_resumes(cifar10_npz, tmp_path, interrupted,
                                                                       uninterrupted, monkeypatch, capsys):
    """torch.save's own writer turned a full disk into a RuntimeError: "internal error ... unexpected pos ...,
    please report it" (exit 1). Now one line names the folder, the file not written and --resume (exit 2); the
    files before are kept as they were, and the run resumes to the uninterrupted run's result."""
    from ssl_patch_analysis import checkpoints

    out = shutil.copytree(interrupted, tmp_path / "run")
    before = {name: (out / name).read_bytes() for name in ("resume.pt", "resume.prev.pt", "checkpoint.pt")}
    with monkeypatch.context() as patch:
        _full_disk_for_writes(patch, checkpoints)
        with pytest.raises(SystemExit) as stopped:
            train_module.main(["--data-root", str(cifar10_npz.parent), "--run-dir", str(out), *TINY, "--epochs", "3",
                               *SCHEDULE, "--resume"])
    assert stopped.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert f"the disk holding {out} is full" in line and "was not written" in line and "--resume" in line, line
    assert "Errno" not in line and "internal error" not in line
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    resume(cifar10_npz, out)
    assert_same_run(out, uninterrupted)


def test_a_full_disk_while_appending_the_log_says_resume_and_the_log_comes_back(cifar10_npz, tmp_path, interrupted,
                                                                               uninterrupted, monkeypatch, capsys):
    """The log line is written after the resume state (which holds a copy of the log): a full disk there was the
    generic "run the same command again", which would start over; --resume restores the line."""
    out = shutil.copytree(interrupted, tmp_path / "run")
    with monkeypatch.context() as patch:
        _full_disk_for_writes(patch, train_module, modes="a")  # the log's appends (checkpoints write the states)
        with pytest.raises(SystemExit) as stopped:
            train_module.main(["--data-root", str(cifar10_npz.parent), "--run-dir", str(out), *TINY, "--epochs", "3",
                               *SCHEDULE, "--resume"])
    assert stopped.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert f"the disk holding {out} is full: log.jsonl" in line and "--resume" in line, line
    resume(cifar10_npz, out)
    assert_same_run(out, uninterrupted)

