// The `sepp curate` page: the server holds every decision; this script only shows pages of
// pairs and posts actions. Image ids travel as strings (63-bit ids exceed JavaScript numbers).
// Everything from the data (class names above all: folder names, chosen by whoever made the
// dataset) goes into the page as text nodes, never as HTML. The token lives in an HttpOnly
// cookie the server set: this script never sees it.
"use strict";

const FIELDS = ["lo", "hi", "anchor", "agree", "decision", "sort", "per_page"];
const STORE = "sepp-curate-view";
let view = { page: 0 };
let data = null;
let focus = 0;
let busy = false;

const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const r = await fetch(path, init);
  const out = await r.json().catch(() => ({ error: r.statusText }));
  if (r.status === 401) throw new Error("not signed in: open the URL that `sepp curate` printed");
  if (!r.ok) throw new Error(out.error || r.statusText);
  return out;
}

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function readForm() {
  for (const f of FIELDS) view[f] = $(f).value.trim();
}

function writeForm() {
  for (const f of FIELDS) if (view[f] !== undefined && view[f] !== "") $(f).value = view[f];
}

function query() {
  const p = new URLSearchParams();
  for (const f of FIELDS) if (view[f]) p.set(f, view[f]);
  p.set("page", view.page);
  return p;
}

function showProgress(p) {
  const done = p.accepted + p.rejected;
  const pct = p.total ? ((100 * done) / p.total).toFixed(1) : "0";
  let text = `${done} of ${p.total} decided (${pct}%) · ${p.accepted} accepted · ` +
    `${p.rejected} rejected · ${p.undecided} undecided`;
  if (p.precision !== null && p.precision !== undefined) {
    text += ` · label precision of accepted ${(100 * p.precision).toFixed(1)}%`;
  }
  $("progress").textContent = text;
  $("undo").disabled = !p.can_undo;
}

// an element with a class and children (nodes, or strings that become text nodes)
function h(tag, cls, ...children) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  el.append(...children);
  return el;
}

function figure(role, id, label) {
  const img = h("img");
  img.alt = `${role} ${id}`;
  img.src = `img/${encodeURIComponent(id)}`;
  const text = label === null ? role : `${role} · ${label}`;
  const caption = h("figcaption", "", text);
  caption.title = text; // the whole name on hover; the card cuts it with an ellipsis
  return h("figure", "", img, caption);
}

function card(pair, i) {
  const el = h("div", `pair ${pair.decision}`);
  el.dataset.anchor = pair.anchor;
  el.dataset.positive = pair.positive;
  el.dataset.index = i;
  const meta = h("div", "meta", h("span", "sim", pair.similarity.toFixed(4)));
  if (pair.agree === true) meta.append(h("span", "agree-yes", "same label"));
  if (pair.agree === false) meta.append(h("span", "agree-no", "labels differ"));
  meta.append(h("span", "state", pair.decision));
  const accept = h("button", "accept", "\u2713 accept");
  const reject = h("button", "reject", "\u2717 reject");
  el.append(
    h("div", "imgs", figure("anchor", pair.anchor, pair.label_a),
      figure("positive", pair.positive, pair.label_b)),
    meta,
    h("div", "buttons", accept, reject),
  );
  accept.onclick = () => { focus = i; decide([pair], "accept"); };
  reject.onclick = () => { focus = i; decide([pair], "reject"); };
  el.onclick = (e) => { if (e.target.tagName !== "BUTTON") setFocus(i); };
  return el;
}

function setFocus(i) {
  const cards = document.querySelectorAll(".pair");
  if (!cards.length) return;
  focus = Math.max(0, Math.min(i, cards.length - 1));
  cards.forEach((c, j) => c.classList.toggle("focused", j === focus));
  cards[focus].scrollIntoView({ block: "nearest" });
}

