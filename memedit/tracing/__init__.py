"""Looking at one prompt: ``capture`` hooks the one lookup routine; ``trace`` builds a Trace (lookups, per-slot
attributions and ablations for a target); ``causal`` the causal-tracing grid; ``readout`` the one definition of what a
value row writes; ``targets`` how a target is tokenized and scored (teacher forcing, CounterFact convention).
Uses ``memedit.lm``."""
