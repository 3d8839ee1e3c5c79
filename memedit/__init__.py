"""memedit: look inside, and change, the memory layers of a language model.

Importing memedit is cheap: torch is imported on first use of the functions below.

The library is a set of small packages by capability (README, "Architecture"): ``memedit.lm`` (the model and its
one lookup), ``memedit.storage`` (loading, importers, the model store), ``memedit.tracing``, ``memedit.editing``,
``memedit.keyspace``, ``memedit.auditing`` and ``memedit.world`` (the demo's fact world).
"""

from __future__ import annotations

from .version import __version__

__all__ = ["__version__", "load", "trace", "edit", "MemeditError"]

from .errors import MemeditError


# The functions below import their modules when called, so that `import memedit` (which the CLI does before it
# parses a command) stays cheap: torch loads with the first model.
def load(path=None, dtype: str | None = None, **options):
    """Load a model (default: the bundled demo model, or $MEMEDIT_MODEL): a torch.nn.Module returning logits."""
    from .storage.checkpoint import load as _load

    return _load(path, dtype=dtype, **options)


def trace(model, prompt: str, target: str | None = None):
    """A Trace of ``prompt`` (memedit.tracing.trace.Trace): lookups, per-slot attributions, ablations for ``target``."""
    from .tracing.trace import trace as _trace

    return _trace(model, prompt, target)


def edit(model, prompts, target_new, ground_truth=None, subject=None, rephrase_prompts=None, locality_inputs=None,
         sequential_edit: bool = False, **options) -> dict:
    """Rewrite facts, called as EasyEdit's ``editor.edit(prompts=..., target_new=..., ...)``: each committed edit is
    applied to the model's folder as a patch; returns memedit's, CounterFact's and EasyEdit's metrics
    (memedit.editing.api.edit)."""
    from .editing.api import edit as _edit

    return _edit(model, prompts, target_new, ground_truth, subject, rephrase_prompts, locality_inputs,
                 sequential_edit, **options)
