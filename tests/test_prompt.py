"""engines/prompt.py and export/tiny_tokenizer.py: spec llm.md §4, §5.1-5.2, §5.7, §7.10."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from engines.api import AudioCodes, Message, SpecialToken
from engines.delay import delay_pattern
from engines.prompt import (
    MULTISPEAKER_INSTRUCTION,
    PromptRenderer,
    StopMatcher,
    content_text,
    expand_prompt,
    tts_messages,
)
from engines.runtime import mask_runs
from engines.tokens import AUDIO_OUT
from export.tiny_tokenizer import special_tokens, write_tiny_tokenizer
from goldens import load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def renderer(tokenizer_path):
    return PromptRenderer(tokenizer_path)


def _codes(frames, seed=0):
    return np.random.default_rng(seed).integers(0, 1024, (8, frames))


# tiny tokenizer ------------------------------------------------------------------------------
def test_tiny_tokenizer_is_deterministic_and_small(tokenizer_path, tmp_path):
    again = write_tiny_tokenizer(tmp_path / "again.json")
    assert again.read_bytes() == tokenizer_path.read_bytes()
    assert tokenizer_path.stat().st_size < 1_000_000


def test_tiny_tokenizer_ids(tokenizer_path):
    tok = Tokenizer.from_file(str(tokenizer_path))
    spec = json.loads(tokenizer_path.read_text())
    regular = [i for t, i in spec["model"]["vocab"].items() if t not in set(special_tokens().values())]
    assert max(regular) < 128000 and len(set(regular)) == len(regular)
    names = special_tokens()
    assert len(names) == 256 and min(names) == 128000 and max(names) == 128255
    for i, name in names.items():
        assert tok.token_to_id(name) == i and tok.encode(name, add_special_tokens=False).ids == [i]
    assert names[128014] == "<|reserved_special_token_6|>" and names[128255] == "<|reserved_special_token_247|>"
    for word, i in {"system": 9125, "user": 882, "assistant": 78191, "\n\n": 271}.items():
        assert tok.encode(word, add_special_tokens=False).ids == [i]
    text = "The quick brown fox, 2024 — naïve café!\n\nDone."
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text and len(ids) < len(text.encode())  # merges at work, bytes round-trip


# rendering -----------------------------------------------------------------------------------
def test_zero_shot_prompt_invariants(renderer):
    """Spec §7.10 / §5.1 example."""
    system = "Generate audio following instruction."
    ids = renderer.render(tts_messages("Hello there.")).ids
    expected = (
        [128000, 128006, 9125, 128007, 271] + renderer.encode(system) + [128009]
        + [128006, 882, 128007, 271] + renderer.encode("Hello there.") + [128009]
        + [128006, 78191, 128007, 271, 128013]
    )
    assert ids.dtype == np.int64 and ids.tolist() == expected


def test_voice_clone_prompt_structure(renderer):
    refs = [("First reference.", _codes(11, 1)), ("Second one.", _codes(4, 2))]
    rendered = renderer.render(tts_messages("Target text.", references=refs))
    ids = rendered.ids.tolist()
    where = [i for i, t in enumerate(ids) if t == AUDIO_OUT]
    assert len(where) == 2
    for i in where:
        assert ids[i - 1] == 128013 and ids[i + 1 : i + 3] == [128012, 128009]
    assert ids[-5:] == [128006, 78191, 128007, 271, 128013]
    assert len(rendered.audio_segments) == 2
    for (_, codes), seg in zip(refs, rendered.audio_segments):
        np.testing.assert_array_equal(seg, delay_pattern(codes))
    second = renderer.encode("[SPEAKER1] Second one.")  # after <|audio_eos|><|eot_id|> and the user header
    assert ids[where[0] + 7 : where[0] + 7 + len(second)] == second


def _skeleton(ids):
    """Special tokens, role words and the header's "\\n\\n" kept; each run of content ids -> -1."""
    out = []
    for i, t in enumerate(ids):
        structural = t >= 128000 or (i > 0 and ids[i - 1] in (128006, 128007))
        if structural:
            out.append(t)
        elif not out or out[-1] != -1:
            out.append(-1)
    return out


