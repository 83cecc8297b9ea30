"""TensorRT tooling. Without a GPU: the CLIs' failure without TensorRT, the engines.json checks, the
static KV cache edit of the ONNX graphs, engines.trt.check's feeds and polygraphy runner (driven by an
ONNX Runtime stand-in for TrtBackbone), and bench.gpu's arithmetic. With tensorrt and a GPU: engines
built from the tiny artifacts against ONNX Runtime (skipped elsewhere, with the reason in -ra)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines.manifest import Manifest
from engines.trt.build import check_precision, profile_ranges, profile_shapes
from engines.trt.device import MissingDependency
from engines.trt.engine_dir import (
    ENGINES_FORMAT,
    ENGINES_JSON,
    EngineMismatch,
    artifacts_fingerprint,
    engine_mismatches,
    load_engines_meta,
)
from engines.trt.runtime import TrtBackbone
from engines.trt.static_cache import fix_cache_dims, static_cache_graph

ROOT = Path(__file__).resolve().parent.parent
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT_REASON = "tensorrt not installed: pip install '.[gpu,trt]' on an NVIDIA machine (docs/gpu.md)"


def require_gpu_tensorrt():
    """tensorrt, cuda-python and a CUDA device, or skip with the reason (visible in pytest -ra)."""
    pytest.importorskip("tensorrt", reason=NO_TRT_REASON)
    from engines.trt.device import Cuda

    try:
        Cuda().device()
    except RuntimeError as error:  # MissingDependency (cuda-python) or no device
        pytest.skip(f"no usable CUDA device: {error}")


# --- without TensorRT ---------------------------------------------------------------------------


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the missing-TensorRT path cannot be exercised")
@pytest.mark.parametrize(
    "module, args",
    [
        ("engines.trt.build", ["--precision", "fp16", "--max-batch", "2", "--max-len", "64", "--out"]),
        ("engines.trt.check", ["--engines"]),
    ],
)
def test_cli_without_tensorrt_fails_fast_with_the_install_command(module, args, tmp_path):
    out = tmp_path / "engines"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", module, "--artifacts", str(tmp_path / "missing"), *args, str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "pip install '.[gpu,trt]'" in result.stderr and "10.15" in result.stderr and "CUDA" in result.stderr
    assert time.monotonic() - started < 20
    assert not out.exists()  # failed before any work (the artifacts do not even exist)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the missing-TensorRT path cannot be exercised")
def test_runtime_without_tensorrt_names_the_install(tiny_artifacts, tmp_path):
    manifest = Manifest.load(tiny_artifacts)
    (tmp_path / ENGINES_JSON).write_text(json.dumps(fake_meta(artifacts_fingerprint(manifest))))
    with pytest.raises(MissingDependency, match=r"pip install '\.\[gpu,trt\]'"):
        TrtBackbone(manifest, max_batch=2, max_len=64, engines_dir=tmp_path)


def test_precision_must_match_the_export_dtype(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)  # float32
    assert check_precision(manifest, "fp32") is None
    message = check_precision(manifest, "fp16")
    assert "DTYPE=float16" in message and "make export CHECKPOINT=" in message and "--precision fp32" in message
    assert "DTYPE=bfloat16" in check_precision(manifest, "bf16")


# --- engines.json -------------------------------------------------------------------------------


def fake_meta(fingerprint: dict, **changes) -> dict:
    meta = {
        "format": ENGINES_FORMAT,
        "tensorrt_version": "10.15.1.29",
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
        "precision": "fp32",
        "onnx_dtype": "float32",
        "max_batch": 8,
        "max_len": 256,
        "artifacts": json.loads(json.dumps(fingerprint)),
        "graphs": {},
    }
    meta.update(changes)
    return meta


def mismatches(meta: dict, fingerprint: dict, **request) -> list[str]:
    here = dict(tensorrt_version="10.15.1.29", compute_capability="9.0", fingerprint=fingerprint, dtype="float32", max_batch=8, max_len=256)
    here.update(request)
    return engine_mismatches(meta, **here)


def test_matching_engines_have_no_mismatch(tiny_artifacts):
    fingerprint = artifacts_fingerprint(Manifest.load(tiny_artifacts))
    assert set(fingerprint["files"]) == {"weights.bin", "backbone_prefill.onnx", "backbone_text.onnx", "backbone_audio.onnx"}
    assert mismatches(fake_meta(fingerprint), fingerprint) == []
    assert mismatches(fake_meta(fingerprint), fingerprint, max_batch=1, max_len=100) == []  # smaller requests fit


@pytest.mark.parametrize(
    "change, request_, expected",
    [
        ({"tensorrt_version": "10.16.0.1"}, {}, "built with TensorRT 10.16.0.1, this is TensorRT 10.15.1.29"),
        ({"gpu": {"name": "NVIDIA A100", "compute_capability": "8.0"}}, {}, "compute capability 8.0 (NVIDIA A100), this GPU is 9.0"),
        ({"onnx_dtype": "float16"}, {}, "built from float16 graphs"),
        ({}, {"max_batch": 9}, "max_batch 9 is beyond the built profiles (max 8); rebuild with --max-batch 9"),
        ({}, {"max_len": 257}, "max_len 257 is beyond the engines' static KV cache length 256"),
    ],
)
def test_each_mismatch_is_named_with_its_fix(tiny_artifacts, change, request_, expected):
    fingerprint = artifacts_fingerprint(Manifest.load(tiny_artifacts))
    problems = mismatches(fake_meta(fingerprint, **change), fingerprint, **request_)
    assert len(problems) == 1 and expected in problems[0] and "rebuild" in problems[0]


def test_a_reexport_is_detected(tiny_artifacts):
    fingerprint = artifacts_fingerprint(Manifest.load(tiny_artifacts))
    meta = fake_meta(fingerprint)
    meta["artifacts"]["manifest_sha256"] = "0" * 64
    meta["artifacts"]["files"]["weights.bin"][1] -= 60
    problems = mismatches(meta, fingerprint)
    assert any("manifest.json changed" in p for p in problems)
    assert any(p.startswith("weights.bin changed since the build") and "cp -p" in p for p in problems)


def test_engines_json_is_required_and_versioned(tmp_path):
    with pytest.raises(EngineMismatch, match="make engine"):
        load_engines_meta(tmp_path)
    (tmp_path / ENGINES_JSON).write_text(json.dumps({"format": 99}))
    with pytest.raises(EngineMismatch, match="format 99"):
        load_engines_meta(tmp_path)


# --- static KV cache length ---------------------------------------------------------------------


def test_cache_dims_become_static(tiny_artifacts):
    model = onnx.load(str(Manifest.load(tiny_artifacts).graph_path("text")), load_external_data=False)
    names = fix_cache_dims(model, 48)
    graph = model.graph
    caches = [v for v in [*graph.input, *graph.output] if v.name in names]
    assert len(caches) == 4 * Manifest.load(tiny_artifacts).model.num_layers  # past + present, K + V
    for value in caches:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and dims[2].dim_value == 48 and not dims[2].dim_param
    symbols = {d.dim_param for v in [*graph.input, *graph.output, *graph.value_info] for d in v.type.tensor_type.shape.dim}
    assert "max_len" not in symbols and {"batch", "seq"} <= symbols


def test_static_graph_resolves_the_shared_weights(tiny_artifacts):
    """ONNX Runtime runs the edited copy (weights from weights.bin beside it; static cache length,
    no nonpad_kv_seqlen), gives the original's logits, and rejects any other cache length; the copy
    is gone afterwards. (The TensorRT-only TRT_decomposable attribute is left out: ORT rejects it.)"""
    manifest = Manifest.load(tiny_artifacts)
    spec, length = manifest.model, 40
    caches = {
        f"past_{kind}_{i}": np.random.default_rng(i).standard_normal((1, spec.num_kv_heads, length, spec.head_dim)).astype(np.float32)
        for i in range(spec.num_layers) for kind in ("key", "value")
    }
    feed = {"input_ids": np.array([[128000, 40, 41]]), "cache_lengths": np.array([5]), "last_index": np.array([2]), **caches}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    original = ort.InferenceSession(str(manifest.graph_path("text")), options).run(["text_logits"], feed)[0]
    with static_cache_graph(manifest.graph_path("text"), length, decomposable=False) as static:
        assert static.parent == manifest.root and static.name.startswith(".")
        session = ort.InferenceSession(str(static), options)
        np.testing.assert_allclose(session.run(["text_logits"], feed)[0], original, rtol=1e-5, atol=1e-6)
        longer = {**feed, "past_key_0": np.zeros((1, spec.num_kv_heads, length + 1, spec.head_dim), np.float32)}
        with pytest.raises(Exception, match="past_key_0"):
            session.run(["text_logits"], longer)
    assert not static.exists()


def test_non_backbone_graphs_are_refused(tiny_artifacts):
    model = onnx.load(str(Manifest.load(tiny_artifacts).graph_path("codec_decoder")), load_external_data=False)
    with pytest.raises(ValueError, match="past_"):
        fix_cache_dims(model, 16)


def test_profiles_from_manifest_shapes(tiny_artifacts):
    inputs = {v["name"]: v["shape"] for v in Manifest.load(tiny_artifacts).graphs["audio"]["inputs"]}
    decode, prefill = profile_ranges(8, 64)["decode"], profile_ranges(8, 64)["prefill"]
    assert profile_shapes(inputs["audio_codes"], decode, 64) == ((1, 1, 8), (8, 1, 8), (8, 1, 8))
    assert profile_shapes(inputs["audio_codes"], prefill, 64) == ((1, 1, 8), (1, 63, 8), (1, 63, 8))
    assert profile_shapes(inputs["past_key_0"], decode, 64) == ((1, 2, 64, 16), (8, 2, 64, 16), (8, 2, 64, 16))
    assert profile_shapes(inputs["cache_lengths"], prefill, 64) == ((1,), (1,), (1,))
    assert profile_ranges(8, 2048)["prefill"]["seq"] == [1, 256, 2047]
    with pytest.raises(ValueError, match="frames"):
        profile_shapes(["batch", "frames"], decode, 64)


# --- engines.trt.check's plumbing, with ONNX Runtime standing in for TrtBackbone ----------------


class OrtStandIn:
    """The TrtBackbone surface engines.trt.check's runner uses, on ONNX Runtime CPU (a test double)."""

    def __init__(self, manifest: Manifest, batch: int, cache_len: int):
        from engines.ort_runtime import OrtBackbone

        self.backbone = OrtBackbone(manifest, max_batch=batch, max_len=cache_len)
        self.manifest, self.spec, self.cache_len = manifest, manifest.model, cache_len

    def _buffers(self):
        return [self.backbone.cache_view(i // 2, ("key", "value")[i % 2]) for i in range(2 * self.spec.num_layers)]

    def upload_cache(self, slot, arrays):
        for buffer, array in zip(self._buffers(), arrays):
            buffer[slot : slot + len(array)] = array

    def download_cache(self, slot, rows):
        return [buffer[slot : slot + rows].copy() for buffer in self._buffers()]

    def run(self, graph, slot, inputs):
        return self.backbone.run(graph, slot, inputs)


def test_check_engine_feeds_and_runner(tiny_artifacts):
    from engines.trt import check as check_engine

    BaseRunner, OnnxrtRunner, SessionFromOnnx, TensorMetadata, Comparator, SimpleCompareFunc = check_engine.import_polygraphy()
    manifest = Manifest.load(tiny_artifacts)
    cache_len, batch = 128, 3
    prompt = check_engine.render_prompt(manifest, cache_len, batch)
    start, length = int(np.flatnonzero(prompt.audio_mask)[0]), len(prompt.input_ids)
    assert 0 < start < length and prompt.audio_mask[start:].any() and not prompt.audio_mask[:start].any()
    with pytest.raises(ValueError, match=f"max_len >= {length + batch + 1}"):
        check_engine.render_prompt(manifest, length + batch, batch)
    session = SessionFromOnnx(str(manifest.graph_path("prefill")))()
    caches_at = {stop: check_engine.prompt_caches(session, manifest, prompt, stop, cache_len) for stop in (start, length)}
    runner_class = check_engine.trt_runner_class(BaseRunner, TensorMetadata)
    stand_in = OrtStandIn(manifest, batch, cache_len)
    for graph in ("text", "audio"):
        feeds = check_engine.graph_feeds(graph, manifest, prompt, caches_at, cache_len, batch)
        assert len(feeds) == 3 and feeds[1] is feeds[2] and list(feeds[1]["cache_lengths"]) == [length, length - 1, length - 2]
        ort_runner = OnnxrtRunner(SessionFromOnnx(str(manifest.graph_path(graph))))
        results = Comparator.run([ort_runner, runner_class(stand_in, graph)], data_loader=feeds)
        assert bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(rtol=1e-5, atol=1e-5, check_shapes=True)))


