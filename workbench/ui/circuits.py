"""The attribution-graph explorer: browse a graph, click a feature for its card, pin and group nodes.

    ex = graph_explorer(graph_json(graph, "ioi"), cards)     # an anywidget in JupyterLab; static figure headless
    ex.pinned, ex.supernodes                                 # what the user pinned and grouped (circuit-tracer's qParams)
    ex.qparams()                                             # {"pinnedIds": ..., "supernodes": ..., "clickedId": ...}

The widget is an ``anywidget.AnyWidget`` whose JavaScript is inline in this module (plain SVG, no library, nothing
fetched from the network), so it works offline. Layout as in circuit-tracer: positions across, layers up (tokens
at the bottom, targets on top); links coloured by sign, width by |weight|. Click a node: its card (top activating
contexts with per-token activations, top / bottom logits, activation frequency) in the side panel. Shift-click (or
the pin button): pin; "group pinned" makes a supernode of the pinned nodes. The display rule is the other explorers'
(:func:`workbench.ui.base.resolve_display`): headless runs get the static figure of the graph.
"""

from __future__ import annotations

import anywidget
import traitlets

from workbench.plotting.circuits import graph_figure
from workbench.ui.base import resolve_display, static

_ESM = r"""
const COLORS = {"cross layer transcoder": "#4c72b0", "mlp reconstruction error": "#999999",
                "embedding": "#55a868", "logit": "#dd8452"};
function esc(s) { return String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
function layout(graph) {
  const cells = {}; let maxLayer = 0;
  for (const n of graph.nodes) if (n.layer !== "E") maxLayer = Math.max(maxLayer, +n.layer);
  for (const n of graph.nodes) {
    const row = n.layer === "E" ? -1 : +n.layer;
    const key = n.ctx_idx + "|" + row; (cells[key] = cells[key] || []).push(n);
  }
  const pos = {};
  for (const key in cells) {
    const [ctx, row] = key.split("|").map(Number); const ns = cells[key];
    ns.forEach((n, k) => { pos[n.node_id] = [ctx + (k + 1) / (ns.length + 1), row]; });
  }
  return {pos, maxLayer};
}
function cardHtml(node, card) {
  let h = `<div class="wb-card-title">${esc(node.node_id)} <small>${esc(node.feature_type)}</small></div>`;
  if (node.clerp) h += `<div>${esc(node.clerp)}</div>`;
  if (node.activation !== null && node.activation !== undefined) h += `<div>activation ${(+node.activation).toFixed(3)}</div>`;
  if (node.influence !== null && node.influence !== undefined) h += `<div>cumulative influence ${(+node.influence).toFixed(3)}</div>`;
  if (!card) { if (node.feature_type === "cross layer transcoder") h += `<div class="wb-nocard">no card for this feature</div>`; return h; }
  h += `<div>fires on ${(100 * card.activation_frequency).toFixed(2)}% of tokens; max ${(+card.act_max).toFixed(2)}</div>`;
  h += `<div class="wb-logits"><b>top logits</b> ${card.top_logits.map(esc).join(" · ")}</div>`;
  h += `<div class="wb-logits"><b>bottom logits</b> ${card.bottom_logits.map(esc).join(" · ")}</div>`;
  for (const q of card.examples_quantiles) {
    h += `<div class="wb-quantile"><b>${esc(q.quantile_name)}</b>`;
    const top = Math.max(1e-9, card.act_max);
    for (const ex of q.examples) {
      h += `<div class="wb-example">` + ex.tokens.map((t, i) => {
        const a = Math.max(0, ex.tokens_acts_list[i] || 0) / top;
        const b = i === ex.train_token_ind ? "border-bottom:2px solid #000;" : "";
        return `<span style="background:rgba(221,132,82,${a.toFixed(2)});${b}">${esc(t)}</span>`;
      }).join("") + `</div>`;
    }
    h += `</div>`;
  }
  return h;
}
function render({ model, el }) {
  const root = document.createElement("div"); root.className = "wb-graph-explorer"; el.appendChild(root);
  const bar = document.createElement("div"); bar.className = "wb-toolbar"; root.appendChild(bar);
  const pinBtn = document.createElement("button"); pinBtn.textContent = "pin / unpin"; pinBtn.className = "wb-pin";
  const groupBtn = document.createElement("button"); groupBtn.textContent = "group pinned"; groupBtn.className = "wb-group-btn";
  const clearBtn = document.createElement("button"); clearBtn.textContent = "clear pins"; clearBtn.className = "wb-clear";
  const info = document.createElement("span"); info.className = "wb-info";
  bar.append(pinBtn, groupBtn, clearBtn, info);
  const body = document.createElement("div"); body.className = "wb-body"; root.appendChild(body);
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg"); svg.setAttribute("class", "wb-svg"); body.appendChild(svg);
  const panel = document.createElement("div"); panel.className = "wb-panel"; body.appendChild(panel);
  function draw() {
    const graph = model.get("graph"); const pinned = new Set(model.get("pinned"));
    const groups = model.get("supernodes"); const clicked = model.get("clicked");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    if (!graph || !graph.nodes) return;
    const {pos, maxLayer} = layout(graph);
    const toks = graph.metadata.prompt_tokens; const W = Math.max(480, 70 * toks.length), H = 28 * (maxLayer + 3) + 60;
    svg.setAttribute("width", W); svg.setAttribute("height", H);
    const X = x => 20 + x * (W - 40) / Math.max(1, toks.length), Y = y => H - 50 - (y + 1) * 28;
    const top = Math.max(1e-12, ...graph.links.map(l => Math.abs(l.weight)));
    for (const l of graph.links) {
      const a = pos[l.source], b = pos[l.target]; if (!a || !b) continue;
      const line = document.createElementNS(svgNS, "line");
      line.setAttribute("x1", X(a[0])); line.setAttribute("y1", Y(a[1])); line.setAttribute("x2", X(b[0])); line.setAttribute("y2", Y(b[1]));
      const hot = clicked && (l.source === clicked || l.target === clicked);
      line.setAttribute("stroke", l.weight >= 0 ? "rgba(200,60,60," + (hot ? 0.9 : 0.35) + ")" : "rgba(60,90,200," + (hot ? 0.9 : 0.35) + ")");
      line.setAttribute("stroke-width", 0.5 + 4 * Math.abs(l.weight) / top); svg.appendChild(line);
    }
    const grouped = {}; groups.forEach((g, k) => g.slice(1).forEach(id => { grouped[id] = k; }));
    for (const n of graph.nodes) {
      const p = pos[n.node_id]; const c = document.createElementNS(svgNS, "circle");
      c.setAttribute("cx", X(p[0])); c.setAttribute("cy", Y(p[1])); c.setAttribute("r", n.feature_type === "logit" ? 7 : 5);
      c.setAttribute("fill", COLORS[n.feature_type] || "#333");
      c.setAttribute("class", "wb-node" + (pinned.has(n.node_id) ? " wb-pinned" : "") + (n.node_id === clicked ? " wb-clicked" : "") + (n.node_id in grouped ? " wb-grouped" : ""));
      c.setAttribute("data-id", n.node_id); c.setAttribute("data-type", n.feature_type);
      if (pinned.has(n.node_id)) { c.setAttribute("stroke", "#000"); c.setAttribute("stroke-width", 2.5); }
      if (n.node_id in grouped) { c.setAttribute("stroke", "#8e44ad"); c.setAttribute("stroke-width", 3); }
      const title = document.createElementNS(svgNS, "title"); title.textContent = n.node_id + " " + (n.clerp || ""); c.appendChild(title);
      c.addEventListener("click", ev => {
        if (ev.shiftKey) { togglePin(n.node_id); return; }
        model.set("clicked", n.node_id); model.save_changes();
      });
      svg.appendChild(c);
    }
    toks.forEach((t, i) => { const tx = document.createElementNS(svgNS, "text"); tx.setAttribute("x", X(i + 0.5)); tx.setAttribute("y", H - 20);
      tx.setAttribute("text-anchor", "middle"); tx.setAttribute("font-size", "10"); tx.textContent = t; svg.appendChild(tx); });
    const node = graph.nodes.find(n => n.node_id === clicked);
    const cards = model.get("cards") || {};
    panel.innerHTML = node ? cardHtml(node, cards[String(node.feature)]) : "<i>click a node for its card; shift-click to pin</i>";
    panel.innerHTML += groups.length ? "<div class='wb-groups'>" + groups.map(g => `<div class="wb-group">${esc(g[0])}: ${g.slice(1).map(esc).join(", ")}</div>`).join("") + "</div>" : "";
    info.textContent = `${graph.nodes.length} nodes, ${graph.links.length} links, ${pinned.size} pinned, ${groups.length} groups`;
  }
  function togglePin(id) {
    const p = model.get("pinned").slice(); const k = p.indexOf(id);
    if (k >= 0) p.splice(k, 1); else p.push(id);
    model.set("pinned", p); model.save_changes();
  }
  pinBtn.addEventListener("click", () => { const c = model.get("clicked"); if (c) togglePin(c); });
  clearBtn.addEventListener("click", () => { model.set("pinned", []); model.save_changes(); });
  groupBtn.addEventListener("click", () => {
    const p = model.get("pinned"); if (!p.length) return;
    const g = model.get("supernodes").slice(); g.push(["group " + (g.length + 1), ...p]);
    model.set("supernodes", g); model.set("pinned", []); model.save_changes();
  });
  for (const name of ["graph", "cards", "pinned", "supernodes", "clicked"]) model.on("change:" + name, draw);
  draw();
}
export default { render };
"""

