"""The trainer on real CIFAR-10 images: learning, exact resume, checkpoints, logs, NaN stop, 2-process DDP."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_patch_analysis import train as train_module
from ssl_patch_analysis.checkpoints import load_model, read_checkpoint
from ssl_patch_analysis.losses import LossOutput
from ssl_patch_analysis.models import CIFAR10_MEAN, CIFAR10_STD
from ssl_patch_analysis.train import LARS, TrainingDiverged, build_model, build_parser, learning_rate, main, train

# A narrow ResNet-18 and a tiny batch: a step takes a fraction of a second on two CPU cores.
TINY = ["--width", "0.125", "--projector", "64-64", "--batch-size", "16", "--train-size", "32",
        "--num-patches", "4", "--knn-train-size", "100", "--knn-test-size", "50", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions gain nothing from intra-op threads, and OpenMP threads stall badly (tens of
    times slower) when another process holds one of the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_args(data_root: Path, out: Path, *extra: str):
    return build_parser().parse_args(["--data-root", str(data_root), "--out", str(out), *TINY, *extra])


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def resume_state(out: Path) -> dict:
    return torch.load(out / "resume.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_epoch_run(cifar10_npz, tmp_path_factory):
    """An uninterrupted 2-epoch BagSSL run (2 steps per epoch)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    path = train(tiny_args(cifar10_npz.parent, out, "--epochs", "2"))
    return out, path


@pytest.mark.parametrize("method", ["bagssl", "vicreg"])
def test_a_few_steps_decrease_the_loss(cifar10_npz, tmp_path, method):
    train(tiny_args(cifar10_npz.parent, tmp_path, "--method", method, "--epochs", "6", "--lr", "0.3",
                    "--warmup-epochs", "0", "--knn-every", "0"))
    losses = [record["loss"] for record in read_log(tmp_path)[1:]]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    # Epoch means over 2 steps each; the last two epochs against the first two beat the noise.
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.98 * first, losses


def test_resume_takes_the_same_steps_as_an_uninterrupted_run(cifar10_npz, tmp_path, two_epoch_run):
    uninterrupted, _ = two_epoch_run
    # A tiny time limit stops cleanly after the first epoch, checkpoint written.
    interrupted = tmp_path / "run"
    train(tiny_args(cifar10_npz.parent, interrupted, "--epochs", "2", "--time-limit", "1e-6"))
    stopped = read_checkpoint(interrupted / "checkpoint.pt")["train"]
    assert stopped["epochs"] == 1 and "time limit" in stopped["stopped_early"]
    assert resume_state(interrupted)["step"] == 2

    train(tiny_args(cifar10_npz.parent, interrupted, "--epochs", "2", "--resume"))
    resumed, expected = resume_state(interrupted), resume_state(uninterrupted)
    assert resumed["step"] == expected["step"] == 4
    for name, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][index]["mu"], state["mu"])
    assert read_log(interrupted)[-1]["loss"] == read_log(uninterrupted)[-1]["loss"]


def test_resume_refuses_changed_settings(cifar10_npz, tmp_path, two_epoch_run):
    out, _ = two_epoch_run
    with pytest.raises(ValueError, match=r"num_patches \(was 4, now 8\)"):
        train(tiny_args(cifar10_npz.parent, out, "--epochs", "3", "--resume", "--num-patches", "8"))
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_args(cifar10_npz.parent, out, "--epochs", "2"))


