"""Checkpoint loading: strict errors that name the tensor, sharded files, the transformers layout, bf16."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.checkpoint import CheckpointError, load_state_dict
from export.config import load_config
from export.llm import Mode, load_backbone


def _copy_with(tmp_path, source, edit):
    """A copy of the checkpoint whose tensors went through `edit(dict)`."""
    out = tmp_path / "ckpt"
    out.mkdir()
    shutil.copy(source / "config.json", out / "config.json")
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda t: t.pop("layers.1.audio_mlp.up_proj.weight"), ["missing", "layers.1.audio_mlp.up_proj.weight"]),
        (lambda t: t.update({"layers.0.audio_attn.q_proj.weight": torch.zeros(2, 2)}), ["unexpected", "layers.0.audio_attn.q_proj.weight"]),
        (lambda t: t.update({"norm.weight": torch.zeros(63)}), ["mis-shaped", "norm.weight", "(63,)"]),
    ],
)
def test_strict_loading_names_the_tensor(tmp_path, tiny_checkpoint, edit, words):
    broken = _copy_with(tmp_path, tiny_checkpoint / "llm", edit)
    with pytest.raises(CheckpointError) as error:
        load_backbone(broken)
    for word in words:
        assert word in str(error.value)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint / "llm"
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(source / "config.json", out / "config.json")
    weight_map = {}
    for index, part in enumerate((names[::2], names[1::2]), 1):
        filename = f"model-0000{index}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, out / filename)
        weight_map.update({n: filename for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = load_config(out)
    a, b = load_state_dict(out, config), load_state_dict(source, config)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_transformers_layout_gives_identical_outputs(tmp_path, tiny_checkpoint):
    """Same tensors renamed as transformers' converter does (spec §2.4) must give the same model."""
    source = tiny_checkpoint / "llm"
    raw = json.loads((source / "config.json").read_text())
    text = raw["text_config"]
    rope = {"rope_theta": text["rope_theta"], **text["rope_scaling"]}
    hf_config = {key: text[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps")}
    hf_config.update(model_type="higgs_audio_v2", rope_parameters=rope, num_codebooks=8, codebook_size=1026)
    renamed = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        if name.startswith("audio_codebook_embeddings."):
            name = "model.embed_audio_tokens.embed_audio_tokens." + name.split(".", 1)[1]
        elif name.startswith(("embed_tokens", "layers", "norm")):
            name = "model." + name
        else:
            name = name.removeprefix("audio_decoder_proj.")
        renamed[name] = tensor
    renamed["model.embed_audio_tokens.audio_tokens_offsets"] = torch.arange(8) * 1026
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(hf_config))
    save_file(renamed, out / "model.safetensors")

    ids = torch.tensor([[128000, 128006, 882, 128007, 271, 1000, 2000]])
    outputs = []
    for checkpoint in (source, out):
        model = load_backbone(checkpoint)
        text, _, _ = model(Mode.TEXT, ids, None, None, torch.zeros(1, dtype=torch.long), torch.tensor([6]), model.new_cache(1, 16))
        outputs.append(text)
    assert torch.equal(outputs[0], outputs[1])


def test_bf16_loads_without_a_float32_copy(tiny_checkpoint):
    model = load_backbone(tiny_checkpoint / "llm", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_training_split_tensors_are_concatenated(tmp_path, tiny_checkpoint):
    """Spec §2.3: embed_tokens.embedding_{frozen,trainable} concatenate on dim 0."""

    def split(tensors):
        full = tensors.pop("embed_tokens.weight")
        tensors["embed_tokens.embedding_frozen.weight"] = full[:1000].clone()
        tensors["embed_tokens.embedding_trainable.weight"] = full[1000:].clone()

    source = tiny_checkpoint / "llm"
    state = load_state_dict(_copy_with(tmp_path, source, split), load_config(source))
    assert torch.equal(state["embed_tokens.weight"], load_state_dict(source, load_config(source))["embed_tokens.weight"])
