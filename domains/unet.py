"""One U-Net for 1-D signals and 2-D (or 3-D) grids: the denoiser shared by the dense domains.

Architecture after Ho et al. 2020 (DDPM) with the improvements of Dhariwal & Nichol 2021 (ADM):
residual blocks with GroupNorm, time (and class) conditioning by scale-and-shift
``h = norm(h) * (1 + scale) + shift`` (ADM section 3 "AdaGN"), self-attention at chosen levels
and in the bottleneck, and encoder-decoder skip connections. Down-sampling factors may differ per
level so that long audio clips reach a short bottleneck (factor 4 per level: 16,000 -> 250 in 3 steps).

Contract (see :mod:`polydiff.domain`): ``net(x [B, C, *spatial], t [B] in [0, 1], label=None)``
returns a tensor of the same shape; any spatial size is padded internally and cropped back.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polydiff.conditioning import NULL_LABEL
from polydiff.config import call_checked

from .embedding import sinusoidal_embedding

__all__ = ["UNet", "build_unet"]

#: The U-Net arguments a domain sets from its data, never the recipe.
_DATA_KEYS = ("dims", "in_channels", "num_classes")

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _groups(channels: int, max_groups: int = 32) -> int:
    """The largest GroupNorm group count <= ``max_groups`` that divides ``channels``."""
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels)


class ResBlock(nn.Module):
    """Pre-norm residual block; the embedding modulates the second norm (FiLM / AdaGN)."""

    def __init__(self, dims: int, cin: int, cout: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        conv = _CONV[dims]
        self.norm1 = _norm(cin)
        self.conv1 = conv(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(cout, cout, 3, padding=1)
        self.skip = conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # x [B, Cin, *S], emb [B, E]
        h = self.conv1(F.silu(self.norm1(x)))  # [B, Cout, *S]
        film = self.film(emb).view(*emb.shape[:1], -1, *([1] * (h.dim() - 2)))  # [B, 2*Cout, 1, ...]
        scale, shift = film.chunk(2, dim=1)  # each [B, Cout, 1, ...]
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over all flattened spatial positions, with a residual."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(
                f"UNet: num_heads={num_heads} must divide the {channels} channels of an attention level; "
                "change num_heads, channels or channel_mults"
            )
        self.heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:  # x [B, C, *S]
        b, c = x.shape[:2]
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, N, C]
        n = h.shape[1]
        qkv = self.qkv(h).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, N, D]
        h = self.out(h.transpose(1, 2).reshape(b, n, c))  # [B, N, C]
        return x + h.transpose(1, 2).reshape(x.shape)


class Downsample(nn.Module):
    """Strided convolution by ``factor``; kernel 2f-1 so every input position is seen."""

    def __init__(self, dims: int, channels: int, factor: int) -> None:
        super().__init__()
        self.conv = _CONV[dims](channels, channels, 2 * factor - 1, stride=factor, padding=factor - 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, *S] -> [B, C, *S/f]
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour repeat by ``factor`` followed by a 3-wide convolution (no checkerboard artefacts)."""

    def __init__(self, dims: int, channels: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.conv = _CONV[dims](channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, *S] -> [B, C, *S*f]
        if self.factor > 1:
            x = F.interpolate(x, scale_factor=self.factor, mode="nearest")
        return self.conv(x)


class UNet(nn.Module):
    """Diffusion U-Net over ``dims`` spatial dimensions (DDPM/ADM design, see module docstring)."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 4, 8),
        down_factors: Union[int, Sequence[int]] = 2,
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (),
        mid_attention: bool = True,
        num_heads: int = 4,
        num_classes: int = 0,
        dropout: float = 0.0,
        out_channels: Optional[int] = None,
    ) -> None:
        super().__init__()
        if dims not in _CONV:
            raise ValueError(f"UNet: dims={dims} is not supported; use 1 (signals), 2 (images) or 3 (volumes)")
        for name, value in (("in_channels", in_channels), ("channels", channels), ("num_heads", num_heads)):
            if int(value) < 1:
                raise ValueError(f"UNet: {name}={value} must be a positive integer")
        mults = [int(m) for m in channel_mults]
        if not mults or min(mults) < 1:
            raise ValueError(f"UNet: channel_mults={list(channel_mults)} must be a non-empty list of positive integers")
        levels = len(mults)
        factors = (
            [int(down_factors)] * (levels - 1) if isinstance(down_factors, int) else [int(f) for f in down_factors]
        )
        if len(factors) != levels - 1 or any(f < 1 for f in factors):
            raise ValueError(
                f"UNet: down_factors={down_factors} must be one positive integer or one per level transition "
                f"(len(channel_mults) - 1 = {levels - 1} values)"
            )
        bad = [a for a in attention_levels if not 0 <= int(a) < levels]
        if bad:
            raise ValueError(f"UNet: attention_levels {bad} out of range; levels are 0..{levels - 1} (0 = finest)")
        if num_classes < 0:
            raise ValueError(f"UNet: num_classes={num_classes} must be >= 0 (0 = unconditional)")
        self.dims, self.in_channels, self.num_classes = dims, in_channels, num_classes
        self.factors = factors
        self.total_factor = math.prod(factors)
        out_channels = in_channels if out_channels is None else out_channels
        attn = {int(a) for a in attention_levels}
        conv = _CONV[dims]
        emb_dim = 4 * channels

        self.time_dim = channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Row num_classes is the learned null embedding for unlabelled / guidance-dropped samples.
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        self.stem = conv(in_channels, channels, 3, padding=1)
        # Encoder: a flat list; skip channels recorded in order so the decoder can pop them.
        self.down = nn.ModuleList()
        skips = [channels]
        ch = channels
        for level, mult in enumerate(mults):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(dims, ch, channels * mult, emb_dim, dropout)])
                ch = channels * mult
                if level in attn:
                    block.append(Attention(ch, num_heads))
                self.down.append(block)
                skips.append(ch)
            if level < levels - 1:
                self.down.append(nn.ModuleList([Downsample(dims, ch, factors[level])]))
                skips.append(ch)

        self.mid = nn.ModuleList([ResBlock(dims, ch, ch, emb_dim, dropout)])
        if mid_attention:
            self.mid.append(Attention(ch, num_heads))
        self.mid.append(ResBlock(dims, ch, ch, emb_dim, dropout))

        # Decoder: one more block per level than the encoder, each eating one skip.
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            for i in range(num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(dims, ch + skips.pop(), channels * mults[level], emb_dim, dropout)])
                ch = channels * mults[level]
                if level in attn:
                    block.append(Attention(ch, num_heads))
                if level > 0 and i == num_res_blocks:
                    block.append(Upsample(dims, ch, factors[level - 1]))
                self.up.append(block)

        self.head = nn.Sequential(_norm(ch), nn.SiLU(), conv(ch, out_channels, 3, padding=1))
        # Zero output: the untrained net predicts 0, a stable start for eps/v/x0 objectives.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def _embed(self, t: Tensor, label: Optional[Tensor], batch: int) -> Tensor:
        emb = self.time_mlp(sinusoidal_embedding((t * 1000.0).float(), self.time_dim))  # [B, E]
        if self.label_emb is None:
            if label is not None:
                raise ValueError("UNet: got a label but num_classes=0; set model.num_classes to use labels")
            return emb
        null = torch.full((batch,), self.num_classes, dtype=torch.long, device=t.device)
        if label is None:
            idx = null
        else:
            if label.shape != (batch,) or label.is_floating_point():
                raise ValueError(
                    f"UNet: label must be an integer tensor of shape [{batch}], got {tuple(label.shape)} {label.dtype}"
                )
            if label.device.type == "cpu" and not torch.compiler.is_compiling():
                bad = (label < NULL_LABEL) | (label >= self.num_classes)
                if bad.any():
                    raise ValueError(
                        f"UNet: labels {label[bad].tolist()} out of range; use 0..{self.num_classes - 1} "
                        f"or {NULL_LABEL} for no label"
                    )
            idx = torch.where(label == NULL_LABEL, null, label.long())
        return emb + self.label_emb(idx)

    def forward(self, x: Tensor, t: Tensor, label: Optional[Tensor] = None) -> Tensor:
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet: expected x of shape [B, {self.in_channels}, {', '.join(['size'] * self.dims)}], "
                f"got {tuple(x.shape)}"
            )
        b, spatial = x.shape[0], x.shape[2:]
        if t.shape != (b,):
            raise ValueError(f"UNet: t must have shape [{b}] (one time per sample), got {tuple(t.shape)}")
        emb = self._embed(t, label, b)  # [B, E]

        # Zero-pad every spatial dim up to a multiple of the total down-sampling factor.
        f = self.total_factor
        pad = [(-s) % f for s in spatial]
        if any(pad):
            x = F.pad(x, [p for q in reversed(pad) for p in (0, q)])

        h = self.stem(x)  # [B, C0, *S]
        hs = [h]
        for block in self.down:
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for block in self.up:
            h = torch.cat([h, hs.pop()], dim=1)  # [B, C + C_skip, *S_level]
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        h = self.head(h)  # [B, C_out, *S]

        if any(pad):
            h = h[(slice(None), slice(None), *(slice(0, s) for s in spatial))]
        return h


def build_unet(dims: int, in_channels: int, num_classes: int, model: Mapping[str, Any], owner: str) -> UNet:
    """A :class:`UNet` from a recipe's ``model`` section; the ``owner`` domain sets dims, channels and classes from
    its data."""
    for key in _DATA_KEYS:
        if key in model:
            raise KeyError(f"model.{key} is set by the {owner} domain from the data; remove it from the recipe")
    return call_checked(UNet, {"dims": dims, "in_channels": in_channels, "num_classes": num_classes, **model}, "model")
