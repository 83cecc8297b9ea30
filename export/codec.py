"""Torch reference of the Higgs Audio V2 tokenizer (codec), spec codec.md: the model and `load_codec`.

`HiggsCodec.decode` (§3) and `HiggsCodec.encode` (§4) reproduce upstream numerics. This file holds
the acoustic path (DAC encoder and decoder, residual VQ) and the codec that joins it to the
semantic branch (export/codec_semantic.py); widths come from export/codec_config.py and weights
from export/codec_checkpoint.py, as export/llm.py, config.py and checkpoint.py split the LLM. The
modules hold no shape-dependent Python control flow so export/onnx_codec.py can export them; the
one data-dependent encode decision (§4.4) is made on the host by `engines.codec.EncodeGeometry`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engines.codec import EncodePlan

from .codec_checkpoint import canonical_state, read_checkpoint
from .codec_config import CodecConfig, infer_config
from .codec_semantic import Hubert, SemanticEncoder, SincResample


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


def load_codec(path: str | Path, dtype: torch.dtype = torch.float32) -> HiggsCodec:
    """Load a codec directory (original or transformers layout, detected) strictly, in eval mode."""
    ckpt = read_checkpoint(Path(path))
    model = HiggsCodec(infer_config(ckpt.config, ckpt.tensor_shapes()))
    model.load_state_dict(canonical_state(ckpt, model), strict=True)
    return model.to(dtype).eval()
