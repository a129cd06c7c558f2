"""pretrained/model_card.py reports what ``evaluate`` computes, for the model and its random-init control."""
import functools
import json
import shutil
import subprocess
from pathlib import Path

import pytest

import helpers
from helpers import load_script
from ssl_patch_analysis import models, store
from ssl_patch_analysis.checkpoints import load_model, save_checkpoint
from ssl_patch_analysis.data import load_dataset
from ssl_patch_analysis.evaluate import ProbeSchedule, evaluate_protocols, subset_ids


def _card_module():
    return load_script("pretrained/model_card.py")


def _two_models_of_one_architecture(tmp_path, tiny_model):
    """Two multi-scale checkpoints (other weights, the same architecture: the same random-init control) and their
    train record (multi-scale: its patch scale is a pair)."""
    train = {"method": "vicreg", "min_scale": 0.2, "max_scale": 1.0}
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_checkpoint(tiny_model, a, train=train)
    save_checkpoint(helpers.tiny_model(seed=1), b, train=train)
    return a, b, train


def test_model_card_numbers_are_evaluates_for_model_and_control(tmp_path, cifar10_npz, tiny_model):
    model = tiny_model
    model.info.method = "bagssl"
    checkpoint = tmp_path / "tiny-bagssl.pt"
    save_checkpoint(model, checkpoint, train={"method": "bagssl", "patch_size": 16})
    before = checkpoint.read_bytes()
    argv = [str(checkpoint), "--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "60",
            "--num-patches", "2", "--probe-epochs", "3", "--json", str(tmp_path / "card.json")]
    rows = _card_module().main(argv)
    (row,) = json.loads((tmp_path / "card.json").read_text())
    assert row == json.loads(json.dumps(rows[0]))
    assert row["command"] == "python pretrained/model_card.py " + " ".join(argv)  # as every JSON output records it
    assert set(row["trained"]) == set(row["random_init"]) == {"central", "2 patches"}
    assert row["train_images"] == row["test_images"] == 60
    # the pixels measured (the official CIFAR-10 files and the JPEG copy share test ids) and the k used
    assert row["data"] == "CIFAR-10 (JPEG copy) test" and row["knn"] == "weighted, cosine, k=20, T=0.07"

    # The same numbers from evaluate's own entry point, computed here independently of the card.
    loaded = load_model(checkpoint, verbose=False)
    train, test = (load_dataset("cifar10", split, root=cifar10_npz.parent) for split in ("train", "test"))
    results = evaluate_protocols(loaded, train, test, ["central", "2"], train_ids=subset_ids(train.labels.numpy(), 60),
                                 test_ids=subset_ids(test.labels.numpy(), 60), ks=(20,),
                                 schedule=ProbeSchedule(epochs=3), device="cpu", progress=False)
    for protocol in results["protocols"]:
        assert row["trained"][protocol["title"]]["knn"] == pytest.approx(protocol["knn"][20])
        assert row["trained"][protocol["title"]]["linear"] == pytest.approx(protocol["linear"])
        # each test image's right/wrong is kept (for paired comparisons of two cards), in evaluate's order
        assert row["correct"]["trained"][protocol["title"]] == {"knn": protocol["correct"]["knn"][20],
                                                                "linear": protocol["correct"]["linear"]}
    assert row["test_ids_sha256"] == results["test_ids_sha256"]
    for kind in ("trained", "random_init"):
        for title, numbers in row[kind].items():
            for classifier, accuracy in numbers.items():
                right = row["correct"][kind][title][classifier]
                assert len(right) == 60 and set(right) <= {"0", "1"}
                assert 100.0 * right.count("1") / 60 == pytest.approx(accuracy)
    # The control is another network: its accuracies differ from the trained ones somewhere, and the
    # checkpoint file is untouched.
    assert any(row["trained"][p] != row["random_init"][p] for p in row["trained"])
    assert checkpoint.read_bytes() == before
    for numbers in (*row["trained"].values(), *row["random_init"].values()):
        for accuracy in numbers.values():
            assert (accuracy * 60 / 100) == pytest.approx(round(accuracy * 60 / 100))  # whole test images


