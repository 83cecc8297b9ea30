"""`make check-onnx`: polygraphy compares every exported graph on ONNX Runtime with the torch reference.

    python -m export.check_onnx --artifacts DIR [--checkpoint DIR] [--codec DIR]

For each graph it writes polygraphy inputs (a prefill-shaped and a decode-shaped feed) and the torch
outputs for them, then runs `polygraphy run GRAPH --onnxrt --load-inputs ... --load-outputs ...`
(printed, so it can be re-run by hand). Checkpoints default to the ones recorded in manifest.json.

Quantized graphs (make export DTYPE=int4|int8) are checked against their own float32 reference: the
torch model holding the very weights the graphs store, dequantized (export.quantize.dequantized_weights:
weight products and embedding tables), within export.quantize.QUANTIZED_RTOL x max |reference| per output.
That catches a broken graph (a weight or table packed into the wrong place), not the quantization error,
which is then reported against the float32 graphs they were made from (export.quantize.agreement: numbers,
no gate).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from polygraphy.comparator import RunResults
from polygraphy.comparator.struct import IterationResult
from polygraphy.json import save_json

from engines.manifest import CODEC_DECODER, Manifest, ManifestError

from .llm import Mode, load_backbone
from .onnx_export import DTYPES
from .quantize import QUANTIZED_RTOL, dequantized_weights, distance_report, scheme
from .streamed import GRAPH_MODES

ATOL = {"float32": 1e-4, "float16": 1e-2}  # README: fp16 graphs vs the float32 reference


def _backbone_feeds(config, mode: Mode, dtype: np.dtype, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """A 2-row prefill (different cache lengths) and a 3-row single-token step over a random cache."""
    feeds = []
    for batch, length, max_len in ((2, 9, 24), (3, 1, 24)):
        feed = {
            "input_ids": rng.integers(0, config.vocab_size, (batch, length)),
            "audio_codes": rng.integers(0, config.codebook_stride, (batch, length, config.num_codebooks)),
            "audio_mask": rng.random((batch, length)) < 0.5,
            "cache_lengths": rng.integers(0, max_len - length, batch),
            "last_index": rng.integers(0, length, batch),
        }
        if mode is Mode.TEXT:
            del feed["audio_codes"], feed["audio_mask"]
        elif mode is Mode.AUDIO:
            del feed["input_ids"], feed["audio_mask"]
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        for layer in range(config.num_layers):
            for kind in ("key", "value"):
                feed[f"past_{kind}_{layer}"] = rng.standard_normal(shape).astype(dtype)
        feeds.append({k: (v.astype(np.int64) if v.dtype.kind in "iu" else v) for k, v in feed.items()})
    return feeds


def _backbone_outputs(model, mode: Mode, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tensors = {k: torch.from_numpy(v.copy()) for k, v in feed.items()}
    past = [(tensors[f"past_key_{i}"], tensors[f"past_value_{i}"]) for i in range(model.config.num_layers)]
    text, audio, present = model(
        mode, tensors.get("input_ids"), tensors.get("audio_codes"), tensors.get("audio_mask"),
        tensors["cache_lengths"], tensors["last_index"], past,
    )
    outputs = {}
    if text is not None:
        outputs["text_logits"] = text.numpy()
    if audio is not None:
        outputs["audio_logits"] = audio.numpy()
    for i, (k, v) in enumerate(present):
        outputs[f"present_key_{i}"], outputs[f"present_value_{i}"] = k.float().numpy(), v.float().numpy()
    return outputs


def _codec_feeds(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    return [{"codes": rng.integers(0, 1024, (b, 8, t)).astype(np.int64)} for b, t in ((1, 1), (2, 7), (1, 50))]


def _load_dequantized(model, artifacts: Path) -> None:
    """Give `model` the weights the quantized graphs in `artifacts` compute with. Parameters of equal values (a
    tied text head and embedding) all get the dequantized values of the one tensor a float32 export stores for
    them (quantizing equal rows gives equal codes, so this holds for a streamed export's two copies too)."""
    params = dict(model.named_parameters())
    equal: dict[tuple, list[str]] = {}
    for name, param in params.items():
        equal.setdefault((param.shape, hashlib.sha256(param.numpy()).digest()), []).append(name)
    twins = {name: names for names in equal.values() for name in names}
    for name, weight in dequantized_weights(artifacts):
        if name not in params or params[name].shape != weight.shape:
            # the float32 export names bytes no parameter holds after the exporter's initializer: what
            # export.quantize made of such a tensor cannot be mapped back onto the model's parameters
            raise ValueError(f"{artifacts}: quantized weight {name!r} is not a model parameter of that shape (quantized "
                             "by python -m export.quantize from a float32 export with shared tensors); re-export with "
                             "make export DTYPE=int4|int8, which names every weight after its checkpoint tensor")
        for twin in twins[name]:
            params[twin].copy_(torch.from_numpy(weight))


def _quantized_atol(outputs: list[dict]) -> dict[str, float]:
    return {name: QUANTIZED_RTOL * max(float(np.abs(o[name]).max()) for o in outputs) for name in outputs[0]}


def _polygraphy(graph: Path, feeds: list[dict], outputs: list[dict], atol: float | dict[str, float], work: Path) -> bool:
    inputs, reference = work / f"{graph.stem}.inputs.json", work / f"{graph.stem}.torch.json"
    save_json(feeds, str(inputs))
    results = [IterationResult({k: np.asarray(v) for k, v in o.items()}, runner_name="torch") for o in outputs]
    RunResults([("torch", results)]).save(str(reference))
    command = [
        str(Path(sys.executable).parent / "polygraphy"), "run", str(graph), "--onnxrt",
        "--load-inputs", str(inputs), "--load-outputs", str(reference), "--rtol", "0",
        "--atol", *([f"{name}:{value:.3g}" for name, value in atol.items()] if isinstance(atol, dict) else [str(atol)]),
    ]
    print("$ polygraphy " + " ".join(command[1:]), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    summary = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if "PASSED" in line or "FAILED" in line]
    print("\n".join(summary[-3:]) or result.stderr[-2000:], flush=True)
    return result.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.check_onnx", description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, help="LLM checkpoint (default: the one in manifest.json)")
    parser.add_argument("--codec", type=Path, help="codec checkpoint (default: the one in manifest.json)")
    parser.add_argument("--graphs", nargs="+", choices=[*GRAPH_MODES, CODEC_DECODER], default=[*GRAPH_MODES, CODEC_DECODER],
                        help="check only these graphs (default: all)")
    args = parser.parse_args(argv)
    try:
        manifest = Manifest.load(args.artifacts)
    except ManifestError as error:
        parser.error(str(error))
    checkpoint = args.checkpoint or Path(manifest.source["checkpoint"])
    codec_dir = args.codec or (Path(manifest.source["codec"]) if manifest.source.get("codec") else None)
    if manifest.dtype == "bfloat16":
        parser.error("bfloat16 graphs do not run on ONNX Runtime CPU; check them on TensorRT with make check-engine")
    dtype = DTYPES[manifest.dtype]
    model = load_backbone(checkpoint, dtype)
    quantization = scheme(args.artifacts)
    if quantization:
        print(f"check-onnx: int{quantization['bits']} graphs against the float32 model holding their dequantized weights")
        try:
            _load_dequantized(model, args.artifacts)
        except ValueError as error:
            parser.error(str(error))
    rng = np.random.default_rng(0)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for key, mode in GRAPH_MODES.items():
            if key not in args.graphs:
                continue
            feeds = _backbone_feeds(model.config, mode, torch.empty(0, dtype=dtype).numpy().dtype, rng)
            outputs = [_backbone_outputs(model, mode, feed) for feed in feeds]
            atol = _quantized_atol(outputs) if quantization else ATOL[manifest.dtype]
            ok &= _polygraphy(manifest.graph_path(key), feeds, outputs, atol, Path(tmp))
        if codec_dir is not None and manifest.has(CODEC_DECODER) and CODEC_DECODER in args.graphs:
            from .codec import load_codec

            codec = load_codec(codec_dir)
            feeds = _codec_feeds(rng)
            with torch.no_grad():
                outputs = [{"audio": codec.decode(torch.from_numpy(f["codes"])).numpy()} for f in feeds]
            ok &= _polygraphy(manifest.graph_path(CODEC_DECODER), feeds, outputs, 1e-5, Path(tmp))
    del model
    if quantization:
        print("check-onnx: " + distance_report(args.artifacts), flush=True)
    print("check-onnx: " + ("all graphs match the torch reference" if ok else "MISMATCH (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
