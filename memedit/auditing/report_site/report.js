// memedit report: renders every page from data files loaded with <script src> (no fetch: the site opens from file://).
// Data files call MEMEDIT.setMeta / setVocab / setSearch / setEdits / addSlots / addFact (memedit/report.py).
"use strict";
window.MEMEDIT = (function () {
  const M = { meta: null, vocab: [], search: {}, edits: [], slots: {}, facts: {}, loaded: {} };

  M.setMeta = (m) => { M.meta = m; };
  M.setVocab = (v) => { M.vocab = v; };
  M.setSearch = (s) => { M.search = s; };
  M.setEdits = (e) => { M.edits = e; };
  M.addSlots = (table, shard, recs) => { M.slots[table + "-" + shard] = recs; };
  M.addFact = (n, page) => { M.facts[n] = page; };

  // ---- helpers ------------------------------------------------------------------------------------------------
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
    }
    for (const k of kids.flat()) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
    return e;
  }
  const fmt = (x, d = 3) => (x === null || x === undefined) ? "–" : Number(x).toFixed(d);
  const int = (x) => Number(x).toLocaleString("en-US");
  const tok = (i) => (i >= 0 && i < M.vocab.length) ? M.vocab[i] : "⟨" + i + "⟩";
  const slotHref = (table, slot) => "slot.html#" + encodeURIComponent(table) + "/" + slot;
  const pageHref = (n) => "fact.html#" + n;
  function loadScript(src, done) {  // a data file, once; `done` runs when it has run
    if (M.loaded[src]) return done();
    const s = el("script", { src: src });
    s.onload = () => { M.loaded[src] = true; done(); };
    document.body.append(s);
  }
  function bar(x, max, signed) {  // a horizontal bar for x in [-max, max] (signed) or [0, max]
    const w = max > 0 ? Math.min(100, 100 * Math.abs(x) / max) : 0;
    const cls = "bar" + (signed ? (x >= 0 ? " pos" : " neg") : "");
    return el("span", { class: cls, title: fmt(x, 4) }, el("span", { style: "width:" + w.toFixed(1) + "%" }));
  }
  function section(title, ...kids) { return el("section", {}, el("h2", {}, title), ...kids); }
  function tbl(head, rows, cls) {
    return el("table", { class: cls || "" }, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => el("td", {}, c))))));
  }
  function setMain(...kids) { const m = document.getElementById("main"); m.replaceChildren(...kids); }
  function firstTable() { return Object.keys(M.meta.tables)[0]; }

  // ---- search -------------------------------------------------------------------------------------------------
  function searchFor(q) {  // returns a URL to go to, or a list of result elements
    q = q.trim();
    if (!q) return [];
    let m = q.match(/^(?:([\w.]+)[\/: ])?(\d+)$/);
    if (m) return slotHref(m[1] || firstTable(), Number(m[2]));
    for (const p of M.meta.pages) if (p.label === q) return pageHref(p.n);
    const out = [];
    const ql = q.toLowerCase();
    M.vocab.forEach((t, i) => {
      const tt = t.trim().toLowerCase();  // tokens are decoded text (" Paris"): the word matches with or without its space
      if (t === q || tt === ql.trim()) {
        for (const [table, slot] of (M.search[i] || [])) {
          out.push(el("li", {}, el("a", { href: slotHref(table, slot) }, "slot " + slot), " (table " + table +
            ") promotes ", el("code", {}, t), " most"));
        }
      }
    });
    for (const p of M.meta.pages) {
      if (p.prompt.toLowerCase().includes(ql) || (p.subject || "").toLowerCase() === ql) {
        out.push(el("li", {}, el("a", { href: pageHref(p.n) }, p.label), " — " + p.prompt + " → " + p.target));
      }
    }
    return out.length ? out : [el("li", { class: "muted" }, "nothing found for “" + q + "”: try a slot id, a token " +
      "or a fact id")];
  }
  function wireSearch() {
    const form = document.getElementById("search-form");
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const r = searchFor(document.getElementById("search").value);
      if (typeof r === "string") { location.href = r; return; }
      let box = document.getElementById("results");
      if (!box) { box = el("ul", { id: "results" }); document.getElementById("main").prepend(section("Search", box)); }
      box.replaceChildren(...r);
    });
  }

  // ---- index --------------------------------------------------------------------------------------------------
  function renderIndex() {
    const m = M.meta;
    const parts = [el("h1", {}, "Memory report"),
      el("p", {}, "model ", el("code", {}, m.model), " (fingerprint " + m.fingerprint + "): " + int(m.n_slots) +
        " slots (N " + m.n_keys + "), " + m.heads + " heads, k " + m.knn + ", memory layers " + m.layers.join(", ") +
        "; tables " + Object.entries(m.tables).map(([t, ls]) => t + " (layers " + ls.join(", ") + ")").join(", ") +
        ". Built " + m.built + ".")];
    if (m.audit) {
      const a = m.audit;
      parts.push(section("Audit", el("p", {}, int(a.tokens) + " tokens of " + a.corpus +
        (a.contexts ? "; top contexts kept per slot." : "; no top contexts (audit with --contexts M)."))),
        tbl(["scope", "basis", "used", "Gini", "KL to uniform", "top 50%", "top 1% share", "dead"],
          a.metrics.map((r) => [r.scope === "table" ? "table " + r.table : "layer " + r.layer, r.basis,
            fmt(r.used, 2) + "%", fmt(r.gini), fmt(r.kl_uniform), int(r.top50), fmt(100 * r.top1pct_share, 1) + "%",
            int(r.dead)]), "metrics"));
      parts.push(el("div", { class: "figures" }, m.figures.map((f) => el("figure", {},
        el("img", { src: f.file, alt: f.title }), el("figcaption", {}, el("b", {}, f.title + ". "), f.caption)))));
    } else {
      parts.push(el("p", { class: "muted" }, "No audit: build with --stats audit.h5 for usage figures and slot usage."));
    }
    parts.push(section("Traced prompts and facts", m.pages.length ? el("ul", {}, m.pages.map((p) =>
      el("li", {}, el("a", { href: pageHref(p.n) }, p.label), " — " + p.prompt + " → " + p.target))) :
      el("p", { class: "muted" }, "none (memedit report --fact ID or --prompt P --target T)")));
    parts.push(section("Edits", el("p", {}, el("a", { href: "edits.html" }, m.edits + " entries in the edit log"))));
    setMain(...parts);
  }

  // ---- slot ---------------------------------------------------------------------------------------------------
  // A record: c count, w weight mass, r rank, h [[layer, head, count]], v value-row norm, k [[layer, head, |i|, |j|]],
  // p / s [[layer, [[token, logit]]]] promoted / suppressed, x [[weight, doc, pos, layer, head, [tokens]]],
  // z frozen, e [edit ids], t [traced page labels].
  function renderSlot() {
    const h = decodeURIComponent(location.hash.slice(1));
    const m = h.match(/^([\w.]+)\/(\d+)$/);
    if (!m) return setMain(el("p", {}, "Give a slot: slot.html#TABLE/ID, e.g. ", el("a",
      { href: slotHref(firstTable(), 0) }, "slot.html#" + firstTable() + "/0")));
    const table = m[1], slot = Number(m[2]);
    document.title = "slot " + slot + " — memedit report";
    if (!(table in M.meta.tables) || slot >= M.meta.n_slots) {
      return setMain(el("h1", {}, "slot " + slot), el("p", {}, "No such slot in this model."));
    }
    const shard = Math.floor(slot / M.meta.shard);
    if (!(M.meta.shards[table] || []).includes(shard)) return drawSlot(table, slot, null);
    loadScript("data/slots/" + table + "-" + shard + ".js", () => drawSlot(table, slot, M.slots[table + "-" + shard][slot]));
  }
  function drawSlot(table, slot, r) {
    const N = M.meta.n_keys, i = Math.floor(slot / N), j = slot % N;
    const parts = [el("h1", {}, "slot " + slot), el("p", {}, "table " + table + " (read by layers " +
      M.meta.tables[table].join(", ") + "), sub-keys i = " + i + ", j = " + j + ".")];
    if (!r) {
      parts.push(el("p", { class: "muted" }, "Nothing recorded for this slot: it was not used in the audit, " +
        "selected by a traced prompt, frozen or edited. Ask the command line: memedit slot " + slot));
      return setMain(...parts);
    }
    const facts = [];
    if (r.z) facts.push(el("span", { class: "tag" }, "frozen"));
    facts.push("value-row norm " + fmt(r.v));
    if (r.c !== undefined) {
      facts.push(r.c ? "; selected " + int(r.c) + " times, weight mass " + fmt(r.w) + ", rank " + int(r.r) + " of " +
        int(M.meta.n_slots) : "; never selected in the audit (dead)");
    }
    parts.push(el("p", { id: "slot-facts" }, facts));
    parts.push(section("What it writes", el("p", { class: "muted" }, "position-independent readout: the value " +
      "row through value_proj (gate 1), the final norm's weight and the unembedding"),
      tbl(["through layer", "promotes", "suppresses"], (r.p || []).map(([L, up], n) => [String(L),
        el("span", {}, up.map(([t, x]) => el("span", { class: "chip up" }, tok(t) + " " + fmt(x, 2)))),
        el("span", {}, r.s[n][1].map(([t, x]) => el("span", { class: "chip down" }, tok(t) + " " + fmt(x, 2))))]))));
    if (r.h) parts.push(section("Heads that selected it", tbl(["layer", "head", "count"],
      r.h.map(([L, hh, c]) => [String(L), String(hh), int(c)]))));
    if (r.x) {
      const maxw = Math.max(...r.x.map((c) => c[0]));
      parts.push(section("Top contexts", el("ol", { class: "contexts" }, r.x.map(([w, d, p, L, hh, ids]) =>
        el("li", {}, bar(w, maxw), " " + fmt(w) + " ", el("span", { class: "ctx" }, ids.map((t, n) => t < 0 ? null :
          n === 8 ? el("mark", {}, tok(t)) : el("span", {}, tok(t)))),
          el("span", { class: "muted" }, " doc " + d + ", pos " + p + ", layer " + L + " head " + hh))))));
    } else if (M.meta.audit && !M.meta.audit.contexts) {
      parts.push(section("Top contexts", el("p", { class: "muted" }, "the audit kept none: memedit audit --contexts 8")));
    }
    if (r.t) parts.push(section("Selected by traced prompts", el("ul", { id: "slot-pages" }, r.t.map((label) => {
      const p = M.meta.pages.find((q) => q.label === label);
      return el("li", {}, el("a", { href: pageHref(p.n) }, label), " — " + p.prompt + " → " + p.target);
    }))));
    if (r.e) parts.push(section("Edits", el("ul", {}, r.e.map((id) => el("li", {},
      el("a", { href: "edits.html#" + id }, id))))));
    parts.push(section("Sub-key norms", tbl(["layer", "head", "|sub-key i|", "|sub-key j|"],
      r.k.map(([L, hh, a, b]) => [String(L), String(hh), fmt(a), fmt(b)]))));
    setMain(...parts);
  }

  // ---- a traced fact or prompt ---------------------------------------------------------------------------------
  function renderFact() {
    const n = location.hash.slice(1);
    const p = M.meta.pages.find((q) => String(q.n) === n);
    if (!p) return setMain(el("p", {}, "No such traced prompt; see the ", el("a", { href: "index.html" }, "overview"), "."));
    loadScript("data/facts/" + p.n + ".js", () => drawFact(p, M.facts[p.n]));
  }
  function heatmap(c, tokens) {
    const max = Math.max(1e-9, ...c.effect.flat().map(Math.abs));
    return tbl(["token", ...c.layers.map((L) => "layer " + L)], c.effect.map((row, t) => [
      tokens[t] + (c.subject_positions.includes(t) ? " *" : ""),
      ...row.map((x) => el("span", { class: "heat", title: fmt(x, 4),
        style: "background:rgba(106,61,154," + Math.max(0, x / max).toFixed(3) + ")" + (x / max > 0.5 ? ";color:#fff" : "") },
        fmt(x, 3)))]), "heatmap");
  }
  function drawFact(p, d) {
    document.title = p.label + " — memedit report";
    const tgt = d.target;
    const parts = [el("h1", {}, d.fact ? "fact " + d.fact.id : "prompt " + p.label),
      el("p", {}, el("b", {}, d.prompt), " → ", el("b", {}, tgt.text), ": probability " + fmt(tgt.prob) +
        " (log " + fmt(tgt.logprob) + ", " + d.targets.length + " token" + (d.targets.length > 1 ? "s" : "") + ")" +
        (tgt.exact_match ? ", the model's greedy answer" : ", not the greedy answer") +
        (tgt.note ? " (" + tgt.note + ")" : "") + ". Top predictions: " +
        d.top.map(([t, x]) => t + " " + fmt(x)).join(", "))];
    if (d.fact) {
      parts.push(section("Phrasings", tbl(["prompt", "held out", "P(target)", "rank", "flip count"],
        d.fact.phrasings.map((q) => [q.prompt, q.heldout ? "yes" : "", fmt(q.prob), String(q.rank),
          q.flip === null ? "–" : String(q.flip)]))),
        el("p", {}, "Core set (slots every training phrasing selects at the answer): ",
          Object.entries(d.fact.core_set).map(([t, ss]) => el("span", {}, t + ": ",
            ss.map((s) => el("a", { class: "chip", href: slotHref(t, s) }, String(s)))))));
    }
    if (d.causal) {
      parts.push(section("Causal tracing", el("p", { class: "muted" }, "P(" + tgt.text + ") with memory layer L " +
        "restored at one position, minus corrupted (subject “" + d.causal.subject + "” noised; clean " +
        fmt(d.causal.clean) + ", corrupted " + fmt(d.causal.corrupted) + ")"), heatmap(d.causal, d.causal.tokens)));
    }
    d.targets.forEach((tg, n) => {
      const head = d.targets.length > 1 ? "target token " + (n + 1) + " “" + tg.token + "”: " : "";
      parts.push(el("h2", { class: "target" }, head + "P(" + tg.token + ") " + fmt(tg.prob) + ", rank " + tg.rank +
        " at position " + tg.position));
      parts.push(el("p", { class: "muted" }, "attribution: the slot's direct effect on the logit of “" + tg.token +
        "” (weight × its readout at this position); ablation: change in the whole target's log-probability when " +
        "the slot is dropped from its head's lookup (negative: the slot supports the target)"));
      parts.push(section("Top slots by attribution", tbl(["slot", "layer", "head", "attribution", "ablation",
        "promotes"], tg.top_slots.map((s) => [el("a", { href: slotHref(s.table, s.slot) }, String(s.slot)),
        String(s.layer), String(s.head), fmt(s.attribution), fmt(s.ablation, 4), s.promotes.join(" ")]))));
      const all = tg.layers.flatMap((l) => l.heads.flatMap((h) => h.slots));
      const maxA = Math.max(1e-9, ...all.map((s) => Math.abs(s[2])));
      const maxB = Math.max(1e-9, ...all.map((s) => Math.abs(s[3])));
      for (const lay of tg.layers) {
        parts.push(section("Memory layer " + lay.layer + " (table " + lay.table + ", attribution " +
          fmt(lay.attribution) + ")", el("div", { class: "heads" }, lay.heads.map((h) => el("div", { class: "head" },
          el("h3", {}, "head " + h.head), tbl(["slot", "weight", "attribution", "ablation"], h.slots.map(([s, w, a, b]) => [
            el("a", { href: slotHref(lay.table, s) }, String(s)), el("span", {}, bar(w, 1), " " + fmt(w)),
            el("span", {}, bar(a, maxA, true), " " + fmt(a)), el("span", {}, bar(b, maxB, true), " " + fmt(b, 4))]),
            "slots"))))));
      }
    });
    setMain(...parts);
  }

  // ---- edit log -----------------------------------------------------------------------------------------------
  function renderEdits() {
    const parts = [el("h1", {}, "Edit log")];
    if (!M.edits.length) parts.push(el("p", { class: "muted" }, "This model was never edited."));
    for (const e of M.edits) {
      const rows = Object.entries(e.rows).map(([t, rs]) => {
        const ch = e.changes && e.changes[t];
        const max = ch ? Math.max(1e-9, ...ch.map((c) => c[1])) : 0;
        const items = ch ? ch.slice(0, 50).map(([r, d]) => el("li", {}, el("a", { href: slotHref(t, r) }, "row " + r),
          " ", bar(d, max), " |Δ| " + fmt(d))) : rs.slice(0, 50).map((r) => el("li", {}, t in M.meta.tables ?
          el("a", { href: slotHref(t, r) }, "row " + r) : "row " + r));
        return el("div", {}, el("p", {}, t + ": " + int(rs.length) + " rows" + (rs.length > 50 ? " (first 50)" : "")),
          el("ul", { class: "rows" }, items));
      });
      parts.push(el("section", { id: e.id }, el("h2", {}, e.op + " " + e.id),
        el("p", {}, (e.kind || "") + ", " + (e.time || "") + (e.forced ? ", forced" : "") + ": " + (e.message || "")),
        e.info && Object.keys(e.info).length ? el("pre", {}, JSON.stringify(e.info, null, 1)) : null, rows));
    }
    setMain(...parts);
  }

  M.start = function () {
    wireSearch();
    const page = document.body.dataset.page;
    const render = { index: renderIndex, slot: renderSlot, fact: renderFact, edits: renderEdits }[page];
    render();
    if (page === "slot" || page === "fact") window.addEventListener("hashchange", render);
  };
  return M;
})();
