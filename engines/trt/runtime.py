"""TensorRT backbone runtime: one engine per backbone graph, the KV cache and IO on one CUDA stream.

Engines come from `python -m engines.trt.build` (default location: ARTIFACTS/engines, see
engine_dir.py for what the directory holds). `TrtBackbone` refuses engines that do not fit this
machine or these artifacts (TensorRT version, GPU compute capability, artifacts re-exported since the
build, requested max_batch / max_len beyond the built profiles) instead of failing somewhere inside
TensorRT.

Memory is allocated once: the KV cache (per layer a K and a V buffer of (max_batch, kv_heads,
max_len, head_dim), zeroed, because attention multiplies masked positions by zero and uninitialised
NaN bits would survive that), device buffers for the graph inputs and the logits, and pinned host
buffers they are copied from / to. Every tensor is bound by name; `present_*` is bound to the address
of its `past_*` (plus the slot offset), which TensorRT's KV cache update layer requires, so the cache
is updated in place. Token ids / codes / positions in and logits out are the only host transfers.

Single-token calls (decode steps, length-1 runs of a split prefill) get an execution context per
(graph, first slot, rows) whose shapes and addresses never change (decode steps always start at slot
0 with 1, 2, 4, ... max_batch rows, see engines/runtime.py, so there are a handful per graph); after
its first (warm-up) execution the H2D copies, the engine and the D2H copies are captured into a CUDA
graph, and later calls with that key replay it. Multi-token calls (prompts) go through one context per
engine on the prefill optimization profile, without graphs. Audio sampling runs in the `audio_sampler`
graph on ONNX Runtime's CUDA EP (engines/sampling.py `GraphSampler`, see docs/gpu.md); the logits
reach it through the host.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path

import numpy as np

from ..manifest import Manifest, ModelSpec
from ..runtime import BackboneRuntime
from .device import Cuda, engine_reader, import_tensorrt
from .engine_dir import ENGINES_JSON, EngineMismatch, artifacts_fingerprint, engine_mismatches, load_engines_meta

CACHE_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}  # bytes per KV cache element (numpy has no bfloat16)
DEFAULT_STEP_GRAPHS = 64  # captured decode keys kept (each holds an execution context and a CUDA graph)

log = logging.getLogger(__name__)


def cache_row_bytes(spec: ModelSpec, dtype: str, cache_len: int) -> int:
    """Bytes of one slot in one K or V buffer: (kv_heads, cache_len, head_dim) elements."""
    return spec.num_kv_heads * cache_len * spec.head_dim * CACHE_ITEMSIZE[dtype]


def cache_buffer_bytes(spec: ModelSpec, dtype: str, max_batch: int, cache_len: int) -> int:
    """Bytes of one K or V buffer of max_batch slots, rounded up to 256 so every buffer starts aligned;
    the runtime allocates 2 x num_layers of them."""
    return -(-max_batch * cache_row_bytes(spec, dtype, cache_len) // 256) * 256


@dataclasses.dataclass
class _Engine:
    name: str
    engine: object
    profiles: dict[str, int]  # profile kind ("decode" / "prefill") -> optimization profile index
    logits: list[str]
    inputs: list[str]  # non-cache inputs
    prefill_context: object | None = None
    prefill_config: object | None = None  # the runtime config the context was made from, kept alive with it


@dataclasses.dataclass
class _Step:
    """A decode key's execution context (fixed shapes and addresses) and, once captured, its CUDA graph."""

    context: object
    config: object  # the runtime config the context was made from, kept alive with it
    copies_in: list[tuple[int, int, int]]
    copies_out: list[tuple[int, int, int]]
    graph: object | None = None


