"""Vision Transformer checkpoints load into timm's ViT and reproduce an independent forward pass.

Each writer below saves random weights in its project's exact layout (DINO's raw backbone and full
checkpoint, MoCo v3, MAE pretraining and fine-tuning, timm). The reference is computed here from
the saved tensors alone: a hand-written ViT (patch convolution, class token, position embedding,
pre-norm blocks of multi-head attention and GELU MLP, final norm) and hand-written heads (DINO's MLP,
L2 normalisation and weight-normalised prototypes). ``h`` and ``z`` must agree to float32 tolerance.
Sizes are tiny (width 48-192, depth 2, 32 px inputs) so the file runs in seconds.
"""
from __future__ import annotations

import argparse

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ssl_patch_analysis import weights
from ssl_patch_analysis.checkpoints import describe, detect_format, load_model
from ssl_patch_analysis.models import randomly_initialised

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
ATOL, RTOL = 2e-5, 1e-4
EPS = 1e-6  # the LayerNorm epsilon of DINO, MoCo v3, MAE and timm ViTs


# ----------------------------------------------------------------------------- writers' layouts


def _vit_state(width: int, depth: int, patch: int, grid: int, seed: int, class_token: bool = True,
               final_norm: str | None = "norm", classes: int = 0) -> dict[str, torch.Tensor]:
    """Random ViT weights under the names DINO's, MAE's and timm's VisionTransformer give them."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    def norm(name):
        return {f"{name}.weight": 1 + rand(width, std=0.1), f"{name}.bias": rand(width, std=0.1)}

    state = {"pos_embed": rand(1, grid * grid + int(class_token), width, std=0.5),
             "patch_embed.proj.weight": rand(width, 3, patch, patch, std=0.3),
             "patch_embed.proj.bias": rand(width, std=0.1)}
    if class_token:
        state["cls_token"] = rand(1, 1, width, std=0.5)
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({f"{b}{k}": v for k, v in norm("norm1").items()})
        state.update({f"{b}attn.qkv.weight": rand(3 * width, width, std=width ** -0.5),
                      f"{b}attn.qkv.bias": rand(3 * width, std=0.1),
                      f"{b}attn.proj.weight": rand(width, width, std=width ** -0.5),
                      f"{b}attn.proj.bias": rand(width, std=0.1)})
        state.update({f"{b}{k}": v for k, v in norm("norm2").items()})
        state.update({f"{b}mlp.fc1.weight": rand(4 * width, width, std=width ** -0.5),
                      f"{b}mlp.fc1.bias": rand(4 * width, std=0.1),
                      f"{b}mlp.fc2.weight": rand(width, 4 * width, std=(4 * width) ** -0.5),
                      f"{b}mlp.fc2.bias": rand(width, std=0.1)})
    if final_norm is not None:
        state.update(norm(final_norm))
    if classes:
        state.update({"head.weight": rand(classes, width), "head.bias": rand(classes)})
    return state


def _resample_grid(pos: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """The position embeddings of a new grid: the trained square grid resized bicubically (antialiased)."""
    old = pos[:, prefix:]
    side = int(old.shape[1] ** 0.5)
    old = old.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    new = F.interpolate(old, size=grid, mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([pos[:, :prefix], new.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


def _reference_tokens(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """All tokens after the last block (before any final norm), computed from the saved tensors."""
    weight = state["patch_embed.proj.weight"]
    width, patch = weight.shape[0], weight.shape[-1]
    t = F.conv2d(x, weight, state["patch_embed.proj.bias"], stride=patch)
    grid = tuple(t.shape[-2:])
    t = t.flatten(2).transpose(1, 2)
    prefix = 0
    if "cls_token" in state:
        t = torch.cat([state["cls_token"].expand(len(x), -1, -1), t], dim=1)
        prefix = 1
    pos = state["pos_embed"]
    if pos.shape[1] != t.shape[1]:
        pos = _resample_grid(pos, prefix, grid)
    t = t + pos
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        p = {k.removeprefix(f"blocks.{i}."): v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        y = F.layer_norm(t, (width,), p["norm1.weight"], p["norm1.bias"], EPS)
        q, k, v = F.linear(y, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(
            len(x), -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(dim=-1)
        y = (attention @ v).transpose(1, 2).reshape(len(x), -1, width)
        t = t + F.linear(y, p["attn.proj.weight"], p["attn.proj.bias"])
        y = F.layer_norm(t, (width,), p["norm2.weight"], p["norm2.bias"], EPS)
        y = F.linear(F.gelu(F.linear(y, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"],
                     p["mlp.fc2.bias"])
        t = t + y
    return t


def _layer_norm(t: torch.Tensor, state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.layer_norm(t, t.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], EPS)


def _reference_h(state, x, heads, mean_std=IMAGENET):
    """DINO's forward: the class token after the final norm."""
    return _layer_norm(_reference_tokens(state, _normalize(x, mean_std), heads), state, "norm")[:, 0]


