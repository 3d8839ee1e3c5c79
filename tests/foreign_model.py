"""A model trained elsewhere: a small reference-layout ("lingua") checkpoint with a SentencePiece tokenizer.

Nothing here uses memedit. The model is defined, trained and evaluated by the compact torch module below, written
from docs/reference.md §1-2 (RMSNorm, causal attention with interleaved RoPE and grouped-query heads, and a
product-key memory with the swilu gate in place of the FFN of BOTH blocks, the two reading ONE shared value table),
and saved as a user of the reference implementation would bring it:

    tests/data/foreign-lingua/
        params.json        the training config, model part under "model", memory under "model.productkey_args",
                           tokenizer under "data.tokenizer" = {"name": "sp", "path": "tokenizer.model"}
        consolidated.pth   torch.save({"model": state_dict, "optim": {}}): §2 names; the shared table is copied,
                           bit-identical, under EVERY memory layer, in bfloat16; everything else float32
        tokenizer.model    a SentencePiece BPE model trained on the corpus
        facts.jsonl        one edit request per fact (memedit's EditRequest.from_dict format)
        corpus.txt         the training text, one sentence per line (for ``memedit background``)

The world: 160 invented people, each with a town ("lives in") and a job ("works as"); objects are 2-5 tokens
long. Every relation has five wordings; each fact is trained in four of them and the fifth (a different one for
different people, each wording trained with the other people) is its held-out paraphrase.

Helpers for tests: :func:`load_foreign`, :func:`greedy`, :func:`accuracy` (all by this module's own forward, on any
state dict in the §2 layout, e.g. one read back from ``memedit convert --format lingua``).
``python -m tests.foreign_model`` trains the fixture again (a few minutes on one or two threads) and prints its figures.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

FIXTURE = Path(__file__).parent / "data" / "foreign-lingua"
SEED = 2026
N_PEOPLE = 160
VOCAB = 512

PARAMS = {
    "name": "foreign_world",
    "dump_dir": "/checkpoints/foreign_world",
    "seed": SEED,
    "grad_acc_steps": 1,
    "steps": 0,  # filled in
    "optim": {"lr": 0.003, "weight_decay": 0.0, "warmup": 50, "lr_min_ratio": 0.05, "clip": 1.0},
    "model": {
        "dim": 96, "n_layers": 2, "head_dim": None, "n_heads": 4, "n_kv_heads": 2, "ffn_dim_multiplier": None,
        "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 10000.0, "init_base_std": None,
        "init_std_factor": "disabled", "max_seqlen": 64, "seed": SEED, "vocab_size": VOCAB, "weight_tying": False,
        "sliding_window": None,
        "productkey_args": {
            "is_enabled": True, "layers": "0,1", "mem_n_keys": 64, "mem_heads": 4, "mem_knn": 16,
            "mem_share_values": True, "mem_k_dim": 64, "mem_v_dim": -1, "swilu_projection": True,
            "value_fixed_lr": 0.001, "mem_gated": False, "peer_variant": False,
        },
    },
    "distributed": {"model_dtype": "bf16", "fsdp_type": "full_shard"},
    "data": {"root_dir": "/data", "seq_len": 64, "tokenizer": {"name": "sp", "path": "tokenizer.model"}},
}

# ---- the world ------------------------------------------------------------------------------------------------
_ONSET = ["b", "bl", "d", "dr", "f", "g", "gl", "h", "k", "kl", "m", "n", "p", "pr", "r", "s", "st", "t", "tr",
          "v", "w", "z"]
_NUCLEUS = ["a", "e", "i", "o", "u", "ae", "ie", "oa", "y"]
_CODA = ["", "", "l", "n", "r", "m", "z", "k", "sh", "ck"]
_TOWN_END = ["ton", "wick", "by", "ford", "mere", "stead", "holm", "worth"]
_TOWN_PRE = ["Upper", "Little", "East", "Old", "North", "Port"]
_TOWN_POST = ["Cross", "Green", "Hollow", "Bridge", "Heath"]
_RIVERS = ["Tarn", "Wye", "Lune", "Esk", "Ouse"]
JOBS = ("night baker", "river pilot", "tram driver", "lamp maker", "sheep shearer", "bell founder", "clock mender",
        "rope maker", "salt trader", "coal porter", "dock keeper", "peat cutter", "wool dyer", "harbor guide",
        "map engraver", "glass cutter", "barrel cooper", "kite builder", "stone carver", "ferry hand",
        "bridge painter", "lock keeper", "wine taster", "horse trainer", "field surveyor", "road mender",
        "boat caulker", "candle dipper", "seed merchant", "hat maker")
# five wordings per relation, "{}" for the subject; the object follows after a space
WORDINGS = {
    "town": ("{} lives in", "The home town of {} is", "{} has a house in", "The town where {} lives is",
             "{} resides in"),
    "job": ("{} works as a", "The job of {} is", "{} earns a living as a", "By trade, {} is a",
            "{} is employed as a"),
}


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSET) + rng.choice(_NUCLEUS) for _ in range(syllables)) + rng.choice(_CODA)


def world(seed: int = SEED, n_people: int = N_PEOPLE) -> list[dict]:
    """The facts, each {"id","relation","subject","target_true","target_new","prompt","paraphrases",
    "heldout_paraphrases","neighborhood"} (prompts filled, except ``prompt`` which keeps "{}")."""
    rng = random.Random(seed)
    taken: set[str] = set()

    def fresh(make) -> str:
        while True:
            w = make()
            if w.lower() not in taken and len(w) >= 5:
                taken.add(w.lower())
                return w

    people = [fresh(lambda: _word(rng, rng.choice((2, 3))).capitalize()) for _ in range(n_people)]
    towns = []  # "Upper Klierford", "Bickmere Hollow", "Drazby-on-Tarn": two to five pieces each
    for i in range(30):
        stem = fresh(lambda: _word(rng, 1).capitalize() + rng.choice(_TOWN_END))
        form = i % 3
        towns.append(f"{rng.choice(_TOWN_PRE)} {stem}" if form == 0 else f"{stem} {rng.choice(_TOWN_POST)}"
                     if form == 1 else f"{stem}-on-{rng.choice(_RIVERS)}")
    objects = {"town": towns, "job": list(JOBS)}
    facts = []
    for rel in ("town", "job"):
        true = [rng.choice(objects[rel]) for _ in people]
        for p, (person, obj) in enumerate(zip(people, true, strict=True)):
            held = (p + (2 if rel == "job" else 0)) % len(WORDINGS[rel])  # every wording is held out for 1/5
            train = [w for i, w in enumerate(WORDINGS[rel]) if i != held]
            first = rng.randrange(len(train))
            train = train[first:] + train[:first]  # the rewrite prompt varies between facts
            same = [q for q in range(len(people)) if q != p and true[q] == obj]  # must keep target_true
            facts.append({
                "id": f"{rel}-{p:03d}", "relation": rel, "subject": person, "target_true": obj,
                "target_new": rng.choice([o for o in objects[rel] if o != obj]),
                "prompt": train[0], "paraphrases": [w.replace("{}", person) for w in train[1:]],
                "heldout_paraphrases": [WORDINGS[rel][held].replace("{}", person)],
                "neighborhood": [train[0].replace("{}", people[q]) for q in rng.sample(same, min(3, len(same)))],
            })
    return facts


def training_sentences(facts: Sequence[dict], seed: int = SEED) -> list[str]:
    """The corpus: every fact in each of its training wordings, "<prompt> <object>.", shuffled."""
    out = [f"{p} {f['target_true']}." for f in facts for p in prompts_of(f)]
    random.Random(seed + 1).shuffle(out)
    return out


def prompts_of(fact: dict, which: str = "train") -> list[str]:
    """A fact's filled prompts: its training wordings (``train``) or its held-out one (``heldout``)."""
    if which == "heldout":
        return list(fact["heldout_paraphrases"])
    return [fact["prompt"].replace("{}", fact["subject"])] + list(fact["paraphrases"])


