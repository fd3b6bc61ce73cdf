// geolocate web page: upload a photo to /predict and draw the top cells on a bundled world outline.
// Plain JS, no libraries, no network beyond this server. Map: equirectangular, x = lon, y = -lat.
"use strict";

const COLORS = ["#d92d20", "#f79009", "#1f6feb", "#7a5af8", "#0e9384", "#c11574", "#667085"];
const SVGNS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const state = { result: null, view: [-180, -90, 360, 180] };

function el(tag, attrs = {}, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function ringPath(ring) {
  let d = "";
  ring.forEach(([lon, lat], i) => { d += (i ? "L" : "M") + lon.toFixed(3) + " " + (-lat).toFixed(3); });
  return d + "Z";
}

function linePath(line) {
  return line.map(([lon, lat], i) => (i ? "L" : "M") + lon.toFixed(2) + " " + (-lat).toFixed(2)).join("");
}

function geometryPath(g) {
  if (g.type === "Polygon") return g.coordinates.map(ringPath).join("");
  if (g.type === "MultiPolygon") return g.coordinates.map((p) => p.map(ringPath).join("")).join("");
  if (g.type === "LineString") return linePath(g.coordinates);
  if (g.type === "MultiLineString") return g.coordinates.map(linePath).join("");
  return "";
}

function drawGraticule() {
  const g = $("graticule");
  let d = "";
  for (let lon = -150; lon <= 150; lon += 30) d += `M${lon} -90L${lon} 90`;
  for (let lat = -60; lat <= 60; lat += 30) d += `M-180 ${-lat}L180 ${-lat}`;
  g.appendChild(el("svg:path", { d, class: "grat" }));
}

async function drawWorld() {
  try {
    const res = await fetch("/static/world.geojson");
    const world = await res.json();
    const land = $("land");
    const order = { land: 0, lake: 1, border: 2 };
    world.features.sort((a, b) => order[a.properties.kind] - order[b.properties.kind]);
    for (const f of world.features) {
      land.appendChild(el("svg:path", { d: geometryPath(f.geometry), class: f.properties.kind }));
    }
  } catch (e) {
    console.warn("world outline unavailable", e);
  }
}

async function loadModelCard() {
  try {
    const m = await (await fetch("/model")).json();
    const t = (m.metrics && m.metrics.test) || {};
    const parts = [
      `model ${m.backbone} (${m.engine})`,
      `${m.num_classes} H3 cells at resolution ${m.h3_resolution}`,
    ];
    if (m.training_data && m.training_data.images) parts.push(`trained on ${m.training_data.images.toLocaleString()} images`);
    if (t.median_km !== undefined) parts.push(`test median error ${Math.round(t.median_km).toLocaleString()} km, top-1 ${(100 * t.top1_acc).toFixed(0)}%`);
    if (m.run_id) parts.push(`run ${m.run_id}`);
    $("model-card").textContent = parts.join(" · ");
  } catch (e) {
    $("model-card").textContent = "model card unavailable";
  }
}

function setView(v) {
  state.view = v;
  $("map").setAttribute("viewBox", v.map((x) => x.toFixed(3)).join(" "));
  drawMarks();
}

function cellsBounds(fc) {
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  const visit = (c) => {
    if (typeof c[0] === "number") { x0 = Math.min(x0, c[0]); x1 = Math.max(x1, c[0]); y0 = Math.min(y0, -c[1]); y1 = Math.max(y1, -c[1]); }
    else c.forEach(visit);
  };
  fc.features.forEach((f) => visit(f.geometry.coordinates));
  return [x0, y0, x1, y1];
}

function zoomToCells() {
  if (!state.result) return;
  let [x0, y0, x1, y1] = cellsBounds(state.result.geojson);
  const r = state.result;
  if (r.true_lat !== null && r.true_lat !== undefined) {
    x0 = Math.min(x0, r.true_lon); x1 = Math.max(x1, r.true_lon); y0 = Math.min(y0, -r.true_lat); y1 = Math.max(y1, -r.true_lat);
  }
  let w = Math.max((x1 - x0) * 1.2, 20), h = Math.max((y1 - y0) * 1.2, 10);
  if (w / h > 2) h = w / 2; else w = h * 2;
  if (w >= 360) return setView([-180, -90, 360, 180]);
  const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
  const left = clamp((x0 + x1) / 2 - w / 2, -180, 180 - w), top = clamp((y0 + y1) / 2 - h / 2, -90, 90 - h);
  setView([left, top, w, h]);
}

function drawCells(r) {
  const g = $("cells");
  g.replaceChildren();
  const pmax = Math.max(...r.top.map((c) => c.probability), 1e-9);
  const feats = [...r.geojson.features].sort((a, b) => b.properties.rank - a.properties.rank);
  for (const f of feats) {
    const p = f.properties, color = COLORS[(p.rank - 1) % COLORS.length];
    const path = el("svg:path", {
      d: geometryPath(f.geometry), class: "cell", "data-cell": p.cell, "data-rank": p.rank,
      fill: color, "fill-opacity": (0.2 + 0.5 * p.probability / pmax).toFixed(2), stroke: color,
    });
    path.appendChild(el("svg:title", {}, `#${p.rank} ${p.place}: ${(100 * p.probability).toFixed(1)}% (${p.cell})`));
    g.appendChild(path);
  }
}

function drawMarks() {
  const g = $("marks");
  g.replaceChildren();
  const r = state.result;
  if (!r) return;
  const s = state.view[2] / 360;  // 1 at world view
  for (const c of [...r.top].reverse()) {
    g.appendChild(el("svg:text", { x: c.lon, y: -c.lat - 5.5 * s, class: "cell-label", "font-size": 7 * s, fill: "#fff" }, String(c.rank)));
  }
  if (r.true_lat !== null && r.true_lat !== undefined) {
    g.appendChild(el("svg:path", { d: `M${r.lon} ${-r.lat}L${r.true_lon} ${-r.true_lat}`, class: "truth-line" }));
    g.appendChild(el("svg:circle", { cx: r.true_lon, cy: -r.true_lat, r: 2.4 * s, class: "mark-truth" }));
  }
  g.appendChild(el("svg:circle", { cx: r.lon, cy: -r.lat, r: 2.4 * s, class: "mark-pred" }));
}

function fmtLatLon(lat, lon, digits = 3) {
  return `${Math.abs(lat).toFixed(digits)}°${lat >= 0 ? "N" : "S"}, ${Math.abs(lon).toFixed(digits)}°${lon >= 0 ? "E" : "W"}`;
}

function showTable(r) {
  const body = $("results").querySelector("tbody");
  body.replaceChildren();
  const pmax = Math.max(...r.top.map((c) => c.probability), 1e-9);
  for (const c of r.top) {
    const tr = el("tr", { class: "cell-row", "data-cell": c.cell });
    const rank = el("td");
    const badge = el("span", { class: "rank" }, String(c.rank));
    badge.style.background = COLORS[(c.rank - 1) % COLORS.length];
    rank.appendChild(badge);
    const prob = el("td", { class: "num" });
    const bar = el("span", { class: "bar" });
    bar.style.width = `${Math.max(2, 60 * c.probability / pmax)}px`;
    prob.append(bar, `${(100 * c.probability).toFixed(1)}%`);
    const place = el("td", { class: "place" });
    place.append(el("div", { class: "name" }, c.place), el("div", { class: "h3" }, c.cell));
    tr.append(rank, place, prob, el("td", { class: "num" }, fmtLatLon(c.lat, c.lon, 2)));
    body.appendChild(tr);
  }
  $("results").hidden = false;
  const s = $("summary");
  s.replaceChildren();
  s.append(el("div", { class: "big" }, `${r.place}`),
           el("div", {}, `prediction ${fmtLatLon(r.lat, r.lon)} · confidence ${(100 * r.confidence).toFixed(1)}%`));
  if (r.ood) s.append(el("div", { class: "warn", role: "alert" }, `⚠ ${r.warning}`));
  if (r.prediction_set && r.prediction_set.sentence) {
    s.append(el("div", { class: "set" }, `${Math.round(100 * r.prediction_set.coverage)}% set: ${r.prediction_set.sentence}`));
  }
  if (r.regions && r.regions.length) {
    s.append(el("div", { class: "regions" },
      "regions: " + r.regions.map((g) => `${g.region} ${(100 * g.probability).toFixed(1)}%`).join(" · ")));
  }
  if (r.error_km !== null && r.error_km !== undefined) {
    s.append(el("div", {}, `EXIF GPS ${fmtLatLon(r.true_lat, r.true_lon)} · error ${Math.round(r.error_km).toLocaleString()} km`));
  }
  if (r.views && r.views.length > 1) s.append(el("div", { id: "views" }, `${r.views.length} views of one place, probabilities averaged`));
  for (const d of r.dropped || []) s.append(el("div", { class: "dropped" }, `view dropped: ${d}`));
  s.append(el("div", { class: "card" }, `${r.engine} · ${r.elapsed_ms.toFixed(0)} ms`));
  s.hidden = false;
}

function clearResult() {
  // nothing of a previous photo's answer may stay on screen next to a new photo or an error
  state.result = null;
  $("cells").replaceChildren();
  $("marks").replaceChildren();
  $("results").querySelector("tbody").replaceChildren();
  $("results").hidden = true;
  $("summary").replaceChildren();
  $("summary").hidden = true;
  $("zoom-cells").disabled = true;
}

async function predict(fileList) {
  // one photo, or up to 4 views of one place (the server says so if there are more)
  const files = Array.from(fileList);
  const label = files.length > 1 ? `${files.length} views (${files.map((f) => f.name).join(", ")})` : files[0].name;
  $("error").hidden = true;
  clearResult();
  document.body.dataset.state = "busy";
  $("status").textContent = `predicting ${label}…`;
  const prev = $("preview");
  if (prev.src) URL.revokeObjectURL(prev.src);
  prev.src = URL.createObjectURL(files[0]);
  prev.hidden = false;
  $("drop-text").hidden = true;
  const form = new FormData();
  for (const file of files) form.append("file", file, file.name);
  try {
    const res = await fetch("/predict?top_k=5", { method: "POST", body: form });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(typeof body.detail === "string" ? body.detail : `HTTP ${res.status}`);
    state.result = body;
    drawCells(body);
    showTable(body);
    $("zoom-cells").disabled = false;
    setView([-180, -90, 360, 180]);
    $("status").textContent = `${label}: ${body.top.length} cells`;
    document.body.dataset.state = "done";
  } catch (e) {
    clearResult();
    setView([-180, -90, 360, 180]);
    $("status").textContent = "";
    $("error").textContent = `Could not predict ${label}: ${e.message}`;
    $("error").hidden = false;
    document.body.dataset.state = "error";
  }
}

function wire() {
  const drop = $("drop"), input = $("file");
  input.addEventListener("change", () => { if (input.files.length) predict(input.files); });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) predict(e.dataTransfer.files); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  $("zoom-world").addEventListener("click", () => setView([-180, -90, 360, 180]));
  $("zoom-cells").addEventListener("click", zoomToCells);
}

drawGraticule();
wire();
loadModelCard();
drawWorld().then(() => { document.body.dataset.ready = "1"; });
