"""Torch codec reference against the upstream goldens (both checkpoint layouts), strict loading,
and controls showing the parity checks fail on the classic weight-norm mistakes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from goldens import DECODE_ATOL, ENCODE_RTOL, CODEC_GOLDEN as GOLDEN, LAYOUTS, cases, rel_err, requires_golden

from engines.codec import EncodeGeometry
from export.codec import load_codec
from export.codec_checkpoint import POS_CONV
from export.codec_config import CodecCheckpointError

pytestmark = requires_golden
DECODE_CASES = ["dec_T1", "dec_T7", "dec_T50", "dec_T7_nq4"]


@pytest.fixture(scope="module")
def golden():
    return cases()


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def codec(request):
    return load_codec(LAYOUTS[request.param])


@pytest.fixture
def fresh_codec():
    """A private copy for tests that corrupt weights."""
    return load_codec(GOLDEN)


def _decode(codec, codes: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return codec.decode(torch.from_numpy(codes)).numpy()


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_matches_golden(codec, golden, case):
    codes = torch.from_numpy(golden[f"{case}_codes"])[None]
    with torch.no_grad():
        latent = codec.latent(codes)[0].numpy()
        audio = codec.decode(codes).numpy()
    assert audio.shape == (1, 1, 960 * codes.shape[-1]) and audio.dtype == np.float32
    assert np.abs(latent - golden[f"{case}_latent"]).max() <= DECODE_ATOL
    assert np.abs(audio[0, 0] - golden[f"{case}_audio"]).max() <= DECODE_ATOL


def test_decode_batch_matches_golden(codec, golden):
    audio = _decode(codec, golden["dec_batch_codes"])
    assert np.abs(audio[:, 0] - golden["dec_batch_audio"]).max() <= DECODE_ATOL


@pytest.mark.parametrize("n", [24000, 24300])
def test_encode_matches_golden(codec, golden, n):
    with torch.no_grad():
        result = codec.encode_detailed(torch.from_numpy(golden[f"enc_N{n}_wave"]))
    assert result.plan.reencode == bool(golden[f"enc_N{n}_reencoded"])
    assert result.codes.dtype == torch.int64
    np.testing.assert_array_equal(result.codes.numpy(), golden[f"enc_N{n}_codes"])
    for name in ("sem_features", "acoustic", "prior"):
        ours, ref = getattr(result, name).numpy(), golden[f"enc_N{n}_{name}"]
        assert ours.shape == ref.shape, name
        assert rel_err(ours, ref) <= ENCODE_RTOL, name
    audio = _decode(codec, result.codes.numpy()[None])
    assert np.abs(audio[0, 0] - golden[f"enc_N{n}_audio"]).max() <= DECODE_ATOL


def test_encode_plan_matches_spec_table():
    """Spec §4.4: T = N // 960 (+1 if N mod 960 >= 119); re-encode exactly for N mod 960 in [119, 631]."""
    geometry = EncodeGeometry()
    for n in range(3 * 960, 4 * 960):
        plan, r = geometry.plan(n), n % 960
        assert plan.frames == n // 960 + (r >= 119) and plan.reencode == (119 <= r <= 631), n
        assert plan.acoustic_pad == (320 if plan.reencode else 0)


def test_encode_rejects_short_input(codec):
    with pytest.raises(ValueError, match="at least 632 samples"):
        codec.encode(torch.zeros(631))
    assert codec.encode(torch.zeros(632)).shape == (8, 1)


def test_decode_rejects_bos_eos(codec):
    with pytest.raises(ValueError, match="BOS/EOS"):
        codec.decode(torch.full((1, 8, 2), 1024))


# --- the parity checks bite ----------------------------------------------------------------


def _raw_original():
    return torch.load(GOLDEN / "model.pth", weights_only=True)


@pytest.mark.parametrize("fault", ["gain_dropped", "conv_transpose_per_output_channel"])
def test_decode_parity_catches_wrong_weight_norm(fresh_codec, golden, fault):
    """W = v (gain dropped), or ConvTranspose normalised per output channel: decode leaves tolerance."""
    raw = _raw_original()
    with torch.no_grad():
        for name, module in fresh_codec.decoder_2.named_modules():
            key = f"decoder_2.{name}"
            if f"{key}.weight_v" not in raw:
                continue
            g, v = raw[f"{key}.weight_g"], raw[f"{key}.weight_v"]
            if fault == "gain_dropped":
                module.weight.copy_(v)
            elif isinstance(module, torch.nn.ConvTranspose1d):
                module.weight.copy_(torch._weight_norm(v, g, 1))
    audio = _decode(fresh_codec, golden["dec_T7_codes"][None])
    assert np.abs(audio[0, 0] - golden["dec_T7_audio"]).max() > 100 * DECODE_ATOL


def test_encode_parity_catches_dim0_fold_of_pos_conv(fresh_codec, golden):
    """HuBERT's pos conv folded with the dim-0 rule instead of dim 2: HuBERT features leave tolerance."""
    raw = _raw_original()
    g, v = raw[f"{POS_CONV}.parametrizations.weight.original0"], raw[f"{POS_CONV}.parametrizations.weight.original1"]
    with torch.no_grad():
        fresh_codec.get_submodule(POS_CONV).weight.copy_(torch._weight_norm(v, g, 0))
        result = fresh_codec.encode_detailed(torch.from_numpy(golden["enc_N24000_wave"]))
    assert rel_err(result.sem_features.numpy(), golden["enc_N24000_sem_features"]) > 10 * ENCODE_RTOL


