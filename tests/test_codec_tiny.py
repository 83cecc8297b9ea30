"""The tiny codec maker: upstream key set, round trip through load_codec, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from goldens import CODEC_GOLDEN as GOLDEN, cases

from export.codec import load_codec
from export.tiny_codec import main, write_tiny_codec


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_codec(tmp_path_factory.mktemp("tiny_codec"), seed=0)


def _state(path):
    return torch.load(path / "model.pth", weights_only=True)


def test_round_trip(tiny_dir):
    codec = load_codec(tiny_dir)
    codes = torch.from_numpy(np.random.default_rng(0).integers(0, 1024, (2, 8, 5)))
    t = torch.arange(24000) / 24000
    noise = torch.randn(24000, generator=torch.Generator().manual_seed(0))
    wave = 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.05 * noise
    with torch.no_grad():
        audio = codec.decode(codes)
        encoded = codec.encode(wave)
    assert audio.shape == (2, 1, 4800) and torch.isfinite(audio).all()
    assert 1e-3 < audio.abs().max() < 1.0  # sane amplitude
    assert encoded.shape == (8, 25) and encoded.dtype == torch.int64
    assert 0 <= int(encoded.min()) and int(encoded.max()) < 1024
    assert min(len(set(row.tolist())) for row in encoded) >= 5  # varied codes in every layer


@pytest.mark.skipif(GOLDEN is None, reason="codec golden vectors not found")
def test_upstream_key_set_and_config_keys(tiny_dir):
    ours, golden = _state(tiny_dir), _state(GOLDEN)
    assert list(ours) == list(golden)  # names and upstream order
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in golden.items()}
    config, golden_config = (json.loads((d / "config.json").read_text()) for d in (tiny_dir, GOLDEN))
    assert list(config) == list(golden_config)


def test_weight_norm_gain_differs_from_direction_norm(tiny_dir):
    state = _state(tiny_dir)
    g, v = state["decoder_2.model.1.block.1.weight_g"], state["decoder_2.model.1.block.1.weight_v"]
    assert not torch.allclose(g, torch.norm_except_dim(v, 2, 0))


def test_deterministic(tiny_dir, tmp_path):
    first = _state(tiny_dir)
    again = _state(write_tiny_codec(tmp_path / "again", seed=0))
    other = _state(write_tiny_codec(tmp_path / "other", seed=1))
    assert all(first[k].numpy().tobytes() == again[k].numpy().tobytes() for k in first)
    assert not torch.equal(first["decoder_2.model.0.weight_v"], other["decoder_2.model.0.weight_v"])


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--seed", "3"])
    assert "wrote tiny codec" in capsys.readouterr().out
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.pth").is_file()


@pytest.mark.skipif(GOLDEN is None, reason="codec golden vectors not found")
def test_golden_wave_encodes_to_varied_codes(tiny_dir):
    codec = load_codec(tiny_dir)
    with torch.no_grad():
        codes = codec.encode(torch.from_numpy(cases()["enc_N24300_wave"]))
    assert codes.shape == (8, 26) and min(len(set(row.tolist())) for row in codes) >= 8
