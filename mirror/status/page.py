"""The status page: one self-contained HTML document (inline style and script, no assets).

It works in an air-gapped cluster: nothing is loaded from anywhere but the node itself. It asks
`mirror/v1/status` (relative, so it also works behind `kubectl proxy` or any path prefix) every
2 seconds and renders each section with DOM calls only (no `innerHTML` with data, so image names
and error messages cannot inject markup). The measure form posts to `mirror/v1/measure`.

Element ids the tests read: `node`, `peers`, `images`, `pulls`, `upstream`, `pins`,
`distributions`, `measure-result`; `body[data-state]` is `live` once a report was rendered.
"""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mirror status</title>
<style>
:root {
  --bg: #f5f6f8; --card: #fff; --ink: #1d2330; --muted: #697386; --line: #e3e6ec;
  --head: #1f2a44; --local: #1f8f4e; --peer: #2463c7; --upstream: #b86b00; --none: #8a93a3;
  --bad: #c62f2f; --bar: #e8ebf0;
}
* { box-sizing: border-box; }
body {
  margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
}
header {
  background: var(--head); color: #fff; padding: 12px 24px; display: flex; gap: 16px;
  align-items: baseline; flex-wrap: wrap;
}
header h1 { font-size: 18px; margin: 0; letter-spacing: .02em; }
header .where { font-family: ui-monospace, "DejaVu Sans Mono", monospace; opacity: .9; }
header .state { margin-left: auto; font-size: 13px; opacity: .85; }
header .state.error { color: #ffb4b4; opacity: 1; }
main { max-width: 1500px; margin: 0 auto; padding: 16px 24px 40px; }
section {
  background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 16px; margin-bottom: 16px;
}
section h2 { font-size: 15px; margin: 0 0 8px; display: flex; gap: 8px; align-items: baseline; }
section h2 .count { color: var(--muted); font-weight: normal; font-size: 13px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 8px; }
.fact { border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; min-width: 0; }
.fact .label { color: var(--muted); font-size: 12px; }
.fact .value { font-weight: 600; overflow-wrap: anywhere; }
.columns { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
@media (max-width: 1100px) { .columns { grid-template-columns: 1fr; } }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line); }
th { color: var(--muted); font-weight: 600; font-size: 12px; white-space: nowrap; }
td.num, th.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.ref { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px;
  overflow-wrap: anywhere; }
