"""A deterministic synthetic world of facts, so the project can train and test a real memory model offline.

Every subject is an invented person with six facts (birthplace, profession, language, instrument, employer,
sport). The world is built for *knowledge extraction* in the sense of Allen-Zhu & Li, "Physics of Language
Models, Part 3.1" (2023): a fact seen in one wording stays bound to that wording, while a fact seen in several
wordings, in biographies of permuted order with pronouns, can be recalled in wordings never seen with it.

- Each relation has ``templates`` (wordings the model is trained with) and ``unseen`` templates (wordings no
  subject is ever trained with).
- Each fact is trained in its own random subset of ``templates_per_fact`` templates: once as a sentence of its
  own and again inside ``bios_per_subject`` biographies of its subject (facts in a random order, later sentences
  with a pronoun, some sentences holding two facts).
- Each fact is evaluated in its training wordings (``prompt`` + ``paraphrases``), in ``heldout_paraphrases``
  (templates the model saw with *other* subjects, never with this one) and in ``unseen_paraphrases`` (templates
  never seen at all).

Facts are written out as edit requests in the shape of the knowledge-editing literature (docs/ and ROME's
CounterFact): ``prompt`` (with ``{}`` for the subject), ``subject``, ``target_true``, ``target_new``,
``paraphrases``, ``heldout_paraphrases``, ``neighborhood``; the object follows the prompt after a space.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MemeditError
from ..limits import read_lines, text
from ..storage.checkpoint import atomic_write_text

DEFAULT_SEED = 1234
DEFAULT_SUBJECTS = 300
DEFAULT_TEMPLATES_PER_FACT = 9
DEFAULT_HELDOUT_PER_FACT = 2
DEFAULT_BIOS_PER_SUBJECT = 2

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "t", "th", "v", "z", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia"]
_CODAS = ["", "n", "r", "l", "s", "th", "m", "x", "nd", "rk"]


@dataclass(frozen=True)
class Relation:
    name: str
    objects: tuple[str, ...]
    templates: tuple[str, ...]  # wordings trained with, {} = subject; the object follows after a space
    unseen: tuple[str, ...]  # wordings no subject is trained with


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


# Twelve trained and three never-trained wordings per relation. Wordings that start with "{} " can take a pronoun
# in a biography and can be joined to another such wording with "and".
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "birthplace": (
        ("{} was born in", "The birthplace of {} is", "{} is a native of", "{} came into the world in",
         "{} was born and raised in", "The town where {} was born is", "{} grew up in", "The hometown of {} is",
         "{} spent a childhood in", "Records show that {} was born in", "{} first saw the light of day in",
         "The place of birth of {} is"),
        ("{} is originally from", "The city {} was born in is", "People say {} comes from"),
    ),
    "profession": (
        ("{} works as a", "The profession of {} is", "By trade, {} is a", "{} earns a living as a",
         "The job of {} is", "Every morning {} goes to work as a", "{} is employed as a", "{}'s occupation is",
         "{} trained to become a", "By profession, {} is a", "{} makes a living as a", "The occupation of {} is"),
        ("{} has a career as a", "Everyone knows {} as a", "{} took a job as a"),
    ),
    "language": (
        ("{} speaks", "The native language of {} is", "{} grew up speaking", "The mother tongue of {} is",
         "The language {} speaks at home is", "{} writes letters in", "{} is fluent in", "{}'s first language is",
         "At home, {} speaks", "{} dreams in", "The language of {} is", "{} was raised speaking"),
        ("{} talks to family in", "The tongue {} knows best is", "{} reads the news in"),
    ),
    "instrument": (
        ("{} plays the", "The instrument of {} is the", "{} performs on the", "{} practices the",
         "In the orchestra {} plays the", "The favourite instrument of {} is the", "{} learned to play the",
         "{}'s instrument is the", "On stage, {} plays the", "{} owns a well-worn", "{} is a master of the",
         "Music lovers know {} for playing the"),
        ("{} gives concerts on the", "The instrument {} loves is the", "{} spends evenings playing the"),
    ),
    "employer": (
        ("{} is employed by", "The employer of {} is", "{} works for", "The company of {} is",
         "The firm that pays {} is", "{} draws a salary from", "{} has a job at", "{}'s employer is",
         "Each day {} reports to", "{} signed a contract with", "The company that hired {} is",
         "{} is on the payroll of"),
        ("{} holds a position at", "The business {} works for is", "{} gets paid by"),
    ),
    "sport": (
        ("{} competes in", "The sport of {} is", "{} trains for", "The favourite sport of {} is",
         "On weekends {} plays", "The game {} loves most is", "{} is a champion of", "{}'s sport is",
         "{} won a medal in", "Every summer {} plays", "The sport {} practices is", "{} coaches a team in"),
        ("{} is a fan of playing", "The sport {} is best at is", "{} spends Sundays playing"),
    ),
}


def _relations(rng: random.Random, taken: set[str]) -> list[Relation]:
    cities = _invented(rng, 40, taken, (2, 2))
    languages = _invented(rng, 24, taken, (1, 2), "ish")
    companies = _invented(rng, 36, taken, (2, 2), "co")
    # consonant-initial, so "works as a" reads right for every one
    professions = ("baker", "pilot", "surgeon", "teacher", "painter", "farmer", "lawyer", "chemist", "sailor",
                   "mason", "journalist", "plumber", "dentist", "librarian", "carpenter", "barber",
                   "tailor", "poet", "banker", "nurse", "welder", "jeweler", "botanist", "miner")
    instruments = ("violin", "cello", "flute", "trumpet", "harp", "piano", "guitar", "oboe", "drums", "clarinet",
                   "banjo", "accordion", "saxophone", "tuba", "mandolin", "bassoon", "ukulele", "harmonica")
    sports = ("tennis", "rugby", "cricket", "hockey", "fencing", "rowing", "cycling", "archery", "golf",
              "volleyball", "handball", "badminton", "curling", "polo", "squash", "baseball")
    for w in professions + instruments + sports:
        taken.add(w)
    objects = {"birthplace": cities, "profession": professions, "language": languages,
               "instrument": instruments, "employer": companies, "sport": sports}
    return [Relation(name, tuple(objects[name]), *TEMPLATES[name]) for name in TEMPLATES]


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
    prompt: str  # the first training wording, "{}" for the subject
    subject: str
    target_true: str
    target_new: str  # a different object of the same relation, for edit experiments
    paraphrases: list[str]  # the other training wordings, filled
    heldout_paraphrases: list[str]  # wordings trained with other subjects, never with this one, filled
    neighborhood: list[str]  # same relation, other subjects whose true object is the same
    unseen_paraphrases: list[str] = field(default_factory=list)  # wordings never trained with any subject

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def training_prompts(self) -> list[str]:
        # not str.format: prompts from a user's facts file may hold other braces
        return [self.prompt.replace("{}", self.subject)] + self.paraphrases


class World:
    """The facts, biographies, filler sentences and relations generated from a seed and a size."""

    def __init__(self, seed: int = DEFAULT_SEED, n_subjects: int = DEFAULT_SUBJECTS,
                 templates_per_fact: int = DEFAULT_TEMPLATES_PER_FACT,
                 heldout_per_fact: int = DEFAULT_HELDOUT_PER_FACT, bios_per_subject: int = DEFAULT_BIOS_PER_SUBJECT):
        n_templates = min(len(t[0]) for t in TEMPLATES.values())
        if n_subjects < 2 or templates_per_fact < 1 or heldout_per_fact < 0 or bios_per_subject < 0:
            raise MemeditError("a world needs >= 2 subjects, >= 1 template per fact and no negative counts")
        if templates_per_fact + heldout_per_fact > n_templates:
            raise MemeditError(f"templates_per_fact + heldout_per_fact must be <= {n_templates}")
        rng = random.Random(seed)
        taken: set[str] = set()
        self.seed = seed
        self.spec = {"seed": seed, "n_subjects": n_subjects, "templates_per_fact": templates_per_fact,
                     "heldout_per_fact": heldout_per_fact, "bios_per_subject": bios_per_subject}
        self.relations = _relations(rng, taken)
        self.subjects = _invented(rng, n_subjects, taken, (2, 3))
        self.pronouns = {s: rng.choice(("He", "She")) for s in self.subjects}
        truth: dict[tuple[str, str], list[int]] = {}  # (relation, object) -> indices of facts
        rows = []  # (subject, relation, object, training templates, held-out templates)
        for s in self.subjects:
            for r in self.relations:
                obj = rng.choice(r.objects)
                picked = rng.sample(r.templates, templates_per_fact + heldout_per_fact)
                truth.setdefault((r.name, obj), []).append(len(rows))
                rows.append((s, r, obj, picked[:templates_per_fact], picked[templates_per_fact:]))
        self.facts: list[Fact] = []
        self._templates: dict[str, list[str]] = {}  # fact id -> its training templates (for biographies)
        for n, (s, r, obj, train, held) in enumerate(rows):
            new = rng.choice([o for o in r.objects if o != obj])
            peers = rng.sample([p for p in truth[(r.name, obj)] if p != n], min(5, len(truth[(r.name, obj)]) - 1))
            fid = f"f{n:05d}"
            self._templates[fid] = list(train)
            self.facts.append(Fact(
                id=fid, relation=r.name, prompt=train[0], subject=s, target_true=obj, target_new=new,
                paraphrases=[t.format(s) for t in train[1:]],
                heldout_paraphrases=[t.format(s) for t in held],
                neighborhood=[rows[p][3][0].format(rows[p][0]) for p in peers],
                unseen_paraphrases=[t.format(s) for t in r.unseen],
            ))
        self.bios = [self._bio(rng, i) for i in range(n_subjects) for _ in range(bios_per_subject)]
        filler = sorted({f"{a} {b} {c}." for a in _FILLER_SUBJ for b in _FILLER_VERB for c in _FILLER_TAIL})
        rng.shuffle(filler)
        self.filler = filler[:n_subjects]  # about one filler sentence per 30 fact sentences, whatever the size

    def _bio(self, rng: random.Random, i: int) -> str:
        """One biography of subject ``i``: its facts in a random order, in random training wordings of each,
        the name first, a pronoun in some later sentences, some sentences joining two facts with "and"."""
        n_rel = len(self.relations)
        facts = self.facts[i * n_rel : (i + 1) * n_rel]
        rng.shuffle(facts)
        s = facts[0].subject
        parts = [(rng.choice(self._templates[f.id]), f.target_true) for f in facts]
        sentences: list[str] = []
        k = 0
        while k < len(parts):
            t, obj = parts[k]
            who = s if k == 0 or not t.startswith("{} ") or rng.random() < 0.4 else self.pronouns[s]
            text = f"{t.format(who)} {obj}"
            if k + 1 < len(parts) and t.startswith("{} ") and parts[k + 1][0].startswith("{} ") and rng.random() < 0.3:
                t2, obj2 = parts[k + 1]
                text += f" and {t2[3:]} {obj2}"
                k += 1
            sentences.append(text + ".")
            k += 1
        return " ".join(sentences)

    def fact(self, fact_id: str) -> Fact:
        for f in self.facts:
            if f.id == fact_id:
                return f

        raise MemeditError(f"unknown fact id {fact_id!r} (ids run from {self.facts[0].id} to {self.facts[-1].id})")

    def training_sentences(self) -> list[str]:
        """Every fact in each of its training wordings, with its answer; the biographies; filler."""
        out = [f"{p} {f.target_true}." for f in self.facts for p in f.training_prompts]
        return out + self.bios + self.filler

    def all_texts(self) -> list[str]:
        """Everything a tokenizer must cover (including held-out and unseen wordings and new targets)."""
        rel_objs = [" ".join(r.objects) for r in self.relations]
        other = [f"{p} {f.target_true}." for f in self.facts for p in f.heldout_paraphrases + f.unseen_paraphrases]
        return self.training_sentences() + other + rel_objs

    def tokenizer_texts(self) -> list[str]:
        """The text a subword tokenizer is trained on: the training sentences with every name replaced by X (so the
        words of the wordings count as often as the corpus uses them) and every name once, so that names are split
        by the statistics of their syllables rather than learnt whole because the world repeats them (in a real
        corpus "the" is frequent and a person's name is rare)."""
        names = list(self.subjects) + [o for r in self.relations for o in r.objects]
        pattern = re.compile(r"\b(?:" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b")
        return [pattern.sub("X", s) for s in self.training_sentences()] + names

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``facts.jsonl`` and ``corpus.txt`` into ``out_dir``; returns their paths."""
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
    path = Path(path)
    lines = read_lines(path, "facts file")  # a regular file of UTF-8 lines, within the caps
    facts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if not isinstance(d, dict):
                raise TypeError(f"a fact record is a JSON object, not {type(d).__name__}")
            for key in ("prompt", "subject", "target_true"):
                text(d[key], f"field {key!r}")
            for key in ("paraphrases", "heldout_paraphrases", "neighborhood", "unseen_paraphrases"):
                if not isinstance(d.get(key, []), list) or not all(isinstance(x, str) for x in d.get(key, [])):
                    raise TypeError(f"field {key!r} must be a list of strings")
            facts.append(Fact(
                id=str(d.get("id", f"line{n}")), relation=d.get("relation", ""), prompt=d["prompt"],
                subject=d["subject"], target_true=d["target_true"], target_new=d.get("target_new", ""),
                paraphrases=list(d.get("paraphrases", [])),
                heldout_paraphrases=list(d.get("heldout_paraphrases", [])),
                neighborhood=list(d.get("neighborhood", [])),
                unseen_paraphrases=list(d.get("unseen_paraphrases", [])),
            ))
        except (ValueError, KeyError, TypeError, MemeditError) as e:
            raise MemeditError(f"{path}:{n}: not a fact record ({type(e).__name__}: {e})") from None
    if not facts:
        raise MemeditError(f"{path} holds no facts")
    return facts


_SPEC_KEYS = ("seed", "n_subjects", "templates_per_fact", "heldout_per_fact", "bios_per_subject")


def world_of(model) -> World:
    """The synthetic world a model was trained on (recorded in its metadata)."""
    spec = getattr(model, "meta", {}).get("world")
    if not spec:
        raise MemeditError("this model has no demo world of facts to look fact ids up in: pass --facts FILE.jsonl "
                           "(edit requests with an id)")
    return World(**{k: int(spec[k]) for k in _SPEC_KEYS if k in spec})
