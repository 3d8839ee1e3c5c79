"""Loading and changing model folders: ``files`` atomic writes; ``folder`` what a native folder is (format, config,
the model's native tensors, output paths, frozen rows); ``store`` the only code that changes a model folder (lock,
journal, row-level writes, recovery, log, the one validation of a write); ``patch`` the one row-change format
(value rows and sub-keys alike) and its apply / revert; ``checkpoint`` loads and saves the native format (lazy,
memory-mapped) and resolves paths; ``check`` `memedit check` and salvage; ``importers`` reads other layouts
(lingua, DCP, XLM/PKM standalone) without unpickling arbitrary objects; ``state`` the per-model state files;
``corpus`` the user's text; ``info`` a model's summary. Uses ``memedit.lm``."""
