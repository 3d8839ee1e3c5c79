"""A deterministic synthetic world of facts, so the project can train and test a real memory model offline.

Every subject is an invented person; every relation has an object pool, four training phrasings and two
held-out phrasings. Facts are written out as edit requests in the shape of the knowledge-editing literature
(shared/reference/memory-layers.md §7): ``prompt`` (with ``{}`` for the subject), ``subject``,
``target_true``, ``target_new``, ``paraphrases``, ``heldout_paraphrases``, ``neighborhood``.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_SEED = 1234
DEFAULT_SUBJECTS = 1000

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "t", "th", "v", "z", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia"]
_CODAS = ["", "n", "r", "l", "s", "th", "m", "x", "nd", "rk"]


@dataclass(frozen=True)
class Relation:
    name: str
    objects: tuple[str, ...]
    train: tuple[str, str, str, str]  # training phrasings, {} = subject, the object follows the prompt
    heldout: tuple[str, str]  # phrasings never seen in training


def _invented(rng: random.Random, n: int, taken: set[str], syllables: tuple[int, int], suffix: str = "") -> list[str]:
    out: list[str] = []
    while len(out) < n:
        k = rng.randint(*syllables)
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k)) + rng.choice(_CODAS) + suffix
        w = w.capitalize()
        if w.lower() not in taken:
            taken.add(w.lower())
            out.append(w)
    return out


def _relations(rng: random.Random, taken: set[str]) -> list[Relation]:
    cities = _invented(rng, 40, taken, (2, 2))
    languages = _invented(rng, 24, taken, (1, 2), "ish")
    companies = _invented(rng, 36, taken, (2, 2), "co")
    professions = ("baker", "pilot", "surgeon", "teacher", "painter", "farmer", "lawyer", "chemist", "sailor",
                   "architect", "journalist", "plumber", "dentist", "librarian", "carpenter", "astronomer",
                   "tailor", "poet", "banker", "nurse", "engineer", "jeweler", "botanist", "miner")
    instruments = ("violin", "cello", "flute", "trumpet", "harp", "piano", "guitar", "oboe", "drums", "clarinet",
                   "banjo", "accordion", "saxophone", "tuba", "mandolin", "bassoon", "ukulele", "harmonica")
    sports = ("tennis", "rugby", "cricket", "hockey", "fencing", "rowing", "cycling", "archery", "golf",
              "volleyball", "handball", "badminton", "curling", "polo", "squash", "baseball")
    for w in professions + instruments + sports:
        taken.add(w)
    return [
        Relation("birthplace", tuple(cities),
                 ("{} was born in", "The birthplace of {} is", "{} is a native of", "{} came into the world in"),
                 ("The town where {} was born is", "{} grew up as a child in")),
        Relation("profession", professions,
                 ("{} works as a", "The profession of {} is", "By trade , {} is a", "{} earns a living as a"),
                 ("The job of {} is", "Every morning {} goes to work as a")),
        Relation("language", tuple(languages),
                 ("{} speaks", "The native language of {} is", "{} grew up speaking", "The mother tongue of {} is"),
                 ("The language {} speaks at home is", "{} writes letters in")),
        Relation("instrument", instruments,
                 ("{} plays the", "The instrument of {} is the", "{} performs on the", "{} practices the"),
                 ("In the orchestra {} plays the", "The favourite instrument of {} is the")),
        Relation("employer", tuple(companies),
                 ("{} is employed by", "The employer of {} is", "{} works for", "The company of {} is"),
                 ("The firm that pays {} is", "{} draws a salary from")),
        Relation("sport", sports,
                 ("{} competes in", "The sport of {} is", "{} trains for", "The favourite sport of {} is"),
                 ("On weekends {} plays", "The game {} loves most is")),
    ]


_FILLER_SUBJ = ("The weather", "The old road", "A quiet river", "The market", "The harbour", "A long winter",
                "The library", "The village square", "A small garden", "The night train", "The museum",
                "The council", "A gentle breeze", "The northern hills", "The festival")
_FILLER_VERB = ("was calm", "grew busy", "stayed open", "looked bright", "felt cold", "seemed empty", "was loud",
                "became quiet", "was crowded", "turned green", "was closed", "moved slowly")
_FILLER_TAIL = ("in the morning", "after the rain", "during the summer", "for many years", "at dawn",
                "before the holiday", "every evening", "last spring", "on most days", "that week")


@dataclass
class Fact:
    id: str
    relation: str
    prompt: str  # first training phrasing, "{}" for the subject
    subject: str
    target_true: str
    target_new: str  # a different object of the same relation, for edit experiments
    paraphrases: list[str]  # the other training phrasings, filled
    heldout_paraphrases: list[str]  # phrasings never trained on, filled
    neighborhood: list[str]  # same relation, other subjects whose true object is the same

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def training_prompts(self) -> list[str]:
        return [self.prompt.format(self.subject)] + self.paraphrases


class World:
    """The facts, filler sentences and relations generated from a seed."""

    def __init__(self, seed: int = DEFAULT_SEED, n_subjects: int = DEFAULT_SUBJECTS):
        rng = random.Random(seed)
        taken: set[str] = set()
        self.seed = seed
        self.relations = _relations(rng, taken)
        self.subjects = _invented(rng, n_subjects, taken, (2, 3))
        self.facts: list[Fact] = []
        truth: dict[tuple[str, str], list[str]] = {}  # (relation, object) -> subjects
        assignments = []
        for s in self.subjects:
            for r in self.relations:
                obj = rng.choice(r.objects)
                truth.setdefault((r.name, obj), []).append(s)
                assignments.append((s, r, obj))
        for n, (s, r, obj) in enumerate(assignments):
            new = rng.choice([o for o in r.objects if o != obj])
            peers = [p for p in truth[(r.name, obj)] if p != s]
            picks = rng.sample(peers, min(5, len(peers)))
            neighborhood = [rng.choice(r.train).format(p) for p in picks]
            self.facts.append(Fact(
                id=f"f{n:05d}", relation=r.name, prompt=r.train[0], subject=s, target_true=obj, target_new=new,
                paraphrases=[t.format(s) for t in r.train[1:]],
                heldout_paraphrases=[t.format(s) for t in r.heldout], neighborhood=neighborhood,
            ))
        self.filler = sorted({f"{a} {b} {c} ." for a in _FILLER_SUBJ for b in _FILLER_VERB for c in _FILLER_TAIL})
        rng.shuffle(self.filler)

    def fact(self, fact_id: str) -> Fact:
        for f in self.facts:
            if f.id == fact_id:
                return f
        from .errors import MemeditError

        raise MemeditError(f"unknown fact id {fact_id!r} (ids run from {self.facts[0].id} to {self.facts[-1].id})")

    def training_sentences(self) -> list[str]:
        """Every fact in every training phrasing, with its answer, plus filler."""
        out = [f"{p} {f.target_true} ." for f in self.facts for p in f.training_prompts]
        return out + self.filler

    def all_texts(self) -> list[str]:
        """Everything the tokenizer must cover (including held-out phrasings and new targets)."""
        rel_objs = [" ".join(r.objects) for r in self.relations]
        heldout = [f"{p} {f.target_true} ." for f in self.facts for p in f.heldout_paraphrases]
        return self.training_sentences() + heldout + rel_objs

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``facts.jsonl`` and ``corpus.txt`` into ``out_dir``; returns their paths."""
        from .checkpoint import atomic_write_text

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        facts_path, corpus_path = out_dir / "facts.jsonl", out_dir / "corpus.txt"
        atomic_write_text(facts_path, "".join(json.dumps(f.to_json()) + "\n" for f in self.facts))
        lines = self.training_sentences()
        random.Random(self.seed).shuffle(lines)
        atomic_write_text(corpus_path, "\n".join(lines) + "\n")
        return facts_path, corpus_path


