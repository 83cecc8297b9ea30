"""ONNX graphs of the codec: `codec_decoder.onnx` and `codec_encoder.onnx` (spec codec.md §6).

Both are float32 (ConvTranspose is unstable in bf16, §3.3) and exported with the dynamo exporter.
Weight norm is already folded by `load_codec`. The decoder folds RVQ de-quantisation and fc_post2
into one lookup table per codebook (§6.1). The encoder takes the waveform twice, the acoustic copy
already padded by the host (`engines.codec.EncodeGeometry.plan`), so the graph has no
data-dependent branch. Each graph carries its geometry as ONNX metadata for engines/codec.py.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engines.codec import METADATA_KEY, decoder_context_frames
from export.codec import HiggsCodec


class FoldedDecoder(nn.Module):
    """codes (B, n_q, T) -> audio (B, 1, hop T) with Table_q = (embed_q W_out_q^T + b_out_q) W_post2^T.

    z = b_post2 + sum_q Table_q[codes_q] equals fc_post2(sum_q project_out_q(embed_q[codes_q])):
    one Gather into a (n_q * size, D) table instead of 8 lookups + 8 matmuls. The tables are
    computed in float64 and rounded once. Codes are clipped to [0, size - 1] (upstream callers clip
    the same way, GEN:357), so a stray BOS/EOS cannot index out of range.
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
        self.decoder = codec.decoder_2

    def forward(self, codes):
        index = codes.clamp(0, self.size - 1) + self.offsets  # (B, n_q, T)
        z = F.embedding(index, self.table).sum(1) + self.bias  # (B, T, D)
        return self.decoder(z.transpose(1, 2))


class EncoderGraph(nn.Module):
    """(waveform (B, N), acoustic_waveform (B, N + 2 pad)) -> codes (B, n_q, T)."""

    def __init__(self, codec: HiggsCodec):
        super().__init__()
        self.codec = codec

    def forward(self, waveform, acoustic_waveform):
        return self.codec.encode_parts(waveform, acoustic_waveform)[0]


def _io(name: str, dtype: str, shape: list) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape}


def _export(module: nn.Module, args: tuple, path: Path, names: tuple[list, list], dynamic: dict, meta: dict) -> None:
    t0 = time.perf_counter()
    print(f"[codec] exporting {path.name} ...", flush=True)
    with warnings.catch_warnings():  # torch-internal deprecation noise from torch.export's pytree
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
        program = torch.onnx.export(
            module.eval(), args, dynamo=True, input_names=names[0], output_names=names[1], dynamic_shapes=dynamic
        )
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
    meta = {**_common(codec), "context_frames": decoder_context_frames(c.ratios, c.hop_length)}
    batch, frames = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("frames", min=1, max=1 << 20)
    codes = torch.zeros(2, c.num_quantizers, 3, dtype=torch.int64)
    with torch.no_grad():
        _export(FoldedDecoder(codec), (codes,), path, (["codes"], ["audio"]), {"codes": {0: batch, 2: frames}}, meta)
    return {
        "file": path.name,
        "inputs": [_io("codes", "int64", ["batch", c.num_quantizers, "frames"])],
        "outputs": [_io("audio", "float32", ["batch", 1, f"{c.hop_length}*frames"])],
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