def test_checkpoint_round_trips_through_load_model(cifar10_npz, two_epoch_run):
    out, path = two_epoch_run
    loaded = load_model(path, verbose=False)
    state = resume_state(out)
    args = build_parser().parse_args(["--data-root", str(cifar10_npz.parent), *TINY])
    for key, value in state["args"].items():
        setattr(args, key, value)
    trained = build_model(args, 32)
    trained.load_state_dict(state["model"])
    trained.eval()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = trained(images), loaded(images)
    torch.testing.assert_close(got["h"], expected["h"], rtol=0, atol=0)
    torch.testing.assert_close(got["z"], expected["z"], rtol=0, atol=0)

    assert loaded.preprocess.input_size == 32
    assert loaded.preprocess.mean == pytest.approx(CIFAR10_MEAN) and loaded.preprocess.std == pytest.approx(CIFAR10_STD)
    assert loaded.info.stem == "cifar" and loaded.info.method == "bagssl"
    info = loaded.info.extra["train"]
    assert info["data"] == "CIFAR-10 (JPEG copy)"
    assert (info["patch_size"], info["num_patches"], info["epochs"], info["batch_size"]) == (16, 4, 2, 16)
    assert info["lr"] == pytest.approx(0.3 * 16 / 256)
    assert 0 <= info["knn_top1"] <= 100 and info["wall_time_s"] > 0 and info["device"].startswith("cpu")
    assert info["command"].startswith("python -m ssl_patch_analysis.train") and "--num-patches 4" in info["command"]


def test_log_has_the_header_and_one_record_per_epoch(two_epoch_run):
    out, _ = two_epoch_run
    header, *records = read_log(out)
    assert header["args"]["method"] == "bagssl" and header["args"]["patch_size"] == 16
    assert header["command"].startswith("python -m ssl_patch_analysis.train")
    assert header["data"] == "CIFAR-10 (JPEG copy)" and header["train_images"] == 32
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [2, 4]
    for record in records:
        assert {"loss", "invariance", "variance", "covariance", "lr", "images_per_s", "epoch_time_s"} <= set(record)
        # BagSSL's total is its weighted terms (25, 25, 1), averaged over the epoch's steps.
        weighted = 25 * record["invariance"] + 25 * record["variance"] + record["covariance"]
        assert record["loss"] == pytest.approx(weighted, rel=1e-5)
        assert 0 <= record["knn_top1"] <= 100
    # Cosine warm-up over 10 epochs of 2 steps: the learning rate of step s is peak * (s + 1) / 20.
    assert records[1]["lr"] == pytest.approx(0.3 * 16 / 256 * 4 / 20)