class TrtBackbone(BackboneRuntime):
    name = "tensorrt"

    def __init__(
        self,
        manifest: Manifest,
        max_batch: int,
        max_len: int,
        *,
        engines_dir: str | Path | None = None,
        cuda_graphs: bool = True,
        step_graphs: int = DEFAULT_STEP_GRAPHS,
    ):
        super().__init__(manifest, max_batch, max_len)
        self._closed = True  # nothing to free until allocation starts
        engines_dir = Path(engines_dir) if engines_dir is not None else manifest.root / "engines"
        meta = load_engines_meta(engines_dir)
        trt = import_tensorrt()
        self.cuda = cuda = Cuda()
        self.gpu_name, capability = cuda.device()
        problems = engine_mismatches(
            meta,
            tensorrt_version=trt.__version__,
            compute_capability=capability,
            fingerprint=artifacts_fingerprint(manifest),
            dtype=manifest.dtype,
            max_batch=max_batch,
            max_len=max_len,
        )
        if problems:
            raise EngineMismatch(f"engines in {engines_dir} cannot be used:\n  - " + "\n  - ".join(problems))
        self.trt, self.meta = trt, meta
        self.cache_len = meta["max_len"]  # the engines' static sequence dim; max_len <= cache_len
        self.cuda_graphs = cuda_graphs
        self.graph_failure: str | None = None
        self._step_capacity = step_graphs
        self._steps: collections.OrderedDict[tuple[str, int, int], _Step] = collections.OrderedDict()
        self._device: list[int] = []
        self._pinned: list[int] = []
        self._closed = False
        try:
            self.stream = cuda.check(cuda.rt.cudaStreamCreate())
            self._allocate()
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self._engines = {g: self._load(engines_dir, g, entry) for g, entry in meta["graphs"].items()}
            self.has_prefill_graph = "prefill" in self._engines
        except BaseException:
            self.close()
            raise

    # -- setup ---------------------------------------------------------------------------------------
    def _allocate(self) -> None:
        spec, cuda, n = self.spec, self.cuda, self.max_batch
        self.cache_row_bytes = cache_row_bytes(spec, self.manifest.dtype, self.cache_len)
        self.cache_bytes = cache_buffer_bytes(spec, self.manifest.dtype, n, self.cache_len)
        self.cache_base = cuda.malloc(2 * spec.num_layers * self.cache_bytes, zero=True)
        self._device.append(self.cache_base)
        tokens = max(n, self.cache_len - 1)  # decode: n rows x 1; prefill profile: 1 row x up to cache_len - 1
        per_token = {"input_ids": (1, np.int64), "audio_codes": (spec.num_codebooks, np.int64), "audio_mask": (1, np.bool_)}
        sizes = {name: (tokens * width, dtype) for name, (width, dtype) in per_token.items()}
        sizes.update(cache_lengths=(n, np.int64), last_index=(n, np.int64))
        self._in_dev, self._in_host, self._in_host_ptr = {}, {}, {}
        for name, (count, dtype) in sizes.items():
            self._in_dev[name] = cuda.malloc(count * np.dtype(dtype).itemsize)
            self._device.append(self._in_dev[name])
            self._in_host_ptr[name], self._in_host[name] = cuda.pinned(count, dtype)
            self._pinned.append(self._in_host_ptr[name])
        shapes = {"text_logits": (n, spec.vocab_size), "audio_logits": (n, spec.num_codebooks, spec.codebook_stride)}
        self._out_dev, self._out_host, self._out_host_ptr = {}, {}, {}
        for name, shape in shapes.items():
            count = int(np.prod(shape))
            self._out_dev[name] = cuda.malloc(count * 4)
            self._device.append(self._out_dev[name])
            self._out_host_ptr[name], flat = cuda.pinned(count, np.float32)
            self._pinned.append(self._out_host_ptr[name])
            self._out_host[name] = flat.reshape(shape)

    def _load(self, engines_dir: Path, graph: str, entry: dict) -> _Engine:
        trt, path = self.trt, engines_dir / entry["file"]
        with engine_reader(path) as reader:
            engine = self._runtime.deserialize_cuda_engine(reader)
        if engine is None:
            raise EngineMismatch(f"{path}: TensorRT could not deserialize it (see the log above); rebuild with make engine")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        graph_io = self.manifest.graphs[graph]
        expected = [v["name"] for v in graph_io["inputs"] + graph_io["outputs"]]
        if sorted(names) != sorted(expected):
            raise EngineMismatch(f"{path}: its tensors differ from the manifest's {graph} graph; rebuild with make engine")
        cache_shape = list(engine.get_tensor_shape("past_key_0"))
        if cache_shape[2] != self.cache_len:
            raise EngineMismatch(f"{path}: KV cache length {cache_shape[2]}, {ENGINES_JSON} says {self.cache_len}; rebuild")
        want = {"float16": trt.DataType.HALF, "bfloat16": trt.DataType.BF16, "float32": trt.DataType.FLOAT}[self.manifest.dtype]
        if engine.get_tensor_dtype("past_key_0") != want:
            raise EngineMismatch(f"{path}: KV cache type {engine.get_tensor_dtype('past_key_0')}, expected {want}; rebuild")
        item = _Engine(
            name=graph,
            engine=engine,
            profiles={kind: spec["index"] for kind, spec in entry["profiles"].items()},
            logits=[v["name"] for v in graph_io["outputs"] if v["name"].endswith("_logits")],
            inputs=[v["name"] for v in graph_io["inputs"] if not v["name"].startswith("past_")],
        )
        if "prefill" in item.profiles:  # created now so its activation memory is claimed at startup
            item.prefill_context, item.prefill_config = self._context(item, item.profiles["prefill"])
        return item

    def _context(self, item: _Engine, profile: int) -> tuple:
        """An execution context holding activation memory for one optimization profile only, with
        the runtime config it was made from (kept alive as long as the context)."""
        trt = self.trt
        config = item.engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE)
        context = item.engine.create_execution_context(config)
        if context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {item.name} (out of GPU memory?)")
        context.set_optimization_profile_async(profile, self.stream)
        return context, config

    # -- binding -------------------------------------------------------------------------------------
    def _bind(self, item: _Engine, context, slot: int, inputs: dict[str, np.ndarray]):
        """Shapes and addresses of one call; returns its H2D and D2H copies (dst, src, bytes)."""
        rows = len(inputs["cache_lengths"])
        copies_in = []
        for name in item.inputs:
            array = inputs[name]
            context.set_input_shape(name, array.shape)
            context.set_tensor_address(name, self._in_dev[name])
            copies_in.append((self._in_dev[name], self._in_host_ptr[name], array.nbytes))
        spec = self.spec
        cache_shape = (rows, spec.num_kv_heads, self.cache_len, spec.head_dim)
        for layer in range(spec.num_layers):
            for k, kind in enumerate(("key", "value")):
                address = self.cache_base + (2 * layer + k) * self.cache_bytes + slot * self.cache_row_bytes
                context.set_input_shape(f"past_{kind}_{layer}", cache_shape)
                context.set_tensor_address(f"past_{kind}_{layer}", address)
                context.set_tensor_address(f"present_{kind}_{layer}", address)  # in place: same memory
        copies_out = []
        for name in item.logits:
            context.set_tensor_address(name, self._out_dev[name])
            nbytes = rows * int(np.prod(self._out_host[name].shape[1:])) * 4
            copies_out.append((self._out_host_ptr[name], self._out_dev[name], nbytes))
        return copies_in, copies_out

    def _stage(self, item: _Engine, inputs: dict[str, np.ndarray]) -> None:
        for name in item.inputs:
            array = inputs[name]
            host = self._in_host[name][: array.size].reshape(array.shape)
            np.copyto(host, array, casting="same_kind")

    def _enqueue(self, context, copies_in, copies_out) -> None:
        rt, cuda = self.cuda.rt, self.cuda
        for dst, src, nbytes in copies_in:
            cuda.copy_async(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream)
        if not context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        for dst, src, nbytes in copies_out:
            cuda.copy_async(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream)

    def _sync(self) -> None:
        self.cuda.check(self.cuda.rt.cudaStreamSynchronize(self.stream))

    # -- graphs --------------------------------------------------------------------------------------
    def _capture(self, step: _Step):
        """Record copies + engine into a CUDA graph; on failure, run without graphs from now on."""
        rt, cuda = self.cuda.rt, self.cuda
        cuda.check(rt.cudaStreamBeginCapture(self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            self._enqueue(step.context, step.copies_in, step.copies_out)
            failure = None
        except RuntimeError as error:
            failure = str(error)
        err, graph = rt.cudaStreamEndCapture(self.stream)  # always end the capture, even an invalidated one
        if failure is None and err != rt.cudaError_t.cudaSuccess:
            failure = f"cudaStreamEndCapture returned {err}"
        if failure is not None:  # the graph is NULL when capture failed
            self._disable_graphs(f"capturing a decode step failed: {failure}")
            return None
        try:
            return cuda.check(rt.cudaGraphInstantiateWithFlags(graph, 0))
        except RuntimeError as error:
            self._disable_graphs(f"instantiating a decode graph failed: {error}")
            return None
        finally:
            cuda.check(rt.cudaGraphDestroy(graph))

    def _disable_graphs(self, reason: str) -> None:
        self.cuda_graphs, self.graph_failure = False, reason
        log.warning("CUDA graphs disabled, steps run uncaptured: %s", reason)

    def _release(self, step: _Step) -> None:
        if step.graph is not None:
            self.cuda.check(self.cuda.rt.cudaGraphExecDestroy(step.graph))
            step.graph = None

    # -- the interface -------------------------------------------------------------------------------
    def run(self, graph: str, slot: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("TrtBackbone is closed")
        rows = len(inputs["cache_lengths"])
        if slot < 0 or slot + rows > self.max_batch:
            raise ValueError(f"slots [{slot}, {slot + rows}) outside the {self.max_batch} cache slots")
        item = self._engines.get(graph)
        if item is None:
            raise ValueError(f"no {graph} engine in {sorted(self._engines)} (built with --no-prefill? prefill() splits then)")
        length = max((a.shape[1] for a in inputs.values() if a.ndim >= 2), default=1)
        self._stage(item, inputs)
        if length == 1 and "decode" in item.profiles:
            self._run_step(item, slot, inputs)
        else:
            if rows != 1 or "prefill" not in item.profiles:
                raise ValueError(f"{graph}: {rows} rows x {length} tokens fits no optimization profile (prompts run one slot at a time)")
            copies_in, copies_out = self._bind(item, item.prefill_context, slot, inputs)
            self._enqueue(item.prefill_context, copies_in, copies_out)
            self._sync()
        return {name: self._out_host[name][:rows] for name in item.logits}

    def _run_step(self, item: _Engine, slot: int, inputs: dict[str, np.ndarray]) -> None:
        key = (item.name, slot, len(inputs["cache_lengths"]))
        step = self._steps.get(key)
        if step is None:
            context, config = self._context(item, item.profiles["decode"])
            step = _Step(context, config, *self._bind(item, context, slot, inputs))
            self._enqueue(step.context, step.copies_in, step.copies_out)  # warm-up run (its results are returned)
            self._sync()
            if self.cuda_graphs:
                step.graph = self._capture(step)
            self._steps[key] = step
            while len(self._steps) > self._step_capacity:
                self._release(self._steps.popitem(last=False)[1])
            return
        self._steps.move_to_end(key)
        if step.graph is not None:
            self.cuda.check(self.cuda.rt.cudaGraphLaunch(step.graph, self.stream))
        else:
            self._enqueue(step.context, step.copies_in, step.copies_out)
        self._sync()

    # -- cache transfers (engines.trt.check, tests) --------------------------------------------------
    def _cache_host_dtype(self):
        if self.manifest.dtype == "bfloat16":
            raise ValueError("bfloat16 caches have no numpy type; host copies need float16 or float32 artifacts")
        return np.dtype(self.manifest.dtype)

    def upload_cache(self, slot: int, arrays: list[np.ndarray]) -> None:
        """Write host caches [k0, v0, k1, v1, ...], each (rows, kv_heads, cache_len, head_dim), into slots from `slot`."""
        dtype, kind = self._cache_host_dtype(), self.cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        for index, array in enumerate(arrays):
            array = np.ascontiguousarray(array, dtype)
            if array.shape[1:] != (self.spec.num_kv_heads, self.cache_len, self.spec.head_dim) or slot + len(array) > self.max_batch:
                raise ValueError(f"cache {index}: shape {array.shape} does not fit slots from {slot}")
            address = self.cache_base + index * self.cache_bytes + slot * self.cache_row_bytes
            self.cuda.copy(address, array.ctypes.data, array.nbytes, kind)

    def download_cache(self, slot: int, rows: int) -> list[np.ndarray]:
        """Host copies [k0, v0, k1, v1, ...] of slots [slot, slot + rows)."""
        dtype, kind = self._cache_host_dtype(), self.cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        shape = (rows, self.spec.num_kv_heads, self.cache_len, self.spec.head_dim)
        arrays = []
        for index in range(2 * self.spec.num_layers):
            array = np.empty(shape, dtype)
            self.cuda.copy(array.ctypes.data, self.cache_base + index * self.cache_bytes + slot * self.cache_row_bytes, array.nbytes, kind)
            arrays.append(array)
        return arrays

    def close(self) -> None:
        """Free graphs, contexts, engines and every buffer (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        rt = self.cuda.rt
        for step in self._steps.values():
            self._release(step)
        self._steps.clear()
        self._engines = {}
        for ptr in self._device:
            self.cuda.check(rt.cudaFree(ptr))
        for ptr in self._pinned:
            self.cuda.check(rt.cudaFreeHost(ptr))
        self._device, self._pinned = [], []
        if getattr(self, "stream", None) is not None:
            self.cuda.check(rt.cudaStreamDestroy(self.stream))
            self.stream = None
