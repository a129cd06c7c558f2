"""Vision Transformer backbones (timm's implementation) for :class:`~ssl_patch_analysis.models.SSLModel`.

A ViT here is timm's ``VisionTransformer`` with its parameter names unchanged (``cls_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``): DINO, MoCo v3, MAE and timm write
the same names, so their checkpoints map onto it by prefix stripping alone, as the ResNets do.

Its output is the embedding ``h``: the class token after the final norm, or, for models that pool
the patch tokens (trained without a class token, or MAE's fine-tuned ``global_pool`` models), the
mean of the patch tokens (then ``fc_norm`` where the model has one). Position embeddings are
resampled (timm's ``dynamic_img_size``: bicubic, antialiased) for any input whose sides are multiples
of the patch size, so crops of any size run through the network.

Nothing in a state_dict says how many attention heads a ViT has; :func:`infer_vit_config` takes them
from timm's configurations (ViT-Ti 3, ViT-S 6, ViT-B 12, ViT-L/H 16, otherwise width / 64) unless
the caller knows better (MoCo v3's ViT-S has 12), and says so.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

# width -> (size name, depth, heads) of timm's standard ViTs (vit_tiny/small/base/large/huge).
VIT_SIZES: dict[int, tuple[str, int, int]] = {
    192: ("tiny", 12, 3),
    384: ("small", 12, 6),
    768: ("base", 12, 12),
    1024: ("large", 24, 16),
    1280: ("huge", 32, 16),
}


@dataclass
class ViTConfig:
    """Everything that shapes a ViT, as plain values (what :func:`infer_vit_config` reads off a state_dict).

    ``img_size`` is the input side the position embeddings were trained for (grid side x patch size).
    ``global_pool`` is ``"token"`` (h = class token after ``norm``) or ``"avg"`` (h = mean of the patch
    tokens, after ``norm`` or, with ``fc_norm``, normalised after pooling).
    """

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int = 224
    mlp_ratio: float = 4.0
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    global_pool: str = "token"
    final_norm: bool = True
    fc_norm: bool = False
    pre_norm: bool = False
    qkv_bias: bool = True
    proj_bias: bool = True
    qk_norm: bool = False
    layer_scale: bool = False

    def __post_init__(self) -> None:
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool 'token' needs a class token")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"a ViT of width {self.embed_dim} cannot have {self.num_heads} attention heads "
                             "(the width must be a multiple of the number of heads)")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of the patch size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def name(self) -> str:
        """timm's name for standard sizes (``vit_small_patch16``), else ``vit_w<width>_d<depth>_patch<p>``."""
        size = VIT_SIZES.get(self.embed_dim)
        if size is not None and size[1] == self.depth:
            return f"vit_{size[0]}_patch{self.patch_size}"
        return f"vit_w{self.embed_dim}_d{self.depth}_patch{self.patch_size}"

    @property
    def pooling(self) -> str:
        """What ``h`` is, in words (recorded in the model's info)."""
        if self.global_pool == "token":
            return "class token after the final norm" if self.final_norm else "class token (no final norm)"
        if self.fc_norm:
            return "mean of the patch tokens, then fc_norm"
        return "mean of the patch tokens after the final norm" if self.final_norm else "mean of the patch tokens"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ViT(VisionTransformer):
    """timm's ViT without a classifier: ``forward`` returns ``h`` (B x ``embedding_dim``).

    Inputs of any size whose sides are multiples of the patch size are accepted; the position
    embeddings are resampled from the trained grid for other sizes.
    """

    def __init__(self, config: ViTConfig):
        super().__init__(
            img_size=config.img_size, patch_size=config.patch_size, num_classes=0, global_pool=config.global_pool,
            embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
            qkv_bias=config.qkv_bias, proj_bias=config.proj_bias, qk_norm=config.qk_norm,
            init_values=1e-5 if config.layer_scale else None, class_token=config.class_token,
            reg_tokens=config.reg_tokens, no_embed_class=config.no_embed_class, pre_norm=config.pre_norm,
            final_norm=config.final_norm, fc_norm=config.fc_norm, dynamic_img_size=True,
        )
        self.config = config
        self.embedding_dim = config.embed_dim

    def reset_parameters(self) -> None:
        """timm's initialisation of every weight, position embeddings and class token included (used by
        :func:`~ssl_patch_analysis.models.randomly_initialised`, which resets modules one by one)."""
        self.init_weights(mode="", needs_reset=True)

    def _check_input(self, x: torch.Tensor) -> None:
        height, width = x.shape[-2:]
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"a ViT with {p} px patches needs inputs whose sides are multiples of {p}, got "
                             f"{height} x {width}: resize to e.g. {max(p, round(height / p) * p)} px "
                             "(--resize-to on the command line)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self._check_input(x)
        return super().forward(x)

    def block_index(self, block: int | None = None) -> int:
        """``block`` as an index in ``0 .. depth - 1`` (None: the last block; negative counts from the end)."""
        depth = len(self.blocks)
        index = depth - 1 if block is None else int(block)
        if not -depth <= index < depth:
            raise ValueError(f"block {block} does not exist: this ViT has {depth} blocks (0 to {depth - 1})")
        return index % depth

    def patch_tokens(self, x: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """The patch tokens of block ``block`` (default: the last), after the final norm where the model has one
        (as DINO's ``get_intermediate_layers``), as a B x D x grid_h x grid_w map; prefix tokens are left out."""
        return self.embed_tokens(x, block)[1]

    def embed_tokens(self, x: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, tokens)`` of one forward pass stopped after block ``block`` (default: the last).

        Every token of that block goes through the final norm (``norm``, as DINO's
        ``get_intermediate_layers`` does for any block); ``tokens`` are the patch tokens as a
        B x D x grid_h x grid_w map (prefix tokens left out) and ``h`` (B x D) is the model's pooling of
        the same sequence (the class token, or the mean of the patch tokens then ``fc_norm``): for the
        last block exactly :meth:`forward`'s output.
        """
        self._check_input(x)
        index = self.block_index(block)
        grid_h, grid_w = self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        t = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for layer in self.blocks[:index + 1]:
            t = layer(t)
        t = self.norm(t)
        h = self.forward_head(t, pre_logits=True)
        tokens = t[:, self.num_prefix_tokens:].reshape(len(t), grid_h, grid_w, -1).permute(0, 3, 1, 2)
        return h, tokens


def build_vit(config: ViTConfig) -> tuple[ViT, int]:
    """Build a ViT from its configuration; returns ``(model, embedding_dim)`` like ``build_backbone``."""
    model = ViT(config)
    return model, model.embedding_dim


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side > 0 and side * side == n else None


def infer_vit_config(state: Mapping[str, torch.Tensor], num_heads: int | None = None,
                     heads_source: str | None = None) -> tuple[ViTConfig, list[str]]:
    """``(config, assumed)`` of a ViT state_dict in timm names, from tensor shapes alone.

    Patch size from the ``patch_embed`` kernel, width from its channels, depth from the ``blocks.N``
    indices, the trained input side from the ``pos_embed`` length, the MLP ratio from ``fc1``, class
    and register tokens, layer scale, qk-norm and the pooling from which tensors exist. ``num_heads``
    (not visible in weights) is taken from ``num_heads`` if given (``heads_source`` says where it came
    from), else from timm's configurations; ``assumed`` says so.
    """
    if "patch_embed.proj.0.weight" in state or "patch_embed.proj.1.running_mean" in state:
        raise ValueError("this ViT has a convolutional stem (patch_embed.proj is a stack of layers, as in MoCo v3's "
                         "vit_conv_*): only the standard patch embedding (one strided convolution) is supported")
    proj = state.get("patch_embed.proj.weight")
    pos = state.get("pos_embed")
    if proj is None or proj.ndim != 4 or pos is None or pos.ndim != 3:
        raise ValueError("cannot read the ViT's shape: expected a 4-D 'patch_embed.proj.weight' and a 3-D 'pos_embed' "
                         f"(found {', '.join(list(state)[:6]) or 'nothing'})")
    width, channels, patch_h, patch_w = proj.shape
    if patch_h != patch_w or channels != 3:
        raise ValueError(f"unsupported patch embedding {tuple(proj.shape)}: square patches of 3-channel images only")
    if pos.shape[-1] != width:
        raise ValueError(f"pos_embed has width {pos.shape[-1]} but the patch embedding {width}: the file is damaged "
                         "or not one ViT")
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise ValueError("cannot read the ViT's depth: no 'blocks.<N>.' keys")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is None or fc1.ndim != 2:
        raise ValueError("cannot read the ViT's MLP width: no 2-D 'blocks.0.mlp.fc1.weight'")
    hidden = int(fc1.shape[0])
    mlp_ratio = hidden / width
    if int(width * mlp_ratio) != hidden:  # timm builds int(width * ratio) hidden units
        mlp_ratio = (hidden + 0.5) / width

    class_token = "cls_token" in state
    reg = state.get("reg_token")
    reg_tokens = int(reg.shape[1]) if reg is not None else 0
    prefix = int(class_token) + reg_tokens
    tokens = int(pos.shape[1])
    no_embed_class = False
    grid = _square_side(tokens - prefix)
    if grid is None and prefix:
        grid, no_embed_class = _square_side(tokens), True
    if grid is None:
        raise ValueError(f"pos_embed holds {tokens} tokens: not a square grid of patches (plus {prefix} class/register "
                         "token(s)); only square position-embedding grids are supported")

    has_norm, has_fc_norm = "norm.weight" in state, "fc_norm.weight" in state
    global_pool = "token" if class_token and not has_fc_norm else "avg"

    if num_heads is None:
        size = VIT_SIZES.get(int(width))
        num_heads = size[2] if size is not None else max(1, int(width) // 64)
        heads_source = f"timm's vit_{size[0]} configuration" if size is not None else "width / 64, timm's head width"
    heads = f"{num_heads} attention head{'s' if num_heads != 1 else ''}"
    assumed = [f"{heads} ({heads_source}; not visible in the weights)"] if heads_source else []
    config = ViTConfig(
        patch_size=int(patch_h), embed_dim=int(width), depth=depth, num_heads=int(num_heads),
        img_size=grid * int(patch_h), mlp_ratio=mlp_ratio, class_token=class_token, reg_tokens=reg_tokens,
        no_embed_class=no_embed_class, global_pool=global_pool, final_norm=has_norm or has_fc_norm,
        fc_norm=has_fc_norm, pre_norm="norm_pre.weight" in state,
        qkv_bias="blocks.0.attn.qkv.bias" in state, proj_bias="blocks.0.attn.proj.bias" in state,
        qk_norm="blocks.0.attn.q_norm.weight" in state, layer_scale="blocks.0.ls1.gamma" in state,
    )
    return config, assumed


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.vit says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