@pytest.mark.parametrize("case", ["zero_shot", "voice_clone"])
def test_structure_matches_upstream_golden_prompts(renderer, case):
    """The goldens' prompts were rendered by upstream from a system + user (zero-shot) and a
    user / assistant-audio / user (voice clone) conversation; ours must have the same layout."""
    z = load("llm_tiny")
    refs = [("Reference transcript.", z["voice_clone/ref_codes"])] if case == "voice_clone" else []
    rendered = renderer.render(tts_messages("Some text to say.", references=refs))
    assert _skeleton(rendered.ids.tolist()) == _skeleton(z[f"{case}/prompt_ids"].tolist())
    if refs:
        np.testing.assert_array_equal(rendered.audio_segments[0], z["voice_clone/prompt_audio_out_ids"])


def test_tokenisation_is_per_piece(renderer):
    """Header, each content piece and eot are encoded separately (a joint encode would merge
    across the piece boundary "Hel" | "lo")."""
    pieces = ("Hel", "lo", " world!")
    ids = renderer.render([Message("user", pieces)], force_audio=False).ids.tolist()
    header = renderer.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    expected = header + sum((renderer.encode(p) for p in pieces), []) + [128009]
    expected += renderer.encode("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ids == expected
    joint = renderer.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + "".join(pieces))
    assert ids[: len(joint)] != joint


def test_eom_between_assistant_turns_and_audio_in_user_turns(renderer):
    codes = AudioCodes(_codes(3))
    messages = [
        Message("user", ("hi", codes)),
        Message("assistant", (codes,)),
        Message("assistant", ("ok",)),
        Message("user", ("again",)),
    ]
    rendered = renderer.render(messages, force_audio=False)
    ids = rendered.ids.tolist()
    assert ids.count(128008) == 1 and ids[ids.index(128008) - 3 : ids.index(128008)] == [128013, 128016, 128012]
    assert ids.count(128015) == 1 and ids[ids.index(128015) - 1 : ids.index(128015) + 2] == [128011, 128015, 128012]
    assert len(rendered.audio_segments) == 1  # user audio stays a text token (serve engine)
    assert ids[-4:] == [128006, 78191, 128007, 271]


def test_render_rejects_bad_input(renderer):
    with pytest.raises(ValueError, match="role"):
        renderer.render([Message("narrator", ("x",))])
    with pytest.raises(ValueError, match="codes"):
        renderer.render([Message("assistant", (AudioCodes(np.zeros((7, 3), np.int64)),))])
    with pytest.raises(ValueError, match="codes"):
        renderer.render([Message("assistant", (AudioCodes(np.full((8, 3), 1024)),))])


def test_renderer_checks_the_special_ids(tmp_path, tokenizer_path):
    spec = json.loads(tokenizer_path.read_text())
    spec["model"]["vocab"]["<|AUDIO_OUT|>"] = 130000
    next(t for t in spec["added_tokens"] if t["content"] == "<|AUDIO_OUT|>")["id"] = 130000
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="AUDIO_OUT"):
        PromptRenderer(bad)


# expansion -----------------------------------------------------------------------------------
def test_expand_golden_voice_clone_prompt():
    """Spec §3.1 / §7.7: the placeholder becomes T+9 audio positions holding the golden columns."""
    z = load("llm_tiny")
    ids = z["voice_clone/prompt_ids"]
    seg = delay_pattern(z["voice_clone/ref_codes"])
    ex = expand_prompt(ids, [seg])
    at = int(np.flatnonzero(ids == AUDIO_OUT)[0])
    width = seg.shape[1]
    assert ex.input_ids.shape == (ids.size - 1 + width,) and ex.audio_codes.shape == (ids.size - 1 + width, 8)
    assert mask_runs(ex.audio_mask) == [(0, at, False), (at, at + width, True), (at + width, ids.size - 1 + width, False)]
    teacher_forced = z["voice_clone/teacher_forced_audio_out_ids"]  # the reference columns come first
    np.testing.assert_array_equal(ex.audio_codes[ex.audio_mask].T, teacher_forced[:, :width])
    np.testing.assert_array_equal(np.delete(ex.input_ids, np.flatnonzero(ex.audio_mask)), np.delete(ids, at))
    assert np.all(ex.audio_codes[~ex.audio_mask] == 0)
    np.testing.assert_array_equal(ex.audio_history, seg)


