"""Higgs Audio V2 generation backbone: a Llama-3 decoder whose every layer has two FFNs (DualFFN).

One model file, explicit KV cache in and out (gpt-fast style), written to be exported to ONNX:

* text and audio positions share one causal attention and one KV cache; the input norm, the
  post-attention norm and the FFN of each position are picked by the routing mask (spec llm.md §3.2);
* an audio position's input is the sum of one embedding row per codebook, row `k*stride + code_k`,
  stride = codebook_size + 2 (§3.1); the audio head predicts (num_codebooks, stride) logits (§3.4);
* `forward` runs in one of three modes: MIXED (prompt prefill, routing mask as input), TEXT and AUDIO
  (every position of that one kind). TEXT never touches audio weights and AUDIO never touches text
  weights, so each exported graph reads only what it needs.

The KV cache is a static per-slot buffer (batch, kv_heads, max_len, head_dim) per layer. New K/V are
written at `cache_lengths[b]`; attention reads the buffer with the mask `key <= position`. In eager
mode the write is in place; for export it is the functional `higgs::kv_write` op, which becomes ONNX
`TensorScatter` (in place once the runtime binds present to past). What the layers of one call share
(mode and routing mask, rotary tables, attention mask, cache offsets) travels as one `StepContext`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_state_dict
from .config import HiggsConfig, RopeConfig, load_config

KV = tuple[torch.Tensor, torch.Tensor]


class Mode(enum.Enum):
    MIXED = "mixed"
    TEXT = "text"
    AUDIO = "audio"


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What every layer of one forward call shares, built once in `hidden_states` (gpt-fast passes
    `input_pos` and `mask` to its blocks the same way). B rows, T new positions, S = cache length."""

    mode: Mode
    audio_mask: torch.Tensor | None  # (B, T) bool, MIXED only: True at audio positions (routing)
    cos: torch.Tensor  # (B, 1, T, head_dim) rotary tables of the new positions
    sin: torch.Tensor
    mask: torch.Tensor  # (B, 1, T, S) bool: key_index <= position
    cache_lengths: torch.Tensor  # (B,) int64: where the new K/V are written
    kv_length: torch.Tensor  # (B,) int64: cache_lengths + T, valid keys per row
    functional: bool  # write the cache with `kv_write` (export) instead of in place (eager)


# --- the two ops that have a dedicated ONNX form -------------------------------------------------


@torch.library.custom_op("higgs::kv_write", mutates_args=())
def kv_write(cache: torch.Tensor, update: torch.Tensor, write_index: torch.Tensor) -> torch.Tensor:
    """Functional KV write: cache with update[b] placed at sequence offset write_index[b] (axis 2)."""
    out = cache.clone()
    _scatter_kv_(out, update, write_index)
    return out


@kv_write.register_fake
def _(cache, update, write_index):
    return torch.empty_like(cache)


@torch.library.custom_op("higgs::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, kv_length: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention over the cache; query head h uses KV head h // (heads / kv_heads).

    `mask` (B, 1, T, S) is True where a key takes part; `kv_length` (B,) = valid keys per row (the
    ONNX graph passes it on as `nonpad_kv_seqlen` so kernels may skip the unused tail). `q` comes
    pre-scaled by 1/sqrt(head_dim), so the product is not scaled again (scale=1): TensorRT's ONNX
    importer applies an Attention `scale` as sqrt(scale) on Q *and* K (onnx-tensorrt
    importerUtils.cpp `scaleQKTensor`), and K here is the whole (B, Hkv, max_len, D) cache.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=1.0)


@attention.register_fake
def _(q, k, v, mask, kv_length):
    return torch.empty_like(q)


def _scatter_kv_(cache: torch.Tensor, update: torch.Tensor, write_index: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = update.shape
    index = (write_index[:, None] + torch.arange(length, device=update.device))[:, None, :, None]
    return cache.scatter_(2, index.expand(batch, heads, length, dim), update)


# --- building blocks --------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, cast back, then the weight (transformers 4.46 LlamaRMSNorm order)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """transformers 4.46 `_compute_default/llama3_parameters`, float32 like upstream."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if rope.rope_type != "llama3":
        return inv_freq
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: HiggsConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_scale = config.head_dim**-0.5  # softmax scale, applied to Q (see `attention`)
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: StepContext, past: KV) -> tuple[torch.Tensor, KV]:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = (q * ctx.cos + rotate_half(q) * ctx.sin) * self.q_scale
        k = k * ctx.cos + rotate_half(k) * ctx.sin
        write = kv_write if ctx.functional else _scatter_kv_
        present = (write(past[0], k, ctx.cache_lengths), write(past[1], v, ctx.cache_lengths))
        out = attention(q, present[0], present[1], ctx.mask, ctx.kv_length)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), present


