"""ONNX graphs of the codec: `codec_decoder.onnx` and `codec_encoder.onnx` (spec codec.md §6).

Both are float32 (ConvTranspose is unstable in bf16, §3.3) and exported with the dynamo exporter.
Weight norm is already folded by `load_codec`. The decoder folds RVQ de-quantisation and fc_post2
into one lookup table per codebook (§6.1), and its DAC decoder is exported in a faster form of the
same function (`decoder_graph`: 4-D convolutions, Snake's alpha folded into the neighbouring convs)
that decodes a streaming window's context only as far as its kept frames reach (`FoldedDecoder`).
The encoder takes the waveform twice, the acoustic copy already padded by the host
(`engines.codec.EncodeGeometry.plan`), so the graph has no data-dependent branch. Each graph carries
its geometry as ONNX metadata for engines/codec.py.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from onnxscript import ir
from torch import nn

from engines.codec import METADATA_KEY, decoder_context_frames, decoder_reach
from export.codec import DacDecoder, HiggsCodec, ResidualUnit, Snake


_CONVS = (nn.Conv1d, nn.ConvTranspose1d)
# Folding drops (1 - alpha * inv_alpha) x from Snake (see `decoder_graph`): done where that is within
# float32's resolution of x, i.e. whenever |alpha| is above ~0.017 (inv_alpha = 1 / (alpha + 1e-9)).
_FOLD_TOLERANCE = 2.0**-23


def _foldable(module: nn.Module | None) -> bool:
    if not isinstance(module, Snake):
        return False
    product = module.alpha.detach().double() * module.inv_alpha.double()
    return bool((product - 1).abs().max() <= _FOLD_TOLERANCE)


def _conv_4d(conv: nn.Module, in_scale: torch.Tensor | None, out_scale: torch.Tensor | None) -> nn.Module:
    """The Conv1d / ConvTranspose1d as its 4-D twin on (B, C, 1, T), with the weight scaled per input
    channel by `in_scale` and weight and bias per output channel by `out_scale` (float64, rounded once)."""
    transposed = isinstance(conv, nn.ConvTranspose1d)
    weight, bias = conv.weight.detach().double(), conv.bias.detach().double()
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    for scale, dim in ((in_scale, in_dim), (out_scale, out_dim)):
        if scale is not None:
            shape = [1, 1, 1]
            shape[dim] = -1
            weight = weight * scale.detach().double().reshape(shape)
    if out_scale is not None:
        bias = bias * out_scale.detach().double().flatten()
    (k,), (stride,), (pad,), (dilation,) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if transposed:
        twin = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, (1, k), (1, stride), (0, pad), (0, conv.output_padding[0]))
    else:
        twin = nn.Conv2d(conv.in_channels, conv.out_channels, (1, k), (1, stride), (0, pad), (1, dilation))
    twin.weight = nn.Parameter(weight[:, :, None].float(), requires_grad=False)
    twin.bias = nn.Parameter(bias.float(), requires_grad=False)
    return twin


class _Scale(nn.Module):
    """x * alpha per channel: the part of a folded Snake that its producer cannot absorb."""

    def __init__(self, alpha: torch.Tensor):
        super().__init__()
        self.register_buffer("alpha", alpha.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, x):
        return x * self.alpha


class _SnakeCore(nn.Module):
    """z + sin(z)^2, which is alpha * Snake(x) for z = alpha x: Snake without its per-channel constants."""

    def forward(self, z):
        s = torch.sin(z)
        return z + s * s  # s * s, not pow: ONNX Runtime's Pow costs ~2x a Mul


class _Snake4d(nn.Module):
    """Snake on (B, C, 1, T), unfolded: for an alpha too small to fold exactly."""

    def __init__(self, snake: Snake):
        super().__init__()
        self.register_buffer("alpha", snake.alpha.detach()[..., None].clone())
        self.register_buffer("inv_alpha", snake.inv_alpha.detach()[..., None].clone())

    def forward(self, x):
        s = torch.sin(self.alpha * x)
        return x + self.inv_alpha * (s * s)


class _Residual(nn.Module):
    def __init__(self, block: list[nn.Module]):
        super().__init__()
        self.block = nn.Sequential(*block)

    def forward(self, x):
        return x + self.block(x)


def _graph_chain(modules: list[nn.Module]) -> list[list[nn.Module]]:
    """4-D twins of a chain of DAC decoder modules (each feeds only the next) with Snakes folded:
    for each module, what replaces it.

    Snake(x) = x + inv_alpha sin^2(alpha x) = inv_alpha (z + sin^2 z) with z = alpha x, up to the
    dropped (1 - alpha inv_alpha) x (`_foldable`). Every Snake feeds a conv, which absorbs inv_alpha
    into its input channels; a Snake fed by a conv has alpha absorbed into that conv's output channels
    (weight and bias), otherwise (it reads a residual stream, used twice) alpha stays a Mul. Zero
    padding commutes with both scalings, so the edges are exact too. Per Snake that leaves Sin, Mul,
    Add (+ Mul) instead of Mul, Sin, Pow, Mul, Add: fewer passes over the largest tensors.
    """
    out: list[list[nn.Module]] = []
    in_scale = None
    for i, module in enumerate(modules):
        following = modules[i + 1] if i + 1 < len(modules) else None
        if isinstance(module, _CONVS):
            out.append([_conv_4d(module, in_scale, following.alpha if _foldable(following) else None)])
            in_scale = None
        elif _foldable(module):
            scale = [] if i > 0 and isinstance(modules[i - 1], _CONVS) else [_Scale(module.alpha)]
            out.append(scale + [_SnakeCore()])
            in_scale = module.inv_alpha
        elif isinstance(module, Snake):
            out.append([_Snake4d(module)])
        elif isinstance(module, ResidualUnit):
            out.append([_Residual([m for ms in _graph_chain(list(module.block)) for m in ms])])
        else:
            raise TypeError(f"decoder_graph does not know {type(module).__name__}")
        if in_scale is not None and not isinstance(following, _CONVS):
            raise TypeError("a folded Snake must feed a convolution")
    return out


def decoder_graph(decoder: DacDecoder) -> nn.ModuleList:
    """The DAC decoder as exported, (B, D, 1, T) -> (B, 1, 1, hop T) through its stages in turn: the
    first conv, each decoder block, the final Snake and conv. The same function computed faster.

    Convolutions are 4-D (kernel (1, k)), so ONNX Runtime's NCHWc layout transformer runs them with
    MLAS's direct NCHWc convolution instead of im2col + GEMM: it takes only Conv weights of 4
    dimensions (onnxruntime core/optimizer/nchwc_transformer.cc, `TransformConv`). Each conv keeps
    its own reorders in and out, as Snake's Sin has no NCHWc form and a Mul or Add stays NCHWc only
    when all its inputs are (`TransformBinary`). Snakes are folded into their neighbours
    (`_graph_chain`), across stage boundaries too (the first block's Snake into the first conv).
    Outputs agree with the torch reference within float32 rounding (tests/test_codec_onnx.py).
    `FoldedDecoder` trims the context between stages.
    """
    stages = [[module] if isinstance(module, _CONVS + (Snake,)) else list(module.block) for module in decoder.model]
    stages[-2:] = [stages[-2] + stages[-1]]  # the final Snake and conv
    replaced = iter(_graph_chain([m for stage in stages for m in stage]))
    return nn.ModuleList(nn.Sequential(*[m for _ in stage for m in next(replaced)]) for stage in stages)


class FoldedDecoder(nn.Module):
    """(codes (B, n_q, T), context (2,)) -> audio (B, 1, hop (T - context[0] - context[1])).

    The first context[0] and last context[1] frames of `codes` only give the others their context
    (a streaming window, engines.codec.StreamingDecoder); their audio is not computed. Between stages
    every activation is trimmed to what the kept frames reach (`engines.codec.decoder_reach`): the
    context is decoded in full only by the first conv and block, a few samples of it after that, so a
    window costs little more than its kept frames. Context (0, 0) decodes everything.

    z = b_post2 + sum_q Table_q[codes_q] equals fc_post2(sum_q project_out_q(embed_q[codes_q])) with
    Table_q = (embed_q W_out_q^T + b_out_q) W_post2^T: one Gather into a (n_q * size, D) table instead
    of 8 lookups + 8 matmuls. The tables are computed in float64 and rounded once. Codes are clipped
    to [0, size - 1] (upstream callers clip the same way, GEN:357), so a stray BOS/EOS cannot index
    out of range. The DAC decoder runs in its exported form, `decoder_graph`.
    """

    def __init__(self, codec: HiggsCodec):
        super().__init__()
        c = codec.config
        post = codec.fc_post2.weight.double().T
        tables = []
        for layer in codec.quantizer.vq.layers:
            out = layer.project_out
            tables.append((layer._codebook.embed.double() @ out.weight.double().T + out.bias.double()) @ post)
        self.register_buffer("table", torch.cat(tables).float())  # (n_q * size, D)
        self.register_buffer("bias", codec.fc_post2.bias.detach().float())
        self.register_buffer("offsets", torch.arange(c.num_quantizers)[:, None] * c.codebook_size)
        self.size = c.codebook_size
        self.ratios = c.ratios
        self.reach = decoder_reach(c.ratios)[1:]  # at each block's input
        self.stages = decoder_graph(codec.decoder_2)

    def forward(self, codes, context):
        frames = codes.shape[-1]
        left, right = context[0].item(), context[1].item()
        torch._check(left >= 0)
        torch._check(right >= 0)
        torch._check(left + right < frames)
        index = codes.clamp(0, self.size - 1) + self.offsets  # (B, n_q, T)
        z = F.embedding(index, self.table).sum(1) + self.bias  # (B, T, D)
        x = self.stages[0](z.transpose(1, 2)[:, :, None])
        start, rate = 0, 1  # the absolute sample index of x[..., 0], samples per frame
        for stage, stride, (need_left, need_right) in zip(self.stages[1:-1], self.ratios, self.reach):
            lo = torch.sym_max(0, left * rate - need_left)
            hi = torch.sym_min(frames * rate, (frames - right) * rate + need_right)
            x = stage(x[..., lo - start : hi - start])
            start, rate = lo * stride, rate * stride
        x = self.stages[-1](x)
        return x[..., left * rate - start : (frames - right) * rate - start].squeeze(2)


class EncoderGraph(nn.Module):
    """(waveform (B, N), acoustic_waveform (B, N + 2 pad)) -> codes (B, n_q, T)."""

    def __init__(self, codec: HiggsCodec):
        super().__init__()
        self.codec = codec

    def forward(self, waveform, acoustic_waveform):
        return self.codec.encode_parts(waveform, acoustic_waveform)[0]


def _io(name: str, dtype: str, shape: list) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape}


def _export(module: nn.Module, args: tuple, path: Path, names: tuple[list, list], dynamic: dict, meta: dict,
            defaults: dict[str, torch.Tensor] | None = None) -> None:
    """torch.onnx.export (dynamo) to `path` with `meta` as metadata; `defaults` become initializers of
    those inputs (ONNX input defaults), so a caller that does not feed them still runs the graph."""
    t0 = time.perf_counter()
    print(f"[codec] exporting {path.name} ...", flush=True)
    with warnings.catch_warnings():  # torch-internal deprecation noise from torch.export's pytree
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
        program = torch.onnx.export(
            module.eval(), args, dynamo=True, input_names=names[0], output_names=names[1], dynamic_shapes=dynamic
        )
    for value in program.model.graph.inputs:
        if value.name in (defaults or {}):
            value.const_value = ir.tensor(defaults[value.name].numpy(), name=value.name)
            program.model.graph.register_initializer(value)
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=False)
    size = path.stat().st_size / 2**20
    print(f"[codec] wrote {path} ({size:.1f} MiB) in {time.perf_counter() - t0:.1f}s", flush=True)


def _common(codec: HiggsCodec) -> dict:
    if codec.fc_post2.weight.dtype != torch.float32:
        raise ValueError("codec graphs are float32 (ConvTranspose is unstable in bf16): use load_codec(path)")
    c = codec.config
    return {
        "sample_rate": c.sample_rate,
        "hop_length": c.hop_length,
        "num_quantizers": c.num_quantizers,
        "codebook_size": c.codebook_size,
    }


def export_codec_decoder(codec: HiggsCodec, path: str | Path) -> dict:
    """Write the decoder graph to `path`; return its manifest entry."""
    path, c = Path(path), codec.config
    meta = {**_common(codec), "context_frames": decoder_context_frames(c.ratios)}
    batch, frames = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("frames", min=1, max=1 << 20)
    codes, context = torch.zeros(2, c.num_quantizers, 3, dtype=torch.int64), torch.tensor([1, 1])
    names = (["codes", "context"], ["audio"])
    with torch.no_grad():
        _export(FoldedDecoder(codec), (codes, context), path, names, {"codes": {0: batch, 2: frames}, "context": None}, meta,
                defaults={"context": torch.zeros(2, dtype=torch.int64)})
    return {
        "file": path.name,
        "inputs": [_io("codes", "int64", ["batch", c.num_quantizers, "frames"]),
                   {**_io("context", "int64", [2]), "default": [0, 0]}],
        "outputs": [_io("audio", "float32", ["batch", 1, f"{c.hop_length}*(frames-context[0]-context[1])"])],
        **meta,
        "codes_clipped_to": [0, c.codebook_size - 1],
    }


def export_codec_encoder(codec: HiggsCodec, path: str | Path) -> dict:
    """Write the encoder graph to `path`; return its manifest entry (the host applies `encode_geometry`)."""
    path, c = Path(path), codec.config
    geometry = c.geometry
    meta = {
        **_common(codec),
        "encode_geometry": geometry.to_dict(),
        "min_samples": geometry.min_samples(),
        "reencode_pad": geometry.reencode_pad,
    }
    samples = torch.export.Dim("samples", min=geometry.min_samples(), max=1 << 24)
    padded = torch.export.Dim("acoustic_samples", min=geometry.min_samples(), max=(1 << 24) + 2 * geometry.reencode_pad)
    n = 24300  # takes the re-encode branch: the two inputs differ in length while tracing
    plan = geometry.plan(n)
    wave = torch.zeros(1, n)
    acoustic = torch.zeros(1, n + 2 * plan.acoustic_pad)
    dynamic = {"waveform": {1: samples}, "acoustic_waveform": {1: padded}}
    with torch.no_grad():
        names = (["waveform", "acoustic_waveform"], ["codes"])
        _export(EncoderGraph(codec), (wave, acoustic), path, names, dynamic, meta)
    return {
        "file": path.name,
        "inputs": [
            _io("waveform", "float32", [1, "samples"]),
            _io("acoustic_waveform", "float32", [1, "acoustic_samples"]),
        ],
        "outputs": [_io("codes", "int64", [1, c.num_quantizers, "frames"])],
        **meta,
    }
