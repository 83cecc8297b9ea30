"""`make verify`: check a checkpoint (and optionally its exported graphs and the decode loop) against a golden file.

    python -m export.verify --checkpoint DIR --golden cases.npz [--artifacts DIR]

The golden format is the one of ../shared/golden (each folder's README): an LLM file has
`CASE/prompt_ids`, a codec file has `dec_*` / `enc_*` arrays. Prints the max absolute error of
every output array against its tolerance; the last line is the overall max. Exits 1 when any
array is beyond tolerance, 2 on bad arguments.

Quantized artifacts (make export DTYPE=int4|int8) cannot meet float32 goldens: for them the ONNX and
decode-loop rows are replaced by their distance from the float32 graphs they were made from
(export.quantize.distance_report, not a gate; `make check-onnx` gates the quantized graphs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

LOGITS_ATOL = 1e-4  # llm goldens' README: "1e-4 absolute is a generous tolerance"
AUDIO_ATOL = 1e-5  # codec README: fp32 decode
INTERMEDIATE_RTOL = 1e-4  # codec README: encode intermediates within 1e-4 x max|golden|


class Report:
    def __init__(self):
        self.rows: list[tuple[str, float, float]] = []

    def compare(self, name: str, got, want, atol: float) -> None:
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape:
            print(f"  {name}: shape {got.shape} != golden {want.shape}")
            error = float("inf")
        else:
            error = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if want.size else 0.0
        self.rows.append((name, error, atol))
        print(f"{name:<52} {error:>11.3e} {atol:>10.1e}  {'ok' if error <= atol else 'FAIL'}", flush=True)

    @property
    def passed(self) -> bool:
        return all(error <= tol for _, error, tol in self.rows)

    def overall(self) -> float:
        return max((error for _, error, _ in self.rows), default=0.0)


# --- LLM ----------------------------------------------------------------------------------------------


def llm_cases(golden) -> list[str]:
    return sorted({key.split("/")[0] for key in golden.files if key.endswith("/prompt_ids")})


def golden_prompts(golden, case: str, audio_out: int):
    """(prompt, teacher-forced sequence) as expanded prompts, from the golden's ids and columns."""
    from engines.prompt import expand_prompt

    ids = golden[f"{case}/prompt_ids"]
    segments = [golden[f"{case}/prompt_audio_out_ids"]] if f"{case}/prompt_audio_out_ids" in golden.files else []
    forced = golden[f"{case}/teacher_forced_audio_out_ids"]
    split = segments[0].shape[1] if segments else 0
    forced_segments = [forced[:, :split], forced[:, split:]] if segments else [forced]
    return expand_prompt(ids, segments, audio_out), expand_prompt(np.append(ids, audio_out), forced_segments, audio_out)


def torch_logits(model, prompt):
    from export.llm import Mode

    length = len(prompt.input_ids)
    hidden, _ = model.hidden_states(
        Mode.MIXED,
        torch.from_numpy(prompt.input_ids)[None],
        torch.from_numpy(prompt.audio_codes)[None],
        torch.from_numpy(prompt.audio_mask)[None],
        torch.zeros(1, dtype=torch.int64),
        model.new_cache(1, length + 1),
    )
    hidden = hidden[0]
    mask = torch.from_numpy(prompt.audio_mask)
    return model.text_head(hidden[-1]).numpy(), model.audio_head(hidden[mask]).numpy()


def onnx_logits(runtime, prompt):
    """Prefill up to the first audio position, then one cached step per position (both step graphs)."""
    mask = prompt.audio_mask
    start = int(np.argmax(mask)) if mask.any() else len(mask) - 1
    text_last, audio = None, []
    if start:
        text_last = runtime.prefill(0, prompt.input_ids[:start], prompt.audio_codes[:start], mask[:start]).text
    for position in range(start, len(mask)):
        slot, length = np.array([0]), np.array([position])
        if mask[position]:
            audio.append(runtime.audio_step(slot, prompt.audio_codes[position][None], length)[0])
        else:
            text_last = runtime.text_step(slot, prompt.input_ids[position : position + 1], length)[0]
    return text_last, np.array(audio)


