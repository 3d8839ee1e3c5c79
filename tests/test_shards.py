"""Tensors mapped straight from DCP shards written by two gloo ranks: the same tensors DCP's own loader reads, a
model that computes the same logits, row writes that never reach the files, and one-line refusals."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import warnings

import pytest
import torch

import memedit
from memedit.errors import MemeditError
from memedit.storage import shards
from memedit.storage.importers.dcp import DcpState
from memedit.storage.importers.lingua import load_lingua
from memedit.storage.importers.safe import read_dcp_metadata
from memedit.storage.store import block_hash_sum

from .sharded_dcp import session_step, table_rows

TABLE = "layers.1.feed_forward.values.weight"


@pytest.fixture
def sharded_step(tmp_path_factory):
    """The two-rank step folder (tests/sharded_dcp.py), written once per session."""
    return session_step(tmp_path_factory)


@pytest.fixture(autouse=True)
def no_whole_table(monkeypatch):
    """Any operation that would copy the whole table fails here, as it must on a table larger than memory."""
    from memedit.storage import shards

    monkeypatch.setattr(shards, "MATERIALIZE_BYTES", 0)


def shard_hashes(step):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(step.iterdir()) if p.is_file()}


def test_every_mapped_tensor_equals_what_dcp_loads(sharded_step):
    mapped, read = DcpState(sharded_step), DcpState(sharded_step, mapped=False)
    assert set(mapped) == set(read)
    for name in mapped:
        a, b = mapped[name], read[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if shards.is_sharded(a):
            assert torch.equal(a.gather(torch.arange(a.shape[0])), b), name
        else:
            assert torch.equal(a, b), name
    t, ref = mapped[TABLE], read[TABLE]
    assert shards.is_sharded(t) and len(t.chunks) == 10 and t.dtype == torch.bfloat16  # bf16 stays bf16
    assert torch.equal(ref, table_rows(3, 0, 4096, 64))  # and DCP read back what the ranks made
    ids = torch.tensor([[0, 408, 409, 410], [2047, 2048, 4095, -1]])  # rows on both sides of chunk and rank edges
    assert torch.equal(t[ids], ref[ids]) and t[ids].shape == (2, 4, 64)
    assert torch.equal(t[400:900], ref[400:900]) and torch.equal(t[-3:], ref[-3:]) and torch.equal(t[409], ref[409])
    assert torch.equal(torch.nn.functional.embedding(ids.abs(), t), ref[ids.abs()])
    assert torch.equal(t.index_select(0, ids.abs().reshape(-1)), ref[ids.abs().reshape(-1)])
    with pytest.raises(IndexError):
        t[torch.tensor([4096])]


def test_a_model_read_from_the_shards_computes_what_the_dcp_read_one_computes(sharded_step):
    model = memedit.load(sharded_step)
    assert shards.is_sharded(model.table("shared").weight)
    ref = load_lingua(sharded_step, sharded_step / "params.json", DcpState(sharded_step, mapped=False),
                      str(sharded_step), None)
    ref.eval().requires_grad_(False)
    ids = torch.tensor([model.encode("The capital of France is")])
    assert torch.equal(model(ids), ref(ids))
    grads = model.table("shared").weight
    assert not grads.requires_grad


def test_row_writes_stay_in_memory_and_keep_the_fingerprint(sharded_step):
    before = shard_hashes(sharded_step)
    t = DcpState(sharded_step)[TABLE]
    plain = DcpState(sharded_step, mapped=False)[TABLE]
    assert t.fingerprint_sum("x") == block_hash_sum("x", plain)
    ids = torch.tensor([5, 409, 4095])
    new = torch.full((3, 64), 0.5, dtype=torch.bfloat16)
    version = t._version
    with torch.no_grad():
        t.detach()[ids] = new
        plain[ids] = new
    assert t._version > version and torch.equal(t[ids], new)
    assert sorted(t.fp["dirty"]) == [0, 6, 63]
    assert t.fingerprint_sum("x") == block_hash_sum("x", plain) and not t.fp["dirty"]
    assert shard_hashes(sharded_step) == before  # copy-on-write: the files never see a write


def test_ranges_read_from_the_files_show_the_rows_written_in_memory(sharded_step, monkeypatch):
    monkeypatch.setattr(shards, "READ_BYTES", 0)  # every range of rows read with pread, as on a big table
    t = DcpState(sharded_step)[TABLE]
    plain = DcpState(sharded_step, mapped=False)[TABLE]
    assert torch.equal(t[0:4096], plain) and torch.equal(t[400:420], plain[400:420])
    ids = torch.tensor([3, 410, 2100])
    with torch.no_grad():
        t[ids] = torch.ones(3, 64, dtype=torch.bfloat16)
        plain[ids] = torch.ones(3, 64, dtype=torch.bfloat16)
    assert torch.equal(t[0:4096], plain) and torch.equal(t[405:415], plain[405:415])
    assert t.fingerprint_sum("x") == block_hash_sum("x", plain)
    assert (shards.block_digests("x", t) == shards.block_digests("x", plain)).all()


def test_whole_table_operations_are_done_on_a_copy_or_refused(sharded_step, monkeypatch):
    t = DcpState(sharded_step)[TABLE]
    full = t.gather(torch.arange(4096))
    monkeypatch.setattr(shards, "MATERIALIZE_BYTES", 256 << 20)
    assert torch.equal(t.float(), full.float())  # small: materialised
    with pytest.raises(MemeditError, match="not supported"):
        t.mul_(2)  # a change in place on a copy would be lost: refused
    monkeypatch.setattr(shards, "MATERIALIZE_BYTES", 1024)
    with pytest.raises(MemeditError, match="would read the whole"):
        t.float()


def _rewrite_metadata(step, change):
    md = read_dcp_metadata(step)
    change(md)
    with open(step / ".metadata", "wb") as f:
        pickle.dump(md, f)


def test_items_saved_with_transforms_are_refused_in_one_line(sharded_step, tmp_path, cli):
    step = shutil.copytree(sharded_step, tmp_path / "step")

    def zstd(md):
        for idx, info in md.storage_data.items():
            if idx.fqn == "model." + TABLE:
                info.transform_descriptors = ["zstd"]
                break

    _rewrite_metadata(step, zstd)
    code, out, err = cli("generate", "hi", "-n", "1", "--model", step)
    assert code == 2 and "saved with transforms (zstd)" in err and len(err.strip().splitlines()) == 1


def test_items_in_another_serialization_format_are_refused_in_one_line(sharded_step, tmp_path, cli):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    step = tmp_path / "st"
    state = {k: (v.gather(torch.arange(v.shape[0])) if shards.is_sharded(v) else v.clone())
             for k, v in DcpState(sharded_step).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(
            step, serialization_format=SerializationFormat.SAFETENSORS), no_dist=True)
    shutil.copy(sharded_step / "params.json", step)
    code, out, err = cli("generate", "hi", "-n", "1", "--model", step)
    assert code == 2 and "another serialization format" in err and len(err.strip().splitlines()) == 1


def test_a_damaged_archive_is_one_line(sharded_step, tmp_path, cli):
    step = shutil.copytree(sharded_step, tmp_path / "step")
    md = read_dcp_metadata(step)
    info = next(i for k, i in md.storage_data.items() if k.fqn == "model." + TABLE)
    path = step / info.relative_path
    data = bytearray(path.read_bytes())
    end = info.offset + info.length
    data[end - 22: end] = b"\0" * 22  # the archive's end-of-directory record
    path.write_bytes(bytes(data))
    code, out, err = cli("generate", "hi", "-n", "1", "--model", step)
    assert code == 2 and "cannot read the DCP shards" in err and len(err.strip().splitlines()) == 1
