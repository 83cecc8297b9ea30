"""The GPU path's CPU-checkable parts: ONNX Runtime session options and node placement, the fail-fast
messages of missing GPU runtimes, the bucketed slot-0 decode, the TensorRT copy of the graphs and the
exported attention form."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines.gpu_env import GpuUnavailable, driver_cuda_version, require_runtime
from engines.graph_edit import edited_graph, unmasked_single_token_attention
from engines.manifest import STEP_GRAPHS, Manifest
from engines.ort_runtime import (
    CUDA_EP,
    RECORD_PLACEMENT,
    OrtBackbone,
    check_placement,
    open_session,
    placement,
    providers_for,
    session_options,
    stray_heavy_nodes,
)
from engines.trt.static_cache import static_cache_graph

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA_EP = CUDA_EP in ort.get_available_providers()
BACKBONE = ("prefill", "text", "audio")
MAKE = ["--no-print-directory", "-o", ".venv/.installed-dev"]  # never (re)install the venv from inside a test

# Kernel registrations of the CUDA EP in the onnxruntime-gpu 1.31.1 wheel (the version pyproject pins),
# read from libonnxruntime_providers_cuda.so (the name / SinceVersion pairs its BuildKernelCreateInfo
# functions pass to KernelDefBuilder) as (first, last) opset versions, last None = open-ended. A graph
# node of op-set version v runs on the GPU only if some range holds its schema's since_version.
CUDA_KERNELS_1_31_1 = {
    "Add": [(14, None)], "Attention": [(23, 23), (24, None)], "Cast": [(23, 24), (25, None)], "Concat": [(13, None)],
    "Cos": [(22, None)], "Gather": [(13, None)], "GatherND": [(13, None)], "Gemm": [(13, None)],
    "LessOrEqual": [(16, None)], "MatMul": [(13, None)], "Mul": [(14, None)], "Neg": [(13, None)], "Pow": [(15, None)],
    "Range": [(11, 26)], "Reciprocal": [(13, None)], "ReduceMean": [(18, None)], "ReduceSum": [(13, None)],
    "Reshape": [(23, 24), (25, None)], "Shape": [(23, 24), (25, None)], "Sigmoid": [(13, None)], "Sin": [(22, None)],
    "Slice": [(13, None)], "Sqrt": [(13, None)], "Squeeze": [(24, 24), (25, None)], "TensorScatter": [(24, None)],
    "Transpose": [(23, 24), (25, None)], "Unsqueeze": [(24, 24), (25, None)], "Where": [(16, None)],
    "If": [(23, 24), (25, None)], "Equal": [(19, None)],
}


def _graph(artifacts: Path, graph: str) -> str:
    return str(Manifest.load(artifacts).graph_path(graph))


# --- point 1: session options and placement --------------------------------------------------------


def test_cuda_session_options_are_accepted_with_the_cpu_ep_listed(tiny_artifacts):
    """The CUDA sessions' options together with an explicitly listed CPU EP: onnxruntime used to
    reject that pair ("Conflicting session configuration", session.disable_cpu_ep_fallback)."""
    options = session_options("cuda")
    assert options.get_session_config_entry(RECORD_PLACEMENT) == "1"
    session = ort.InferenceSession(_graph(tiny_artifacts, "audio"), options, providers=["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_placement_names_every_heavy_node_off_the_device(tiny_artifacts):
    """Placement comes from onnxruntime's own record; on a CPU session every heavy node is 'off the GPU'."""
    session = ort.InferenceSession(_graph(tiny_artifacts, "audio"), session_options("cuda"), providers=["CPUExecutionProvider"])
    by_ep = placement(session)
    assert set(by_ep) == {"CPUExecutionProvider"}
    ops = by_ep["CPUExecutionProvider"]
    layers = Manifest.load(tiny_artifacts).model.num_layers
    assert ops["Attention"] == layers and ops["TensorScatter"] == 2 * layers and ops["MatMul"] > 0
    stray = stray_heavy_nodes(by_ep, CUDA_EP)
    assert any(s.startswith("Attention x") for s in stray) and any(s.startswith("TensorScatter x") for s in stray)
    assert not any(s.startswith(("Shape", "Range", "Add")) for s in stray)  # light nodes may stay on the CPU
    assert stray_heavy_nodes(by_ep, "CPUExecutionProvider") == []
    assert check_placement(session, "backbone_audio.onnx", "CPUExecutionProvider") == by_ep