def verify_llm(checkpoint: Path, golden, artifacts: Path | None, report: Report) -> None:
    from export.llm import load_backbone
    from export.quantize import distance_report, scheme

    quantized = artifacts if artifacts is not None and scheme(artifacts) else None
    if quantized is not None:
        print(f"[verify] {quantized} holds quantized graphs: reporting their distance from float32 instead of golden rows")
        artifacts = None
    model = load_backbone(checkpoint)
    audio_out = model.config.audio_out_token_id
    cases = llm_cases(golden)
    runtime = engine = None
    if artifacts is not None:
        from engines.loop import Engine
        from engines.manifest import Manifest
        from engines.ort_runtime import OrtBackbone

        longest = max(len(golden_prompts(golden, c, audio_out)[1].input_ids) for c in cases)
        runtime = OrtBackbone(Manifest.load(artifacts), max_batch=1, max_len=longest + 64)
        engine = Engine(runtime, codec=None)
    for case in cases:
        prompt, forced = golden_prompts(golden, case, audio_out)
        sources: list[tuple[str, Callable]] = [("torch", lambda p: torch_logits(model, p))]
        if runtime is not None:
            sources.append(("onnx", lambda p: onnx_logits(runtime, p)))
        for source, logits in sources:
            text_last, prompt_audio = logits(prompt)
            report.compare(f"{source} {case}/text_logits_last", text_last, golden[f"{case}/text_logits_last"], LOGITS_ATOL)
            if f"{case}/prompt_audio_logits" in golden.files:
                report.compare(f"{source} {case}/prompt_audio_logits", prompt_audio, golden[f"{case}/prompt_audio_logits"], LOGITS_ATOL)
            _, forced_audio = logits(forced)
            report.compare(
                f"{source} {case}/teacher_forced_audio_logits", forced_audio, golden[f"{case}/teacher_forced_audio_logits"], LOGITS_ATOL
            )
        if engine is not None:
            _verify_generation(engine, golden, case, report)
    if quantized is not None:
        del model
        print("[verify] " + distance_report(quantized), flush=True)


def _verify_generation(engine, golden, case: str, report: Report) -> None:
    """Greedy generation through the decode loop, as the goldens were made (README: max 48 steps, RAS off)."""
    from engines.api import Finished, SamplingParams, SpeechRequest
    from engines.delay import delayed_to_codes

    audio = (golden[f"{case}/prompt_audio_out_ids"],) if f"{case}/prompt_audio_out_ids" in golden.files else ()
    request = SpeechRequest(
        [],
        sampling=SamplingParams(temperature=0.0, ras_window=0),
        max_tokens=48,
        prompt_ids=golden[f"{case}/prompt_ids"],
        prompt_audio=audio,
    )
    finished = next(e for e in engine.generate(request) if isinstance(e, Finished))
    segment = finished.segments[0] if finished.segments else np.zeros((0, 0), np.int64)
    report.compare(f"loop {case}/segment0_delayed", segment, golden[f"{case}/segment0_delayed"], 0)
    codes = delayed_to_codes(segment) if segment.size else segment
    report.compare(f"loop {case}/segment0_codes", codes, golden[f"{case}/segment0_codes"], 0)
    report.compare(f"loop {case}/generated_text_ids", np.array(finished.text_ids), golden[f"{case}/generated_text_ids"], 0)


# --- codec --------------------------------------------------------------------------------------------


