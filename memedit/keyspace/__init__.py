"""The keys of a memory: ``adapt`` online sub-key adaptation, ``route`` writing a fact into a free slot,
``subkeys`` the sub-key state and measurements both share, ``config`` their defaults (``KeysConfig``); ``exact``
the exact index and the check that the one lookup routine returns what FAISS (the independent reference) returns.
Their changes are ``memedit.storage.patch`` patches. Uses ``memedit.lm``, ``memedit.storage``, ``memedit.tracing``
and ``memedit.world``."""
