"""TensorRT: engines built from the exported backbone graphs, and the runtime that serves them.

    device.py        tensorrt / cuda-python / polygraphy imports (each naming the install when missing)
                     and error-checked CUDA runtime calls
    engine_dir.py    the engine directory: engines.json (what the engines were built for), engine file
                     names, the artifacts fingerprint, and why a directory cannot serve a request
    static_cache.py  the copy of a backbone graph TensorRT parses (static KV cache length, attention inputs)
    runtime.py       TrtBackbone: the engines behind the BackboneRuntime interface, on one CUDA stream
    build.py         `make engine` (python -m engines.trt.build)
    check.py         `make check-engine` (python -m engines.trt.check): engines against ONNX Runtime

Importing any of these loads neither tensorrt nor cuda-python: they are imported when an engine is
built, checked or opened, so the package (and the CPU test suite) works on machines without them.
"""
