// framecast dashboard: draws the snapshots the server sends on /events (server-sent events).
// No framework and no build step; the charts are uPlot (static/uPlot.iife.min.js, MIT).
// Every value from the streams reaches the page through textContent, never as HTML.
"use strict";

const PAGE_SIZE = 16;
const TILE_W = 224, TILE_H = 168;
const COLORS = ["#1f6feb", "#d29922", "#8957e5", "#2da44e", "#cf222e", "#0969da", "#bf8700",
  "#57606a"];

const view = { page: 0, filter: "", sort: "name", last: null, charts: {}, tiles: new Map() };
const $ = (id) => document.getElementById(id);

function fmt(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits });
}
function pct(value) { return value === null || value === undefined ? "-" : (100 * value).toFixed(1) + " %"; }
function ago(ms, now) {
  if (!ms) return "-";
  const s = Math.max(0, (now - ms) / 1000);
  return s < 60 ? s.toFixed(0) + " s ago" : (s / 60).toFixed(0) + " min ago";
}
function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
function fillTable(id, rows, build) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  for (const item of rows) build(body.insertRow(), item);
}

// -- header and numbers ---------------------------------------------------------------------
function drawNumbers(s) {
  const w = s.window, t = s.totals;
  $("k-labelled").textContent = fmt(t.labelled, 0);
  $("k-window").textContent = `(${w.seconds} s)`;
  $("k-fps").textContent = fmt(w.fps);
  $("k-p50").textContent = w.p50_ms === null ? "-" : fmt(w.p50_ms) + " ms";
  $("k-p99").textContent = w.p99_ms === null ? "-" : fmt(w.p99_ms) + " ms";
  $("k-accuracy").textContent = pct(t.accuracy);
  $("k-dropped").textContent = fmt(t.dropped, 0);
  $("k-dlq").textContent = fmt(s.dlq.in_topic ?? s.dlq.total, 0);
  $("k-lag").textContent = s.lag.total === null ? "-" : fmt(s.lag.total, 0);
  $("k-cameras").textContent = fmt(t.cameras, 0);

  const m = s.model, serve = s.serve;
  let text = "model: waiting for labels";
  if (m) {
    text = `model: ${m.name} ${m.version}` + (m.sha256 ? ` · sha256 ${String(m.sha256).slice(0, 12)}` : "");
  }
  if (serve && serve.model) text += ` · ${serve.model.runtime} ${serve.model.precision || ""} · Serve ${serve.status}`;
  else if (serve) text += ` · Serve ${serve.status}`;
  const seen = Object.keys(s.models_seen || {});
  if (seen.length > 1) text += ` · ${seen.length} models seen`;
  $("model").textContent = text;

  const waiting = $("waiting");
  waiting.textContent = s.waiting_for.length ? `waiting for topics: ${s.waiting_for.join(", ")}` : "";
  waiting.classList.toggle("hidden", !s.waiting_for.length);
  const p = s.process || {};
  $("footer").textContent = `updated every ${s.update_ms} ms · dashboard process: ` +
    `${fmt(p.cpu_percent)} % of a core, ${fmt(p.rss_mb, 0)} MiB` +
    (t.bad_records ? ` · ${t.bad_records} unreadable records` : "") +
    (t.cameras_refused ? ` · ${t.cameras_refused} labels of cameras over the limit` : "");
}

// -- charts ---------------------------------------------------------------------------------
function chartWidth(id) { return Math.max(280, $(id).clientWidth - 8); }

function makeChart(id, series, data) {
  const old = view.charts[id];
  if (old) old.plot.destroy();
  const opts = {
    width: chartWidth(id), height: 200, series: [{}, ...series],
    scales: { x: { time: true } },
    axes: [
      { stroke: "#8b949e", grid: { stroke: "#21262d" }, ticks: { stroke: "#30363d" } },
      { stroke: "#8b949e", grid: { stroke: "#21262d" }, ticks: { stroke: "#30363d" }, size: 56 },
    ],
    legend: { live: false },
    cursor: { drag: { x: false, y: false } },
  };
  view.charts[id] = { plot: new uPlot(opts, data, $(id)), key: series.map((x) => x.label).join("|") };
}

