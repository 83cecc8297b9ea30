"""Weight-only quantized backbone graphs: MatMul weights -> ONNX Runtime's `MatMulNBits`, embedding tables ->
`GatherBlockQuantized` (int4 / int8).

    python -m export.quantize --artifacts FP32_DIR --out DIR --bits 4|8 [--block-size 32] [--accuracy-level 4]

Why: on the CPU an audio step is bound by reading weights (4.03 GB per step for the 1B in float32);
4-bit blocks read ~1/7 of that. The text embedding is the largest single tensor (128256 x hidden: 1.05 GB
of float32 at the 1B, 1.6 GB at the 3B); at int4 it is 1/6.4 of that (the 1B int4 weights.bin: 2.40 ->
1.46 GB). ONNX Runtime memory-maps it and a server touches only the rows of the tokens it reads, so this
saves disk and page cache, not RSS (docs/cpu.md). `make export DTYPE=int4|int8` runs `rewrite_graph` on
graphs traced without weights, reading the checkpoint (export/streamed.py); this command quantizes an
existing float32 export instead.

What changes: every MatMul / Gemm(transB) whose weight is a 2-D initializer becomes a
com.microsoft `MatMulNBits` (symmetric blocks along K, no zero-point input: the kernel's default
zero point 2^(bits-1) applies), and every Gather (axis 0) from a 2-D float32 initializer (the text
embedding, the audio codebook embedding) a com.microsoft `GatherBlockQuantized` with the same bits,
blocks and packing along the row. Norms and graph constants stay float32, and activations, logits and
the KV cache stay float32 (the manifest's `dtype`). The three graphs still share one `weights.bin`: a
weight read by several graphs or nodes is quantized and stored once (a tied text head and embedding, which
the float32 export stores once, too: the two ops read the same bytes). Tensors are quantized one block
of rows at a time (from the memory-mapped float32 file, or from one checkpoint tensor in float32), so
peak RSS stays near the largest tensor, whatever the model size.

Checks: `QUANTIZED_RTOL` and `DequantizedWeights` are check-onnx's gate (a misplaced weight fails it),
`agreement` / `distance_report` the numbers against float32 that check-onnx, verify and bench report.

Op reference, onnxruntime 1.32.0: docs/ContribOperators.md, which is the text of the schemas the installed
wheel prints (onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema(); its CPU kernels:
get_all_opkernel_def()):
- com.microsoft.MatMulNBits: B is uint8 (N, ceil(K / block_size), block_size * bits / 8) with codes packed
  low bits first along K, scales (N, k_blocks) in A's dtype, y = A dequant(B)^T with
  dequant = (code - zero_point) * scale, zero point 2^(bits-1) when none is given.
- com.microsoft.GatherBlockQuantized (CPU kernel: onnxruntime/contrib_ops/cpu/quantization/
  gather_block_quantized.cc):
  uint8 data takes bits 2, 4 or 8, packed low bits first along the last axis, which must be quantize_axis,
  and gather_axis must be 0; scales have data's rank with ceil(row / block_size) blocks on quantize_axis;
  without zero_points the zero point is 2^(bits-1) for uint8 (0 for the int4 / uint4 types, which would
  need codes other than quantize_blocks'). An index out of range gives a row of zeros (ONNX Gather fails).
  So a table of N rows of K is exactly MatMulNBits' B bytes seen as (N, k_blocks * blob) with the same
  (N, k_blocks) scales, provided K is a whole number of blocks (the op does not pad: its output row is the
  whole unpacked data row).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from engines.manifest import BACKBONE_GRAPHS, MANIFEST_FILE, WEIGHTS_FILE

from .onnx_export import ALIGN, external_location, graph_entry, point_to_weights, write_manifest

BITS = {"int4": 4, "int8": 8}  # make export DTYPE= -> bits
# issue 13: 1B audio step 3.75x faster than float32 at block 32, accuracy_level 4; 128 is 1.2-1.5x faster still and further
# from float32 (docs/cpu.md). Both are onnxruntime-genai's model builder defaults for int4 on the CPU
# (src/python/py/models/builder.py: int4_block_size 32, int4_accuracy_level 4 for the cpu EP).
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4  # int8 activations inside the kernel (MLAS's fastest CPU path)
ROWS_PER_BLOCK = 4096  # output rows (N) quantized at a time: bounds RSS for the 128k-row text head
# check-onnx gate: |quantized graph - float32 model holding the same dequantized weights| <= RTOL x max |reference|,
# per output. Healthy graphs (accuracy_level 4 rounds activations to int8 in the kernel), largest over check-onnx's
# feeds and outputs: tiny int8 / int4 0.016 / 0.018 with float32 embeddings, 0.024 / 0.012 with quantized ones;
# 1B int4 audio graph 0.016, text graph 0.026 (quantized embeddings). One weight swapped with another of its shape: tiny
# 0.23-0.35 (tests/test_quantize.py), 1B 0.21-0.34 in layers 0-1 and 0.126 in the last layer; an embedding table
# read from its head's bytes: 1B 1.2-1.6. Quality against the float32 weights is not gated: `agreement` reports it.
QUANTIZED_RTOL = 0.05


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float -> (codes uint8 (N, k_blocks, block_size * bits / 8), scales float32 (N, k_blocks)).

    Symmetric: scale = max |w| / (2^(bits-1) - 1) per block, code = round(w / scale) + 2^(bits-1).
    K is zero-padded to a whole number of blocks (the kernel pads the same way)."""
    n, k = weight.shape
    pad = (-k) % block_size
    w = np.pad(weight.astype(np.float32, copy=False), ((0, 0), (0, pad))).reshape(n, -1, block_size)
    zero = 1 << (bits - 1)
    scales = np.abs(w).max(axis=2) / (zero - 1)
    safe = np.where(scales == 0, 1.0, scales)[:, :, None]
    codes = (np.clip(np.rint(w / safe), -zero, zero - 1) + zero).astype(np.uint8)
    if bits == 4:
        codes = codes[:, :, 0::2] | (codes[:, :, 1::2] << 4)
    return codes, scales.astype(np.float32)


