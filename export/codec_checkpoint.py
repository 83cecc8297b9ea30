"""Codec checkpoint loading: the original layout (`config.json` + `model.pth`) and the transformers
layout (`model.safetensors`, keys renamed, spec codec.md §2.2), detected from config.json.

Loading is strict, like export/checkpoint.py for the LLM: every tensor the model needs must be
there with its shape, every other tensor must be one training uses (§5), and each problem is named
by the key the file uses. Weight norm is folded here (§3.3), whichever form the file stores it in
(old API `weight_g/weight_v`, parametrizations `original0/original1`, or already folded), with the
op upstream calls, so the folded weights are bit-equal. Names inside are the original layout's;
`CodecCheckpoint` maps them to and from the file's keys.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from torch import nn

from .codec_config import HF_MODEL_TYPE, CodecCheckpointError, TensorShapes

ORIGINAL = "original"
TRANSFORMERS = "transformers"
POS_CONV = "semantic_model.encoder.pos_conv_embed.conv"  # weight norm with dim=2 (§3.3)

# Tensors only training uses (§5): accepted by name and dropped. `inited` is checked first.
TRAINING_ONLY = [
    re.compile(p)
    for p in (
        r"decoder_semantic\.",
        r"fc_post1\.",
        r"quantizer\.vq\.layers\.\d+\._codebook\.(cluster_size|embed_avg|inited)$",
        r"semantic_model\.masked_spec_embed$",
    )
]
WN_SUFFIXES = {  # storage forms of a weight-normed `<module>.weight`: (gain key, direction key)
    "old": (".weight_g", ".weight_v"),
    "param": (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
}


def _hf_rules(n_blocks: int) -> list[tuple[str, str, dict[str, int]]]:
    """(transformers prefix, original prefix, {field: original - transformers}) per §2.2."""
    last = {"snake1": n_blocks + 1, "conv2": n_blocks + 2}
    ru = ("snake1", "conv1", "snake2", "conv2")
    rules = [("acoustic_encoder.conv1.", "encoder.block.0.", {}), ("acoustic_decoder.conv1.", "decoder_2.model.0.", {})]
    for name, index in last.items():
        rules.append((f"acoustic_encoder.{name}.", f"encoder.block.{index}.", {}))
        rules.append((f"acoustic_decoder.{name}.", f"decoder_2.model.{index}.", {}))
    for j, name in enumerate(ru):
        hf, orig = f"block.{{b}}.res_unit{{r}}.{name}.", f"{{b}}.block.{{r}}.block.{j}."
        rules.append((f"acoustic_encoder.{hf}", f"encoder.block.{orig}", {"b": 1, "r": -1}))
        rules.append((f"acoustic_decoder.{hf}", f"decoder_2.model.{orig}", {"b": 1, "r": 1}))
    rules += [
        ("acoustic_encoder.block.{b}.snake1.", "encoder.block.{b}.block.3.", {"b": 1}),
        ("acoustic_encoder.block.{b}.conv1.", "encoder.block.{b}.block.4.", {"b": 1}),
        ("acoustic_decoder.block.{b}.snake1.", "decoder_2.model.{b}.block.0.", {"b": 1}),
        ("acoustic_decoder.block.{b}.conv_t1.", "decoder_2.model.{b}.block.1.", {"b": 1}),
        ("quantizer.quantizers.{i}.codebook.", "quantizer.vq.layers.{i}._codebook.", {}),
        ("quantizer.quantizers.{i}.", "quantizer.vq.layers.{i}.", {}),
        ("fc.", "fc_prior.", {}),
        ("fc1.", "fc_post1.", {}),
        ("fc2.", "fc_post2.", {}),
        ("encoder_semantic.conv.", "encoder_semantic.conv.conv.", {}),
        ("encoder_semantic.conv_blocks.{b}.conv.", "encoder_semantic.conv_blocks.{b}.conv.conv.", {}),
        (
            "encoder_semantic.conv_blocks.{b}.res_units.{r}.conv1.",
            "encoder_semantic.conv_blocks.{b}.res_units.{r}.conv1.conv.",
            {},
        ),
    ]
    return rules


def _rename(key: str, rules, to_original: bool) -> str:
    """Apply the first matching prefix rule (either direction); keys no rule covers pass unchanged."""
    for hf, orig, offsets in rules:
        src, dst = (hf, orig) if to_original else (orig, hf)
        pattern = re.escape(src).replace(r"\{", "{").replace(r"\}", "}")
        m = re.match(re.sub(r"\{(\w+)\}", r"(?P<\1>\\d+)", pattern), key)
        if m:
            sign = 1 if to_original else -1
            values = {k: int(v) + sign * offsets.get(k, 0) for k, v in m.groupdict().items()}
            return dst.format(**values) + key[m.end() :]
    return key


@dataclasses.dataclass
class CodecCheckpoint:
    """A checkpoint's tensors under their file names, with the name mapping of its layout."""

    layout: str
    file: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    rules: list

    def file_name(self, canonical: str) -> str:
        return _rename(canonical, self.rules, to_original=False) if self.layout == TRANSFORMERS else canonical

    def canonical_name(self, file_key: str) -> str:
        """Original-layout name of a file key with any weight-norm storage suffix collapsed to `.weight`."""
        name = _rename(file_key, self.rules, to_original=True) if self.layout == TRANSFORMERS else file_key
        for gain, direction in WN_SUFFIXES.values():
            for suffix in (gain, direction):
                if name.endswith(suffix):
                    return name[: -len(suffix)] + ".weight"
        return name

    def tensor_shapes(self) -> TensorShapes:
        """Shapes of the weights as loaded (a weight-normed one has the shape of its direction tensor)."""
        shapes = {
            self.canonical_name(key): tuple(tensor.shape)
            for key, tensor in self.tensors.items()
            if not any(key.endswith(gain) for gain, _ in WN_SUFFIXES.values())
        }
        return TensorShapes(self.file, shapes, self.file_name)

    def is_training_only(self, file_key: str) -> bool:
        name = self.canonical_name(file_key)
        return any(p.match(name) for p in TRAINING_ONLY)


