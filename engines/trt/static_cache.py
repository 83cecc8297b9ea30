"""The copy of a backbone graph that TensorRT parses: the exported graph with three edits.

1. Static KV cache length: the KV cache update layer TensorRT makes of ONNX TensorScatter needs a
   static sequence length, so every past_*/present_* dimension `max_len` is fixed to the engines' L.
2. No `nonpad_kv_seqlen` on Attention: the exported mask already excludes those keys, and TensorRT's
   importer never reads the input, so the graph it gets says exactly what it computes.
3. `TRT_decomposable=1` on Attention, so TensorRT may decompose attention where it has no fused kernel
   for the shapes / precision instead of failing the build. ONNX Runtime rejects this attribute.

The edits are made on the proto without loading the weights; the copy is written next to weights.bin
(engines/graph_edit.py `edited_graph`), so its external data references resolve and TensorRT parses it
by path.
"""

from __future__ import annotations

from pathlib import Path

from ..graph_edit import NONPAD_INPUT, attention_nodes, edited_graph

CACHE_PREFIXES = ("past_", "present_")


def fix_cache_dims(model, max_len: int) -> list[str]:
    """Give dim 2 (the sequence) of every past_*/present_* tensor the static length max_len, in place.

    The symbol the export used for it is replaced everywhere it appears (inputs, outputs, value_info),
    so shapes inside the graph stay consistent. Returns the names of the cache tensors changed."""
    graph = model.graph
    caches = [v for v in [*graph.input, *graph.output] if v.name.startswith(CACHE_PREFIXES)]
    if not caches:
        raise ValueError("the graph has no past_*/present_* tensors: not a backbone graph of this exporter")
    symbols = {v.type.tensor_type.shape.dim[2].dim_param for v in caches} - {""}
    for value in caches:
        value.type.tensor_type.shape.dim[2].dim_value = max_len  # clears dim_param (a oneof)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_value = max_len
    return [v.name for v in caches]


def drop_nonpad_kv_seqlen(model) -> int:
    """Remove `nonpad_kv_seqlen` from every Attention node, in place; returns how many nodes.

    The exported mask (`key <= position`) already excludes every key at or past
    `nonpad_kv_seqlen`, so the result is the same model. TensorRT's importer builds its IAttention
    from Q, K, V and the mask alone and never reads input 6 (onnx-tensorrt onnxOpImporters.cpp,
    `DEFINE_BUILTIN_OP_IMPORTER(Attention)`): the graph it is given says exactly what it computes."""
    nodes = attention_nodes(model)
    for node in nodes:
        del node.input[NONPAD_INPUT:]
        while node.input and not node.input[-1]:  # trailing empty optional inputs (past_key / past_value)
            del node.input[-1]
    return len(nodes)


def mark_decomposable(model) -> None:
    """Set `TRT_decomposable=1` on every Attention node, in place. Without it the importer asks for
    a fused IAttention kernel and the build fails wherever none exists for the shapes / precision
    (onnxOpImporters.cpp: `attrs.get<int64_t>("TRT_decomposable", 0)` -> `IAttention::setDecomposable`).
    The attribute is TensorRT's own: onnx.checker and onnxruntime reject the marked graph."""
    import onnx

    for node in attention_nodes(model):
        kept = [a for a in node.attribute if a.name != "TRT_decomposable"]
        del node.attribute[:]
        node.attribute.extend(kept + [onnx.helper.make_attribute("TRT_decomposable", 1)])


def tensorrt_graph(model, max_len: int, decomposable: bool = True) -> None:
    """The edits TensorRT needs, in place: static cache length, no nonpad_kv_seqlen and (unless
    `decomposable` is False, which leaves a graph ONNX Runtime can still run) decomposable attention."""
    fix_cache_dims(model, max_len)
    drop_nonpad_kv_seqlen(model)
    if decomposable:
        mark_decomposable(model)


def static_cache_graph(path: Path, max_len: int, decomposable: bool = True):
    """A copy of the graph at `path` prepared by `tensorrt_graph`, next to weights.bin (so its
    relative external data references resolve), removed when the `with` block ends."""
    return edited_graph(path, lambda model: tensorrt_graph(model, max_len, decomposable), f"max_len{max_len}")