# --- bench.gpu ----------------------------------------------------------------------------------


def test_bench_arguments():
    from bench import gpu

    args = gpu.parse_args([])
    assert args.sizes == ["v2.5-1b", "v2-3b"] and args.batches == [1, 8, 32, 64] and args.runtimes == ["tensorrt", "ort-cuda", "torch"]
    assert gpu.parse_args(["--batches", "2,4", "--runtimes", "torch", "--sizes", "tiny"]).batches == [2, 4]
    for bad in (["--runtimes", "tvm"], ["--sizes", "v3"], ["--context", "1023"], ["--batches", "0"]):
        with pytest.raises(SystemExit):
            gpu.parse_args(bad)


def test_bench_bytes_per_audio_step(tiny_artifacts):
    from bench import gpu

    manifest = Manifest.load(tiny_artifacts)  # float32, 2 layers, 2 KV heads of 16
    weights = manifest.graphs["audio"]["weight_bytes"]
    assert weights == sum(manifest.graphs["audio"]["reads"].values()) and "text_head" not in manifest.graphs["audio"]["reads"]
    assert gpu.kv_bytes_read(manifest.model, 4, batch=8, context=100) == 2 * 2 * 8 * 2 * 100 * 16 * 4
    assert gpu.audio_step_bytes(manifest, 8, 100) == weights + 409_600
    assert gpu.audio_step_bytes(manifest, 1, 1) == weights + 512


