// pdserve operator dashboard. Reads GET /admin/events (server-sent events, read with fetch so the
// key can go in the Authorization header) and acts through the gateway's /admin routes. No build
// step, no libraries: the charts are plain SVG.
"use strict";

const KEY_STORE = "pdserve-dashboard-key";
const KEEP_SAMPLES = 600;
const RETRY_MS = 2000;
const ROLES = ["prefill", "decode", "both"];

const state = { key: sessionStorage.getItem(KEY_STORE) || "", timeline: [], overview: null, stream: null };

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function headers() {
  const h = { "X-Pdserve-Client": "dashboard" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

// ------------------------------------------------------------------ formatting

function fmt(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString("en");
  return value.toFixed(digits);
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return n.toFixed(n >= 100 || i === 0 ? 0 : 1) + " " + units[i];
}

function duration(s) {
  if (!s) return "-";
  if (s < 60) return Math.round(s) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
}

function pct(x) { return x === null || x === undefined ? "-" : Math.round(x * 100) + "%"; }

function clock(t) { return new Date(t * 1000).toLocaleTimeString("en-GB"); }

// ------------------------------------------------------------------ the stream

async function connect() {
  if (state.stream) state.stream.abort();
  const controller = new AbortController();
  state.stream = controller;
  state.timeline = [];
  setConnection("wait", "connecting");
  try {
    const response = await fetch("/admin/events", { headers: headers(), signal: controller.signal });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      const message = (body.error && body.error.message) || response.statusText;
      setConnection("down", response.status === 401 ? "needs a key" : "error " + response.status);
      showStatus(message, "error");
      return;  // a wrong key: wait for the operator to enter another
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        handleMessage(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (err) {
    if (controller.signal.aborted) return;  // replaced by a new connection
  }
  if (state.stream === controller) {
    setConnection("down", "reconnecting");
    setTimeout(() => { if (state.stream === controller) connect(); }, RETRY_MS);
  }
}

function handleMessage(text) {
  let event = "message";
  const data = [];
  for (const line of text.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length) return;
  const payload = JSON.parse(data.join("\n"));
  if (event === "error") {
    setConnection("down", "router unavailable");
    return;
  }
  const last = state.timeline.length ? state.timeline[state.timeline.length - 1].at : -Infinity;
  state.timeline.push(...payload.timeline.filter((s) => s.at > last));
  if (state.timeline.length > KEEP_SAMPLES) state.timeline.splice(0, state.timeline.length - KEEP_SAMPLES);
  state.overview = payload;
  setConnection("live", "live " + new Date().toLocaleTimeString("en-GB"));
  render(payload);
}

function setConnection(kind, text) {
  const node = $("connection");
  node.className = "pill pill-" + kind;
  node.textContent = text;
}

// ------------------------------------------------------------------ rendering

function render(o) {
  $("model").textContent = o.model;
  $("policy").textContent = o.policy;
  $("planner").textContent = o.planner_running ? "running" : "paused";
  $("index").textContent = `${o.index.backend}, ${o.index.available ? "available" : "UNAVAILABLE"}, ${o.index.entries} entries`;
  $("inflight").textContent = o.requests_in_flight;
  const access = $("access");
  access.textContent = o.can_act ? "admin" : (o.admin_enabled ? "read-only" : "read-only (no admin key set)");
  access.className = "pill " + (o.can_act ? "pill-admin" : "pill-ro");
  renderWorkers(o);
  renderFlow(o);
  renderCharts(o);
  renderEvents(o);
  renderSettings(o);
}

function kvBar(used, total) {
  const share = total ? used / total : 0;
  const cls = "bar" + (share > 0.95 ? " full" : share > 0.75 ? " high" : "");
  return el("div", { class: cls, title: `${used} of ${total} KV blocks in use`, role: "meter",
                     "aria-valuenow": used, "aria-valuemin": 0, "aria-valuemax": total },
    el("span", { style: `width:${(share * 100).toFixed(1)}%` }), el("em", {}, `${used}/${total}`));
}

function workerActions(w) {
  if (!w.alive) return el("span", { class: "muted" }, "-");
  const select = el("select", { "aria-label": `new role for ${w.worker_id}`, "data-role-select": w.worker_id },
    ROLES.filter((r) => r !== w.role).map((r) => el("option", { value: r }, r)));
  const drained = w.state === "draining";
  return el("div", { class: "actions" },
    select,
    el("button", { type: "button", "data-action": "role", onclick: () => askRole(w.worker_id, select.value) }, "Switch role"),
    el("button", { type: "button", "data-action": drained ? "undrain" : "drain",
                   onclick: () => askWorker(w.worker_id, drained ? "undrain" : "drain") }, drained ? "Undrain" : "Drain"),
    el("button", { type: "button", "data-action": "restart", onclick: () => askWorker(w.worker_id, "restart") }, "Restart"));
}

function renderWorkers(o) {
  const body = $("workers").tBodies[0];
  const focused = document.activeElement && document.activeElement.closest && document.activeElement.closest("tr");
  const chosen = {};  // keep the operator's pending role choice across refreshes
  for (const s of body.querySelectorAll("select[data-role-select]")) chosen[s.dataset.roleSelect] = s.value;
  const rows = o.workers.map((w) => {
    const spec = w.spec_acceptance_rate === null ? "-" : `${pct(w.spec_acceptance_rate)} (${fmt(w.spec_mean_accepted_length, 2)})`;
    return el("tr", { "data-worker": w.worker_id },
      el("td", {}, el("b", {}, w.worker_id), w.slot !== w.worker_id ? el("span", { class: "muted" }, ` (${w.slot})`) : null),
      el("td", { "data-role": w.role }, el("span", { class: "role role-" + w.role }, w.role)),
      el("td", { "data-state": w.state }, el("span", { class: "state state-" + w.state }, w.state)),
      el("td", { class: "num" }, w.restarts),
      el("td", { class: "num" }, duration(w.uptime_s)),
      el("td", { class: "num" }, `${w.waiting} / ${w.running}`),
      el("td", { class: "num" }, w.queued_prefill_tokens),
      el("td", {}, kvBar(w.kv_blocks_used, w.kv_blocks_total)),
      el("td", { class: "num" }, pct(w.prefix_cache_hit_rate)),
      el("td", { class: "num" }, fmt(w.step_ms, 1) + " ms"),
      el("td", { class: "num" }, spec),
      el("td", {}, workerActions(w)));
  });
  if (focused && body.contains(focused)) {
    // The operator is using a row's controls: refresh the numbers of the others only.
    for (const row of rows) {
      const old = body.querySelector(`tr[data-worker="${CSS.escape(row.dataset.worker)}"]`);
      if (old && old !== focused) old.replaceWith(row);
    }
    return;
  }
  body.replaceChildren(...rows);
  for (const s of body.querySelectorAll("select[data-role-select]")) {
    if (chosen[s.dataset.roleSelect] && [...s.options].some((opt) => opt.value === chosen[s.dataset.roleSelect])) {
      s.value = chosen[s.dataset.roleSelect];
    }
  }
}

function renderFlow(o) {
  const latest = state.timeline[state.timeline.length - 1];
  $("stat-requests").textContent = latest ? fmt(latest.requests_per_s) : "-";
  $("stat-tokens").textContent = latest ? fmt(latest.tokens_per_s) : "-";
  $("stat-migrations").textContent = latest ? fmt(latest.migrations_per_s) : "-";
  $("stat-goodput").textContent = latest ? pct(latest.slo_met) : "-";
  const rows = o.kv_flows.map((f) => el("tr", { "data-flow": `${f.sender}>${f.receiver}` },
    el("td", {}, f.sender), el("td", {}, f.receiver),
    el("td", { class: "num" }, bytes(f.bytes_per_s) + "/s"), el("td", { class: "num", "data-total": f.bytes_total }, bytes(f.bytes_total))));
  $("flows").tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 4, class: "muted" }, "no KV transfers yet"))]));
}

