"""Backbone graphs straight from a checkpoint, one weight tensor in RAM at a time (`make export DTYPE=int4|int8`).

Why: torch's exporter needs the model's weights in the graph's dtype, so a float32 export of a bf16
checkpoint holds a float32 copy of every weight, and more: the 1B's `make export DTYPE=int4` peaked at
18.0 GB RSS (9.4 GB of float32 weights still held while the quantizer mapped the 8.9 GB float32
weights.bin), so a 3B (11.5 GB of bf16) cannot be exported in 24 GB that way.

Here the three graphs are traced on fake tensors (shapes only, no weight data; the same
`trace_backbone_graph` as the float32 export, so the same ops), with the weights as graph inputs so
the optimizer cannot fold them. Each weight then becomes an external initializer named after its
checkpoint tensor, and `Transpose(W) -> MatMul` becomes MatMul on a stored `W.T`, as the float32
export stores it. export.quantize.rewrite_graph finally writes weights.bin tensor by tensor from the
memory-mapped safetensors: float32 (the reference graphs), or quantized (weight products to MatMulNBits,
embedding tables to GatherBlockQuantized). Peak RSS is the tracer plus the largest single tensor in
float32, whatever the model size.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxscript
import torch
from onnx import TensorProto, numpy_helper
from onnxscript import ir
from torch._subclasses.fake_tensor import FakeTensorMode

from engines.manifest import BACKBONE_GRAPHS, WEIGHTS_FILE

from .checkpoint import tensor_loaders
from .config import HiggsConfig
from .llm import HiggsAudioBackbone, Mode
from .onnx_export import graph_entry, trace_backbone_graph
from .quantize import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, WeightsFile, rewrite_graph

GRAPH_MODES = {"prefill": Mode.MIXED, "text": Mode.TEXT, "audio": Mode.AUDIO}  # manifest graph key -> mode
_PREFIX = "model."  # the exporter's name for HiggsAudioBackbone inside export/onnx_export._Graph


class CheckpointTensors:
    """export.quantize.rewrite_graph's weight source: checkpoint tensors, read one at a time as float32."""

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]]):
        self.loaders = loaders

    def key(self, tensor: onnx.TensorProto) -> str:
        return tensor.name

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        weight = self.loaders[tensor.name.removesuffix(".T")]().float().numpy()
        return weight.T if tensor.name.endswith(".T") else weight

    def raw(self, tensor: onnx.TensorProto) -> np.ndarray:
        return np.ascontiguousarray(self.array(tensor))


def _constants(config: HiggsConfig) -> dict[str, np.ndarray]:
    """The model's non-checkpoint tensors (rotary frequencies, codebook offsets): real even on the meta device."""
    with torch.device("meta"):
        model = HiggsAudioBackbone(config)
    return {name: value.numpy() for name, value in vars(model).items() if isinstance(value, torch.Tensor)}


def _external(name: str, dims: list[int]) -> onnx.TensorProto:
    """A float32 initializer whose data rewrite_graph reads from the checkpoint (location filled in on write)."""
    tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", WEIGHTS_FILE
    return tensor


def trace_graph(model: HiggsAudioBackbone, mode: Mode, weights: set[str], constants: dict[str, np.ndarray]) -> onnx.ModelProto:
    """One float32 graph of `model` (built under FakeTensorMode) with its weights as checkpoint references."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        program = trace_backbone_graph(model, mode, optimize=False)
    graph = program.model.graph
    for value in list(graph.initializers.values()):  # inputs, so constant folding leaves them alone
        graph.initializers.pop(value.name)
        value.const_value = None
        graph.inputs.append(value)
    onnxscript.optimizer.optimize(program.model)
    proto = ir.serde.serialize_model(program.model)
    _bind_weights(proto, weights, constants)
    return proto


def _bind_weights(proto: onnx.ModelProto, weights: set[str], constants: dict[str, np.ndarray]) -> None:
    """Weight inputs -> external initializers named after their checkpoint tensor (`W.T` for the ones only
    a Transpose into MatMul reads, that Transpose dropped); the model's constants -> inline initializers."""
    inputs = {value.name: value for value in proto.graph.input}
    parameters = [name for name in inputs if name.startswith(_PREFIX)]
    for name in parameters:
        proto.graph.input.remove(inputs[name])
    shapes = {name: [d.dim_value for d in inputs[name].type.tensor_type.shape.dim] for name in parameters}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    dropped = set()
    for name in parameters:
        short = name.removeprefix(_PREFIX)
        if short not in weights:
            proto.graph.initializer.append(numpy_helper.from_array(constants[short], name))
            continue
        transposes = [n for n in consumers.get(name, []) if n.op_type == "Transpose"]
        folded = [t for t in transposes if list(t.attribute[0].ints) == [1, 0]
                  and all(c.op_type == "MatMul" and c.input[1] == t.output[0] for c in consumers.get(t.output[0], []))]
        for transpose in folded:
            for matmul in consumers[transpose.output[0]]:
                matmul.input[1] = short + ".T"
            dropped.add(id(transpose))
        if folded:
            proto.graph.initializer.append(_external(short + ".T", shapes[name][::-1]))
        if len(folded) < len(consumers.get(name, [])):
            proto.graph.initializer.append(_external(short, shapes[name]))
            for node in consumers[name]:
                node.input[:] = [short if i == name else i for i in node.input]
    kept = [node for node in proto.graph.node if id(node) not in dropped]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


def export_streamed(checkpoint: Path, config: HiggsConfig, out: Path, bits: int | None, log=print,
                    block_size: int = DEFAULT_BLOCK_SIZE, accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> dict:
    """The three backbone graphs and weights.bin in `out`, float32 (bits None) or quantized; returns their
    manifest entries."""
    out.mkdir(parents=True, exist_ok=True)
    loaders = tensor_loaders(checkpoint, config)
    constants = _constants(config)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = HiggsAudioBackbone(config).eval().requires_grad_(False)
    weights = WeightsFile(out / WEIGHTS_FILE)
    source = CheckpointTensors(loaders)
    entries = {}
    try:
        for key, mode in GRAPH_MODES.items():
            started = time.time()
            graph = trace_graph(model, mode, set(loaders), constants)
            traced = time.time() - started
            names, sizes = rewrite_graph(graph, out / BACKBONE_GRAPHS[key], source, weights, bits, block_size, accuracy_level)
            entries[key] = graph_entry(out / BACKBONE_GRAPHS[key], names, sizes)
            log(f"{BACKBONE_GRAPHS[key]}: traced in {traced:.1f}s, weights written in {time.time() - started - traced:.1f}s "
                f"({entries[key]['weight_bytes'] / 2**20:.1f} MiB per call)")
    finally:
        weights.close()
    return entries
