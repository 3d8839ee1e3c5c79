"""Bring your own checkpoint: the reference's consolidated and DCP folders, XLM and product-key-memory modules.

Every imported model is checked against an independent float64 computation from the RAW state dict
(tests/reference_layout.py), and product-key-memory against the real ``PKM`` module's forward.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import memedit
from memedit.errors import MemeditError
from memedit.tracing.capture import capture_lookups

from .reference_layout import (
    brute_force_memory,
    params,
    real_pkm,
    reference_forward,
    reference_state,
    write_consolidated,
    write_dcp_step,
)

PROMPT = "Reidreir was born in Thakrian"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One reference run written both ways: (state, params, consolidated step folder, DCP step folder)."""
    root = tmp_path_factory.mktemp("ref")
    p = params()
    state = reference_state(p)
    write_consolidated(root / "step_consolidated", state, p)
    write_dcp_step(root / "step_dcp", state, p)
    return state, p, root / "step_consolidated", root / "step_dcp"


def run_with_inputs(model, ids):
    """Logits (T, vocab) plus, per memory layer, its input x (T, D) and its Lookup, captured by hooks."""
    inputs = {}
    hooks = [layer.register_forward_pre_hook(
        lambda mod, args, L=L: inputs.__setitem__(L, args[0].reshape(-1, args[0].shape[-1])))
             for L, layer in model.memory_layers.items()]
    try:
        with capture_lookups(model) as rec:
            logits = model(torch.tensor([ids]))[0]
    finally:
        for h in hooks:
            h.remove()
    return logits, {L: (inputs[L], rec[L][0]) for L in model.memory_layers}


def sorted_slots(t: torch.Tensor) -> torch.Tensor:
    return t.sort(dim=-1).values


# ---- the reference layout -----------------------------------------------------------------------
@pytest.mark.parametrize("which", ["consolidated", "dcp"])
def test_reference_checkpoint_float32_equals_independent_computation(ref, which):
    state, p, cons, dcp = ref
    model = memedit.load(cons if which == "consolidated" else dcp, dtype="float32")
    assert [(t.name, t.layers) for t in model.tables] == [("shared", [1, 3])]
    assert model.memory_layers[1].values is model.memory_layers[3].values  # ONE nn.Embedding
    ids = model.encode(PROMPT)
    assert ids[0] == 256 and ids[1:] == list(PROMPT.encode())  # lingua's bytes tokenizer from params.json
    logits, seen = run_with_inputs(model, ids)
    state = {k: v.float() for k, v in state.items()}  # --dtype float32 upcasts the table: nothing rounds to bf16
    want, ref_lookups = reference_forward(state, p, ids)
    assert (logits.double() - want).abs().max() < 1e-5
    pk = p["model"]["productkey_args"]
    for L, (x, lk) in seen.items():
        slots, _, out = brute_force_memory(state, f"layers.{L}.feed_forward.", pk, x)
        assert torch.equal(sorted_slots(lk.indices), sorted_slots(slots))  # same slots, every token and head
        assert torch.equal(sorted_slots(lk.indices), sorted_slots(ref_lookups[L][1]))  # and end to end
        assert (model.memory_layers[L](x).double() - out).abs().max() < 1e-5


def test_values_stay_bfloat16_and_outputs_match_within_bf16_tolerance(ref):
    state, p, cons, _ = ref
    model = memedit.load(cons)  # as stored: bfloat16 values, float32 everything else
    assert model.table("shared").weight.dtype == torch.bfloat16
    assert model.layers[0].attention.wq.weight.dtype == torch.float32
    assert torch.equal(model.table("shared").weight, state["layers.1.feed_forward.values.weight"])
    ids = model.encode(PROMPT)
    logits, seen = run_with_inputs(model, ids)
    want, _ = reference_forward(state, p, ids)  # rounds the value mix to bf16 where the reference kernel does
    assert (logits.double() - want).abs().max() < 5e-4  # summation order alone moves logits ~1e-5 here
    for L, (x, lk) in seen.items():
        slots, _, _ = brute_force_memory(state, f"layers.{L}.feed_forward.", p["model"]["productkey_args"], x)
        assert torch.equal(sorted_slots(lk.indices), sorted_slots(slots))  # lookups in float32: same slots