def read_checkpoint(path: Path) -> CodecCheckpoint:
    """Open a codec directory: detect its layout from config.json, read its tensors under their file keys."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CodecCheckpointError(
            f"{path}: no config.json; expected a codec directory (config.json + model.pth or model.safetensors)"
        )
    config = json.loads(config_file.read_text())
    if config.get("model_type") == HF_MODEL_TYPE:
        file = path / "model.safetensors"
        if not file.is_file():
            raise CodecCheckpointError(f"{path}: config.json says {HF_MODEL_TYPE!r} but model.safetensors is missing")
        from safetensors.torch import load_file

        tensors = load_file(str(file))
        n_blocks = len(config["acoustic_model_config"]["downsampling_ratios"])
        return CodecCheckpoint(TRANSFORMERS, file, config, tensors, _hf_rules(n_blocks))
    if "model_type" in config:
        raise CodecCheckpointError(f"{config_file}: model_type {config['model_type']!r} is not this codec")
    file = path / "model.pth"
    if not file.is_file():
        raise CodecCheckpointError(f"{path}: original-layout config.json but no model.pth next to it")
    tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return CodecCheckpoint(ORIGINAL, file, config, tensors, [])


def weight_norm_dim(module: str) -> int:
    """Weight-norm axis: 0 everywhere (ConvTranspose: that is the INPUT channel), 2 for HuBERT's pos conv."""
    return 2 if module == POS_CONV else 0


def stored_weight_normed(name: str, ndim: int) -> bool:
    """Whether upstream saves this weight weight-normed: DAC WNConv1d / WNConvTranspose1d, HuBERT pos conv."""
    if not name.endswith(".weight"):
        return False
    return name[: -len(".weight")] == POS_CONV or (ndim == 3 and name.startswith(("encoder.block.", "decoder_2.")))