async function load() {
  localStorage.setItem(STORE, JSON.stringify(view));
  try {
    data = await api(`api/pairs?${query()}`);
  } catch (e) {
    status(e.message, true);
    return;
  }
  if (data.pairs.length === 0 && view.page > 0 && data.total > 0) {
    view.page = data.pages - 1;
    return load();
  }
  const grid = $("grid");
  grid.replaceChildren(...data.pairs.map(card));
  $("pageinfo").textContent =
    `page ${data.page + 1} of ${data.pages} · ${data.total} pairs match`;
  $("prev").disabled = data.page === 0;
  $("next").disabled = data.page + 1 >= data.pages;
  showProgress(data.progress);
  document.body.dataset.ready = String(Date.now());
  setFocus(focus);
}

async function act(path, body, what) {
  if (busy) return;
  busy = true;
  try {
    const r = await api(path, body);
    status(`${what}: ${r.changed} pair${r.changed === 1 ? "" : "s"} changed`);
  } catch (e) {
    status(e.message, true);
  } finally {
    busy = false;
  }
  await load();
}

function decide(pairs, decision) {
  const body = { decision, pairs: pairs.map((p) => [p.anchor, p.positive]) };
  const next = pairs.length === 1 ? focus + 1 : 0;
  return act("api/decide", body, decision).then(() => {
    // with a decision filter the decided card leaves the page: stay on the same slot
    setFocus(view.decision && view.decision !== "any" ? focus : next);
  });
}

function decideMatching(decision) {
  readForm();
  const body = { decision, filter: {} };
  for (const f of FIELDS) if (view[f]) body.filter[f] = view[f];
  if (!confirm(`${decision} all ${data ? data.total : ""} pairs matching the filters?`)) return;
  act("api/decide-matching", body, `${decision} all matching`);
}

function page(delta) {
  if (!data) return;
  const p = view.page + delta;
  if (p < 0 || p >= data.pages) return;
  view.page = p;
  focus = 0;
  load();
}

$("filters").onsubmit = (e) => { e.preventDefault(); readForm(); view.page = 0; focus = 0; load(); };
$("accept-page").onclick = () => data && data.pairs.length && decide(data.pairs, "accept");
$("reject-page").onclick = () => data && data.pairs.length && decide(data.pairs, "reject");
$("accept-all").onclick = () => decideMatching("accept");
$("reject-all").onclick = () => decideMatching("reject");
$("undo").onclick = () => act("api/undo", {}, "undo");
$("prev").onclick = () => page(-1);
$("next").onclick = () => page(1);
$("export").onclick = async () => {
  try {
    const m = await api("api/export", {});
    const prec = m.precision === null ? "" : `, label precision ${(100 * m.precision).toFixed(1)}%`;
    status(`exported ${m.counts.exported} pairs to ${m.out}${prec}`);
  } catch (e) {
    status(e.message, true);
  }
};

document.addEventListener("keydown", (e) => {
  if (["INPUT", "SELECT", "TEXTAREA"].includes(e.target.tagName)) return;
  if (e.altKey || e.metaKey) return;
  const pair = data && data.pairs[focus];
  if (e.ctrlKey) {
    if (e.key === "z") { e.preventDefault(); act("api/undo", {}, "undo"); }
    return;
  }
  const k = e.key;
  if (k === "A") $("accept-page").click();
  else if (k === "R") $("reject-page").click();
  else if (k === "a" && pair) decide([pair], "accept");
  else if ((k === "r" || k === "x") && pair) decide([pair], "reject");
  else if (k === "u") act("api/undo", {}, "undo");
  else if (k === "ArrowRight" || k === "j") setFocus(focus + 1);
  else if (k === "ArrowLeft" || k === "k") setFocus(focus - 1);
  else if (k === "n") page(1);
  else if (k === "p") page(-1);
  else return;
  e.preventDefault();
});
window.addEventListener("focus", () => load());

(async () => {
  try {
    view = { page: 0, ...JSON.parse(localStorage.getItem(STORE) || "{}") };
  } catch (e) {
    view = { page: 0 };
  }
  writeForm();
  try {
    const info = await api("api/info");
    $("source").textContent = `${info.pairs} · ${info.user}`;
    $("export").title = `writes ${info.export}`;
  } catch (e) {
    status(e.message, true);
  }
  load();
})();
