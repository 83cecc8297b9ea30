"""ONNX Runtime backbone runtime (CPU EP; CUDA EP when onnxruntime-gpu is installed), driven with IO binding.

The KV cache buffers live on the execution provider's device. Every call binds the slot range's
past_* inputs and present_* outputs to the *same* memory, so `TensorScatter` updates the cache in
place (ONNX Runtime skips its copy when the buffers alias).

On the CPU the buffers grow and shrink in length buckets (powers of two from `MIN_BUCKET` rows up to
max_len) with the longest live sequence: ONNX Runtime's CPU Attention reads every row of the past it
is given, masked or not, so an audio step of the 1B int4 took 61 ms over 2048 rows and 44-49 ms over
256 for the same 200-position sequence (docs/cpu.md). The graphs take any cache length (`max_len` is
a dynamic dimension), so a bucket change is a copy of the live rows into new buffers and a rebind. Logits are bound to
preallocated host buffers. Bindings for single-token steps are cached per (graph, slot range), so a
decode step only copies its few input numbers and runs.

The graphs read `weights.bin` as external data; ONNX Runtime memory-maps it on CPU, so the three
sessions share one copy of the weights in the page cache.
"""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .gpu_env import onnxruntime_cuda, require_driver
from .graph_edit import edited_graph, unmasked_single_token_attention
from .manifest import BACKBONE_GRAPHS, STEP_GRAPHS, Manifest
from .runtime import BackboneRuntime

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
CUDA_EP = "CUDAExecutionProvider"
MIN_BUCKET = 256  # rows per slot of the smallest CPU cache bucket: a TTS prompt plus its first seconds of audio
# Nodes that must never run on the CPU of a CUDA session: each would move activations (and, for
# Attention / TensorScatter, the whole KV cache) across PCIe every call. ORT's own fusions of
# MatMul / Gemm / Conv keep the weights' work in these op types (FusedMatMul, FusedGemm, FusedConv).
HEAVY_OPS = frozenset({"Attention", "TensorScatter", "MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Conv", "FusedConv", "ConvTranspose"})
# Session config key behind InferenceSession.get_provider_graph_assignment_info: both are in
# onnxruntime-gpu 1.31.1 (the key in libonnxruntime.so.1.31.1, the method in its pybind module) and
# in the CPU 1.32 build the tests run.
RECORD_PLACEMENT = "session.record_ep_graph_assignment_info"

log = logging.getLogger(__name__)


