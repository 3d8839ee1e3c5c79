"""The demo's synthetic fact world: ``facts`` the world of subjects and their facts (with paraphrases); ``train``
trains the demo model on it; ``evaluate`` scores a model on the facts. Uses ``memedit.lm``."""
