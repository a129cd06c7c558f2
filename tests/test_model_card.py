"""pretrained/model_card.py reports what ``evaluate`` computes, for the model and its random-init control."""
import json

import pytest

from helpers import load_script
from ssl_patch_analysis.checkpoints import load_model, save_checkpoint
from ssl_patch_analysis.data import load_dataset
from ssl_patch_analysis.evaluate import ProbeSchedule, evaluate_protocols, subset_ids


def _card_module():
    return load_script("pretrained/model_card.py")


def test_model_card_numbers_are_evaluates_for_model_and_control(tmp_path, cifar10_npz, tiny_model):
    model = tiny_model
    model.info.method = "bagssl"
    checkpoint = tmp_path / "tiny-bagssl.pt"
    save_checkpoint(model, checkpoint, train={"method": "bagssl", "patch_size": 16})
    before = checkpoint.read_bytes()
    rows = _card_module().main([str(checkpoint), "--data-root", str(cifar10_npz.parent), "--device", "cpu",
                                "--max-images", "60", "--num-patches", "2", "--probe-epochs", "3",
                                "--json", str(tmp_path / "card.json")])
    (row,) = json.loads((tmp_path / "card.json").read_text())
    assert row == json.loads(json.dumps(rows[0]))
    assert set(row["trained"]) == set(row["random_init"]) == {"central", "2 patches"}
    assert row["train_images"] == row["test_images"] == 60

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
    assert not (tmp_path / "card.json.tmp").exists()