def _normalize(x: torch.Tensor, mean_std) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)
    return (x - mean) / std


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(size))


def _load(path, **kwargs):
    return load_model(path, verbose=False, **kwargs)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- DINO


def test_dino_raw_backbone_reproduces_the_class_token_and_reads_its_shape(tmp_path):
    # dino_deitsmall16_pretrain.pth: the teacher ViT's state_dict, no head, qkv with bias.
    state = _vit_state(width=192, depth=2, patch=8, grid=4, seed=1)
    torch.save(state, tmp_path / "dino_deittiny8_pretrain.pth")
    model = _load(tmp_path / "dino_deittiny8_pretrain.pth")
    assert detect_format(torch.load(tmp_path / "dino_deittiny8_pretrain.pth", weights_only=True)) == "vit"

    x = _images(32)
    with torch.no_grad():
        _close(model.embed(x), _reference_h(state, x, heads=3, mean_std=CIFAR10))
    info, vit = model.info, model.info.extra["vit"]
    assert (info.format, info.arch, info.embedding_dim) == ("vit", "vit_w192_d2_patch8", 192)
    assert (vit["patch_size"], vit["depth"], vit["embed_dim"], vit["num_heads"], vit["img_size"]) == (8, 2, 192, 3, 32)
    assert vit["h"] == "class token after the final norm" and vit["qkv_bias"]
    assert any("3 attention heads (timm's vit_tiny" in a for a in info.extra["assumed"])
    assert model.preprocess.input_size == 32 and model.projector is None and not model.training


def test_standard_sizes_are_named_as_timm_names_them():
    from ssl_patch_analysis.vit import infer_vit_config

    with torch.device("meta"):  # shapes only: ViT-S/8 at 224 px (28 x 28 patches) without allocating it
        state = _vit_state(width=384, depth=12, patch=8, grid=28, seed=0)
    config, assumed = infer_vit_config(state)
    assert (config.name, config.img_size, config.num_heads, config.mlp_ratio) == ("vit_small_patch8", 224, 6, 4.0)
    assert assumed == ["6 attention heads (timm's vit_small configuration; not visible in the weights)"]
    config, assumed = infer_vit_config(state, num_heads=12)
    assert config.num_heads == 12 and assumed == []


def _dino_head(width: int, seed: int, use_bn: bool = False) -> nn.Module:
    """facebookresearch/dino's DINOHead layout: mlp (Linear-GELU x2, Linear) and a weight-normalised last layer."""
    torch.manual_seed(seed)
    head = nn.Module()
    layers: list[nn.Module] = [nn.Linear(width, 64)] + ([nn.BatchNorm1d(64)] if use_bn else []) + [nn.GELU()]
    layers += [nn.Linear(64, 64)] + ([nn.BatchNorm1d(64)] if use_bn else []) + [nn.GELU(), nn.Linear(64, 16)]
    head.mlp = nn.Sequential(*layers)
    head.last_layer = nn.utils.weight_norm(nn.Linear(16, 100, bias=False))
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)  # the teacher's g drifts from 1 under EMA
        for m in head.mlp:
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return head.eval()


def _reference_dino_head(head_state: dict[str, torch.Tensor], h: torch.Tensor, use_bn: bool) -> torch.Tensor:
    """DINOHead.forward from the saved tensors: MLP with GELU, L2 normalisation, g * v / ||v|| prototypes."""
    s = head_state
    linears = [0, 3, 6] if use_bn else [0, 2, 4]
    y = h
    for position, index in enumerate(linears):
        y = F.linear(y, s[f"mlp.{index}.weight"], s[f"mlp.{index}.bias"])
        if position < 2:
            if use_bn:
                bn = f"mlp.{index + 1}."
                y = F.batch_norm(y, s[bn + "running_mean"], s[bn + "running_var"], s[bn + "weight"], s[bn + "bias"],
                                 training=False, eps=1e-5)
            y = F.gelu(y)
    y = F.normalize(y, dim=-1)
    v, g = s["last_layer.weight_v"], s["last_layer.weight_g"]
    return y @ (g * v / v.norm(dim=1, keepdim=True)).t()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # DINO uses nn.utils.weight_norm (weight_g/weight_v keys)
