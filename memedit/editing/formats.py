"""Edit requests in the formats the knowledge-editing field ships, read into :class:`EditRequest` (and written back).

A requests file is parsed whole first: a JSON array (on one line or pretty-printed), one JSON object (pretty-printed
or not), or JSONL (one object a line). Each record's format is told from its fields:

- **memedit** (``prompt``, ``subject``, ``target_new``, ...): :meth:`EditRequest.from_dict`, unchanged.
- **CounterFact** (ROME / MEMIT / AlphaEdit): ``case_id``, ``requested_rewrite`` {``prompt`` with "{}",
  ``subject``, ``target_new`` {``str``}, ``target_true`` {``str``}, ``relation_id``}, ``paraphrase_prompts``,
  ``neighborhood_prompts``, ``attribute_prompts``, ``generation_prompts``. The paraphrases are measured only (as
  ROME does: they are not trained on); the neighbourhood prompts must keep ``target_true``.
- **ZsRE** as MEND / EasyEdit ship it (``subject``, ``src``, ``rephrase``, ``alt``, ``answers``, ``loc``,
  ``loc_ans``), with EasyEdit's mapping: prompt = ``src`` (the subject's occurrences made "{}"), new target =
  ``alt``, old = ``answers[0]``, ``rephrase`` measured only, (``loc``, ``loc_ans``) a locality pair. ROME's own
  loader maps it otherwise (new = ``answers[0]``, old = "<|endoftext|>").
- **EasyEdit's data records** (its own CounterFact / ZsRE files: ``prompt``, ``target_new``, ``ground_truth``,
  ``subject``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``): told from memedit's by those
  EasyEdit-only fields.
- **EasyEdit's edit call** as JSON: ``prompts``, ``target_new``, optional ``ground_truth`` (default: the model's own
  answer, where EasyEdit puts "<|endoftext|>"), ``subject``, ``rephrase_prompts``, ``locality_inputs``
  {name: {``prompt``, ``ground_truth``}}; lists (one entry per edit, as ``BaseEditor.edit`` takes them) or single
  strings (one edit).

A record that fits none, or lacks a field its format needs, is refused in one line naming the record and the
field. A subject that does not occur in its prompt is not an error: the prompt is edited as it is (no "{}", so no
contrast with other subjects) and :attr:`Case.subject_in_prompt` is False.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import limits
from ..errors import MemeditError
from .sparse_ft import EditRequest, _json_kind

FORMATS = ("memedit", "counterfact", "zsre", "easyedit")
WRITE_FORMATS = ("counterfact", "zsre")


@dataclass
class Case:
    """One edit request as read from a file, with what its format carries beyond :class:`EditRequest`."""

    request: EditRequest
    format: str  # one of FORMATS
    case_id: str  # CounterFact's case_id, else the request's id, else its place in the file (0-based)
    # (prompt, answer) pairs the edit should leave alone, measured EasyEdit's way (ZsRE's loc/loc_ans, EasyEdit's
    # locality_inputs); empty for CounterFact and memedit records (their neighbourhood prompts are used instead)
    locality: list[tuple[str, str]] = field(default_factory=list)
    subject_in_prompt: bool = True
    requested_rewrite: dict | None = None  # CounterFact's own, as read (written back to --results files)
    extra: dict = field(default_factory=dict)  # attribute_prompts, generation_prompts, ... as read

    def rome_rewrite(self) -> dict:
        """The case's ``requested_rewrite`` in CounterFact's shape (its own when it came from CounterFact)."""
        if self.requested_rewrite is not None:
            return self.requested_rewrite
        r = self.request
        return {"prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target_new},
                "target_true": {"str": r.target_true}, "relation_id": ""}


# ---- reading ---------------------------------------------------------------------------------------------
def read_cases(path: str | Path) -> list[Case]:
    """The edit requests of a file in any format of the module docstring, parsed whole before any is used."""
    path = limits.input_file(path, "requests file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MemeditError(f"cannot read requests file {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MemeditError(f"{path}:{line}: not UTF-8 (byte {data[e.start:e.start + 1]!r}); memedit reads text as "
                           "UTF-8: convert it first (e.g. iconv -t UTF-8)") from None
    records = _records(path, text)
    cases: list[Case] = []
    for where, n, d in records:
        try:
            cases += _cases(d, n, len(cases))
        except MemeditError as e:
            raise MemeditError(f"{path}{where}{_label(d)}: {e}") from None
    if not cases:
        raise MemeditError(f"{path} holds no edit requests")
    return cases


def _records(path: Path, text: str) -> list[tuple[str, int, object]]:
    """[(where, index, record)]: the records of a JSON array, of one JSON object, or of JSONL lines."""
    body = text.strip()
    if not body:
        raise MemeditError(f"{path} holds no edit requests")
    if body[0] == "[":
        try:
            arr = json.loads(body)
        except ValueError as e:
            raise MemeditError(f"{path}: not JSON ({_why(e)})") from None
        if not isinstance(arr, list):
            raise MemeditError(f"{path}: not JSON ({_why(ValueError('a JSON array was expected'))})")
        return [(f": record {n + 1}", n, d) for n, d in enumerate(arr)]
    if body[0] == "{":
        try:
            d = json.loads(body)  # one object, maybe pretty-printed
            if "\n" in body:
                return [(": record 1", 0, d)]
            return [(f":{text[: text.index(body[0])].count(chr(10)) + 1}", 0, d)]  # one line: JSONL
        except ValueError:
            pass  # JSONL: one object a line
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((f":{n}", len(out), json.loads(line)))
        except ValueError as e:
            raise MemeditError(f"{path}:{n}: not JSON ({_why(e)}); a requests file is JSONL (one object a line) "
                               "or a JSON array") from None
    return out


def _why(e: ValueError) -> str:
    return str(e)[:200]


def _label(d) -> str:
    if isinstance(d, dict) and isinstance(d.get("case_id"), (int, str)) and not isinstance(d.get("case_id"), bool):
        return f" (case_id {d['case_id']})"
    return ""


def _cases(d, n: int, start: int) -> list[Case]:
    """The case(s) of record ``d`` (an EasyEdit call with lists holds several)."""
    if not isinstance(d, dict):
        raise MemeditError(f"an edit request is a JSON object, not {_json_kind(d)}")
    if "requested_rewrite" in d:
        return [_counterfact(d, n)]
    if "src" in d or "alt" in d:
        return [_zsre(d, n)]
    if "prompts" in d:
        return _easyedit(d, start)
    if "prompt" in d and any(k in d for k in EASY_DATA_KEYS):
        return _easyedit_data(d, n)
    if "prompt" in d:
        r = EditRequest.from_dict(d)
        return [Case(r, "memedit", r.id or str(n), subject_in_prompt=_has_subject(r))]
    keys = ", ".join(map(repr, list(d)[:8])) or "none"
    raise MemeditError("not an edit request in a format memedit reads: it lacks 'prompt' (memedit), "
                       f"'requested_rewrite' (CounterFact), 'src' (ZsRE) or 'prompts' (EasyEdit); its keys: {keys}")


EASY_DATA_KEYS = ("ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth")


def _easyedit_data(d: dict, n: int) -> list[Case]:
    """A record of EasyEdit's own data files (e.g. its counterfact-edit.json): ``prompt``, ``target_new``,
    ``ground_truth``, ``subject``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``, as its
    dataset classes hand them to the editor."""
    gt = d.get("ground_truth")
    if isinstance(gt, list):  # KnowEdit lists the accepted answers: the first is the old one
        gt = gt[0] if gt else None
    call = {"prompts": d["prompt"], "target_new": d.get("target_new"), "ground_truth": gt,
            "subject": d.get("subject"), "rephrase_prompts": d.get("rephrase_prompt")}
    if not isinstance(call["prompts"], str):
        raise MemeditError(f"field 'prompt' must be a string, not {_json_kind(call['prompts'])}")
    if "target_new" not in d:
        raise MemeditError("an EasyEdit record needs 'target_new'")
    lp, lg = d.get("locality_prompt"), d.get("locality_ground_truth")
    if (lp is None) != (lg is None):
        have, lack = ("locality_prompt", "locality_ground_truth")[:: 1 if lp is not None else -1]
        raise MemeditError(f"an EasyEdit record with {have!r} needs {lack!r} too (a locality pair)")
    if lp is not None:
        call["locality_inputs"] = {"locality": {"prompt": lp, "ground_truth": lg}}
    (case,) = _easyedit({k: v for k, v in call.items() if v is not None}, n)
    if "case_id" in d:
        case.case_id = case.request.id = str(d["case_id"])
    return [case]


def _has_subject(r: EditRequest) -> bool:
    return "{}" in r.prompt and bool(r.subject.strip())


def _get(d: dict, key: str, kind: type, name: str, fmt: str, required: bool = True, default=None):
    """``d[key]`` checked to be of ``kind`` (``name``: the field as the user wrote it: requested_rewrite.prompt)."""
    if key not in d or d[key] is None:
        if required:
            raise MemeditError(f"a {fmt} record needs {name!r}")
        return default
    v = d[key]
    if kind is str:
        return limits.text(v, f"field {name!r}")
    if not isinstance(v, kind) or isinstance(v, bool):
        want = {dict: "an object", list: "a list", str: "a string"}.get(kind, kind.__name__)
        raise MemeditError(f"field {name!r} must be {want}, not {_json_kind(v)}")
    return v


def _strings(d: dict, key: str, name: str, fmt: str) -> list[str]:
    """An optional list of strings (a single string is taken as a list of one)."""
    v = d.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise MemeditError(f"field {name!r} must be a list of strings, not {_json_kind(v)}")
    return [limits.text(x, f"field {name}[{i}]") for i, x in enumerate(v)]


def _templated(prompt: str, subject: str) -> tuple[str, bool]:
    """``prompt`` with the subject's occurrences made "{}" (as ROME's ZsRE loader does), and whether it occurs."""
    if "{}" in prompt:
        return prompt, bool(subject.strip())
    if subject.strip() and subject in prompt:
        return prompt.replace(subject, "{}"), True
    return prompt, False


def _counterfact(d: dict, n: int) -> Case:
    f = "CounterFact"
    rr = _get(d, "requested_rewrite", dict, "requested_rewrite", f)
    prompt = _get(rr, "prompt", str, "requested_rewrite.prompt", f)
    subject = _get(rr, "subject", str, "requested_rewrite.subject", f)
    new = _get(_get(rr, "target_new", dict, "requested_rewrite.target_new", f), "str", str,
               "requested_rewrite.target_new.str", f)
    old = _get(_get(rr, "target_true", dict, "requested_rewrite.target_true", f), "str", str,
               "requested_rewrite.target_true.str", f)
    case_id = d.get("case_id", n)
    if not isinstance(case_id, (int, str)) or isinstance(case_id, bool):
        raise MemeditError(f"field 'case_id' must be a number or a string, not {_json_kind(case_id)}")
    para = _strings(d, "paraphrase_prompts", "paraphrase_prompts", f)
    neigh = _strings(d, "neighborhood_prompts", "neighborhood_prompts", f)
    extra = {k: _strings(d, k, k, f) for k in ("attribute_prompts", "generation_prompts") if k in d}
    found = "{}" in prompt and bool(subject.strip())
    if "{}" in prompt and not subject.strip():
        raise MemeditError("field 'requested_rewrite.subject' is empty, but the prompt has \"{}\" for it")
    req = EditRequest(prompt=prompt, subject=subject, target_new=new, target_true=old, heldout_paraphrases=para,
                      neighborhood=neigh, id=str(case_id))
    return Case(req, "counterfact", str(case_id), subject_in_prompt=found, requested_rewrite=rr, extra=extra)


def _zsre(d: dict, n: int) -> Case:
    f = "ZsRE"
    src = _get(d, "src", str, "src", f)
    new = _get(d, "alt", str, "alt", f)
    answers = _get(d, "answers", list, "answers", f)
    if not answers:
        raise MemeditError("field 'answers' is empty: a ZsRE record needs answers[0], the old answer")
    old = limits.text(answers[0], "field 'answers[0]'")
    subject = _get(d, "subject", str, "subject", f, required=False, default="")
    prompt, found = _templated(src, subject)
    rephrase = _strings(d, "rephrase", "rephrase", f)
    loc = _get(d, "loc", str, "loc", f, required=False)
    loc_ans = _get(d, "loc_ans", str, "loc_ans", f, required=False)
    if (loc is None) != (loc_ans is None):
        raise MemeditError(f"a ZsRE record with {'loc' if loc is not None else 'loc_ans'!r} needs "
                           f"{'loc_ans' if loc is not None else 'loc'!r} too (a locality pair)")
    cid = str(d.get("case_id", d.get("id", n)))
    req = EditRequest(prompt=prompt, subject=subject, target_new=new, target_true=old, heldout_paraphrases=rephrase,
                      id=cid)
    return Case(req, "zsre", cid, locality=[(loc, loc_ans)] if loc is not None else [], subject_in_prompt=found)


def _per_edit(d: dict, key: str, n: int, required: bool = False) -> list:
    """An EasyEdit argument as one entry per edit: a list of ``n`` entries, or (n == 1) a single value."""
    if key not in d or d[key] is None:
        if required:
            raise MemeditError(f"an EasyEdit record needs {key!r}")
        return [None] * n
    v = d[key]
    if d.get("_single"):
        return [v]
    if not isinstance(v, list):
        raise MemeditError(f"field {key!r} must be a list (one entry per prompt), not {_json_kind(v)}")
    if len(v) != n:
        raise MemeditError(f"field {key!r} has {len(v)} entries for {n} prompts")
    return v


def _easyedit(d: dict, start: int) -> list[Case]:
    prompts = d["prompts"]
    single = isinstance(prompts, str)
    if single:
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise MemeditError(f"field 'prompts' must be a non-empty list of strings, not {_json_kind(d['prompts'])}")
    n = len(prompts)
    d = {**d, "_single": single}
    new = _per_edit(d, "target_new", n, required=True)
    old = _per_edit(d, "ground_truth", n)
    subj = _per_edit(d, "subject", n)
    reph = _per_edit(d, "rephrase_prompts", n)
    loc_in = d.get("locality_inputs") or {}
    if not isinstance(loc_in, dict):
        raise MemeditError(f"field 'locality_inputs' must be an object {{name: {{\"prompt\": ..., \"ground_truth\": "
                           f"...}}}}, not {_json_kind(loc_in)}")
    loc: list[list[tuple[str, str]]] = [[] for _ in range(n)]
    for name, v in loc_in.items():
        where = f"locality_inputs.{name}"
        if not isinstance(v, dict) or "prompt" not in v or "ground_truth" not in v:
            raise MemeditError(f"field {where!r} must be an object with 'prompt' and 'ground_truth'")
        ps = _per_edit({**v, "_single": single}, "prompt", n)
        gs = _per_edit({**v, "_single": single}, "ground_truth", n)
        for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
            p = [p] if isinstance(p, str) else p
            g = [g] if isinstance(g, str) else g
            if not isinstance(p, list) or not isinstance(g, list) or len(p) != len(g):
                raise MemeditError(f"field {where!r}: entry {i} needs as many ground truths as prompts")
            for j, (a, b) in enumerate(zip(p, g, strict=True)):
                loc[i].append((limits.text(a, f"field '{where}.prompt'[{i}][{j}]"),
                               limits.text(b, f"field '{where}.ground_truth'[{i}][{j}]")))
    cases = []
    for i in range(n):
        p = limits.text(prompts[i], f"field 'prompts'[{i}]")
        if new[i] is None:
            raise MemeditError(f"field 'target_new'[{i}] is null")
        t_new = limits.text(new[i], f"field 'target_new'[{i}]")
        t_old = "" if old[i] is None else limits.text(old[i], f"field 'ground_truth'[{i}]")
        if t_old == "<|endoftext|>":  # EasyEdit's stand-in for "no ground truth": the model's own answer here
            t_old = ""
        s = "" if subj[i] is None else limits.text(subj[i], f"field 'subject'[{i}]")
        prompt, found = _templated(p, s)
        rp = reph[i]
        rp = [] if rp is None else [rp] if isinstance(rp, str) else rp
        if not isinstance(rp, list):
            raise MemeditError(f"field 'rephrase_prompts'[{i}] must be a string or a list of strings")
        rp = [limits.text(x, f"field 'rephrase_prompts'[{i}]") for x in rp]
        cid = str(start + i)
        req = EditRequest(prompt=prompt, subject=s, target_new=t_new, target_true=t_old, heldout_paraphrases=rp,
                          id=cid)
        cases.append(Case(req, "easyedit", cid, locality=loc[i], subject_in_prompt=found))
    return cases


# ---- writing ---------------------------------------------------------------------------------------------
def to_counterfact(facts, start: int = 0) -> list[dict]:
    """Facts (objects with prompt, subject, target_true, target_new, relation, heldout_paraphrases, neighborhood) as
    CounterFact records: the held-out wordings are its paraphrase prompts (measured, not trained)."""
    out = []
    for n, f in enumerate(facts, start):
        out.append({
            "case_id": n,
            "pararel_idx": n,
            "requested_rewrite": {"prompt": f.prompt, "relation_id": getattr(f, "relation", "") or "",
                                  "target_new": {"str": f.target_new, "id": ""},
                                  "target_true": {"str": f.target_true, "id": ""}, "subject": f.subject},
            "paraphrase_prompts": list(f.heldout_paraphrases),
            "neighborhood_prompts": list(f.neighborhood),
            "attribute_prompts": [],
            "generation_prompts": [],
        })
    return out


def to_zsre(facts, loc_facts=None) -> list[dict]:
    """Facts as ZsRE records in MEND's shape: src = the first wording with the subject, alt = the new target,
    answers = [the true one], rephrase = the first held-out wording (or paraphrase), and loc / loc_ans another
    subject's fact (the next one in the list) as the locality pair."""
    facts = list(facts)
    loc_facts = list(loc_facts) if loc_facts is not None else facts
    out = []
    for n, f in enumerate(facts):
        src = f.prompt.replace("{}", f.subject)
        reph = (list(f.heldout_paraphrases) or list(f.paraphrases) or [src])[0]
        other = next((g for g in loc_facts[n + 1:] + loc_facts[:n + 1] if g.subject != f.subject), None)
        rec = {"subject": f.subject, "src": src, "pred": f.target_true, "rephrase": reph, "alt": f.target_new,
               "answers": [f.target_true], "cond": f"{f.target_true} >> {f.target_new} || {src}"}
        if other is not None:
            rec["loc"] = other.prompt.replace("{}", other.subject)
            rec["loc_ans"] = other.target_true
        out.append(rec)
    return out


def dumps(records: list[dict]) -> str:
    """Records as the datasets ship them: one pretty-printed JSON array."""
    return json.dumps(records, indent=2, ensure_ascii=False) + "\n"


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def safe_id(case_id: str) -> str:
    """A case id as a file-name part (``case_{id}.json``)."""
    return _SAFE.sub("_", str(case_id))[:100] or "_"


def read_requests(path: str | Path) -> list[EditRequest]:
    """The edit requests of a file: memedit's JSONL, or CounterFact, ZsRE or EasyEdit records as a JSON array, one
    JSON object or JSONL."""
    return [c.request for c in read_cases(path)]