def dequantize_blocks(codes: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of `quantize_blocks` as the op defines it: (N, K) float32 (for checks and error reports)."""
    if bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(codes.shape[0], codes.shape[1], -1)
    values = codes.astype(np.float32)
    values -= 1 << (bits - 1)  # in place: check-onnx dequantizes a 3B's layer (176M weights) on every forward call
    values *= scales[:, :, None]
    return values.reshape(codes.shape[0], -1)[:, :k]


class WeightsFile:
    """The new weights.bin: page-aligned appends, each source tensor written once."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.done: dict[tuple, list[onnx.TensorProto]] = {}

    def _external(self, name: str, dtype: int, dims: list[int], write) -> onnx.TensorProto:
        offset = self.file.tell()
        self.file.write(b"\0" * ((-offset) % ALIGN))
        start = self.file.tell()
        write(self.file)
        tensor = onnx.TensorProto(name=name, data_type=dtype, dims=dims)
        point_to_weights(tensor, start, self.file.tell() - start)
        return tensor

    def copy(self, key, tensor: onnx.TensorProto, data) -> onnx.TensorProto:
        """data() -> the tensor's bytes (a slice of a memory-mapped file where it can be: the 1B text embedding
        alone is 1 GB), written as they are."""
        if key not in self.done:
            self.done[key] = [self._external(tensor.name, tensor.data_type, list(tensor.dims), lambda f: f.write(data()))]
        return self.done[key][0]

    def quantized(self, key, name: str, rows, n: int, k: int, bits: int, block_size: int) -> list[onnx.TensorProto]:
        """rows(n0, n1) -> float32 (n1 - n0, K) slice of the (N, K) weight; writes codes (N, k_blocks, blob) then
        scales (N, k_blocks), the layout both MatMulNBits and GatherBlockQuantized read (`_table_codes`)."""
        if key in self.done:
            return self.done[key]
        blocks = -(-k // block_size)
        scales = np.empty((n, blocks), np.float32)

        def write_codes(f):
            for n0 in range(0, n, ROWS_PER_BLOCK):
                codes, scales[n0 : n0 + ROWS_PER_BLOCK] = quantize_blocks(rows(n0, min(n, n0 + ROWS_PER_BLOCK)), bits, block_size)
                f.write(codes.tobytes())

        codes = self._external(f"{name}.q{bits}", TensorProto.UINT8, [n, blocks, block_size * bits // 8], write_codes)
        scale = self._external(f"{name}.scales", TensorProto.FLOAT, [n, blocks], lambda f: f.write(scales.tobytes()))
        self.done[key] = [codes, scale]
        return self.done[key]

    def close(self) -> None:
        self.file.close()


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _stored_matrix(name: str, initializers: dict[str, onnx.TensorProto]) -> bool:
    """Whether `name` is a 2-D float32 initializer in weights.bin (a weight, not a graph constant)."""
    weight = initializers.get(name)
    return (weight is not None and weight.data_type == TensorProto.FLOAT and len(weight.dims) == 2
            and weight.data_location == TensorProto.EXTERNAL)


def _weight_layout(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> str | None:
    """'KN' (MatMul x W), 'NK' (Gemm x W^T, no bias; Gather of rows of W: the same rows), or None when the
    node reads no quantizable weight."""
    if node.op_type == "Gather":
        return "NK" if _stored_matrix(node.input[0], initializers) and _attrs(node).get("axis", 0) == 0 else None
    if len(node.input) < 2 or not _stored_matrix(node.input[1], initializers):
        return None
    if node.op_type == "MatMul":
        return "KN"
    attrs = _attrs(node)
    plain = attrs.get("alpha", 1.0) == 1.0 and not attrs.get("transA", 0) and attrs.get("transB", 0) == 1
    return "NK" if node.op_type == "Gemm" and len(node.input) == 2 and plain else None


class Float32File:
    """Weights read from a float32 export's weights.bin (memory-mapped: nothing is copied into RAM)."""

    def __init__(self, path: Path):
        self.data = np.memmap(path, np.uint8, mode="r")

    def key(self, tensor: onnx.TensorProto):
        return external_location(tensor)[1]

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        return np.ndarray(tuple(tensor.dims), np.float32, self.data, external_location(tensor)[1])

    def raw(self, tensor: onnx.TensorProto):
        _, offset, length = external_location(tensor)
        return self.data[offset : offset + length]


def _table_codes(codes: onnx.TensorProto) -> onnx.TensorProto:
    """The codes of a quantized (N, K) table as GatherBlockQuantized reads them: (N, k_blocks * blob), the very
    bytes MatMulNBits reads as (N, k_blocks, blob), so no second copy in weights.bin."""
    n, blocks, blob = codes.dims
    view = onnx.TensorProto()
    view.CopyFrom(codes)
    view.name = f"{codes.name}.rows"
    view.dims[:] = [n, blocks * blob]
    return view


def rewrite_graph(model: onnx.ModelProto, dst: Path, source, weights: WeightsFile, bits: int | None,
                  block_size: int = DEFAULT_BLOCK_SIZE, accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> tuple[list[str], dict[str, int]]:
    """Write one float32 backbone graph with its external weights taken from `source` (Float32File or
    export.streamed.CheckpointTensors: key(tensor), array(tensor) float32, raw(tensor) bytes) into `weights`:
    as they are (bits None), or with every weight product turned into MatMulNBits and every embedding table
    into GatherBlockQuantized. Returns the weight names the graph reads and their stored sizes."""
    initializers = {t.name: t for t in model.graph.initializer}
    kept: dict[str, onnx.TensorProto] = {}
    nodes = []
    for node in model.graph.node:
        layout = _weight_layout(node, initializers) if bits else None
        if layout is None:
            nodes.append(node)
            continue
        table = node.op_type == "Gather"
        weight = initializers[node.input[0 if table else 1]]
        k, n = weight.dims if layout == "KN" else weight.dims[::-1]
        if table and k % block_size:  # the op does not pad: its output row is the unpacked data row
            raise ValueError(f"{weight.name}: rows of {k} are not a whole number of {block_size}-blocks, which "
                             "GatherBlockQuantized needs; quantize with a block size that divides the hidden size")

        def rows(n0, n1, stored=functools.cache(lambda weight=weight: source.array(weight)), layout=layout):
            return stored()[:, n0:n1].T if layout == "KN" else stored()[n0:n1]  # array read once per weight

        # a float32 export stores a tied head and embedding once, read as `W` and its twin `W#offset` (export/
        # onnx_export.py `consolidate_weights`): one key, so the Gather and the Gemm share the quantized bytes
        name = weight.name.split("#")[0].removesuffix(".T")
        codes, scales = weights.quantized((source.key(weight), layout), name, rows, n, k, bits, block_size)
        if table:
            codes = _table_codes(codes)
            nodes.append(helper.make_node(
                "GatherBlockQuantized", [codes.name, node.input[1], scales.name], list(node.output), name=node.name,
                domain="com.microsoft", bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1,
            ))
        else:
            nodes.append(helper.make_node(
                "MatMulNBits", [node.input[0], codes.name, scales.name], list(node.output), name=node.name,
                domain="com.microsoft", K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level,
            ))
        kept[codes.name], kept[scales.name] = codes, scales
    used = {name for node in nodes for name in node.input}
    for tensor in model.graph.initializer:
        if tensor.name not in used or tensor.name in kept:
            continue
        if tensor.data_location == TensorProto.EXTERNAL:
            tensor = weights.copy((source.key(tensor), "raw"), tensor, lambda tensor=tensor: source.raw(tensor))
        kept[tensor.name] = tensor
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept.values())
    if bits and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    external = {t.name: external_location(t)[2] for t in kept.values() if t.data_location == TensorProto.EXTERNAL}
    return sorted(external), external


def _log(message: str) -> None:
    print(f"[quantize] {message}", flush=True)


def quantization_entry(bits: int, float32_source: Path | None, block_size: int = DEFAULT_BLOCK_SIZE,
                       accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> dict:
    """The manifest's "quantization" record; float32_source: the float32 graphs of the same weights, if kept."""
    return {
        "op": "com.microsoft.MatMulNBits", "embedding_op": "com.microsoft.GatherBlockQuantized", "bits": bits,
        "block_size": block_size, "accuracy_level": accuracy_level, "symmetric": True,
        "float32_source": str(float32_source.resolve()) if float32_source else None,
        "quantized": "weight products (attention, FFNs, heads) and embedding tables (text, audio codebooks)",
        "float32": "norms, activations, logits, KV cache",
    }


def check_scheme(bits: int, block_size: int, accuracy_level: int) -> None:
    """Refuse what MatMulNBits / GatherBlockQuantized do not take (ContribOperators.md, onnxruntime 1.32)."""
    if bits not in BITS.values() or block_size < 16 or block_size & (block_size - 1) or accuracy_level not in range(5):
        raise ValueError(f"bits must be 4 or 8, block_size a power of two >= 16 and accuracy_level 0-4, got {bits}, "
                         f"{block_size} and {accuracy_level}")


def add_scheme_arguments(parser: argparse.ArgumentParser) -> None:
    """--block-size / --accuracy-level, shared by python -m export and python -m export.quantize."""
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help=f"int4/int8: weights per quantization block (power of two >= 16; default {DEFAULT_BLOCK_SIZE}, "
                        "docs/cpu.md measures 32 / 64 / 128)")
    parser.add_argument("--accuracy-level", type=int, choices=range(5), default=DEFAULT_ACCURACY_LEVEL,
                        help=f"int4/int8: MatMulNBits accuracy_level (4: int8 activations, default {DEFAULT_ACCURACY_LEVEL})")


def quantize_artifacts(src: Path, out: Path, bits: int, block_size: int = DEFAULT_BLOCK_SIZE,
                       accuracy_level: int = DEFAULT_ACCURACY_LEVEL, log=_log) -> Path:
    """float32 artifacts in `src` -> quantized backbone graphs + a copy of everything else in `out`."""
    manifest = json.loads((src / MANIFEST_FILE).read_text())
    if manifest["dtype"] != "float32":
        raise ValueError(f"{src} holds {manifest['dtype']} graphs; quantize a float32 export (make export DTYPE=float32)")
    check_scheme(bits, block_size, accuracy_level)
    if src.resolve() == out.resolve():
        raise ValueError("quantize into a different directory than the float32 artifacts")
    out.mkdir(parents=True, exist_ok=True)
    source = Float32File(src / WEIGHTS_FILE)
    weights = WeightsFile(out / WEIGHTS_FILE)
    try:
        for key, file in BACKBONE_GRAPHS.items():
            started = time.time()
            model = onnx.load(str(src / file), load_external_data=False)
            names, sizes = rewrite_graph(model, out / file, source, weights, bits, block_size, accuracy_level)
            manifest["graphs"][key] = graph_entry(out / file, names, sizes)
            log(f"{file}: {manifest['graphs'][key]['weight_bytes'] / 2**20:.1f} MiB of weights "
                f"per call, {time.time() - started:.1f}s")
    finally:
        weights.close()
    for key, entry in manifest["graphs"].items():
        if key not in BACKBONE_GRAPHS:  # codec, sampler: self-contained graphs, copied as they are
            shutil.copyfile(src / entry["file"], out / entry["file"])
    if manifest.get("tokenizer"):
        shutil.copyfile(src / manifest["tokenizer"], out / manifest["tokenizer"])
    manifest["quantization"] = quantization_entry(bits, src, block_size, accuracy_level)
    log(f"{WEIGHTS_FILE}: {(out / WEIGHTS_FILE).stat().st_size / 2**20:.1f} MiB "
        f"(float32: {(src / WEIGHTS_FILE).stat().st_size / 2**20:.1f} MiB)")
    return write_manifest(out, manifest)


def scheme(artifacts: Path) -> dict | None:
    """The manifest's "quantization" entry (written by `quantize_artifacts`); None for float graphs."""
    return json.loads((Path(artifacts) / MANIFEST_FILE).read_text()).get("quantization")


def _stored(source: np.memmap, tensor: onnx.TensorProto, dtype) -> np.ndarray:
    _, offset, length = external_location(tensor)
    return np.ndarray((length // np.dtype(dtype).itemsize,), dtype, source, offset)


_QUANTIZED_OPS = {"MatMulNBits": 1, "GatherBlockQuantized": 0}  # op -> index of its codes input; scales: input 2


class DequantizedWeights(Mapping):
    """Checkpoint tensor name -> (N, K) float32 for every weight the quantized graphs store: the values the
    MatMulNBits kernels multiply by and the GatherBlockQuantized kernels look up, i.e. the float32 reference of
    exactly these graphs (check-onnx's gate). Lazy: a weight is dequantized from the memory-mapped weights.bin
    when it is looked up, so check-onnx holds one decoder layer of them at a time (all of a 3B's are 23 GB).
    Each name is dequantized from the codes of the first node reading its scales (prefill graph first; a tied
    head and table share theirs), so a node of another graph wired to the wrong bytes fails the gate."""

    def __init__(self, artifacts: Path):
        self._source = np.memmap(Path(artifacts) / WEIGHTS_FILE, np.uint8, mode="r")
        self._stored: dict[str, tuple[dict, onnx.TensorProto, onnx.TensorProto]] = {}  # name -> attrs, codes, scales
        for file in BACKBONE_GRAPHS.values():
            model = onnx.load(str(Path(artifacts) / file), load_external_data=False)
            initializers = {t.name: t for t in model.graph.initializer}
            for node in model.graph.node:
                if node.op_type in _QUANTIZED_OPS:
                    self._stored.setdefault(node.input[2].removesuffix(".scales"), (
                        _attrs(node), initializers[node.input[_QUANTIZED_OPS[node.op_type]]], initializers[node.input[2]]))

    def shape(self, name: str) -> tuple[int, int]:
        """(N, K) of `name`, without dequantizing it."""
        attrs, codes, scales = self._stored[name]
        return codes.dims[0], attrs.get("K", scales.dims[1] * attrs["block_size"])  # a table is whole blocks

    def __getitem__(self, name: str) -> np.ndarray:
        attrs, codes, scales = self._stored[name]
        n, k = self.shape(name)
        scale = _stored(self._source, scales, np.float32).reshape(n, -1)
        return dequantize_blocks(_stored(self._source, codes, np.uint8).reshape(*scale.shape, -1), scale, attrs["bits"], k)

    def __contains__(self, name) -> bool:  # Mapping's would dequantize the weight
        return name in self._stored

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)


def distance_report(artifacts: Path, frames: int = 200) -> str:
    """How far quantized `artifacts` are from the float32 graphs they were made from (`agreement`), as the
    lines check-onnx, verify and --compare print. Random weights: numbers, not a gate."""
    quantization = scheme(artifacts)
    bits, source = quantization["bits"], quantization["float32_source"]
    if not source or not (Path(source) / MANIFEST_FILE).is_file():
        return f"int{bits} vs float32: no float32 graphs to compare with (exported without them, or moved: {source})"
    report = agreement(Path(source), artifacts, frames=frames)
    return "\n".join([
        f"int{bits} vs the float32 graphs in {source} (same weights; random weights: numbers, not a gate)",
        f"  text logits after the prompt, max |err|: {report['text_logits_max_abs']:.3g}",
        f"  audio logits (teacher forced), max |err|: {report['logits_max_abs']:.3g}, "
        f"max |err| / max |logit|: {report['logits_max_rel']:.3g}",
        f"  top-1 agreement per codebook (teacher forced): {' '.join(f'{t:.0%}' for t in report['top1_per_codebook'])}",
        f"  greedy frames equal over {frames} free-running frames: {report['greedy_frames_equal']:.1%}",
    ])


def agreement(reference: Path, quantized: Path, frames: int = 200, prompt: int = 32, seed: int = 0) -> dict:
    """How far the quantized graphs are from their float32 source on the same prompt (numbers, no gate).

    Teacher forcing (quantized slot 0): fed the float32 model's own greedy audio columns; every step's
    audio logits are compared (max abs error, max error relative to the step's largest |logit|, top-1
    agreement per codebook). Free running (quantized slot 1): feeds back its own greedy columns; a
    frame agrees when all its codebooks equal the float32 greedy frame at the same step.
    """
    from engines.manifest import Manifest
    from engines.ort_runtime import OrtBackbone

    length = prompt + frames + 1
    # split prefill: no prefill session, whose prepacked copy of every weight would double the RAM
    ref, quant = (OrtBackbone(Manifest.load(d), max_batch=b, max_len=length, prefill_graph=False) for d, b in ((reference, 1), (quantized, 2)))
    spec = ref.spec
    ids = np.random.default_rng(seed).integers(0, 128000, prompt)
    codes, mask = np.zeros((prompt, spec.num_codebooks), np.int64), np.zeros(prompt, bool)
    text = [ref.prefill(0, ids, codes, mask).text, quant.prefill(0, ids, codes, mask).text]
    quant.prefill(1, ids, codes, mask)
    forced = free = np.full(spec.num_codebooks, spec.stream_bos_id, np.int64)
    abs_err = rel_err = 0.0
    top1 = np.zeros(spec.num_codebooks)
    equal_frames = 0
    for step in range(frames):
        lengths = np.full(2, prompt + step, np.int64)
        expected = ref.audio_step(np.zeros(1, np.int64), forced[None], lengths[:1])[0]
        both = quant.audio_step(np.arange(2), np.stack([forced, free]), lengths)
        error = np.abs(expected - both[0]).max()
        abs_err, rel_err = max(abs_err, float(error)), max(rel_err, float(error / np.abs(expected).max()))
        top1 += expected.argmax(-1) == both[0].argmax(-1)
        forced, free = expected.argmax(-1), both[1].argmax(-1)
        equal_frames += bool(np.array_equal(forced, free))
    ref.close()
    quant.close()
    return {
        "text_logits_max_abs": float(np.abs(text[0] - text[1]).max()),
        "logits_max_abs": abs_err,
        "logits_max_rel": rel_err,
        "top1_per_codebook": (top1 / frames).round(4).tolist(),
        "greedy_frames_equal": equal_frames / frames,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.quantize", description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="float32 artifacts (make export DTYPE=float32)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bits", type=int, choices=sorted(BITS.values()), default=4)
    add_scheme_arguments(parser)
    parser.add_argument("--compare", type=int, default=0, metavar="FRAMES",
                        help="then print logits error, top-1 and greedy frame agreement against the float32 graphs over FRAMES steps")
    args = parser.parse_args(argv)
    if not (args.artifacts / MANIFEST_FILE).is_file():
        parser.error(f"--artifacts {args.artifacts} has no manifest.json: run make export DTYPE=float32 OUT={args.artifacts} first")
    try:
        quantize_artifacts(args.artifacts, args.out, args.bits, args.block_size, args.accuracy_level)
        if args.compare:
            print(distance_report(args.out, frames=args.compare))
    except ValueError as error:
        print(f"[quantize] error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
