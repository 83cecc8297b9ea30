"""Where the shared golden vectors are (`../shared/golden` beside the checkout, or HIGGS_GOLDEN), and
the tolerances their READMEs give. Tests that need a missing golden skip with the reason."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

_ROOT = Path(__file__).resolve().parents[1]
_CANDIDATES = [os.environ.get("HIGGS_GOLDEN", ""), _ROOT / "shared" / "golden", _ROOT.parent / "shared" / "golden"]
GOLDEN_ROOT = next((Path(p) for p in _CANDIDATES if p and (Path(p) / "llm_tiny" / "cases.npz").is_file()), None)
LLM_GOLDEN_DIRS = {n: GOLDEN_ROOT / n for n in ("llm_tiny", "llm_tiny_eos3")} if GOLDEN_ROOT else {}
LOGITS_ATOL = 1e-4  # llm goldens' README

# codec_tiny (its README): decode 1e-5 absolute; encode intermediates within 1e-4 x max|x|
CODEC_GOLDEN = GOLDEN_ROOT / "codec_tiny" if GOLDEN_ROOT else None
LAYOUTS = {"original": CODEC_GOLDEN, "transformers": CODEC_GOLDEN / "hf"} if CODEC_GOLDEN else {}
DECODE_ATOL = 1e-5
ENCODE_RTOL = 1e-4

requires_golden = pytest.mark.skipif(GOLDEN_ROOT is None, reason="golden vectors not found (set HIGGS_GOLDEN)")


def golden_dir(name: str) -> Path:
    """The folder of one golden set (its cases.npz, and for llm_* its checkpoint), or skip the test."""
    if GOLDEN_ROOT is None or not (GOLDEN_ROOT / name / "cases.npz").is_file():
        pytest.skip(f"golden vectors {name} not found (set HIGGS_GOLDEN to the shared/golden folder)")
    return GOLDEN_ROOT / name


def load(name: str):
    """cases.npz of one golden set (sampling, llm_tiny, llm_tiny_eos3, codec_tiny), or skip the test."""
    return np.load(golden_dir(name) / "cases.npz")


def cases() -> dict[str, np.ndarray]:
    """All codec_tiny arrays."""
    with load("codec_tiny") as f:
        return {k: f[k] for k in f.files}


def rel_err(x: np.ndarray, golden: np.ndarray) -> float:
    """max |x - golden| / max |golden|, the codec README's measure for encode intermediates."""
    return float(np.abs(x - golden).max() / np.abs(golden).max())
