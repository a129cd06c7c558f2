"""ViTs trained by the trainer and kept in the project's own format (issue 15, item 4)."""
import math

import pytest
import torch

from ssl_patch_analysis.checkpoints import load_model, read_checkpoint, save_checkpoint
from ssl_patch_analysis.train import TrainConfig, build_model, build_vit_backbone, read_log, train
from ssl_patch_analysis.vit import ViT


def vit_model(arch: str = "vit_tiny_patch8", method: str = "vicreg") -> torch.nn.Module:
    config = TrainConfig(method=method, arch=arch, input_size=32, projector="64-32", data="cifar10")
    torch.manual_seed(0)
    model = build_model(config, image_side=32)
    return model.eval()


def test_own_format_keeps_a_vit_exactly(tmp_path):
    model = vit_model()
    assert isinstance(model.backbone, ViT) and model.info.stem == "patch8"
    save_checkpoint(model, tmp_path / "vit.pt", train={"method": "vicreg"})
    loaded = load_model(tmp_path / "vit.pt", verbose=False)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(images), loaded(images)
    for layer in ("h", "z"):
        torch.testing.assert_close(got[layer], expected[layer], rtol=0, atol=1e-6)
    assert loaded.info.arch == "vit_tiny_patch8" and loaded.info.stem == "patch8"
    vit = loaded.info.extra["vit"]
    assert (vit["embed_dim"], vit["depth"], vit["num_heads"], vit["patch_size"], vit["img_size"]) == (192, 12, 3, 8, 32)
    assert vit["h"] == "class token after the final norm"
    saved = read_checkpoint(tmp_path / "vit.pt")
    assert saved["arch"]["vit"]["num_heads"] == 3  # the heads travel with the file: nothing to guess on loading


def test_half_precision_file_of_a_vit_tiny_is_small_and_close(tmp_path):
    model = vit_model("vit_tiny_patch4")
    save_checkpoint(model, tmp_path / "vit16.pt", half=True)
    assert (tmp_path / "vit16.pt").stat().st_size < 25e6
    loaded = load_model(tmp_path / "vit16.pt", verbose=False)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)["h"], model(images)["h"], rtol=0, atol=5e-2)


def test_a_file_with_unknown_vit_settings_is_refused_in_one_line(tmp_path):
    save_checkpoint(vit_model(), tmp_path / "vit.pt")
    obj = read_checkpoint(tmp_path / "vit.pt")
    obj["arch"]["vit"]["rope"] = True
    obj.pop("sha256")
    torch.save(obj, tmp_path / "future.pt")
    with pytest.raises(ValueError, match=r"settings this version does not know \(rope\)"):
        load_model(tmp_path / "future.pt", verbose=False)


@pytest.mark.parametrize("arch, size, width, message", [
    ("vit_tiny_patch8", 36, 1.0, "not a multiple of vit_tiny_patch8's patch size 8"),
    ("vit_tiny_patch4", 32, 0.5, "--width applies to ResNets only"),
    ("vit_huge_patch4", 32, 1.0, "unknown ViT"),
])
def test_bad_vit_settings_are_named(arch, size, width, message):
    with pytest.raises(ValueError, match=message):
        build_vit_backbone(arch, size, width)


@pytest.mark.slow  # two epochs of a ViT-Tiny
def test_the_trainer_trains_a_vit_and_its_checkpoint_loads(tmp_path, cifar10_npz):
    config = TrainConfig(method="vicreg", arch="vit_tiny_patch8", data_root=str(cifar10_npz.parent), train_size=16,
                         batch_size=8, epochs=2, optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=0,
                         projector="64-32", knn_every=0, knn_train_size=40, knn_test_size=20, device="cpu",
                         out=str(tmp_path / "run"))
    path = train(config)
    model = load_model(path, verbose=False)
    assert isinstance(model.backbone, ViT) and model.info.method == "vicreg"
    train_info = model.info.extra["train"]
    assert train_info["arch"] == "vit_tiny_patch8" and train_info["epochs"] == 2
    assert 0 <= train_info["knn_top1"] <= 100
    records = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "epoch" in r]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records) and records[0]["loss"] != records[1]["loss"]
