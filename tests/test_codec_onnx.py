"""Exported codec graphs on ONNX Runtime CPU (engines/codec.py) against the torch reference and the
goldens, and the exact chunked streaming decode with a negative control."""

from __future__ import annotations

import collections
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from goldens import DECODE_ATOL, CODEC_GOLDEN as GOLDEN, cases, requires_golden

from engines.codec import CodecDecoder, CodecEncoder, StreamingDecoder
from export import onnx_codec
from export.codec import Snake, load_codec
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
    assert entry["inputs"] == [{"name": "codes", "dtype": "int64", "shape": ["batch", 8, "frames"]},
                               {"name": "context", "dtype": "int64", "shape": [2], "default": [0, 0]}]
    assert entry["outputs"] == [{"name": "audio", "dtype": "float32", "shape": ["batch", 1, "960*(frames-context[0]-context[1])"]}]
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
        folded = FoldedDecoder(codec)(codes, torch.zeros(2, dtype=torch.int64)).numpy()
    assert np.abs(folded - _torch_decode(codec, codes.numpy())).max() <= 1e-6


@pytest.mark.parametrize("context", [(10, 10), (3, 0), (0, 7), (15, 12), (39, 0)])
def test_decoder_context_frames_are_not_returned(decoder, context):
    """The graph returns the audio of the frames between the context, as the whole decode has it."""
    codes = np.random.default_rng(4).integers(0, 1024, (2, 8, 40))
    whole = decoder.decode(codes)[:, 960 * context[0] : 960 * (40 - context[1])]
    assert np.abs(decoder.decode(codes, context) - whole).max() <= DECODE_ATOL


def test_graph_exported_before_trimming_still_decodes(decoder_entry, decoder, tmp_path):
    """A decoder graph without the `context` input (exported before the graph trimmed windows) decodes
    whole windows; the context's audio is dropped on the host."""
    model = onnx.load(decoder_entry[0])
    model.graph.input.remove(next(i for i in model.graph.input if i.name == "context"))  # now a constant (0, 0)
    onnx.save(model, tmp_path / "untrimmed.onnx")
    untrimmed = CodecDecoder(tmp_path / "untrimmed.onnx", CPU)
    assert not untrimmed.trims and decoder.trims
    codes = np.random.default_rng(2).integers(0, 1024, (2, 8, 40))
    for context in [(0, 0), (10, 10), (3, 0), (0, 7)]:
        assert np.abs(untrimmed.decode(codes, context) - decoder.decode(codes, context)).max() <= DECODE_ATOL


@pytest.mark.parametrize("context", [(0, 0), (10, 10), (3, 0), (0, 38), (15, 12)])
def test_decode_in_pieces_side_by_side_equals_one_call(decoder_entry, decoder, context):
    """A CPU decode is cut into `workers` pieces, each with the context it needs where it meets another."""
    codes = np.random.default_rng(5).integers(0, 1024, (2, 8, 40))
    three = CodecDecoder(decoder_entry[0], CPU, workers=3)
    pieces = three.pieces(40, context)
    assert len(pieces) == min(3, 40 - sum(context))
    assert all((lo == 0 or ctx[0] == 10) and (hi == 40 or ctx[1] == 10) for lo, hi, ctx in pieces)  # full context inside
    one = CodecDecoder(decoder_entry[0], CPU, workers=1)
    assert np.abs(three.decode(codes, context) - one.decode(codes, context)).max() <= 1e-6


def test_trimmed_stages_keep_what_the_kept_frames_reach(codec):
    """The graph decodes a window's context only as far as the kept frames reach (engines.codec.decoder_reach).
    Negative control: one sample less at the first block's input, on either side, changes the kept audio
    beyond the decode tolerance (deeper in, one sample more or less is within rounding: its reach there
    runs through the outermost taps of many convolutions)."""
    codes, context = torch.from_numpy(np.random.default_rng(8).integers(0, 1024, (1, 8, 40))), torch.tensor([12, 12])
    folded = FoldedDecoder(codec)
    with torch.no_grad():
        whole = folded(codes, torch.zeros(2, dtype=torch.int64))[..., 960 * 12 : 960 * 28]
        assert np.abs((folded(codes, context) - whole).numpy()).max() <= 1e-6
        (left, right), *deeper = folded.reach
        for short in ((left - 1, right), (left, right - 1)):
            folded.reach = [short, *deeper]
            assert np.abs((folded(codes, context) - whole).numpy()).max() > DECODE_ATOL, short


def test_decoder_graph_is_4d_and_folded(decoder_entry):
    """The exported form ONNX Runtime runs fast: 4-D convolutions (its NCHWc transformer takes no 1-D
    Conv), Snake without Pow and without its alpha Mul where a conv absorbs it."""
    graph = onnx.load(decoder_entry[0]).graph
    weights = {t.name: t.dims for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    ops = collections.Counter(n.op_type for n in graph.node)
    assert convs and all(len(weights[n.input[1]]) == 4 for n in convs)
    assert ops["Pow"] == 0
    assert ops["Sin"] == 36  # one per Snake
    alphas = [n for n in graph.node if n.op_type == "Mul" and any(len(weights.get(i, ())) == 4 for i in n.input)]
    assert len(alphas) == 15 + 4 + 1  # only Snakes that read a residual stream: 3 per block, blocks 2-5, the last


def test_snake_with_an_alpha_too_small_to_fold_stays_exact(codec, monkeypatch):
    """Folding drops (1 - alpha inv_alpha) x, which is all of x at alpha = 0: such a Snake is exported as it is.
    Negative control: folded anyway, the decode changes."""
    broken = copy.deepcopy(codec)
    snake = broken.decoder_2.model[2].block[2].block[2]  # block 2, first residual unit, after its k7 conv
    with torch.no_grad():
        snake.alpha[0, :3] = 0.0
        Snake._refresh(snake, None)
    codes = torch.from_numpy(np.random.default_rng(6).integers(0, 1024, (1, 8, 12)))
    zero = torch.zeros(2, dtype=torch.int64)
    with torch.no_grad():
        reference = broken.decode(codes).numpy()
        assert np.abs(FoldedDecoder(broken)(codes, zero).numpy() - reference).max() <= 1e-6
        monkeypatch.setattr(onnx_codec, "_FOLD_TOLERANCE", float("inf"))
        assert np.abs(FoldedDecoder(broken)(codes, zero).numpy() - reference).max() > 10 * DECODE_ATOL


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

    def decode(self, codes, context=(0, 0)):
        self.calls.append(codes.shape[-1])
        return self.inner.decode(codes, context)


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
