"""The gang report as one self-contained HTML page: inline CSS, JS and SVG, nothing fetched.

The data travels as JSON inside the page; a small script draws the timeline (one SVG
track per rank: a bar per collective wait, from the rank's arrival to the round's
completion, a red tick where the rank arrived last) and the per-rank table. The
summary is in the page as text too (``<noscript>``), so it reads without JS.

Example:
    >>> page = render_page("gang ab", "no straggler", {"ranks": [], "rounds": [], "total_rounds": 0})
    >>> page.startswith("<!DOCTYPE html>") and "no straggler" in page
    True
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["render_page"]

_STYLE = """
body { font: 13px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px 24px; color: #222; }
h1 { font-size: 17px; margin: 0 0 8px; }
pre#summary { background: #f6f7f9; border: 1px solid #dde; padding: 8px 10px; white-space: pre-wrap; }
pre#summary.straggler { border-color: #d9534f; background: #fdf3f2; }
#timeline { border: 1px solid #dde; background: #fff; }
#timeline .label { font-size: 12px; fill: #333; }
#timeline .axis { font-size: 10px; fill: #777; }
#timeline .wait { fill: #4e79a7; }
#timeline .lastmark { fill: #d9534f; }
#timeline .track.straggler .label { fill: #d9534f; font-weight: 600; }
table { border-collapse: collapse; margin-top: 12px; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 3px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.straggler td { color: #b52b27; font-weight: 600; }
.bar { display: inline-block; height: 9px; background: #4e79a7; vertical-align: middle; }
.note { color: #666; font-size: 12px; }
"""

_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById("h2-data").textContent);
  var summary = document.getElementById("summary");
  summary.textContent = data.summary;
  if (data.ranks.some(function (r) { return r.straggler; })) { summary.className = "straggler"; }
  var svg = document.getElementById("timeline");
  var ns = svg.namespaceURI;
  function el(name, attrs, parent) {
    var node = document.createElementNS(ns, name);
    for (var k in attrs) { node.setAttribute(k, attrs[k]); }
    parent.appendChild(node);
    return node;
  }
  var left = 190, width = 860, row = 24, top = 26;
  var t0 = Infinity, t1 = -Infinity;
  data.rounds.forEach(function (r) {
    r.arrivals.forEach(function (a) { if (a < t0) { t0 = a; } });
    if (r.completed > t1) { t1 = r.completed; }
  });
  data.rounds.forEach(function (r) { r.latest = Math.max.apply(null, r.arrivals); });
  if (!(t1 > t0)) { t0 = 0; t1 = 1; }
  function x(t) { return left + (t - t0) / (t1 - t0) * width; }
  svg.setAttribute("width", left + width + 20);
  svg.setAttribute("height", top + row * data.ranks.length + 10);
  for (var i = 0; i <= 4; i++) {
    var t = t0 + (t1 - t0) * i / 4;
    var anchor = i === 0 ? "start" : (i === 4 ? "end" : "middle");
    var label = el("text", {x: x(t), y: 14, "class": "axis", "text-anchor": anchor}, svg);
    label.textContent = t.toFixed(3) + " s";
  }
  data.ranks.forEach(function (rank, index) {
    var g = el("g", {id: "track-" + rank.rank, "class": "track" + (rank.straggler ? " straggler" : ""),
                     "data-rank": String(rank.rank)}, svg);
    var y = top + index * row;
    var name = el("text", {x: 4, y: y + 15, "class": "label"}, g);
    name.textContent = rank.label;
    el("line", {x1: left, x2: left + width, y1: y + row - 2, y2: y + row - 2, stroke: "#eee"}, g);
    data.rounds.forEach(function (r) {
      var a = r.arrivals[index];
      var bar = el("rect", {x: x(a), y: y + 4, width: Math.max(x(r.completed) - x(a), 0.6), height: row - 10,
                            "class": "wait"}, g);
      var tip = el("title", {}, bar);
      tip.textContent = rank.label + ": " + r.name + ", waited " + ((r.completed - a) * 1000).toFixed(2) + " ms";
      if (a === r.latest && r.arrivals.length > 1) {
        el("rect", {x: x(a) - 0.5, y: y + 2, width: 1.5, height: row - 6, "class": "lastmark"}, g);
      }
    });
  });
  var table = document.getElementById("ranks");
  var most = Math.max.apply(null, data.ranks.map(function (r) { return r.waited; }).concat([1e-9]));
  data.ranks.forEach(function (rank) {
    var tr = document.createElement("tr");
    tr.id = "rank-row-" + rank.rank;
    if (rank.straggler) { tr.className = "straggler"; }
    var share = data.total_rounds ? (100 * rank.last / data.total_rounds).toFixed(0) + "%" : "-";
    [rank.label, String(rank.last) + " (" + share + ")", rank.waited.toFixed(3) + " s"].forEach(function (text, i) {
      var td = document.createElement("td");
      td.textContent = text;
      if (i > 0) { td.className = "num"; }
      tr.appendChild(td);
    });
    var td = document.createElement("td");
    var bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.round(200 * rank.waited / most) + "px";
    td.appendChild(bar);
    tr.appendChild(td);
    table.appendChild(tr);
  });
  document.getElementById("kept").textContent = data.rounds.length + " of " + data.total_rounds;
  document.body.setAttribute("data-rendered", "true");
})();
"""


def render_page(title: str, summary: str, data: Mapping[str, Any]) -> str:
    """The page: ``data`` has ``ranks`` (``rank``, ``label``, ``waited``, ``last``, ``straggler``),
    ``rounds`` (``name``, ``arrivals`` per rank, ``completed``, seconds) and ``total_rounds``."""
    payload = json.dumps({**data, "summary": summary}).replace("<", "\\u003c").replace(">", "\\u003e")
    heading = html.escape(f"spark-hydrogen: {title}")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{heading}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{heading}</h1>
<pre id="summary"></pre>
<noscript><pre>{html.escape(summary)}</pre></noscript>
<p class="note">Timeline of the last <span id="kept"></span> collective rounds: on each rank's track, a bar from
the moment its call arrived to the moment the round completed (the time it waited for its peers); a red tick
where it arrived last. Hover a bar for the call and the wait.</p>
<svg id="timeline" role="img" aria-label="collective waits per rank"></svg>
<table>
<thead><tr><th>rank</th><th>arrived last</th><th>peers waited for it</th><th></th></tr></thead>
<tbody id="ranks"></tbody>
</table>
<script type="application/json" id="h2-data">{payload}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""
