"""memedit: look inside, and change, the memory layers of a language model.

Importing memedit is cheap: torch is imported on first use of the functions below.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "trace", "MemeditError"]

from .errors import MemeditError


def load(path=None, dtype: str | None = None, **options):
    """Load a model (default: the bundled demo model, or $MEMEDIT_MODEL): a torch.nn.Module returning logits."""
    from .checkpoint import load as _load

    return _load(path, dtype=dtype, **options)


def trace(model, prompt: str, target: str | None = None):
    """A Trace of ``prompt`` (memedit.trace.Trace): lookups, per-slot attributions and ablations for ``target``."""
    from .trace import trace as _trace

    return _trace(model, prompt, target)