def verify_codec(checkpoint: Path, golden, artifacts: Path | None, report: Report) -> None:
    from .codec import load_codec

    codec = load_codec(checkpoint)
    decoder = encoder = None
    if artifacts is not None:
        from engines.codec import CodecDecoder, CodecEncoder
        from engines.manifest import CODEC_DECODER, CODEC_ENCODER, Manifest

        manifest = Manifest.load(artifacts)
        decoder = CodecDecoder(manifest.graph_path(CODEC_DECODER))
        encoder = CodecEncoder(manifest.graph_path(CODEC_ENCODER)) if manifest.has(CODEC_ENCODER) else None
    for case in sorted({k[: -len("_codes")] for k in golden.files if k.startswith("dec_") and k.endswith("_codes")}):
        codes = golden[f"{case}_codes"]
        batch = codes if codes.ndim == 3 else codes[None]
        with torch.no_grad():
            audio = codec.decode(torch.from_numpy(batch))[:, 0].numpy()
            report.compare(f"torch {case}_audio", audio if codes.ndim == 3 else audio[0], golden[f"{case}_audio"], AUDIO_ATOL)
            if f"{case}_latent" in golden.files:
                report.compare(f"torch {case}_latent", codec.latent(torch.from_numpy(batch))[0].numpy(), golden[f"{case}_latent"], AUDIO_ATOL)
        if decoder is not None and batch.shape[1] == decoder.num_quantizers:
            report.compare(f"onnx {case}_audio", decoder.decode(codes), golden[f"{case}_audio"], AUDIO_ATOL)
    for case in sorted({k[: -len("_wave")] for k in golden.files if k.startswith("enc_") and k.endswith("_wave")}):
        wave = golden[f"{case}_wave"]
        with torch.no_grad():
            result = codec.encode_detailed(torch.from_numpy(wave))
        report.compare(f"torch {case}_codes", result.codes.numpy(), golden[f"{case}_codes"], 0)
        for part in ("sem_features", "acoustic", "prior"):
            want = golden[f"{case}_{part}"]
            got = getattr(result, part)
            got = got.numpy() if hasattr(got, "numpy") else got
            report.compare(f"torch {case}_{part}", got.reshape(want.shape), want, INTERMEDIATE_RTOL * float(np.abs(want).max()))
        if encoder is not None:
            report.compare(f"onnx {case}_codes", encoder.encode(wave), golden[f"{case}_codes"], 0)


def _warn_if_other_source(artifacts: Path, checkpoint: Path, role: str) -> None:
    """Graphs exported from another checkpoint cannot match its golden: say so up front."""
    from engines.manifest import Manifest

    source = Manifest.load(artifacts).source.get(role)
    if source and Path(source).resolve() != checkpoint.resolve():
        print(f"[verify] warning: {artifacts} was exported from {source}, not {checkpoint}; expect ONNX mismatches")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.verify", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint the golden was made from")
    parser.add_argument("--golden", type=Path, required=True, help="a golden cases.npz (or its folder)")
    parser.add_argument("--artifacts", type=Path, help="also run these exported graphs (and the decode loop)")
    args = parser.parse_args(argv)
    golden_path = args.golden / "cases.npz" if args.golden.is_dir() else args.golden
    if not golden_path.is_file():
        parser.error(f"--golden {args.golden}: no such file (GOLDEN=../shared/golden/llm_tiny/cases.npz)")
    if not args.checkpoint.is_dir():
        parser.error(f"--checkpoint {args.checkpoint} is not a directory")
    golden = np.load(golden_path)
    if any(k.endswith("/prompt_ids") for k in golden.files):
        kind, run = "LLM", verify_llm
    elif any(k.startswith("dec_") for k in golden.files):
        kind, run = "codec", verify_codec
    else:
        parser.error(f"{golden_path} is neither an LLM golden (CASE/prompt_ids) nor a codec golden (dec_*/enc_*)")
    print(f"[verify] {kind} golden {golden_path} against {args.checkpoint}" + (f" and {args.artifacts}" if args.artifacts else ""))
    print(f"{'array':<52} {'max|err|':>11} {'tolerance':>10}")
    if args.artifacts is not None:
        _warn_if_other_source(args.artifacts, args.checkpoint, "codec" if kind == "codec" else "checkpoint")
    report = Report()
    run(args.checkpoint, golden, args.artifacts, report)
    print(f"overall max abs error: {report.overall():.3e}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