td.empty { color: var(--muted); font-style: italic; }
td.nowrap, td.ref.nowrap { white-space: nowrap; overflow-wrap: normal; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px;
  color: #fff; background: var(--none); white-space: nowrap; }
.badge.local, .badge.held, .badge.ok { background: var(--local); }
.badge.peer, .badge.fetching { background: var(--peer); }
.badge.upstream, .badge.waiting { background: var(--upstream); }
.badge.failed, .badge.bad { background: var(--bad); }
.error { color: var(--bad); }
.muted { color: var(--muted); }
.bar { position: relative; background: var(--bar); border-radius: 4px; height: 16px;
  min-width: 140px; overflow: hidden; }
.bar .fill { position: absolute; inset: 0 auto 0 0; background: #a9c4f0; }
.bar .fill.done { background: #a6dcb9; }
.bar .fill.failed { background: #f0b0b0; }
.bar .text { position: relative; font-size: 11px; padding-left: 6px; line-height: 16px; }
form { display: flex; gap: 8px; margin-bottom: 8px; flex-wrap: wrap; }
form input { flex: 1; min-width: 260px; padding: 6px 8px; border: 1px solid var(--line);
  border-radius: 6px; font: inherit; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
form button { padding: 6px 14px; border: 0; border-radius: 6px; background: var(--head);
  color: #fff; font: inherit; cursor: pointer; }
form button:disabled { opacity: .5; cursor: wait; }
</style>
</head>
<body data-state="loading">
<header>
  <h1>mirror</h1>
  <span class="where" id="where">&hellip;</span>
  <span class="state" id="state">loading&hellip;</span>
</header>
<main>
<section><h2>This node</h2><div class="grid" id="node"></div></section>
<div class="columns">
<section><h2>Peers <span class="count" id="peers-count"></span></h2>
<table><thead><tr><th>address</th><th>router</th><th class="num">last seen</th>
<th class="num">round trip</th><th class="num">uploads</th><th class="num">throughput</th>
</tr></thead><tbody id="peers"></tbody></table></section>
<section><h2>Holdings <span class="count" id="images-count"></span></h2>
<table><thead><tr><th>image</th><th>digest</th><th class="num">size</th></tr></thead>
<tbody id="images"></tbody></table></section>
</div>
<section><h2>Recent pulls <span class="count" id="pulls-count"></span></h2>
<table><thead><tr><th class="num">when</th><th>request</th><th>ref</th><th>source</th>
<th>peer</th><th>client</th><th class="num">status</th><th class="num">bytes</th>
<th class="num">time</th></tr></thead><tbody id="pulls"></tbody></table></section>
<div class="columns">
<section><h2>Pins <span class="count" id="pins-count"></span></h2>
<table><thead><tr><th>image</th><th>state</th><th>progress</th><th>layers</th></tr></thead>
<tbody id="pins"></tbody></table></section>
<section><h2>Distributions <span class="count" id="distributions-count"></span></h2>
<table><thead><tr><th>image</th><th>nodes</th><th>bytes</th><th class="num">started</th>
</tr></thead><tbody id="distributions"></tbody></table></section>
</div>
<section><h2>Upstream registries</h2>
<table><thead><tr><th>registry</th><th>health</th><th class="num">last success</th>
<th class="num">last error</th><th>error</th></tr></thead><tbody id="upstream"></tbody></table>
</section>
<section><h2>Measure a pull</h2>
<form id="measure-form">
<input id="measure-ref" name="ref" placeholder="registry/repository:tag" autocomplete="off"
  spellcheck="false" required>
<button type="submit" id="measure-button">Measure</button>
</form>
<div class="muted" id="measure-note">Pulls the image through this node (manifest, then every
blob of this node's platform, read and dropped) and shows where each part came from and how
long it took. What it fetches stays in the node cache, as after any pull.</div>
<table><thead><tr><th>step</th><th>digest</th><th class="num">size</th><th>source</th>
<th class="num">time</th><th class="num">rate</th><th>error</th></tr></thead>
<tbody id="measure-result"><tr><td class="empty" colspan="7">no pull measured yet</td></tr>
</tbody></table>
</section>
</main>
<script>
"use strict";
const REFRESH_MS = 2000;
let lastReport = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "title") node.title = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
function fill(id, rows, columns, emptyText) {
  const body = document.getElementById(id);
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", {class: "empty", colspan: columns}, emptyText)));
    return;
  }
  body.replaceChildren(...rows);
}
function count(id, text) { document.getElementById(id + "-count").textContent = text; }
function bytes(n) {
  if (n === null || n === undefined) return "\\u2013";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
  return (unit ? value.toFixed(value < 10 ? 2 : 1) : value) + " " + units[unit];
}
function seconds(s) {
  if (s === null || s === undefined) return "\\u2013";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms";
  if (s < 120) return s.toFixed(2) + " s";
  return duration(s);
}
function duration(s) {
  s = Math.max(0, Math.floor(s));
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
  const m = Math.floor(s % 3600 / 60), r = s % 60;
  if (d) return d + "d " + h + "h";
  if (h) return h + "h " + m + "m";
  if (m) return m + "m " + r + "s";
  return r + "s";
}
function ago(at, now) {
  if (at === null || at === undefined) return "never";
  return duration(now - at) + " ago";
}
function shortRef(ref) {
  const at = ref.indexOf("@");
  return at < 0 ? ref : ref.slice(0, at + 1) + shortDigest(ref.slice(at + 1)) + "\\u2026";
}
function shortDigest(digest) {
  if (!digest) return "\\u2013";
  const [algorithm, hex] = digest.split(":");
  return hex ? algorithm + ":" + hex.slice(0, 12) : digest;
}
function badge(text, kind) { return el("span", {class: "badge " + (kind || text)}, text); }
function bar(done, total, state) {
  const share = total > 0 ? Math.min(1, done / total) : (state === "held" ? 1 : 0);
  const fillClass = state === "failed" ? "fill failed" : share >= 1 ? "fill done" : "fill";
  const fillNode = el("div", {class: fillClass});
  fillNode.style.width = (share * 100).toFixed(1) + "%";
  const label = total > 0 ? bytes(done) + " of " + bytes(total) + " \\u00b7 " +
    Math.floor(share * 100) + "%" : state || "";
  return el("div", {class: "bar"}, fillNode, el("span", {class: "text"}, label));
}
function fact(label, value, title) {
  return el("div", {class: "fact"}, el("div", {class: "label"}, label),
    el("div", {class: "value", title: title || ""}, value));
}

function renderNode(report) {
  const node = report.node, holdings = report.holdings;
  document.getElementById("where").textContent = node.address + " \\u00b7 " + node.store;
  const cache = node.cache;
  let cacheNode = "\\u2013";
  if (cache) {
    cacheNode = cache.max_bytes ? bar(cache.bytes, cache.max_bytes, "") : bytes(cache.bytes);
  }
  const keys = holdings.announced_keys || {};
  document.getElementById("node").replaceChildren(
    fact("node id", node.id ? node.id.slice(0, 16) + "\\u2026" : "alone (no cluster key)",
      node.id || ""),
    fact("address", node.address),
    fact("store", node.store + (node.runtime ? " \\u00b7 pins in " + node.runtime : "")),
    fact("platform", node.platform),
    fact("version", node.version),
    fact("uptime", duration(node.uptime_seconds)),
    fact("node cache", cacheNode),
    fact("keys announced", (keys.digest || 0) + " digests, " + (keys.tag || 0) + " tags"),
    fact("metrics", node.metrics_addr),
    fact("router", node.router_addr || "\\u2013"),
  );
}
function renderPeers(report, now) {
  const rows = report.peers.map(peer => el("tr", {},
    el("td", {class: "ref", title: peer.id}, peer.address || "(not fetched from yet)"),
    el("td", {class: "ref"}, peer.router || "\\u2013"),
    el("td", {class: "num"}, ago(peer.last_seen, now)),
    el("td", {class: "num"}, peer.rtt_ms === null ? "\\u2013" : peer.rtt_ms.toFixed(2) + " ms"),
    el("td", {class: "num"}, peer.uploads === null ? "\\u2013" : peer.uploads),
    el("td", {class: "num"}, peer.throughput ? bytes(peer.throughput) + "/s" : "\\u2013"),
  ));
  count("peers", report.peers.length);
  fill("peers", rows, 6, report.node.id ? "no peers known yet" : "running alone");
}
function renderImages(report) {
  const holdings = report.holdings;
  const rows = holdings.images.map(image => el("tr", {},
    el("td", {class: "ref"}, image.ref),
    el("td", {class: "ref", title: image.digest}, shortDigest(image.digest)),
    el("td", {class: "num", title: image.platform || ""}, bytes(image.size)),
  ));
  count("images", holdings.images_total + (holdings.images_total === 1 ? " image" : " images"));
  fill("images", rows, 3, holdings.error ? "store error: " + holdings.error : "no images held");
}
function renderPulls(report, now) {
  const rows = report.pulls.map(pull => el("tr", {},
    el("td", {class: "num", title: new Date(pull.at * 1000).toISOString()}, ago(pull.at, now)),
    el("td", {class: "nowrap"}, pull.method + " " + pull.kind),
    el("td", {class: "ref", title: pull.ref || pull.digest || ""},
      pull.ref ? shortRef(pull.ref) : shortDigest(pull.digest)),
    el("td", {}, badge(pull.source)),
    el("td", {class: "ref nowrap"}, pull.peer || ""),
    el("td", {class: "ref nowrap"}, (pull.caller || "") + (pull.client ? " " + pull.client : "")),
    el("td", {class: "num" + (pull.status >= 400 ? " error" : "")}, pull.status),
    el("td", {class: "num"}, bytes(pull.bytes)),
    el("td", {class: "num"}, seconds(pull.seconds)),
  ));
  count("pulls", report.pulls.length ? "last " + report.pulls.length : "");
  fill("pulls", rows, 9, "no pulls since the node started");
}
function renderUpstream(report, now) {
  const rows = report.upstream.map(entry => el("tr", {},
    el("td", {class: "ref nowrap"}, entry.registry),
    el("td", {}, entry.healthy ? badge("ok") : badge("failing", "bad")),
    el("td", {class: "num"}, ago(entry.last_success, now)),
    el("td", {class: "num"}, ago(entry.last_error, now)),
    el("td", {class: "error"}, entry.error || ""),
  ));
  fill("upstream", rows, 5, "no upstream registry asked yet");
}
function renderPins(report) {
  const rows = report.pins.map(pin => {
    const size = pin.bytes || {}, layers = pin.layers || {};
    return el("tr", {},
      el("td", {class: "ref", title: pin.digest || ""}, pin.ref),
      el("td", {}, badge(pin.state), pin.error ? el("div", {class: "error"}, pin.error) : null),
      el("td", {}, bar(size.done || 0, size.total || 0, pin.state)),
      el("td", {class: "num"}, (layers.done || 0) + " / " + (layers.total || 0)),
    );
  });
  count("pins", report.pins.length);
  fill("pins", rows, 4, "no images pinned on this node");
}
function renderDistributions(report, now) {
  const rows = report.distributions.map(item => {
    const nodes = item.nodes || {}, totals = item.bytes || {};
    let done = 0, total = 0;
    for (const progress of Object.values(item.by_node || {})) {
      done += (progress.bytes || {}).done || 0;
      total += (progress.bytes || {}).total || 0;
    }
    const state = nodes.failed ? "failed" : item.complete ? "held" : "";
    const nodeBar = bar(nodes.done || 0, nodes.total || 0, state);
    nodeBar.lastChild.textContent = (nodes.done || 0) + " of " + (nodes.total || 0) +
      " held" + (nodes.failed ? ", " + nodes.failed + " failed" : "");
    return el("tr", {},
      el("td", {class: "ref", title: item.digest || ""}, item.ref),
      el("td", {}, nodeBar),
      el("td", {title: "upstream " + bytes(totals.upstream) + ", peers " + bytes(totals.peers)},
        bar(done, total, state)),
      el("td", {class: "num"}, ago(item.started, now)),
    );
  });
  count("distributions", report.distributions.length);
  fill("distributions", rows, 4, "no distribution known here");
}
function render(report) {
  const now = report.generated_at;
  renderNode(report);
  renderPeers(report, now);
  renderImages(report);
  renderPulls(report, now);
  renderUpstream(report, now);
  renderPins(report);
  renderDistributions(report, now);
}

async function refresh() {
  const state = document.getElementById("state");
  try {
    const response = await fetch("mirror/v1/status", {cache: "no-store"});
    if (!response.ok) throw new Error("the node answered " + response.status);
    lastReport = await response.json();
    render(lastReport);
    state.className = "state";
    state.textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.state = "live";
  } catch (error) {
    state.className = "state error";
    state.textContent = "no answer from the node: " + error.message +
      (lastReport ? " (showing the last report)" : "");
    document.body.dataset.state = lastReport ? "stale" : "error";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

async function measure(event) {
  event.preventDefault();
  const button = document.getElementById("measure-button");
  const note = document.getElementById("measure-note");
  const ref = document.getElementById("measure-ref").value.trim();
  if (!ref) return;
  button.disabled = true;
  note.className = "muted";
  note.textContent = "measuring " + ref + "\\u2026";
  try {
    const response = await fetch("mirror/v1/measure", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({ref: ref}),
    });
    const answer = await response.json();
    if (!response.ok) {
      const errors = answer.errors || [];
      throw new Error(errors.length ? errors[0].message : "the node answered " + response.status);
    }
    showMeasure(answer);
  } catch (error) {
    note.className = "error";
    note.textContent = "could not measure " + ref + ": " + error.message;
  } finally {
    button.disabled = false;
  }
}
function showMeasure(answer) {
  const rows = answer.steps.map(step => el("tr", {},
    el("td", {}, step.kind),
    el("td", {class: "ref", title: step.digest}, shortDigest(step.digest)),
    el("td", {class: "num"}, bytes(step.size)),
    el("td", {}, step.source ? badge(step.source) : "\\u2013"),
    el("td", {class: "num"}, seconds(step.seconds)),
    el("td", {class: "num"}, step.seconds > 0 && step.bytes > 0 ?
      bytes(step.bytes / step.seconds) + "/s" : "\\u2013"),
    el("td", {class: "error"}, step.error || ""),
  ));
  const sources = Object.entries(answer.by_source)
    .map(([source, n]) => source + " " + bytes(n)).join(", ");
  rows.push(el("tr", {},
    el("td", {}, el("strong", {}, "total")), el("td", {}, ""),
    el("td", {class: "num"}, bytes(answer.total_bytes)), el("td", {}, sources),
    el("td", {class: "num"}, el("strong", {}, seconds(answer.total_seconds))),
    el("td", {class: "num"}, answer.total_seconds > 0 ?
      bytes(answer.total_bytes / answer.total_seconds) + "/s" : "\\u2013"),
    el("td", {class: answer.ok ? "" : "error"}, answer.ok ? "" : "incomplete"),
  ));
  fill("measure-result", rows, 7, "");
  const note = document.getElementById("measure-note");
  note.className = "muted";
  note.textContent = answer.ref + " \\u2192 " + shortDigest(answer.digest) + " (" +
    answer.platform + ")" + (answer.through ? ", answered from " + answer.through : "");
}

document.getElementById("measure-form").addEventListener("submit", measure);
refresh();
</script>
</body>
</html>
"""
