"""What only GPU machines have: tensorrt, cuda-python and polygraphy, imported on first use, and
error-checked CUDA runtime calls.

Each import helper raises `MissingDependency` naming the install command instead of an ImportError
from deep inside a build or a server start; `import_tensorrt` also refuses a TensorRT too old to
import the KV cache update, and a driver too old for the wheel's CUDA.
"""

from __future__ import annotations

import ctypes

import numpy as np

from ..gpu_env import GpuUnavailable, require_driver, tensorrt_cuda_major

MIN_TENSORRT = (10, 15)  # first release importing ONNX TensorScatter as IKVCacheUpdateLayer
INSTALL = (
    "make setup-gpu (pip install '.[gpu,trt]') on an NVIDIA machine: tensorrt-cu13 >= 10.15 (the first TensorRT to "
    "import ONNX TensorScatter as its KV cache update layer) and cuda-python 13.x, for CUDA 13 (driver 580+); see docs/gpu.md"
)


class MissingDependency(RuntimeError):
    """tensorrt or cuda-python is not importable (or too old); the message names the install command."""


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


def engine_reader(path):
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
