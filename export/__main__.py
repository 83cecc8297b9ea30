"""`make export`: checkpoint (+ codec) -> ONNX graphs, shared weights and manifest.json.

    python -m export --checkpoint DIR [--codec DIR] --out DIR [--dtype float32|float16|bfloat16|int8|int4]

int8 / int4: weight-only quantized backbone graphs (export/quantize.py) in DIR, made from a float32
export kept in DIR/float32 (their reference for export.quantize.agreement).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from engines.manifest import CODEC_DECODER, CODEC_ENCODER, FORMAT, SAMPLER, TOKENIZER_FILE, graph_file

from .checkpoint import CheckpointError
from .config import ConfigError
from .llm import load_backbone
from .onnx_export import DTYPES, copy_if_present, export_backbone, write_manifest
from .onnx_sampler import export_audio_sampler
from .quantize import BITS, quantize_artifacts



def _log(message: str) -> None:
    print(f"[export] {message}", flush=True)


def _progress(label: str):
    marks = set()

    def report(done: int, total: int) -> None:
        step = done * 10 // total
        if step not in marks:
            marks.add(step)
            _log(f"{label}: {done}/{total} tensors")

    return report


def run(checkpoint: Path, codec: Path | None, out: Path, dtype_name: str) -> Path:
    started = time.time()
    _log(f"loading {checkpoint} as {dtype_name}")
    model = load_backbone(checkpoint, DTYPES[dtype_name], progress=_progress("loading"))
    config = model.config
    _log(
        f"{config.num_layers} layers, hidden {config.hidden_size}, heads {config.num_heads}/{config.num_kv_heads}, "
        f"{config.num_codebooks} codebooks, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
    )
    graphs = export_backbone(model, out, log=_log)
    _log(f"exporting {graph_file(SAMPLER)} (audio sampling next to the logits)")
    graphs[SAMPLER] = export_audio_sampler(config.num_codebooks, config.codebook_stride, out / graph_file(SAMPLER))
    del model
    codec_info = None
    if codec is not None:
        from .codec import load_codec
        from .onnx_codec import export_codec_decoder, export_codec_encoder

        _log(f"loading codec {codec}")
        codec_model = load_codec(codec)
        if codec_model.config.num_quantizers != config.num_codebooks:
            raise ConfigError(
                f"the codec in {codec} has {codec_model.config.num_quantizers} codebooks but the LLM expects "
                f"{config.num_codebooks}: pass the codec this model was trained with (CODEC=DIR)"
            )
        for key, export_graph in ((CODEC_DECODER, export_codec_decoder), (CODEC_ENCODER, export_codec_encoder)):
            _log(f"exporting {graph_file(key)}")
            graphs[key] = export_graph(codec_model, out / graph_file(key))
        codec_info = {key: graphs[CODEC_DECODER][key] for key in ("sample_rate", "hop_length", "num_quantizers", "codebook_size")}
    has_tokenizer = copy_if_present(checkpoint / TOKENIZER_FILE, out / TOKENIZER_FILE)
    if not has_tokenizer:
        _log(f"note: {checkpoint} has no tokenizer.json; the artifacts run on token ids only (no text prompts)")
    manifest = {
        "format": FORMAT,
        "dtype": dtype_name,
        "model": config.to_json(),
        "codec": codec_info,
        "tokenizer": TOKENIZER_FILE if has_tokenizer else None,
        "kv_cache": {
            "layout": "per layer: past_key_{i} / past_value_{i} (batch, num_kv_heads, max_len, head_dim); "
            "bind present_* to the same buffer (TensorScatter writes in place at cache_lengths)",
            "dtype": dtype_name,
        },
        "graphs": graphs,
        "source": {"checkpoint": str(checkpoint.resolve()), "codec": str(codec.resolve()) if codec else None},
    }
    path = write_manifest(out, manifest)
    _log(f"wrote {path} in {time.time() - started:.1f}s")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="LLM directory: config.json + *.safetensors")
    parser.add_argument("--codec", type=Path, help="codec directory: config.json + model.pth (or transformers safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="artifacts directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES) + sorted(BITS), default="float32")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_dir():
        parser.error(f"--checkpoint {args.checkpoint} is not a directory (CHECKPOINT=DIR with config.json and *.safetensors)")
    if args.codec is not None and not args.codec.is_dir():
        parser.error(f"--codec {args.codec} is not a directory (CODEC=DIR with config.json and model.pth)")
    try:
        if args.dtype in BITS:
            run(args.checkpoint, args.codec, args.out / "float32", "float32")
            quantize_artifacts(args.out / "float32", args.out, BITS[args.dtype], log=_log)
        else:
            run(args.checkpoint, args.codec, args.out, args.dtype)
    except (ConfigError, CheckpointError, ValueError) as error:
        print(f"[export] error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
