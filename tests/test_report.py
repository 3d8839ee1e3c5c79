"""`memedit report`: a static site, checked as data and in a real browser (Chromium via Playwright, from file://)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from memedit.auditing.audit import audit, open_corpus
from memedit.auditing.report import SHARD, build_report
from memedit.auditing.slot import slot_info
from memedit.errors import MemeditError
from memedit.tracing.targets import tokenize_target
from memedit.world.facts import world_of

# where the browser test saves its screenshots (index, slot and fact pages); README's copies are in docs/screenshots
SCREENSHOTS = Path(os.environ.get("MEMEDIT_SCREENSHOTS", Path(__file__).resolve().parents[1] / "build" / "screenshots"))


@pytest.fixture(scope="module")
def site(demo, tmp_path_factory):
    """A report of the demo: an audit of 20,000 tokens of its world with top contexts, a fact and a prompt."""
    stats = audit(demo, open_corpus(None, demo), max_tokens=20_000, contexts=4)
    out = tmp_path_factory.mktemp("report") / "site"
    summary = build_report(demo, out, stats, facts=["f00000"], prompts=[("Reidreir works as a", "chemist engineer")])
    return out, summary, stats


def load_js(path: Path) -> tuple[str, list]:
    """A data file `MEMEDIT.call(args...);` read back as (call, args)."""
    m = re.fullmatch(r"MEMEDIT\.(\w+)\((.*)\);\n", path.read_text(), re.S)
    return m.group(1), json.loads(f"[{m.group(2)}]")


def test_site_holds_every_used_slot_within_2kb_and_agrees_with_memedit_slot(demo, site):
    out, summary, stats = site
    used = int((stats.table_counts("shared").sum(0) > 0).sum())
    assert summary["slots"] >= used and summary["bytes_per_slot"] < 2048
    assert {p.name for p in (out / "figures").iterdir()} == {"usage.svg", "lorenz.svg", "heads.svg", "dead.svg"}
    assert not list(out.rglob("*.png"))  # no image per slot
    call, (meta,) = load_js(out / "data" / "meta.js")
    assert call == "setMeta" and [p["label"] for p in meta["pages"]] == ["f00000", "p1"]
    slot = int(stats.table_counts("shared").sum(0).argmax())
    call, (table, shard, recs) = load_js(out / "data" / "slots" / f"shared-{slot // SHARD}.js")
    rec = recs[str(slot)]
    info = slot_info(demo, slot, n=5)
    assert rec["c"] == int(stats.table_counts("shared").sum(0)[slot]) and rec["r"] == 1
    promoted = [t for t, _ in rec["p"][0][1]]  # token ids in the data; the page shows them through vocab.js
    assert promoted == [x["token_id"] for x in info["writes"][0]["promotes"]]
    _, (vocab,) = load_js(out / "data" / "vocab.js")
    assert [vocab[t] for t in promoted] == [x["token"] for x in info["writes"][0]["promotes"]]
    assert not any("Ġ" in t for t in vocab) and vocab[demo.tokenizer.encode(" Shoush")[0]] == " Shoush"  # decoded text
    assert [c[0] for c in rec["x"]] == pytest.approx([c["weight"] for c in stats.contexts.entries("shared", slot)],
                                                     rel=1e-3)
    _, (n, fact) = load_js(out / "data" / "facts" / "0.js")
    assert fact["fact"]["id"] == "f00000" and fact["causal"]["layers"] == [0, 1]
    assert len(fact["targets"]) == len(demo.tokenizer.encode(" " + world_of(demo).fact("f00000").target_true))
    _, (_, prompt) = load_js(out / "data" / "facts" / "1.js")
    want = tokenize_target(demo, "Reidreir works as a", "chemist engineer").ids
    assert len(prompt["targets"]) == len(want) >= 2  # one entry per target token
    heads = fact["targets"][0]["layers"][0]["heads"]
    assert len(heads) == demo.config.memory.heads and len(heads[0]["slots"]) == demo.config.memory.knn


def test_report_refuses_a_folder_that_is_not_a_report_and_replaces_an_old_report(demo, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(MemeditError, match="not a memedit report"):
        build_report(demo, other)
    assert (other / "notes.txt").read_text() == "keep me"
    out = tmp_path / "site"
    build_report(demo, out)
    (out / "stale.js").write_text("old")
    build_report(demo, out)
    assert not (out / "stale.js").exists() and (out / "index.html").is_file()


# ---- in a browser ----------------------------------------------------------------------------------------------
def chromium() -> str | None:
    path = os.environ.get("MEMEDIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None
    return path


def test_browse_index_search_slot_fact_and_back_without_console_errors(site):
    path = chromium()
    if path is None:
        pytest.skip("browser tests skipped: no Chromium (apt-get install chromium; pip install playwright)")
    from playwright.sync_api import sync_playwright

    out, _, _ = site
    _, (_, fact) = load_js(out / "data" / "facts" / "0.js")
    slot = fact["targets"][0]["top_slots"][0]["slot"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else 0)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto((out / "index.html").as_uri())
            assert page.locator("h1").inner_text() == "Memory report"
            assert page.locator("figure img").count() == 4
            assert all(page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)"))
            page.screenshot(path=str(SCREENSHOTS / "index.png"), full_page=True)
            page.fill("#search", str(slot))
            page.press("#search", "Enter")
            page.wait_for_url(re.compile(rf"slot\.html#shared/{slot}$"))
            page.wait_for_selector("#slot-facts")
            assert page.locator("h1").inner_text() == f"slot {slot}"
            assert page.locator(".contexts li").count() > 0 and page.locator(".contexts mark").count() > 0
            page.screenshot(path=str(SCREENSHOTS / "slot.png"), full_page=True)
            page.click("#slot-pages a:text('f00000')")
            page.wait_for_url(re.compile(r"fact\.html#0$"))
            page.wait_for_selector("text=Causal tracing")
            assert page.locator("h1").inner_text() == "fact f00000"
            assert page.locator(f"a[href='slot.html#shared/{slot}']").count() >= 1
            page.screenshot(path=str(SCREENSHOTS / "fact.png"), full_page=True)
            page.go_back()
            page.wait_for_selector("#slot-facts")
            assert page.locator("h1").inner_text() == f"slot {slot}"
            page.fill("#search", "Thakrian")  # a token: the slots that promote it most
            page.press("#search", "Enter")
            page.wait_for_selector("#results li")
            page.goto((out / "edits.html").as_uri())
            assert page.locator("h1").inner_text() == "Edit log"
        finally:
            browser.close()
    assert errors == []


def test_edit_log_page_data_has_each_patch_rows_and_change_norms(tiny, tmp_path):
    from memedit.editing.freeze import freeze
    from memedit.editing.patch import apply, row_patch

    model, _ = tiny
    before = model.table("shared").weight[[3, 9]].clone()
    p = row_patch(model, "scale", "shared", [3, 9], scalar=3.0, message="triple")
    apply(model, p)
    freeze(model, {"shared": [9]})
    build_report(model, tmp_path / "site")
    _, (edits,) = load_js(tmp_path / "site" / "data" / "edits.js")
    (e,) = edits
    assert (e["op"], e["kind"], e["message"], e["rows"]) == ("apply", "scale", "triple", {"shared": [3, 9]})
    norms = (2 * before).norm(dim=1).tolist()  # scaling by 3 changes a row by twice itself
    assert [r for r, _ in e["changes"]["shared"]] == [3, 9]
    assert [d for _, d in e["changes"]["shared"]] == pytest.approx(norms, rel=1e-3)
    _, (_, _, recs) = load_js(tmp_path / "site" / "data" / "slots" / "shared-0.js")
    assert recs["9"]["z"] == 1 and recs["3"]["e"] == [e["id"]] and "z" not in recs["3"]