def test_bench_table():
    from bench import gpu

    rows = [
        gpu.Row("v2-3b", "tensorrt", 8, steps_per_s=50.0, bytes_per_step=10**6, ttfa_s=0.1234),
        gpu.Row("v2-3b", "torch", 8, bytes_per_step=10**6, note="skipped: torch has no CUDA"),
    ]
    cells = gpu.table_rows(rows, bandwidth=1e9)
    assert cells[0] == ["v2-3b", "tensorrt", 8, "50.0", "16.0", "1", "1000.0", "5%", "123.4", ""]
    assert cells[1][3:6] == [None, None, "1"] and cells[1][7] is None and cells[1][-1].startswith("skipped")
    assert gpu.table_rows(rows[:1], bandwidth=None)[0][6:8] == [None, None]
    args = gpu.parse_args([])
    body = gpu.doc_body(rows, 1e9, args, ["date: today"], "python -m bench.gpu")
    assert "| model | runtime | batch | steps/s |" in body and "`python -m bench.gpu`" in body and "skipped: torch" in body


# --- with TensorRT and a GPU ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engines(tiny_artifacts, tmp_path_factory):
    require_gpu_tensorrt()
    from engines.trt import build as build_engine

    out = tmp_path_factory.mktemp("tiny-engines")
    args = ["--artifacts", str(tiny_artifacts), "--precision", "fp32", "--max-batch", "4", "--max-len", "128", "--out", str(out)]
    assert build_engine.main(args) == 0
    return out


