"""The language model and its memory layers: ``memory`` holds the product-key layer and the one lookup routine that
every other part of memedit uses (the forward pass, tracing, auditing, verification); ``model`` the decoder LM that
hosts memory layers and registers their value tables; ``hooks`` the one hook registry (activation names are
module paths, ``run_with_cache``, ``run_with_hooks``); ``batching`` padding; ``tokenizer`` the tokenizer protocol;
``generate`` greedy generation. Depends on nothing else in memedit but ``memedit.errors``."""
