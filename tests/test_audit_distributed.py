"""A distributed audit under torchrun (2 processes, gloo) gives exactly the single-process audit's statistics."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import torch

from .test_audit import CORPUS


def test_torchrun_two_ranks_equal_one_process(cli, tiny, tmp_path):
    _, path = tiny
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 6) + "\n")  # 42 documents, 21 batches of 2: ranks get 11 and 10
    single, dist = tmp_path / "single.h5", tmp_path / "dist.h5"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (torchrun sets OMP_NUM_THREADS=1): float32 matmuls then round alike
    try:
        assert cli("audit", corpus, "--model", path, "--out", single, "--batch-size", "2")[0] == 0
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         "-m", "memedit_cli", "audit", "--distributed", str(corpus), "--model", str(path), "--out", str(dist), "--batch-size", "2",
         "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    with h5py.File(single) as a, h5py.File(dist) as b:
        assert a.attrs["tokens"] == b.attrs["tokens"] > 0
        for name in ("counts", "weights", "subkey_counts", "table_counts", "table_weights"):
            assert np.array_equal(a[name][()], b[name][()]), name
        assert a.attrs["metrics"] == b.attrs["metrics"]


def test_distributed_flag_outside_torchrun_is_a_one_line_error(cli, tiny, tmp_path):
    _, path = tiny
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    env = {k: None for k in ("RANK", "WORLD_SIZE")}  # None: unset
    code, _, err = cli("audit", corpus, "--model", path, "--distributed", env=env)
    assert code == 2 and "torchrun" in err and len(err.strip().splitlines()) == 1