_CSS = """
.wb-graph-explorer { font-family: sans-serif; font-size: 12px; }
.wb-toolbar button { margin-right: 6px; }
.wb-body { display: flex; gap: 12px; align-items: flex-start; }
.wb-svg { border: 1px solid #ddd; background: #fff; }
.wb-panel { max-width: 420px; min-width: 260px; }
.wb-node { cursor: pointer; }
.wb-example { margin: 3px 0; line-height: 1.5; }
.wb-card-title { font-weight: bold; margin-bottom: 4px; }
"""


class GraphExplorer(anywidget.AnyWidget):
    """The explorer widget (see the module docstring). ``graph``: circuit-tracer graph JSON; ``cards``: feature
    cards keyed by the node's ``feature`` (cantor index) as a string."""

    _esm = _ESM
    _css = _CSS
    graph = traitlets.Dict().tag(sync=True)
    cards = traitlets.Dict().tag(sync=True)
    clicked = traitlets.Unicode("").tag(sync=True)
    pinned = traitlets.List(traitlets.Unicode()).tag(sync=True)
    supernodes = traitlets.List(traitlets.List()).tag(sync=True)

    def qparams(self) -> dict:
        """The view as circuit-tracer's ``qParams`` (pinned ids, supernodes, the clicked node)."""
        return {"pinnedIds": list(self.pinned), "supernodes": [list(g) for g in self.supernodes],
                "linkType": "both", "clickedId": self.clicked, "sg_pos": ""}


def graph_explorer(graph: dict, cards: dict | None = None, *, display: str = "auto"):
    """A :class:`GraphExplorer` on ``graph`` (circuit-tracer JSON, :func:`~workbench.methods.circuits.graph_io.graph_json`)
    and ``cards`` (``{cantor index: card}``); headless: the static figure of the graph."""
    if not isinstance(graph, dict) or "nodes" not in graph or "links" not in graph:
        raise ValueError("graph_explorer takes a graph JSON dict (metadata, nodes, links); see graph_io.graph_json")
    if resolve_display(display) == "static":
        return static(graph_figure(graph))
    return GraphExplorer(graph=graph, cards={str(k): v for k, v in (cards or {}).items()})
