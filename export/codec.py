"""Torch reference of the Higgs Audio V2 tokenizer (codec), spec codec.md.

`load_codec` reads the original layout (`config.json` + `model.pth`, old-API weight norm) or the
transformers layout (`model.safetensors`, keys renamed, §2.2) strictly, folds weight norm at load
(§3.3) and builds every width from tensor shapes (never from class defaults, §1.3 Trap).
`HiggsCodec.decode` (§3) and `HiggsCodec.encode` (§4) reproduce upstream numerics. The modules hold
no shape-dependent Python control flow so export/onnx_codec.py can export them; the one
data-dependent encode decision (§4.4) is made on the host by `engines.codec.EncodeGeometry`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engines.codec import HUBERT_BASE_CONVS, EncodeGeometry, EncodePlan

ORIGINAL = "original"
TRANSFORMERS = "transformers"
HF_MODEL_TYPE = "higgs_audio_v2_tokenizer"
HUBERT_TEACHERS = ("hubert_base", "hubert_base_general")
POS_CONV = "semantic_model.encoder.pos_conv_embed.conv"  # weight norm with dim=2 (§3.3)

# Tensors only training uses (§5): accepted by name and dropped. `inited` is checked first.
TRAINING_ONLY = [
    re.compile(p)
    for p in (
        r"decoder_semantic\.",
        r"fc_post1\.",
        r"quantizer\.vq\.layers\.\d+\._codebook\.(cluster_size|embed_avg|inited)$",
        r"semantic_model\.masked_spec_embed$",
    )
]
WN_SUFFIXES = {  # storage forms of a weight-normed `<module>.weight`: (gain key, direction key)
    "old": (".weight_g", ".weight_v"),
    "param": (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
}


class CodecCheckpointError(ValueError):
    """A codec checkpoint that does not match the architecture it declares."""


# ----------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True)
class HubertConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    conv_dims: tuple[int, ...]
    conv_kernels: tuple[int, ...]
    conv_strides: tuple[int, ...]
    conv_bias: bool
    pos_kernel: int
    pos_groups: int
    layer_norm_eps: float


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    ratios: tuple[int, ...]
    sample_rate: int
    semantic_sample_rate: int
    latent_dim: int  # D: acoustic latent channels
    codebook_dim: int
    codebook_size: int
    num_quantizers: int
    encoder_channels: int  # DAC encoder base width (real 64)
    decoder_channels: int  # DAC decoder base width (real 1024)
    semantic_dim: int  # encoder_semantic width (real 768)
    semantic_blocks: int
    semantic_dilations: tuple[int, ...]
    semantic_kernel: int
    semantic_unit_kernel: int
    hubert: HubertConfig

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    @property
    def quantizer_dim(self) -> int:
        return self.latent_dim + self.semantic_dim

    @property
    def semantic_downsample(self) -> int:
        """HAT:107: int(hop / (sr / semantic_sr) / 320), 320 being HuBERT's total stride."""
        hubert_stride = math.prod(self.hubert.conv_strides)
        return int(self.hop_length / (self.sample_rate / self.semantic_sample_rate) / hubert_stride)

    @property
    def geometry(self) -> EncodeGeometry:
        return EncodeGeometry(
            ratios=self.ratios,
            sample_rate=self.sample_rate,
            semantic_sample_rate=self.semantic_sample_rate,
            semantic_convs=tuple(zip(self.hubert.conv_kernels, self.hubert.conv_strides)),
            semantic_downsample=self.semantic_downsample,
        )


# ----------------------------------------------------------------------------------------------
# modules


class Snake(nn.Module):
    """Snake1d (LAY:18-33) as x + inv_alpha * sin(alpha x)^2, inv_alpha = 1/(alpha + 1e-9) precomputed."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))
        self.register_buffer("inv_alpha", torch.ones(1, channels, 1), persistent=False)
        self.register_load_state_dict_post_hook(Snake._refresh)

    @staticmethod
    def _refresh(module: "Snake", _incompatible) -> None:
        with torch.no_grad():
            module.inv_alpha = (module.alpha + 1e-9).reciprocal()

    def forward(self, x):
        return x + self.inv_alpha * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    """DAC ResidualUnit (DAC:24-40); its crop is always 0 and is dropped (§6.1)."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake(channels),
            nn.Conv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation),
            Snake(channels),
            nn.Conv1d(channels, channels, 1),
        )

    def forward(self, x):
        return x + self.block(x)