@pytest.mark.parametrize("use_bn", [False, True])
def test_dino_full_checkpoint_loads_the_teacher_and_its_head_as_the_projector(tmp_path, use_bn):
    teacher_vit = _vit_state(width=48, depth=2, patch=8, grid=4, seed=2)
    student_vit = _vit_state(width=48, depth=2, patch=8, grid=4, seed=3)
    teacher_head, student_head = _dino_head(48, 4, use_bn).state_dict(), _dino_head(48, 5, use_bn).state_dict()
    # main_dino.py: the student is DDP-wrapped (module.), the teacher is not (a ViT has no BatchNorm);
    # MultiCropWrapper names the parts backbone and head.
    teacher = {**{f"backbone.{k}": v for k, v in teacher_vit.items()},
               **{f"head.{k}": v for k, v in teacher_head.items()}}
    student = {**{f"module.backbone.{k}": v for k, v in student_vit.items()},
               **{f"module.head.{k}": v for k, v in student_head.items()}}
    torch.save({"student": student, "teacher": teacher, "epoch": 100,
                "optimizer": torch.optim.AdamW([nn.Parameter(torch.zeros(2))]).state_dict(),
                "args": argparse.Namespace(arch="deit_tiny", patch_size=8, out_dim=100, norm_last_layer=True),
                "dino_loss": {"center": torch.zeros(1, 100)}}, tmp_path / "checkpoint.pth")

    model = _load(tmp_path / "checkpoint.pth")
    x = _images(32)
    with torch.no_grad():
        h = _reference_h(teacher_vit, x, heads=3)
        out = model(x)
        _close(out["h"], h)
        _close(out["z"], _reference_dino_head(teacher_head, h, use_bn))
        assert not torch.allclose(out["h"], _reference_h(student_vit, x, heads=3), atol=1e-2)
    info = model.info
    assert (info.format, info.method, info.arch) == ("dino-full", "dino", "vit_w48_d2_patch8")
    assert info.projector_dims == [48, 64, 64, 16, 100] and not info.projection_normalized
    assert info.extra["vit"]["num_heads"] == 3 and info.extra["network"] == "teacher"
    assert any("DINO's vit_tiny, named by the checkpoint's args" in a for a in info.extra["assumed"])
    assert model.preprocess.mean == IMAGENET[0]  # DINO normalises with ImageNet statistics


# ----------------------------------------------------------------------------- MoCo v3


def _moco_mlp(num_layers: int, d_in: int, hidden: int, d_out: int, last_bn: bool = True) -> nn.Sequential:
    """moco-v3 builder.py's _build_mlp: Linear(bias=False)-BN-ReLU, the last BN without affine terms."""
    layers: list[nn.Module] = []
    for index in range(num_layers):
        a, b = (d_in if index == 0 else hidden), (d_out if index == num_layers - 1 else hidden)
        layers.append(nn.Linear(a, b, bias=False))
        if index < num_layers - 1:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    mlp = nn.Sequential(*layers)
    for m in mlp:
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
    return mlp.eval()