def test_expand_two_segments_and_text_only():
    ids = np.array([1, 2, AUDIO_OUT, 3, AUDIO_OUT, 4])
    a, b = delay_pattern(_codes(2, 1)), delay_pattern(_codes(1, 2))
    ex = expand_prompt(ids, [a, b])
    assert mask_runs(ex.audio_mask) == [(0, 2, False), (2, 13, True), (13, 14, False), (14, 24, True), (24, 25, False)]
    np.testing.assert_array_equal(ex.audio_history, np.concatenate([a, b], axis=1))
    np.testing.assert_array_equal(ex.audio_codes[14:24].T, b)
    text = expand_prompt(np.array([5, 6]), [])
    assert mask_runs(text.audio_mask) == [(0, 2, False)]
    assert text.audio_codes.shape == (2, 8) and text.audio_history.shape == (8, 0)
    with pytest.raises(ValueError, match="placeholders"):
        expand_prompt(ids, [a])


# message helpers -----------------------------------------------------------------------------
def test_tts_messages_conventions():
    scene = "Audio is recorded from a quiet room."
    block = f"<|scene_desc_start|>\n{scene}\n<|scene_desc_end|>"
    zero_shot = tts_messages("hi", scene=scene)
    system = f"Generate audio following instruction.\n\n{block}"
    assert [m.role for m in zero_shot] == ["system", "user"] and zero_shot[1].content == ("hi",)
    assert zero_shot[0].content == ("Generate audio following instruction.\n\n", SpecialToken("<|scene_desc_start|>"),
                                    f"\n{scene}\n", SpecialToken("<|scene_desc_end|>"))
    assert content_text(zero_shot[0].content) == system
    assert [m.role for m in tts_messages("hi", references=[("ref", _codes(2))])] == ["user", "assistant", "user"]
    cloned = tts_messages("hi", scene=scene, references=[("a", _codes(2)), ("b", _codes(3))])
    assert [m.role for m in cloned] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert cloned[3].content == ("[SPEAKER1] b",) and isinstance(cloned[4].content[0], AudioCodes)
    multi = content_text(tts_messages("[SPEAKER0] Hi. [SPEAKER1] Hello!", scene=scene)[0].content)
    lines = "SPEAKER0: feminine\nSPEAKER1: masculine"
    assert multi == f"{MULTISPEAKER_INSTRUCTION}\n\n<|scene_desc_start|>\n{scene}\n\n{lines}\n<|scene_desc_end|>"
    described = content_text(tts_messages("[SPEAKER0] Hi.", speakers=["deep voice", "high voice"])[0].content)
    assert "<|scene_desc_start|>\nSPEAKER0: deep voice\nSPEAKER1: high voice\n<|scene_desc_end|>" in described
    assert tts_messages("hi", system="custom")[0] == Message("system", ("custom",))


# stop strings --------------------------------------------------------------------------------
def test_stop_matcher(renderer):
    tok = renderer.tokenizer
    matcher = StopMatcher(tok, ["<|eot_id|>", "<|end_of_text|>", "fox jumps", "|", "é"])
    assert [matcher.push(t) for t in [AUDIO_OUT, 128012]] == [None, None]  # "|" is not in special tokens' text
    words = renderer.encode("The quick brown fox jumps")
    pushed = [matcher.push(t) for t in words]
    assert pushed[-1] == "fox jumps" and set(pushed[:-1]) == {None}
    assert StopMatcher(tok, ["<|eot_id|>"]).push(128009) == "<|eot_id|>"
    accents = StopMatcher(tok, ["é"])
    byte_ids = renderer.encode("é")
    assert len(byte_ids) == 2 and [accents.push(t) for t in byte_ids] == [None, "é"]
    with pytest.raises(ValueError):
        StopMatcher(tok, [""])


def test_stop_matcher_without_tokenizer():
    ids = {"<|eot_id|>": 128009, "<|end_of_text|>": 128001}
    matcher = StopMatcher(None, ["<|end_of_text|>", "<|eot_id|>"], ids)
    assert [matcher.push(t) for t in (5, AUDIO_OUT, 128012, 128009)] == [None, None, None, "<|eot_id|>"]
    with pytest.raises(ValueError, match="tokenizer"):
        StopMatcher(None, ["done"], ids)


def test_engines_do_not_import_torch():
    code = (
        "import sys, engines.sampling, engines.delay, engines.prompt, export.tiny_tokenizer; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
