"""Inspect a fact of the demo world from Python: its answer, its top slots, and its core set.

Run: .venv/bin/python examples/inspect_fact.py [FACT_ID]
"""

import sys

import memedit
from memedit.tracing.trace import trace_fact
from memedit.world.facts import world_of

model = memedit.load()  # the bundled demo model
fact = world_of(model).fact(sys.argv[1] if len(sys.argv) > 1 else "f00000")
prompt = fact.prompt.format(fact.subject)

t = memedit.trace(model, prompt, fact.target_true)
print(f"{prompt!r} -> {fact.target_true!r}: p = {t.prob():.3f}, rank {t.rank()}")
print("top slots by attribution (layer, head, slot: attribution, ablation Δlog-prob, promoted tokens):")
for unit, attribution in t.ranked()[:5]:
    r = t.units(unit.layer).index(unit)
    ablation = float(t.ablation(unit.layer).flatten()[r])
    promoted = [tok for tok, _ in t.writes(unit)["promotes"][:3]]
    print(f"  {unit.layer}, {unit.head}, {unit.slot}: {attribution:+.3f}, {ablation:+.3f}, {promoted}")

ft = trace_fact(model, fact)
print(f"core set (slots selected by all {ft.core_over} training phrasings): {ft.core_size} slots")
for table, slots in ft.core_set.items():
    print(f"  table {table}: {slots}")
for p in ft.phrasings:
    flip = "not answered" if not p["answered"] else p["flip"] or "none flips it"
    kind = "held-out" if p["heldout"] else "training"
    print(f"  {kind} {p['prompt']!r}: p = {p['prob']:.3f}, top-attributed slots to drop to flip the answer: {flip}")