def fact_pairs(facts: Sequence[dict], which: str = "train", target: str = "target_true") -> list[tuple[str, str]]:
    """(prompt, answer) pairs of the facts in the ``train`` or ``heldout`` wordings."""
    return [(p, f[target]) for f in facts for p in prompts_of(f, which)]


def read_facts(path: Path = FIXTURE) -> list[dict]:
    return [json.loads(line) for line in (Path(path) / "facts.jsonl").read_text().splitlines() if line.strip()]


# ---- the tokenizer ------------------------------------------------------------------------------------------
def train_tokenizer(sentences: Sequence[str], vocab_size: int = VOCAB) -> bytes:
    """A SentencePiece BPE model (unk 0, BOS 1, EOS 2, no pad: the library's defaults) as serialized bytes."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, num_threads=1,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return buf.getvalue()


def sp_from(proto: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=proto)


def encode_prompt(sp, prompt: str) -> list[int]:
    """BOS, then the prompt's pieces (how the model was trained to read text)."""
    return [sp.bos_id()] + list(sp.encode(prompt))


def target_ids(sp, prompt: str, target: str) -> list[int]:
    """The target's pieces as a continuation of the prompt: those of ``prompt + " " + target`` after the prompt's."""
    p = encode_prompt(sp, prompt)
    whole = encode_prompt(sp, prompt.rstrip() + " " + target.strip())
    if whole[: len(p)] == p and len(whole) > len(p):
        return whole[len(p):]
    return list(sp.encode(" " + target.strip()))


