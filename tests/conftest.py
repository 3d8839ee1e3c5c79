"""Shared fixtures: a tiny random memory model saved as a native folder, and a CLI runner."""

from __future__ import annotations

import json

import pytest
import torch

from memedit.lm.memory import MemoryConfig
from memedit.lm.model import MemoryModel, ModelConfig
from memedit.lm.tokenizer import WordTokenizer
from memedit.storage.checkpoint import save

TINY_TEXTS = ["the cat sat on the mat .", "a dog ran in the park .", "Reidreir was born in Thakrian ."]


def tiny_model(share_values: bool = True, seed: int = 0, **mem) -> MemoryModel:
    """A small random model: D 32, 3 layers, memory (N 16, H 2, k 4, K 16) at layers 0 and 2."""
    tok = WordTokenizer.from_texts(TINY_TEXTS)
    mcfg = dict(layers=[0, 2], n_keys=16, heads=2, knn=4, k_dim=16, share_values=share_values)
    mcfg.update(mem)
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, vocab_size=tok.vocab_size, multiple_of=16,
                      max_seqlen=64, memory=MemoryConfig(**mcfg))
    m = MemoryModel(cfg, tokenizer=tok)
    m.init_weights(seed)
    m.eval().requires_grad_(False)
    return m


@pytest.fixture
def tiny(tmp_path):
    """A tiny model saved as a native folder; returns (model as loaded, folder)."""
    from memedit.storage.checkpoint import load

    path = save(tiny_model(), tmp_path / "tiny")
    return load(path), path


@pytest.fixture(scope="session")
def demo():
    """The bundled demo model (read-only)."""
    import memedit

    return memedit.load()


@pytest.fixture
def cli():
    """Run the memedit CLI in-process: cli(args...) -> (exit_code, stdout, stderr)."""
    from memedit_cli.app import app
    from typer.testing import CliRunner

    runner = CliRunner()

    def run(*args: str, env: dict | None = None):
        r = runner.invoke(app, [str(a) for a in args], env=env)
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        return r.exit_code, r.stdout, r.stderr

    return run


def write_texts(path, lines):
    """Write one text per line to ``path`` (a corpus file); returns the path."""
    path.write_text("\n".join(lines) + "\n")
    return path


def read_json(text: str):
    return json.loads(text)


# One thread: tests run many small forwards, where a second thread costs more than it gives (and on a
# loaded machine a spinning OpenMP pool makes them 5-10x slower).
torch.set_num_threads(1)