def test_a_session_that_fell_back_to_the_cpu_is_refused(tiny_artifacts):
    """onnxruntime's Python layer re-creates a session on the CPU alone when the CUDA EP cannot load."""
    session = ort.InferenceSession(_graph(tiny_artifacts, "audio"), session_options("cuda"), providers=["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match=r"could not start CUDAExecutionProvider.*onnxruntime-gpu\[cuda,cudnn\]"):
        check_placement(session, "backbone_audio.onnx")


@pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime-gpu is installed: the session would really start on the GPU")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_sessions_opened_with_the_cuda_ep_first_are_placement_checked(tiny_artifacts):
    """open_session (every backbone and codec session) checks placement whenever the CUDA EP leads the
    providers: this onnxruntime has none and falls back to the CPU, refused under the file's name."""
    path = _graph(tiny_artifacts, "audio")
    with pytest.raises(RuntimeError, match=r"^backbone_audio\.onnx: onnxruntime could not start CUDAExecutionProvider"):
        open_session(path, session_options("cuda"), [(CUDA_EP, {"device_id": 0}), "CPUExecutionProvider"])
    assert open_session(path, session_options("cpu"), ["CPUExecutionProvider"]).get_providers() == ["CPUExecutionProvider"]


def _nodes(graph):
    """Every node of a graph, those of If branches included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attribute.g)


def test_exported_ops_have_cuda_kernels_in_the_pinned_onnxruntime(tiny_artifacts):
    """Every node's (op, since_version) at the export's opset, in the graphs ONNX Runtime CUDA runs
    (the step graphs as their unmasked copies), has a CUDA kernel in onnxruntime-gpu 1.31.1."""
    missing = set()
    for graph in BACKBONE:
        model = onnx.load(_graph(tiny_artifacts, graph), load_external_data=False)
        if graph in STEP_GRAPHS:
            unmasked_single_token_attention(model)
        opset = {o.domain: o.version for o in model.opset_import}[""]
        for node in _nodes(model.graph):
            since = onnx.defs.get_schema(node.op_type, opset, node.domain).since_version
            if not any(lo <= since and (hi is None or since <= hi) for lo, hi in CUDA_KERNELS_1_31_1.get(node.op_type, [])):
                missing.add(f"{node.op_type}-{since}")
    assert not missing


# --- point 9: single-position steps without the mask on ONNX Runtime CUDA ---------------------------


def _run_prompt_and_steps(runtime, spec, rng_seed=5):
    """A split prefill (multi-token text and audio runs) into slots 0 and 2, then 3 rounds of text and
    audio steps over both; every logits array in order."""
    rng, out = np.random.default_rng(rng_seed), []
    lengths = {}
    for slot, size in ((0, 9), (2, 14)):
        mask = np.zeros(size, bool)
        mask[3:7] = True  # text, audio run, text
        ids = rng.integers(0, spec.vocab_size, size)
        codes = rng.integers(0, spec.codebook_size, (size, spec.num_codebooks))
        logits = runtime.prefill_split(slot, ids, codes, mask)
        out += [logits.text, logits.audio]
        lengths[slot] = size
    slots = np.array([0, 2])
    for step in range(3):
        now = np.array([lengths[0] + 2 * step, lengths[2] + 2 * step])
        out.append(runtime.text_step(slots, rng.integers(0, spec.vocab_size, 2), now).copy())
        out.append(runtime.audio_step(slots, rng.integers(0, spec.codebook_size, (2, spec.num_codebooks)), now + 1).copy())
    return [a for a in out if a is not None]


def test_unmasked_single_token_steps_give_the_same_results(tiny_artifacts):
    """The copies ONNX Runtime CUDA runs (Attention without the mask when T == 1) give the exported
    graphs' logits for split prompts (T > 1, masked branch) and decode steps (T == 1)."""
    manifest = Manifest.load(tiny_artifacts)
    plain = OrtBackbone(manifest, max_batch=4, max_len=64, prefill_graph=False)
    unmasked = OrtBackbone(manifest, max_batch=4, max_len=64, prefill_graph=False, unmasked_steps=True)
    for got, want in zip(_run_prompt_and_steps(unmasked, manifest.model), _run_prompt_and_steps(plain, manifest.model), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_single_token_calls_take_the_unmasked_branch(tiny_artifacts):
    """Routing: with the unmasked branch broken on purpose (nonpad_kv_seqlen dropped too, so it
    attends to the garbage after each row's position), T == 1 calls change and T > 1 calls do not."""
    manifest = Manifest.load(tiny_artifacts)
    spec, path = manifest.model, manifest.graph_path("text")

    def broken(model):
        unmasked_single_token_attention(model)
        for node in model.graph.node:
            if node.op_type == "If":
                then = next(a.g for a in node.attribute if a.name == "then_branch")
                del then.node[0].input[6:]

    rng = np.random.default_rng(1)
    caches = {f"past_{k}_{i}": rng.standard_normal((2, spec.num_kv_heads, 24, spec.head_dim)).astype(np.float32)
              for i in range(spec.num_layers) for k in ("key", "value")}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    original = ort.InferenceSession(str(path), options)
    with edited_graph(path, broken, "broken") as copy:
        edited = ort.InferenceSession(str(copy), options)
    for length, changes in ((1, True), (3, False)):
        feed = {"input_ids": rng.integers(0, spec.vocab_size, (2, length)), "cache_lengths": np.array([4, 9]),
                "last_index": np.full(2, length - 1), **caches}
        difference = np.abs(edited.run(["text_logits"], feed)[0] - original.run(["text_logits"], feed)[0]).max()
        assert (difference > 1e-3) == changes, (length, difference)


# --- points 2 and 4: a GPU runtime that cannot run here fails at once, naming the install -------------


@pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime-gpu is installed: the missing-CUDA path cannot be exercised")
def test_cuda_providers_without_onnxruntime_gpu_name_the_install():
    with pytest.raises(GpuUnavailable, match=r"make setup-gpu.*onnxruntime-gpu\[cuda,cudnn\]"):
        providers_for("cuda")


@pytest.mark.skipif(driver_cuda_version() is not None, reason="an NVIDIA driver is installed here")
@pytest.mark.parametrize("runtime", ["ort-cuda", "tensorrt"])
def test_make_serve_with_a_gpu_runtime_fails_at_once(runtime):
    """`make serve RUNTIME=...` passes the runtime through and the server refuses before loading anything."""
    started = time.monotonic()
    result = subprocess.run(["make", *MAKE, "serve", f"RUNTIME={runtime}", "ARTIFACTS=build/no-such-artifacts"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    assert f"--runtime {runtime} --max-batch 64 --max-len 2048" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "make setup-gpu" in errors[0] and "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


def test_make_serve_keeps_eight_cpu_slots_unless_asked():
    def flags(*assignments):
        dry = subprocess.run(["make", "-n", *MAKE, "serve", "ARTIFACTS=x", *assignments],
                             capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
        return dry.split("--runtime", 1)[1].split()

    assert flags() == ["ort-cpu", "--max-batch", "8", "--max-len", "2048"]
    assert flags("MAX_BATCH=3", "MAX_LEN=300") == ["ort-cpu", "--max-batch", "3", "--max-len", "300"]
    assert flags("RUNTIME=tensorrt") == ["tensorrt", "--max-batch", "64", "--max-len", "2048"]


@pytest.mark.skipif(driver_cuda_version() is not None, reason="an NVIDIA driver is installed here")
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no NVIDIA GPU" in result.stderr
    assert not (tmp_path / "work").exists()


def test_unknown_runtime_is_named():
    with pytest.raises(ValueError, match="ort-cpu, ort-cuda, tensorrt"):
        require_runtime("cuda")


# --- point 7: decode steps always from slot 0 over power-of-two row buckets -------------------------


class _Recording(OrtBackbone):
    """OrtBackbone that records the (graph, first slot, rows) of every run."""

    def run(self, graph, slot, inputs):
        self.calls.append((graph, slot, len(inputs["cache_lengths"])))
        return super().run(graph, slot, inputs)


def _prefilled(manifest, cls, prompts):
    runtime = cls(manifest, max_batch=8, max_len=64)
    runtime.calls = []
    spec = manifest.model
    for slot, ids in prompts.items():
        runtime.prefill(slot, ids, np.zeros((len(ids), spec.num_codebooks), np.int64), np.zeros(len(ids), bool))
    return runtime


def test_decode_steps_run_from_slot_zero_over_row_buckets_with_the_same_results(tiny_artifacts):
    """Slots 3 and 5 step as rows of a [0, 8) call (0-2, 4, 6, 7 ride along on the scratch row); their
    logits and caches equal a direct run over exactly [3, 6) with slot 4 as the passenger, which is
    what the runtime did before, and no cache row of another slot changes."""
    manifest = Manifest.load(tiny_artifacts)
    spec = manifest.model
    rng = np.random.default_rng(3)
    prompts = {s: rng.integers(0, spec.vocab_size, 4 + s) for s in range(8)}
    bucketed, direct = _prefilled(manifest, _Recording, prompts), _prefilled(manifest, _Recording, prompts)
    before = [bucketed.cache_view(layer, kind).copy() for layer in range(spec.num_layers) for kind in ("key", "value")]

    slots, lengths = np.array([3, 5]), np.array([7, 9])
    codes = rng.integers(0, spec.codebook_size, (2, spec.num_codebooks))
    bucketed.calls.clear()
    got = bucketed.audio_step(slots, codes, lengths)
    assert bucketed.calls == [("audio", 0, 8)]

    feed = np.full((3, 1, spec.num_codebooks), spec.stream_bos_id, np.int64)
    feed[[0, 2], 0] = codes
    want = direct.run("audio", 3, {"audio_codes": feed, "cache_lengths": np.array([7, direct.scratch_position, 9]),
                                   "last_index": np.zeros(3, np.int64)})["audio_logits"][[0, 2]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    after = [bucketed.cache_view(layer, kind) for layer in range(spec.num_layers) for kind in ("key", "value")]
    reference = [direct.cache_view(layer, kind) for layer in range(spec.num_layers) for kind in ("key", "value")]
    scratch = bucketed.scratch_position
    for old, new, ref in zip(before, after, reference):
        np.testing.assert_allclose(new[[3, 5]], ref[[3, 5]], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.delete(new, scratch, axis=2)[[0, 1, 2, 4, 6, 7]], np.delete(old, scratch, axis=2)[[0, 1, 2, 4, 6, 7]])


def test_row_buckets():
    runtime = OrtBackbone.__new__(OrtBackbone)
    runtime.max_batch = 6
    assert [runtime.step_rows(stop) for stop in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    with pytest.raises(ValueError, match="6 cache slots"):
        runtime.step_rows(7)


def test_a_text_step_of_one_high_slot_covers_its_bucket(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    runtime = _prefilled(manifest, _Recording, {2: np.array([1, 2, 3])})
    runtime.calls.clear()
    runtime.text_step(np.array([2]), np.array([5]), np.array([3]))
    assert runtime.calls == [("text", 0, 4)]
    assert set(runtime._step_bindings) == {("text", 0, 4)}


# --- points 5 and 8: the TensorRT copy of the graphs, the attention form of the export ---------------


def test_tensorrt_copy_has_decomposable_mask_only_attention(tiny_artifacts):
    """In the copy TensorRT parses, every Attention node has Q, K, V and the mask only and carries
    TRT_decomposable=1; without that TensorRT-only attribute it is a valid ONNX model (checker)."""
    path = Manifest.load(tiny_artifacts).graph_path("audio")
    with static_cache_graph(path, 40) as static:
        model = onnx.load(str(static), load_external_data=False)
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert attention and all(len(n.input) == 4 and all(n.input) for n in attention)
    assert all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}.get("TRT_decomposable") == 1 for n in attention)
    with static_cache_graph(path, 40, decomposable=False) as static:
        onnx.checker.check_model(str(static), full_check=True)


def test_exported_attention_has_unit_scale(tiny_artifacts):
    """Q is scaled in the graph, so Attention's own scale is 1 (the goldens prove it is the same model)."""
    for graph in BACKBONE:
        model = onnx.load(_graph(tiny_artifacts, graph), load_external_data=False)
        scales = collections.Counter(
            onnx.helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "Attention" for a in n.attribute if a.name == "scale"
        )
        assert scales == {1.0: Manifest.load(tiny_artifacts).model.num_layers}


# --- point 4 and make gpu-check's plumbing ----------------------------------------------------------


def test_a_driver_older_than_the_wheels_names_the_driver_to_install(monkeypatch):
    import engines.gpu_env as gpu_env

    monkeypatch.setattr(gpu_env, "driver_cuda_version", lambda: (12, 8))
    with pytest.raises(GpuUnavailable, match=r"built for CUDA 13\.0.*supports CUDA 12\.8.*580\+ driver"):
        gpu_env.require_driver("13.0", "onnxruntime-gpu")
    monkeypatch.setattr(gpu_env, "driver_cuda_version", lambda: (13, 1))
    gpu_env.require_driver("13.0", "onnxruntime-gpu")


def test_gpu_check_steps_time_out_alone_and_the_report_says_what_ran(tmp_path):
    """Each step is its own process with its own timeout; a failure or a timeout does not stop the
    next step; report.md / report.json name every step's result and log."""
    from bench.gpu_check import Step, run_step, write_report

    python = [sys.executable, "-c"]
    steps = [
        Step("fails", "exits 3", python + ["import sys; print('broken'); sys.exit(3)"], 30),
        Step("hangs", "sleeps", python + ["import time; time.sleep(30)"], 1),
        Step("works", "prints", python + ["print('all good')"], 30),
    ]
    for step in steps:
        run_step(step, tmp_path)
    assert [s.status for s in steps] == ["failed (exit 3)", "timed out after 1s", "passed"]
    assert steps[0].summary == "broken" and steps[2].summary == "all good"
    write_report(tmp_path, {"gpu": "none"}, steps, time.monotonic())
    report = (tmp_path / "report.md").read_text()
    assert "**1/3 steps passed**" in report and "| hangs | sleeps | timed out after 1s |" in report
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["verdict"] == "1/3 steps passed" and [s["name"] for s in data["steps"]] == ["fails", "hangs", "works"]


def test_a_negative_slot_is_refused_not_wrapped(tiny_artifacts):
    """The slot-0 buckets index the step arrays by slot: -1 must be an error, never the last row."""
    runtime = _prefilled(Manifest.load(tiny_artifacts), _Recording, {2: np.array([1, 2, 3])})
    with pytest.raises(ValueError, match="slot -1 outside"):
        runtime.text_step(np.array([-1]), np.array([5]), np.array([3]))
