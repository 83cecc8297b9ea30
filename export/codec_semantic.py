"""The codec's semantic branch (encode only, spec codec.md §4.2): 24 kHz -> 16 kHz resampling,
the HuBERT teacher, and the semantic encoder that turns its averaged states into codec features.

`Hubert` is transformers' `HubertModel` (post-LN base layout) cut down to what the codec reads, the
mean of all hidden states; parameter names match the checkpoint's `semantic_model.*` keys.
`SincResample` is torchaudio's default resampler as a fixed conv, so the graph needs no torchaudio.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .codec_config import CodecConfig, HubertConfig


class SincResample(nn.Module):
    """`torchaudio.functional.resample` defaults (sinc_interp_hann, width 6, rolloff 0.99) as a conv."""

    def __init__(self, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6, rolloff: float = 0.99):
        super().__init__()
        g = math.gcd(orig_freq, new_freq)
        self.orig, self.new = orig_freq // g, new_freq // g
        base = min(self.orig, self.new) * rolloff
        self.width = math.ceil(lowpass_filter_width * self.orig / base)
        # Same float32 op sequence as torchaudio's _get_sinc_resample_kernel, for bit-equal taps.
        idx = torch.arange(-self.width, self.width + self.orig, dtype=torch.float32)[None, None] / self.orig
        t = torch.arange(0, -self.new, -1, dtype=torch.float32)[:, None, None] / self.new + idx
        t *= base
        t = t.clamp_(-lowpass_filter_width, lowpass_filter_width)
        window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
        t *= math.pi
        kernel = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
        kernel *= window * (base / self.orig)
        self.register_buffer("kernel", kernel, persistent=False)  # (new, 1, taps)

    def forward(self, x):  # (B, N) -> (B, ceil(new N / orig))
        n = x.shape[-1]
        y = F.conv1d(F.pad(x, (self.width, self.width + self.orig))[:, None], self.kernel, stride=self.orig)
        y = y.transpose(1, 2).reshape(x.shape[0], -1)
        return y[:, : (self.new * n + self.orig - 1) // self.orig]


class _HubertConvLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool, group_norm: bool):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.layer_norm = nn.GroupNorm(c_out, c_out, eps=1e-5, affine=True) if group_norm else nn.Identity()

    def forward(self, x):
        return F.gelu(self.layer_norm(self.conv(x)))


class _HubertFeatureExtractor(nn.Module):
    def __init__(self, c: HubertConfig):
        super().__init__()
        dims = (1, *c.conv_dims)
        self.conv_layers = nn.ModuleList(
            _HubertConvLayer(dims[i], dims[i + 1], c.conv_kernels[i], c.conv_strides[i], c.conv_bias, i == 0)
            for i in range(len(c.conv_dims))
        )

    def forward(self, x):
        for layer in self.conv_layers:
            x = layer(x)
        return x


class _HubertFeatureProjection(nn.Module):
    def __init__(self, c: HubertConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c.conv_dims[-1], eps=c.layer_norm_eps)
        self.projection = nn.Linear(c.conv_dims[-1], c.hidden_size)

    def forward(self, x):
        return self.projection(self.layer_norm(x))


class _HubertPosConv(nn.Module):
    def __init__(self, c: HubertConfig):
        super().__init__()
        self.conv = nn.Conv1d(
            c.hidden_size, c.hidden_size, c.pos_kernel, padding=c.pos_kernel // 2, groups=c.pos_groups
        )
        self.remove = 1 if c.pos_kernel % 2 == 0 else 0  # HubertSamePadLayer

    def forward(self, x):  # (B, K, H)
        y = self.conv(x.transpose(1, 2))
        y = y[:, :, : y.shape[-1] - self.remove]
        return F.gelu(y).transpose(1, 2)


class _HubertAttention(nn.Module):
    def __init__(self, c: HubertConfig):
        super().__init__()
        self.heads = c.num_heads
        self.scale = (c.hidden_size // c.num_heads) ** -0.5
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x):  # (B, K, H), no mask
        b, k, h = x.shape
        split = lambda t: t.reshape(b, k, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        q, key, v = split(self.q_proj(x) * self.scale), split(self.k_proj(x)), split(self.v_proj(x))
        y = torch.softmax(q @ key.transpose(-1, -2), dim=-1) @ v
        return self.out_proj(y.transpose(1, 2).reshape(b, k, h))


class _HubertFeedForward(nn.Module):
    def __init__(self, c: HubertConfig):
        super().__init__()
        self.intermediate_dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.output_dense = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class _HubertLayer(nn.Module):
    """Post-LN encoder layer (`do_stable_layer_norm=False`)."""

    def __init__(self, c: HubertConfig):
        super().__init__()
        self.attention = _HubertAttention(c)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.feed_forward = _HubertFeedForward(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x):
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class _HubertEncoder(nn.Module):
    def __init__(self, c: HubertConfig):
        super().__init__()
        self.pos_conv_embed = _HubertPosConv(c)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(_HubertLayer(c) for _ in range(c.num_layers))


class Hubert(nn.Module):
    """transformers `HubertModel` (post-LN base layout) in eval mode, returning the mean of all
    `num_layers + 1` hidden states (HAT:174-178), the only thing the codec uses."""

    def __init__(self, c: HubertConfig):
        super().__init__()
        self.feature_extractor = _HubertFeatureExtractor(c)
        self.feature_projection = _HubertFeatureProjection(c)
        self.encoder = _HubertEncoder(c)

    def forward(self, wave):  # (B, L) -> (B, K, H)
        h = self.feature_projection(self.feature_extractor(wave[:, None]).transpose(1, 2))
        h = self.encoder.layer_norm(h + self.encoder.pos_conv_embed(h))
        states = [h]
        for layer in self.encoder.layers:
            h = layer(h)
            states.append(h)
        return torch.stack(states, dim=1).mean(1)


class _SemConv(nn.Module):
    """SEM `Conv1d` wrapper (weights under `.conv.`), padding (k - 1) // 2 * dilation."""

    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int = 1, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, padding=(kernel - 1) // 2 * dilation, dilation=dilation, bias=bias)

    def forward(self, x):
        return self.conv(x)


class _SemResidualUnit(nn.Module):
    def __init__(self, channels: int, kernel: int, dilation: int):
        super().__init__()
        self.conv1 = _SemConv(channels, channels, kernel, dilation, bias=False)
        self.conv2 = nn.Conv1d(channels, channels, 1, bias=False)  # Conv1d1x1: no `.conv.` wrapper

    def forward(self, x):
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class _SemBlock(nn.Module):
    def __init__(self, channels: int, unit_kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.res_units = nn.ModuleList(_SemResidualUnit(channels, unit_kernel, d) for d in dilations)
        self.conv = _SemConv(channels, channels, 3)  # stride 1 -> kernel 3

    def forward(self, x):
        for unit in self.res_units:
            x = unit(x)
        return self.conv(x)


class SemanticEncoder(nn.Module):
    """SEM.Encoder (SEM:150-190) with stride 1 everywhere: keeps the frame count."""

    def __init__(self, c_in: int, c: CodecConfig):
        super().__init__()
        self.conv = _SemConv(c_in, c.semantic_dim, c.semantic_kernel, bias=False)
        self.conv_blocks = nn.ModuleList(
            _SemBlock(c.semantic_dim, c.semantic_unit_kernel, c.semantic_dilations) for _ in range(c.semantic_blocks)
        )

    def forward(self, x):
        x = self.conv(x)
        for block in self.conv_blocks:
            x = block(x)
        return x
