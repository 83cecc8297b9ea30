# Higgs Audio outside PyTorch: checkpoint -> torch reference -> ONNX -> engine -> decode loop -> HTTP.
# Every target sets itself up; `make help` lists them.

PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed-dev

# The embedded tiny default: generated deterministically by export/tiny.py, never downloaded.
TINY       := build/tiny
CHECKPOINT ?= $(TINY)/llm
# a real checkpoint never silently gets the tiny codec: CODEC defaults to it only for the tiny LLM
CODEC      ?= $(if $(filter $(TINY)/%,$(CHECKPOINT)),$(TINY)/codec)
ARTIFACTS  ?= build/tiny-onnx
OUT        ?= $(ARTIFACTS)
DTYPE      ?= float32
TEXT       ?= The quick brown fox jumps over the lazy dog.
WAV        ?= build/demo.wav
HOST       ?= 127.0.0.1
PORT       ?= 8000
MODEL      ?= higgs-audio-v2
PRECISION  ?= fp16
MAX_BATCH  ?= 64
MAX_LEN    ?= 2048
ENGINES    ?= $(ARTIFACTS)/engines
RUNTIME    ?= ort-cpu
# GPU runtimes serve as many slots as `make engine` builds for; ONNX Runtime on the CPU keeps the
# server's own default of 8 unless MAX_BATCH is given (64 slots of a 3B cache would be 60 GB of RAM)
SERVE_MAX_BATCH := $(if $(and $(filter ort-cpu,$(RUNTIME)),$(filter file,$(origin MAX_BATCH))),8,$(MAX_BATCH))
# make serve's flags, which make serve-ray passes too
SERVE_FLAGS = --artifacts $(ARTIFACTS) --host $(HOST) --port $(PORT) --model $(MODEL) \
	--runtime $(RUNTIME) --max-batch $(SERVE_MAX_BATCH) --max-len $(MAX_LEN)
GPU_STAMP  := $(VENV)/.installed-gpu
REPLICAS   ?= 2
RAY_STAMP  := $(VENV)/.installed-ray
FUZZ_STAMP := $(VENV)/.installed-fuzz
FUZZ_SECONDS ?= 150

.PHONY: help setup setup-extras setup-gpu gpu-check demo test tiny export verify check-onnx engine check-engine generate bench serve serve-ray fuzz clean

help:
	@echo "make demo      set up, build the tiny default (checkpoint + ONNX) and synthesise $(WAV)"
	@echo "make test      set up and run the test suite"
	@echo "make export    CHECKPOINT=DIR CODEC=DIR OUT=DIR [DTYPE=float32|float16|bfloat16|int8|int4] [NO_FLOAT32_REFERENCE=1: int8/int4 without OUT/float32] [BLOCK_SIZE=32] [ACCURACY_LEVEL=4]"
	@echo "make verify    CHECKPOINT=DIR GOLDEN=FILE [ARTIFACTS=DIR]"
	@echo "make check-onnx ARTIFACTS=DIR [CHECKPOINT=DIR] polygraphy: ONNX Runtime vs torch reference (default: the exported checkpoint; int8/int4: docs/cpu.md)"
	@echo "make engine    ARTIFACTS=DIR [PRECISION=fp16|bf16|fp32] [MAX_BATCH=..] [MAX_LEN=..] [NO_PREFILL=1]"
	@echo "make check-engine ARTIFACTS=DIR                polygraphy: TensorRT vs ONNX Runtime"
	@echo "make generate  ARTIFACTS=DIR TEXT='...' WAV=out.wav"
	@echo "make serve     [MODEL=name] [HOST=..] [PORT=..] [ARTIFACTS=DIR] [RUNTIME=ort-cpu|ort-cuda|tensorrt] [MAX_BATCH=..] [MAX_LEN=..]"
	@echo "make serve-ray [REPLICAS=N] [ARTIFACTS=DIR] ... the same API on a local Ray Serve cluster, one engine per replica (docs/ray.md)"
	@echo "make setup-gpu replace the CPU onnxruntime with the GPU extras (CUDA 13, driver 580+; docs/gpu.md)"
	@echo "make gpu-check prove the GPU path on an NVIDIA machine; report in build/gpu-check/"
	@echo "make bench     CPU benchmarks (ratios measured in one run)"
	@echo "make fuzz      [FUZZ_SECONDS=150] schemathesis, all checks, against the live tiny server"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(GPU_STAMP)
	@touch $@