def test_mocov3_vit_full_checkpoint_with_projector_and_twelve_heads(tmp_path):
    torch.manual_seed(0)
    encoder = _vit_state(width=96, depth=2, patch=8, grid=4, seed=6)
    head = _moco_mlp(3, 96, 64, 32)
    momentum = _vit_state(width=96, depth=2, patch=8, grid=4, seed=7)
    predictor = _moco_mlp(2, 32, 64, 32, last_bn=False)
    state = {**{f"module.base_encoder.{k}": v for k, v in encoder.items()},
             **{f"module.base_encoder.head.{k}": v for k, v in head.state_dict().items()},
             **{f"module.momentum_encoder.{k}": v for k, v in momentum.items()},
             **{f"module.momentum_encoder.head.{k}": v for k, v in head.state_dict().items()},
             **{f"module.predictor.{k}": v for k, v in predictor.state_dict().items()}}
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state,
                "optimizer": torch.optim.AdamW([nn.Parameter(torch.zeros(2))]).state_dict(),
                "scaler": {"scale": 65536.0, "growth_factor": 2.0}}, tmp_path / "checkpoint_0299.pth.tar")

    model = _load(tmp_path / "checkpoint_0299.pth.tar")
    x = _images(32)
    with torch.no_grad():
        h = _reference_h(encoder, x, heads=12)
        out = model(x)
        _close(out["h"], h)
        _close(out["z"], head(h))
        # the heads matter: timm's default for this width (96 / 64 -> 1) gives another embedding
        assert not torch.allclose(_reference_h(encoder, x, heads=1), h, atol=1e-3)
    info = model.info
    assert (info.format, info.method, info.extra["vit"]["num_heads"]) == ("mocov3", "mocov3", 12)
    assert info.projector_dims == [96, 64, 64, 32] and info.extra["arch_in_file"] == "vit_small"
    assert info.extra["dropped"] == {"momentum_encoder": len(encoder) + len(head.state_dict()),
                                     "predictor": len(predictor.state_dict())}
    assert any("MoCo v3's vits.py" in a for a in info.extra["assumed"])


