"""memedit: look inside, and change, the memory layers of a language model.

Importing memedit is cheap: torch is imported on first use of the functions below.

The library is a set of small packages by capability (README, "Architecture"): ``memedit.lm`` (the model and its
one lookup), ``memedit.storage`` (loading, importers, the model store), ``memedit.tracing``, ``memedit.editing``,
``memedit.keyspace``, ``memedit.auditing`` and ``memedit.world`` (the demo's fact world).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

__version__ = "0.1.0"

__all__ = ["__version__", "load", "trace", "edit", "MemeditError"]

from .errors import MemeditError


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


# Deprecated for one release (0.1 -> 0.2): the flat module paths of memedit <= 0.1 (``memedit.sparse_ft``,
# ``memedit.importers.lingua``, ...) import the module at its new home, under both names, with a
# DeprecationWarning. They are the same module object, so monkeypatching either name patches both.
MOVED = {
    "model": "lm", "memory": "lm", "tokenizer": "lm", "generate": "lm",
    "checkpoint": "storage", "store": "storage", "state": "storage", "importers": "storage", "info": "storage",
    "capture": "tracing", "trace": "tracing", "causal": "tracing", "readout": "tracing", "targets": "tracing",
    "patch": "editing", "freeze": "editing", "sparse_ft": "editing", "background": "editing",
    "keys": "keyspace", "exact": "keyspace",
    "audit": "auditing", "stats": "auditing", "hdf5": "auditing", "plots": "auditing", "slot": "auditing",
    "report": "auditing",
    "facts": "world", "train": "world", "evaluate": "world",
}


def new_name(old: str) -> str | None:
    """The module path that replaced the flat path ``old`` (``memedit.keys`` -> ``memedit.keyspace.keys``), or None."""
    parts = old.split(".")
    if len(parts) < 2 or parts[0] != __name__ or parts[1] not in MOVED:
        return None
    return ".".join([__name__, MOVED[parts[1]], *parts[1:]])


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the deprecated flat paths as the moved modules (``get_code``: ``python -m memedit.audit`` works)."""

    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        is_package = importlib.util.find_spec(new).submodule_search_locations is not None
        spec = importlib.util.spec_from_loader(fullname, self, is_package=is_package)
        spec.loader_state = new
        return spec

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {spec.loader_state}; the old path goes away in memedit 0.2",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(spec.loader_state)
        spec.loader_state = (spec.loader_state, module.__spec__)  # the import system overwrites __spec__: restore it
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state[1]

    def get_code(self, fullname):
        # runpy (python -m) asks for this. The old `python -m memedit.audit` / torchrun entry is the CLI's now.
        if fullname == "memedit.audit":
            source = "from memedit_cli.audit import distributed_main; distributed_main()"
        else:  # running the new module as __main__ keeps its relative imports right
            source = f"import runpy; runpy.run_module({new_name(fullname)!r}, run_name='__main__', alter_sys=True)"
        return compile(source, f"<{fullname}, moved>", "exec")


class _Memedit(types.ModuleType):
    """memedit itself: importing the deprecated module path ``memedit.trace`` leaves ``memedit.trace`` the function."""

    def __setattr__(self, name, value):
        if name == "trace" and isinstance(value, types.ModuleType):
            # the import system binds a submodule to its parent's attribute; refusing keeps the function there
            raise AttributeError("memedit.trace is the function memedit.trace(model, prompt, target)")
        super().__setattr__(name, value)


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
sys.modules[__name__].__class__ = _Memedit
