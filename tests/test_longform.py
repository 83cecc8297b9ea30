"""serve/longform.py (chunking, the audio splice) and serve/textnorm.py (upstream's normalisation)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from serve.longform import Splice, split_text
from serve.textnorm import normalize


# chunking --------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return text.split()


def test_chunks_fit_keep_every_word_and_end_at_sentences():
    sentences = [f"Sentence number {i} says something {'rather ' * (i % 5)}ordinary." for i in range(40)]
    text = " ".join(sentences[:25]) + "\n\n" + " ".join(sentences[25:])
    chunks = split_text(text, 200)
    assert all(len(c) <= 200 for c in chunks) and len(chunks) > 5
    assert _words(" ".join(chunks)) == _words(text)  # nothing lost, no word cut in two
    assert all(c.endswith(".") for c in chunks)  # every chunk ends at a sentence end
    paragraph_end = " ".join(sentences[:25])
    assert any(" ".join(chunks[:i]).replace("\n\n", " ") == paragraph_end for i in range(1, len(chunks)))


def test_short_paragraphs_share_a_chunk_and_long_sentences_break_at_clauses_then_words():
    assert split_text("One.\n\nTwo.\n\n\nThree.", 100) == ["One.\n\nTwo.\n\nThree."]
    clause = "a clause of several words, " * 6
    chunks = split_text(clause + "and the end.", 60)
    assert all(len(c) <= 60 for c in chunks) and all(c.endswith(",") for c in chunks[:-1])
    words = split_text("word " * 50, 23)
    assert all(len(c) <= 23 for c in words) and set(_words(" ".join(words))) == {"word"}
    assert len(_words(" ".join(words))) == 50


def test_cjk_sentences_split_without_spaces_and_unbroken_text_splits_by_characters():
    text = "这是第一句。" * 10 + "最后一句！"
    chunks = split_text(text, 20)
    assert "".join(chunks) == text and all(len(c) <= 20 for c in chunks)
    assert all(re.search("[。！]$", c) for c in chunks)
    assert split_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert split_text("他说：「你好。」然后走了。", 8) == ["他说：「你好。」", "然后走了。"]  # the quote stays


# splice ----------------------------------------------------------------------------------------
def _fed(splice: Splice, parts: list[np.ndarray]) -> list[np.ndarray]:
    return [splice.feed(p) for p in parts]


def test_splice_crossfades_chunk_boundaries_with_a_raised_cosine():
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(n).astype(np.float32) for n in (1000, 700, 50))
    splice = Splice(100)
    out = _fed(splice, np.array_split(a, 7))
    splice.boundary()
    out += _fed(splice, np.array_split(b, 9))
    splice.boundary()
    out += _fed(splice, [c])  # shorter than one overlap: crossfaded over what there is
    out.append(splice.flush())
    got = np.concatenate(out)
    # the expected signal, written directly: overlap-add with a Hann ramp of the overlap's length
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(100) + 0.5) / 100)
    ab = np.concatenate([a[:900], a[900:] * (1 - ramp) + b[:100] * ramp, b[100:]])
    short = 0.5 - 0.5 * np.cos(np.pi * (np.arange(50) + 0.5) / 50)
    want = np.concatenate([ab[:-50], ab[-50:] * (1 - short) + c * short])
    assert len(got) == 1000 + 700 + 50 - 100 - 50
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_splice_without_boundaries_passes_audio_through_unchanged():
    wave = np.linspace(-1, 1, 5000, dtype=np.float32)
    splice = Splice(480)
    got = np.concatenate(_fed(splice, np.array_split(wave, 13)) + [splice.flush()])
    np.testing.assert_array_equal(got, wave)


# text normalisation: expected strings follow upstream examples/generation.py by hand -------------
@pytest.mark.parametrize("raw, expected", [
    ("你好，世界！这是（一个）测试。", "你好, 世界!这是 一个 测试."),
    ("It was 75°F outside, 24°C inside", "It was 75 degrees Fahrenheit outside, 24 degrees Celsius inside."),
    ("Funny (really) [laugh]", "Funny really <SE>[Laughter]</SE>"),
    ("[music start] La la [music end]", "<SE_s>[Music]</SE_s> La la <SE_e>[Music]</SE_e>"),
    ("Hum [humming start]", "Hum <SE_s>[Humming]</SE_s>."),  # upstream adds "." after </SE_s>
    ("  Line   one \n\n\n  line\ttwo  ", "Line one\nline two."),
    ("「Quoted」", '"Quoted"'),
    ("Done?", "Done?"),
])
def test_normalize_as_upstream(raw, expected):
    assert normalize(raw) == expected
