"""Loading and changing model folders: ``checkpoint`` loads and saves the native format (lazy, memory-mapped) and
resolves paths; ``importers`` reads other layouts (lingua, DCP, XLM/PKM standalone) without unpickling arbitrary
objects; ``store`` is the only code that changes a model folder (lock, journal, row-level writes, recovery, log);
``state`` the per-model state files (frozen rows, background statistics, edit log); ``info`` a model's summary.
Uses ``memedit.lm``."""
