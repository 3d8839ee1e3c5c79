"""Changing value rows: ``patch`` value-row patches made as a user asks (set, add, scale, zero, copy), committed
through the store's one patch format (``memedit.storage.patch``); ``freeze`` rows no edit may change; ``sparse_ft``
teaching or rewriting a fact by training only the rows its lookups select; ``background`` the corpus statistics
that rank rows for an edit. Uses ``memedit.lm``, ``memedit.storage``, ``memedit.tracing``, ``memedit.auditing``
and ``memedit.world``."""