function renderCharts(o) {
  const slo = (o.settings.router && o.settings.router.slo) || {};
  const t = state.timeline;
  const series = (name, key, color, dash) => ({ name, color, dash, points: t.map((s) => [s.at, s[key]]) });
  lineChart($("chart-ttft"), [series("p50", "ttft_p50_ms", "var(--p50)"), series("p99", "ttft_p99_ms", "var(--p99)")], slo.ttft_ms);
  lineChart($("chart-itl"), [series("p50", "itl_p50_ms", "var(--p50)"), series("p99", "itl_p99_ms", "var(--p99)")], slo.itl_ms);
  lineChart($("chart-tps"), [series("tokens/s", "tokens_per_s", "var(--tps)"), series("goodput req/s", "goodput_per_s", "var(--good)", "4 3")]);
}

// A time-series line chart in `svg` (viewBox 600x170): one line per series, a dashed SLO line.
function lineChart(svg, seriesList, sloValue) {
  const W = 600, H = 170, left = 46, right = 8, top = 8, bottom = 22;
  const all = seriesList.flatMap((s) => s.points).filter((p) => p[1] !== null && p[1] !== undefined);
  const now = Date.now() / 1000;
  const t0 = Math.min(now - 60, ...all.map((p) => p[0]));
  let ymax = Math.max(1e-9, ...all.map((p) => p[1]), sloValue || 0);
  ymax = niceCeil(ymax * 1.1);
  const x = (t) => left + ((t - t0) / Math.max(1, now - t0)) * (W - left - right);
  const y = (v) => top + (1 - v / ymax) * (H - top - bottom);
  const ns = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  };
  const parts = [];
  for (let i = 0; i <= 4; i += 1) {
    const v = (ymax * i) / 4;
    parts.push(node("line", { x1: left, x2: W - right, y1: y(v), y2: y(v), stroke: "#e4e7ec" }));
    parts.push(node("text", { x: left - 4, y: y(v) + 4, "text-anchor": "end" }, fmt(v, v < 10 ? 1 : 0)));
  }
  parts.push(node("text", { x: left, y: H - 6 }, clock(t0)));
  parts.push(node("text", { x: W - right, y: H - 6, "text-anchor": "end" }, "now"));
  if (sloValue) {
    parts.push(node("line", { x1: left, x2: W - right, y1: y(sloValue), y2: y(sloValue), stroke: "var(--slo)", "stroke-dasharray": "6 4" }));
    parts.push(node("text", { x: W - right - 2, y: y(sloValue) - 3, "text-anchor": "end" }, "SLO " + fmt(sloValue, 0)));
  }
  let legendX = left + 6;
  for (const s of seriesList) {
    const segments = [];
    let current = [];
    for (const [t, v] of s.points) {
      if (v === null || v === undefined) { if (current.length) segments.push(current); current = []; continue; }
      current.push(`${x(t).toFixed(1)},${y(v).toFixed(1)}`);
    }
    if (current.length) segments.push(current);
    for (const seg of segments) {
      parts.push(node("polyline", { points: seg.join(" "), fill: "none", stroke: s.color, "stroke-width": 2,
                                    "stroke-dasharray": s.dash || "none" }));
    }
    parts.push(node("rect", { x: legendX, y: top + 2, width: 14, height: 3, fill: s.color }));
    parts.push(node("text", { x: legendX + 18, y: top + 8 }, s.name));
    legendX += 30 + s.name.length * 7;
  }
  svg.replaceChildren(...parts);
}