def test_mocov3_resnet_checkpoint_reads_the_same_container(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    net.fc = _moco_mlp(2, 512, 64, 32)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    net.eval()
    state = {f"module.base_encoder.{k}": v for k, v in net.state_dict().items()}
    state.update({f"module.momentum_encoder.{k}": v for k, v in net.state_dict().items()})
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": state}, tmp_path / "r-18.pth.tar")
    model = _load(tmp_path / "r-18.pth.tar")
    x = _images(64)
    with torch.no_grad():
        out = model(x)
        _close(out["z"], net(_normalize(x, IMAGENET)))
    assert (model.info.format, model.info.arch, model.info.projector_dims) == ("mocov3", "resnet18", [512, 64, 32])


# ----------------------------------------------------------------------------- MAE


def test_mae_pretraining_checkpoint_drops_and_names_the_decoder(tmp_path):
    encoder = _vit_state(width=192, depth=2, patch=8, grid=4, seed=8)
    decoder = {k.replace("blocks.", "decoder_blocks."): v for k, v in _vit_state(64, 1, 8, 4, seed=9).items()
               if k.startswith("blocks.")}
    decoder.update({"decoder_embed.weight": torch.randn(64, 192), "decoder_embed.bias": torch.randn(64),
                    "mask_token": torch.randn(1, 1, 64), "decoder_pos_embed": torch.randn(1, 17, 64),
                    "decoder_norm.weight": torch.ones(64), "decoder_norm.bias": torch.zeros(64),
                    "decoder_pred.weight": torch.randn(8 * 8 * 3, 64), "decoder_pred.bias": torch.randn(8 * 8 * 3)})
    # util/misc.py save_model: {model, optimizer, epoch, scaler, args}
    torch.save({"model": {**encoder, **decoder}, "optimizer": {}, "epoch": 799, "scaler": {},
                "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True)},
               tmp_path / "checkpoint-799.pth")

    model = _load(tmp_path / "checkpoint-799.pth")
    x = _images(32)
    with torch.no_grad():
        _close(model.embed(x), _reference_h(encoder, x, heads=3))
    info = model.info
    assert (info.format, info.method, info.extra["vit"]["h"]) == ("mae", "mae", "class token after the final norm")
    assert info.extra["dropped"]["MAE decoder"] == {"decoder_blocks": 12, "decoder_embed": 2, "mask_token": 1,
                                                    "decoder_pos_embed": 1, "decoder_norm": 2, "decoder_pred": 2}
    assert "decoder" in describe(model) and model.projector is None


def test_mae_fine_tuned_checkpoint_pools_patch_tokens_through_fc_norm(tmp_path):
    # models_vit.py with global_pool=True: no final norm; fc_norm after the mean of the patch tokens.
    state = _vit_state(width=192, depth=2, patch=8, grid=4, seed=10, final_norm="fc_norm", classes=10)
    torch.save({"model": state, "epoch": 99,
                "args": argparse.Namespace(model="vit_base_patch16", global_pool=True, finetune="mae_pretrain.pth")},
               tmp_path / "checkpoint-99.pth")
    model = _load(tmp_path / "checkpoint-99.pth")
    x = _images(32)
    with torch.no_grad():
        tokens = _reference_tokens(state, _normalize(x, IMAGENET), heads=3)
        _close(model.embed(x), _layer_norm(tokens[:, 1:].mean(dim=1), state, "fc_norm"))
    info = model.info
    assert info.format == "mae" and info.extra["dropped"] == {"head (classifier)": 2}
    assert info.extra["vit"]["h"] == "mean of the patch tokens, then fc_norm"
    assert info.extra["vit"]["global_pool"] == "avg" and info.extra["model_in_args"] == "vit_base_patch16"


# ----------------------------------------------------------------------------- timm


@pytest.mark.parametrize("variant", ["class-token", "no-class-token", "registers"])
def test_plain_timm_state_dict_matches_timm_itself(tmp_path, variant):
    kwargs = {"class-token": {},
              "no-class-token": {"class_token": False, "global_pool": "avg", "fc_norm": False},
              "registers": {"reg_tokens": 2, "no_embed_class": True}}[variant]
    torch.manual_seed(11)
    writer = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10, **kwargs).eval()
    with torch.no_grad():
        for p in writer.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from timm's near-zero initialisation
    torch.save(writer.state_dict(), tmp_path / "vit.pth")
    model = _load(tmp_path / "vit.pth", num_heads=3)
    x = _images(32)
    with torch.no_grad():
        expected = writer.forward_head(writer.forward_features(_normalize(x, CIFAR10)), pre_logits=True)
        _close(model.embed(x), expected)
    assert model.info.format == "timm-vit" and model.info.extra["dropped"] == {"head (classifier)": 2}
    if variant == "no-class-token":
        state = writer.state_dict()
        with torch.no_grad():
            tokens = _layer_norm(_reference_tokens(state, _normalize(x, CIFAR10), heads=3), state, "norm")
            _close(model.embed(x), tokens.mean(dim=1))
        assert model.info.extra["vit"]["h"] == "mean of the patch tokens after the final norm"
    if variant == "registers":
        assert model.info.extra["vit"]["reg_tokens"] == 2 and model.info.extra["vit"]["no_embed_class"]


def test_a_vit_backbone_in_a_resnet_era_container_loads_as_a_vit(tmp_path):
    # The layouts that name their parts (here backbone/projector, as a VICReg-style module saves them) hand
    # a ViT backbone to the ViT builder: the dispatch is on the backbone's keys, not on the format.
    vit = _vit_state(width=48, depth=2, patch=8, grid=4, seed=19)
    projector = _moco_mlp(2, 48, 32, 16)
    torch.save({**{f"backbone.{k}": v for k, v in vit.items()},
                **{f"projector.{k}": v for k, v in projector.state_dict().items()}}, tmp_path / "model.pth")
    model = _load(tmp_path / "model.pth", num_heads=3)
    x = _images(32)
    with torch.no_grad():
        h = _reference_h(vit, x, heads=3, mean_std=CIFAR10)
        _close(model(x)["z"], projector(h))
    assert model.info.format == "backbone-projector" and model.info.arch == "vit_w48_d2_patch8"


# ----------------------------------------------------------------------------- other input sizes, tokens


def test_position_embeddings_are_resampled_for_other_input_sizes(tmp_path):
    state = _vit_state(width=48, depth=2, patch=8, grid=4, seed=12)
    torch.save(state, tmp_path / "vit.pth")
    model = _load(tmp_path / "vit.pth", num_heads=3)
    assert model.info.extra["vit"]["img_size"] == 32
    for size in (48, 16, 24):  # 6x6, 2x2 and 3x3 patches instead of the trained 4x4
        x = _images(size)
        with torch.no_grad():
            _close(model.embed(x), _reference_h(state, x, heads=3, mean_std=CIFAR10))
    # the trained embeddings stay as they were: no resampling at the trained size
    assert torch.equal(model.backbone.pos_embed, state["pos_embed"])
    with pytest.raises(ValueError, match=r"multiples of 8, got 30 x 30.*--resize-to"):
        model.embed(_images(30))


def test_patch_tokens_are_the_normalised_tokens_of_the_chosen_block(tmp_path):
    state = _vit_state(width=48, depth=2, patch=8, grid=4, seed=13)
    torch.save(state, tmp_path / "vit.pth")
    model = _load(tmp_path / "vit.pth", num_heads=3)
    x = _images(32)
    with torch.no_grad():
        tokens = model.backbone.patch_tokens(model.normalize_pixels(x))
        reference = _layer_norm(_reference_tokens(state, _normalize(x, CIFAR10), heads=3), state, "norm")[:, 1:]
        assert tokens.shape == (2, 48, 4, 4)
        _close(tokens.flatten(2).transpose(1, 2), reference)
        first = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
        reference = _layer_norm(_reference_tokens(first, _normalize(x, CIFAR10), heads=3), state, "norm")[:, 1:]
        _close(model.backbone.patch_tokens(model.normalize_pixels(x), block=0).flatten(2).transpose(1, 2), reference)
    with pytest.raises(ValueError, match="block 2 does not exist: this ViT has 2 blocks"):
        model.backbone.patch_tokens(x, block=2)


def test_random_init_control_resets_position_embeddings_and_class_token(tmp_path):
    state = _vit_state(width=48, depth=2, patch=8, grid=4, seed=14)
    torch.save(state, tmp_path / "vit.pth")
    control = randomly_initialised(_load(tmp_path / "vit.pth", num_heads=3), seed=3)
    again = randomly_initialised(_load(tmp_path / "vit.pth", num_heads=3), seed=3)
    for name in ("pos_embed", "cls_token", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"):
        assert not torch.allclose(control.backbone.state_dict()[name], state[name])
        assert torch.equal(control.backbone.state_dict()[name], again.backbone.state_dict()[name])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_analyses_run_on_a_vit_with_crops_through_the_network(tmp_path):
    from ssl_patch_analysis.convergence import convergence_curve
    from ssl_patch_analysis.extract import crop_patches, extract_patch_embeddings
    from ssl_patch_analysis.patches import grid

    vit = _vit_state(width=48, depth=2, patch=8, grid=4, seed=15)
    head = _dino_head(48, 16).state_dict()
    teacher = {**{f"backbone.{k}": v for k, v in vit.items()}, **{f"head.{k}": v for k, v in head.items()}}
    torch.save({"teacher": teacher,
                "student": {}, "args": argparse.Namespace(arch="vit_tiny")}, tmp_path / "checkpoint.pth")
    model = _load(tmp_path / "checkpoint.pth")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = extract_patch_embeddings(model, images, grid(16, 8), dtype="float32", progress=False, device="cpu",
                                      amp=False, num_workers=0)
    assert result.h.shape == (4, 9, 48) and result.z.shape == (4, 9, 100)
    crops = crop_patches(images.float() / 255, torch.as_tensor(result.boxes), 32)  # 16 px boxes, fed at 32 px
    with torch.no_grad():
        _close(torch.from_numpy(result.h).reshape(-1, 48), model.embed(crops))
        _close(torch.from_numpy(result.z).reshape(-1, 100), model(crops)["z"])
    curve = convergence_curve(model, images, patch_sizes=[16], n_values=[1, "all"], stride=8, num_images=4,
                              draws=2, device="cpu")
    assert curve is not None


# ----------------------------------------------------------------------------- names


def test_vit_names_point_at_the_published_files():
    fb = "https://dl.fbaipublicfiles.com"
    expected = {
        "dino-vits16": f"{fb}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
        "dino-vits8": f"{fb}/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
        "dino-vitb16": f"{fb}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        "dino-vitb8": f"{fb}/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
        "dino-vits16-full": f"{fb}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain_full_checkpoint.pth",
        "mocov3-vits": f"{fb}/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
        "mocov3-vitb": f"{fb}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
        "mae-vitb16": f"{fb}/mae/pretrain/mae_pretrain_vit_base.pth",
        "mae-vitb16-finetuned": f"{fb}/mae/finetune/mae_finetuned_vit_base.pth",
    }
    for name, url in expected.items():
        assert weights.NAMED_WEIGHTS[name].url == url, name


def test_vit_name_resolves_to_the_cache_and_downloads_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError, match="download=True") as err:
        _load("dino-vits16")
    assert weights.NAMED_WEIGHTS["dino-vits16"].url in str(err.value)
    # A file already in the cache (as a finished download leaves it) is used without any download.
    cached = weights.hub_checkpoint_path("dino-vits16")
    assert cached == tmp_path / "torch_home" / "hub" / "checkpoints" / "dino-vits16--dino_deitsmall16_pretrain.pth"
    cached.parent.mkdir(parents=True)
    state = _vit_state(width=48, depth=2, patch=8, grid=4, seed=17)
    torch.save(state, cached)
    model = _load("dino-vits16", num_heads=3)
    assert (model.info.method, model.info.extra["name"], model.info.source) == ("dino", "dino-vits16", str(cached))
    x = _images(32)
    with torch.no_grad():
        _close(model.embed(x), _reference_h(state, x, heads=3, mean_std=CIFAR10))


# ----------------------------------------------------------------------------- bad input


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_foreign_and_damaged_vit_checkpoints_are_named_in_one_line(tmp_path):
    good = _vit_state(width=48, depth=2, patch=8, grid=4, seed=18)

    def save(state, name="bad.pth"):
        torch.save(state, tmp_path / name)
        return tmp_path / name

    state = dict(good, pos_embed=torch.zeros(1, 20, 48))  # 19 patches: no square grid
    with pytest.raises(ValueError, match="pos_embed holds 20 tokens: not a square grid") as err:
        _load(save(state))
    _one_line(err)

    state = {k: v for k, v in good.items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(ValueError, match=r"1 missing \(blocks\.1\.mlp\.fc2\.weight\)") as err:
        _load(save(state))
    _one_line(err)

    state = dict(good, **{"blocks.0.attn.qkv.weight": torch.zeros(96, 48)})
    with pytest.raises(ValueError, match=r"mis-shaped \(blocks\.0\.attn\.qkv\.weight \(file \(96, 48\), "
                                         r"model \(144, 48\)\)\)") as err:
        _load(save(state))
    _one_line(err)

    state = dict(good, **{"blocks.0.attn.q_bias": torch.zeros(48)})  # a BEiT-style block
    with pytest.raises(ValueError, match=r"1 unexpected \(blocks\.0\.attn\.q_bias\)"):
        _load(save(state))

    conv_stem = {k: v for k, v in good.items() if not k.startswith("patch_embed.")}
    conv_stem.update({"patch_embed.proj.0.weight": torch.zeros(6, 3, 3, 3),
                      "patch_embed.proj.1.running_mean": torch.zeros(6)})
    with pytest.raises(ValueError, match=r"convolutional stem .*vit_conv") as err:
        _load(save(conv_stem))
    _one_line(err)

    state = dict(good)
    state["blocks.1.attn.proj.weight"] = state["blocks.1.attn.proj.weight"].clone()
    state["blocks.1.attn.proj.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"tensor backbone\.blocks\.1\.attn\.proj\.weight holds 1 non-finite"):
        _load(save(state))

    path = save(good, "good.pth")
    with pytest.raises(ValueError, match="cannot have 5 attention heads") as err:
        _load(path, num_heads=5)
    _one_line(err)
    with pytest.raises(ValueError, match="holds a Vision Transformer: arch applies to ResNets only") as err:
        _load(path, arch="resnet50")
    _one_line(err)
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        _load(path, num_heads=0)

    data = path.read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        _load(tmp_path / "half.pth")

    swin_like = {"patch_embed.proj.weight": torch.zeros(48, 3, 4, 4),
                 "layers.0.blocks.0.attn.qkv.weight": torch.zeros(144, 48)}
    with pytest.raises(ValueError, match="unknown checkpoint layout") as err:
        _load(save(swin_like))
    assert "vit (" in str(err.value) and "mocov3 (" in str(err.value)


def test_num_heads_is_refused_for_a_resnet(tmp_path):
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match="num_heads applies to Vision Transformers only"):
        _load(tmp_path / "resnet18.pth", num_heads=6)


def test_num_heads_flag_reaches_the_loader_and_changes_the_attention(tmp_path, capsys):
    from ssl_patch_analysis import checkpoints

    state = _vit_state(width=192, depth=2, patch=8, grid=4, seed=1)
    torch.save(state, tmp_path / "vit.pth")
    checkpoints.main(["--model", str(tmp_path / "vit.pth"), "--num-heads", "6"])
    assert "depth 2, 6 heads)" in capsys.readouterr().out
    model = _load(tmp_path / "vit.pth", num_heads=6)
    assert model.info.extra["vit"]["num_heads"] == 6
    x = _images(32)
    with torch.no_grad():  # the same weights split into 6 heads: the reference with 6 heads, not with 3
        _close(model.embed(x), _reference_h(state, x, heads=6, mean_std=CIFAR10))
        assert not torch.allclose(model.embed(x), _reference_h(state, x, heads=3, mean_std=CIFAR10), atol=1e-3)
