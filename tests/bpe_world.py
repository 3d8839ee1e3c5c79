"""A small BPE model on a few hundred facts of the demo's world generator: a fixture for tests of multi-token targets.

The model lives in ``tests/data/bpe-world/`` (a native folder, ~1 MB), trained by the recipe of ``memedit train``
(memedit/world/train.py) at a tiny size; ``python -m tests.bpe_world`` trains it again (a few minutes on 2 busy cores).
Every subject and every object of its world is 2+ BPE tokens, so scoring, tracing and editing meet whole-target
sequences as on a real model. ``bpe_model(tmp_path)`` hands a test a writable copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from memedit.lm.model import MemoryModel
from memedit.storage.checkpoint import load
from memedit.world.facts import World, world_of
from memedit.world.train import TrainConfig

FIXTURE = Path(__file__).parent / "data" / "bpe-world"
# 50 people x 6 relations = 300 facts; a small memory (4,096 slots) and model (D 64).
BPE_CONFIG = dict(seed=7, n_subjects=50, templates_per_fact=6, dim=64, n_heads=4, n_keys=64, mem_heads=2, knn=8,
                  k_dim=32, epochs=30, batch_size=32, threads=1)


def bpe_train_config(**overrides) -> TrainConfig:
    """The fixture's training settings (``overrides`` change any field)."""
    return TrainConfig(**{**BPE_CONFIG, **overrides})


def bpe_model(tmp_path: Path) -> tuple[MemoryModel, Path, World]:
    """A writable copy of the fixture model under ``tmp_path/bpe``; returns (the model as loaded, its folder, its
    world)."""
    path = Path(tmp_path) / "bpe"
    shutil.copytree(FIXTURE, path)
    model = load(path)
    return model, path, world_of(model)


def main() -> None:  # python -m tests.bpe_world: train the fixture again and print its figures
    import time

    from memedit.storage.checkpoint import save
    from memedit.world.evaluate import fact_accuracies
    from memedit.world.train import multi_token_share, train

    t0 = time.time()
    model, world = train(bpe_train_config())
    print(f"trained in {time.time() - t0:.0f}s")
    objects = [o for r in world.relations for o in r.objects]
    print(f"2+ tokens: objects {multi_token_share(model.tokenizer, objects):.1%}, "
          f"subjects {multi_token_share(model.tokenizer, world.subjects):.1%}")
    print("accuracy", fact_accuracies(model, world.facts))
    print("memory zeroed", fact_accuracies(model, world.facts, zero_memory=True))
    save(model, FIXTURE, overwrite=True)
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
