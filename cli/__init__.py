"""The memedit command line (installed as the package ``memedit_cli``; the console script is ``memedit``)."""
