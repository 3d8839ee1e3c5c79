"""What an edit does by default (:class:`EditConfig`), in a module that imports no torch: the CLI reads its option
defaults from here at start-up (``memedit --help`` stays fast). Why each default is what it is, with the sweeps
behind it: docs/decisions.md ("Edit defaults")."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import limits
from ..errors import MemeditError

FORGETTING_SAMPLE = 1000  # other facts' prompts on which forgetting is measured after an edit (a fixed sample)
BACKGROUND_BATCH = 32  # sentences per background batch (a "document" for document frequency)
BACKGROUND_MAX_BATCHES = 1000  # the reference uses 1000 batches of general text


@dataclass
class EditConfig:
    # which rows: as few as the edit needs (min_t, doubled every round_steps while it does not hold, up to top_t)
    top_t: int = 1024  # at most this many value rows trained per fact (a demo fact reads ~600-800 slots)
    lr: float | None = None  # None: SGD 10 x (median row norm / 11)^2 (default_lr), AdamW 1e-2
    steps: int = 200  # at most this many optimizer steps in all (most edits stop early)
    stop_token_loss: float = math.log(2)  # stop once every new-target token has p > 1/2 (and every kept one too)
    optimizer: str = "sgd"  # "sgd" or "adamw" (forgets more, reference section 6)
    momentum: float = 0.9  # SGD's momentum: 4x fewer steps than plain SGD for the same holding
    ranking: str = "tfidf"  # "tfidf", "kl" or "counts" (no IDF: a baseline)
    positions: str = "all"  # rows read at every prompt position ("all": the subject's rows reach every wording)
    train_all: bool = False  # baseline only: finetune every parameter instead of the selected value rows
    protect: str = "none"  # "edits": rows earlier edits trained; "hot": also the background's most-read rows
    hot_fraction: float = 0.02  # with protect="hot": this fraction of each table's rows, by background df
    contrast: int = 8  # leave alone the rows the prompt reads at the new target about this many other subjects
    adaptive: bool = True  # train min_t rows first, doubled (up to top_t) only while the edit does not hold
    min_t: int = 128  # with adaptive: the rows tried first
    round_steps: int = 10  # with adaptive: steps per round before the rows are doubled (the last round: the rest)
    # an edit's reach on text (memedit/editing/locality.py): the guard and preservation
    max_collateral: float = 0.02  # refuse an edit that changes more than this share of the sample's greedy tokens
    preserve: float = 1.0  # weight of the margin term on the locality sample's training half (0: off)
    preserve_margin: float = 2.0  # the margin term keeps half of each greedy token's logit margin, up to this
    preserve_kl: float = 0.0  # weight of KL(pre-edit || now) on the same positions (0: off; it did not help)
    preserve_sample: int = 8  # locality sequences per step (drawn among those that read a trained row)
    repairs: int = 2  # times an edit that holds is trained on, with the sequences whose greedy tokens it changed
    preserve_always: bool = False  # the preservation term in every step (False: only in repairs, when needed)
    repair_steps: int = 20  # at most this many steps per repair
    preserve_check: int = 0  # sequences (that read a trained row) checked for changed greedy tokens (0: all)
    locality_tokens: int = 5000  # the locality sample's size (tokens), drawn from the background corpus
    # consolidation (memedit/editing/consolidate.py): what sequential edits moved, given back on more text
    consolidate_every: int = 50  # a pass after every this many committed edits of a sequential run (0: never)
    consolidate_tokens: int = 40000  # its sample of the background corpus (tokens)
    consolidate_steps: int = 60  # at most this many SGD steps a pass
    consolidate_batch: int = 32  # sequences (and answers) of each kind a step

    def check(self) -> EditConfig:
        """This config, after refusing values that cannot be meant (a learning rate of -1 or 1e39, no steps)."""
        if self.lr is not None:
            limits.number(self.lr, "--lr", 0.0, limits.MAX_LR, lo_open=True)
        limits.count(self.top_t, "--top-t", 1)
        limits.count(self.steps, "--steps", 1)
        limits.count(self.contrast, "--contrast", 0)
        if self.optimizer not in ("sgd", "adamw"):
            raise MemeditError(f"unknown optimizer {self.optimizer!r}: use sgd or adamw")
        return self

    @property
    def learning_rate(self) -> float:
        """``lr``, or the optimizer's default when it is None (SGD: ``sparse_ft.default_lr``, filled in by
        ``sparse_ft.edit``)."""
        if self.lr is not None:
            return self.lr
        return 10.0 if self.optimizer == "sgd" else 1e-2
