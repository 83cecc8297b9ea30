"""export.tiny's writer: sharded checkpoints load like one file, and only one shard is ever in memory."""

from __future__ import annotations

import json
import weakref

import torch
from safetensors import safe_open

import export.tiny as tiny
from export.checkpoint import INDEX_FILE, load_state_dict
from export.config import load_config

SMALL_SHARDS = 1 << 20  # tiny's 16 MB embeddings alone, its layers together: a handful of shards


def test_sharded_write_loads_like_a_single_file(tmp_path):
    logs: list[str] = []
    single = tiny.write_llm(tmp_path / "single", "tiny", log=lambda *_: None)
    sharded = tiny.write_llm(tmp_path / "sharded", "tiny", log=logs.append, shard_bytes=SMALL_SHARDS)

    index = json.loads((sharded / INDEX_FILE).read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and "model.safetensors" not in files
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert sorted(set(index["weight_map"].values())) == files
    total = 0
    for name in files:
        with safe_open(str(sharded / name), framework="pt") as f:
            assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items() if v == name)
            total += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert index["metadata"]["total_size"] == total
    assert [line.split()[2] for line in logs] == files  # one progress line per shard, in order

    config = load_config(single)
    a, b = load_state_dict(sharded, config), load_state_dict(single, config)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_one_shard_is_alive_at_a_time(tmp_path, monkeypatch):
    """Whenever a tensor is generated, every tensor still alive belongs to its shard."""
    alive: list[tuple[str, weakref.ref]] = []
    seen: list[tuple[str, set[str]]] = []
    generate = tiny.random_tensor

    def tracked(name, shape, generator):
        seen.append((name, {n for n, ref in alive if ref() is not None}))
        tensor = generate(name, shape, generator)
        alive.append((name, weakref.ref(tensor)))
        return tensor

    monkeypatch.setattr(tiny, "random_tensor", tracked)
    out = tiny.write_llm(tmp_path, "tiny", log=lambda *_: None, shard_bytes=SMALL_SHARDS)
    shard_of = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert len(seen) == len(shard_of)
    for name, others in seen:
        assert {shard_of[n] for n in others} <= {shard_of[name]}, f"{name} generated while {others} alive"
