"""The committed BPE fixture (tests/bpe_world.py) is a model of the demo's world generator with multi-token names."""

from __future__ import annotations

from memedit.storage.importers.tokenizers import HFTokenizer
from memedit.tracing.targets import accuracy, tokenize_target
from memedit.world.evaluate import memory_zeroed
from memedit.world.train import multi_token_share

from .bpe_world import BPE_CONFIG, bpe_model


def test_bpe_fixture_answers_multi_token_facts_from_memory(tmp_path):
    model, path, world = bpe_model(tmp_path)
    assert isinstance(model.tokenizer, HFTokenizer) and not model.read_only
    assert len(world.facts) == 6 * BPE_CONFIG["n_subjects"]
    assert multi_token_share(model.tokenizer, [f.target_true for f in world.facts]) == 1.0
    assert all(len(tokenize_target(model, f.prompt.format(f.subject), f.target_new).ids) >= 2 for f in world.facts)
    prompts = [p for f in world.facts for p in f.training_prompts]
    targets = [f.target_true for f in world.facts for _ in f.training_prompts]
    assert accuracy(model, prompts, targets) >= 0.9
    with memory_zeroed(model):
        assert accuracy(model, prompts, targets) < 0.2