# --- strict loading --------------------------------------------------------------------------


def _edited_copy(tmp_path, edit=None, edit_config=None):
    state = _raw_original()
    config = json.loads((GOLDEN / "config.json").read_text())
    if edit:
        edit(state)
    if edit_config:
        edit_config(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(state, tmp_path / "model.pth")
    return tmp_path


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


STRICT_CASES = {
    "missing_gain": (
        lambda s: s.pop("decoder_2.model.1.block.1.weight_g"),
        "missing tensor 'decoder_2.model.1.block.1.weight_g'",
    ),
    "missing_hubert": (
        lambda s: s.pop("semantic_model.encoder.layers.1.final_layer_norm.bias"),
        "missing tensor 'semantic_model.encoder.layers.1.final_layer_norm.bias'",
    ),
    "unexpected": (_set("decoder_2.model.9.weight", torch.zeros(1)), "unexpected tensor 'decoder_2.model.9.weight'"),
    "unexpected_codebook_buffer": (
        _set("quantizer.vq.layers.3._codebook.embed_sum", torch.zeros(1024, 8)),
        "unexpected tensor 'quantizer.vq.layers.3._codebook.embed_sum'",
    ),
    "misshaped_direction": (
        _set("decoder_2.model.2.block.3.block.1.weight_v", torch.zeros(32, 32, 5)),
        "tensor 'decoder_2.model.2.block.3.block.1.weight_v' has shape [32, 32, 5], expected [32, 32, 7]",
    ),
    "misshaped_transpose_gain": (
        _set("decoder_2.model.3.block.1.weight_g", torch.ones(16, 1, 1)),
        "tensor 'decoder_2.model.3.block.1.weight_g' has shape [16, 1, 1], expected [32, 1, 1]",
    ),
    "not_inited": (
        _set("quantizer.vq.layers.5._codebook.inited", torch.zeros(1)),
        "'quantizer.vq.layers.5._codebook.inited' is [0.0], not 1",
    ),
}


@pytest.mark.parametrize("case", sorted(STRICT_CASES))
def test_strict_load_names_the_tensor(tmp_path, case):
    edit, message = STRICT_CASES[case]
    with pytest.raises(CodecCheckpointError) as err:
        load_codec(_edited_copy(tmp_path, edit))
    assert message in str(err.value)


@pytest.mark.parametrize("form", ["parametrizations", "folded"])
def test_other_weight_norm_storage_forms_load(tmp_path, golden, form):
    """DAC convs saved with the parametrizations API, or already folded, load to the same codec."""

    def restore(state):
        for key in [k for k in state if k.endswith(".weight_v")]:
            module = key[: -len(".weight_v")]
            g, v = state.pop(module + ".weight_g"), state.pop(key)
            if form == "folded":
                state[module + ".weight"] = torch._weight_norm(v, g, 0)
            else:
                state[module + ".parametrizations.weight.original0"] = g
                state[module + ".parametrizations.weight.original1"] = v

    codec = load_codec(_edited_copy(tmp_path, restore))
    assert np.abs(_decode(codec, golden["dec_T7_codes"][None])[0, 0] - golden["dec_T7_audio"]).max() <= DECODE_ATOL


def test_strict_load_transformers_layout_uses_its_names(tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(GOLDEN / "hf" / "model.safetensors"))
    state.pop("acoustic_decoder.block.2.res_unit3.conv1.weight")
    state["acoustic_encoder.block.9.snake1.alpha"] = torch.ones(1, 8, 1)
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(GOLDEN / "hf" / "config.json", tmp_path / "config.json")
    with pytest.raises(CodecCheckpointError) as err:
        load_codec(tmp_path)
    assert "missing tensor 'acoustic_decoder.block.2.res_unit3.conv1.weight'" in str(err.value)
    assert "unexpected tensor 'acoustic_encoder.block.9.snake1.alpha'" in str(err.value)


def test_config_contradicting_tensors_is_rejected(tmp_path):
    def wrong_width(config):
        config["_tiny_overrides"]["decoder_channels"] = 1024  # the real width, as a class default would give

    with pytest.raises(CodecCheckpointError, match="decoder_channels = 1024 but the tensors give 128"):
        load_codec(_edited_copy(tmp_path, edit_config=wrong_width))


def test_widths_come_from_tensor_shapes(tmp_path, golden):
    """Without `_tiny_overrides` widths are inferred; only the head count (not in any shape) must be stated."""

    def only_heads(config):
        config["_tiny_overrides"] = {"semantic_model_config": {"num_attention_heads": 4}}

    codec = load_codec(_edited_copy(tmp_path, edit_config=only_heads))
    audio = _decode(codec, golden["dec_T7_codes"][None])[0, 0]
    assert np.abs(audio - golden["dec_T7_audio"]).max() <= DECODE_ATOL
    with torch.no_grad():
        codes = codec.encode(torch.from_numpy(golden["enc_N24300_wave"]))
    np.testing.assert_array_equal(codes.numpy(), golden["enc_N24300_codes"])

    def no_overrides(config):
        del config["_tiny_overrides"]

    with pytest.raises(CodecCheckpointError, match="num_attention_heads"):
        load_codec(_edited_copy(tmp_path, edit_config=no_overrides))