# ---- the model: its own forward (docs/reference.md §1-2) ------------------------------------------------------
def _bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to bfloat16 and back, with a straight-through gradient (training sees the stored precision)."""
    return x + (x.to(torch.bfloat16).float() - x).detach()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class Attention(nn.Module):
    def __init__(self, m: dict):
        super().__init__()
        self.nh, self.kv = m["n_heads"], m["n_kv_heads"] or m["n_heads"]
        self.hd = m["head_dim"] or m["dim"] // self.nh
        self.wq = nn.Linear(m["dim"], self.nh * self.hd, bias=False)
        self.wk = nn.Linear(m["dim"], self.kv * self.hd, bias=False)
        self.wv = nn.Linear(m["dim"], self.kv * self.hd, bias=False)
        self.wo = nn.Linear(self.nh * self.hd, m["dim"], bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape

        def rope(t):  # interleaved pairs (t[2i], t[2i+1]) rotated by pos * theta^(-2i/hd)
            t0, t1 = t[..., 0::2], t[..., 1::2]
            c, s = cos[:T, None, :], sin[:T, None, :]
            return torch.stack([t0 * c - t1 * s, t0 * s + t1 * c], -1).flatten(-2)

        q = rope(self.wq(x).view(B, T, self.nh, self.hd))
        k = rope(self.wk(x).view(B, T, self.kv, self.hd)).repeat_interleave(self.nh // self.kv, dim=2)
        v = self.wv(x).view(B, T, self.kv, self.hd).repeat_interleave(self.nh // self.kv, dim=2)
        att = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(self.hd)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.wo(torch.einsum("bhij,bjhd->bihd", att, v).reshape(B, T, -1))


class QueryProj(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.query_mlps = nn.Sequential(nn.Linear(dim, out))


class Memory(nn.Module):
    """§1 steps 1-8, swilu variant; ``values`` is the shared table (an nn.Embedding owned by the model)."""

    def __init__(self, dim: int, pk: dict, values: nn.Embedding):
        super().__init__()
        self.H, self.N, self.K, self.k = pk["mem_heads"], pk["mem_n_keys"], pk["mem_k_dim"], pk["mem_knn"]
        self.keys = nn.Parameter(torch.empty(2 * self.H * self.N, self.K // 2).uniform_(-1, 1) / math.sqrt(self.K // 2))
        self.values = values
        self.query_proj = QueryProj(dim, self.H * self.K)
        self.value_proj = nn.Linear(dim, dim)
        self.swilu_projection = nn.Linear(dim, dim)
        self.quantize = False  # training: see the table and the mix in bfloat16, as stored

    def slots(self, x):
        """Selected slots (..., H, k) and their scores for normalised inputs x (..., D)."""
        H, N, K, k = self.H, self.N, self.K, self.k
        q = self.query_proj.query_mlps(x).view(*x.shape[:-1], H, 2, K // 2)  # step 1: [q1, q2] per head
        C = self.keys.float().view(H, 2, N, K // 2)
        s = torch.einsum("...hpd,hpnd->...hpn", q, C)  # step 2
        a, i1 = s[..., 0, :].topk(k, -1)  # step 3
        b, i2 = s[..., 1, :].topk(k, -1)
        cand = (a[..., :, None] + b[..., None, :]).flatten(-2)  # step 4: score[u, v], slot I1[u] * N + I2[v]
        slot = (i1[..., :, None] * N + i2[..., None, :]).flatten(-2)
        scores, j = cand.topk(k, -1)  # step 5
        return slot.gather(-1, j), scores

    def forward(self, x):
        idx, scores = self.slots(x)
        w = scores.float().softmax(-1)  # step 6, per head over its k slots
        table = self.values.weight
        rows = _bf16(table.float()) if self.quantize else table.float()  # rows upcast to float32
        lead = idx.shape[:-2]
        m = F.embedding_bag(idx.reshape(-1, self.H * self.k), rows, per_sample_weights=w.reshape(-1, self.H * self.k),
                            mode="sum").view(*lead, -1)  # step 7: one float32 sum over the H*k rows
        m = _bf16(m) if self.quantize else m.to(table.dtype).float()  # ... stored in the table's dtype
        return self.value_proj(m * F.silu(self.swilu_projection(x)))  # step 8


class Block(nn.Module):
    def __init__(self, m: dict, values: nn.Embedding):
        super().__init__()
        self.attention = Attention(m)
        self.attention_norm = RMSNorm(m["dim"], m["norm_eps"])
        self.ffn_norm = RMSNorm(m["dim"], m["norm_eps"])
        self.feed_forward = Memory(m["dim"], m["productkey_args"], values)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class ForeignLM(nn.Module):
    """Every block's FFN is a memory, all reading ONE table (this fixture's shape; dense FFNs are not needed)."""

    def __init__(self, params: dict):
        super().__init__()
        m = params["model"]
        pk = m["productkey_args"]
        assert [int(x) for x in pk["layers"].split(",")] == list(range(m["n_layers"])) and pk["mem_share_values"]
        D = m["dim"]
        self.tok_embeddings = nn.Embedding(m["vocab_size"], D)
        values = nn.Embedding(pk["mem_n_keys"] ** 2, D)
        nn.init.normal_(values.weight, std=D**-0.5)
        self.layers = nn.ModuleList([Block(m, values) for _ in range(m["n_layers"])])
        self.norm = RMSNorm(D, m["norm_eps"])
        self.output = nn.Linear(D, m["vocab_size"], bias=False)
        hd = m["head_dim"] or D // m["n_heads"]
        ang = torch.outer(torch.arange(m["max_seqlen"], dtype=torch.float64),
                          m["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        self.cos, self.sin = ang.cos().float(), ang.sin().float()

    def forward(self, tokens):
        h = self.tok_embeddings(tokens).float()
        for block in self.layers:
            h = block(h, self.cos, self.sin)
        return self.output(self.norm(h))

    def set_quantize(self, on: bool) -> None:
        for block in self.layers:
            block.feed_forward.quantize = on

    def lingua_state(self) -> dict[str, torch.Tensor]:
        """The §2 state dict: a separate bit-identical bfloat16 copy of the table under every layer."""
        out = {}
        for name, t in self.state_dict().items():
            t = t.detach().clone().contiguous()
            out[name] = t.to(torch.bfloat16) if name.endswith("feed_forward.values.weight") else t.float()
        return out


def build(state: dict[str, torch.Tensor], params: dict) -> ForeignLM:
    """The model for a §2 state dict; the shared table's copies must be bit-identical (then they are one table)."""
    names = [n for n in state if n.endswith("feed_forward.values.weight")]
    for n in names[1:]:
        a, b = state[names[0]], state[n]
        if a.dtype != b.dtype or not torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                                                 b.view(torch.int16) if b.dtype == torch.bfloat16 else b):
            raise ValueError(f"the shared table differs between {names[0]} and {n}")
    model = ForeignLM(params)
    model.layers[0].feed_forward.values.weight.data = state[names[0]].clone()  # keeps the stored dtype
    rest = {k: v for k, v in state.items() if k not in names}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not k.endswith("values.weight")]
    if missing or unexpected:
        raise ValueError(f"state dict does not match: missing {missing}, unexpected {unexpected}")
    return model.eval()


