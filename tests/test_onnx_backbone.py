"""Exported backbone graphs on ONNX Runtime CPU against the torch reference and the goldens."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from engines.manifest import Manifest
from engines.ort_runtime import OrtBackbone
from export.llm import Mode, load_backbone
from export.verify import golden_prompts, llm_cases, onnx_logits
from goldens import LOGITS_ATOL, load

MAX_LEN = 160


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return load_backbone(tiny_checkpoint / "llm")


def _torch_step(model, mode, feed, cache_lengths, cache):
    """One cached torch step for rows of `cache` (the reference loop with in-place cache writes)."""
    batch = len(cache_lengths)
    kwargs = dict(input_ids=None, audio_codes=None, audio_mask=None)
    if mode is Mode.TEXT:
        kwargs["input_ids"] = torch.from_numpy(feed)[:, None]
    else:
        kwargs["audio_codes"] = torch.from_numpy(feed)[:, None]
    text, audio, _ = model(mode, kwargs["input_ids"], kwargs["audio_codes"], None, torch.from_numpy(cache_lengths),
                           torch.zeros(batch, dtype=torch.long), cache)
    return (text if mode is Mode.TEXT else audio).numpy()


@pytest.mark.parametrize("lengths", [[19], [7, 23, 12]], ids=["batch1", "batch3"])
def test_prefill_and_50_cached_steps_match_torch(tiny_artifacts, reference, lengths):
    rng = np.random.default_rng(len(lengths))
    runtime = OrtBackbone(Manifest.load(tiny_artifacts), max_batch=4, max_len=MAX_LEN)
    cache = reference.new_cache(len(lengths), MAX_LEN)
    worst = 0.0
    for slot, length in enumerate(lengths):  # mixed prompts, each into its own slot
        ids, codes = rng.integers(0, 128000, length), rng.integers(0, 1026, (length, 8))
        mask = rng.random(length) < 0.4
        got = runtime.prefill(slot, ids, codes, mask)
        row = [(k[slot : slot + 1], v[slot : slot + 1]) for k, v in cache]
        text, audio, _ = reference(Mode.MIXED, *(torch.from_numpy(a)[None] for a in (ids, codes, mask)),
                                   torch.zeros(1, dtype=torch.long), torch.tensor([length - 1]), row)
        worst = max(worst, np.abs(got.text - text[0].numpy()).max(), np.abs(got.audio - audio[0].numpy()).max())
    slots, positions = np.arange(len(lengths)), np.array(lengths)
    for step in range(50):
        if step % 12 == 11:
            feed, mode = rng.integers(0, 128000, len(lengths)), Mode.TEXT
            got = runtime.text_step(slots, feed, positions)
        else:
            feed, mode = rng.integers(0, 1026, (len(lengths), 8)), Mode.AUDIO
            got = runtime.audio_step(slots, feed, positions)
        worst = max(worst, np.abs(got - _torch_step(reference, mode, feed, positions, cache)).max())
        positions = positions + 1
    assert worst <= LOGITS_ATOL


@pytest.mark.parametrize("name", ["llm_tiny", "llm_tiny_eos3"])
def test_graphs_reproduce_the_goldens(golden_artifacts, name):
    golden = load(name)
    runtime = OrtBackbone(Manifest.load(golden_artifacts(name)), max_batch=1, max_len=MAX_LEN)
    for case in llm_cases(golden):
        prompt, forced = golden_prompts(golden, case, 128016)
        text_last, prompt_audio = onnx_logits(runtime, prompt)
        assert np.abs(text_last - golden[f"{case}/text_logits_last"]).max() <= LOGITS_ATOL
        if f"{case}/prompt_audio_logits" in golden.files:
            assert np.abs(prompt_audio - golden[f"{case}/prompt_audio_logits"]).max() <= LOGITS_ATOL
        _, forced_audio = onnx_logits(runtime, forced)
        assert np.abs(forced_audio - golden[f"{case}/teacher_forced_audio_logits"]).max() <= LOGITS_ATOL


def test_each_graph_reads_only_its_weights(tiny_artifacts):
    """The audio step is the hot loop: it must not touch the text FFN, the text norms or the text head."""
    graphs = Manifest.load(tiny_artifacts).graphs
    audio, text, prefill = (set(graphs[g]["reads"]) for g in ("audio", "text", "prefill"))
    assert audio == {"attention", "audio_embedding", "audio_norms", "audio_ffn", "final_norm", "audio_head"}
    assert text == {"attention", "text_embedding", "text_norms", "text_ffn", "final_norm", "text_head"}
    assert prefill == audio | text
    assert graphs["audio"]["weight_bytes"] < graphs["text"]["weight_bytes"] / 5


def test_weights_are_stored_once(tiny_artifacts, tiny_checkpoint):
    manifest = Manifest.load(tiny_artifacts)
    checkpoint_params = sum(p.numel() for p in load_backbone(tiny_checkpoint / "llm").parameters())
    size = (tiny_artifacts / "weights.bin").stat().st_size
    assert size < checkpoint_params * 4 * 1.05  # float32 export, page alignment only
    assert not list(tiny_artifacts.glob("*.onnx.data"))
    for key in ("prefill", "text", "audio"):
        model = onnx.load(str(manifest.graph_path(key)), load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"weights.bin"}
        # past K/V feed only the in-place TensorScatter (and Shape, for the mask length): nothing copies the cache
        consumers = [n.op_type for n in model.graph.node for name in n.input if name.startswith("past_")]
        assert consumers.count("TensorScatter") == 2 * manifest.model.num_layers and set(consumers) <= {"TensorScatter", "Shape"}


def test_cache_is_updated_in_place_at_the_write_position(tiny_artifacts):
    runtime = OrtBackbone(Manifest.load(tiny_artifacts), max_batch=3, max_len=32)
    keys = runtime.cache_view(0, "key")
    keys[...] = 7.0
    runtime.audio_step(np.array([0, 2]), np.full((2, 8), 3), np.array([5, 9]))  # slot 1 rides along
    changed = np.argwhere((keys != 7.0).any(axis=(1, 3)))  # (slot, position) pairs
    assert changed.tolist() == [[0, 5], [1, runtime.scratch_position], [2, 9]]


def test_the_cpu_cache_grows_and_shrinks_in_length_buckets_without_changing_a_logit(tiny_artifacts):
    """Three sequences prefill and decode across bucket edges beside a runtime whose cache holds max_len
    rows from the start: every logit agrees, the buffers grow 16 -> 32 -> 64 (max_len) rows with the
    longest sequence, and shrink back once the long sequences have ended."""
    manifest = Manifest.load(tiny_artifacts)
    spec = manifest.model
    bucketed = OrtBackbone(manifest, max_batch=4, max_len=64, min_bucket=8)
    fixed = OrtBackbone(manifest, max_batch=4, max_len=64, min_bucket=None)
    assert (bucketed.cache_rows, fixed.cache_rows) == (8, 64)
    rng = np.random.default_rng(5)
    slots = np.array([0, 2, 3])
    lengths = np.array([5, 3, 12])  # slot 3's prompt alone needs the 16-row bucket
    for slot, length in zip(slots, lengths):
        ids, codes, mask = rng.integers(0, spec.vocab_size, length), np.zeros((length, spec.num_codebooks), np.int64), np.zeros(length, bool)
        a, b = bucketed.prefill(slot, ids, codes, mask), fixed.prefill(slot, ids, codes, mask)
        np.testing.assert_allclose(a.text, b.text, rtol=1e-5, atol=1e-5)
    rows = [bucketed.cache_rows]
    for _ in range(20):
        codes = rng.integers(0, spec.codebook_size, (len(slots), spec.num_codebooks))
        a, b = bucketed.audio_step(slots, codes, lengths), fixed.audio_step(slots, codes, lengths)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        lengths += 1
        rows.append(bucketed.cache_rows)
    assert sorted(set(rows)) == [16, 32, 64] and rows == sorted(rows)
    for layer in range(spec.num_layers):
        for kind in ("key", "value"):
            for slot, length in zip(slots, lengths):
                np.testing.assert_allclose(bucketed.cache_view(layer, kind)[slot, :, :length],
                                           fixed.cache_view(layer, kind)[slot, :, :length], rtol=1e-5, atol=1e-6)

    bucketed.release(2), bucketed.release(3)  # slot 0 holds 25 positions: the 32-row bucket fits it
    codes = rng.integers(0, spec.codebook_size, (1, spec.num_codebooks))
    a, b = bucketed.audio_step(slots[:1], codes, lengths[:1]), fixed.audio_step(slots[:1], codes, lengths[:1])
    assert bucketed.cache_rows == 32
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_split_prefill_equals_the_prefill_graph(tiny_artifacts):
    rng = np.random.default_rng(3)
    length = 30
    ids, codes = rng.integers(0, 128000, length), rng.integers(0, 1026, (length, 8))
    mask = np.zeros(length, bool)
    mask[8:20] = True  # text, audio, text: a voice-clone prompt's shape
    manifest = Manifest.load(tiny_artifacts)
    a, b = OrtBackbone(manifest, 1, 64), OrtBackbone(manifest, 1, 64)
    graph, split = a.prefill(0, ids, codes, mask), b.prefill_split(0, ids, codes, mask)
    assert split.audio is None and np.abs(graph.text - split.text).max() <= LOGITS_ATOL
    for layer in range(manifest.model.num_layers):
        assert np.abs(a.cache_view(layer, "value")[:, :, :length] - b.cache_view(layer, "value")[:, :, :length]).max() <= 1e-5


FP16_ATOL = 1e-2  # README: fp16 graphs vs the float32 reference (measured 1.6e-3 on logits up to ~8)


def test_float16_graphs_run_and_agree(tmp_path_factory, tiny_checkpoint, reference):
    from export.__main__ import run

    out = tmp_path_factory.mktemp("fp16")
    run(tiny_checkpoint / "llm", None, out, "float16")
    runtime = OrtBackbone(Manifest.load(out), max_batch=1, max_len=64)
    rng = np.random.default_rng(0)
    ids, codes, mask = rng.integers(0, 128000, 20), rng.integers(0, 1026, (20, 8)), np.arange(20) >= 12
    got = runtime.prefill(0, ids, codes, mask)
    cache = reference.new_cache(1, 64)
    text, audio, _ = reference(Mode.MIXED, *(torch.from_numpy(a)[None] for a in (ids, codes, mask)),
                               torch.zeros(1, dtype=torch.long), torch.tensor([19]), cache)
    assert got.text.dtype == np.float32
    assert np.abs(got.text - text[0].numpy()).max() <= FP16_ATOL
    assert np.abs(got.audio - audio[0].numpy()).max() <= FP16_ATOL
    column = rng.integers(0, 1026, (1, 8))
    step = runtime.audio_step(np.array([0]), column, np.array([20]))
    assert np.abs(step - _torch_step(reference, Mode.AUDIO, column, np.array([20]), cache)).max() <= FP16_ATOL