function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function renderEvents(o) {
  const items = o.events.slice().reverse().map((e) => el("li", { "data-kind": e.kind },
    el("time", { datetime: new Date(e.at * 1000).toISOString() }, clock(e.at)),
    el("span", { class: "kind kind-" + e.kind }, e.kind), " ", e.text,
    e.requested_by ? el("span", { class: "by" }, ` — by ${e.requested_by}`) : null));
  $("events").replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "nothing yet")]));
  renderExperts(o);
}

function renderExperts(o) {
  // Token slots each rank's experts computed since the worker started, with its queues and KV.
  const groups = o.workers.filter((w) => w.ranks && w.ranks.length);
  if (!groups.length) {
    $("experts").replaceChildren("Expert parallelism is not running in this cluster (each worker holds every expert): no per-rank load to show.");
    return;
  }
  $("experts").replaceChildren(...groups.map((w) => {
    const top = Math.max(1, ...w.ranks.map((r) => r.expert_tokens));
    return el("div", { "data-group": w.worker_id }, el("b", {}, w.worker_id), " ",
      ...w.ranks.map((r) => el("span", { class: "rank", title: `rank ${r.rank}: ${r.expert_tokens} expert token slots, ${r.waiting} waiting / ${r.running} running, RSS ${bytes(r.rss_bytes)}` },
        ` rank ${r.rank}: ${r.expert_tokens} (${pct(r.expert_tokens / top)} of max), ${r.waiting} / ${r.running}, KV ${r.kv_blocks_used}/${r.kv_blocks_total}, RSS ${bytes(r.rss_bytes)};`)));
  }));
}

