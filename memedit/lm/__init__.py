"""The language model and its memory layers: ``memory`` holds the product-key layer and the one lookup routine that
every other part of memedit uses (the forward pass, tracing, auditing, verification); ``model`` the decoder LM that
hosts memory layers and registers their value tables; ``tokenizer`` the tokenizer protocol; ``generate`` greedy
generation. Depends on nothing else in memedit but ``memedit.errors``."""