@pytest.mark.parametrize("method, extra", [("emp-ssl", ["--pre-feature", "32"]), ("simclr", [])])
def test_other_methods_train_and_load(cifar10_npz, tmp_path, method, extra):
    path = train(tiny_args(cifar10_npz.parent, tmp_path, "--method", method, "--epochs", "1", *extra))
    model = load_model(path, verbose=False)
    z = model(torch.rand(3, 3, 32, 32))["z"]
    assert model.info.method == method and torch.isfinite(z).all()
    if method == "emp-ssl":
        torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
        assert model.pre_feature is not None
    terms = read_log(tmp_path)[1]
    assert ("tcr" in terms) if method == "emp-ssl" else ("ntxent" in terms)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cifar10_npz, tmp_path, monkeypatch):
    real_build_loss = train_module.build_loss
    calls = {"n": 0}

    def loss_that_breaks_at_step_3(method):
        loss = real_build_loss(method)

        def forward(z):
            calls["n"] += 1
            out = loss(z)
            if calls["n"] >= 3:  # steps are numbered from 0: step 2 is the first of epoch 2
                return LossOutput(out.total * float("nan"), out.terms)
            return out
        return forward

    monkeypatch.setattr(train_module, "build_loss", loss_that_breaks_at_step_3)
    argv = ["--data-root", str(cifar10_npz.parent), "--out", str(tmp_path), *TINY, "--epochs", "3"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code != 0
    message = str(stop.value.code)
    assert "NaN or infinite at step 2" in message and "loss=nan" in message and "--lr" in message
    kept = read_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["train"]["epochs"] == 1
    assert all(torch.isfinite(t).all() for t in kept["backbone"].values() if t.is_floating_point())
    assert resume_state(tmp_path)["epoch"] == 1
    assert len(read_log(tmp_path)) == 2  # header + epoch 1


def test_huge_learning_rate_is_reported_not_saved(cifar10_npz, tmp_path):
    with pytest.raises(TrainingDiverged, match="NaN or infinite"):
        train(tiny_args(cifar10_npz.parent, tmp_path, "--epochs", "1", "--lr", "1e30", "--optimizer", "sgd",
                        "--warmup-epochs", "0"))
    assert not (tmp_path / "checkpoint.pt").exists()


def test_two_process_gloo_run_stays_in_sync(cifar10_npz, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ssl_patch_analysis.train", "--data-root", str(cifar10_npz.parent), "--out", str(tmp_path),
               *TINY, "--epochs", "1", "--knn-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    header, record = read_log(tmp_path)
    assert header["world_size"] == 2
    # Global batch 16 = 2 x 8 images: 32 images make 2 steps, as on one process.
    assert record["step"] == 2 and math.isfinite(record["loss"])
    assert record["rank_param_max_diff"] == 0.0
    model = load_model(tmp_path / "checkpoint.pt", verbose=False)
    assert torch.isfinite(model(torch.rand(2, 3, 32, 32))["z"]).all()


def test_learning_rate_schedule():
    peak = 0.5
    assert learning_rate(0, 100, 10, peak) == pytest.approx(0.05)
    assert learning_rate(9, 100, 10, peak) == pytest.approx(peak)
    assert learning_rate(10, 100, 10, peak) == pytest.approx(peak)
    # Half-way through the cosine: (peak + end) / 2, end = peak / 1000.
    assert learning_rate(55, 100, 10, peak) == pytest.approx((peak + peak * 0.001) / 2)
    assert learning_rate(100, 100, 10, peak) == pytest.approx(peak * 0.001)


def test_lars_step_matches_the_formula_and_skips_excluded_groups():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS([{"params": [weight]}, {"params": [bias], "lars_exclude": True}], lr=0.1, weight_decay=0.5,
                     momentum=0.9, eta=0.01)
    weight.grad, bias.grad = torch.tensor([[1.0, 0.0]]), torch.tensor([2.0])
    optimizer.step()
    update = torch.tensor([[1.0, 0.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])
    trust = 0.01 * 5.0 / update.norm()
    torch.testing.assert_close(weight.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * trust * update)
    # Excluded: neither weight decay nor trust ratio, plain momentum SGD.
    torch.testing.assert_close(bias.detach(), torch.tensor([1.0 - 0.1 * 2.0]))


@pytest.mark.parametrize("extra, message", [
    (["--num-patches", "1"], "--num-patches must be at least 2"),
    (["--patch-size", "40"], "--patch-size must lie in 1..32"),
    (["--batch-size", "64"], "larger than the training set"),
    (["--min-scale", "0.5", "--max-scale", "0.2"], "--min-scale"),
])
def test_bad_settings_are_rejected(cifar10_npz, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_args(cifar10_npz.parent, tmp_path, *extra))


def test_image_folder_trains_with_its_val_split_as_knn_queries(cifar10_npz, tmp_path):
    from PIL import Image

    from ssl_patch_analysis.data import load_dataset

    cifar = load_dataset("cifar10", "test", root=cifar10_npz.parent)
    for split, offset in (("train", 0), ("val", 100)):
        for i in range(offset, offset + 24):
            folder = tmp_path / "photos" / split / cifar.class_names[int(cifar.labels[i]) % 2]
            folder.mkdir(parents=True, exist_ok=True)
            # 48 px files: --image-size 32 resizes them to the 32 px the run trains on.
            Image.fromarray(cifar.images[i].permute(1, 2, 0).numpy()).resize((48, 48)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    args = build_parser().parse_args(["--data", str(tmp_path / "photos"), "--image-size", "32", "--out", str(out),
                                      *TINY, "--train-size", "16", "--batch-size", "8", "--epochs", "1"])
    path = train(args)
    header, record = read_log(out)
    assert header["train_images"] == 16 and header["knn"] == "bank: train, queries: val"
    assert 0 <= record["knn_top1"] <= 100
    model = load_model(path, verbose=False)
    # Folders are ImageNet-like: ImageNet normalisation; 32 px images still get the CIFAR stem.
    assert model.info.stem == "cifar" and model.preprocess.input_size == 32
    assert model.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
