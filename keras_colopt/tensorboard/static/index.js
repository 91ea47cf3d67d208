// The keras_colopt dashboard: TensorBoard's iframe loads this ES module and calls render().
//
// Plain JavaScript and SVG, nothing fetched from elsewhere, no build step. Every string that
// comes from the data (layer names, phase labels, file and tensor names, messages) reaches the
// page only through textContent or setAttribute, never as HTML.
//
// Data: ./runs (the runs holding keras_colopt data) and ./data?run=R (everything of one run,
// assembled by the plugin's backend from TensorBoard's data provider). The page polls both
// every 30 s (a run still training grows) and on the Reload button.

const POLL_MS = 30000;
const SVGNS = "http://www.w3.org/2000/svg";
const MONO = '11px "DejaVu Sans Mono", Menlo, Consolas, monospace';
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e",
                 "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];
const STATUS = {ok: "#66bb6a", violation: "#e53935", none: "#eeeeee"};

const state = {runs: [], run: null, data: null, version: null, logScale: true,
               epoch: null, auto: true, timer: null, checked: null, error: null,
               leavesAxis: "gzip"};
let gradientIds = 0;

// ------------------------------------------------------------------ DOM helpers (no HTML)
function build(make, tag, attrs, children) {
  const node = make(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
const h = (tag, attrs, ...children) =>
  build((t) => document.createElement(t), tag, attrs, children);
const s = (tag, attrs, ...children) =>
  build((t) => document.createElementNS(SVGNS, t), tag, attrs, children);

let measureCtx = null;
function textWidth(text) {
  if (!measureCtx) {
    measureCtx = document.createElement("canvas").getContext("2d");
    measureCtx.font = MONO;
  }
  return measureCtx.measureText(text).width;
}

// ------------------------------------------------------------------ formatting
const fmtInt = (v) => (v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en-US"));
const fmtPct = (v, digits = 1) =>
  v === null || v === undefined ? "–" : `${(100 * v).toFixed(digits)}%`;
function fmtCount(v) {  // compact, for a cell: 18432 -> 18k
  if (v === null || v === undefined) return "";
  if (v < 1000) return String(v);
  if (v < 10000) return `${(v / 1000).toFixed(1).replace(/\.0$/, "")}k`;
  return `${Math.round(v / 1000)}k`;
}
function fmtTime(seconds) {
  if (!seconds) return "–";
  return new Date(seconds * 1000).toLocaleTimeString("en-GB");
}
const baseName = (path) => String(path || "").split(/[\\/]/).pop();

// ------------------------------------------------------------------ colour scales
function viridis(t) {
  t = Math.max(0, Math.min(1, t));
  const x = t * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const a = VIRIDIS[i], b = VIRIDIS[i + 1];
  const mix = (k) => Math.round(parseInt(a.substr(k, 2), 16) * (1 - f)
                                + parseInt(b.substr(k, 2), 16) * f);
  return `rgb(${mix(1)},${mix(3)},${mix(5)})`;
}
const inkOn = (t) => (t > 0.55 ? "#000" : "#fff");

// A scale maps a value to t in [0, 1]; t = 1 is "more compressed" (bright).
function sparsityScale() {
  return {t: (v) => v, ticks: [0, 0.25, 0.5, 0.75, 1].map((v) => [v, fmtPct(v, 0)]),
          name: "fraction of zeros"};
}
function countScale(max, log) {
  max = Math.max(2, max || 2);
  if (log) {
    const top = Math.log10(max);
    const ticks = [];
    for (let p = 0; Math.pow(10, p) <= max; p++) ticks.push([Math.pow(10, p), fmtCount(Math.pow(10, p))]);
    ticks.push([max, fmtCount(max)]);
    return {t: (v) => 1 - Math.log10(Math.max(1, v)) / top, ticks,
            name: "unique values (log)"};
  }
  const ticks = [1, max / 2, max].map((v) => [v, fmtCount(Math.round(v))]);
  return {t: (v) => 1 - (v - 1) / (max - 1), ticks, name: "unique values"};
}

function phaseColour(label) {
  const l = String(label || "");
  if (/^Train/.test(l)) return "#cfd8dc";
  if (/^Prune/.test(l)) return "#ffcc80";
  if (/^Cluster/.test(l)) return "#a5d6a7";
  if (/QAT/.test(l)) return "#90caf9";
  return "#e1bee7";
}

// ------------------------------------------------------------------ tooltip
function tip() {
  let t = document.getElementById("colopt-tip");
  if (!t) {
    t = h("div", {id: "colopt-tip", role: "tooltip"});
    document.body.appendChild(t);
  }
  return t;
}
function showTip(event, lines) {
  const t = tip();
  t.replaceChildren(...lines.map((line, i) => {
    const row = h("div");
    if (Array.isArray(line)) row.append(h("b", {}, line[0]), ` ${line[1]}`);
    else if (i === 0) row.append(h("b", {}, line));
    else row.append(line);
    return row;
  }));
  t.style.display = "block";
  const x = event.clientX + 14, y = event.clientY + 14;
  const w = t.offsetWidth, ht = t.offsetHeight;
  t.style.left = `${Math.max(4, Math.min(x, window.innerWidth - w - 8))}px`;
  t.style.top = `${y + ht > window.innerHeight - 4 ? Math.max(4, event.clientY - ht - 10) : y}px`;
}
function hideTip() { tip().style.display = "none"; }
function hover(node, lines) {
  node.addEventListener("mousemove", (e) => showTip(e, typeof lines === "function" ? lines() : lines));
  node.addEventListener("mouseleave", hideTip);
  return node;
}

// ------------------------------------------------------------------ layer x epoch grid
// One SVG: phase bands over the epoch axis, the layers (model order, full names) down the
// left, a cell per layer and epoch, and a colour legend on the right.
function layerEpochGrid(d, opts) {
  const layers = d.layers, epochs = d.epochs;
  const width = Math.max(480, (document.getElementById("colopt")?.clientWidth || 1200) - 8);
  const maxLabel = Math.min(width * 0.45, 12 + Math.max(40, ...layers.map(textWidth)));
  const legendW = opts.legend ? 112 : 8;
  const cw = Math.max(6, Math.min(44, Math.floor((width - maxLabel - legendW - 8) / Math.max(1, epochs.length))));
  const ch = layers.length > 30 ? 13 : 19;
  const top = 44, left = Math.ceil(maxLabel);
  const gridW = cw * epochs.length, gridH = ch * layers.length;
  const svg = s("svg", {width: left + gridW + legendW, height: top + gridH + 8,
                        class: "grid-svg", "data-kind": opts.kind});
  svg.append(s("text", {x: 0, y: 12, class: "title"}, opts.title));

  // Phase bands and epoch ticks.
  const x0 = epochs.length ? epochs[0] : 0;
  const xOf = (epoch) => left + (epoch - x0) * cw;
  for (const b of d.phases) {
    const x = xOf(b.start), w = (b.end - b.start) * cw;
    const g = s("g", {class: "band", "data-phase": b.label});
    g.append(s("rect", {x, y: 17, width: w, height: 15, fill: phaseColour(b.label),
                        opacity: b.reached ? 1 : 0.4}));
    const fits = Math.floor((w - 4) / 6.7);
    let label = b.label;
    if (label.length > fits) label = fits > 1 ? `${label.slice(0, fits - 1)}…` : "";
    g.append(s("text", {x: x + w / 2, y: 28, "text-anchor": "middle", fill: "#000"}, label));
    hover(g, [b.label, `epochs ${b.start}–${b.end - 1}${b.reached ? "" : " (not reached yet)"}`]);
    svg.append(g);
  }
  const every = Math.max(1, Math.ceil(24 / cw));
  epochs.forEach((e, j) => {
    if (j % every === 0 || j === epochs.length - 1)
      svg.append(s("text", {x: left + j * cw + cw / 2, y: top - 2, "text-anchor": "middle",
                            fill: "#616161"}, e));
  });

  // Layer names (full path; cut from the left only when longer than the column).
  layers.forEach((name, i) => {
    let shown = name;
    while (shown.length > 2 && textWidth(shown) > left - 8) shown = shown.slice(1);
    if (shown !== name) shown = `…${shown.slice(1)}`;
    const t = s("text", {x: left - 6, y: top + i * ch + ch / 2 + 4, "text-anchor": "end",
                         class: "layer-name", "data-layer": name}, shown);
    t.append(s("title", {}, name));
    svg.append(t);
  });

  // Cells.
  const cells = s("g", {class: "cells"});
  layers.forEach((name, i) => {
    epochs.forEach((epoch, j) => {
      const c = opts.cell(i, j);
      const x = left + j * cw, y = top + i * ch;
      const rect = s("rect", {x, y, width: cw - 1, height: ch - 1, fill: c.fill, class: "cell",
                              "data-layer": name, "data-epoch": epoch,
                              "data-value": c.value ?? "", "data-status": c.status});
      hover(rect, () => [`${name} · epoch ${epoch} (${d.epoch_phase[j]})`, ...c.tip]);
      if (opts.onClick) rect.addEventListener("click", () => opts.onClick(epoch));
      cells.append(rect);
      if (c.text && cw >= 24 && ch >= 13 && textWidth(c.text) < cw - 2)
        cells.append(s("text", {x: x + cw / 2 - 0.5, y: y + ch / 2 + 3.5, "text-anchor": "middle",
                                fill: c.ink, "pointer-events": "none"}, c.text));
    });
  });
  svg.append(cells);

  // Phase boundaries through the grid.
  for (const b of d.phases.slice(1))
    svg.append(s("line", {x1: xOf(b.start) - 0.5, x2: xOf(b.start) - 0.5, y1: 17,
                          y2: top + gridH, stroke: "#212121", "stroke-width": 1.5}));
  if (opts.legend) svg.append(opts.legend(left + gridW + 14, top, Math.min(gridH, 160)));
  return svg;
}

function gradientLegend(scale) {
  return (x, y, height) => {
    const id = `colopt-grad-${++gradientIds}`;
    const g = s("g", {class: "legend"});
    const grad = s("linearGradient", {id, x1: 0, y1: 1, x2: 0, y2: 0});
    for (let k = 0; k <= 10; k++)
      grad.append(s("stop", {offset: k / 10, "stop-color": viridis(k / 10)}));
    g.append(s("defs", {}, grad));
    height = Math.max(height, 60);
    g.append(s("rect", {x, y, width: 12, height, fill: `url(#${id})`, stroke: "#9e9e9e"}));
    let last = null;
    for (const [v, label] of scale.ticks) {
      const ty = y + height * (1 - scale.t(v));
      if (last !== null && Math.abs(ty - last) < 12) continue;  // too close to the previous
      last = ty;
      g.append(s("line", {x1: x + 12, x2: x + 16, y1: ty, y2: ty, stroke: "#616161"}));
      g.append(s("text", {x: x + 18, y: ty + 4, fill: "#424242"}, label));
    }
    return g;
  };
}

function statusLegend() {
  return (x, y) => {
    const g = s("g", {class: "legend"});
    [["ok", "held"], ["violation", "violated"], ["none", "not checked"]].forEach(([k, label], i) => {
      g.append(s("rect", {x, y: y + i * 18, width: 12, height: 12, fill: STATUS[k], stroke: "#9e9e9e"}));
      g.append(s("text", {x: x + 16, y: y + i * 18 + 10, fill: "#424242"}, label));
    });
    return g;
  };
}

// ------------------------------------------------------------------ sections
function metricSection(d) {
  const sec = h("section", {id: "heatmaps"}, h("h2", {}, "Per layer and epoch"));
  if (!d.layers.length || !d.epochs.length) {
    sec.append(h("p", {class: "note"}, "No per-layer statistics in this run. CompressionMetrics(log_dir=...) " +
      "(installed by collaborative_fit(..., log_dir=...)) writes them every epoch."));
    return sec;
  }
  const check = h("input", {type: "checkbox", id: "colopt-log"});
  check.checked = state.logScale;
  check.addEventListener("change", () => { state.logScale = check.checked; draw(); });
  sec.append(h("div", {class: "controls"}, check, h("label", {for: "colopt-log"},
    " log colour scale for unique values"), `  ·  ${d.layers.length} layers (model order), ` +
    `${d.epochs.length} epochs; bright = more compressed`));

  const m = d.metrics;
  const maxUnique = Math.max(2, ...m.unique.flat().filter((v) => v !== null));
  const sp = sparsityScale(), cnt = countScale(maxUnique, state.logScale);
  const cell = (scale, values, text, tipOf) => (i, j) => {
    const v = values[i][j];
    if (v === null || v === undefined)
      return {fill: "#f5f5f5", value: null, tip: ["no value (epoch not reached)"]};
    const t = scale.t(v);
    return {fill: viridis(t), ink: inkOn(t), value: v, text: text(v), tip: tipOf(i, j, v)};
  };
  const sizeOf = (i) => d.weights[i];
  const row = h("div", {class: "grids"});
  sec.append(row);
  row.append(layerEpochGrid(d, {
    kind: "sparsity", title: "Sparsity: fraction of zero weights", legend: gradientLegend(sp),
    cell: cell(sp, m.sparsity, (v) => `${Math.round(100 * v)}`, (i, j, v) => [
      ["sparsity", `${fmtPct(v, 2)} (${fmtInt(v * sizeOf(i))} of ${fmtInt(sizeOf(i))} weights are zero)`]]),
  }));
  const uniqueTip = (i, j) => [
    ["unique values per tensor", fmtInt(m.unique[i][j])],
    ["unique values, max per output channel", fmtInt(m.unique_per_channel[i][j])],
    ["weights", fmtInt(sizeOf(i))]];
  row.append(layerEpochGrid(d, {
    kind: "unique", title: "Unique weight values per tensor", legend: gradientLegend(cnt),
    cell: cell(cnt, m.unique, fmtCount, uniqueTip),
  }));
  row.append(layerEpochGrid(d, {
    kind: "unique_per_channel", title: "Unique weight values: the most in one output channel",
    legend: gradientLegend(cnt), cell: cell(cnt, m.unique_per_channel, fmtCount, uniqueTip),
  }));
  return sec;
}

function expectText(e) {
  const parts = [];
  if (e && e.sparsity !== null && e.sparsity !== undefined) parts.push(`sparsity ≥ ${fmtPct(e.sparsity)}`);
  if (e && e.clusters !== null && e.clusters !== undefined)
    parts.push(`≤ ${e.clusters} values ${e.per_channel ? "per channel" : "per tensor"}`);
  return parts.join(", ") || "nothing";
}
function foundText(row) {
  const f = row.found || {}, e = row.expected || {};
  const parts = [];
  if (f.sparsity !== null && f.sparsity !== undefined) parts.push(`sparsity ${fmtPct(f.sparsity, 2)}`);
  if (e.clusters !== null && e.clusters !== undefined)
    parts.push(`${fmtInt(e.per_channel ? f.unique_per_channel : f.unique)} values ${e.per_channel ? "per channel" : "per tensor"}`);
  else if (f.unique !== null && f.unique !== undefined) parts.push(`${fmtInt(f.unique)} values per tensor`);
  return parts.join(", ");
}

function invariantSection(d) {
  const inv = d.invariants;
  const sec = h("section", {id: "invariants"}, h("h2", {}, "Invariants: expected and found"));
  if (!inv.checked) {
    sec.append(h("p", {class: "note"}, "No invariant checks in this run. collaborative_fit checks every " +
      "compression epoch; in a plain fit add InvariantGuard(..., log_dir=...)."));
    return sec;
  }
  const n = inv.violations.length;
  sec.append(h("p", {}, n
    ? h("span", {class: "badge bad", id: "colopt-violations"}, `${n} violation${n > 1 ? "s" : ""}`)
    : h("span", {class: "badge ok", id: "colopt-violations"}, "no violation"),
    ` in ${inv.checked} layer checks over ${inv.epochs.length} epochs. Click an epoch for what each layer was expected to show and showed.`));

  const byCell = new Map();
  for (const [epoch, rows] of Object.entries(inv.checks))
    for (const r of rows) {
      const key = `${epoch}|${r.layer}`;
      if (!byCell.has(key)) byCell.set(key, []);
      byCell.get(key).push(r);
    }
  sec.append(layerEpochGrid(d, {
    kind: "invariants", title: "Checks per layer and epoch", legend: statusLegend(),
    onClick: (epoch) => { if (inv.checks[String(epoch)]) { state.epoch = epoch; draw(); } },
    cell: (i, j) => {
      const st = inv.status[i][j] || "none";
      const rows = byCell.get(`${d.epochs[j]}|${d.layers[i]}`) || [];
      const tipLines = rows.length ? rows.flatMap((r) => [
        ["expected", `${expectText(r.expected)} (${r.phase || r.source})`],
        ["found", foundText(r)],
        ...r.violations.map((v) => ["violated", `${v.invariant}: expected ${v.expected}, found ${v.found}`])])
        : ["not checked"];
      return {fill: STATUS[st], ink: st === "none" ? "#9e9e9e" : "#fff", status: st,
              text: st === "ok" ? "✓" : st === "violation" ? "✗" : "", tip: tipLines};
    },
  }));

  // What each layer was expected to show and showed at one epoch.
  const checkedEpochs = inv.epochs;
  if (state.epoch === null || !inv.checks[String(state.epoch)])
    state.epoch = (inv.violations[0] || {}).epoch ?? checkedEpochs[checkedEpochs.length - 1];
  const select = h("select", {id: "colopt-epoch"},
    checkedEpochs.map((e) => h("option", {value: e}, `epoch ${e}`)));
  select.value = String(state.epoch);
  select.addEventListener("change", () => { state.epoch = Number(select.value); draw(); });
  sec.append(h("h3", {}, "Expected and found at ", select));
  const rows = inv.checks[String(state.epoch)] || [];
  sec.append(h("table", {class: "grid", id: "colopt-checks"},
    h("tr", {}, h("th", {class: "name"}, "layer"), h("th", {class: "text"}, "checked by"),
      h("th", {}, "sparsity expected"), h("th", {}, "found"), h("th", {}, "values expected"),
      h("th", {}, "found"), h("th", {class: "text"}, "result")),
    rows.map((r) => {
      const e = r.expected || {}, f = r.found || {};
      const bad = r.violations.length > 0;
      const clusters = e.clusters === null || e.clusters === undefined;
      return h("tr", {class: bad ? "bad" : ""},
        h("td", {class: "name"}, r.layer), h("td", {class: "text"}, r.phase || r.source || ""),
        h("td", {}, e.sparsity === null || e.sparsity === undefined ? "–" : `≥ ${fmtPct(e.sparsity)}`),
        h("td", {}, fmtPct(f.sparsity, 2)),
        h("td", {}, clusters ? "–" : `≤ ${e.clusters} ${e.per_channel ? "/ channel" : "/ tensor"}`),
        h("td", {}, clusters ? fmtInt(f.unique) : fmtInt(e.per_channel ? f.unique_per_channel : f.unique)),
        h("td", {class: bad ? "text bad" : "text ok"},
          bad ? r.violations.map((v) => `${v.invariant}: expected ${v.expected}, found ${v.found}`).join("; ") : "held"));
    })));

  if (n) {
    const shown = inv.violations.slice(0, 200);
    sec.append(h("h3", {}, "Violations"),
      h("table", {class: "grid", id: "colopt-violation-table"},
        h("tr", {}, h("th", {}, "epoch"), h("th", {class: "text"}, "phase"), h("th", {class: "name"}, "layer"),
          h("th", {class: "text"}, "invariant"), h("th", {class: "text"}, "expected"), h("th", {class: "text"}, "found")),
        shown.map((v) => h("tr", {class: "bad"}, h("td", {}, v.epoch), h("td", {class: "text"}, v.phase || "–"),
          h("td", {class: "name"}, v.layer), h("td", {class: "text"}, v.invariant),
          h("td", {class: "text"}, v.expected), h("td", {class: "text"}, v.found)))));
    if (n > shown.length) sec.append(h("p", {class: "note"}, `… and ${n - shown.length} more.`));
  }
  return sec;
}

function tfliteSection(d) {
  const sec = h("section", {id: "deployed"}, h("h2", {}, "Deployed model: what survived in the .tflite"));
  if (!d.tflite.length) {
    sec.append(h("p", {class: "note"}, "No .tflite exported into this run. " +
      "export.to_tflite(model, path, log_dir=<the run's log_dir>) writes its table here."));
    return sec;
  }
  for (const t of d.tflite) {
    const card = h("div", {class: "card", "data-file": baseName(t.file)});
    card.append(h("h3", {}, baseName(t.file)),
      h("p", {class: "muted"}, `${t.quantization || "?"} · ${fmtInt(t.tflite_bytes)} bytes, ` +
        `${fmtInt(t.gzip_bytes)} gzipped · exported ${fmtTime(t.updated)} · ${t.file}`));
    card.append(h("table", {class: "grid"},
      h("tr", {}, h("th", {class: "name"}, "layer"), h("th", {class: "text"}, "tensor"), h("th", {}, "shape"),
        h("th", {}, "dtype"), h("th", {}, "sparsity"), h("th", {}, "(Keras)"), h("th", {}, "values / tensor"),
        h("th", {}, "max / channel"), h("th", {}, "(Keras)"), h("th", {}, "bytes"), h("th", {}, "gzip bytes")),
      (t.layers || []).map((r) => h("tr", {},
        h("td", {class: "name"}, r.layer || "(no layer)"),
        h("td", {class: "tensor", title: r.tensor}, `${r.op || ""} ${r.tensor || ""}`),
        h("td", {}, (r.shape || []).join("×")), h("td", {}, r.dtype || ""),
        h("td", {}, fmtPct(r.sparsity)), h("td", {class: "muted"}, fmtPct(r.keras_sparsity)),
        h("td", {}, fmtInt(r.unique)), h("td", {}, fmtInt(r.unique_per_channel)),
        h("td", {class: "muted"}, fmtInt(r.keras_unique_per_channel)),
        h("td", {}, fmtInt(r.bytes)), h("td", {}, fmtInt(r.gzip_bytes))))));
    for (const on of t.targets || []) card.append(targetTable(on));
    sec.append(card);
  }
  return sec;
}

// A file measured on a deployment target (export.to_tflite(..., target=...)): Vela's estimate
// on an Ethos-U, per operator (its Keras layer, cycles, encoded weights).
function targetTable(on) {
  const cpu = Object.entries(on.cpu_ops || {}).map(([op, n]) => `${n} × ${op}`).join(", ");
  const box = h("div", {class: "target", "data-target": on.target});
  box.append(h("h4", {}, `On ${on.target}`),
    h("p", {class: "muted"}, `${on.latency_ms.toFixed(4)} ms per inference` +
      (on.system_config ? ` (Vela's estimate, ${on.system_config}, ${on.memory_mode})` : "") +
      ` · weights ${fmtInt(on.weight_bytes)} B there (${fmtInt(on.original_weight_bytes)} B in the file)` +
      (on.sram_bytes !== null && on.sram_bytes !== undefined ? ` · SRAM ${fmtInt(on.sram_bytes)} B, flash ${fmtInt(on.flash_bytes)} B` : "") +
      ` · CPU: ${cpu || "nothing"}`));
  if ((on.layers || []).length)
    box.append(h("table", {class: "grid target-layers"},
      h("tr", {}, h("th", {class: "name"}, "layer"), h("th", {class: "text"}, "operator"), h("th", {}, "on"),
        h("th", {}, "cycles"), h("th", {}, "MACs"), h("th", {}, "encoded weights B"),
        h("th", {}, "distinct weights"), h("th", {}, "zeros (Vela's weight_zero)")),
      on.layers.map((r) => h("tr", {"data-layer": r.layer || ""},
        h("td", {class: "name"}, r.layer || "(no layer)"),
        h("td", {class: "tensor", title: r.name}, `${r.operator} ${r.name}`), h("td", {}, r.placement),
        h("td", {}, fmtInt(r.cycles)), h("td", {}, fmtInt(r.macs)), h("td", {}, fmtInt(r.weight_bytes)),
        h("td", {}, fmtInt(r.distinct_weights)), h("td", {}, fmtInt(r.zero_weights))))));
  return box;
}

// What explore's chart puts on its x axis: the gzipped file, or (with a target) the weights
// as the target stores them or its latency.
function leafAxes(report) {
  const axes = {gzip: {label: "gzipped int8 .tflite (bytes)", value: (r) => r.gzip_bytes,
                       target: report.target ? null : "max_size_bytes", int: true}};
  if (report.target) {
    axes.weights = {label: `weights on ${report.target} (bytes)`, value: (r) => r.target_weight_bytes,
                    target: "max_size_bytes", int: true};
    axes.latency = {label: `latency on ${report.target} (ms)`, value: (r) => r.target_latency_ms,
                    target: "max_latency_ms", int: false};
  }
  return axes;
}

function leafFigures(r, report) {
  const lines = [r.name, ["status", r.status + (r.reason ? `: ${r.reason}` : "")]];
  if (r.settings) lines.push(["settings", r.settings]);
  if (r.on_front) lines.push(["Pareto front", "no other trial is as accurate, as small and as fast"]);
  if (r.status === "ok") lines.push(
    ["INT8 accuracy (LiteRT)", fmtPct(r.int8_accuracy, 2)],
    ["FP32 / fake-int8 accuracy", fmtPct(r.fp32_accuracy, 2)],
    ["drop from baseline", r.accuracy_drop === null ? "–" : `${(100 * r.accuracy_drop).toFixed(2)} pt`],
    ["size", `${fmtInt(r.tflite_bytes)} B, ${fmtInt(r.gzip_bytes)} B gzipped`],
    ["latency", r.latency_ms === null ? "–" : `${r.latency_ms.toFixed(3)} ms`],
    ...(report.target && r.target_latency_ms !== null && r.target_latency_ms !== undefined
      ? [[`on ${report.target}`, `${r.target_latency_ms.toFixed(4)} ms, weights ${fmtInt(r.target_weight_bytes)} B`]] : []),
    ["zeros", fmtPct(r.sparsity)],
    ["unique values", `${fmtInt(r.max_unique_weights)} per tensor, ${fmtInt(r.max_unique_per_channel)} per channel (max)`]);
  if (r.name === report.chosen) lines.push(["chosen", "the smallest leaf meeting every target"]);
  return lines;
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || 1;
  const step0 = span / count, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((v) => span / v <= count) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(v);
  return out;
}

function leavesChart(report) {
  const all = leafAxes(report);
  const axis = all[state.leavesAxis] || all.gzip;
  const xOf = axis.value;
  const ok = report.leaves.filter((r) => r.status === "ok" && xOf(r) !== null && xOf(r) !== undefined && r.int8_accuracy !== null);
  const W = Math.min(900, Math.max(520, (document.getElementById("colopt")?.clientWidth || 900) - 20));
  const H = 380, m = {l: 64, r: 150, t: 24, b: 44};
  const svg = s("svg", {width: W, height: H, id: "colopt-leaves-chart"});
  svg.append(s("text", {x: 0, y: 14, class: "title"}, `INT8 accuracy (LiteRT) against ${axis.label.replace(/ \(.*\)$/, "")} · dotted: the Pareto front · hover a point for its figures`));
  if (!ok.length) {
    svg.append(s("text", {x: m.l, y: H / 2, fill: "#757575"}, "no leaf built yet"));
    return svg;
  }
  const b = report.baseline || {};
  const t = report.targets || {};
  const known = (v) => v !== null && v !== undefined;
  const ys = ok.map((r) => 100 * r.int8_accuracy);
  if (known(b.fp32_accuracy)) ys.push(100 * b.fp32_accuracy);
  const accuracyTarget = known(t.max_accuracy_drop) && known(b.fp32_accuracy)
    ? 100 * (b.fp32_accuracy - t.max_accuracy_drop) : null;
  if (accuracyTarget !== null && accuracyTarget > 0) ys.push(accuracyTarget);
  const xs = ok.map(xOf);
  const xTarget = axis.target ? t[axis.target] : null;
  if (xTarget) xs.push(xTarget);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const px = (x1 - x0) * 0.08 || x0 * 0.1 || 1, py = (y1 - y0) * 0.12 || 1;
  x0 = Math.max(0, x0 - px); x1 += px; y0 = Math.max(0, y0 - py); y1 = Math.min(100, y1 + py);
  const X = (v) => m.l + (v - x0) / (x1 - x0) * (W - m.l - m.r);
  const Y = (v) => H - m.b - (v - y0) / (y1 - y0) * (H - m.t - m.b);
  const axes = s("g", {class: "axes"});
  for (const v of niceTicks(x0, x1, 6)) {
    axes.append(s("line", {x1: X(v), x2: X(v), y1: m.t, y2: H - m.b, stroke: "#eeeeee"}));
    axes.append(s("text", {x: X(v), y: H - m.b + 14, "text-anchor": "middle", fill: "#616161"},
                       axis.int ? fmtInt(v) : Number(v.toPrecision(3)).toString()));
  }
  const yTicks = niceTicks(y0, y1, 6);
  const yDigits = yTicks.length > 1 && yTicks[1] - yTicks[0] < 1 ? 1 : 0;
  for (const v of yTicks) {
    axes.append(s("line", {x1: m.l, x2: W - m.r, y1: Y(v), y2: Y(v), stroke: "#eeeeee"}));
    axes.append(s("text", {x: m.l - 6, y: Y(v) + 4, "text-anchor": "end", fill: "#616161"}, `${v.toFixed(yDigits)}%`));
  }
  axes.append(s("rect", {x: m.l, y: m.t, width: W - m.l - m.r, height: H - m.t - m.b, fill: "none", stroke: "#bdbdbd"}));
  axes.append(s("text", {x: (m.l + W - m.r) / 2, y: H - 8, "text-anchor": "middle", fill: "#424242", id: "colopt-leaves-xlabel"}, axis.label));
  axes.append(s("text", {x: 12, y: (m.t + H - m.b) / 2, "text-anchor": "middle", fill: "#424242",
                         transform: `rotate(-90 12 ${(m.t + H - m.b) / 2})`}, "INT8 accuracy"));
  svg.append(axes);
  const refLine = (attrs, label, lx, ly) => {
    svg.append(s("line", attrs));
    svg.append(s("text", {x: lx, y: ly, fill: attrs.stroke}, label));
  };
  if (b.fp32_accuracy !== null && b.fp32_accuracy !== undefined)
    refLine({x1: m.l, x2: W - m.r, y1: Y(100 * b.fp32_accuracy), y2: Y(100 * b.fp32_accuracy), stroke: "#212121", "stroke-width": 1},
      `baseline FP32 ${fmtPct(b.fp32_accuracy, 2)}`, W - m.r + 4, Y(100 * b.fp32_accuracy) + 4);
  if (accuracyTarget !== null && accuracyTarget >= y0) {
    const yv = Y(accuracyTarget);
    refLine({x1: m.l, x2: W - m.r, y1: yv, y2: yv, stroke: "#d32f2f", "stroke-dasharray": "5 3"},
      "accuracy target", W - m.r + 4, yv + 4);
  }
  if (xTarget)
    refLine({x1: X(xTarget), x2: X(xTarget), y1: m.t, y2: H - m.b, stroke: "#d32f2f", "stroke-dasharray": "8 3 2 3"},
      axis.target === "max_latency_ms" ? "latency target" : "size target", X(xTarget) + 3, m.t + 10);

  // Pareto front: no other leaf is both smaller and more accurate.
  const front = [];
  for (const r of [...ok].sort((a, c) => xOf(a) - xOf(c) || c.int8_accuracy - a.int8_accuracy))
    if (!front.length || r.int8_accuracy > front[front.length - 1].int8_accuracy) front.push(r);
  if (front.length > 1) {
    let path = `M${X(xOf(front[0]))},${Y(100 * front[0].int8_accuracy)}`;
    for (const r of front.slice(1)) path += ` H${X(xOf(r))} V${Y(100 * r.int8_accuracy)}`;
    svg.append(s("path", {d: path, fill: "none", stroke: "#9e9e9e", "stroke-dasharray": "2 3"}));
  }
  // Labels beside their points, moved to the next free place when two points are close.
  const placed = ok.map((r) => {
    const cx = X(xOf(r)), cy = Y(100 * r.int8_accuracy);
    return {x0: cx - 7, x1: cx + 7, y0: cy - 7, y1: cy + 7};
  });
  const free = (box) => !placed.some((b) => box.x0 < b.x1 && b.x0 < box.x1 && box.y0 < b.y1 && b.y0 < box.y1);
  ok.forEach((r, i) => {
    const cx = X(xOf(r)), cy = Y(100 * r.int8_accuracy);
    const g = s("g", {class: "leaf", "data-leaf": r.name});
    if (r.name === report.chosen) {
      g.append(s("circle", {cx, cy, r: 12, fill: "none", stroke: "#d32f2f", "stroke-width": 2.5, class: "chosen-ring"}));
      g.append(s("text", {x: cx, y: cy - 16, "text-anchor": "middle", fill: "#d32f2f", class: "title"}, "chosen"));
      placed.push({x0: cx - 24, x1: cx + 24, y0: cy - 28, y1: cy - 12});
    }
    g.append(s("circle", {cx, cy, r: 6, fill: viridis(i / Math.max(1, ok.length - 1) * 0.85),
                          stroke: "#212121", class: "point", "data-leaf": r.name, "data-x": String(xOf(r))}));
    const w = textWidth(r.name);
    const spots = [[9, 4], [-9 - w, 4], [9, -10], [-9 - w, -10], [9, 18], [-9 - w, 18],
                   [9, 32], [-9 - w, 32], [9, -24], [-9 - w, -24]];
    const box = ([ox, oy]) => ({x0: cx + ox, x1: cx + ox + w, y0: cy + oy - 10, y1: cy + oy + 2});
    const inside = (b) => b.x0 >= m.l && b.x1 <= W && b.y0 >= 0 && b.y1 <= H - m.b;
    const [dx, dy] = spots.find((p) => inside(box(p)) && free(box(p))) || spots[0];
    placed.push(box([dx, dy]));
    if (dx !== 9 || dy !== 4)  // moved away from its point: a leader line says whose it is
      g.append(s("line", {x1: cx, y1: cy, x2: dx > 0 ? cx + dx - 2 : cx + dx + w + 2, y2: cy + dy - 4,
                          stroke: "#9e9e9e", "stroke-width": 0.8}));
    g.append(s("text", {x: cx + dx, y: cy + dy, fill: "#212121", class: "leaf-label"}, r.name));
    hover(g, leafFigures(r, report));
    svg.append(g);
  });
  return svg;
}

function leavesSection(d) {
  const report = d.leaves;
  const search = report && report.kind === "search";
  const sec = h("section", {id: "leaves"}, h("h2", {}, search
    ? "search: the trials, their Pareto front and the chosen point"
    : "explore: the deployment tree's leaves"));
  if (!report) {
    sec.append(h("p", {class: "note"}, "No explore() report in this run (explore writes it into " +
      "<out_dir>/logs/report as its leaves are built)."));
    return sec;
  }
  const t = report.targets || {}, b = report.baseline || {};
  const active = Object.entries(t).filter(([, v]) => v !== null && v !== undefined);
  const targetText = active.map(([k, v]) => k === "max_accuracy_drop" ? `accuracy drop ≤ ${(100 * v).toFixed(2)} pt`
    : k === "max_size_bytes" ? `gzip ≤ ${fmtInt(v)} B` : `latency ≤ ${Number(v).toFixed(3)} ms`);
  sec.append(h("p", {},
    b.fp32_accuracy !== undefined && b.fp32_accuracy !== null ? `Baseline FP32 ${fmtPct(b.fp32_accuracy, 2)}. ` : "",
    active.length ? `Targets: ${targetText.join(", ")}. ` : "No targets: every leaf is built, none chosen. ",
    report.chosen ? h("span", {class: "badge ok", id: "colopt-chosen"}, `chosen: ${report.chosen}`) : "",
    report.epochs_naive ? (search
      ? ` Epochs trained by the last call: ${report.epochs_run} (a grid over the space: ${fmtInt(report.epochs_naive)}). Study ${report.search.study_name} in ${report.search.storage}.`
      : ` Epochs trained: ${report.epochs_run} (a separate run per leaf: ${report.epochs_naive}).`) : ""));
  for (const v of Object.values(report.missed || {})) sec.append(h("p", {class: "note"}, v));
  const axes = leafAxes(report);
  if (Object.keys(axes).length > 1) {
    const pick = h("select", {id: "colopt-leaves-axis"},
      Object.entries(axes).map(([k, a]) => {
        const o = h("option", {value: k}, a.label);
        if (k === state.leavesAxis) o.selected = true;
        return o;
      }));
    pick.addEventListener("change", () => { state.leavesAxis = pick.value; draw(); });
    sec.append(h("p", {}, "x axis: ", pick));
  }
  sec.append(leavesChart(report));
  sec.append(h("table", {class: "grid", id: "colopt-leaves"},
    h("tr", {}, h("th", {class: "name"}, search ? "trial" : "leaf"), h("th", {class: "text"}, "status"),
      ...(search ? [h("th", {class: "text"}, "settings")] : []), h("th", {}, "FP32 / fake int8"),
      h("th", {}, "INT8 (LiteRT)"), h("th", {}, "drop"), h("th", {}, ".tflite B"), h("th", {}, "gzip B"),
      h("th", {}, "latency ms"),
      ...(report.target ? [h("th", {}, `${report.target} ms`), h("th", {}, `${report.target} weights B`)] : []),
      h("th", {}, "zeros"), h("th", {}, "max unique / channel"), h("th", {class: "text"}, "")),
    report.leaves.map((r) => {
      const chosen = r.name === report.chosen;
      const note = chosen ? "★ chosen" : r.status !== "ok" ? (r.reason || "")
        : r.meets_targets === true ? "meets targets" : r.meets_targets === false ? "misses a target" : "";
      const onFront = r.on_front ? " · on the front" : "";
      const row = h("tr", {class: chosen ? "chosen" : r.status === "failed" ? "bad" : "", "data-leaf": r.name},
        h("td", {class: "name"}, r.name), h("td", {class: "text"}, r.status),
        ...(search ? [h("td", {class: "text"}, r.settings || "")] : []),
        h("td", {}, fmtPct(r.fp32_accuracy, 2)), h("td", {}, fmtPct(r.int8_accuracy, 2)),
        h("td", {}, r.accuracy_drop === null || r.accuracy_drop === undefined ? "–" : `${(100 * r.accuracy_drop).toFixed(2)} pt`),
        h("td", {}, fmtInt(r.tflite_bytes)), h("td", {}, fmtInt(r.gzip_bytes)),
        h("td", {}, r.latency_ms === null || r.latency_ms === undefined ? "–" : r.latency_ms.toFixed(3)),
        ...(report.target ? [
          h("td", {}, r.target_latency_ms === null || r.target_latency_ms === undefined ? "–" : r.target_latency_ms.toFixed(4)),
          h("td", {}, fmtInt(r.target_weight_bytes))] : []),
        h("td", {}, fmtPct(r.sparsity)), h("td", {}, fmtInt(r.max_unique_per_channel)),
        h("td", {class: "text"}, note + onFront));
      return hover(row, leafFigures(r, report));
    })));
  return sec;
}

// ------------------------------------------------------------------ page
function statusText(d) {
  const bits = [];
  if (d.last_epoch !== null && d.last_epoch !== undefined) {
    const of = d.total_epochs ? ` of ${d.total_epochs}` : "";
    bits.push(`epoch ${d.last_epoch + 1}${of} done`);
  }
  bits.push(`data written ${fmtTime(d.updated)}`);
  if (state.checked) bits.push(`checked ${state.checked.toLocaleTimeString("en-GB")}`);
  return bits.join(" · ");
}
const training = (d) => d && d.total_epochs && d.last_epoch !== null && d.last_epoch + 1 < d.total_epochs;

function header() {
  const select = h("select", {id: "colopt-run"},
    state.runs.map((r) => h("option", {value: r.run}, r.label)));
  if (state.run) select.value = state.run;
  select.addEventListener("change", () => { state.run = select.value; state.version = null; state.epoch = null; refresh(); });
  const reload = h("button", {id: "colopt-reload", type: "button", onclick: () => refresh()}, "Reload");
  const auto = h("input", {type: "checkbox", id: "colopt-auto"});
  auto.checked = state.auto;
  auto.addEventListener("change", () => { state.auto = auto.checked; schedule(); });
  const d = state.data;
  return h("header", {class: "bar"}, h("h1", {}, "keras_colopt"),
    h("label", {for: "colopt-run"}, "Run"), select, reload,
    h("span", {}, auto, h("label", {for: "colopt-auto"}, " refresh every 30 s")),
    h("span", {class: `status${training(d) ? " training" : ""}`, id: "colopt-status"},
      d ? `${training(d) ? "training: " : ""}${statusText(d)}` : ""));
}

function phaseChips(d) {
  const div = h("div", {class: "phases", id: "colopt-phases"});
  for (const b of d.phases)
    div.append(h("span", {class: `phase-chip${b.reached ? "" : " unreached"}`,
                          style: `background:${phaseColour(b.label)}`, "data-phase": b.label},
      `${b.label} · epochs ${b.start}–${b.end - 1}`));
  return div;
}

function draw() {
  const root = document.getElementById("colopt");
  const parts = [header()];
  if (state.error) parts.push(h("p", {class: "error", id: "colopt-error"}, state.error));
  if (!state.runs.length) {
    parts.push(h("section", {id: "empty"}, h("h2", {}, "No keras_colopt data in this log directory yet"),
      h("p", {}, "Train with collaborative_fit(..., log_dir=...), or add CompressionMetrics(log_dir=...) " +
        "and InvariantGuard(log_dir=...) to model.fit; export.to_tflite(..., log_dir=...) and explore() add " +
        "the deployed model and the deployment tree. This page looks again every 30 s.")));
  } else if (state.data) {
    const d = state.data;
    parts.push(h("div", {class: "muted"}, `Run ${d.label}`), phaseChips(d));
    // Sections with data first; those without are one line each, at the end.
    const sections = [metricSection(d), invariantSection(d), tfliteSection(d), leavesSection(d)];
    const empty = (sec) => sec.children.length === 2 && sec.lastChild.classList.contains("note");
    parts.push(...sections.filter((sec) => !empty(sec)), ...sections.filter(empty));
    if (d.unreadable && d.unreadable.length)
      parts.push(h("p", {class: "note"}, `Unreadable summaries skipped: ${d.unreadable.join(", ")}`));
  }
  const y = window.scrollY;
  hideTip();
  root.replaceChildren(...parts);
  window.scrollTo(0, y);
  document.body.dataset.state = "ready";
  document.body.dataset.run = state.run || "";
  document.body.dataset.version = state.version || "";
  if (state.data && state.data.layers.length && state.data.epochs.length && !window.coloptHeatmapDrawnAt)
    window.coloptHeatmapDrawnAt = performance.now();
}

async function getJSON(url) {
  const response = await fetch(url, {cache: "no-store"});
  if (!response.ok) throw new Error(`${url}: ${response.status} ${await response.text()}`);
  return response.json();
}

async function refresh() {
  const before = JSON.stringify([state.runs.map((r) => r.run), state.run, state.version, state.error]);
  try {
    const {runs} = await getJSON("./runs");
    state.runs = runs;
    if (!runs.some((r) => r.run === state.run)) {  // the newest run by default
      const newest = [...runs].sort((a, b) => (b.updated || 0) - (a.updated || 0))[0];
      state.run = newest ? newest.run : null;
      state.version = null;
      state.epoch = null;
    }
    if (state.run) {
      const data = await getJSON(`./data?run=${encodeURIComponent(state.run)}`);
      state.checked = new Date();
      if (data.version !== state.version || data.run !== (state.data || {}).run) {
        state.data = data;
        state.version = data.version;
      }
    } else {
      state.data = null;
      state.checked = new Date();
    }
    state.error = null;
  } catch (err) {
    state.error = `Could not load the dashboard's data: ${err.message}`;
  }
  const after = JSON.stringify([state.runs.map((r) => r.run), state.run, state.version, state.error]);
  const status = document.getElementById("colopt-status");
  if (before !== after || !status) draw();  // nothing new: only the status line changes
  else if (state.data) status.textContent = `${training(state.data) ? "training: " : ""}${statusText(state.data)}`;
  schedule();
}

function schedule() {
  clearTimeout(state.timer);
  if (state.auto) state.timer = setTimeout(refresh, POLL_MS);
}

export async function render() {
  const css = document.createElement("link");
  css.rel = "stylesheet";
  css.href = "./static/style.css";
  document.head.appendChild(css);
  document.body.appendChild(h("div", {id: "colopt"}, h("p", {class: "muted"}, "Loading…")));
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (state.data) draw(); }, 200);
  });
  await refresh();
}
