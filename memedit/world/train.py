"""Train a memory model on the synthetic world (the bundled demo model is made by ``memedit train``)."""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import MemeditError
from ..lm.memory import MemoryConfig
from ..lm.model import MemoryModel, ModelConfig
from ..storage.checkpoint import DTYPES
from ..storage.importers.tokenizers import HFTokenizer, _require
from .evaluate import fact_accuracies
from .facts import (
    DEFAULT_BIOS_PER_SUBJECT,
    DEFAULT_HELDOUT_PER_FACT,
    DEFAULT_SEED,
    DEFAULT_SUBJECTS,
    DEFAULT_TEMPLATES_PER_FACT,
    World,
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: pad, BOS, EOS (byte-level BPE needs no unknown token)


@dataclass
class TrainConfig:
    seed: int = DEFAULT_SEED  # the world's seed and the initialisation seed
    n_subjects: int = DEFAULT_SUBJECTS
    templates_per_fact: int = DEFAULT_TEMPLATES_PER_FACT  # wordings each fact is trained in
    heldout_per_fact: int = DEFAULT_HELDOUT_PER_FACT  # wordings seen with other subjects, kept from this fact
    bios_per_subject: int = DEFAULT_BIOS_PER_SUBJECT
    vocab_size: int = 4096  # the most BPE tokens; the world's text needs fewer
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    memory_layers: tuple[int, ...] = (0, 1)  # every FFN is a memory: no dense FFN can hold the facts
    n_keys: int = 256  # 256^2 = 65,536 slots
    mem_heads: int = 4
    knn: int = 16
    k_dim: int = 64
    v_dim: int = -1  # value row width (-1: the model width D)
    multiple_of: int = 64  # (dense FFNs, when a layer has one) small, so that facts must live in memory
    ffn_dim_multiplier: float | None = 0.5
    max_seqlen: int = 128  # the longest biography is < 100 tokens
    epochs: int = 9
    batch_size: int = 256
    lr: float = 3e-3
    values_lr: float = 1e-1  # value rows get few, sparse updates: a larger rate (as the reference does)
    # Parameter-name prefixes kept at their random initialisation. Trainable token embeddings learn to hold
    # every fact of their subject (accuracy with memory zeroed stays ~90%); fixed random embeddings make the
    # facts live in the memory's value rows.
    freeze: tuple[str, ...] = ("tok_embeddings",)
    values_dtype: str = "bfloat16"  # value rows are rounded to this after training, as the reference stores them
    threads: int = 1  # on a shared 2-core machine a second thread mostly waits (3-4x slower steps measured)
    device: str = "cpu"

    def world(self) -> World:
        """The world these settings describe."""
        return World(self.seed, self.n_subjects, self.templates_per_fact, self.heldout_per_fact,
                     self.bios_per_subject)


def demo_config(tc: TrainConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        dim=tc.dim, n_layers=tc.n_layers, n_heads=tc.n_heads, vocab_size=vocab_size,
        multiple_of=tc.multiple_of, ffn_dim_multiplier=tc.ffn_dim_multiplier, max_seqlen=tc.max_seqlen,
        memory=MemoryConfig(layers=list(tc.memory_layers), n_keys=tc.n_keys, heads=tc.mem_heads, knn=tc.knn,
                            k_dim=tc.k_dim, v_dim=tc.v_dim, share_values=True, swilu_projection=True),
    )


def world_tokenizer(world: World, vocab_size: int = 4096):
    """A byte-level BPE tokenizer (HuggingFace ``tokenizers``) trained on the world's text, as an HFTokenizer.

    Trained on :meth:`World.tokenizer_texts` (names once each, so they split into 2+ pieces); a space is put
    before the first word, so a name is the same tokens at the start of a sentence and inside it.
    """
    tk = _require("tokenizers", "tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(world.tokenizer_texts(), trainer)
    return HFTokenizer(tok.to_str())


def multi_token_share(tok, names) -> float:
    """The fraction of ``names`` that are two or more tokens (spelt after a space, as in a sentence)."""
    names = list(names)
    return sum(len(tok.encode(" " + n)) >= 2 for n in names) / len(names)


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Index batches of sequences of similar length (little padding), in a random order each epoch."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 32
    out = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lengths.__getitem__)
        out += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def train(
    tc: TrainConfig,
    progress: Callable[[int, int, float], None] | None = None,
    probe: tuple[int, Callable[[int, MemoryModel], None]] | None = None,
) -> tuple[MemoryModel, World]:
    """Train a model on the world of ``tc``; ``progress(step, total, loss)`` is called every step,
    ``probe = (every, fn)`` calls ``fn(step, model)`` every ``every`` steps (for training curves)."""
    try:
        dev = torch.device(tc.device)
    except RuntimeError:
        raise MemeditError(f"unknown device {tc.device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MemeditError(f"device {tc.device!r} asked for, but no CUDA device is available here")
    if tc.values_dtype not in DTYPES:
        raise MemeditError(f"unknown values dtype {tc.values_dtype!r} (choose from {', '.join(DTYPES)})")
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    world = tc.world()
    tok = world_tokenizer(world, tc.vocab_size)
    model = MemoryModel(demo_config(tc, tok.vocab_size), tokenizer=tok)
    model.init_weights(tc.seed)
    model.to(tc.device)
    model.train()

    seqs = [[tok.bos_id] + tok.encode(s) + [tok.eos_id] for s in world.training_sentences()]
    longest = max(len(s) for s in seqs)
    if longest > tc.max_seqlen:
        raise MemeditError(f"a training sentence is {longest} tokens, more than max_seqlen {tc.max_seqlen}")
    lengths = [len(s) for s in seqs]

    for name, p in model.named_parameters():
        if name.startswith(tuple(tc.freeze)):
            p.requires_grad_(False)
    value_params = [t.weight for t in model.tables]
    value_ids = {id(p) for p in value_params}
    other = [p for p in model.parameters() if id(p) not in value_ids and p.requires_grad]
    opt = torch.optim.Adam([
        {"params": other, "lr": tc.lr},
        {"params": value_params, "lr": tc.values_lr},
    ], fused=True)  # one kernel per step over the 8M-parameter value table, not five passes
    total = tc.epochs * len(_batches(lengths, tc.batch_size, random.Random(0)))  # the same count every epoch
    warmup = min(200, total // 10)
    base_lrs = [g["lr"] for g in opt.param_groups]
    rng = random.Random(tc.seed)
    step = 0
    for _ in range(tc.epochs):
        for idx in _batches(lengths, tc.batch_size, rng):
            T = max(lengths[i] for i in idx)
            batch = torch.full((len(idx), T), tok.pad_id, dtype=torch.long)
            for b, i in enumerate(idx):
                batch[b, : lengths[i]] = torch.tensor(seqs[i])
            batch = batch.to(tc.device)
            scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
            for g, lr in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = lr * scale
            logits = model(batch[:, :-1])
            targets = batch[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=tok.pad_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if progress is not None:
                progress(step, total, loss.item())
            if probe is not None and step % probe[0] == 0:
                model.eval()
                probe[1](step, model)
                model.train()
    model.cpu()
    model.eval()
    model.requires_grad_(False)
    for t in model.tables:  # stored (and measured) as the reference stores them; everything else stays float32
        t.weight.data = t.weight.data.to(DTYPES[tc.values_dtype])
    model.meta["world"] = dict(world.spec)
    return model, world


def main() -> None:  # python -m memedit.world.train: a quick way to try settings


    def parse(k: str, v: str):
        cur = getattr(TrainConfig, k)
        if isinstance(cur, tuple):
            return tuple(type(cur[0])(x) for x in v.split(",")) if v else ()
        return type(cur)(v) if cur is not None else float(v)

    tc = TrainConfig(**{k: parse(k, v) for k, v in (a.split("=") for a in sys.argv[1:])})
    t0 = time.time()

    def show(step: int, total: int, loss: float) -> None:
        if step % 100 == 0 or step == total:
            print(f"step {step}/{total} loss {loss:.3f} {time.time() - t0:.0f}s", flush=True)

    model, world = train(tc, show)
    print("train time", round(time.time() - t0, 1))
    print("acc", fact_accuracies(model, world.facts))
    print("acc zero memory", fact_accuracies(model, world.facts, zero_memory=True))


if __name__ == "__main__":
    main()
