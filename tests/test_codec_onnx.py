"""Exported codec graphs on ONNX Runtime CPU (engines/codec.py) against the torch reference and the
goldens, and the exact chunked streaming decode with a negative control."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from goldens import DECODE_ATOL, CODEC_GOLDEN as GOLDEN, cases, requires_golden

from engines.codec import CodecDecoder, CodecEncoder, StreamingDecoder
from export.codec import load_codec
from export.onnx_codec import FoldedDecoder, export_codec_decoder, export_codec_encoder

pytestmark = requires_golden
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="session")
def codec():
    return load_codec(GOLDEN)


@pytest.fixture(scope="session")
def golden():
    return cases()


@pytest.fixture(scope="session")
def decoder_entry(codec, tmp_path_factory):
    path = tmp_path_factory.mktemp("codec_onnx") / "codec_decoder.onnx"
    return path, export_codec_decoder(codec, path)


@pytest.fixture(scope="session")
def encoder_entry(codec, tmp_path_factory):
    path = tmp_path_factory.mktemp("codec_onnx") / "codec_encoder.onnx"
    return path, export_codec_encoder(codec, path)


@pytest.fixture(scope="session")
def decoder(decoder_entry):
    return CodecDecoder(decoder_entry[0], providers=CPU)


@pytest.fixture(scope="session")
def encoder(encoder_entry):
    return CodecEncoder(encoder_entry[0], providers=CPU)


def _torch_decode(codec, codes: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return codec.decode(torch.from_numpy(codes)).numpy()


def test_manifest_entries(decoder_entry, encoder_entry):
    path, entry = decoder_entry
    assert entry["file"] == path.name
    assert entry["inputs"] == [{"name": "codes", "dtype": "int64", "shape": ["batch", 8, "frames"]}]
    assert entry["outputs"] == [{"name": "audio", "dtype": "float32", "shape": ["batch", 1, "960*frames"]}]
    geometry = (entry["sample_rate"], entry["hop_length"], entry["num_quantizers"], entry["codebook_size"])
    assert geometry == (24000, 960, 8, 1024)
    assert entry["context_frames"] == 10
    path, entry = encoder_entry
    assert entry["file"] == path.name
    assert [i["name"] for i in entry["inputs"]] == ["waveform", "acoustic_waveform"]
    assert entry["outputs"] == [{"name": "codes", "dtype": "int64", "shape": [1, 8, "frames"]}]
    assert entry["min_samples"] == 632 and entry["encode_geometry"]["ratios"] == [8, 5, 4, 2, 3]


@pytest.mark.parametrize("frames", [1, 7, 50])
def test_decoder_matches_torch(codec, decoder, frames):
    codes = np.random.default_rng(frames).integers(0, 1024, (2, 8, frames))
    ours = decoder.decode(codes)
    assert ours.shape == (2, 960 * frames) and ours.dtype == np.float32
    assert np.abs(ours - _torch_decode(codec, codes)[:, 0]).max() <= DECODE_ATOL


@pytest.mark.parametrize("case", ["dec_T1", "dec_T7", "dec_T50", "dec_batch"])
def test_decoder_matches_golden(decoder, golden, case):
    assert np.abs(decoder.decode(golden[f"{case}_codes"]) - golden[f"{case}_audio"]).max() <= DECODE_ATOL


def test_decoder_clips_out_of_range_codes(decoder, golden):
    codes = golden["dec_T7_codes"].copy()
    codes[0, 2], codes[3, 4], codes[5, 0] = 1024, 1025, -1
    clipped = np.clip(codes, 0, 1023)
    np.testing.assert_array_equal(decoder.decode(codes), decoder.decode(clipped))


def test_folded_table_equals_unfolded(codec, golden):
    codes = torch.from_numpy(golden["dec_T50_codes"])[None]
    with torch.no_grad():
        folded = FoldedDecoder(codec)(codes).numpy()
    assert np.abs(folded - _torch_decode(codec, codes.numpy())).max() <= 1e-6


@pytest.mark.parametrize("n", [24000, 24300])
def test_encoder_matches_golden(encoder, golden, n):
    codes = encoder.encode(golden[f"enc_N{n}_wave"])
    assert codes.dtype == np.int64
    np.testing.assert_array_equal(codes, golden[f"enc_N{n}_codes"])


# N mod 960 around the re-encode boundaries (119, 632) and the minimum length.
@pytest.mark.parametrize("n", [632, 960 + 118, 960 + 119, 960 + 631, 960 + 632, 4800])
def test_encoder_matches_torch_at_length_boundaries(codec, encoder, golden, n):
    wave = np.resize(golden["enc_N24000_wave"], n)
    with torch.no_grad():
        expected = codec.encode(torch.from_numpy(wave)).numpy()
    np.testing.assert_array_equal(encoder.encode(wave), expected)


def test_encoder_rejects_short_input(encoder):
    with pytest.raises(ValueError, match="at least 632 samples"):
        encoder.encode(np.zeros(631, np.float32))


class _Spy:
    """Records the frame count of every decode call the streaming decoder makes."""

    def __init__(self, decoder: CodecDecoder):
        self.inner, self.calls = decoder, []
        self.num_quantizers, self.hop_length = decoder.num_quantizers, decoder.hop_length
        self.context_frames = decoder.context_frames

    def decode(self, codes):
        self.calls.append(codes.shape[-1])
        return self.inner.decode(codes)


def _stream(decoder, codes, chunks, **kwargs):
    stream, outputs, start = StreamingDecoder(decoder, **kwargs), [], 0
    for k in chunks:
        outputs.append(stream.push(codes[:, start : start + k]))
        start += k
    outputs.append(stream.flush())
    return outputs


@pytest.mark.parametrize("chunks", [[1] * 40, [5] * 8, [13, 1, 20, 6], [40], [3, 7, 11, 2, 17]])
def test_streaming_equals_one_shot(decoder, chunks):
    codes = np.random.default_rng(7).integers(0, 1024, (8, sum(chunks)))
    spy = _Spy(decoder)
    streamed = np.concatenate(_stream(spy, codes, chunks))
    assert np.abs(streamed - decoder.decode(codes)).max() <= DECODE_ATOL
    # no re-decode of the history: every window is its new final frames plus at most 2 contexts
    assert sum(spy.calls) <= len(codes[0]) + 2 * decoder.context_frames * len(spy.calls)


def test_streaming_min_frames_batches_later_chunks(decoder):
    codes = np.random.default_rng(5).integers(0, 1024, (8, 30))
    outputs = _stream(decoder, codes, [1] * 30, min_frames=4)
    sizes = [len(o) // 960 for o in outputs if len(o)]
    assert sizes[0] == 1 and all(s >= 4 for s in sizes[1:-1])
    assert np.abs(np.concatenate(outputs) - decoder.decode(codes)).max() <= DECODE_ATOL


def test_streaming_chunks_double_up_to_max_frames(decoder):
    """The schedule: 1 frame first, then as many frames as already emitted, capped, then the flush."""
    codes = np.random.default_rng(9).integers(0, 1024, (8, 60))
    outputs = _stream(decoder, codes, [1] * 60, max_frames=12)
    sizes = [len(o) // 960 for o in outputs if len(o)]
    assert sizes == [1, 1, 2, 4, 8, 12, 12, 20]  # 40 frames in chunks; 10 final + 10 unfinished at the flush
    assert np.abs(np.concatenate(outputs) - decoder.decode(codes)).max() <= DECODE_ATOL


def test_streaming_first_audio_as_soon_as_one_frame_is_final(decoder):
    codes = np.random.default_rng(3).integers(0, 1024, (8, 12))
    outputs = _stream(decoder, codes, [1] * 12)
    assert [len(o) for o in outputs[:12]] == [0] * 10 + [960, 960]


def test_streaming_with_too_little_context_does_not_match(decoder):
    """Negative control: 8 frames of context is not enough (spec §6.3), so the equality test can fail."""
    codes = np.random.default_rng(7).integers(0, 1024, (8, 40))
    streamed = np.concatenate(_stream(decoder, codes, [5] * 8, context=8))
    assert streamed.shape == (960 * 40,)
    assert np.abs(streamed - decoder.decode(codes)).max() > 10 * DECODE_ATOL


def test_engines_codec_does_not_import_torch():
    code = "import sys, engines.codec; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0