class DecoderLayer(nn.Module):
    """One DualFFN layer: shared attention, text or audio norms + FFN per position (spec §3.2)."""

    def __init__(self, config: HiggsConfig):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = MLP(h, config.intermediate_size)
        self.audio_mlp = MLP(h, config.intermediate_size)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.audio_input_layernorm = RMSNorm(h, eps)
        self.audio_post_attention_layernorm = RMSNorm(h, eps)

    @staticmethod
    def _route(ctx: StepContext, x, text_fn, audio_fn):
        if ctx.mode is Mode.TEXT:
            return text_fn(x)
        if ctx.mode is Mode.AUDIO:
            return audio_fn(x)
        return torch.where(ctx.audio_mask[..., None], audio_fn(x), text_fn(x))

    def forward(self, x: torch.Tensor, ctx: StepContext, past: KV) -> tuple[torch.Tensor, KV]:
        normed = self._route(ctx, x, self.input_layernorm, self.audio_input_layernorm)
        attn_out, present = self.self_attn(normed, ctx, past)
        h = x + attn_out
        ffn = self._route(
            ctx,
            h,
            lambda t: self.mlp(self.post_attention_layernorm(t)),
            lambda t: self.audio_mlp(self.audio_post_attention_layernorm(t)),
        )
        return h + ffn, present


class AudioDecoderProjector(nn.Module):
    """Holds the two output heads under their checkpoint names (`audio_decoder_proj.*`)."""

    def __init__(self, config: HiggsConfig):
        super().__init__()
        self.text_lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.audio_lm_head = nn.Linear(config.hidden_size, config.num_codebooks * config.codebook_stride, bias=False)


class HiggsAudioBackbone(nn.Module):
    def __init__(self, config: HiggsConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.audio_codebook_embeddings = nn.Embedding(config.num_codebooks * config.codebook_stride, config.hidden_size)
        self.audio_decoder_proj = AudioDecoderProjector(config)
        # plain attributes, not buffers: they are constants of the architecture, not checkpoint state
        self.inv_freq = rope_inv_freq(config.rope, config.head_dim)
        self.codebook_offsets = torch.arange(config.num_codebooks, device="cpu") * config.codebook_stride
        # eager: in-place cache writes; export wrappers switch to the functional kv_write op
        self.functional_cache = False

    # -- inputs ------------------------------------------------------------------------------------
    def embed_audio(self, audio_codes: torch.Tensor) -> torch.Tensor:
        """(B, T, N) codes -> (B, T, H): sum over codebooks of row k*stride + code_k."""
        rows = audio_codes + self.codebook_offsets.to(audio_codes.device)
        return self.audio_codebook_embeddings(rows).sum(dim=-2)

    def embed(self, mode: Mode, input_ids, audio_codes, audio_mask) -> torch.Tensor:
        if mode is Mode.TEXT:
            return self.embed_tokens(input_ids)
        if mode is Mode.AUDIO:
            return self.embed_audio(audio_codes)
        return torch.where(audio_mask[..., None], self.embed_audio(audio_codes), self.embed_tokens(input_ids))

    # -- body --------------------------------------------------------------------------------------
    def hidden_states(
        self,
        mode: Mode,
        input_ids: torch.Tensor | None,
        audio_codes: torch.Tensor | None,
        audio_mask: torch.Tensor | None,
        cache_lengths: torch.Tensor,
        past: list[KV],
    ) -> tuple[torch.Tensor, list[KV]]:
        """Final-norm hidden states of the T new positions (B, T, H) and the updated caches."""
        x = self.embed(mode, input_ids, audio_codes, audio_mask)
        ctx = self._step_context(mode, audio_mask, cache_lengths, x, max_len=past[0][0].shape[2])
        present = []
        for layer, layer_past in zip(self.layers, past):
            x, layer_present = layer(x, ctx, layer_past)
            present.append(layer_present)
        return self.norm(x), present

    def _step_context(self, mode: Mode, audio_mask, cache_lengths, x: torch.Tensor, max_len: int) -> StepContext:
        """Rotary tables, attention mask and cache offsets of the T new positions of `x` (B, T, H)."""
        length = x.shape[1]
        positions = cache_lengths[:, None] + torch.arange(length, device=x.device)  # (B, T)
        angles = positions[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, head_dim)
        return StepContext(
            mode=mode,
            audio_mask=audio_mask,
            cos=emb.cos().to(x.dtype),
            sin=emb.sin().to(x.dtype),
            mask=(torch.arange(max_len, device=x.device) <= positions[..., None])[:, None],  # (B, 1, T, S)
            cache_lengths=cache_lengths,
            kv_length=cache_lengths + length,
            functional=self.functional_cache,
        )

    def text_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.audio_decoder_proj.text_lm_head(hidden).float()

    def audio_head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.audio_decoder_proj.audio_lm_head(hidden).float()
        return logits.view(*hidden.shape[:-1], self.config.num_codebooks, self.config.codebook_stride)

    def forward(self, mode, input_ids, audio_codes, audio_mask, cache_lengths, last_index, past):
        """Logits at position `last_index[b]` of the new tokens: (text (B, V) | None, audio (B, N, C+2) | None, present)."""
        hidden, present = self.hidden_states(mode, input_ids, audio_codes, audio_mask, cache_lengths, past)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
        text = None if mode is Mode.AUDIO else self.text_head(last)
        audio = None if mode is Mode.TEXT else self.audio_head(last)
        return text, audio, present

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> list[KV]:
        dtype = dtype or self.embed_tokens.weight.dtype
        shape = (batch, self.config.num_kv_heads, max_len, self.config.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in self.layers]


def load_backbone(
    checkpoint_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> HiggsAudioBackbone:
    """Build the module on the meta device and assign the checkpoint's tensors (no double allocation)."""
    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        model = HiggsAudioBackbone(config)
    state = load_state_dict(checkpoint_dir, config, dtype, progress)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