setup: $(STAMP)

$(TINY)/.done: $(STAMP) export/tiny.py
	$(PY) -m export.tiny --out $(TINY)
	@touch $@

tiny: $(TINY)/.done

build/tiny-onnx/manifest.json: $(TINY)/.done export/onnx_codec.py
	$(PY) -m export --checkpoint $(TINY)/llm --codec $(TINY)/codec --out build/tiny-onnx

demo: build/tiny-onnx/manifest.json
	$(PY) -m engines.generate --artifacts build/tiny-onnx --text "$(TEXT)" --out $(WAV)

test: $(STAMP)
	$(PY) -m pytest -q

export: $(STAMP) $(if $(filter $(TINY)/%,$(CHECKPOINT)),$(TINY)/.done)
	$(PY) -m export --checkpoint $(CHECKPOINT) $(if $(CODEC),--codec $(CODEC)) --out $(OUT) --dtype $(DTYPE) $(if $(NO_FLOAT32_REFERENCE),--no-float32-reference) $(if $(BLOCK_SIZE),--block-size $(BLOCK_SIZE)) $(if $(ACCURACY_LEVEL),--accuracy-level $(ACCURACY_LEVEL))

verify: $(STAMP)
	@test -n "$(GOLDEN)" || { echo "usage: make verify CHECKPOINT=DIR GOLDEN=FILE [ARTIFACTS=DIR]"; exit 2; }
	$(PY) -m export.verify --checkpoint $(CHECKPOINT) --golden $(GOLDEN) $(if $(filter command line,$(origin ARTIFACTS)),--artifacts $(ARTIFACTS))

check-onnx: $(STAMP)
	$(PY) -m export.check_onnx --artifacts $(ARTIFACTS) $(if $(filter command line,$(origin CHECKPOINT)),--checkpoint $(CHECKPOINT)) $(if $(filter command line,$(origin CODEC)),--codec $(CODEC))

engine: $(STAMP)
	$(PY) -m engines.trt.build --artifacts $(ARTIFACTS) --precision $(PRECISION) --max-batch $(MAX_BATCH) --max-len $(MAX_LEN) --out $(ENGINES) $(if $(NO_PREFILL),--no-prefill)

check-engine: $(STAMP)
	$(PY) -m engines.trt.check --artifacts $(ARTIFACTS) --engines $(ENGINES)

generate: $(STAMP)
	$(PY) -m engines.generate --artifacts $(ARTIFACTS) --text "$(TEXT)" --out $(WAV)

serve: $(if $(filter command line,$(origin ARTIFACTS)),$(STAMP),build/tiny-onnx/manifest.json)
	$(PY) -m serve $(SERVE_FLAGS)

$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[ray]'
	@touch $@

serve-ray: $(RAY_STAMP) $(if $(filter command line,$(origin ARTIFACTS)),,build/tiny-onnx/manifest.json)
	$(PY) -m serve.ray_serve $(SERVE_FLAGS) --replicas $(REPLICAS)

# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module, and re-running the dev
# install (pyproject.toml changed) puts the CPU one back over it: that drops this stamp, so the next
# setup-gpu removes both and installs the GPU one alone again.
$(GPU_STAMP): $(STAMP)
	$(PY) -m pip uninstall --quiet --yes onnxruntime onnxruntime-gpu
	$(PY) -m pip install --quiet -e '.[gpu,trt]'
	$(PY) -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 'onnxruntime ' + o.__version__ + ' has no CUDAExecutionProvider after the GPU install; see docs/gpu.md')"
	@touch $@

setup-gpu: $(GPU_STAMP)

# not tied to setup-gpu: on a machine without an NVIDIA GPU it must say so at once, installing nothing
gpu-check:
	@test -x $(PY) || { echo "gpu-check: no $(VENV) yet: run make setup-gpu on an NVIDIA machine first"; exit 2; }
	$(PY) -m bench.gpu_check

$(FUZZ_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[fuzz]'
	@touch $@

# what CI adds to `make test` so the optional parts run instead of skipping (the browser comes from Debian, .ci/run)
setup-extras: $(RAY_STAMP) $(FUZZ_STAMP)

fuzz: $(FUZZ_STAMP) build/tiny-onnx/manifest.json
	$(PY) tests/fuzz.py --artifacts build/tiny-onnx --max-time $(FUZZ_SECONDS)

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf build
