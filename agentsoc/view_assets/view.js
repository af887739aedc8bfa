// agentsoc view: the run browser. Plain JS, no framework, no network.
// Model text is untrusted: every string reaches the page through textContent (el() below), never
// innerHTML. The problem list is rendered one page at a time and a problem's detail only on click,
// so a run of thousands of debates opens quickly.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("data").textContent);
  const S = D.S;
  const WRONG = 1, CHANGED = 2, DISAGREE = 4, UNPARSABLE = 8;
  const PAGE = 50;
  const SMALL_N = 20;
  const SVG = "http://www.w3.org/2000/svg";

  // el("td", {class: "x"}, "text", child) — strings become text nodes, never markup
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "onclick" || k === "oninput" || k === "onchange" || k === "ontoggle") e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const k of kids.flat()) {
      if (k === null || k === undefined || k === false) continue;
      e.appendChild(typeof k === "object" ? k : document.createTextNode(String(k)));
    }
    return e;
  }
  function table(header, rows) {
    return el("table", {}, el("thead", {}, el("tr", {}, header.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => (c instanceof Node && c.nodeName === "TD") ? c : el("td", {}, c))))));
  }
  const pct = (x) => (100 * x).toFixed(2);
  // a score, or why it cannot be judged: with fewer than 20 problems a ± SE reads as certainty it is not
  function score(s) {
    if (!s) return "–";
    if (s.n < SMALL_N) return `${pct(s.a)} (${Math.round(s.a * s.n)}/${s.n}; n < ${SMALL_N}: too small to judge)`;
    return `${pct(s.a)} ± ${pct(s.se)}`;
  }
  const answer = (a) => (a === null || a === undefined ? "∅ (none)" : a);
  function mark(ok) { return ok === true ? "✓" : ok === false ? "✗" : "·"; }
  function okClass(ok) { return ok === true ? "ok" : ok === false ? "bad" : ""; }
  const multi = D.runs.length > 1;
  const runLabel = (k) => D.runs[k].label;

  // ---------------------------------------------------------------- header and routing
  document.getElementById("title").textContent = `agentsoc view — ${D.title}`;
  if (D.mock) document.getElementById("banner").textContent = D.mock;
  const main = document.getElementById("main");
  const state = { split: "held-out", run: "all", scope: "last", agent: "any", flags: {}, search: "", page: 0 };

  function route() {
    const h = location.hash.replace(/^#/, "");
    const tab = h.startsWith("problem/") ? "problems" : (h || "summary");
    for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.tab === tab);
    main.replaceChildren();
    window.scrollTo(0, 0);
    if (h.startsWith("problem/")) detail(Number(h.slice(8)));
    else if (tab === "problems") problemsView();
    else if (tab === "training") trainingView();
    else summaryView();
  }
  window.addEventListener("hashchange", route);

  // ---------------------------------------------------------------- summary
  function summaryView() {
    main.appendChild(el("p", { class: "muted small" }, `generated ${D.generated} · ${D.problems.length} problems · ` +
      D.runs.map((r) => `${r.label}: ${r.task}, ${r.backend}, ${r.shape}`).join(" · ")));
    if (D.kind === "compare") compareTable();
    for (const r of D.runs) {
      main.appendChild(el("h2", {}, multi ? `Per iteration — ${r.label}` : "Per iteration"));
      main.appendChild(runTable(r));
      const small = r.summary.rows.some((x) => x.debate && x.debate.n < SMALL_N);
      main.appendChild(el("p", { class: "small muted" },
        "Accuracy (%) ± standard error on the held-out problems; 'vote round 0' is the Majority of the agents." +
        (small ? ` Fewer than ${SMALL_N} held-out problems: the sample is too small to judge a difference.` : "")));
      main.appendChild(el("h3", {}, "Settings that differ from the paper"));
      main.appendChild(r.deviations.length ? el("ul", {}, r.deviations.map((d) => el("li", {}, d))) : el("p", {}, "none: every switch is at the paper's setting"));
      main.appendChild(el("details", {}, el("summary", {}, "the resolved recipe"), el("pre", { class: "prompt" }, r.recipe)));
    }
    if (D.notes.length) main.appendChild(el("ul", { class: "small muted" }, D.notes.map((n) => el("li", {}, n))));
    main.appendChild(el("h2", {}, "Plots"));
    if (!D.plots.length) main.appendChild(el("p", { class: "muted" }, "no plots in this folder (agentsoc report DIR draws them)"));
    for (const p of D.plots) {
      const img = el("img", { class: "plot", alt: p.name, title: p.name });
      img.src = p.uri;  // a data: URI of our own PNG
      main.appendChild(img);
    }
  }
  function compareTable() {
    main.appendChild(el("h2", {}, "Methods (final vote after the last iteration)"));
    const rows = D.runs.map((r) => {
      const scored = r.summary.rows.filter((x) => x.debate);
      const last = scored[scored.length - 1];
      return [r.label, score(last && last.debate), String(last ? last.it : 0), delta(r.vs_reference), "transcripts below"];
    });
    for (const m of D.missing) rows.push([m.label, m.score ? score({ a: m.score.accuracy, se: m.score.se, n: m.score.n }) : "–",
      String(m.iterations ?? "–"), delta(m.vs_reference), `run directory ${m.run_dir}/ not here: scores only`]);
    main.appendChild(table(["method", "accuracy ± SE", "iterations", `paired Δ vs ${D.reference || "reference"}`, "data"], rows));
  }
  function delta(vs) {
    if (!vs) return "–";
    return `${vs.diff >= 0 ? "+" : ""}${pct(vs.diff)} ± ${pct(vs.se)} (+${vs.a_only}/−${vs.b_only})`;
  }
  function runTable(r) {
    const nr = Math.max(0, ...r.summary.rows.map((x) => x.rounds.length));
    const header = ["iter", "debate (final vote)", ...Array.from({ length: nr }, (_, m) => `vote round ${m}`),
      "single agent", "answer diversity", "vote = truth (train)", "examples per agent", "cut / left out by max_seq_len", "wall time (min)"];
    const rows = r.summary.rows.map((x) => {
      const sizes = ["generator", "critic"].map((role) => {
        const s = x.sizes.filter((d) => d[1] === role).map((d) => d[2]);
        return s.length ? `${role.slice(0, 3)} ${s.join("/")}` : "";
      }).filter(Boolean).join("  ") || "–";
      return [String(x.it), score(x.debate), ...Array.from({ length: nr }, (_, m) => score(x.rounds[m])), score(x.single),
        x.diversity === null ? "–" : x.diversity.toFixed(3), score(x.label), sizes,
        x.lost[0] ? `${x.lost[1]} / ${x.lost[2]} of ${x.lost[0]}` : "–",
        Object.entries(x.wall).map(([k, v]) => `${k} ${(v / 60).toFixed(1)}`).join("  ") || "–"];
    });
    const t = table(header, rows);
    t.classList.add("nowrap");
    return t;
  }

  // ---------------------------------------------------------------- problem list
  const haystack = new Map();  // problem index -> lower-case searchable text, built on first search
  function textOf(i) {
    let t = haystack.get(i);
    if (t === undefined) {
      const p = D.problems[i];
      const parts = [p.id, S[p.q], p.truth || ""];
      for (const c of p.cells) {
        parts.push(c.vote || "");
        for (const a of c.agents) for (const r of a.resp) parts.push(S[r]);
      }
      t = parts.join("\n").toLowerCase();
      haystack.set(i, t);
    }
    return t;
  }
  function scoped(p) {
    let cells = p.cells.filter((c) => state.run === "all" || c.run === Number(state.run));
    if (state.scope === "last") {
      const last = new Map();
      for (const c of cells) if (!last.has(c.run) || last.get(c.run).it < c.it) last.set(c.run, c);
      cells = [...last.values()];
    } else if (state.scope !== "any") cells = cells.filter((c) => c.it === Number(state.scope));
    return cells;
  }
  function matches(i) {
    const p = D.problems[i];
    if (state.split !== "all" && p.split !== state.split) return false;
    const f = state.flags;
    const active = Object.keys(f).filter((k) => f[k]);
    if (active.length) {
      const agentOk = (list) => list.length > 0 && (state.agent === "any" || list.includes(Number(state.agent)));
      const hit = scoped(p).some((c) => active.every((k) => {
        if (k === "wrong") return (c.flags & WRONG) !== 0;
        if (k === "changed") return (c.flags & CHANGED) !== 0;
        if (k === "disagree") return (c.flags & DISAGREE) !== 0;
        if (k === "unparsable") return (c.flags & UNPARSABLE) !== 0;
        if (k === "rw") return agentOk(c.rw);
        if (k === "wr") return agentOk(c.wr);
        return true;
      }));
      if (!hit) return false;
    }
    if (state.search) {
      const words = state.search.toLowerCase().split(/\s+/).filter(Boolean);
      const t = textOf(i);
      if (!words.every((w) => t.includes(w))) return false;
    }
    return true;
  }
  function select(id, value, options, onchange) {
    const s = el("select", { id, onchange: (e) => onchange(e.target.value) }, options.map(([v, label]) => el("option", { value: v }, label)));
    s.value = value;
    return s;
  }
  function problemsView() {
    const its = [...new Set(D.problems.flatMap((p) => p.cells.map((c) => c.it)))].sort((a, b) => a - b);
    const nAgents = Math.max(1, ...D.runs.map((r) => r.agents));
    const redraw = () => { state.page = 0; drawList(); };
    const box = (key, label) => el("label", {}, el("input", { type: "checkbox", id: `f-${key}`, checked: !!state.flags[key],
      onchange: (e) => { state.flags[key] = e.target.checked; redraw(); } }), " ", label);
    const controls = el("div", { class: "controls" },
      el("label", {}, "problems ", select("split", state.split, [["held-out", "held-out"], ["train", "training"], ["all", "all"]], (v) => { state.split = v; redraw(); })),
      multi ? el("label", {}, "method ", select("run", state.run, [["all", "all methods"], ...D.runs.map((r, k) => [String(k), r.label])], (v) => { state.run = v; redraw(); })) : null,
      el("label", {}, "filters look at ", select("scope", state.scope, [["last", "the last iteration"], ["any", "any iteration"], ...its.map((i) => [String(i), `iteration ${i}`])], (v) => { state.scope = v; redraw(); })),
      box("wrong", "wrong final answer"), box("changed", "critics changed the vote"),
      box("rw", "right→wrong"), box("wr", "wrong→right"),
      el("label", {}, "of agent ", select("agent", state.agent, [["any", "any"], ...Array.from({ length: nAgents }, (_, n) => [String(n), String(n)])], (v) => { state.agent = v; redraw(); })),
      box("disagree", "agents disagree"), box("unparsable", "unparsable / abstained"),
      el("input", { type: "search", id: "search", placeholder: "search question, answers, replies", value: state.search,
        oninput: (e) => { state.search = e.target.value; redraw(); } }));
    main.appendChild(controls);
    main.appendChild(el("div", { id: "count", class: "muted" }));
    main.appendChild(el("div", { id: "listbox" }));
    drawList();
  }
  function drawList() {
    const hits = [];
    for (let i = 0; i < D.problems.length; i++) if (matches(i)) hits.push(i);
    const pages = Math.max(1, Math.ceil(hits.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    const shown = hits.slice(state.page * PAGE, (state.page + 1) * PAGE);
    document.getElementById("count").textContent = `${hits.length} of ${D.problems.length} problems`;
    const runs = state.run === "all" ? D.runs.map((_, k) => k) : [Number(state.run)];
    const header = ["problem", "split", "question", "truth", ...runs.map((k) => multi ? `${runLabel(k)}: vote per iteration` : "vote per iteration")];
    const rows = shown.map((i) => {
      const p = D.problems[i];
      const tr = el("tr", { "data-index": i, onclick: () => { location.hash = `problem/${i}`; } },
        el("td", {}, p.id), el("td", {}, p.split), el("td", { class: "q", title: S[p.q] }, S[p.q]), el("td", {}, answer(p.truth)),
        runs.map((k) => el("td", {}, p.cells.filter((c) => c.run === k).map((c) =>
          el("span", { class: `chip ${okClass(c.ok)}`, title: `iteration ${c.it}` }, `it${c.it} ${mark(c.ok)} ${answer(c.vote)}`)))));
      return tr;
    });
    const t = el("table", { id: "list" }, el("thead", {}, el("tr", {}, header.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
    const pager = el("div", { class: "pager" },
      el("button", { id: "prev", disabled: state.page === 0, onclick: () => { state.page--; drawList(); } }, "← previous"),
      el("span", {}, `page ${state.page + 1} of ${pages}`),
      el("button", { id: "next", disabled: state.page >= pages - 1, onclick: () => { state.page++; drawList(); } }, "next →"));
    document.getElementById("listbox").replaceChildren(t, pager);
  }

  // ---------------------------------------------------------------- one problem
  function reply(text, hl) {
    const pre = el("pre", { class: "reply" });
    if (hl) pre.append(text.slice(0, hl[0]), el("mark", {}, text.slice(hl[0], hl[1])), text.slice(hl[1]));
    else pre.append(text);
    return pre;
  }
  const SEL = { G: "D^G (round-0 answer = vote)", "C-": "D^C− (corrected to the vote)", "C+": "D^C+ (drawn)", "c+": "D^C+ (not drawn by the w mix)" };
  function detail(i) {
    const p = D.problems[i];
    if (!p) { main.appendChild(el("p", {}, "no such problem")); return; }
    main.appendChild(el("a", { href: "#problems", class: "back", id: "back" }, "← back to the list"));
    main.appendChild(el("h2", { id: "problem-title" }, `${p.id} (${p.split})`));
    main.appendChild(el("pre", { class: "prompt", id: "question" }, S[p.q]));
    main.appendChild(el("p", {}, "ground truth: ", el("b", {}, answer(p.truth))));
    for (const c of p.cells) {
      const block = el("div", { class: "block" });
      block.appendChild(el("h3", {}, `${multi ? runLabel(c.run) + " · " : ""}iteration ${c.it} · vote `,
        el("span", { class: okClass(c.ok) }, `${answer(c.vote)} ${mark(c.ok)}`), c.tie ? " (tie broken by seeded draw)" : ""));
      const notes = [];
      if (c.rounds.length) notes.push(`vote per round: ${c.rounds.map((v, m) => `round ${m}: ${answer(v)}`).join(", ")}`);
      notes.push(`clusters: ${c.clusters.map(([a, m]) => `${a} ← agents ${m.join(",")}`).join("; ") || "none"}`);
      if (c.rw.length) notes.push(`right→wrong: agent ${c.rw.join(", ")}`);
      if (c.wr.length) notes.push(`wrong→right: agent ${c.wr.join(", ")}`);
      block.appendChild(el("p", { class: "small muted" }, notes.join(" · ")));
      const n = c.agents.length;
      const grid = el("div", { class: "grid", style: `grid-template-columns: repeat(${n}, minmax(0, 1fr))` });
      const rounds = Math.max(...c.agents.map((a) => a.resp.length));
      for (let m = 0; m < rounds; m++) {
        c.agents.forEach((a, k) => {
          if (m >= a.resp.length) { grid.appendChild(el("div")); return; }
          const turn = el("div", { class: "turn" },
            el("h4", {}, `agent ${k} · round ${m} · ${S[a.model[m]]}`),
            m > 0 ? el("details", {}, el("summary", {}, "what the critic read"), el("pre", { class: "prompt" }, S[a.prompt[m]])) : null,
            reply(S[a.resp[m]], a.hl[m]),
            el("div", {}, "parsed: ", el("span", { class: `chip ${okClass(a.ok[m])}` }, answer(a.ans[m]))));
          grid.appendChild(turn);
        });
      }
      block.appendChild(grid);
      if (c.agents.some((a) => a.sel !== null)) {
        block.appendChild(el("p", { class: "small" }, "selected for training: ",
          c.agents.map((a, k) => el("span", { class: "chip" }, `agent ${k}: ${a.sel ? a.sel.split(" ").map((t) => SEL[t] || t).join(", ") : "nothing"}`))));
      }
      main.appendChild(block);
    }
  }

  // ---------------------------------------------------------------- training data
  function lossCurve(losses) {
    const w = 220, h = 60, pad = 4;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "loss");
    svg.setAttribute("width", w);
    svg.setAttribute("height", h);
    const lo = Math.min(...losses), hi = Math.max(...losses);
    const pts = losses.map((v, k) => {
      const x = pad + (losses.length === 1 ? 0 : (k * (w - 2 * pad)) / (losses.length - 1));
      const y = pad + (hi === lo ? (h - 2 * pad) / 2 : ((hi - v) * (h - 2 * pad)) / (hi - lo));
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    }).join(" ");
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", pts);
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", "#0969da");
    line.setAttribute("stroke-width", "1.5");
    svg.appendChild(line);
    const title = document.createElementNS(SVG, "title");
    title.textContent = `loss ${losses[0].toFixed(3)} → ${losses[losses.length - 1].toFixed(3)} over ${losses.length} steps`;
    svg.appendChild(title);
    return el("span", {}, svg, el("div", { class: "small muted" }, title.textContent));
  }
  function selectedProblems(k, it, agent, role) {
    const out = [];
    D.problems.forEach((p, i) => {
      if (p.split !== "train") return;
      for (const c of p.cells) {
        if (c.run !== k || c.it !== it || !c.agents[agent] || !c.agents[agent].sel) continue;
        const tags = c.agents[agent].sel.split(" ").filter((t) => role === "generator" ? t === "G" : t !== "G");
        if (tags.length) out.push([i, p.id, tags]);
      }
    });
    return out;
  }
  function trainingView() {
    if (!D.runs.some((r) => r.training.length)) main.appendChild(el("p", {}, "no finetuning in this run"));
    D.runs.forEach((r, k) => {
      for (const t of r.training) {
        main.appendChild(el("h2", {}, `${multi ? r.label + " · " : ""}iteration ${t.it}`));
        if (t.label) main.appendChild(el("p", { class: "small" }, `training votes that match the ground truth (diagnostics only): ${score(t.label)}`));
        main.appendChild(table(["agent", "role", "examples", "D^C− (corrected)", "D^C+ drawn / available", "file", "selected problems (why)"],
          t.datasets.map((d) => {
            const det = el("details", {}, el("summary", {}, "show"));
            det.addEventListener("toggle", () => {
              if (!det.open || det.dataset.done) return;
              det.dataset.done = "1";
              const items = selectedProblems(k, t.it, d.agent, d.role);
              det.appendChild(items.length ? el("div", {}, items.map(([i, id, tags]) =>
                el("div", {}, el("a", { href: `#problem/${i}` }, id), " ", tags.map((x) => SEL[x] || x).join(", ")))) :
                el("div", { class: "muted" }, "none"));
            });
            return [String(d.agent), d.role, String(d.size), d.minus ?? "–",
              d.plus_used === null ? "–" : `${d.plus_used} / ${d.plus_available}`, d.path, el("td", {}, det)];
          })));
        if (t.jobs.length) {
          main.appendChild(el("h3", {}, "jobs"));
          main.appendChild(table(["job", "state", "examples", "cut by max_seq_len", "left out", "result / error", "loss"],
            t.jobs.map((j) => [j.key, el("td", { class: j.state === "succeeded" ? "ok" : j.state === "failed" ? "bad" : "" }, j.state),
              j.examples ?? "–", j.cut ?? "–", j.dropped ?? "–", j.result || j.error || "–",
              el("td", {}, j.losses.length ? lossCurve(j.losses) : "not reported")])));
        }
      }
    });
  }

  route();
  document.body.dataset.ready = "1";
})();