def _model(state_or_model, params) -> ForeignLM:
    return state_or_model if isinstance(state_or_model, ForeignLM) else build(state_or_model, params)


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    T = max(map(len, seqs))
    return torch.tensor([s + [0] * (T - len(s)) for s in seqs])  # right padding: causal, so harmless


# ---- helpers for tests ----------------------------------------------------------------------------------------
def load_foreign(path: str | Path = FIXTURE):
    """(state_dict, params, sp_processor) of a consolidated folder: ``params.json`` + ``consolidated.pth`` and the
    SentencePiece model params.json names (found as given or by file name in the folder). ``sp_processor`` is None
    when the folder has no ``.model`` file (a ``memedit convert --format lingua`` export has none)."""
    path = Path(path)
    params = json.loads((path / "params.json").read_text())
    state = torch.load(path / "consolidated.pth", map_location="cpu", weights_only=True)["model"]
    spec = (params.get("data") or {}).get("tokenizer") or {}
    sp = None
    if spec.get("name") == "sp" and spec.get("path"):
        for c in (path / spec["path"], path / Path(spec["path"]).name):
            if c.is_file():
                sp = sp_from(c.read_bytes())
                break
    return state, params, sp


@torch.no_grad()
def greedy_tokens(state, params, sp, prompts: Sequence[str], max_tokens: int = 8) -> list[list[int]]:
    """Greedy continuations (token ids, stopping at EOS, which is not included) of many prompts at once."""
    model = _model(state, params)
    seqs = [encode_prompt(sp, p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    for _ in range(max_tokens):
        if not live:
            break
        cur = [seqs[i] + new[i] for i in live]
        logits = model(_pad(cur))
        nxt = logits[torch.arange(len(cur)), torch.tensor([len(c) - 1 for c in cur])].argmax(-1).tolist()
        keep = []
        for i, t in zip(live, nxt, strict=True):
            if t != sp.eos_id():
                new[i].append(t)
                keep.append(i)
        live = keep
    return new


@torch.no_grad()
def last_logits(state, params, sp, prompts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """Next-token logits (n, vocab) after each prompt, float32."""
    model = _model(state, params)
    out = []
    for s in range(0, len(prompts), batch_size):
        seqs = [encode_prompt(sp, p) for p in prompts[s : s + batch_size]]
        logits = model(_pad(seqs))
        out.append(logits[torch.arange(len(seqs)), torch.tensor([len(q) - 1 for q in seqs])])
    return torch.cat(out)


def greedy(state, params, sp, prompt: str, max_tokens: int = 8) -> str:
    """The greedy continuation of ``prompt`` as text (the model's own forward; stops at EOS)."""
    return sp.decode(greedy_tokens(state, params, sp, [prompt], max_tokens)[0])


@torch.no_grad()
def _teacher_forced(state, params, sp, pairs: Sequence[tuple[str, str]], batch_size: int = 512):
    """Per (prompt, target): (the logits (n, vocab) at the positions that predict the target's n tokens, their
    ids), teacher forcing."""
    model = _model(state, params)
    for s in range(0, len(pairs), batch_size):
        part = pairs[s : s + batch_size]
        pids = [encode_prompt(sp, p) for p, _ in part]
        tids = [target_ids(sp, p, t) for p, t in part]
        logits = model(_pad([p + t[:-1] for p, t in zip(pids, tids, strict=True)]))
        for b, (p, t) in enumerate(zip(pids, tids, strict=True)):
            yield logits[b, len(p) - 1 : len(p) - 1 + len(t)].float(), t


def exact_matches(state, params, sp, pairs: Sequence[tuple[str, str]], batch_size: int = 512) -> list[bool]:
    """Per (prompt, target): every target token is the greedy choice after the prompt and the target's earlier
    tokens (greedy decoding reproduces the whole target)."""
    return [z.argmax(-1).tolist() == t for z, t in _teacher_forced(state, params, sp, pairs, batch_size)]


def mean_logprobs(state, params, sp, pairs: Sequence[tuple[str, str]], batch_size: int = 512) -> list[float]:
    """Per (prompt, target): the mean over the target's tokens of their log-probability under teacher forcing
    (CounterFact's whole-target comparison)."""
    return [float(z.log_softmax(-1).gather(-1, torch.tensor(t)[:, None]).mean())
            for z, t in _teacher_forced(state, params, sp, pairs, batch_size)]


def accuracy(state, params, sp, pairs: Sequence[tuple[str, str]]) -> float:
    """Share of (prompt, target) pairs whose whole target is the greedy continuation (the model's own forward)."""
    hits = exact_matches(state, params, sp, pairs)
    return sum(hits) / max(1, len(hits))


# ---- training and writing the fixture -------------------------------------------------------------------------
def train(facts: list[dict], sp, params: dict, epochs: int = 15, batch_size: int = 32, log=print) -> ForeignLM:
    torch.manual_seed(SEED)
    model = ForeignLM(params)
    for name, p in model.named_parameters():
        if name == "tok_embeddings.weight":
            nn.init.normal_(p, std=1.0)
    model.set_quantize(True)
    sents = training_sentences(facts)
    seqs = [encode_prompt(sp, s) + [sp.eos_id()] for s in sents]
    o = params["optim"]
    opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], weight_decay=o["weight_decay"], betas=(0.9, 0.95))
    steps = epochs * math.ceil(len(seqs) / batch_size)
    params["steps"] = steps

    def lr_at(t):
        if t < o["warmup"]:
            return (t + 1) / o["warmup"]
        f = (t - o["warmup"]) / max(1, steps - o["warmup"])
        return o["lr_min_ratio"] + (1 - o["lr_min_ratio"]) * 0.5 * (1 + math.cos(math.pi * f))

    rng = random.Random(SEED + 2)
    step, t0 = 0, time.time()
    for ep in range(epochs):
        order = list(range(len(seqs)))
        rng.shuffle(order)
        tot = 0.0
        for s in range(0, len(order), batch_size):
            batch = [seqs[i] for i in order[s : s + batch_size]]
            x = _pad(batch)
            mask = torch.tensor([[1] * (len(b) - 1) + [0] * (x.shape[1] - len(b)) for b in batch], dtype=torch.bool)
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits[mask], x[:, 1:][mask])
            for g in opt.param_groups:
                g["lr"] = o["lr"] * lr_at(step)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip"])
            opt.step()
            step += 1
            tot += loss.item()
        if ep % 5 == 4 or ep == epochs - 1:
            log(f"epoch {ep + 1}/{epochs} loss {tot / math.ceil(len(seqs) / batch_size):.4f} ({time.time() - t0:.0f}s)")
    model.set_quantize(False)
    return model.eval()


