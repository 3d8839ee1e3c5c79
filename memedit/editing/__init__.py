"""Changing value rows: ``patch`` exact, reversible patches (apply, revert, diff) committed through the model store;
``freeze`` rows no edit may change; ``sparse_ft`` teaching or rewriting a fact by training only the rows its lookups
select; ``background`` the corpus statistics that rank rows for an edit. Uses ``memedit.lm``, ``memedit.storage``
and ``memedit.tracing``."""