@pytest.mark.trt
def test_engines_json_describes_the_build(tiny_engines, tiny_artifacts):
    meta = load_engines_meta(tiny_engines)
    assert set(meta["graphs"]) == {"prefill", "text", "audio"} and (tiny_engines / "timing.cache").is_file()
    assert meta["graphs"]["audio"]["profiles"]["decode"] == {"index": 0, "batch": [1, 4, 4], "seq": [1, 1, 1]}
    assert meta["graphs"]["prefill"]["profiles"] == {"prefill": {"index": 0, "batch": [1, 1, 1], "seq": [1, 127, 127]}}
    assert meta["artifacts"] == artifacts_fingerprint(Manifest.load(tiny_artifacts))


@pytest.mark.trt
def test_tensorrt_matches_onnxruntime(tiny_engines, tiny_artifacts):
    """Prompt into slot 1, then batched steps over slots 0..2 (0 and 2 ride along), twice each so
    the second call replays the captured CUDA graph; logits against ONNX Runtime CPU."""
    from engines.ort_runtime import OrtBackbone

    manifest = Manifest.load(tiny_artifacts)
    trt_backbone = TrtBackbone(manifest, max_batch=4, max_len=128, engines_dir=tiny_engines)
    ort_backbone = OrtBackbone(manifest, max_batch=4, max_len=128)
    try:
        n = manifest.model.num_codebooks
        ids = np.array([128000, 1000, 2000, 128016, 128016, 3000])
        mask = ids == 128016
        codes = np.where(mask[:, None], np.arange(n)[None] * 7, 0)
        close = dict(rtol=2e-2, atol=2e-2)  # TF32 matmuls in fp32 engines
        for split in (False, True):
            a = (trt_backbone.prefill_split if split else trt_backbone.prefill)(1, ids, codes, mask)
            b = (ort_backbone.prefill_split if split else ort_backbone.prefill)(1, ids, codes, mask)
            np.testing.assert_allclose(a.audio, b.audio, **close)
        for _ in range(2):
            np.testing.assert_allclose(
                trt_backbone.audio_step(np.array([1]), np.full((1, n), 5), np.array([6])),
                ort_backbone.audio_step(np.array([1]), np.full((1, n), 5), np.array([6])), **close)
            np.testing.assert_allclose(
                trt_backbone.text_step(np.array([0, 1, 2]), np.array([11, 12, 13]), np.array([0, 7, 0])),
                ort_backbone.text_step(np.array([0, 1, 2]), np.array([11, 12, 13]), np.array([0, 7, 0])), **close)
        assert trt_backbone.cuda_graphs, trt_backbone.graph_failure
        with pytest.raises(EngineMismatch, match="max_batch 5"):
            TrtBackbone(manifest, max_batch=5, max_len=128, engines_dir=tiny_engines)
    finally:
        trt_backbone.close()
        trt_backbone.close()  # idempotent


@pytest.mark.trt
def test_check_engine_passes_on_tiny_engines(tiny_engines, tiny_artifacts):
    from engines.trt import check as check_engine

    assert check_engine.main(["--artifacts", str(tiny_artifacts), "--engines", str(tiny_engines), "--batch", "3"]) == 0