function drawCharts(s) {
  const sr = s.series, names = Object.keys(sr.consumers);
  const fpsSeries = [{ label: "total", stroke: COLORS[0], width: 2, spanGaps: false }];
  const fpsData = [sr.t, sr.fps];
  const latSeries = [
    { label: "p50", stroke: COLORS[0], width: 2 },
    { label: "p99", stroke: COLORS[4], width: 2 },
  ];
  const latData = [sr.t, sr.p50, sr.p99];
  names.forEach((name, i) => {
    const color = COLORS[(i + 1) % COLORS.length];
    fpsSeries.push({ label: name, stroke: color, dash: [4, 3], spanGaps: true });
    fpsData.push(sr.consumers[name].fps);
    latSeries.push({ label: `${name} p99`, stroke: color, dash: [4, 3], spanGaps: true });
    latData.push(sr.consumers[name].p99);
  });
  for (const [id, series, data] of [["chart-fps", fpsSeries, fpsData], ["chart-latency", latSeries, latData]]) {
    const chart = view.charts[id];
    if (!chart || chart.key !== series.map((x) => x.label).join("|")) makeChart(id, series, data);
    else chart.plot.setData(data);
  }
}

window.addEventListener("resize", () => {
  for (const [id, chart] of Object.entries(view.charts)) {
    chart.plot.setSize({ width: chartWidth(id), height: 200 });
  }
});

// -- tables ---------------------------------------------------------------------------------
function drawTables(s) {
  fillTable("consumers", s.consumers, (row, c) => {
    cell(row, c.consumer);
    cell(row, fmt(c.fps), "num");
    cell(row, fmt(c.p50_ms), "num");
    cell(row, fmt(c.p99_ms), "num");
    cell(row, fmt(c.lag, 0), "num");
    cell(row, fmt(c.dropped_total, 0), "num");
    cell(row, fmt(c.dlq_total, 0), "num");
    cell(row, ago(c.at_ms, s.now_ms), c.stale ? "stale" : "");
  });
  const topic = s.lag.partitions.length ? s.lag.partitions[0].topic : "";
  $("lag-group").textContent = s.lag.group ? `group ${s.lag.group} on ${topic}` : "";
  fillTable("lag", s.lag.partitions, (row, p) => {
    cell(row, String(p.partition));
    cell(row, p.committed === null ? "none" : fmt(p.committed, 0), "num");
    cell(row, fmt(p.end, 0), "num");
    cell(row, p.lag === null ? "-" : fmt(p.lag, 0), "num");
  });
  const lagError = $("lag-error");
  lagError.textContent = s.lag.error || "";
  lagError.classList.toggle("hidden", !s.lag.error);

  const reasons = Object.entries(s.dlq.reasons).map(([r, n]) => `${r} ${n}`).join(", ");
  $("dlq-summary").textContent = `${fmt(s.dlq.total, 0)} read` + (reasons ? ` · ${reasons}` : "");
  fillTable("dlq", s.dlq.latest, (row, d) => {
    row.className = "dead-letter";
    cell(row, d.timestamp_ms ? new Date(d.timestamp_ms).toLocaleTimeString() : "-");
    cell(row, d.reason, "reason").title = d.detail || d.class;
    const src = d.source;
    cell(row, src ? `${src.topic}[${src.partition}] @${src.offset}` + (src.row ? ` row ${src.row}` : "") : "-");
    cell(row, `${d.partition}@${d.offset}`, "num");
  });
}

// -- camera tiles ---------------------------------------------------------------------------
function chosenCameras(s) {
  const needle = view.filter.toLowerCase();
  let cams = s.cameras.filter((c) => c.id.toLowerCase().includes(needle));
  if (view.sort === "latency") cams = cams.slice().sort((a, b) => (b.e2e_ms ?? -1) - (a.e2e_ms ?? -1));
  if (view.sort === "stale") cams = cams.slice().sort((a, b) => a.labeled_at_ms - b.labeled_at_ms);
  return cams;
}

function newTile(id) {
  const tile = document.createElement("figure");
  tile.className = "tile";
  tile.dataset.streamId = id;
  const canvas = document.createElement("canvas");
  canvas.width = TILE_W;
  canvas.height = TILE_H;
  const caption = document.createElement("figcaption");
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = id;
  const label = document.createElement("span");
  label.className = "label";
  const meta = document.createElement("span");
  meta.className = "meta";
  caption.append(name, label, meta);
  tile.append(canvas, caption);
  const entry = { tile, canvas, label, meta, seq: null, loading: false, image: null, cam: null };
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#161b22";
  ctx.fillRect(0, 0, TILE_W, TILE_H);
  return entry;
}

