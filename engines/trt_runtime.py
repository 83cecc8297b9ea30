"""TensorRT backbone runtime: one engine per backbone graph, the KV cache and IO on one CUDA stream.

Engines come from `python -m engines.build_engine` (default location: ARTIFACTS/engines, with
`engines.json` beside them). `TrtBackbone` refuses engines that do not fit this machine or these
artifacts (TensorRT version, GPU compute capability, artifacts re-exported since the build,
requested max_batch / max_len beyond the built profiles) instead of failing somewhere inside TensorRT.

Memory is allocated once: the KV cache (per layer a K and a V buffer of (max_batch, kv_heads,
max_len, head_dim), zeroed, because attention multiplies masked positions by zero and uninitialised
NaN bits would survive that), device buffers for the graph inputs and the logits, and pinned host
buffers they are copied from / to. Every tensor is bound by name; `present_*` is bound to the address
of its `past_*` (plus the slot offset), which TensorRT's KV cache update layer requires, so the cache
is updated in place. Token ids / codes / positions in and logits out are the only host transfers.

Single-token calls (decode steps, length-1 runs of a split prefill) get an execution context per
(graph, first slot, rows) whose shapes and addresses never change (decode steps always start at slot
0 with 1, 2, 4, ... max_batch rows, see runtime.py, so there are a handful per graph); after its first (warm-up)
execution the H2D copies, the engine and the D2H copies are captured into a CUDA graph, and later
calls with that key replay it. Multi-token calls (prompts) go through one context per engine on the
prefill optimization profile, without graphs. Audio sampling runs in the `audio_sampler` graph on
ONNX Runtime's CUDA EP (engines/sampling.py `GraphSampler`, see docs/gpu.md); the logits reach it
through the host.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from .gpu_env import GpuUnavailable, require_driver, tensorrt_cuda_major
from .manifest import BACKBONE_GRAPHS, WEIGHTS_FILE, Manifest
from .runtime import BackboneRuntime

ENGINES_JSON = "engines.json"
ENGINES_FORMAT = 1
MIN_TENSORRT = (10, 15)  # first release importing ONNX TensorScatter as IKVCacheUpdateLayer
PRECISION_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
CACHE_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
INSTALL = (
    "make setup-gpu (pip install '.[gpu,trt]') on an NVIDIA machine: tensorrt-cu13 >= 10.15 (the first TensorRT to "
    "import ONNX TensorScatter as its KV cache update layer) and cuda-python 13.x, for CUDA 13 (driver 580+); see docs/gpu.md"
)
DEFAULT_STEP_GRAPHS = 64  # captured decode keys kept (each holds an execution context and a CUDA graph)


class MissingDependency(RuntimeError):
    """tensorrt or cuda-python is not importable (or too old); the message names the install command."""


class EngineMismatch(RuntimeError):
    """The engines in a directory cannot serve these artifacts on this machine; the message says why and how to fix."""


# --- imports that only GPU machines have ----------------------------------------------------------


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as error:
        raise MissingDependency(f"the tensorrt Python package is not installed ({error}). {INSTALL}") from None
    if version_tuple(trt.__version__)[:2] < MIN_TENSORRT:
        raise MissingDependency(f"TensorRT {trt.__version__} is too old. {INSTALL}")
    major = tensorrt_cuda_major()
    try:  # a too-old driver would otherwise surface as an opaque CUDA error in the first call
        require_driver(f"{major}.0", f"TensorRT {trt.__version__} (tensorrt-cu{major})")
    except GpuUnavailable as error:
        raise MissingDependency(str(error)) from None
    return trt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as error:
            raise MissingDependency(f"cuda-python is not installed ({error}). {INSTALL}") from None
    return cudart


def engine_reader(path: Path):
    """A stream reader TensorRT deserializes `path` from, chunk by chunk, instead of a host copy of the
    whole plan (11.5 GB at 3B with read_bytes()). polygraphy 0.53's FileReader implements
    IStreamReader on TensorRT 10 and IStreamReaderV2 (read + seek) on TensorRT 11
    (polygraphy/backend/trt/file_reader.py); both are accepted by Runtime.deserialize_cuda_engine."""
    try:
        from polygraphy.backend.trt import FileReader
    except ImportError as error:
        raise MissingDependency(f"polygraphy is not installed ({error}). {INSTALL}") from None
    return FileReader(str(path))


class Cuda:
    """Error-checked CUDA runtime calls through cuda-python (every call returns (error, *values))."""

    def __init__(self):
        self.rt = import_cudart()

    def check(self, result):
        err, *values = result
        if err != self.rt.cudaError_t.cudaSuccess:
            _, text = self.rt.cudaGetErrorString(err)
            raise RuntimeError(f"CUDA error {err}: {text.decode() if isinstance(text, bytes) else text}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def device(self) -> tuple[str, str]:
        """(name, compute capability 'major.minor') of the current device."""
        props = self.check(self.rt.cudaGetDeviceProperties(self.check(self.rt.cudaGetDevice())))
        name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
        return name, f"{props.major}.{props.minor}"

    def malloc(self, nbytes: int, zero: bool = False) -> int:
        ptr = int(self.check(self.rt.cudaMalloc(max(nbytes, 1))))
        if zero:
            self.check(self.rt.cudaMemset(ptr, 0, max(nbytes, 1)))
        return ptr

    def pinned(self, count: int, dtype) -> tuple[int, np.ndarray]:
        """Page-locked host memory as a flat numpy array (async copies and graph capture need it)."""
        dtype = np.dtype(dtype)
        nbytes = max(count * dtype.itemsize, 1)
        ptr = int(self.check(self.rt.cudaMallocHost(nbytes)))
        raw = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
        return ptr, raw[: count * dtype.itemsize].view(dtype)

    def copy_async(self, dst: int, src: int, nbytes: int, kind, stream) -> None:
        self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream))

    def copy(self, dst: int, src: int, nbytes: int, kind) -> None:
        self.check(self.rt.cudaMemcpy(dst, src, nbytes, kind))


# --- engines.json: what an engine directory was built for -------------------------------------------


def artifacts_fingerprint(manifest: Manifest) -> dict:
    """What ties engines to the export they were built from: the manifest's hash, and size + mtime of
    the shared weights and of every backbone graph (a re-export rewrites them)."""
    root = manifest.root
    files = [WEIGHTS_FILE] + [manifest.graphs[g]["file"] for g in BACKBONE_GRAPHS if g in manifest.graphs]
    stats = {name: [(root / name).stat().st_size, int((root / name).stat().st_mtime)] for name in files}
    return {"manifest_sha256": hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest(), "files": stats}


def load_engines_meta(engines_dir: Path) -> dict:
    path = Path(engines_dir) / ENGINES_JSON
    if not path.is_file():
        raise EngineMismatch(f"{path} not found: build engines first (make engine ARTIFACTS=... ENGINES={engines_dir})")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != ENGINES_FORMAT:
        raise EngineMismatch(f"{path}: format {meta.get('format')!r}, this version reads {ENGINES_FORMAT}; rebuild with make engine")
    return meta


def engine_mismatches(
    meta: dict,
    *,
    tensorrt_version: str,
    compute_capability: str,
    fingerprint: dict,
    dtype: str,
    max_batch: int,
    max_len: int,
) -> list[str]:
    """Every reason the engines described by `meta` cannot serve this request (empty: they can)."""
    rebuild = "rebuild: make engine (python -m engines.build_engine)"
    problems = []
    if meta["tensorrt_version"] != tensorrt_version:
        problems.append(
            f"built with TensorRT {meta['tensorrt_version']}, this is TensorRT {tensorrt_version} "
            f"(plans only load in the exact version that built them); {rebuild}"
        )
    if meta["gpu"]["compute_capability"] != compute_capability:
        problems.append(
            f"built for compute capability {meta['gpu']['compute_capability']} ({meta['gpu']['name']}), "
            f"this GPU is {compute_capability}; {rebuild} on this machine"
        )
    if meta["onnx_dtype"] != dtype:
        problems.append(f"built from {meta['onnx_dtype']} graphs, the artifacts are now {dtype}; {rebuild}")
    if meta["artifacts"]["manifest_sha256"] != fingerprint["manifest_sha256"]:
        problems.append(f"manifest.json changed since the build (re-exported?); {rebuild}")
    for name, (size, mtime) in fingerprint["files"].items():
        built = meta["artifacts"]["files"].get(name)
        if built is None:
            problems.append(f"{name} was not part of the build; {rebuild}")
        elif built != [size, mtime]:
            problems.append(
                f"{name} changed since the build (size {built[0]} -> {size}, mtime {built[1]} -> {mtime}); "
                f"{rebuild} (copy artifacts with their mtimes, e.g. cp -p / rsync -t, to keep engines valid)"
            )
    if max_batch > meta["max_batch"]:
        problems.append(f"max_batch {max_batch} is beyond the built profiles (max {meta['max_batch']}); rebuild with --max-batch {max_batch}")
    if max_len > meta["max_len"]:
        problems.append(
            f"max_len {max_len} is beyond the engines' static KV cache length {meta['max_len']}; "
            f"rebuild with --max-len {max_len} or ask for at most {meta['max_len']}"
        )
    return problems


# --- the runtime --------------------------------------------------------------------------------------


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
        max_batch: int = 8,
        max_len: int = 2048,
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
        self.cache_row_bytes = spec.num_kv_heads * self.cache_len * spec.head_dim * CACHE_ITEMSIZE[self.manifest.dtype]
        self.cache_bytes = -(-n * self.cache_row_bytes // 256) * 256
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
            raise EngineMismatch(f"{path}: KV cache length {cache_shape[2]}, engines.json says {self.cache_len}; rebuild")
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
        print(f"[tensorrt] CUDA graphs disabled, steps run uncaptured: {reason}", file=sys.stderr)

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

    # -- cache transfers (check_engine, tests) --------------------------------------------------------
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