def providers_for(device: str) -> list:
    """Execution providers of a session on `device`. On CUDA the CPU EP stays in the list and CPU
    fallback stays allowed: the CUDA EP deliberately leaves shape subgraphs (Shape -> ... -> Range)
    to the CPU, so `session.disable_cpu_ep_fallback=1` would refuse every backbone graph, and
    together with an explicitly listed CPU EP onnxruntime rejects it outright ("Conflicting session
    configuration", onnxruntime/core/session/inference_session.cc). `check_placement` instead
    refuses a session whose heavy nodes did not land on the GPU."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        require_driver(onnxruntime_cuda(), "onnxruntime-gpu")
        if hasattr(ort, "preload_dlls"):  # CUDA / cuDNN from the nvidia-* wheels of onnxruntime-gpu[cuda,cudnn]
            ort.preload_dlls()
        return [(CUDA_EP, {"device_id": 0}), "CPUExecutionProvider"]
    raise ValueError(f"unknown ONNX Runtime device {device!r} (cpu or cuda)")


def provider_name(entry) -> str:
    """'CUDAExecutionProvider' from either form a provider list holds: a name or (name, options)."""
    return entry[0] if isinstance(entry, tuple) else entry


SPIN_KEY = "session.intra_op.allow_spinning"  # ORT session config: idle intra-op threads busy-wait


def session_options(device: str = "cpu", threads: int | None = None, spinning: bool = False) -> ort.SessionOptions:
    """Shared by every session of the engine. Spinning is off: the backbone's and the codec's intra-op
    threads would otherwise busy-wait against each other (measured 1.2-1.7x faster decode loop on 2 cores).
    CUDA sessions record which EP each node got, for `check_placement`."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # TensorScatter warns on every non-aliased call; we always alias
    if device == "cuda":
        options.add_session_config_entry(RECORD_PLACEMENT, "1")
    options.add_session_config_entry(SPIN_KEY, "1" if spinning else "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def placement(session: ort.InferenceSession) -> dict[str, collections.Counter]:
    """EP name -> Counter of the op types it runs (after ORT's graph optimizations); the session
    must have been created with `RECORD_PLACEMENT` set."""
    by_ep: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for subgraph in session.get_provider_graph_assignment_info():
        for node in subgraph.get_nodes():
            by_ep[subgraph.ep_name][node.op_type] += 1
    return dict(by_ep)


def stray_heavy_nodes(by_ep: dict[str, collections.Counter], ep: str) -> list[str]:
    """'Attention x2 on CPUExecutionProvider', ... for every heavy op type placed on an EP other than `ep`."""
    return sorted(f"{op} x{n} on {other}" for other, ops in by_ep.items() if other != ep for op, n in ops.items() if op in HEAVY_OPS)


def check_placement(session: ort.InferenceSession, name: str, ep: str = CUDA_EP) -> dict[str, collections.Counter]:
    """Log where `name`'s nodes run and raise if a heavy node is not on `ep`. Also catches
    onnxruntime's Python fallback, which silently re-creates a session on the CPU alone when the CUDA
    EP fails to load (missing CUDA / cuDNN libraries)."""
    if session.get_providers()[0] != ep:
        raise RuntimeError(
            f"{name}: onnxruntime could not start {ep} and fell back to {session.get_providers()} (its log above names the "
            "missing library): install onnxruntime-gpu[cuda,cudnn] (make setup-gpu) or a CUDA 13 toolkit with cuDNN 9"
        )
    by_ep = placement(session)
    if not by_ep:
        raise RuntimeError(f"{name}: no node placement recorded (create the session with session_options('cuda'))")
    for ep_name, ops in sorted(by_ep.items()):
        log.info("%s on %s: %s", name, ep_name, ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())))
    stray = stray_heavy_nodes(by_ep, ep)
    if stray:
        raise RuntimeError(
            f"{name}: heavy nodes are not on {ep}: {', '.join(stray)}; each would copy its inputs between host and device "
            "every call. This onnxruntime has no kernel for them on the GPU: install the pinned onnxruntime-gpu (make setup-gpu)"
        )
    return by_ep


def open_session(path: str | Path, options: ort.SessionOptions, providers: list, name: str | None = None) -> ort.InferenceSession:
    """A session of the graph at `path`; when `providers` lead with the CUDA EP it must also pass
    `check_placement` (logged and refused as `name`, by default the file's name)."""
    session = ort.InferenceSession(str(path), options, providers=providers)
    if provider_name(providers[0]) == CUDA_EP:
        check_placement(session, name or Path(path).name)
    return session


class _DeviceBuffer:
    """A contiguous (slots, heads, rows, head_dim) buffer on the EP's device with a base address for pointer binding."""

    def __init__(self, shape: tuple[int, ...], dtype, device: str):
        self.shape, self.dtype, self.device = shape, np.dtype(dtype), device
        if device == "cpu":
            self.host = np.zeros(shape, dtype)
            self.ptr = self.host.ctypes.data
        else:  # zeroed: masked rows still enter the matmuls, and NaN garbage would survive a mask
            self.value = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), "cuda", 0)
            self.ptr = self.value.data_ptr()
        self.row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize

    def resized(self, rows: int, held: np.ndarray) -> "_DeviceBuffer":
        """A CPU buffer of `rows` rows per slot holding this one's first held[slot] rows of every slot."""
        new = _DeviceBuffer(self.shape[:2] + (rows,) + self.shape[3:], self.dtype, self.device)
        for slot in np.flatnonzero(held):
            new.host[slot, :, : held[slot]] = self.host[slot, :, : held[slot]]
        return new

    def bind(self, binding: ort.IOBinding, name: str, start: int, rows: int, output: bool) -> None:
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.device, 0, self.dtype, (rows,) + self.shape[1:], self.ptr + start * self.row_bytes)


