"""Weight-only quantized backbone graphs (export/quantize.py): the packing against the MatMulNBits and
GatherBlockQuantized kernels, the tiny export quantized end to end against its float32 graphs, the
check-onnx / verify gate and report for quantized graphs (a misplaced weight or table must fail
check-onnx; its reference holds one decoder layer at a time and computes what the whole model does), and
the streamed export (export/streamed.py) against the torch exporter's graphs."""

from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export import check_onnx
from export.checkpoint import expected_shapes
from export.config import load_config
from export.llm import Mode
from export.onnx_export import external_location, point_to_weights
from export.quantize import DequantizedWeights, agreement, dequantize_blocks, quantize_artifacts, quantize_blocks, scheme
from goldens import requires_golden


def _one_node(op: str, x: str, x_type: int, codes, scales, **attrs):
    """A one-node graph of a com.microsoft kernel reading `codes` as input "b" and `scales` (N, k_blocks) as "s",
    as the quantized exports store them."""
    inputs = {"MatMulNBits": [x, "b", "s"], "GatherBlockQuantized": ["b", x, "s"]}[op]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], domain="com.microsoft", **attrs)], "g",
        [helper.make_tensor_value_info(x, x_type, None)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(codes, "b"), numpy_helper.from_array(scales, "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _matmul_nbits(codes, scales, k, n, bits, block_size):
    """accuracy_level 0 (float32 compute) so only the packing is tested."""
    return _one_node("MatMulNBits", "a", TensorProto.FLOAT, codes, scales,
                     K=k, N=n, bits=bits, block_size=block_size, accuracy_level=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_what_the_kernel_reads(bits):
    """K = 80 is not a whole number of 32-blocks: the padded tail must not shift any code."""
    rng = np.random.default_rng(bits)
    k, n, block = 80, 24, 32
    weight = rng.standard_normal((n, k)).astype(np.float32)
    codes, scales = quantize_blocks(weight, bits, block)
    assert codes.shape == (n, 3, block * bits // 8) and scales.shape == (n, 3)
    dequantized = dequantize_blocks(codes, scales, bits, k)
    # round to nearest: every weight within half a step of its block
    step = np.repeat(scales, block, axis=1)[:, :k]
    assert np.all(np.abs(dequantized - weight) <= step / 2 * (1 + 1e-5))
    a = rng.standard_normal((5, k)).astype(np.float32)
    y = _matmul_nbits(codes, scales, k, n, bits, block).run(None, {"a": a})[0]
    np.testing.assert_allclose(y, a @ dequantized.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_table_is_the_matmul_packing_seen_as_rows(bits):
    """GatherBlockQuantized (uint8 data, default zero point 2^(bits-1)) reads MatMulNBits' B bytes as (N, k_blocks
    * blob) with the same scales: it returns exactly the dequantized rows, negative and 2-D indices included,
    and the same bytes multiply as the matrix (a tied head and embedding can share them)."""
    rng = np.random.default_rng(bits)
    k, n, block = 96, 40, 32
    table = rng.standard_normal((n, k)).astype(np.float32)
    codes, scales = quantize_blocks(table, bits, block)
    dequantized = dequantize_blocks(codes, scales, bits, k)
    ids = np.array([[0, 7, n - 1], [-1, 7, 3]])
    rows = _one_node("GatherBlockQuantized", "ids", TensorProto.INT64, codes.reshape(n, -1), scales,
                     bits=bits, block_size=block, gather_axis=0, quantize_axis=1).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(rows, dequantized[ids])
    a = rng.standard_normal((5, k)).astype(np.float32)
    y = _matmul_nbits(codes, scales, k, n, bits, block).run(None, {"a": a})[0]
    np.testing.assert_allclose(y, a @ dequantized.T, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def int4(tiny_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-int4")
    quantize_artifacts(tiny_artifacts, out, bits=4, log=lambda _: None)
    return out


def test_quantized_graphs_share_one_weights_file(tiny_artifacts, int4):
    manifest = json.loads((int4 / "manifest.json").read_text())
    assert manifest["dtype"] == "float32"  # activations, logits and KV cache
    assert manifest["quantization"]["bits"] == 4 and manifest["quantization"]["block_size"] == 32
    assert manifest["quantization"]["embedding_op"] == "com.microsoft.GatherBlockQuantized"
    stored: dict[str, tuple] = {}
    for key in ("prefill", "text", "audio"):
        model = onnx.load(str(int4 / manifest["graphs"][key]["file"]), load_external_data=False)
        ops = {node.op_type for node in model.graph.node}
        assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "MatMul" not in ops and "Gemm" not in ops
        external = {t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}
        assert not [node.name for node in model.graph.node if node.op_type == "Gather" and node.input[0] in external]
        for tensor in model.graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL:
                place = {e.key: e.value for e in tensor.external_data}
                assert stored.setdefault(tensor.name, (place["offset"], place["length"])) == (place["offset"], place["length"])
    float32 = json.loads((tiny_artifacts / "manifest.json").read_text())["graphs"]
    groups = {"audio": ("attention", "audio_ffn", "audio_head", "audio_embedding"), "text": ("text_head", "text_embedding")}
    for key in groups:
        for group in groups[key]:  # 4 bits + a float32 scale per 32 weights
            assert manifest["graphs"][key]["reads"][group] * 32 == float32[key]["reads"][group] * 5, (key, group)
    assert (int4 / "weights.bin").stat().st_size < (tiny_artifacts / "weights.bin").stat().st_size


def test_quantized_logits_follow_float32(tiny_artifacts, int4):
    """Random weights: a sanity bound (a wrong nibble order or zero point gives errors ~ the logits). 200 frames:
    with the embeddings quantized too, one codebook's top-1 over the first 20 is 45% (72-79% over 200)."""
    report = agreement(tiny_artifacts, int4, frames=200)
    assert report["logits_max_rel"] < 0.4
    assert min(report["top1_per_codebook"]) >= 0.5


def test_refuses_non_float32_source(tiny_artifacts, tmp_path):
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    source = tmp_path / "bf16"
    source.mkdir()
    (source / "manifest.json").write_text(json.dumps({**manifest, "dtype": "bfloat16"}))
    with pytest.raises(ValueError, match="quantize a float32 export"):
        quantize_artifacts(source, tmp_path / "out", bits=4)


def test_refuses_a_block_size_that_does_not_divide_the_embedding(tiny_artifacts, tmp_path):
    """GatherBlockQuantized does not pad a row (MatMulNBits does): the tiny hidden size is 64."""
    with pytest.raises(ValueError, match="not a whole number of 128-blocks"):
        quantize_artifacts(tiny_artifacts, tmp_path / "out", bits=4, block_size=128, log=lambda _: None)


def test_make_export_int8_keeps_its_float32_reference(tiny_checkpoint, tmp_path):
    """`make export DTYPE=int8`: quantized graphs in OUT, the float32 export they came from in OUT/float32."""
    from export.__main__ import main

    out = tmp_path / "int8"
    assert main(["--checkpoint", str(tiny_checkpoint / "llm"), "--out", str(out), "--dtype", "int8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["bits"] == 8
    assert manifest["quantization"]["float32_source"] == str((out / "float32").resolve())
    assert json.loads((out / "float32" / "manifest.json").read_text())["dtype"] == "float32"


def test_check_onnx_passes_quantized_graphs(int4, capsys):
    """Gate: the float32 model holding the dequantized weights; report: distance from the float32 graphs."""
    assert check_onnx.main(["--artifacts", str(int4), "--graphs", "prefill", "text", "audio"]) == 0
    out = capsys.readouterr().out
    assert "against the float32 model holding their dequantized weights" in out
    assert "int4 vs the float32 graphs in" in out and "greedy frames equal over 200" in out


@pytest.mark.parametrize("artifacts", ["tiny_artifacts", "int4"])
def test_the_streamed_reference_computes_what_the_whole_model_computes(request, tiny_checkpoint, artifacts):
    """check-onnx's reference, which reads each decoder layer's weights just before the layer runs, against the
    whole model loaded at once with the graphs' weights: the checkpoint's (float32 graphs), or the dequantized
    ones the int4 graphs store."""
    from export.llm import load_backbone

    artifacts = request.getfixturevalue(artifacts)
    whole = load_backbone(tiny_checkpoint / "llm")
    if scheme(artifacts):
        params = dict(whole.named_parameters())
        for name, weight in DequantizedWeights(artifacts).items():
            params[name].copy_(torch.from_numpy(weight))
    streamed = check_onnx.reference_backbone(tiny_checkpoint / "llm", torch.float32, artifacts)
    for mode in check_onnx.GRAPH_MODES.values():
        for feed in check_onnx._backbone_feeds(whole.config, mode, np.float32, np.random.default_rng(0)):
            want, got = check_onnx._backbone_outputs(whole, mode, feed), check_onnx._backbone_outputs(streamed, mode, feed)
            assert got.keys() == want.keys()
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{mode}: {name}")


def _materialized_layers(model) -> int:
    return sum(any(not p.is_meta for p in layer.parameters()) for layer in model.layers)


def test_check_onnx_holds_one_decoder_layer_at_a_time(int4):
    """What lets a 3B's gate run in 24 GB (its whole float32 reference is 23 GB): whenever any module of the
    reference runs, at most one of its decoder layers has weights."""
    from export.llm import HiggsAudioBackbone

    models, held = [], []

    def watch(module, *args):
        if isinstance(module, HiggsAudioBackbone):
            models.append(module)
        held.append(_materialized_layers(models[-1]))

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(watch), torch.nn.modules.module.register_module_forward_hook(watch)]
    try:
        assert check_onnx.main(["--artifacts", str(int4), "--graphs", "audio"]) == 0
    finally:
        for hook in hooks:
            hook.remove()
    assert max(held) == 1 and _materialized_layers(models[-1]) == 0


def test_the_reference_reads_a_layer_once_per_forward_call(tiny_checkpoint, int4, monkeypatch):
    """The price of holding one layer: each forward call dequantizes every layer's weights once (check-onnx makes
    two per graph); the embeddings and heads are dequantized once in all."""
    reads = collections.Counter()
    dequantize = DequantizedWeights.__getitem__
    monkeypatch.setattr(DequantizedWeights, "__getitem__", lambda self, name: reads.update([name]) or dequantize(self, name))
    model = check_onnx.reference_backbone(tiny_checkpoint / "llm", torch.float32, int4)
    assert reads and set(reads.values()) == {1} and not any(name.startswith("layers.") for name in reads)
    calls = 3
    for feed in [check_onnx._backbone_feeds(model.config, Mode.AUDIO, np.float32, np.random.default_rng(i))[0] for i in range(calls)]:
        check_onnx._backbone_outputs(model, Mode.AUDIO, feed)
    layers = {name: count for name, count in reads.items() if name.startswith("layers.")}
    products = {name for name, shape in expected_shapes(model.config).items() if name.startswith("layers.") and len(shape) == 2}
    assert layers.keys() == products and set(layers.values()) == {calls}
    assert set((reads - collections.Counter(layers)).values()) == {1}


def test_check_onnx_names_the_fix_for_a_missing_checkpoint(tiny_artifacts, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        check_onnx.main(["--artifacts", str(tiny_artifacts), "--checkpoint", str(tmp_path / "moved")])
    assert refused.value.code == 2 and "--checkpoint DIR (make check-onnx CHECKPOINT=DIR)" in capsys.readouterr().err


def _swap_weights(graph, first: str, second: str) -> None:
    """Point two MatMulNBits nodes at each other's codes and scales (a weight packed into the wrong place)."""
    model = onnx.load(str(graph), load_external_data=False)
    nodes = {node.input[1].rsplit(".", 1)[0]: node for node in model.graph.node if node.op_type == "MatMulNBits"}
    a, b = nodes[first], nodes[second]
    for i in (1, 2):
        a.input[i], b.input[i] = b.input[i], a.input[i]
    onnx.save(model, str(graph))


@pytest.mark.parametrize("first, second", [
    ("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.o_proj.weight"),
    ("layers.1.audio_mlp.gate_proj.weight", "layers.1.audio_mlp.up_proj.weight"),
])
def test_check_onnx_fails_a_misplaced_weight(int4, tmp_path, first, second):
    broken = tmp_path / "broken"
    shutil.copytree(int4, broken)
    _swap_weights(broken / "backbone_audio.onnx", first, second)
    assert check_onnx.main(["--artifacts", str(broken), "--graphs", "audio"]) == 1


def _point_table_at(artifacts, key: str, table: str, weight: str) -> None:
    """Make the GatherBlockQuantized node of `table` read the codes and scales of the quantized `weight` of the
    same shape (a table wired to the wrong tensor)."""
    graph = artifacts / f"backbone_{key}.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized" and n.input[2] == f"{table}.scales")
    point_to_weights(initializers[node.input[0]], *external_location(initializers[f"{weight}.q4"])[1:])
    node.input[2] = f"{weight}.scales"
    onnx.save(model, str(graph))


@pytest.mark.parametrize("key, table, weight", [
    ("text", "embed_tokens.weight", "audio_decoder_proj.text_lm_head.weight"),
    ("audio", "audio_codebook_embeddings.weight", "audio_decoder_proj.audio_lm_head.weight"),
])
def test_check_onnx_fails_a_misplaced_table(int4, tmp_path, key, table, weight):
    """The gate's reference holds the dequantized tables, so a table wired to another tensor of its shape fails.
    (Bytes corrupted inside weights.bin cannot fail it: the reference is dequantized from those same bytes.)"""
    broken = tmp_path / "broken"
    shutil.copytree(int4, broken)
    _point_table_at(broken, key, table, weight)
    assert check_onnx.main(["--artifacts", str(broken), "--graphs", key]) == 1


@requires_golden
def test_verify_reports_quantized_distance(golden_artifacts, tmp_path, capsys):
    """Goldens are float32: verify keeps the torch rows and reports the int8 graphs' distance instead of gating them."""
    from export.verify import main
    from goldens import GOLDEN_ROOT

    int8 = quantize_artifacts(golden_artifacts("llm_tiny"), tmp_path / "int8", bits=8, log=lambda _: None).parent
    args = ["--checkpoint", str(GOLDEN_ROOT / "llm_tiny"), "--golden", str(GOLDEN_ROOT / "llm_tiny"), "--artifacts", str(int8)]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.endswith(" ok") or line.endswith("FAIL")]
    assert set(rows) == {"torch"} and "int8 vs the float32 graphs in" in out


def _outputs(artifacts, config) -> list[np.ndarray]:
    """Every backbone graph's outputs on check-onnx's feeds."""
    results = []
    for key, mode in check_onnx.GRAPH_MODES.items():
        session = ort.InferenceSession(str(artifacts / f"backbone_{key}.onnx"), providers=["CPUExecutionProvider"])
        for feed in check_onnx._backbone_feeds(config, mode, np.float32, np.random.default_rng(0)):
            results += session.run(None, feed)
    return results


def test_streamed_float32_equals_the_torch_export(tiny_checkpoint, tiny_artifacts, tmp_path):
    """Traced on fake weights, weights written from the checkpoint: the very graphs of the torch export."""
    from export.streamed import export_streamed

    config = load_config(tiny_checkpoint / "llm")
    entries = export_streamed(tiny_checkpoint / "llm", config, tmp_path, bits=None, log=lambda _: None)
    reference = json.loads((tiny_artifacts / "manifest.json").read_text())["graphs"]
    assert all(entries[key]["reads"] == reference[key]["reads"] for key in entries)
    for got, want in zip(_outputs(tmp_path, config), _outputs(tiny_artifacts, config), strict=True):
        np.testing.assert_array_equal(got, want)


def test_make_export_int4_straight_from_the_checkpoint(tiny_checkpoint, int4, tmp_path):
    """No float32 detour: the same graphs as quantizing the float32 export, without keeping its float32 graphs."""
    from export.__main__ import main

    out = tmp_path / "int4"
    assert main(["--checkpoint", str(tiny_checkpoint / "llm"), "--out", str(out), "--dtype", "int4", "--no-float32-reference"]) == 0
    assert not (out / "float32").exists()
    assert json.loads((out / "manifest.json").read_text())["quantization"]["float32_source"] is None
    config = load_config(tiny_checkpoint / "llm")
    for got, want in zip(_outputs(out, config), _outputs(int4, config), strict=True):
        np.testing.assert_array_equal(got, want)


def test_make_export_takes_the_block_size_and_accuracy_level(tiny_checkpoint, tiny_artifacts, tmp_path):
    """BLOCK_SIZE= / ACCURACY_LEVEL= reach every quantized node and the manifest, and give the graphs that
    quantizing the float32 export with the same scheme gives; a scheme the ops do not take is refused."""
    from export.__main__ import main

    out = tmp_path / "int4"
    argv = ["--checkpoint", str(tiny_checkpoint / "llm"), "--out", str(out), "--dtype", "int4", "--no-float32-reference"]
    assert main(argv + ["--block-size", "64", "--accuracy-level", "0"]) == 0
    scheme = json.loads((out / "manifest.json").read_text())["quantization"]
    assert (scheme["block_size"], scheme["accuracy_level"]) == (64, 0)
    for file in ("backbone_text.onnx", "backbone_audio.onnx"):
        nodes = [n for n in onnx.load(str(out / file), load_external_data=False).graph.node if n.domain == "com.microsoft"]
        attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
        assert nodes and all(a["block_size"] == 64 and a.get("accuracy_level", 0) == 0 for a in attrs)
    same = quantize_artifacts(tiny_artifacts, tmp_path / "from-float32", bits=4, block_size=64, accuracy_level=0, log=lambda _: None)
    config = load_config(tiny_checkpoint / "llm")
    for got, want in zip(_outputs(out, config), _outputs(same.parent, config), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(SystemExit) as refused:
        main(argv + ["--block-size", "48"])
    assert refused.value.code == 2


@pytest.fixture(scope="module")
def tied_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with its text head equal to its text embedding (tie_word_embeddings in its values)."""
    from safetensors.torch import load_file, save_file

    llm = tmp_path_factory.mktemp("tied") / "llm"
    shutil.copytree(tiny_checkpoint / "llm", llm)
    tensors = load_file(llm / "model.safetensors")
    tensors["audio_decoder_proj.text_lm_head.weight"] = tensors["embed_tokens.weight"].clone()
    save_file(tensors, str(llm / "model.safetensors"), metadata={"format": "pt"})
    return llm


def test_a_tied_head_and_embedding_are_stored_once(tied_checkpoint, tmp_path):
    """The float32 export stores a tied head and embedding once (the Gather reads `W`, the head's Gemm its twin
    name `W#offset`); quantized, the head's MatMulNBits and the table's GatherBlockQuantized read the same bytes,
    compute what the streamed export's two copies (one per checkpoint tensor) compute, and pass the gate (whose
    reference gives both parameters the one dequantized tensor)."""
    from export.__main__ import main, run

    float32 = run(tied_checkpoint, None, tmp_path / "float32", "float32").parent
    shared = quantize_artifacts(float32, tmp_path / "shared", bits=4, log=lambda _: None).parent
    model = onnx.load(str(shared / "backbone_text.onnx"), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    table = next(node for node in model.graph.node if node.op_type == "GatherBlockQuantized")
    head = next(node for node in model.graph.node if node.op_type == "MatMulNBits" and node.input[2] == table.input[2])
    assert external_location(initializers[table.input[0]]) == external_location(initializers[head.input[1]])

    streamed = tmp_path / "streamed"
    assert main(["--checkpoint", str(tied_checkpoint), "--out", str(streamed), "--dtype", "int4", "--no-float32-reference"]) == 0
    config = load_config(tied_checkpoint)
    for got, want in zip(_outputs(shared, config), _outputs(streamed, config), strict=True):
        np.testing.assert_array_equal(got, want)
    assert check_onnx.main(["--artifacts", str(shared), "--graphs", "text"]) == 0