def test_model_card_loads_each_checkpoint_once_and_names_the_bytes_it_measured(tmp_path, cifar10_npz, tiny_model,
                                                                             monkeypatch):
    """Two files on one card: each is loaded once (it was loaded again after a check load), and the sha256 a row
    records is that of the file as it was loaded, also when the file is replaced while the card runs; a file replaced
    while it is being read is refused in one line."""
    a, b, _ = _two_models_of_one_architecture(tmp_path, tiny_model)
    hashes = {path: store.file_sha256(path) for path in (a, b)}
    card = _card_module()
    loads = []

    replace_when = str(b)

    def load_and_replace(path, *args, **kwargs):
        loads.append(str(path))
        model = load_model(path, *args, **kwargs)
        if str(path) == replace_when:  # another model is written to a's path (a run saving into it)
            save_checkpoint(helpers.tiny_model(seed=len(loads) + 2), a, train={"method": "vicreg", "min_scale": 0.2,
                                                                               "max_scale": 1.0})
        return model

    monkeypatch.setattr(card, "load_model", load_and_replace)
    argv = [str(a), str(b), "--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "40",
            "--probe-epochs", "2", "--protocols", "central", "--no-progress"]
    rows = card.main(argv)
    assert loads == [str(a), str(b)]
    assert [row["checkpoint_sha256"] for row in rows] == [hashes[a], hashes[b]]
    assert store.file_sha256(a) != hashes[a]

    replace_when = str(a)  # now while a itself is being read
    with pytest.raises(SystemExit, match=rf"^error: {a} changed while it was being read \(is a run writing it\?\): "
                                         "run the card again once it is written$"):
        card.main(argv)


def test_model_card_protocols_flag_picks_the_rows(tmp_path, cifar10_npz, tiny_model):
    model = tiny_model
    model.info.method = "bagssl"
    checkpoint = tmp_path / "tiny-bagssl.pt"
    save_checkpoint(model, checkpoint, train={"method": "bagssl", "patch_size": 16})
    card = _card_module()
    common = [str(checkpoint), "--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "40",
              "--num-patches", "2", "--probe-epochs", "2"]
    (central_only,) = card.main([*common, "--protocols", "central"])
    (both,) = card.main(common)
    assert set(central_only["trained"]) == set(central_only["random_init"]) == {"central"}
    assert central_only["trained"]["central"] == both["trained"]["central"]
    assert central_only["random_init"]["central"] == both["random_init"]["central"]


