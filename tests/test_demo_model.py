"""The bundled demo model answers its facts, and the facts live in memory."""

from __future__ import annotations

from memedit.evaluate import fact_accuracies
from memedit.facts import world_of


def test_bundled_model_shape(demo):
    mem = demo.config.memory
    assert mem.n_slots >= 128 * 128 and mem.heads >= 4 and mem.knn >= 16
    assert demo.read_only


def test_bundled_model_answers_its_facts_from_memory(demo):
    facts = world_of(demo).facts
    assert len(facts) >= 6000
    acc = fact_accuracies(demo, facts)
    assert acc["train"] >= 0.95, acc
    zeroed = fact_accuracies(demo, facts, zero_memory=True)
    assert zeroed["train"] < 0.20, zeroed
