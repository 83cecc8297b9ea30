"""Work the benchmarks run in child processes (so its time and peak RSS are its own).

    python -m bench._child load CHECKPOINT_DIR DTYPE     time export.llm.load_backbone
    python -m bench._child write-codec OUT_DIR SIZE      export.tiny_codec.write_tiny_codec
    python -m bench._child export-codec CODEC_DIR OUT    codec_decoder.onnx + codec_encoder.onnx only
    python -m bench._child serve ARTIFACTS CODEC_ONNX STEPS PREFILL   engine start-up, one greedy request (PREFILL: graph|split)

Output ends with `BENCH_RESULT {json}` (`read_result` reads it back) and `BENCH_PEAK_RSS <bytes>`
(this process's VmHWM).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from engines.manifest import CODEC_DECODER, CODEC_ENCODER, graph_file

from .profiling import status_field_bytes

RESULT_PREFIX = "BENCH_RESULT "
CODEC_LISTING = "graphs.json"  # export-codec: graph key -> file, or codec_encoder_error -> why it is missing


def _emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def read_result(output: str) -> dict:
    """The result a task printed (its last `BENCH_RESULT` line), {} when there is none."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return {}


def _rss() -> dict:
    """This process's resident memory now: total, anonymous (heap) and file-backed (mmap) bytes."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    fields = {key: status_field_bytes(status, key) for key in ("VmRSS", "RssAnon", "RssFile")}
    return {key: value for key, value in fields.items() if value is not None}


def load(checkpoint: str, dtype_name: str) -> dict:
    """load_backbone, then one read of every 4 KiB page of every parameter (what the first forward
    pass or an export does): the loader may leave tensors memory-mapped, which costs nothing until touched."""
    import torch

    from export.llm import load_backbone

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    started = time.perf_counter()
    model = load_backbone(checkpoint, dtype)
    seconds = time.perf_counter() - started
    after_load = _rss()
    params = list(model.parameters())
    started = time.perf_counter()
    with torch.inference_mode():
        for p in params:
            flat = p.detach().reshape(-1)
            flat[:: max(1, 4096 // p.element_size())].float().sum()
    touch = time.perf_counter() - started
    return {
        "seconds": seconds,
        "touch_seconds": touch,
        "rss_after_load": after_load,
        "rss_after_touch": _rss(),
        "parameters": sum(p.numel() for p in params),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
    }


def write_codec(out: str, size: str) -> dict:
    from export.tiny_codec import write_tiny_codec

    started = time.perf_counter()
    write_tiny_codec(out, seed=0, size=size)
    return {"seconds": time.perf_counter() - started}


def export_codec(codec_dir: str, out: str) -> dict:
    from export.codec import load_codec
    from export.onnx_codec import export_codec_decoder, export_codec_encoder

    started = time.perf_counter()
    codec = load_codec(codec_dir)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    graphs = {}
    graphs[CODEC_DECODER] = export_codec_decoder(codec, out_dir / graph_file(CODEC_DECODER))
    try:
        graphs[CODEC_ENCODER] = export_codec_encoder(codec, out_dir / graph_file(CODEC_ENCODER))
    except Exception as error:  # the decoder is still useful without it; the bench reports the reason
        graphs["codec_encoder_error"] = f"{type(error).__name__}: {error}"
    (out_dir / CODEC_LISTING).write_text(json.dumps(graphs, indent=2))
    return {"seconds": time.perf_counter() - started, "graphs": sorted(graphs)}


def serve(artifacts: str, codec_onnx: str, steps: str, prefill: str) -> dict:
    """What a server does before it reports healthy (backbone sessions, codec, warm-up), then one
    greedy request of `steps` audio steps with stream EOS masked: start-up seconds and RSS.
    prefill 'split' skips the prefill session: ORT prepacks every MatMul weight into the session's
    own heap, so the prefill session is a second private copy of every weight."""
    from engines.api import SamplingParams, SpeechRequest
    from engines.codec import CodecDecoder
    from engines.loop import Engine
    from engines.manifest import Manifest
    from engines.ort_runtime import OrtBackbone
    from engines.prompt import PromptRenderer, tts_messages

    from .harness import LOOP_TEXT, no_stream_eos

    started = time.perf_counter()
    manifest = Manifest.load(artifacts)
    runtime = no_stream_eos(OrtBackbone(manifest, max_batch=1, max_len=512, prefill_graph=prefill == "graph"))
    renderer = PromptRenderer(manifest.tokenizer, manifest.model.num_codebooks)
    engine = Engine(runtime, CodecDecoder(codec_onnx, ["CPUExecutionProvider"]), renderer=renderer)
    engine.warmup()
    startup, rss_ready = time.perf_counter() - started, _rss()
    handle = engine.submit(SpeechRequest(tts_messages(LOOP_TEXT), sampling=SamplingParams(temperature=0.0), max_tokens=int(steps)))
    while engine.step():
        pass
    handle.poll()
    engine.shutdown()
    return {"startup_seconds": startup, "rss_ready": rss_ready, "rss_end": _rss()}


def main(argv: list[str]) -> int:
    from ._peak import report_at_exit

    report_at_exit()
    task, *args = argv
    tasks = {"load": load, "write-codec": write_codec, "export-codec": export_codec, "serve": serve}
    if task not in tasks:
        print(f"unknown task {task!r}: {sorted(tasks)}", file=sys.stderr)
        return 2
    _emit(tasks[task](*args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