def test_model_card_records_extraction_and_keeps_the_trained_part_when_the_control_fails(
        tmp_path, cifar10_npz, tiny_model, monkeypatch):
    model = tiny_model
    model.info.method = "vicreg"
    checkpoint = tmp_path / "tiny-vicreg.pt"
    save_checkpoint(model, checkpoint, train={"method": "vicreg"})
    card = _card_module()
    common = [str(checkpoint), "--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "40",
              "--probe-epochs", "2", "--protocols", "central", "--no-progress", "--json", str(tmp_path / "card.json")]
    (row,) = card.main([*common, "--amp"])
    assert row["extraction"] == "bf16 autocast" and row["device"] == "cpu"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(card, "randomly_initialised", interrupted)
    with pytest.raises(KeyboardInterrupt):
        card.main(common)
    (kept,) = json.loads((tmp_path / "card.json").read_text())
    assert kept["extraction"] == "float32"
    assert set(kept["trained"]) == {"central"} and set(kept["trained"]["central"]) == {"knn", "linear"}
    assert kept["trained"]["central"]["knn"] * 40 / 100 == pytest.approx(round(kept["trained"]["central"]["knn"] * 0.4))
    assert "random_init" not in kept
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_model_card_compare_is_paired_over_the_same_test_images(tmp_path, cifar10_npz, tiny_model, capsys):
    import numpy as np
    import torch
    from scipy import stats

    card = _card_module()
    paths = {}
    for name, shift in (("a", 0.0), ("b", 0.05)):
        model = tiny_model
        with torch.no_grad():
            for p in model.parameters():
                p.add_(shift * torch.randn_like(p))
        checkpoint = tmp_path / f"{name}.pt"
        save_checkpoint(model, checkpoint, train={"method": "vicreg"})
        paths[name] = tmp_path / f"{name}.json"
        card.main([str(checkpoint), "--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "60",
                   "--probe-epochs", "2", "--no-progress", "--json", str(paths[name])])
    rows = card.main(["--compare", str(paths["a"]), str(paths["b"])])
    a, b = (json.loads(paths[n].read_text())[0] for n in "ab")
    assert {(r["a"], r["b"], r["classifier"]) for r in rows} == {("central", "central", "knn"),
                                                                 ("central", "central", "linear")}
    for r in rows:
        assert r["accuracy_a"] == pytest.approx(a["trained"]["central"][r["classifier"]])
        assert r["accuracy_b"] == pytest.approx(b["trained"]["central"][r["classifier"]])
        # the mean of per-image differences, and its Student-t half-width, computed here independently
        d = np.array([int(x) - int(y) for x, y in zip(a["correct"]["trained"]["central"][r["classifier"]],
                                                      b["correct"]["trained"]["central"][r["classifier"]],
                                                      strict=True)], dtype=float)
        assert r["difference"]["value"] == pytest.approx(r["accuracy_a"] - r["accuracy_b"])
        half = 100 * stats.t.ppf(0.975, 59) * d.std(ddof=1) / np.sqrt(60)
        assert r["difference"]["half_width"] == pytest.approx(half)
    out = capsys.readouterr().out
    assert "| central | central | knn |" in out and "extracted differently" not in out
    assert f"A = {paths['a']} (float32)" in out  # each card's extraction, named
    bf16 = json.loads(paths["b"].read_text())
    bf16[0]["extraction"] = "bf16 autocast"
    (tmp_path / "bf16.json").write_text(json.dumps(bf16))
    card.main(["--compare", str(paths["a"]), str(tmp_path / "bf16.json")])
    assert "extracted differently: float32 vs bf16 autocast" in capsys.readouterr().out
    for r in card.main(["--compare", str(paths["a"]), str(paths["b"]), "--control"]):
        assert r["accuracy_a"] == pytest.approx(a["random_init"]["central"][r["classifier"]])
        assert r["accuracy_b"] == pytest.approx(b["random_init"]["central"][r["classifier"]])

    other = tmp_path / "other.json"
    card.main([str(tmp_path / "a.pt"), "--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "40",
               "--probe-epochs", "2", "--no-progress", "--json", str(other)])
    with pytest.raises(SystemExit, match="different test images"):
        card.main(["--compare", str(paths["a"]), str(other)])
    old = json.loads(paths["b"].read_text())
    del old[0]["correct"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="made before"):
        card.main(["--compare", str(paths["a"]), str(tmp_path / "old.json")])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="cannot read the card"):
        card.main(["--compare", str(paths["a"]), str(tmp_path / "bad.json")])


def test_model_card_that_cannot_write_its_json_says_so_with_the_numbers(tmp_path, cifar10_npz, tiny_model,
                                                                        monkeypatch):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, checkpoint, train={"method": "vicreg"})
    card = _card_module()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", full_disk)
    with pytest.raises(SystemExit, match=r"cannot write the card .*is full: card.json was not written.*measured so "
                                         r"far: .*\"knn\": "):
        card.main([str(checkpoint), "--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "40",
                   "--probe-epochs", "2", "--protocols", "central", "--no-progress",
                   "--json", str(tmp_path / "card.json")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]  # no card, no temporary file left


def test_a_json_that_cannot_be_written_is_refused_before_anything_is_measured(tmp_path, tiny_model, capsys,
                                                                              monkeypatch):
    # was: --json under a file (or naming a folder) failed after the card's first part, minutes in
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, checkpoint, train={"method": "vicreg"})
    card = _card_module()
    monkeypatch.setattr(card, "evaluate_protocols", lambda *a, **k: pytest.fail("measured before --json was checked"))
    for json_path, said in ((checkpoint / "card.json", "tiny.pt is a file, not a folder"),
                            (tmp_path, "expected a file, but")):
        with pytest.raises(SystemExit) as stop:
            card.main([str(checkpoint), "--device", "cpu", "--json", str(json_path)])
        assert stop.value.code == 2
        assert said in capsys.readouterr().err


