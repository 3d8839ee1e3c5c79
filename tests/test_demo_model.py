"""The bundled demo model answers its facts, and the facts live in memory."""

from __future__ import annotations

from memedit.evaluate import accuracy, memory_zeroed
from memedit.facts import world_of


def test_bundled_model_shape(demo):
    mem = demo.config.memory
    assert mem.n_slots >= 128 * 128 and mem.heads >= 4 and mem.knn >= 16
    assert demo.read_only


def test_bundled_model_answers_its_facts_from_memory(demo):
    facts = world_of(demo).facts
    assert len(facts) >= 6000
    prompts = [p for f in facts for p in f.training_prompts]
    targets = [f.target_true for f in facts for _ in f.training_prompts]
    acc = accuracy(demo, prompts, targets)
    assert acc >= 0.95, acc
    with memory_zeroed(demo):
        zeroed = accuracy(demo, prompts, targets)
    assert zeroed < 0.20, zeroed
