"""The bundled demo model answers its facts in their training wordings and in wordings it saw only with other
subjects, the facts live in memory, its tokens are subwords, and its value rows are stored in bfloat16."""

from __future__ import annotations

import random

import torch

from memedit.storage.checkpoint import BUNDLED
from memedit.storage.importers.tokenizers import HFTokenizer
from memedit.tracing.targets import accuracy
from memedit.world.evaluate import memory_zeroed
from memedit.world.facts import world_of
from memedit.world.train import multi_token_share

N_FACTS = 1000  # a fixed sample: 2,000 prompts per measure (2 training, 2 held-out wordings per fact)


def _sample(demo):
    facts = random.Random(0).sample(world_of(demo).facts, N_FACTS)
    train = [(p, f.target_true) for f in facts for p in f.training_prompts[:2]]
    held = [(p, f.target_true) for f in facts for p in f.heldout_paraphrases[:2]]
    return train, held


def test_bundled_model_shape(demo):
    mem = demo.config.memory
    assert mem.n_slots >= 65_536 and mem.heads >= 4 and mem.knn >= 16
    assert demo.read_only
    (table,) = demo.tables
    assert table.weight.dtype == torch.bfloat16  # as the reference stores value rows
    assert {p.dtype for n, p in demo.named_parameters() if "values" not in n} == {torch.float32}
    size = sum(f.stat().st_size for f in BUNDLED.iterdir() if f.is_file())
    assert size <= 25 * 2**20, size


def test_bundled_tokenizer_is_subword_bpe(demo):
    tok = demo.tokenizer
    assert isinstance(tok, HFTokenizer) and tok.vocab_size <= 4096
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3 and None not in (tok.pad_id, tok.bos_id, tok.eos_id)
    assert tok.decode(tok.encode("Zzqqxx plays the")).strip() == "Zzqqxx plays the"  # byte-level: nothing unknown
    world = world_of(demo)
    assert multi_token_share(tok, [o for r in world.relations for o in r.objects]) >= 0.80
    assert multi_token_share(tok, world.subjects) >= 0.90


def test_bundled_model_answers_its_facts_from_memory(demo):
    train, held = _sample(demo)
    assert len(train) >= 2000 and len(held) >= 2000
    acc = accuracy(demo, *zip(*train, strict=True))
    assert acc >= 0.97, acc
    held_acc = accuracy(demo, *zip(*held, strict=True))  # wordings seen only with other subjects
    # The floor; the bundled model answers 95.5% of all 3,600 held-out prompts (README).
    assert held_acc >= 0.80, held_acc
    with memory_zeroed(demo):
        zeroed = accuracy(demo, *zip(*train, strict=True))
    assert zeroed < 0.20, zeroed
