"""`python -m serve --artifacts DIR [...]`: build the engine from exported artifacts and serve it.

API keys come from repeated --api-key flags plus HIGGS_API_KEYS (comma-separated); with none,
the server is open.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import os
from pathlib import Path

from engines.api import SamplingParams
from engines.logs import setup_logging
from serve.settings import Limits, ServeSettings


def parser(prog: str = "python -m serve", description: str | None = __doc__) -> argparse.ArgumentParser:
    """The server's flags; serve/ray_serve.py adds its own to the same parser."""
    defaults, limits, sampling = ServeSettings(), Limits(), SamplingParams()
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--artifacts", type=Path, required=True, help="directory written by `make export`")
    p.add_argument("--model", default=defaults.model_name, help="served model name")
    p.add_argument("--alias", action="append", default=[],
                   help=f"extra accepted model name (repeatable); {defaults.aliases} are always accepted")
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--runtime", choices=("ort-cpu", "ort-cuda", "tensorrt"), default=defaults.runtime)
    p.add_argument("--max-batch", type=int, default=defaults.max_batch, help="concurrent decode slots")
    p.add_argument("--max-len", type=int, default=defaults.max_len,
                   help="KV cache positions per slot (prompt + generated steps)")
    p.add_argument("--queue-size", type=int, default=defaults.queue_size,
                   help="requests waiting for a slot before new ones get 429")
    p.add_argument("--api-key", action="append", default=[], help="accepted bearer key (repeatable)")
    p.add_argument("--voices", type=Path, help="voice preset directory (see serve/voices.py for layouts)")
    p.add_argument("--voice-alias", action="append", default=[], metavar="NAME=PRESET",
                   help="map a client voice name (e.g. alloy) to a preset or a built-in voice (repeatable)")
    p.add_argument("--temperature", type=float, default=sampling.temperature, help="default when a request omits it")
    p.add_argument("--top-p", type=float, default=sampling.top_p, help="default when a request omits it")
    p.add_argument("--top-k", type=int, default=sampling.top_k, help="default when a request omits it (off)")
    p.add_argument("--ras-win-len", type=int, default=sampling.ras_window, help="RAS window, <= 0 disables")
    p.add_argument("--ras-max-repeat", type=int, default=sampling.ras_max_repeat)
    p.add_argument("--max-input-chars", type=int, default=limits.max_input_chars)
    p.add_argument("--max-completion-tokens", type=int, default=limits.max_completion_tokens)
    p.add_argument("--max-reference-seconds", type=float, default=limits.max_reference_seconds)
    p.add_argument("--no-normalize-text", dest="normalize_text", action="store_false",
                   help="speak /v1/audio/speech input as sent (requests may still ask with normalize_text)")
    p.add_argument("--chunk-chars", type=int, default=defaults.chunk_chars,
                   help="longer text is generated in chunks of at most this many characters")
    p.add_argument("--chunk-context", type=int, default=defaults.chunk_context,
                   help="previous chunks (text + generated audio) kept in each chunk's prompt")
    p.add_argument("--shutdown-timeout", type=float, default=defaults.shutdown_timeout_s,
                   help="seconds to let in-flight requests finish on shutdown")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def settings_from_args(args: argparse.Namespace, environ=os.environ) -> ServeSettings:
    defaults = ServeSettings()
    env_keys = [k.strip() for k in environ.get("HIGGS_API_KEYS", "").split(",") if k.strip()]
    voice_aliases = {}
    for item in args.voice_alias:
        name, sep, preset = item.partition("=")
        if not sep or not name or not preset:
            raise SystemExit(f"--voice-alias expects NAME=PRESET, got {item!r}")
        voice_aliases[name] = preset
    if args.chunk_chars < 1 or args.chunk_context < 0:
        raise SystemExit("--chunk-chars must be at least 1 and --chunk-context at least 0")
    limits = dataclasses.replace(Limits(), max_input_chars=args.max_input_chars,
                                 max_completion_tokens=args.max_completion_tokens,
                                 default_max_tokens=min(Limits().default_max_tokens, args.max_completion_tokens),
                                 max_reference_seconds=args.max_reference_seconds)
    return ServeSettings(
        artifacts=args.artifacts,
        model_name=args.model,
        aliases=tuple(dict.fromkeys((*defaults.aliases, *args.alias))),
        host=args.host,
        port=args.port,
        runtime=args.runtime,
        max_batch=args.max_batch,
        max_len=args.max_len,
        queue_size=args.queue_size,
        api_keys=tuple(args.api_key + env_keys),
        voices_dir=args.voices,
        voice_aliases=voice_aliases,
        sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                ras_window=args.ras_win_len, ras_max_repeat=args.ras_max_repeat),
        limits=limits,
        shutdown_timeout_s=args.shutdown_timeout,
        normalize_text=args.normalize_text,
        chunk_chars=args.chunk_chars,
        chunk_context=args.chunk_context,
    )


def build_engine(settings: ServeSettings, threads: int | None = None):
    """The decode loop for these settings, loaded but not started. `threads`: ONNX Runtime's
    intra-op threads (default: all cores; a Ray replica passes its CPU share)."""
    from engines.loop import Engine  # imported here: parsing flags does not need the runtimes
    from engines.gpu_env import require_runtime

    require_runtime(settings.runtime)  # a GPU runtime that cannot run here fails now, naming the install
    return Engine.from_artifacts(settings.artifacts, runtime=settings.runtime, max_batch=settings.max_batch,
                                 max_len=settings.max_len, max_queue=settings.queue_size, threads=threads)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level)
    settings = settings_from_args(args)

    import uvicorn

    from serve.app import create_app
    from serve.edge import server_options

    try:
        engine = build_engine(settings)
    except (OSError, ValueError, RuntimeError) as error:  # ManifestError, missing graphs, runtime not installed
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    engine.start()  # warm-up before listening: the first request pays no graph setup
    uvicorn.run(create_app(engine, settings), host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=int(settings.shutdown_timeout_s), **server_options(settings))


if __name__ == "__main__":
    main()