function renderSettings(o) {
  const s = o.settings, model = s.model || {}, planner = s.role_planner || {}, router = s.router || {};
  const spec = model.speculative_method ? `${model.speculative_method}, ${model.num_speculative_tokens} tokens` : "off";
  const rows = [
    ["model", `${model.name || o.model} (${model.dtype || "?"}, ${s.device || "?"})`],
    ["context window", `${model.max_model_len} tokens; KV ${model.num_kv_blocks} blocks of ${model.block_size} per worker`],
    ["workers at start", Object.entries(s.workers || {}).map(([r, n]) => `${n} ${r}`).join(", ")],
    ["placement policy", o.policy],
    ["speculative decoding", spec],
    ["role planner", `${o.planner_running ? "running" : "paused"}; ` + Object.entries(planner).map(([k, v]) => `${k} ${v}`).join(", ")],
    ["SLO", router.slo ? `TTFT ≤ ${router.slo.ttft_ms} ms, ITL ≤ ${router.slo.itl_ms} ms` : "-"],
    ["restart dead workers", s.restart_dead ? "yes" : "no"],
  ];
  $("settings").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const select = $("policy-select");
  const policies = router.policies || [o.policy];
  if (select.options.length !== policies.length || document.activeElement !== select) {
    const keep = select.value;
    select.replaceChildren(...policies.map((p) => el("option", { value: p }, p)));
    select.value = policies.includes(keep) && keep !== "" ? keep : o.policy;
  }
  $("planner-toggle").textContent = o.planner_running ? "Pause planner" : "Resume planner";
}

// ------------------------------------------------------------------ actions

function confirmAction(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

function showStatus(text, kind) {
  const node = $("action-status");
  node.textContent = text;
  node.className = "action-status " + (kind || "");
}

async function act(what, path, body) {
  if (!(await confirmAction(`${what}?`))) { showStatus(`cancelled: ${what}`); return; }
  showStatus(`${what}: working…`);
  const init = { method: "POST", headers: { ...headers(), "Content-Type": "application/json" } };
  if (body) init.body = JSON.stringify(body);
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    showStatus(`${what}: the gateway did not answer`, "error");
    return;
  }
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (answer.error && answer.error.message) || response.statusText;
    showStatus(`${what}: refused (${response.status}): ${message}`, "error");
    return;
  }
  showStatus(`${what}: done${answer.message ? ": " + answer.message : ""}`, "done");
  if (document.activeElement) document.activeElement.blur();  // let its row refresh again
}

function askRole(workerId, role) {
  return act(`Switch ${workerId} to ${role}`, `/admin/workers/${encodeURIComponent(workerId)}/role`, { role });
}

function askWorker(workerId, action) {
  return act(`${action[0].toUpperCase() + action.slice(1)} ${workerId}`,
             `/admin/workers/${encodeURIComponent(workerId)}/${action}`);
}

function wire() {
  $("key").value = state.key;
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value.trim();
    if (state.key) sessionStorage.setItem(KEY_STORE, state.key); else sessionStorage.removeItem(KEY_STORE);
    connect();
  });
  $("policy-apply").addEventListener("click", () => {
    const policy = $("policy-select").value;
    act(`Change the placement policy to ${policy}`, "/admin/policy", { policy });
  });
  $("planner-toggle").addEventListener("click", () => {
    const running = state.overview && state.overview.planner_running;
    act(running ? "Pause the role planner" : "Resume the role planner", `/admin/planner/${running ? "pause" : "resume"}`);
  });
  connect();
}

wire();