def _count_evaluations(card, monkeypatch) -> list[str]:
    """Each evaluate_protocols call of the card, by the model's source (``...-random-init`` for a control)."""
    calls, real = [], card.evaluate_protocols

    def counted(model, *args, **kwargs):
        calls.append(str(model.info.source))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(card, "evaluate_protocols", counted)
    return calls


def test_an_interrupted_card_resumes_from_its_json_only_for_the_same_file_and_settings(
        tmp_path, cifar10_npz, tiny_model, monkeypatch):
    checkpoint = tmp_path / "tiny-bagssl.pt"
    save_checkpoint(tiny_model, checkpoint, train={"method": "bagssl", "patch_size": 16})
    card, out = _card_module(), tmp_path / "card.json"
    common = [str(checkpoint), "--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "40",
              "--num-patches", "2", "--probe-epochs", "2", "--no-progress", "--json", str(out)]
    (whole,) = card.main(common)
    out.write_text(json.dumps([{k: v for k, v in whole.items() if k != "random_init"}
                               | {"correct": {"trained": whole["correct"]["trained"]}}]))  # stopped in the control
    calls = _count_evaluations(card, monkeypatch)
    (resumed,) = card.main(common)
    assert len(calls) == 1 and calls[0].endswith("random-init")  # only the control was measured
    assert json.loads(out.read_text()) == [json.loads(json.dumps(resumed))]
    for kind in ("trained", "random_init"):
        assert resumed[kind] == whole[kind] and resumed["correct"][kind] == whole["correct"][kind]
    # a finished card is reused whole; other settings, another file at that path, or a card that did not record its
    # checkpoint's sha256 are measured again
    calls.clear()
    card.main(common)
    assert calls == []
    card.main([*common, "--probe-epochs", "3"])
    assert len(calls) == 2
    calls.clear()
    save_checkpoint(helpers.tiny_model(seed=1), checkpoint, train={"method": "bagssl", "patch_size": 16})
    card.main(common)
    assert len(calls) == 2
    calls.clear()
    out.write_text(json.dumps([{k: v for k, v in json.loads(out.read_text())[0].items() if k != "checkpoint_sha256"}]))
    card.main(common)
    assert len(calls) == 2


def test_control_from_another_card_is_the_control_it_would_measure_and_refuses_another_network(
        tmp_path, cifar10_npz, tiny_model, monkeypatch):
    """Two models of one architecture have the same random-init control (the same seed, BatchNorm calibrated on the
    same images): --control-from takes it from the other's card, equal to measuring it; a card of another
    architecture, or measured on other images, is refused in one line."""
    a, b, train = _two_models_of_one_architecture(tmp_path, tiny_model)
    card = _card_module()
    common = ["--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "40", "--protocols",
              "central,2", "--probe-epochs", "2", "--no-progress"]
    (card_a,) = card.main([str(a), *common, "--json", str(tmp_path / "a.json")])
    (measured_b,) = card.main([str(b), *common])
    assert measured_b["trained"] != card_a["trained"]
    assert measured_b["control_backbone_sha256"] == card_a["control_backbone_sha256"]
    calls = _count_evaluations(card, monkeypatch)
    (taken_b,) = card.main([str(b), *common, "--control-from", str(tmp_path / "a.json")])
    assert len(calls) == 1 and not calls[0].endswith("random-init")  # the trained part only
    assert taken_b["random_init"] == measured_b["random_init"] == card_a["random_init"]
    assert taken_b["correct"]["random_init"] == measured_b["correct"]["random_init"]
    assert taken_b["random_init_from"] == str(tmp_path / "a.json")
    # a card written before the control's sha256 was recorded: its checkpoint's control is rebuilt and checked
    old = {k: v for k, v in card_a.items() if k not in ("control_backbone_sha256", "patch_scale")}
    (tmp_path / "old.json").write_text(json.dumps([old]))
    (from_old,) = card.main([str(b), *common, "--control-from", str(tmp_path / "old.json")])
    assert from_old["random_init"] == card_a["random_init"]

    wide = helpers.tiny_model()
    wide.info.width = 0.25
    backbone, dim = models.build_backbone("resnet18", stem="cifar", width=0.25)
    wide.backbone = backbone
    wide.projector = models.build_mlp([dim, 32, 16])
    save_checkpoint(wide, tmp_path / "wide.pt", train=train)
    with pytest.raises(SystemExit, match=r"cannot stand for .*another random network"):
        card.main([str(tmp_path / "wide.pt"), *common, "--control-from", str(tmp_path / "a.json")])
    with pytest.raises(SystemExit, match=r"cannot stand for .*train_images \(40 there, 30 here\)"):
        card.main([str(b), *[c if c != "40" else "30" for c in common], "--control-from", str(tmp_path / "a.json")])


