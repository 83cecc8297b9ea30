"""What a GPU runtime needs from this machine, checked before anything is loaded.

The GPU wheels bring their own CUDA runtime, but not the driver: onnxruntime-gpu 1.31.1 is built
for CUDA 13.0 (`onnxruntime/capi/build_and_package_info.py` in the wheel: `cuda_version = '13.0'`),
tensorrt-cu13 and cuda-python 13.x likewise, and a CUDA 13 runtime needs a 580+ driver. A driver
that is too old otherwise shows up as an opaque "CUDA driver version is insufficient" deep inside
the first session or engine; here it is one message that says what to install. No torch, no
cuda-python: the driver is asked through `libcuda.so.1` directly.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util

# The CUDA major every GPU extra of pyproject.toml is built for, and the driver branch it needs
# (CUDA 13.0 release notes, "CUDA Driver" compatibility table: the r580 driver on Linux).
WHEELS_CUDA_MAJOR = 13
MIN_DRIVER = "580"
SETUP_GPU = "make setup-gpu (pip install -e '.[gpu,trt]': onnxruntime-gpu[cuda,cudnn], tensorrt-cu13, cuda-python 13.x; see docs/gpu.md)"
RUNTIMES = ("ort-cpu", "ort-cuda", "tensorrt")


class GpuUnavailable(RuntimeError):
    """A GPU runtime cannot start on this machine; the message names what is missing and how to get it."""


def driver_cuda_version() -> tuple[int, int] | None:
    """(major, minor) of the newest CUDA the installed NVIDIA driver supports; None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:  # CUresult CUDA_SUCCESS == 0
        return None
    return version.value // 1000, (version.value % 1000) // 10


def require_driver(built_for: str, what: str) -> None:
    """Raise GpuUnavailable unless the driver runs CUDA `built_for` ('13.0'), naming the fix."""
    driver = driver_cuda_version()
    if driver is None:
        raise GpuUnavailable(f"{what} needs an NVIDIA GPU and driver: libcuda.so.1 is not loadable here (no NVIDIA driver)")
    need = tuple(int(p) for p in built_for.split(".")[:2])
    if driver < need:
        raise GpuUnavailable(
            f"{what} is built for CUDA {built_for}, but this NVIDIA driver supports CUDA {driver[0]}.{driver[1]} at most: "
            f"install a {MIN_DRIVER}+ driver for CUDA {WHEELS_CUDA_MAJOR} (nvidia-smi shows the CUDA version a driver supports)"
        )


def onnxruntime_cuda() -> str:
    """The CUDA version the installed onnxruntime was built for; GpuUnavailable if it is the CPU build."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise GpuUnavailable(f"onnxruntime is not installed: {SETUP_GPU}")
    import onnxruntime as ort

    from onnxruntime.capi import build_and_package_info as info

    cuda = getattr(info, "cuda_version", "")
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not cuda:
        raise GpuUnavailable(
            f"the installed onnxruntime {ort.__version__} ({info.package_name}) has no CUDAExecutionProvider: {SETUP_GPU} "
            "(it replaces the CPU onnxruntime, which installs into the same module)"
        )
    return cuda


def require_runtime(runtime: str) -> None:
    """Fail at once, before any artifact is read, if `runtime` cannot run here; never falls back to the CPU."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: {', '.join(RUNTIMES)}")
    if runtime == "ort-cuda":
        require_driver(onnxruntime_cuda(), "onnxruntime-gpu")
    elif runtime == "tensorrt":
        for module, package in (("tensorrt", "tensorrt-cu13"), ("cuda", "cuda-python")):
            if importlib.util.find_spec(module) is None:
                raise GpuUnavailable(f"{package} is not installed: {SETUP_GPU}")
        major = tensorrt_cuda_major()
        require_driver(f"{major}.0", f"TensorRT (tensorrt-cu{major})")


def tensorrt_cuda_major() -> int:
    """The CUDA major of the installed TensorRT wheel: NVIDIA ships one distribution per major
    (tensorrt-cu12, tensorrt-cu13; the bare `tensorrt` 11.4 metapackage pulls tensorrt-cu13)."""
    for major in (13, 12):
        try:
            importlib.metadata.version(f"tensorrt-cu{major}")
            return major
        except importlib.metadata.PackageNotFoundError:
            continue
    return WHEELS_CUDA_MAJOR