class OrtBackbone(BackboneRuntime):
    name = "onnxruntime"

    def __init__(
        self,
        manifest: Manifest,
        max_batch: int = 8,
        max_len: int = 2048,
        device: str = "cpu",
        threads: int | None = None,
        prefill_graph: bool = True,
        unmasked_steps: bool | None = None,
        min_bucket: int | None = MIN_BUCKET,
    ):
        """prefill_graph=False skips the prefill session (and, on a GPU, its copy of every weight);
        prompts then go through `prefill_split`. unmasked_steps (default: on CUDA) runs the text and
        audio graphs with single-position Attention free of the mask (`graph_edit.unmasked_single_token_attention`),
        which lets onnxruntime's CUDA Attention use Flash Attention for decode steps. min_bucket: the
        smallest CPU cache bucket in rows per slot; None keeps max_len rows from the start (always on CUDA,
        where the buffers are device memory this class does not copy)."""
        super().__init__(manifest, max_batch, max_len)
        if min_bucket is not None and min_bucket < 2:
            raise ValueError(f"min_bucket {min_bucket}: a cache bucket needs at least 2 rows (one is the scratch row)")
        if manifest.dtype not in _NP_DTYPES:
            raise ValueError(
                f"ONNX Runtime runs float32 / float16 graphs; these are {manifest.dtype} (use TensorRT, or re-export with DTYPE=float16)"
            )
        self.device = device
        options = session_options(device, threads)
        providers = providers_for(device)
        graphs = [g for g in BACKBONE_GRAPHS if prefill_graph or g != "prefill"]
        unmasked = device == "cuda" if unmasked_steps is None else unmasked_steps
        self.sessions = {}
        for g in graphs:
            path = manifest.graph_path(g)
            if unmasked and g in STEP_GRAPHS:  # onnxruntime has read the copy once the session exists
                with edited_graph(path, unmasked_single_token_attention, "unmasked_steps") as copy:
                    self.sessions[g] = open_session(copy, options, providers, path.name)
            else:
                self.sessions[g] = open_session(path, options, providers)
        self.has_prefill_graph = prefill_graph
        spec = self.spec
        cache_dtype = _NP_DTYPES[manifest.dtype]
        self._min_bucket = min_bucket if device == "cpu" else None
        self.cache_rows = max_len if self._min_bucket is None else self._bucket(1)
        self._held = np.zeros(max_batch, np.int64)  # slot -> rows its sequence has written (what a resize keeps)
        shape = (max_batch, spec.num_kv_heads, self.cache_rows, spec.head_dim)
        self.cache = [
            (_DeviceBuffer(shape, cache_dtype, device), _DeviceBuffer(shape, cache_dtype, device)) for _ in range(spec.num_layers)
        ]
        self.text_logits = np.zeros((max_batch, spec.vocab_size), np.float32)
        self.audio_logits = np.zeros((max_batch, spec.num_codebooks, spec.codebook_stride), np.float32)
        self._outputs = {g: [o.name for o in session.get_outputs() if o.name.endswith("_logits")] for g, session in self.sessions.items()}
        self._step_bindings: dict[tuple[str, int, int], tuple[ort.IOBinding, dict[str, np.ndarray]]] = {}

    def _bind(self, graph: str, slot: int, inputs: dict[str, np.ndarray]) -> ort.IOBinding:
        session = self.sessions[graph]
        binding = session.io_binding()
        rows = len(inputs["cache_lengths"])
        for name, array in inputs.items():
            binding.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
        for layer, (key, value) in enumerate(self.cache):
            for kind, buffer in (("key", key), ("value", value)):
                buffer.bind(binding, f"past_{kind}_{layer}", slot, rows, output=False)
                buffer.bind(binding, f"present_{kind}_{layer}", slot, rows, output=True)
        for name in self._outputs[graph]:
            host = self.text_logits if name == "text_logits" else self.audio_logits
            binding.bind_output(name, "cpu", 0, np.float32, (rows,) + host.shape[1:], host.ctypes.data)
        return binding

    @property
    def scratch_position(self) -> int:
        return self.cache_rows - 1

    def _bucket(self, rows: int) -> int:
        """The smallest bucket of at least `rows` rows: a power of two, at least min_bucket, at most max_len."""
        return min(self.max_len, max(self._min_bucket, 1 << (rows - 1).bit_length()))

    def reserve(self, positions: int) -> None:
        """Resize to the bucket that holds the longest live sequence and `positions`, plus the scratch
        row above them: grows before a write would not fit, shrinks once long sequences have ended."""
        if self._min_bucket is not None:
            rows = self._bucket(max(positions, int(self._held.max())) + 1)
            if rows != self.cache_rows:
                self._resize(rows)

    def release(self, slot: int) -> None:
        self._held[slot] = 0

    def _resize(self, rows: int) -> None:
        started = time.perf_counter()
        self.cache = [(key.resized(rows, self._held), value.resized(rows, self._held)) for key, value in self.cache]
        self._step_bindings.clear()  # they point into the old buffers
        log.debug("KV cache %d -> %d rows per slot (%d live sequences) in %.1f ms", self.cache_rows, rows,
                  np.count_nonzero(self._held), 1000 * (time.perf_counter() - started))
        self.cache_rows = rows

    def replace_session(self, graph: str, session: ort.InferenceSession) -> ort.InferenceSession:
        """Run `graph` through `session` from now on (the same graph with other options, e.g. profiling
        or spinning threads) and return the session it replaces. The cached step bindings of `graph` are
        dropped: an IO binding belongs to the session that made it."""
        replaced = self.sessions[graph]
        self.sessions[graph] = session
        for key in [key for key in self._step_bindings if key[0] == graph]:
            del self._step_bindings[key]
        return replaced

    def run(self, graph: str, slot: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(inputs["cache_lengths"])
        if slot < 0 or slot + rows > self.max_batch:
            raise ValueError(f"slots [{slot}, {slot + rows}) outside the {self.max_batch} cache slots")
        self._track(slot, inputs)
        single_token = all(a.ndim < 2 or a.shape[1] == 1 for a in inputs.values())
        if single_token:
            key = (graph, slot, rows)
            if key not in self._step_bindings:
                buffers = {name: np.ascontiguousarray(array).copy() for name, array in inputs.items()}
                self._step_bindings[key] = (self._bind(graph, slot, buffers), buffers)
            binding, buffers = self._step_bindings[key]
            for name, array in inputs.items():
                np.copyto(buffers[name], array)
        else:
            buffers = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
            binding = self._bind(graph, slot, buffers)
        self.sessions[graph].run_with_iobinding(binding)
        return {name: (self.text_logits if name == "text_logits" else self.audio_logits)[:rows] for name in self._outputs[graph]}

    def _track(self, slot: int, inputs: dict[str, np.ndarray]) -> None:
        """Record the rows each sequence of this call will hold; rows at the scratch position are passengers.
        A call the base class did not `reserve` for (a caller of `run`) grows the cache first if it must."""
        lengths = np.asarray(inputs["cache_lengths"], np.int64)
        new = next(a.shape[1] for name, a in inputs.items() if name in ("input_ids", "audio_codes"))
        real = lengths != self.scratch_position
        if self._min_bucket is not None and real.any() and int(lengths[real].max()) + new > self.scratch_position:
            self._resize(self._bucket(int(lengths[real].max()) + new + 1))
        self._held[slot : slot + len(lengths)][real] = lengths[real] + new

    def cache_view(self, layer: int, kind: str) -> np.ndarray:
        """Host view of one cache buffer (CPU device only; tests and debugging)."""
        buffer = self.cache[layer][0 if kind == "key" else 1]
        if buffer.device != "cpu":
            raise RuntimeError("cache_view needs the CPU device")
        return buffer.host