def test_a_central_view_control_stands_for_a_model_of_other_patch_settings_and_a_patch_control_does_not(
        tmp_path, cifar10_npz, tiny_model):
    """The central view cuts no patches: a fixed-scale model's central-view card takes its control from a multi-scale
    model's card of the same random network (equal to measuring it); a card of patches at another scale is refused."""
    multi, fixed = tmp_path / "multi.pt", tmp_path / "fixed.pt"
    save_checkpoint(tiny_model, multi, train={"method": "vicreg", "min_scale": 0.2, "max_scale": 1.0})
    save_checkpoint(helpers.tiny_model(seed=1), fixed, train={"method": "bagssl", "patch_size": 16})
    card = _card_module()
    common = ["--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "40", "--probe-epochs", "2",
              "--no-progress"]
    card.main([str(multi), *common, "--protocols", "central,2", "--json", str(tmp_path / "multi.json")])
    (measured,) = card.main([str(fixed), *common, "--protocols", "central"])
    control = ["--control-from", str(tmp_path / "multi.json")]
    (taken,) = card.main([str(fixed), *common, "--protocols", "central", *control])
    assert taken["random_init"] == measured["random_init"]
    assert taken["correct"]["random_init"] == measured["correct"]["random_init"]
    with pytest.raises(SystemExit, match=r"cannot stand for .*other patches"):
        card.main([str(fixed), *common, "--protocols", "central,2", *control])


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed: REV:PATH cards are read with git show")
def test_control_from_a_committed_card_by_rev_and_path_when_the_file_has_moved_on(
        tmp_path, cifar10_npz, tiny_model, monkeypatch):
    """A card replaced by a newer model's keeps its control in the history: --control-from REV:PATH (git's own
    syntax, the repository of the working directory) reads it from that commit and records REV:PATH, which anyone with
    the repository can read again; a revision git does not know is one line that says so."""
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    a, b, _ = _two_models_of_one_architecture(tmp_path, tiny_model)
    card = _card_module()
    common = ["--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "40", "--protocols",
              "central", "--probe-epochs", "2", "--no-progress"]
    (card_a,) = card.main([str(a), *common, "--json", "card.json"])
    subprocess.run([*git, "add", "card.json"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a's card"], check=True)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                         text=True).stdout.strip()
    (tmp_path / "repo" / "card.json").write_text("not a card any more")  # the file has moved on
    (taken,) = card.main([str(b), *common, "--control-from", f"{rev}:card.json"])
    assert taken["random_init"] == card_a["random_init"]
    assert taken["correct"]["random_init"] == card_a["correct"]["random_init"]
    assert taken["random_init_from"] == f"{rev}:card.json"
    with pytest.raises(SystemExit, match=r"^error: cannot read the card 0000000:card\.json from git: .+"):
        card.main([str(b), *common, "--control-from", "0000000:card.json"])


def test_a_candidates_card_becomes_the_shipped_models_without_measuring_again(tmp_path, cifar10_npz, tiny_model,
                                                                              monkeypatch, capsys):
    """A candidate is measured in its run folder before it is shipped; once shipped (the same bytes under another
    path), its card copied to the shipped card's path is reused whole, named after the shipped file; a different file
    at that path is measured again."""
    run = tmp_path / "run"
    run.mkdir()
    candidate, shipped = run / "candidate.pt", tmp_path / "shipped.pt"
    save_checkpoint(tiny_model, candidate, train={"method": "bagssl", "patch_size": 16})
    card = _card_module()
    common = ["--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "40", "--num-patches", "2",
              "--probe-epochs", "2", "--no-progress"]
    (measured,) = card.main([str(candidate), *common, "--json", str(run / "card.json")])
    shutil.copyfile(candidate, shipped)
    shutil.copyfile(run / "card.json", tmp_path / "card.json")
    calls = _count_evaluations(card, monkeypatch)
    capsys.readouterr()
    (reused,) = card.main([str(shipped), *common, "--json", str(tmp_path / "card.json")])
    assert calls == []
    assert f"measured earlier as {candidate} into" in capsys.readouterr().out
    assert reused["checkpoint"] == str(shipped) == json.loads((tmp_path / "card.json").read_text())[0]["checkpoint"]
    assert reused["checkpoint_sha256"] == measured["checkpoint_sha256"]
    for kind in ("trained", "random_init"):
        assert reused[kind] == measured[kind] and reused["correct"][kind] == measured["correct"][kind]
    save_checkpoint(helpers.tiny_model(seed=1), shipped, train={"method": "bagssl", "patch_size": 16})
    shutil.copyfile(run / "card.json", tmp_path / "card.json")
    card.main([str(shipped), *common, "--json", str(tmp_path / "card.json")])
    assert len(calls) == 2


def test_a_card_stopped_in_an_extraction_goes_on_from_its_cache_dir(tmp_path, cifar10_npz, tiny_model, monkeypatch):
    """With --cache-dir the patch embeddings go to evaluate's resumable stores: a card stopped in the middle of its
    model's extraction embeds, when run again, only the batches not yet written, and its numbers are those of a card
    measured without a cache in one go."""
    checkpoint = tmp_path / "tiny-bagssl.pt"
    save_checkpoint(tiny_model, checkpoint, train={"method": "bagssl", "patch_size": 16})
    card = _card_module()
    real_evaluate = card.evaluate_protocols
    # batches of 8 images, so that each store of 40 images is written in 5 batches
    monkeypatch.setattr(card, "evaluate_protocols", lambda *a, **k: real_evaluate(*a, **{**k, "batch_size": 8}))
    common = [str(checkpoint), "--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "40",
              "--num-patches", "2", "--protocols", "2", "--probe-epochs", "2", "--no-progress"]
    (uncached,) = card.main(common)

    written, real_write = [], store.StoreWriter.write_batch

    def write_batch(writer, batch, rows, stop_at=None):
        if stop_at is not None and len(written) == stop_at:
            raise KeyboardInterrupt  # stopped by hand in the middle of a store
        written.append(batch)
        return real_write(writer, batch, rows)

    monkeypatch.setattr(store.StoreWriter, "write_batch", write_batch)
    (cached,) = card.main([*common, "--cache-dir", str(tmp_path / "one-go")])
    in_one_go = len(written)
    assert in_one_go == 2 * 2 * 5  # model and control, train and test: 5 batches each
    stores = sorted(p.name for p in (tmp_path / "one-go").iterdir())
    assert len(stores) == 4 and not [name for name in stores if name.startswith(".")]

    written.clear()
    monkeypatch.setattr(store.StoreWriter, "write_batch", functools.partialmethod(write_batch, stop_at=7))
    with pytest.raises(KeyboardInterrupt):
        card.main([*common, "--cache-dir", str(tmp_path / "stopped"), "--json", str(tmp_path / "card.json")])
    assert len(written) == 7 and not (tmp_path / "card.json").exists()  # in the model's test-image store
    written.clear()
    monkeypatch.setattr(store.StoreWriter, "write_batch", write_batch)
    (resumed,) = card.main([*common, "--cache-dir", str(tmp_path / "stopped"), "--json", str(tmp_path / "card.json")])
    assert len(written) == in_one_go - 7  # the 7 batches written before the stop are not embedded again
    for row in (cached, resumed):
        for kind in ("trained", "random_init"):
            assert row[kind] == uncached[kind] and row["correct"][kind] == uncached["correct"][kind]


def _synthetic_card(path, knn: str, linear: str) -> str:
    """A card of the 16-patch protocol that keeps these per-image right/wrong strings (the shape --compare reads)."""
    correct = {"16 patches": {"knn": knn, "linear": linear}}
    path.write_text(json.dumps([{"checkpoint": path.stem, "test_ids_sha256": "ids", "extraction": "bf16 autocast",
                                 "correct": {"trained": correct, "random_init": correct}}]))
    return str(path)


@pytest.mark.parametrize("candidate, replaces, why", [
    # 1,000 test images; the shipped model right on the first 600 (k-NN and linear)
    (("1" * 650 + "0" * 350, "1" * 600 + "0" * 400), True, "k-NN better beyond the interval"),   # k-NN +5.0
    # k-NN +1.0 from 50 images won and 40 lost: inside its interval
    (("0" * 40 + "1" * 610 + "0" * 350, "1" * 600 + "0" * 400), False, "k-NN not better beyond"),
    (("1" * 650 + "0" * 350, "1" * 550 + "0" * 450), False, "worse beyond the interval: 16 patches linear -5.00"),
])
def test_verdict_ships_a_candidate_only_when_its_knn_gain_is_beyond_the_paired_interval(
        tmp_path, capsys, candidate, replaces, why):
    card = _card_module()
    shipped = _synthetic_card(tmp_path / "shipped.json", "1" * 600 + "0" * 400, "1" * 600 + "0" * 400)
    new = _synthetic_card(tmp_path / "candidate.json", *candidate)
    if replaces:
        rows = card.main(["--compare", new, shipped, "--verdict"])
        assert {r["classifier"] for r in rows} == {"knn", "linear"}
    else:
        with pytest.raises(SystemExit) as stop:
            card.main(["--compare", new, shipped, "--verdict"])
        assert stop.value.code == card.KEEP_STATUS == 3
    out = capsys.readouterr().out
    assert f"verdict: {'ship A' if replaces else 'keep B'}" in out and why in out
    # the interval is the paired one: 50 images that only the candidate gets right are +5.0, whose 95% interval
    # (Student-t over 1,000 per-image differences in {0, 1}) starts near +3.6
    if replaces:
        (knn,) = [r for r in rows if r["classifier"] == "knn"]
        assert knn["difference"]["value"] == pytest.approx(5.0)
        assert knn["difference"]["ci95_low"] == pytest.approx(3.65, abs=0.05)


def test_verdict_needs_compare_and_a_shared_protocol(tmp_path):
    card = _card_module()
    a = _synthetic_card(tmp_path / "a.json", "1" * 10, "1" * 10)
    central = json.loads((tmp_path / "a.json").read_text())
    for kind in ("trained", "random_init"):
        central[0]["correct"][kind] = {"central": central[0]["correct"][kind]["16 patches"]}
    (tmp_path / "central.json").write_text(json.dumps(central))
    with pytest.raises(SystemExit, match="share no protocol"):
        card.main(["--compare", a, str(tmp_path / "central.json"), "--verdict"])
    with pytest.raises(SystemExit) as stop:
        card.main([a, "--verdict"])
    assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop:
        card.main(["--compare", a, a, "--verdict", "--control"])
    assert stop.value.code == 2


def test_a_json_that_is_not_a_card_is_not_replaced(tmp_path, cifar10_npz, tiny_model):
    # Was: a user's file named by --json was replaced with a card, exit status 0.
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, checkpoint, train={"method": "vicreg", "min_scale": 0.2, "max_scale": 1.0})
    common = [str(checkpoint), "--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "20",
              "--probe-epochs", "1"]
    for name, content in (("notes.txt", "my notes"), ("other.json", '{"a": 1}'), ("list.json", "[1, 2]")):
        (tmp_path / name).write_text(content)
        with pytest.raises(SystemExit, match=f"--json .*{name} .*not replaced: choose another --json"):
            _card_module().main([*common, "--json", str(tmp_path / name)])
        assert (tmp_path / name).read_text() == content


@pytest.mark.parametrize("args, said", [
    (["{text}"], "is not a PyTorch checkpoint"),  # was a traceback, exit status 1
    (["{model}", "--max-images=-5"], "--max-images"),
    (["{model}", "--num-patches", "0"], "--num-patches"),
    (["{model}", "--device", "cuda:99"], "--device cuda:99"),
])
def test_command_line_errors_are_one_line_with_status_2(tmp_path, cifar10_npz, tiny_model, capsys, args, said):
    from ssl_patch_analysis import cli

    (tmp_path / "text.pt").write_text("hello, not a checkpoint")
    save_checkpoint(tiny_model, tmp_path / "tiny.pt", train={"method": "vicreg", "min_scale": 0.2, "max_scale": 1.0})
    names = {"text": tmp_path / "text.pt", "model": tmp_path / "tiny.pt"}
    with pytest.raises(SystemExit) as stop:
        cli.command(_card_module().main)([*[a.format(**names) for a in args], "--data-root", str(cifar10_npz.parent),
                                          "--json", str(tmp_path / "card.json")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and said in err, err  # before any data is decoded
    assert not (tmp_path / "card.json").exists()


def test_a_verdict_whose_interval_is_not_a_number_keeps_the_shipped_model():
    """With one test image the paired interval is NaN; NaN <= 0 and NaN < 0 are both false, so the candidate was
    shipped (exit 0) on no evidence. An interval that is not a number is no gain."""
    card = _card_module()
    nan = float("nan")
    rows = [{"a": "central", "b": "central", "classifier": "knn",
             "difference": {"value": 1.0, "ci95_low": nan, "ci95_high": nan}},
            {"a": "central", "b": "central", "classifier": "linear",
             "difference": {"value": 0.0, "ci95_low": nan, "ci95_high": nan}}]
    ship, reason = card.ship_verdict(rows)
    assert ship is False and "not better beyond the interval" in reason


def test_cards_of_other_data_are_not_compared_and_a_small_bank_names_its_k(tmp_path, cifar10_npz, tiny_model):
    """Two cards of the same test ids on other pixels (the official CIFAR-10 files, the JPEG copy) were compared
    paired without a word; a card with fewer than 20 training images said k=20 while measuring with fewer."""
    card = _card_module()
    a = _synthetic_card(tmp_path / "a.json", "1" * 10, "1" * 10)
    b = _synthetic_card(tmp_path / "b.json", "1" * 10, "1" * 10)
    for path, data in ((a, "CIFAR-10 test"), (b, "CIFAR-10 (JPEG copy) test")):
        rows = json.loads(Path(path).read_text())
        rows[0]["data"] = data
        Path(path).write_text(json.dumps(rows))
    with pytest.raises(SystemExit, match=r"different data \(CIFAR-10 test vs CIFAR-10 \(JPEG copy\) test\)"):
        card.main(["--compare", a, b])
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, checkpoint, train={"method": "vicreg"})
    card.main([str(checkpoint), "--data-root", str(cifar10_npz.parent), "--device", "cpu", "--max-images", "12",
               "--probe-epochs", "1", "--protocols", "central", "--no-progress", "--json", str(tmp_path / "c.json")])
    (row,) = json.loads((tmp_path / "c.json").read_text())
    assert row["knn"] == "weighted, cosine, k=12, T=0.07" and row["train_images"] == 12
