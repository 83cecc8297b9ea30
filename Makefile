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

.PHONY: help setup demo test tiny export verify check-onnx engine check-engine generate bench serve clean

help:
	@echo "make demo      set up, build the tiny default (checkpoint + ONNX) and synthesise $(WAV)"
	@echo "make test      set up and run the test suite"
	@echo "make export    CHECKPOINT=DIR CODEC=DIR OUT=DIR [DTYPE=float32|float16|bfloat16]"
	@echo "make verify    CHECKPOINT=DIR GOLDEN=FILE [ARTIFACTS=DIR]"
	@echo "make check-onnx ARTIFACTS=DIR [CHECKPOINT=DIR] polygraphy: ONNX Runtime vs torch reference (default: the exported checkpoint)"
	@echo "make engine    ARTIFACTS=DIR [PRECISION=fp16|bf16|fp32] [MAX_BATCH=..] [MAX_LEN=..] [NO_PREFILL=1]"
	@echo "make check-engine ARTIFACTS=DIR                polygraphy: TensorRT vs ONNX Runtime"
	@echo "make generate  ARTIFACTS=DIR TEXT='...' WAV=out.wav"
	@echo "make serve     [MODEL=name] [HOST=..] [PORT=..] [ARTIFACTS=DIR]"
	@echo "make bench     CPU benchmarks (ratios measured in one run)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

setup: $(STAMP)

$(TINY)/.done: $(STAMP) export/tiny.py
	$(PY) -m export.tiny --out $(TINY)
	@touch $@

tiny: $(TINY)/.done

build/tiny-onnx/manifest.json: $(TINY)/.done
	$(PY) -m export --checkpoint $(TINY)/llm --codec $(TINY)/codec --out build/tiny-onnx

demo: build/tiny-onnx/manifest.json
	$(PY) -m engines.generate --artifacts build/tiny-onnx --text "$(TEXT)" --out $(WAV)

test: $(STAMP)
	$(PY) -m pytest -q

export: $(STAMP) $(if $(filter $(TINY)/%,$(CHECKPOINT)),$(TINY)/.done)
	$(PY) -m export --checkpoint $(CHECKPOINT) $(if $(CODEC),--codec $(CODEC)) --out $(OUT) --dtype $(DTYPE)

verify: $(STAMP)
	@test -n "$(GOLDEN)" || { echo "usage: make verify CHECKPOINT=DIR GOLDEN=FILE [ARTIFACTS=DIR]"; exit 2; }
	$(PY) -m export.verify --checkpoint $(CHECKPOINT) --golden $(GOLDEN) $(if $(filter command line,$(origin ARTIFACTS)),--artifacts $(ARTIFACTS))

check-onnx: $(STAMP)
	$(PY) -m export.check_onnx --artifacts $(ARTIFACTS) $(if $(filter command line,$(origin CHECKPOINT)),--checkpoint $(CHECKPOINT)) $(if $(filter command line,$(origin CODEC)),--codec $(CODEC))

engine: $(STAMP)
	$(PY) -m engines.build_engine --artifacts $(ARTIFACTS) --precision $(PRECISION) --max-batch $(MAX_BATCH) --max-len $(MAX_LEN) --out $(ENGINES) $(if $(NO_PREFILL),--no-prefill)

check-engine: $(STAMP)
	$(PY) -m engines.check_engine --artifacts $(ARTIFACTS) --engines $(ENGINES)

generate: $(STAMP)
	$(PY) -m engines.generate --artifacts $(ARTIFACTS) --text "$(TEXT)" --out $(WAV)

serve: $(if $(filter command line,$(origin ARTIFACTS)),$(STAMP),build/tiny-onnx/manifest.json)
	$(PY) -m serve --artifacts $(ARTIFACTS) --host $(HOST) --port $(PORT) --model $(MODEL)

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf build
