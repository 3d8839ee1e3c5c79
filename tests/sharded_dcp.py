"""A reference-layout DCP step folder written as two training ranks write it (gloo), the value table in row chunks.

``write_sharded_step(step, params, chunks_per_rank=C)`` starts two processes that join a gloo group and call
``torch.distributed.checkpoint.save``: every tensor but the value table is replicated (DCP saves it once), and the
value table is split into 2·C row chunks, C per rank, each a write item of its own that a planner makes from a seed
and its row range only when DCP asks for it (``resolve_data``). So a table larger than memory can be written: one
chunk exists at a time per rank. ``benchmarks/bench_huge.py`` uses the same writer for its 32 GiB checkpoint.

Run as a script it is one rank: ``python tests/sharded_dcp.py SPEC.json`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set (the parent writes SPEC).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def table_rows(seed: int, start: int, n: int, width: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Rows start..start+n of the value table, made from the seed and the row range (any split gives the same rows:
    each 4,096-row block has a generator of its own)."""
    out = torch.empty(n, width, dtype=dtype)
    at = start
    while at < start + n:
        block = at // 4096
        g = torch.Generator().manual_seed(seed * 1_000_003 + block)
        rows = torch.randn(4096, width, generator=g).mul_(width ** -0.5).to(dtype)
        a = at - block * 4096
        k = min(4096 - a, start + n - at)
        out[at - start: at - start + k] = rows[a: a + k]
        at += k
    return out


def small_state(p: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the reference layout except the value tables (made by :func:`table_rows`)."""
    sys.path.insert(0, str(ROOT))
    from tests.reference_layout import reference_state

    pk = p["model"]["productkey_args"]
    tiny = json.loads(json.dumps(p))
    tiny["model"]["productkey_args"]["mem_n_keys"] = 2  # a 4-row table: dropped below
    s = reference_state(tiny, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    for name in list(s):
        if name.endswith("feed_forward.values.weight"):
            del s[name]
        elif name.endswith("feed_forward.keys"):
            s[name] = torch.randn(2 * pk["mem_heads"] * pk["mem_n_keys"], pk["mem_k_dim"] // 2, generator=g)
    return s


def table_names(p: dict) -> list[str]:
    pk = p["model"]["productkey_args"]
    layers = [int(x) for x in str(pk["layers"]).split(",") if x]
    return [f"layers.{L}.feed_forward.values.weight" for L in layers]  # a shared table is saved under every layer


def _rank_main(spec_path: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    spec = json.loads(Path(spec_path).read_text())
    p, seed, C = spec["params"], spec["seed"], spec["chunks_per_rank"]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    pk = p["model"]["productkey_args"]
    rows, width = pk["mem_n_keys"] ** 2, p["model"]["dim"] if pk["mem_v_dim"] == -1 else pk["mem_v_dim"]
    per_rank = rows // world
    bounds = [rank * per_rank + math.floor(i * per_rank / C) for i in range(C + 1)]
    bounds[-1] = rows if rank == world - 1 else (rank + 1) * per_rank
    tables = ["model." + n for n in table_names(p)]

    class ChunkedTables(DefaultSavePlanner):
        """The default plan plus this rank's row chunks of each value table, made when DCP writes them."""

        def create_local_plan(self):
            plan = super().create_local_plan()
            extra = [WriteItem(index=MetadataIndex(fqn, [a, 0]), type=WriteItemType.SHARD,
                               tensor_data=TensorWriteData(
                                   chunk=ChunkStorageMetadata(offsets=torch.Size([a, 0]),
                                                              sizes=torch.Size([b - a, width])),
                                   properties=TensorProperties(dtype=torch.bfloat16), size=torch.Size([rows, width])))
                     for fqn in tables for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
            self.plan = dataclasses.replace(plan, items=plan.items + extra)
            return self.plan

        def resolve_data(self, item):
            if item.index.fqn in tables:
                a = int(item.index.offset[0])
                return table_rows(seed, a, int(item.tensor_data.chunk.sizes[0]), width)
            return super().resolve_data(item)

    state = {"model": small_state(p, seed)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(spec["step"], thread_count=1),
                 planner=ChunkedTables())
    dist.destroy_process_group()


def write_sharded_step(step: Path, p: dict, seed: int = 0, chunks_per_rank: int = 4, timeout: float = 600) -> Path:
    """Write ``step`` (params.json, .metadata, __0_0.distcp, __1_0.distcp) with two gloo ranks; returns ``step``."""
    step = Path(step)
    step.mkdir(parents=True, exist_ok=True)
    spec = step.parent / f".{step.name}.spec.json"
    spec.write_text(json.dumps({"params": p, "seed": seed, "chunks_per_rank": chunks_per_rank, "step": str(step)}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, __file__, str(spec)], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outs = [pr.communicate(timeout=timeout)[0].decode(errors="replace") for pr in procs]
    spec.unlink(missing_ok=True)
    if any(pr.returncode for pr in procs):
        raise RuntimeError("a rank failed:\n" + "\n".join(o[-2000:] for o in outs))
    (step / "params.json").write_text(json.dumps(p, indent=2))
    return step


if __name__ == "__main__":
    _rank_main(sys.argv[1])


def _fixture_params() -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.reference_layout import params

    return params(mem_n_keys=64)  # 4,096 slots x 64 bf16 (512 KiB), shared by layers 1 and 3


_SESSION: dict[str, Path] = {}


def session_step(tmp_path_factory) -> Path:
    """A step folder written by two gloo ranks, each table copy in 5 row chunks per rank (409-410 rows: chunk
    edges fall inside blocks of 64 rows), written once per test session; tests copy it before changing it."""
    if "step" not in _SESSION:
        _SESSION["step"] = write_sharded_step(tmp_path_factory.mktemp("sharded") / "step", _fixture_params(), seed=3,
                                              chunks_per_rank=5)
    return _SESSION["step"]
