"""The torch reference against the upstream goldens, proof that the comparison bites, and spec §7 invariants."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from export.llm import Mode, load_backbone
from export.verify import golden_prompts, llm_cases, torch_logits
from goldens import LOGITS_ATOL, golden_dir, load

GOLDENS = ["llm_tiny", "llm_tiny_eos3"]


@pytest.fixture(scope="module")
def models():
    """The golden checkpoints (skips without ../shared)."""
    return {name: load_backbone(golden_dir(name)) for name in GOLDENS}


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    """The embedded tiny default: the spec's invariants hold for any checkpoint, so these run in every clone."""
    return load_backbone(tiny_checkpoint / "llm")


def golden_errors(model, golden) -> dict[str, float]:
    """Max |error| of every logits array of every case of a golden file."""
    errors = {}
    audio_out = model.config.audio_out_token_id
    for case in llm_cases(golden):
        prompt, forced = golden_prompts(golden, case, audio_out)
        text_last, prompt_audio = torch_logits(model, prompt)
        errors[f"{case}/text_logits_last"] = np.abs(text_last - golden[f"{case}/text_logits_last"]).max()
        if f"{case}/prompt_audio_logits" in golden.files:
            errors[f"{case}/prompt_audio_logits"] = np.abs(prompt_audio - golden[f"{case}/prompt_audio_logits"]).max()
        _, forced_audio = torch_logits(model, forced)
        errors[f"{case}/teacher_forced"] = np.abs(forced_audio - golden[f"{case}/teacher_forced_audio_logits"]).max()
    return errors


@pytest.mark.parametrize("name", GOLDENS)
def test_reference_reproduces_upstream_logits(models, name):
    golden = load(name)
    errors = golden_errors(models[name], golden)
    assert len(errors) == 5
    assert max(errors.values()) <= LOGITS_ATOL, errors


def _swap_layer0_norms(model):
    layer = model.layers[0]
    layer.post_attention_layernorm, layer.audio_post_attention_layernorm = (
        layer.audio_post_attention_layernorm, layer.post_attention_layernorm)


def _swap_layer1_ffns(model):
    layer = model.layers[1]
    layer.mlp, layer.audio_mlp = layer.audio_mlp, layer.mlp


def _transpose_o_proj(model):
    weight = model.layers[2].self_attn.o_proj.weight
    weight.data = weight.data.t().contiguous()


def _codebook_rows_shifted(model):
    """Stride 1024 instead of 1026: the classic off-by-two of this checkpoint."""
    model.codebook_offsets = torch.arange(8) * 1024


@pytest.mark.parametrize("mistake", [_swap_layer0_norms, _swap_layer1_ffns, _transpose_o_proj, _codebook_rows_shifted])
def test_parity_fails_when_a_weight_is_misplaced(models, mistake):
    """The golden comparison must catch a weight loaded into the wrong place."""
    broken = copy.deepcopy(models["llm_tiny"])
    mistake(broken)
    errors = golden_errors(broken, load("llm_tiny"))
    assert max(errors.values()) > 100 * LOGITS_ATOL, errors


def test_routing_equivalence_and_causality(tiny_model):
    """Spec §7.3: with audio weights = text weights a DualFFN layer is a plain Llama layer for any mask;
    with distinct weights, a text position before every audio position ignores all audio weights."""
    model = copy.deepcopy(tiny_model)
    length = 12
    x = torch.randn(1, length, model.config.hidden_size)
    model.embed = lambda *args: x  # same layer inputs whatever the routing
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, 7:] = True

    def hidden(mode, audio_mask):
        return model.hidden_states(mode, None, None, audio_mask, torch.zeros(1, dtype=torch.long), model.new_cache(1, length))[0]

    routed_before = hidden(Mode.MIXED, mask)
    text_only = hidden(Mode.TEXT, None)
    assert torch.allclose(routed_before[0, :7], text_only[0, :7], atol=1e-6)  # causality + routing
    assert not torch.allclose(routed_before[0, 7:], text_only[0, 7:], atol=1e-3)  # audio rows took the audio path
    for layer in model.layers:
        layer.audio_mlp.load_state_dict(layer.mlp.state_dict())
        layer.audio_input_layernorm.load_state_dict(layer.input_layernorm.state_dict())
        layer.audio_post_attention_layernorm.load_state_dict(layer.post_attention_layernorm.state_dict())
    random_mask = torch.rand(1, length) < 0.5
    assert torch.allclose(hidden(Mode.MIXED, random_mask), text_only, atol=1e-6)
    assert torch.allclose(hidden(Mode.AUDIO, None), text_only, atol=1e-6)


def test_audio_embedding_offsets_and_head_layout(tiny_model):
    """Spec §7.4-7.5: column c embeds as sum_k E[k*1026 + c_k]; flat head index k*1026+v is logits[k][v]."""
    model = tiny_model
    column = torch.tensor([1024] * 8)
    expected = model.audio_codebook_embeddings.weight[torch.arange(8) * 1026 + 1024].sum(0)
    assert torch.allclose(model.embed_audio(column[None, None])[0, 0], expected)
    assert [int(r) for r in torch.arange(8) * 1026 + 1024] == [1024, 2050, 3076, 4102, 5128, 6154, 7180, 8206]
    hidden = torch.randn(3, model.config.hidden_size)
    flat = model.audio_decoder_proj.audio_lm_head(hidden)
    assert torch.equal(model.audio_head(hidden)[:, 5, 1025], flat[:, 5 * 1026 + 1025])


def test_cached_steps_match_an_uncached_forward(models):
    """Spec §7.7: a KV-cached decode step equals the last row of a full forward on the same sequence."""
    model = models["llm_tiny"]
    golden = load("llm_tiny")
    _, forced = golden_prompts(golden, "voice_clone", model.config.audio_out_token_id)
    full_text, full_audio = torch_logits(model, forced)
    length = len(forced.input_ids)
    cache = model.new_cache(1, length + 1)
    prefix = length - 5
    args = [torch.from_numpy(a)[None] for a in (forced.input_ids, forced.audio_codes, forced.audio_mask)]
    model(Mode.MIXED, *(a[:, :prefix] for a in args), torch.zeros(1, dtype=torch.long), torch.tensor([prefix - 1]), cache)
    for position in range(prefix, length):
        _, audio, _ = model(Mode.AUDIO, None, args[1][:, position : position + 1], None, torch.tensor([position]),
                            torch.zeros(1, dtype=torch.long), cache)
    assert torch.allclose(audio[0], torch.from_numpy(full_audio[-1]), atol=1e-5)