def test_bfloat16_compute_picks_the_same_slots_outside_ties(ref):
    state, p, cons, _ = ref
    model = memedit.load(cons, dtype="bfloat16")
    ids = model.encode(PROMPT)
    logits, seen = run_with_inputs(model, ids)
    want, _ = reference_forward(state, p, ids)
    assert (logits.double() - want).abs().max() < 0.05 * want.abs().max()
    pk = p["model"]["productkey_args"]
    for L, (x, lk) in seen.items():
        slots, scores, out = brute_force_memory(state, f"layers.{L}.feed_forward.", pk, x)
        # every slot memedit picked scores (independently, float64) within bf16 rounding of the true k-th best
        q_state = {k: v for k, v in state.items() if k.startswith(f"layers.{L}.feed_forward.")}
        H, N, K = pk["mem_heads"], pk["mem_n_keys"], pk["mem_k_dim"]
        W = q_state[f"layers.{L}.feed_forward.query_proj.query_mlps.0.weight"].double()
        b = q_state[f"layers.{L}.feed_forward.query_proj.query_mlps.0.bias"].double()
        q = (x.double() @ W.T + b).view(-1, H, 2, K // 2)
        C = q_state[f"layers.{L}.feed_forward.keys"].double().view(H, 2, N, K // 2)
        i, j = lk.indices // N, lk.indices % N  # (n, H, k)
        s1 = torch.einsum("nhd,hid->nhi", q[:, :, 0], C[:, 0]).gather(-1, i)
        s2 = torch.einsum("nhd,hjd->nhj", q[:, :, 1], C[:, 1]).gather(-1, j)
        kth = scores[..., -1:]  # (n, H, 1)
        tol = 0.02 * scores.abs().amax(-1, keepdim=True)
        assert bool(((s1 + s2) >= kth - tol).all())
        # where every head picked the same slots, the output agrees within bf16 rounding
        same = (sorted_slots(lk.indices) == sorted_slots(slots)).all(-1).all(-1)  # (n,) tokens without ties
        assert same.float().mean() > 0.5
        diff = (model.memory_layers[L](x).double() - out).abs().amax(-1)[same]
        assert diff.max() < 0.04 * out.abs().max()  # measured 1.9e-2 over 4 prompts (benchmarks/import_fidelity.py)


def test_dcp_step_folder_loads_the_same_tensors_as_the_consolidated_file(ref):
    _, _, cons, dcp = ref
    a, b = memedit.load(cons).state_dict(), memedit.load(dcp).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_unshared_values_are_one_table_per_layer(tmp_path):
    p = params(mem_share_values=False, mem_gated=True)
    state = reference_state(p, seed=1)
    write_consolidated(tmp_path / "s", state, p)
    model = memedit.load(tmp_path / "s", dtype="float32")
    assert [(t.name, t.layers) for t in model.tables] == [("layer1", [1]), ("layer3", [3])]
    ids = model.encode(PROMPT)
    logits, _ = run_with_inputs(model, ids)
    state = {k: v.float() for k, v in state.items()}  # as computed: float32 (no bf16 rounding of the value mix)
    assert (logits.double() - reference_forward(state, p, ids)[0]).abs().max() < 1e-5


def test_info_shows_the_structure(ref, cli):
    _, _, cons, dcp = ref
    code, out, _ = cli("info", "--model", dcp, "--json")
    assert code == 0
    d = json.loads(out)
    assert d["memory_layers"] == [1, 3] and d["n_keys"] == 16 and d["heads"] == 4 and d["knn"] == 8
    assert d["k_dim"] == 32 and d["v_dim"] == 64 and d["swilu_projection"] is True
    assert d["tables"] == [{"name": "shared", "layers": [1, 3], "rows": 256, "dim": 64, "dtype": "bfloat16"}]
    assert d["tokenizer"]["type"] == "BytesTokenizer"
    code, out, _ = cli("info", "--model", cons)
    assert code == 0 and "shared" in out and "1, 3" in out


# ---- convert: to native and back to the reference layout ---------------------------------------
def test_convert_to_native_and_back_to_lingua_is_tensor_for_tensor(ref, tmp_path, cli):
    state, p, cons, _ = ref
    assert cli("convert", tmp_path / "native", "--model", cons)[0] == 0
    a, b = memedit.load(cons), memedit.load(tmp_path / "native")
    ids = a.encode(PROMPT)
    la, sa = run_with_inputs(a, ids)
    lb, sb = run_with_inputs(b, ids)
    assert torch.equal(la, lb)  # same logits, bit for bit
    assert all(torch.equal(sa[L][1].indices, sb[L][1].indices) for L in sa)  # same lookups
    assert b.table("shared").weight.dtype == torch.bfloat16 and b.tokenizer.encode("hi") == [104, 105]

    code, out, _ = cli("convert", tmp_path / "back", "--format", "lingua", "--model", tmp_path / "native")
    assert code == 0 and "consolidated.pth" in out
    back = torch.load(tmp_path / "back" / "consolidated.pth", weights_only=True)["model"]
    assert back.keys() == state.keys()
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k
    v1, v3 = back["layers.1.feed_forward.values.weight"], back["layers.3.feed_forward.values.weight"]
    assert v1.untyped_storage().data_ptr() != v3.untyped_storage().data_ptr()  # a real copy per layer
    written = json.loads((tmp_path / "back" / "params.json").read_text())
    assert written["model"]["productkey_args"]["layers"] == "1,3" and written["data"] == p["data"]
    again = memedit.load(tmp_path / "back")
    assert torch.equal(again(torch.tensor([ids])), a(torch.tensor([ids])))


def test_an_edited_model_goes_back_with_the_edit_in_every_copy(ref, tmp_path, cli):
    _, _, cons, _ = ref
    cli("convert", tmp_path / "native", "--model", cons)
    model = memedit.load(tmp_path / "native")
    model.table("shared").weight[7] = 0.5
    from memedit.storage.importers.lingua import save_lingua

    save_lingua(model, tmp_path / "edited")
    back = torch.load(tmp_path / "edited" / "consolidated.pth", weights_only=True)["model"]
    for L in (1, 3):
        assert bool((back[f"layers.{L}.feed_forward.values.weight"][7] == 0.5).all())


# ---- standalone memory modules ------------------------------------------------------------------
def test_product_key_memory_module_matches_the_real_pkm_forward(tmp_path, cli):
    pkm = real_pkm(tmp_path / "pkm.pt")
    model = memedit.load(tmp_path / "pkm.pt", knn=8)
    assert model.config.standalone and [(t.name, t.layers) for t in model.tables] == [("layer0", [0])]

    picked = {}
    pkm.values.register_forward_hook(
        lambda mod, args, kwargs, out: picked.update(ids=args[0], w=kwargs["per_sample_weights"]), with_kwargs=True)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        want = pkm(x)
    layer = model.memory_layers[0]
    got = layer(x)
    lk = layer.lookup(x.reshape(-1, 64))
    assert (got - want).abs().max() < 1e-5
    assert torch.equal(sorted_slots(lk.indices.reshape(21, -1)), sorted_slots(picked["ids"]))
    assert (lk.weights.reshape(21, -1).sort(-1).values - picked["w"].sort(-1).values).abs().max() < 1e-6

    code, out, _ = cli("info", "--model", tmp_path / "pkm.pt", "--json")
    d = json.loads(out)
    assert code == 0 and d["memory_layers"] == [0] and d["heads"] == 4 and d["n_keys"] == 16 and d["k_dim"] == 32
    assert d["tokenizer"] is None
    with pytest.raises(MemeditError, match="standalone memory module"):
        model.encode("hello")
    with pytest.raises(MemeditError, match="no host language model"):
        model(torch.tensor([[1, 2]]))


def xlm_state(seed: int = 0, batchnorm: bool = True) -> dict[str, torch.Tensor]:
    """An XLM HashingMemory state dict: keys (H, 2, N, K/2), query Linear (+ BatchNorm1d), values (N², D)."""
    g = torch.Generator().manual_seed(seed)
    H, N, half, D = 4, 16, 16, 64
    s = {"keys": torch.randn(H, 2, N, half, generator=g) / half**0.5,
         "values.weight": torch.randn(N * N, D, generator=g) / D**0.5,
         "query_proj.query_mlps.0.weight": torch.randn(H * 2 * half, D, generator=g) / D**0.5,
         "query_proj.query_mlps.0.bias": torch.randn(H * 2 * half, generator=g) * 0.1}
    if batchnorm:
        s.update({"query_proj.query_mlps.1.weight": 1 + 0.1 * torch.randn(H * 2 * half, generator=g),
                  "query_proj.query_mlps.1.bias": 0.1 * torch.randn(H * 2 * half, generator=g),
                  "query_proj.query_mlps.1.running_mean": 0.1 * torch.randn(H * 2 * half, generator=g),
                  "query_proj.query_mlps.1.running_var": 0.5 + torch.rand(H * 2 * half, generator=g),
                  "query_proj.query_mlps.1.num_batches_tracked": torch.tensor(100)})
    return s


def test_xlm_memory_matches_a_brute_force_from_the_raw_state(tmp_path, cli):
    s = xlm_state()
    torch.save({f"memories.0.{k}": v for k, v in s.items()}, tmp_path / "xlm.pth")
    model = memedit.load(tmp_path / "xlm.pth", knn=8)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(3))
    # independent: Linear, eval BatchNorm, [q1, q2] per head, all N² slots, softmax, sum of value rows
    q = x.double() @ s["query_proj.query_mlps.0.weight"].double().T + s["query_proj.query_mlps.0.bias"].double()
    q = (q - s["query_proj.query_mlps.1.running_mean"]) / torch.sqrt(s["query_proj.query_mlps.1.running_var"] + 1e-5)
    q = (q * s["query_proj.query_mlps.1.weight"] + s["query_proj.query_mlps.1.bias"]).view(20, 4, 32)
    H, k = 4, 8
    C = s["keys"].double()
    slots, out = [], 0
    for h in range(H):
        full = ((q[:, h, :16] @ C[h, 0].T)[:, :, None] + (q[:, h, 16:] @ C[h, 1].T)[:, None, :]).reshape(20, -1)
        sc, ids = full.topk(k)
        out = out + (torch.softmax(sc, -1)[:, :, None] * s["values.weight"].double()[ids]).sum(1)
        slots.append(ids)
    lk = model.memory_layers[0].lookup(x)
    assert torch.equal(sorted_slots(lk.indices), sorted_slots(torch.stack(slots, 1)))
    assert (model.memory_layers[0](x).double() - out).abs().max() < 1e-5
    code, out_text, _ = cli("info", "--model", tmp_path / "xlm.pth")
    assert code == 0 and "layer0" in out_text


def test_standalone_module_converts_to_native_and_keeps_its_knn(tmp_path, cli):
    torch.save(xlm_state(batchnorm=False), tmp_path / "xlm.pth")
    assert cli("convert", tmp_path / "native", "--model", tmp_path / "xlm.pth", "--knn", "4")[0] == 0
    a, b = memedit.load(tmp_path / "xlm.pth", knn=4), memedit.load(tmp_path / "native")
    assert b.config.memory.knn == 4 and b.config.standalone
    x = torch.randn(5, 64)
    assert torch.equal(a.memory_layers[0](x), b.memory_layers[0](x))
    code, _, err = cli("convert", tmp_path / "ref", "--format", "lingua", "--model", tmp_path / "native")
    assert code == 2 and "standalone" in err and len(err.strip().splitlines()) == 1


# ---- bad input: one line, exit code 2 ------------------------------------------------------------
def one_line_error(cli, *args) -> str:
    code, _, err = cli(*args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_malicious_pickle_is_refused_and_its_code_never_runs(tmp_path, cli):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling this would create the marker file

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(params()))
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(2)}, "optim": Payload()}, folder / "consolidated.pth")
    marker.unlink(missing_ok=True)  # torch.save itself does not call __reduce__'s result, but be sure
    err = one_line_error(cli, "info", "--model", folder)
    assert "refusing" in err and not marker.exists()
    torch.save(Payload(), tmp_path / "evil.pt")
    err = one_line_error(cli, "info", "--model", tmp_path / "evil.pt")
    assert "refusing" in err and not marker.exists()