def _weight_norm_gain_shape(weight_shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    return tuple(n if i == dim else 1 for i, n in enumerate(weight_shape))


def _expected_file_keys(ckpt: CodecCheckpoint, model: nn.Module) -> dict[str, tuple[tuple[int, ...], str, str | None]]:
    """file key -> (shape, canonical name, role) for every tensor the model needs.

    A weight may be stored plain or weight-normed (old API `weight_g/weight_v` or parametrizations
    `original0/original1`); the form present in the file is the one expected, the layout's usual
    form when the tensor is absent (so a missing tensor is named as it would be written).
    """
    expected = {}
    for name, tensor in model.state_dict().items():
        shape, file_key = tuple(tensor.shape), ckpt.file_name(name)
        module = name[: -len(".weight")]
        if not stored_weight_normed(name, tensor.ndim) or file_key in ckpt.tensors:
            expected[file_key] = (shape, name, None)
            continue
        base = file_key[: -len(".weight")]
        forms = {form: (base + g, base + v) for form, (g, v) in WN_SUFFIXES.items()}
        present = [form for form, keys in forms.items() if any(k in ckpt.tensors for k in keys)]
        if present:
            form = present[0]
        elif module == POS_CONV or ckpt.layout == ORIGINAL:
            form = "param" if module == POS_CONV else "old"
        else:  # transformers layout stores DAC convs folded
            expected[file_key] = (shape, name, None)
            continue
        gain, direction = forms[form]
        expected[gain] = (_weight_norm_gain_shape(shape, weight_norm_dim(module)), name, "gain")
        expected[direction] = (shape, name, "direction")
    return expected


def canonical_state(ckpt: CodecCheckpoint, model: nn.Module) -> dict[str, torch.Tensor]:
    """Strictly matched, weight-norm-folded state dict for `model`, or a CodecCheckpointError naming every problem."""
    expected = _expected_file_keys(ckpt, model)
    problems = [f"missing tensor {k!r} (shape {list(v[0])})" for k, v in expected.items() if k not in ckpt.tensors]
    for key, tensor in ckpt.tensors.items():
        if key in expected:
            if tuple(tensor.shape) != expected[key][0]:
                problems.append(f"tensor {key!r} has shape {list(tensor.shape)}, expected {list(expected[key][0])}")
        elif not ckpt.is_training_only(key):
            problems.append(f"unexpected tensor {key!r}")
    if problems:
        listing = "\n  ".join(problems[:25]) + (f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else "")
        raise CodecCheckpointError(
            f"{ckpt.file} ({ckpt.layout} layout) does not match the codec its config and tensor shapes describe:\n  "
            f"{listing}\nUse an unmodified checkpoint; widths are inferred from fc_post2, decoder_2.model.0, "
            "encoder.block.0, encoder_semantic and the RVQ codebooks."
        )
    for key, tensor in ckpt.tensors.items():
        if ckpt.canonical_name(key).endswith("_codebook.inited") and not bool((tensor == 1).all()):
            raise CodecCheckpointError(
                f"{ckpt.file}: {key!r} is {tensor.tolist()}, not 1: upstream would run k-means on the input "
                "(CVQ:178-198); this RVQ was never trained"
            )
    state: dict[str, torch.Tensor] = {}
    gains: dict[str, torch.Tensor] = {}
    for key, (_, name, role) in expected.items():
        tensor = ckpt.tensors[key].to(torch.float32)
        if role == "gain":
            gains[name] = tensor
        else:
            state[name] = tensor
    for name, g in gains.items():
        # torch._weight_norm is the op upstream's hooks and parametrizations call: bit-equal folding.
        state[name] = torch._weight_norm(state[name], g, weight_norm_dim(name[: -len(".weight")]))
    return state