def write_fixture(dst: Path, model: ForeignLM, params: dict, proto: bytes, facts: list[dict],
                  sentences: list[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    torch.save({"model": model.lingua_state(), "optim": {}}, dst / "consolidated.pth")
    (dst / "tokenizer.model").write_bytes(proto)
    keys = ("id", "relation", "prompt", "subject", "target_new", "target_true", "paraphrases", "heldout_paraphrases",
            "neighborhood")
    (dst / "facts.jsonl").write_text("".join(json.dumps({k: f[k] for k in keys}) + "\n" for f in facts))
    (dst / "corpus.txt").write_text("".join(s + "\n" for s in sentences))


def figures(state, params, sp, facts) -> dict[str, float]:
    return {"train": accuracy(state, params, sp, fact_pairs(facts, "train")),
            "heldout": accuracy(state, params, sp, fact_pairs(facts, "heldout"))}


def main(epochs: int = 15, threads: int = 1) -> None:  # python -m tests.foreign_model
    torch.set_num_threads(threads)
    t0 = time.time()
    facts = world()
    sentences = training_sentences(facts)
    proto = train_tokenizer(sentences)
    sp = sp_from(proto)
    params = json.loads(json.dumps(PARAMS))
    params["model"]["vocab_size"] = sp.vocab_size()
    for f in facts:  # every answer must be a whole-piece continuation of its prompt, as in the corpus
        for p in prompts_of(f) + prompts_of(f, "heldout"):
            assert encode_prompt(sp, f"{p} {f['target_true']}.")[: len(encode_prompt(sp, p))] == encode_prompt(sp, p)
    lens = [len(target_ids(sp, f["prompt"].replace("{}", f["subject"]), f["target_true"])) for f in facts]
    print(f"{len(facts)} facts, {len(sentences)} sentences, vocab {sp.vocab_size()}, "
          f"target tokens min {min(lens)} mean {sum(lens) / len(lens):.1f} max {max(lens)}")
    model = train(facts, sp, params, epochs=epochs)
    state = model.lingua_state()
    print("float32 table:", figures(model, params, sp, facts))
    print("bf16 table (as stored):", figures(state, params, sp, facts))
    write_fixture(FIXTURE, model, params, proto, facts, sentences)
    state, params, sp = load_foreign(FIXTURE)
    print("read back:", figures(state, params, sp, facts))
    zeroed = {k: torch.zeros_like(v) if k.endswith("values.weight") else v for k, v in state.items()}
    print("value table zeroed (do the facts live in memory?):", figures(zeroed, params, sp, facts))
    print(f"wrote {FIXTURE} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    import sys

    main(*(int(a) for a in sys.argv[1:]))
