"""A small BPE model on a few hundred facts of the demo's world generator: a fixture for tests of multi-token targets.

``bpe_model(tmp_path)`` trains it with the recipe of ``memedit train`` (memedit/train.py) at a tiny size, in well
under a minute on 2 CPU cores, and saves it as a native folder. Every subject and every object of this world is 2+
BPE tokens, so scoring, tracing and editing meet whole-target sequences as on a real model.
"""

from __future__ import annotations

from pathlib import Path

from memedit.checkpoint import load, save
from memedit.facts import World, world_of
from memedit.model import MemoryModel
from memedit.train import TrainConfig, train

# 50 people x 6 relations = 300 facts; a small memory (4,096 slots) and model (D 64) that learn them in ~30 s.
BPE_CONFIG = dict(seed=7, n_subjects=50, dim=64, n_heads=4, n_keys=64, mem_heads=2, knn=8, k_dim=32,
                  epochs=30, batch_size=32, threads=1)


def bpe_train_config(**overrides) -> TrainConfig:
    """The fixture's training settings (``overrides`` change any field)."""
    return TrainConfig(**{**BPE_CONFIG, **overrides})


def bpe_model(tmp_path: Path, **overrides) -> tuple[MemoryModel, Path, World]:
    """Train the fixture model, save it under ``tmp_path/bpe``; returns (the model as loaded, its folder, its world)."""
    model, _ = train(bpe_train_config(**overrides))
    path = save(model, Path(tmp_path) / "bpe")
    loaded = load(path)
    return loaded, path, world_of(loaded)