class _EncoderBlock(nn.Module):
    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            ResidualUnit(channels, 1),
            ResidualUnit(channels, 3),
            ResidualUnit(channels, 9),
            Snake(channels),
            nn.Conv1d(channels, 2 * channels, 2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        )

    def forward(self, x):
        return self.block(x)


class DacEncoder(nn.Module):
    """DAC.Encoder(channels, ratios, latent) (DAC:43-91): (B, 1, N) -> (B, latent, Ta)."""

    def __init__(self, channels: int, ratios: tuple[int, ...], latent: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(1, channels, 7, padding=3)]
        for s in ratios:
            layers.append(_EncoderBlock(channels, s))
            channels *= 2
        layers += [Snake(channels), nn.Conv1d(channels, latent, 3, padding=1)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return self.block(x)


class _DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake(c_in),
            nn.ConvTranspose1d(
                c_in, c_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2), output_padding=stride % 2
            ),
            ResidualUnit(c_out, 1),
            ResidualUnit(c_out, 3),
            ResidualUnit(c_out, 9),
        )

    def forward(self, x):
        return self.block(x)


class DacDecoder(nn.Module):
    """DAC.Decoder(latent, channels, ratios) without tanh (DAC:116-149): (B, latent, T) -> (B, 1, hop T)."""

    def __init__(self, latent: int, channels: int, ratios: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(latent, channels, 7, padding=3)]
        for i, s in enumerate(ratios):
            layers.append(_DecoderBlock(channels // 2**i, channels // 2 ** (i + 1), s))
        out = channels // 2 ** len(ratios)
        layers += [Snake(out), nn.Conv1d(out, 1, 7, padding=3)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


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


class _Codebook(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("embed", torch.zeros(size, dim))


class _VQLayer(nn.Module):
    def __init__(self, dim: int, codebook_dim: int, size: int):
        super().__init__()
        self.project_in = nn.Linear(dim, codebook_dim)
        self.project_out = nn.Linear(codebook_dim, dim)
        self._codebook = _Codebook(size, codebook_dim)


class _VQLayers(nn.Module):
    def __init__(self, n: int, dim: int, codebook_dim: int, size: int):
        super().__init__()
        self.layers = nn.ModuleList(_VQLayer(dim, codebook_dim, size) for _ in range(n))


class ResidualVQ(nn.Module):
    """ResidualVectorQuantizer in eval mode (VQ, CVQ): plain squared-Euclidean nearest neighbour."""

    def __init__(self, n: int, dim: int, codebook_dim: int, size: int):
        super().__init__()
        self.vq = _VQLayers(n, dim, codebook_dim, size)

    def dequantize(self, codes):  # (B, n, T) -> (B, T, dim): sum of the first n layers (CVQ:419-425)
        out = torch.tensor(0.0, dtype=self.vq.layers[0].project_out.weight.dtype)
        for q in range(codes.shape[1]):
            layer = self.vq.layers[q]
            out = out + layer.project_out(F.embedding(codes[:, q], layer._codebook.embed))
        return out

    def encode(self, x):  # (B, dim, T) -> (B, n_q, T), residual kept in the `dim` space (CVQ:387-405)
        residual = x.transpose(1, 2)
        codes = []
        for layer in self.vq.layers:
            h = layer.project_in(residual)
            embed = layer._codebook.embed.t()
            dist = -(h.pow(2).sum(-1, keepdim=True) - 2 * h @ embed + embed.pow(2).sum(0, keepdim=True))
            index = dist.argmax(-1)
            residual = residual - layer.project_out(F.embedding(index, layer._codebook.embed))
            codes.append(index)
        return torch.stack(codes, dim=1)


@dataclasses.dataclass
class EncodeResult:
    """Codes plus the intermediates the goldens check (all for batch row 0)."""

    codes: torch.Tensor  # (n_q, T) int64
    sem_features: torch.Tensor  # (hubert hidden, Ts): averaged, stepped-down HuBERT states
    acoustic: torch.Tensor  # (D, Ta): DAC encoder output used, before truncation
    prior: torch.Tensor  # (D + semantic_dim, T): fc_prior output (RVQ input)
    plan: EncodePlan


class HiggsCodec(nn.Module):
    """HiggsAudioTokenizer at inference: decode (codes -> 24 kHz) and encode (24 kHz -> codes)."""

    def __init__(self, config: CodecConfig):
        super().__init__()
        c = self.config = config
        self.encoder = DacEncoder(c.encoder_channels, c.ratios, c.latent_dim)
        self.decoder_2 = DacDecoder(c.latent_dim, c.decoder_channels, c.ratios)
        self.semantic_model = Hubert(c.hubert)
        self.encoder_semantic = SemanticEncoder(c.hubert.hidden_size, c)
        self.quantizer = ResidualVQ(c.num_quantizers, c.quantizer_dim, c.codebook_dim, c.codebook_size)
        self.fc_prior = nn.Linear(c.quantizer_dim, c.quantizer_dim)
        self.fc_post2 = nn.Linear(c.quantizer_dim, c.latent_dim)
        self.resample = SincResample(c.sample_rate, c.semantic_sample_rate)
        self.semantic_pad = c.geometry.semantic_pad

    # decode (§3) ----------------------------------------------------------------------------

    def latent(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, n, T) -> decoder_2 input (B, D, T): RVQ sum over layers 0..n-1, then fc_post2."""
        n, size = codes.shape[1], self.config.codebook_size
        if not 1 <= n <= self.config.num_quantizers:
            raise ValueError(f"codes have {n} codebook rows; this codec has {self.config.num_quantizers}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= size):
            raise ValueError(
                f"codes must lie in [0, {size - 1}]: undo the delay pattern, drop the BOS/EOS columns "
                f"({size}/{size + 1}) and clip before decoding (spec codec.md §3.1)"
            )
        return self.fc_post2(self.quantizer.dequantize(codes)).transpose(1, 2)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, n, T) int64 -> (B, 1, 960 T) float, unclipped (no tanh)."""
        return self.decoder_2(self.latent(codes))

    # encode (§4) ----------------------------------------------------------------------------

    def semantic_features(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, N) at 24 kHz -> (B, H, Ts): resample, pad 160, HuBERT mean of states, step-down."""
        x = F.pad(self.resample(wave), (self.semantic_pad, self.semantic_pad))
        return self.semantic_model(x)[:, :: self.config.semantic_downsample].transpose(1, 2)

    def encode_parts(self, wave: torch.Tensor, acoustic_wave: torch.Tensor):
        """Both branches, fusion and RVQ for (B, N) `wave` and the host-padded (B, N') `acoustic_wave`.

        Returns (codes (B, n_q, T), sem_features, acoustic, prior). The truncation to the shorter
        branch is a symbolic min, so the graph stays static; with the host plan both are equal.
        """
        sem_features = self.semantic_features(wave)
        semantic = self.encoder_semantic(sem_features)
        acoustic = self.encoder(acoustic_wave[:, None])
        t = torch.sym_min(acoustic.shape[-1], semantic.shape[-1])
        fused = torch.cat([acoustic[:, :, :t], semantic[:, :, :t]], dim=1)  # [acoustic; semantic] (§4.5)
        prior = self.fc_prior(fused.transpose(1, 2)).transpose(1, 2)
        return self.quantizer.encode(prior), sem_features, acoustic, prior

    def encode_detailed(self, wave: torch.Tensor) -> EncodeResult:
        """Upstream `encode(wave, sr=24000)` for a 1-D 24 kHz waveform, with intermediates."""
        if wave.ndim != 1:
            raise ValueError(
                f"encode expects a mono 1-D waveform at {self.config.sample_rate} Hz, got {tuple(wave.shape)}"
            )
        plan = self.config.geometry.plan(wave.shape[0])
        wave = wave.to(self.fc_prior.weight.dtype)
        acoustic_wave = F.pad(wave, (plan.acoustic_pad, plan.acoustic_pad))
        codes, sem, acoustic, prior = self.encode_parts(wave[None], acoustic_wave[None])
        return EncodeResult(codes[0], sem[0], acoustic[0], prior[0], plan)

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """(N,) 24 kHz mono, N >= 632 -> (n_q, T) int64 codes."""
        return self.encode_detailed(wave).codes


# ----------------------------------------------------------------------------------------------
# checkpoint layouts


def _hf_rules(n_blocks: int) -> list[tuple[str, str, dict[str, int]]]:
    """(transformers prefix, original prefix, {field: original - transformers}) per §2.2."""
    last = {"snake1": n_blocks + 1, "conv2": n_blocks + 2}
    ru = ("snake1", "conv1", "snake2", "conv2")
    rules = [("acoustic_encoder.conv1.", "encoder.block.0.", {}), ("acoustic_decoder.conv1.", "decoder_2.model.0.", {})]
    for name, index in last.items():
        rules.append((f"acoustic_encoder.{name}.", f"encoder.block.{index}.", {}))
        rules.append((f"acoustic_decoder.{name}.", f"decoder_2.model.{index}.", {}))
    for j, name in enumerate(ru):
        hf, orig = f"block.{{b}}.res_unit{{r}}.{name}.", f"{{b}}.block.{{r}}.block.{j}."
        rules.append((f"acoustic_encoder.{hf}", f"encoder.block.{orig}", {"b": 1, "r": -1}))
        rules.append((f"acoustic_decoder.{hf}", f"decoder_2.model.{orig}", {"b": 1, "r": 1}))
    rules += [
        ("acoustic_encoder.block.{b}.snake1.", "encoder.block.{b}.block.3.", {"b": 1}),
        ("acoustic_encoder.block.{b}.conv1.", "encoder.block.{b}.block.4.", {"b": 1}),
        ("acoustic_decoder.block.{b}.snake1.", "decoder_2.model.{b}.block.0.", {"b": 1}),
        ("acoustic_decoder.block.{b}.conv_t1.", "decoder_2.model.{b}.block.1.", {"b": 1}),
        ("quantizer.quantizers.{i}.codebook.", "quantizer.vq.layers.{i}._codebook.", {}),
        ("quantizer.quantizers.{i}.", "quantizer.vq.layers.{i}.", {}),
        ("fc.", "fc_prior.", {}),
        ("fc1.", "fc_post1.", {}),
        ("fc2.", "fc_post2.", {}),
        ("encoder_semantic.conv.", "encoder_semantic.conv.conv.", {}),
        ("encoder_semantic.conv_blocks.{b}.conv.", "encoder_semantic.conv_blocks.{b}.conv.conv.", {}),
        (
            "encoder_semantic.conv_blocks.{b}.res_units.{r}.conv1.",
            "encoder_semantic.conv_blocks.{b}.res_units.{r}.conv1.conv.",
            {},
        ),
    ]
    return rules


def _rename(key: str, rules, to_original: bool) -> str:
    """Apply the first matching prefix rule (either direction); keys no rule covers pass unchanged."""
    for hf, orig, offsets in rules:
        src, dst = (hf, orig) if to_original else (orig, hf)
        pattern = re.escape(src).replace(r"\{", "{").replace(r"\}", "}")
        m = re.match(re.sub(r"\{(\w+)\}", r"(?P<\1>\\d+)", pattern), key)
        if m:
            sign = 1 if to_original else -1
            values = {k: int(v) + sign * offsets.get(k, 0) for k, v in m.groupdict().items()}
            return dst.format(**values) + key[m.end() :]
    return key


@dataclasses.dataclass
class _Checkpoint:
    """A checkpoint's tensors under their file names, with the name mapping of its layout."""

    layout: str
    file: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    rules: list

    def file_name(self, canonical: str) -> str:
        return _rename(canonical, self.rules, to_original=False) if self.layout == TRANSFORMERS else canonical

    def canonical_name(self, file_key: str) -> str:
        """Original-layout name of a file key with any weight-norm storage suffix collapsed to `.weight`."""
        name = _rename(file_key, self.rules, to_original=True) if self.layout == TRANSFORMERS else file_key
        for gain, direction in WN_SUFFIXES.values():
            for suffix in (gain, direction):
                if name.endswith(suffix):
                    return name[: -len(suffix)] + ".weight"
        return name

    def is_training_only(self, file_key: str) -> bool:
        name = self.canonical_name(file_key)
        return any(p.match(name) for p in TRAINING_ONLY)


def _read_checkpoint(path: Path) -> _Checkpoint:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CodecCheckpointError(
            f"{path}: no config.json; expected a codec directory (config.json + model.pth or model.safetensors)"
        )
    config = json.loads(config_file.read_text())
    if config.get("model_type") == HF_MODEL_TYPE:
        file = path / "model.safetensors"
        if not file.is_file():
            raise CodecCheckpointError(f"{path}: config.json says {HF_MODEL_TYPE!r} but model.safetensors is missing")
        from safetensors.torch import load_file

        tensors = load_file(str(file))
        n_blocks = len(config["acoustic_model_config"]["downsampling_ratios"])
        return _Checkpoint(TRANSFORMERS, file, config, tensors, _hf_rules(n_blocks))
    if "model_type" in config:
        raise CodecCheckpointError(f"{config_file}: model_type {config['model_type']!r} is not this codec")
    file = path / "model.pth"
    if not file.is_file():
        raise CodecCheckpointError(f"{path}: original-layout config.json but no model.pth next to it")
    tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return _Checkpoint(ORIGINAL, file, config, tensors, [])


# ----------------------------------------------------------------------------------------------
# config from the file + tensor shapes


class _Shapes:
    """Canonical name -> shape of the (folded) tensor, for width inference with named errors."""

    def __init__(self, ckpt: _Checkpoint):
        self.ckpt = ckpt
        self.shapes: dict[str, tuple[int, ...]] = {}
        for key, tensor in ckpt.tensors.items():
            is_gain = any(key.endswith(gain) for gain, _ in WN_SUFFIXES.values())
            if not is_gain:  # the direction tensor v has the folded weight's shape
                self.shapes[ckpt.canonical_name(key)] = tuple(tensor.shape)

    def __call__(self, name: str, dim: int) -> int:
        if name not in self.shapes:
            raise CodecCheckpointError(
                f"{self.ckpt.file}: missing tensor {self.ckpt.file_name(name)!r} (needed to infer the codec widths)"
            )
        return self.shapes[name][dim]

    def count(self, prefix: str) -> int:
        """Number of consecutive indices i with some tensor under `prefix{i}.`."""
        n = 0
        while any(k.startswith(f"{prefix}{n}.") for k in self.shapes):
            n += 1
        return n


def _declared(config: dict, file: Path) -> tuple[dict, dict]:
    """Architecture facts the config states: (codec fields, HuBERT config dict)."""
    if config.get("model_type") == HF_MODEL_TYPE:
        ac = config["acoustic_model_config"]
        if list(ac["downsampling_ratios"]) != list(ac["upsampling_ratios"]):
            raise CodecCheckpointError(f"{file}: different encoder/decoder ratios are not supported")
        if any(s != 1 for s in config.get("strides", [1, 1])):
            raise CodecCheckpointError(f"{file}: semantic encoder strides {config['strides']} unsupported")
        frame_rate = math.ceil(config["sample_rate"] / math.prod(ac["downsampling_ratios"]))
        n_q = int(1000 * config["target_bandwidths"][-1] // (frame_rate * math.log2(config["codebook_size"])))
        fields = {
            "ratios": tuple(ac["downsampling_ratios"]),
            "sample_rate": config["sample_rate"],
            "semantic_sample_rate": config.get("semantic_sample_rate", 16000),
            "latent_dim": ac["hidden_size"],
            "codebook_dim": config["codebook_dim"],
            "codebook_size": config["codebook_size"],
            "num_quantizers": n_q,
            "encoder_channels": ac["encoder_hidden_size"],
            "decoder_channels": ac["decoder_hidden_size"],
            "semantic_dilations": tuple(config.get("block_dilations", (1, 1))),
        }
        return fields, config.get("semantic_model_config", {})
    if config.get("semantic_techer") not in HUBERT_TEACHERS:
        raise CodecCheckpointError(
            f"{file}: semantic_techer {config.get('semantic_techer')!r} unsupported (need one of {HUBERT_TEACHERS})"
        )
    if not isinstance(config.get("bins"), int):
        raise CodecCheckpointError(f"{file}: bins {config.get('bins')!r} selects the unsupported ResidualFSQ branch")
    if config.get("downsample_mode", "step_down") != "step_down" or config.get("vq_scale", 1) != 1:
        raise CodecCheckpointError(f"{file}: only downsample_mode 'step_down' and vq_scale 1 are supported")
    overrides = config.get("_tiny_overrides", {})
    fields = {
        "ratios": tuple(config["ratios"]),
        "sample_rate": config["sample_rate"],
        "semantic_sample_rate": config.get("semantic_sample_rate") or 16000,
        "latent_dim": config["D"],
        "codebook_size": config["bins"],
        "num_quantizers": config["n_q"],
        "semantic_dilations": (1, 1),
    }
    if config.get("codebook_dim") is not None:
        fields["codebook_dim"] = config["codebook_dim"]
    for key in ("encoder_channels", "decoder_channels", "semantic_dim"):
        if key in overrides:
            fields[key] = overrides[key]
    return fields, overrides.get("semantic_model_config", {})


def _hubert_config(s: _Shapes, declared: dict, file: Path) -> HubertConfig:
    p = "semantic_model."
    if declared.get("do_stable_layer_norm", False) or declared.get("feat_extract_norm", "group") != "group":
        raise CodecCheckpointError(f"{file}: only the post-LN HuBERT with group-norm feature extractor is supported")
    if declared.get("conv_pos_batch_norm", False) or not declared.get("feat_proj_layer_norm", True):
        raise CodecCheckpointError(
            f"{file}: HuBERT with conv_pos_batch_norm or without feat_proj_layer_norm is unsupported"
        )
    n_conv = s.count(f"{p}feature_extractor.conv_layers.")
    hidden = s(f"{p}feature_projection.projection.weight", 0)
    if "num_attention_heads" in declared:
        heads = declared["num_attention_heads"]
    elif hidden == 768:
        heads = 12  # HuBERT base
    else:
        raise CodecCheckpointError(
            f"{file}: cannot infer the HuBERT head count from tensor shapes (hidden {hidden}); state it as "
            "semantic_model_config.num_attention_heads (in `_tiny_overrides` for the original layout)"
        )
    strides = tuple(declared.get("conv_stride", [st for _, st in HUBERT_BASE_CONVS]))
    if len(strides) != n_conv:
        raise CodecCheckpointError(f"{file}: {n_conv} HuBERT feature convs but {len(strides)} conv strides declared")
    pos = f"{p}encoder.pos_conv_embed.conv.weight"
    config = HubertConfig(
        hidden_size=hidden,
        num_layers=s.count(f"{p}encoder.layers."),
        num_heads=heads,
        intermediate_size=s(f"{p}encoder.layers.0.feed_forward.intermediate_dense.weight", 0),
        conv_dims=tuple(s(f"{p}feature_extractor.conv_layers.{i}.conv.weight", 0) for i in range(n_conv)),
        conv_kernels=tuple(s(f"{p}feature_extractor.conv_layers.{i}.conv.weight", 2) for i in range(n_conv)),
        conv_strides=strides,
        conv_bias=bool(declared.get("conv_bias", False)),
        pos_kernel=s(pos, 2),
        pos_groups=hidden // s(pos, 1),
        layer_norm_eps=float(declared.get("layer_norm_eps", 1e-5)),
    )
    from_tensors = {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "intermediate_size": config.intermediate_size,
        "conv_dim": list(config.conv_dims),
        "conv_kernel": list(config.conv_kernels),
        "num_conv_pos_embeddings": config.pos_kernel,
        "num_conv_pos_embedding_groups": config.pos_groups,
    }
    for key, value in from_tensors.items():
        if key in declared and declared[key] != value:
            raise CodecCheckpointError(
                f"{file}: HuBERT {key} is {declared[key]} in the config but {value} in the tensors; "
                "the config and weights are from different codecs"
            )
    return config


def _infer_config(ckpt: _Checkpoint) -> CodecConfig:
    """Widths from tensor shapes, cross-checked against whatever the config states."""
    s = _Shapes(ckpt)
    declared, hubert_declared = _declared(ckpt.config, ckpt.file)
    if declared["sample_rate"] == declared["semantic_sample_rate"]:
        raise CodecCheckpointError(f"{ckpt.file}: sample_rate == semantic_sample_rate is unsupported")
    hubert = _hubert_config(s, hubert_declared, ckpt.file)
    inferred = {
        "latent_dim": s("fc_post2.weight", 0),
        "codebook_dim": s("quantizer.vq.layers.0._codebook.embed", 1),
        "codebook_size": s("quantizer.vq.layers.0._codebook.embed", 0),
        "num_quantizers": s.count("quantizer.vq.layers."),
        "encoder_channels": s("encoder.block.0.weight", 0),
        "decoder_channels": s("decoder_2.model.0.weight", 0),
        "semantic_dim": s("encoder_semantic.conv.conv.weight", 0),
    }
    for field, value in inferred.items():
        if field in declared and declared[field] != value:
            raise CodecCheckpointError(
                f"{ckpt.file}: config says {field} = {declared[field]} but the tensors give {value}; "
                "the config and weights are from different codecs"
            )
    if s("fc_post2.weight", 1) != inferred["latent_dim"] + inferred["semantic_dim"]:
        raise CodecCheckpointError(
            f"{ckpt.file}: {ckpt.file_name('fc_post2.weight')} has {s('fc_post2.weight', 1)} inputs, expected "
            f"D + semantic dim = {inferred['latent_dim'] + inferred['semantic_dim']}"
        )
    blocks = s.count("encoder_semantic.conv_blocks.")
    return CodecConfig(
        ratios=declared["ratios"],
        sample_rate=declared["sample_rate"],
        semantic_sample_rate=declared["semantic_sample_rate"],
        semantic_blocks=blocks,
        semantic_dilations=declared["semantic_dilations"],
        semantic_kernel=s("encoder_semantic.conv.conv.weight", 2),
        semantic_unit_kernel=s("encoder_semantic.conv_blocks.0.res_units.0.conv1.conv.weight", 2),
        hubert=hubert,
        **inferred,
    )


# ----------------------------------------------------------------------------------------------
# strict load


def weight_norm_dim(module: str) -> int:
    """Weight-norm axis: 0 everywhere (ConvTranspose: that is the INPUT channel), 2 for HuBERT's pos conv."""
    return 2 if module == POS_CONV else 0


def stored_weight_normed(name: str, ndim: int) -> bool:
    """Whether upstream saves this weight weight-normed: DAC WNConv1d / WNConvTranspose1d, HuBERT pos conv."""
    if not name.endswith(".weight"):
        return False
    return name[: -len(".weight")] == POS_CONV or (ndim == 3 and name.startswith(("encoder.block.", "decoder_2.")))


def weight_norm_gain_shape(weight_shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    return tuple(n if i == dim else 1 for i, n in enumerate(weight_shape))


def _expected_file_keys(ckpt: _Checkpoint, model: HiggsCodec) -> dict[str, tuple[tuple[int, ...], str, str | None]]:
    """file key -> (shape, canonical name, role) for every tensor the model needs.

    A weight may be stored plain or weight-normed (old API `weight_g/weight_v` or parametrizations
    `original0/original1`); the form present in the file is the one expected, the layout's usual
    form when the tensor is absent (so a missing tensor is named as it would be written).
    """
    expected = {}
    for name, tensor in model.state_dict().items():
        shape, file_key = tuple(tensor.shape), ckpt.file_name(name)
        module = name[: -len(".weight")]
        if not stored_weight_normed(name, tensor.ndim) or file_key in ckpt.tensors:
            expected[file_key] = (shape, name, None)
            continue
        base = file_key[: -len(".weight")]
        forms = {form: (base + g, base + v) for form, (g, v) in WN_SUFFIXES.items()}
        present = [form for form, keys in forms.items() if any(k in ckpt.tensors for k in keys)]
        if present:
            form = present[0]
        elif module == POS_CONV or ckpt.layout == ORIGINAL:
            form = "param" if module == POS_CONV else "old"
        else:  # transformers layout stores DAC convs folded
            expected[file_key] = (shape, name, None)
            continue
        gain, direction = forms[form]
        expected[gain] = (weight_norm_gain_shape(shape, weight_norm_dim(module)), name, "gain")
        expected[direction] = (shape, name, "direction")
    return expected


def _canonical_state(ckpt: _Checkpoint, model: HiggsCodec) -> dict[str, torch.Tensor]:
    """Strictly matched, weight-norm-folded state dict for `model`, or a CodecCheckpointError naming every problem."""
    expected = _expected_file_keys(ckpt, model)
    problems = [f"missing tensor {k!r} (shape {list(v[0])})" for k, v in expected.items() if k not in ckpt.tensors]
    for key, tensor in ckpt.tensors.items():
        if key in expected:
            if tuple(tensor.shape) != expected[key][0]:
                problems.append(f"tensor {key!r} has shape {list(tensor.shape)}, expected {list(expected[key][0])}")
        elif not ckpt.is_training_only(key):
            problems.append(f"unexpected tensor {key!r}")
    if problems:
        listing = "\n  ".join(problems[:25]) + (f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else "")
        raise CodecCheckpointError(
            f"{ckpt.file} ({ckpt.layout} layout) does not match the codec its config and tensor shapes describe:\n  "
            f"{listing}\nUse an unmodified checkpoint; widths are inferred from fc_post2, decoder_2.model.0, "
            "encoder.block.0, encoder_semantic and the RVQ codebooks."
        )
    for key, tensor in ckpt.tensors.items():
        if ckpt.canonical_name(key).endswith("_codebook.inited") and not bool((tensor == 1).all()):
            raise CodecCheckpointError(
                f"{ckpt.file}: {key!r} is {tensor.tolist()}, not 1: upstream would run k-means on the input "
                "(CVQ:178-198); this RVQ was never trained"
            )
    state: dict[str, torch.Tensor] = {}
    gains: dict[str, torch.Tensor] = {}
    for key, (_, name, role) in expected.items():
        tensor = ckpt.tensors[key].to(torch.float32)
        if role == "gain":
            gains[name] = tensor
        else:
            state[name] = tensor
    for name, g in gains.items():
        # torch._weight_norm is the op upstream's hooks and parametrizations call: bit-equal folding.
        state[name] = torch._weight_norm(state[name], g, weight_norm_dim(name[: -len(".weight")]))
    return state


def load_codec(path: str | Path, dtype: torch.dtype = torch.float32) -> HiggsCodec:
    """Load a codec directory (original or transformers layout, detected) strictly, in eval mode."""
    ckpt = _read_checkpoint(Path(path))
    model = HiggsCodec(_infer_config(ckpt))
    model.load_state_dict(_canonical_state(ckpt, model), strict=True)
    return model.to(dtype).eval()
