"""Reads an artifacts directory written by `make export` (the only contract between export/ and engines/)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import tokens

# The artifacts contract, owned here: export/ writes these names and this format, engines/ read them.
FORMAT = 1  # manifest.json "format"; a manifest of any other format is refused (re-export)
WEIGHTS_FILE = "weights.bin"  # backbone weights, stored once, read by every backbone graph as external data
BACKBONE_GRAPHS = {  # graph key -> file; prefill reads every weight, text / audio only their positions' own
    "prefill": "backbone_prefill.onnx",
    "text": "backbone_text.onnx",
    "audio": "backbone_audio.onnx",
}
STEP_GRAPHS = ("text", "audio")  # the backbone graphs decode steps run through
SAMPLER = "audio_sampler"  # audio logits -> drawn codes (no weights)
CODEC_DECODER = "codec_decoder"
CODEC_ENCODER = "codec_encoder"  # voice cloning only
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"  # written last by make export: its presence means the export finished


def graph_file(key: str) -> str:
    """The file name of graph `key` in an artifacts directory."""
    return BACKBONE_GRAPHS.get(key, f"{key}.onnx")


class ManifestError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The backbone facts the runtimes and the loop need, as the manifest's "model" carries them:
    the owner of the token and stream ids at run time (`export.config.HiggsConfig` extends it with
    what only the exporter needs). The defaults are Higgs Audio v2's ids (engines/tokens.py), for
    the config.json layouts that leave one out; a manifest always names every field."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_codebooks: int
    codebook_size: int
    stream_bos_id: int
    stream_eos_id: int
    audio_in_token_id: int = tokens.AUDIO_IN
    audio_out_token_id: int = tokens.AUDIO_OUT
    audio_out_bos_token_id: int = tokens.AUDIO_OUT_BOS
    audio_eos_token_id: int = tokens.AUDIO_EOS
    audio_bos_token_id: int = tokens.AUDIO_BOS
    bos_token_id: int = tokens.BEGIN_OF_TEXT
    eos_token_id: int = tokens.END_OF_TEXT
    eot_token_id: int = tokens.EOT

    @property
    def codebook_stride(self) -> int:
        """Rows per codebook in the audio embedding / head: codes + stream BOS + stream EOS."""
        return self.codebook_size + 2

    @property
    def stop_token_ids(self) -> dict[str, int]:
        """The special tokens a stop string may name when there is no tokenizer (prompts given as ids)."""
        return {"<|end_of_text|>": self.eos_token_id, "<|eot_id|>": self.eot_token_id,
                "<|audio_eos|>": self.audio_eos_token_id}

    @classmethod
    def from_json(cls, data: dict) -> "ModelSpec":
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Manifest:
    root: Path
    dtype: str
    model: ModelSpec
    graphs: dict
    codec: dict | None
    tokenizer: Path | None
    source: dict  # the checkpoint / codec directories it was exported from

    @classmethod
    def load(cls, artifacts_dir: str | Path) -> "Manifest":
        root = Path(artifacts_dir)
        path = root / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{path} not found: run `make export CHECKPOINT=... CODEC=... OUT={root}` first")
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != FORMAT:
            raise ManifestError(f"{path}: manifest format {data.get('format')!r}, this version reads {FORMAT}; re-export")
        manifest = cls(
            root=root,
            dtype=data["dtype"],
            model=ModelSpec.from_json(data["model"]),
            graphs=data["graphs"],
            codec=data.get("codec"),
            tokenizer=root / data["tokenizer"] if data.get("tokenizer") else None,
            source=data.get("source") or {},
        )
        for key, entry in manifest.graphs.items():
            if not (root / entry["file"]).is_file():
                raise ManifestError(f"{path}: graph {key} file {entry['file']} is missing; re-run make export")
        return manifest

    def graph_path(self, key: str) -> Path:
        if key not in self.graphs:
            raise ManifestError(f"{self.root}: no {key} graph in the manifest (exported without it?)")
        return self.root / self.graphs[key]["file"]

    def has(self, key: str) -> bool:
        return key in self.graphs