def load_facts(path: str | Path) -> list[Fact]:
    """Read a facts JSONL file (one edit request per line)."""
    from .errors import MemeditError

    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise MemeditError(f"cannot read facts file {path}: {e.strerror}") from None
    facts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            facts.append(Fact(
                id=str(d.get("id", f"line{n}")), relation=d.get("relation", ""), prompt=d["prompt"],
                subject=d["subject"], target_true=d["target_true"], target_new=d.get("target_new", ""),
                paraphrases=list(d.get("paraphrases", [])),
                heldout_paraphrases=list(d.get("heldout_paraphrases", [])),
                neighborhood=list(d.get("neighborhood", [])),
            ))
        except (ValueError, KeyError, TypeError) as e:
            raise MemeditError(f"{path}:{n}: not a fact record ({type(e).__name__}: {e})") from None
    if not facts:
        raise MemeditError(f"{path} holds no facts")
    return facts


def world_of(model) -> World:
    """The synthetic world a model was trained on (recorded in its metadata)."""
    from .errors import MemeditError

    spec = getattr(model, "meta", {}).get("world")
    if not spec:
        raise MemeditError("this model has no demo world of facts to look fact ids up in: pass --facts FILE.jsonl "
                           "(edit requests with an id)")
    return World(int(spec["seed"]), int(spec["n_subjects"]))
