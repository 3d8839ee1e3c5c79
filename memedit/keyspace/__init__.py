"""The keys of a memory: ``keys`` online sub-key adaptation and routing of requests to slots; ``exact`` the exact
index and the check that the one lookup routine returns what FAISS (the independent reference) returns.
Uses ``memedit.lm`` and ``memedit.storage``."""
