"""The defaults of `memedit keys adapt` and `memedit keys route`, held once (the CLI's options read them).

No torch here: the CLI builds its options from this class when it starts, and `memedit --help` must stay instant.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeysConfig:
    """Hyperparameters of sub-key adaptation (``adapt``) and of routing a fact to a slot (``route``)."""

    # keys adapt
    steps: int = 20  # update steps, one batch each, cycling through the text
    batch_size: int = 16  # passages per step
    lr: float = 0.3  # SGD step on the sub-keys: moves a sub-key into or out of a stage-1 top-k in a few steps
    measure_tokens: int = 2048  # tokens of text and of probe measured before and after: bounds the measuring cost
    # keys route
    margin: float = 0.25  # how far above the k-th score the slot lands, as a share of its head's score spread
    eval_facts: int = 1000  # other facts of the world whose accuracy measures collateral (0: all)
    # both
    probe_texts: int = 512  # background passages whose lookups measure collateral


KEYS = KeysConfig()
