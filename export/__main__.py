"""`make export`: checkpoint (+ codec) -> ONNX graphs, shared weights and manifest.json.

    python -m export --checkpoint DIR [--codec DIR] --out DIR [--dtype float32|float16|bfloat16|int8|int4]
                     [--block-size 32] [--accuracy-level 4] [--no-float32-reference]

int8 / int4: weight-only quantized backbone graphs (export/quantize.py) in DIR, written straight from the
checkpoint one tensor at a time (export/streamed.py: no float32 copy of the model in RAM), with float32
graphs of the same weights in DIR/float32 (made the same way) as their reference for check-onnx and
verify; --no-float32-reference skips those (a 3B's are 23 GB on disk).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


from engines.manifest import CODEC_DECODER, CODEC_ENCODER, FORMAT, SAMPLER, TOKENIZER_FILE, Manifest, graph_file

from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .llm import load_backbone
from .onnx_export import DTYPES, copy_if_present, export_backbone, write_manifest
from .onnx_sampler import export_audio_sampler
from .quantize import BITS, DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, add_scheme_arguments, check_scheme, quantization_entry
from .streamed import export_streamed


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


def _backbone(checkpoint: Path, out: Path, dtype_name: str, streamed: bool, block_size: int, accuracy_level: int):
    """(config, backbone graph entries): through a torch model in `dtype_name`, or streamed (export/streamed.py)."""
    if streamed:
        if dtype_name not in BITS and dtype_name != "float32":
            raise ValueError(f"the streamed export writes float32, int8 or int4 graphs, not {dtype_name}")
        config = load_config(checkpoint)
        _log(f"tracing {checkpoint}'s graphs on fake weights, then writing {dtype_name} weights one tensor at a time")
        return config, export_streamed(checkpoint, config, out, BITS.get(dtype_name), log=_log, block_size=block_size,
                                       accuracy_level=accuracy_level)
    _log(f"loading {checkpoint} as {dtype_name}")
    model = load_backbone(checkpoint, DTYPES[dtype_name], progress=_progress("loading"))
    config = model.config
    _log(
        f"{config.num_layers} layers, hidden {config.hidden_size}, heads {config.num_heads}/{config.num_kv_heads}, "
        f"{config.num_codebooks} codebooks, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
    )
    return config, export_backbone(model, out, log=_log)


def _copy_codec(reference: Path, out: Path, graphs: dict) -> dict:
    """The codec graphs the float32 reference exported in this same command, copied rather than exported twice."""
    manifest = Manifest.load(reference)
    for key in (CODEC_DECODER, CODEC_ENCODER):
        if manifest.has(key):
            graphs[key] = manifest.graphs[key]
            shutil.copyfile(manifest.graph_path(key), out / graphs[key]["file"])
    return manifest.codec


def run(checkpoint: Path, codec: Path | None, out: Path, dtype_name: str, streamed: bool = False,
        float32_source: Path | None = None, block_size: int = DEFAULT_BLOCK_SIZE, accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> Path:
    """Export into `out`; int8 / int4 are always streamed (float32_source: their float32 reference, if kept,
    whose codec graphs are then copied; block_size / accuracy_level: their quantization)."""
    started = time.time()
    config, graphs = _backbone(checkpoint, out, dtype_name, streamed or dtype_name in BITS, block_size, accuracy_level)
    _log(f"exporting {graph_file(SAMPLER)} (audio sampling next to the logits)")
    graphs[SAMPLER] = export_audio_sampler(config.num_codebooks, config.codebook_stride, out / graph_file(SAMPLER))
    codec_info = None
    if codec is not None and float32_source is not None:
        codec_info = _copy_codec(float32_source, out, graphs)
    elif codec is not None:
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
    graph_dtype = "float32" if dtype_name in BITS else dtype_name  # activations, logits, KV cache
    manifest = {
        "format": FORMAT,
        "dtype": graph_dtype,
        "model": config.to_json(),
        "codec": codec_info,
        "tokenizer": TOKENIZER_FILE if has_tokenizer else None,
        "kv_cache": {
            "layout": "per layer: past_key_{i} / past_value_{i} (batch, num_kv_heads, max_len, head_dim); "
            "bind present_* to the same buffer (TensorScatter writes in place at cache_lengths)",
            "dtype": graph_dtype,
        },
        "graphs": graphs,
        "source": {"checkpoint": str(checkpoint.resolve()), "codec": str(codec.resolve()) if codec else None},
    }
    if dtype_name in BITS:
        manifest["quantization"] = quantization_entry(BITS[dtype_name], float32_source, block_size, accuracy_level)
    path = write_manifest(out, manifest)
    _log(f"wrote {path} in {time.time() - started:.1f}s")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="LLM directory: config.json + *.safetensors")
    parser.add_argument("--codec", type=Path, help="codec directory: config.json + model.pth (or transformers safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="artifacts directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES) + sorted(BITS), default="float32")
    parser.add_argument("--no-float32-reference", action="store_true",
                        help="int8 / int4: skip the float32 graphs in OUT/float32 (the reference check-onnx and verify report against)")
    add_scheme_arguments(parser)
    args = parser.parse_args(argv)
    if not args.checkpoint.is_dir():
        parser.error(f"--checkpoint {args.checkpoint} is not a directory (CHECKPOINT=DIR with config.json and *.safetensors)")
    if args.codec is not None and not args.codec.is_dir():
        parser.error(f"--codec {args.codec} is not a directory (CODEC=DIR with config.json and model.pth)")
    if args.no_float32_reference and args.dtype not in BITS:
        parser.error(f"--no-float32-reference applies to DTYPE=int4|int8 only (there is no float32 reference of a {args.dtype} export)")
    scheme = (args.block_size, args.accuracy_level)
    if args.dtype not in BITS and scheme != (DEFAULT_BLOCK_SIZE, DEFAULT_ACCURACY_LEVEL):
        parser.error(f"--block-size / --accuracy-level apply to DTYPE=int4|int8 only, not {args.dtype}")
    if args.dtype in BITS:
        try:
            check_scheme(BITS[args.dtype], *scheme)
        except ValueError as error:
            parser.error(str(error))
    try:
        if args.dtype in BITS:
            reference = None if args.no_float32_reference else args.out / "float32"
            if reference:
                run(args.checkpoint, args.codec, reference, "float32", streamed=True)
            run(args.checkpoint, args.codec, args.out, args.dtype, float32_source=reference, block_size=args.block_size,
                accuracy_level=args.accuracy_level)
        else:
            run(args.checkpoint, args.codec, args.out, args.dtype)
    except (ConfigError, CheckpointError, ValueError) as error:
        print(f"[export] error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