function paint(entry) {
  const ctx = entry.canvas.getContext("2d");
  ctx.fillStyle = "#161b22";
  ctx.fillRect(0, 0, TILE_W, TILE_H);
  const img = entry.image, cam = entry.cam;
  if (img) {
    const k = Math.min(TILE_W / img.naturalWidth, TILE_H / img.naturalHeight);
    const w = img.naturalWidth * k, h = img.naturalHeight * k;
    ctx.imageSmoothingEnabled = img.naturalWidth >= 96;
    ctx.drawImage(img, (TILE_W - w) / 2, (TILE_H - h) / 2, w, h);
  }
  // The label drawn is the pictured frame's own when it is known, else the camera's latest.
  const pic = cam && cam.picture;
  const label = pic && pic.label !== null ? pic.label : cam && cam.label;
  const score = pic && pic.label !== null ? pic.score : cam && cam.score;
  if (label !== null && label !== undefined) {
    const text = `${label}  ${score === null || score === undefined ? "" : (100 * score).toFixed(0) + " %"}`;
    ctx.font = "bold 14px system-ui, sans-serif";
    const width = ctx.measureText(text).width + 12;
    ctx.fillStyle = "rgba(13, 17, 23, 0.78)";
    ctx.fillRect(4, TILE_H - 26, width, 22);
    ctx.fillStyle = "#7ee787";
    ctx.fillText(text, 10, TILE_H - 10);
  }
  if (pic) {
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "rgba(255, 255, 255, 0.8)";
    ctx.fillText(`#${pic.frame_index}`, 6, 14);
  }
}

function loadPicture(entry, cam) {
  const pic = cam.picture;
  if (!pic || pic.seq === entry.seq || entry.loading) return;
  entry.loading = true;
  const img = new Image();
  img.onload = () => { entry.loading = false; entry.seq = pic.seq; entry.image = img; paint(entry); };
  img.onerror = () => { entry.loading = false; entry.seq = pic.seq; };
  img.src = `/frame?id=${encodeURIComponent(cam.id)}&v=${pic.seq}`;
}

function drawTiles(s) {
  const cams = chosenCameras(s);
  const pages = Math.max(1, Math.ceil(cams.length / PAGE_SIZE));
  view.page = Math.min(view.page, pages - 1);
  $("page").textContent = `${view.page + 1} / ${pages}`;
  $("camera-count").textContent = `${cams.length} of ${s.cameras.length}`;
  const shown = cams.slice(view.page * PAGE_SIZE, (view.page + 1) * PAGE_SIZE);
  const container = $("tiles");
  const keep = new Set(shown.map((c) => c.id));
  for (const [id, entry] of view.tiles) {
    if (!keep.has(id)) { entry.tile.remove(); view.tiles.delete(id); }
  }
  shown.forEach((cam, i) => {
    let entry = view.tiles.get(cam.id);
    if (!entry) { entry = newTile(cam.id); view.tiles.set(cam.id, entry); }
    if (container.children[i] !== entry.tile) container.insertBefore(entry.tile, container.children[i] || null);
    entry.cam = cam;
    entry.label.textContent = cam.label ?? (cam.status === "dropped_deadline" ? "dropped" : "-");
    entry.label.dataset.label = cam.label ?? "";
    entry.label.dataset.frameIndex = cam.frame_index ?? "";
    entry.tile.classList.toggle("dropped", cam.status === "dropped_deadline");
    entry.meta.textContent = `#${cam.frame_index ?? "-"} · ` +
      `${cam.score === null ? "" : (100 * cam.score).toFixed(0) + " % · "}` +
      `${cam.e2e_ms === null ? "-" : fmt(cam.e2e_ms) + " ms"} · ${fmt(cam.labelled, 0)} fr` +
      (cam.accuracy === null ? "" : ` · acc ${(100 * cam.accuracy).toFixed(0)}%`);
    loadPicture(entry, cam);
    paint(entry);
  });
}

// -- the stream of snapshots ----------------------------------------------------------------
function draw(s) {
  view.last = s;
  drawNumbers(s);
  drawCharts(s);
  drawTables(s);
  drawTiles(s);
  document.body.dataset.seq = String(s.seq);
}

function connect() {
  const conn = $("conn");
  const events = new EventSource("/events");
  events.onopen = () => { conn.textContent = "live"; conn.className = "conn on"; };
  events.onmessage = (e) => draw(JSON.parse(e.data));
  events.onerror = () => { conn.textContent = "reconnecting"; conn.className = "conn off"; };
}

$("filter").addEventListener("input", (e) => { view.filter = e.target.value; view.page = 0; if (view.last) drawTiles(view.last); });
$("sort").addEventListener("change", (e) => { view.sort = e.target.value; if (view.last) drawTiles(view.last); });
$("prev").addEventListener("click", () => { view.page = Math.max(0, view.page - 1); if (view.last) drawTiles(view.last); });
$("next").addEventListener("click", () => { view.page += 1; if (view.last) drawTiles(view.last); });
connect();