def test_malicious_dcp_metadata_is_refused(ref, tmp_path, cli):
    import pickle
    import shutil

    _, _, _, dcp = ref
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    shutil.copytree(dcp, tmp_path / "step")
    (tmp_path / "step" / ".metadata").write_bytes(pickle.dumps(Payload()))
    err = one_line_error(cli, "info", "--model", tmp_path / "step")
    assert "refusing" in err and not marker.exists()


def test_bad_checkpoints_give_one_line_errors(ref, tmp_path, cli):
    state, p, cons, dcp = ref
    import shutil

    # truncated consolidated.pth
    shutil.copytree(cons, tmp_path / "trunc")
    f = tmp_path / "trunc" / "consolidated" / "consolidated.pth"
    f.write_bytes(f.read_bytes()[:5000])
    assert "corrupt or truncated" in one_line_error(cli, "info", "--model", tmp_path / "trunc")
    # truncated DCP shard
    shutil.copytree(dcp, tmp_path / "trunc_dcp")
    shard = next((tmp_path / "trunc_dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:3000])
    # info reads headers only, so damaged tensor data is found by a command that reads the weights
    assert "cannot read the DCP shards" in one_line_error(cli, "convert", tmp_path / "out1", "--model",
                                                          tmp_path / "trunc_dcp")
    assert not (tmp_path / "out1").exists()
    # missing params.json
    shutil.copytree(cons, tmp_path / "noparams")
    (tmp_path / "noparams" / "consolidated" / "params.json").unlink()
    assert "no params.json" in one_line_error(cli, "info", "--model", tmp_path / "noparams")
    shutil.copytree(dcp, tmp_path / "noparams_dcp")
    (tmp_path / "noparams_dcp" / "params.json").unlink()
    assert "no params.json" in one_line_error(cli, "info", "--model", tmp_path / "noparams_dcp")
    # wrong shapes
    bad = dict(state)
    bad["layers.1.feed_forward.keys"] = torch.zeros(5, 16)
    write_consolidated(tmp_path / "shape", bad, p)
    assert "layers.1.feed_forward.keys has shape (5, 16)" in one_line_error(cli, "info", "--model", tmp_path / "shape")
    # inconsistent shared copies
    bad = dict(state)
    bad["layers.3.feed_forward.values.weight"] = state["layers.3.feed_forward.values.weight"].clone()
    bad["layers.3.feed_forward.values.weight"][0, 0] += 1
    write_consolidated(tmp_path / "differ", bad, p)
    assert "differs between" in one_line_error(cli, "convert", tmp_path / "out2", "--model", tmp_path / "differ")
    assert not (tmp_path / "out2").exists()
    # unknown / missing params.json fields
    for mutate, expect in [(lambda q: q["model"].update(rope_scaling=2), "unknown field model.rope_scaling"),
                           (lambda q: q["model"].pop("dim"), "missing field model.dim"),
                           (lambda q: q["model"]["productkey_args"].update(mem_lsh=1),
                            "unknown field model.productkey_args.mem_lsh")]:
        q = params()
        mutate(q)
        d = tmp_path / f"params_{len(expect)}"
        write_consolidated(d, state, q)
        assert expect in one_line_error(cli, "info", "--model", d)
    # unknown layouts
    (tmp_path / "empty").mkdir()
    assert "not a model folder" in one_line_error(cli, "info", "--model", tmp_path / "empty")
    torch.save({"foo": torch.zeros(3)}, tmp_path / "foo.pt")
    assert "unknown layout" in one_line_error(cli, "info", "--model", tmp_path / "foo.pt")
    (tmp_path / "notes.txt").write_text("hi")
    assert "unknown checkpoint layout" in one_line_error(cli, "info", "--model", tmp_path / "notes.txt")


# ---- tokenizers ----------------------------------------------------------------------------------
TEXTS = ["the cat sat on the mat", "Reidreir was born in Thakrian", "a dog ran in the park"] * 20


def make_tokenizer_files(d) -> dict[str, object]:
    """A real SentencePiece model, tiktoken BPE file and HuggingFace tokenizer.json, trained here on tiny text."""
    import base64
    import io

    import sentencepiece as spm
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=buf, vocab_size=40, model_type="bpe",
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (d / "sp.model").write_bytes(buf.getvalue())
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the", b" c"]
    (d / "bpe.tiktoken").write_text("".join(f"{base64.b64encode(r).decode()} {i}\n" for i, r in enumerate(ranks)))
    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    hf.save(str(d / "tokenizer.json"))
    return {"sp": (d / "sp.model", spm.SentencePieceProcessor(model_proto=buf.getvalue())),
            "tiktoken": (d / "bpe.tiktoken", None), "hf": (d / "tokenizer.json", hf)}


def test_tokenizers_sentencepiece_tiktoken_and_huggingface(tmp_path, cli):
    pytest.importorskip("sentencepiece")
    pytest.importorskip("tiktoken")
    pytest.importorskip("tokenizers")
    files = make_tokenizer_files(tmp_path)
    q = params()
    q["model"]["vocab_size"] = 600  # room for the tiktoken vocabulary (259 ranks + 256 specials)
    write_consolidated(tmp_path / "m", reference_state(q), q)
    sp_path, sp = files["sp"]
    want = {"sp": [sp.bos_id()] + sp.encode("the cat"), "tiktoken": [259, 257, 258, 97, 116],
            "hf": [files["hf"][1].token_to_id("<s>")] + files["hf"][1].encode("the cat").ids}
    for kind, (path, _) in files.items():
        model = memedit.load(tmp_path / "m", tokenizer=str(path))
        assert model.encode("the cat") == want[kind], kind
        assert cli("convert", tmp_path / f"native_{kind}", "--model", tmp_path / "m", "--tokenizer", path)[0] == 0
        assert memedit.load(tmp_path / f"native_{kind}").encode("the cat") == want[kind], kind  # saved in the folder
    # named in params.json (data.tokenizer) by a cluster path: found beside the checkpoint by its file name
    q["data"]["tokenizer"] = {"name": "sp", "path": "/datasets/tokenizers/sp.model"}
    write_consolidated(tmp_path / "named", reference_state(q), q)
    (tmp_path / "named" / "sp.model").write_bytes(sp_path.read_bytes())
    assert memedit.load(tmp_path / "named").encode("the cat") == want["sp"]
    # a tokenizer bigger than the model's vocabulary (258 ids) is refused
    write_consolidated(tmp_path / "small", reference_state(params()), params())
    err = one_line_error(cli, "info", "--model", tmp_path / "small", "--tokenizer", files["tiktoken"][0])
    assert "515 tokens but the model only 258" in err


def test_missing_tokenizer_extras_name_the_extra(ref, tmp_path, cli, monkeypatch):
    _, _, cons, _ = ref
    (tmp_path / "tok.model").write_bytes(b"\x0a\x05hello")
    hf = {"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(hf))
    for module, path in [("sentencepiece", "tok.model"), ("tokenizers", "tokenizer.json")]:
        monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
        err = one_line_error(cli, "info", "--model", cons, "--tokenizer", tmp_path / path)
        assert f"memedit[{module}]" in err


def test_tokenizer_option_overrides_the_one_in_params(ref, tmp_path, cli):
    _, p, cons, _ = ref
    from memedit.storage.importers.tokenizers import BytesTokenizer

    BytesTokenizer().save(tmp_path / "bytes.json")
    code, out, _ = cli("generate", "ab", "-n", "2", "--model", cons, "--tokenizer", tmp_path / "bytes.json", "--json")
    assert code == 0 and "completion" in json.loads(out)
    q = params()
    q["data"]["tokenizer"] = {"name": "sp", "path": "/nonexistent/tokenizer.model"}
    write_consolidated(tmp_path / "nosp", reference_state(q), q)
    model = memedit.load(tmp_path / "nosp")
    assert model.tokenizer is None
    with pytest.raises(MemeditError, match="--tokenizer"):
        model.encode("hello")


def test_a_native_model_goes_to_the_reference_layout_and_back(tmp_path, cli):
    from memedit.storage.checkpoint import save

    from .conftest import tiny_model

    save(tiny_model(), tmp_path / "native")
    code, _, _ = cli("convert", tmp_path / "ref", "--format", "lingua", "--model", tmp_path / "native")
    assert code == 0
    written = json.loads((tmp_path / "ref" / "params.json").read_text())
    assert written["model"]["productkey_args"]["layers"] == "0,2" and written["model"]["dim"] == 32
    a, b = memedit.load(tmp_path / "native"), memedit.load(tmp_path / "ref")
    assert [(t.name, t.layers) for t in b.tables] == [("shared", [0, 2])]
    ids = a.encode("the cat sat on the mat .")
    assert b.encode("the cat sat on the mat .") == ids
    assert torch.equal(a(torch.tensor([ids])), b(torch.tensor([ids])))


def test_dense_model_and_a_checkpoint_with_one_copy_of_the_shared_table(tmp_path):
    p = params(is_enabled=False)
    p["model"]["productkey_args"]["layers"] = ""
    q = params()
    dense = {k: v for k, v in reference_state(q).items() if "feed_forward" not in k}
    write_consolidated(tmp_path / "dense", {**dense, **_dense_ffns(p)}, p)
    model = memedit.load(tmp_path / "dense")  # is_enabled false: every block has a dense SwiGLU FFN
    assert model.memory_layers == {} and model.tables == []
    state = reference_state(q)
    del state["layers.3.feed_forward.values.weight"]  # only the first memory layer carries the table
    write_consolidated(tmp_path / "once", state, q)
    model = memedit.load(tmp_path / "once")
    assert [(t.name, t.layers) for t in model.tables] == [("shared", [1, 3])]


def _dense_ffns(p: dict) -> dict:
    from .reference_layout import ffn_hidden

    h, D = ffn_hidden(p["model"]), p["model"]["dim"]
    return {f"layers.{L}.feed_forward.{w}.weight": torch.randn(*s) for L in range(4)
            for w, s in (("w1", (h, D)), ("w2", (D, h)), ("w3", (h, D)))}


def test_a_pkm_inside_a_bigger_state_dict_or_a_safetensors_file(tmp_path):
    from product_key_memory import PKM
    from safetensors.torch import save_file

    pkm = PKM(dim=32, heads=2, num_keys=8, topk=4, dim_head=8).eval()
    save_file({f"blocks.1.pkm.{k}": v.contiguous() for k, v in pkm.state_dict().items()},
              str(tmp_path / "p.safetensors"))
    model = memedit.load(tmp_path / "p.safetensors", knn=4)
    x = torch.randn(6, 32)
    with torch.no_grad():
        assert (model.memory_layers[0](x) - pkm(x[None])[0]).abs().max() < 1e-6


# ---- laziness: tensors are mapped, not copied ----------------------------------------------------------------
def rss_anon() -> int:
    """This process's private resident memory in bytes (RssAnon of /proc/self/status)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status RssAnon on this system")


def test_consolidated_and_dcp_load_without_copying_the_value_table(tmp_path, cli):
    import gc

    from memedit.storage.info import describe

    p = params(mem_n_keys=256)  # 65,536 slots x 64 in bfloat16: 8 MiB per copy, two copies in each file
    state = reference_state(p)
    write_consolidated(tmp_path / "cons", state, p)
    write_dcp_step(tmp_path / "dcp", state, p)
    table = state["layers.1.feed_forward.values.weight"]
    rows = torch.tensor([0, 7, 40_000, 65_535])
    want = table[rows].clone()
    del state
    gc.collect()

    memedit.load(tmp_path / "cons" / "consolidated", header_only=True)  # the first load imports modules: not counted
    before = rss_anon()
    model = memedit.load(tmp_path / "cons" / "consolidated")
    grew = rss_anon() - before
    got = model.table("shared").weight
    assert got.dtype == torch.bfloat16 and torch.equal(got[rows], want)
    assert grew < table.nbytes / 2, f"loading grew private memory by {grew / 2**20:.1f} MiB"
    x = torch.randn(3, 64)
    lk = model.memory_layers[1].lookup(x)
    expect = (lk.weights[..., None] * table[lk.indices].float()).sum((1, 2))  # (3, V) the rows it selected
    assert torch.allclose(model.memory_layers[1].read(lk, torch.float32), expect, atol=1e-2)

    # DCP: read a tensor at a time, the second copy of the shared table compared and dropped
    dcp_model = memedit.load(tmp_path / "dcp")
    assert torch.equal(dcp_model.table("shared").weight[rows], want)

    # info: headers only (meta tensors), the stored dtypes and shapes
    for path in (tmp_path / "cons" / "consolidated", tmp_path / "dcp"):
        d = describe(memedit.load(path, header_only=True))
        assert d["n_slots"] == 65_536 and d["tables"][0]["dtype"] == "bfloat16" and d["tables"][0]["rows"] == 65_536
        code, out, _ = cli("info", "--model", path, "--json")
        assert code == 0 and json.loads(out)["tables"][0]["layers"] == [1, 3]
