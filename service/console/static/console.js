// Ferry console: calls the API with the token kept in sessionStorage and follows its SSE routes.
// The token travels only in the Authorization header (never in a URL), so live streams are read
// with fetch() and parsed here rather than with EventSource, which cannot send that header.
"use strict";

const V1 = "/api/v1";
const TOKEN_KEY = "ferry.token";
const STATUSES = ["created", "in-progress", "success", "failed", "terminated"];
const TERMINAL = new Set(["success", "failed", "terminated"]);
const body = document.body;
const params = JSON.parse(body.dataset.params || "{}");
const content = () => document.getElementById("content");
let me = null; // the caller's token: {id, name, role, project}

// ---------------------------------------------------------------- small DOM helpers

function h(tag, attrs, ...children) {
  const el = document.createElementNS(
    tag === "svg" || attrs?.svg ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml",
    tag,
  );
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "svg" || value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else if (key === "style") el.style.cssText = value; // CSSOM: allowed by the page's CSP
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}
const s = (tag, attrs, ...children) => h(tag, { ...attrs, svg: true }, ...children);

// replaceChildren() that leaves out absent parts (null, undefined, false) instead of
// printing them.
function fill(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

// append() likewise.
function add(el, ...children) {
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function badge(status) {
  return h("span", { class: `badge s-${status}`, "data-status": status }, status);
}

function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { hour12: false });
}

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

function pretty(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

function flash(message, error = false) {
  const el = document.getElementById("flash");
  el.textContent = message || "";
  el.className = error ? "error" : "";
}

function card(title, ...children) {
  return h("section", { class: "card" }, title ? h("h2", {}, title) : null, ...children);
}

function table(headers, rows, attrs = {}) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      attrs,
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", typeof x === "string" ? {} : x[1], typeof x === "string" ? x : x[0])))),
      h("tbody", {}, rows),
    ),
  );
}

const canAct = () => me && me.role !== "viewer";

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, body) {
    const e = body?.error || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, payload) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}` };
  const init = { method, headers };
  if (payload !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(payload);
  }
  const response = await fetch(path, init);
  if (response.status === 401 && page !== "sign-in") {
    sessionStorage.removeItem(TOKEN_KEY);
    location.assign("/sign-in");
    throw new ApiError(401, null);
  }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// Lists ask for a large page; a server configured with a smaller FERRY_LIST_MAX_LIMIT refuses
// it on `limit`, and the list is then read with the server's default page size.
async function get(path) {
  try {
    return await api("GET", path);
  } catch (err) {
    if (err.status !== 422 || !(err.body?.error?.details || []).some((d) => d.field === "limit")) throw err;
    const url = new URL(path, location.origin);
    url.searchParams.delete("limit");
    return api("GET", url.pathname + url.search);
  }
}
const post = (path, payload) => api("POST", path, payload ?? {});

function query(values) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(values)) if (v !== "" && v !== null && v !== undefined) q.set(k, v);
  const text = q.toString();
  return text ? `?${text}` : "";
}

// An action button: shown only to roles that may act, disabled while its call runs.
function action(label, run, cls = "") {
  if (!canAct()) return null;
  const button = h("button", { type: "button", class: cls }, label);
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await run();
    } catch (err) {
      flash(`${label}: ${err.message}`, true);
    } finally {
      button.disabled = false;
    }
  });
  return button;
}

// Follow an SSE route: `onEvent(name, data, id)` for each event. Reconnects (resuming with
// Last-Event-ID) until the stream ends with an `end` event or `stop()` is called.
function follow(path, onEvent, { reconnect = true } = {}) {
  const controller = new AbortController();
  let lastId = null;
  let stopped = false;
  const run = async () => {
    while (!stopped) {
      try {
        const headers = {
          Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}`,
          Accept: "text/event-stream",
        };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const response = await fetch(path, { headers, signal: controller.signal });
        if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let name = "message", data = "", id = null;
            for (const line of block.split("\n")) {
              if (line.startsWith("id: ")) id = line.slice(4);
              else if (line.startsWith("event: ")) name = line.slice(7);
              else if (line.startsWith("data: ")) data += line.slice(6);
            }
            if (!data) continue;
            if (id) lastId = id;
            onEvent(name, JSON.parse(data), id);
            if (name === "end") stopped = true;
          }
        }
      } catch (err) {
        if (stopped || err.name === "AbortError") return;
        if (err.status === 401 || err.status === 403 || err.status === 404) return;
      }
      if (!reconnect) return;
      await new Promise((r) => setTimeout(r, 1000));
    }
  };
  run();
  return { stop: () => { stopped = true; controller.abort(); } };
}

// Call `fn` at most once per `ms`, with the latest call honoured.
function throttle(fn, ms) {
  let timer = null, again = false;
  return () => {
    if (timer) { again = true; return; }
    fn();
    timer = setTimeout(() => { timer = null; if (again) { again = false; fn(); } }, ms);
  };
}

// Names of services and projects, for showing instead of ids.
const names = { services: new Map(), projects: new Map() };
async function loadNames() {
  const [services, projects] = await Promise.all([
    get(`${V1}/services?limit=1000`).catch(() => ({ items: [] })),
    get(`${V1}/projects?limit=1000`).catch(() => ({ items: [] })),
  ]);
  for (const x of services.items) names.services.set(x.id, x);
  for (const x of projects.items) names.projects.set(x.id, x);
}
const serviceName = (id) => names.services.get(id)?.name || id;

// ---------------------------------------------------------------- pages

const pages = {};

pages["sign-in"] = () => {
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "off", required: true, size: 50 });
  const form = h(
    "form",
    { class: "card", id: "sign-in-form" },
    h("p", {}, "Sign in with a Ferry token. It is kept in this browser tab's session only."),
    h("div", { class: "row" }, h("label", {}, "Token", input), h("button", { type: "submit" }, "Sign in")),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      await api("GET", `${V1}/tokens/current`);
      location.assign("/executions");
    } catch (err) {
      sessionStorage.removeItem(TOKEN_KEY);
      flash(err.status === 401 ? "That token is not valid (or has expired)." : err.message, true);
    }
  });
  fill(content(), form);
  input.focus();
};

// -- executions

function executionRow(x, selected) {
  const check = canAct()
    ? h("input", { type: "checkbox", "aria-label": `select ${x.id}`, checked: selected.has(x.id) })
    : null;
  check?.addEventListener("change", () => (check.checked ? selected.add(x.id) : selected.delete(x.id)));
  return h(
    "tr",
    { "data-id": x.id, "data-status": x.status },
    canAct() ? h("td", {}, check) : null,
    h("td", {}, h("a", { href: `/executions/${x.id}` }, x.id.slice(-10))),
    h("td", {}, serviceName(x.service)),
    h("td", {}, x.function),
    h("td", { class: "status" }, badge(x.status), x.reason ? h("span", { class: "muted" }, ` ${x.reason}`) : null),
    h("td", { class: "opt" }, fmtTime(x.created_at)),
    h("td", { class: "opt" }, fmtMs(x.duration_ms)),
  );
}

pages.executions = async () => {
  await loadNames();
  const url = new URL(location.href);
  const filters = {};
  for (const k of ["project", "service", "function", "status", "trigger", "pipeline_execution"])
    filters[k] = url.searchParams.get(k) || "";
  // A page's size: `?limit=` when given (the API checks it), else 100.
  const limit = url.searchParams.get("limit") || 100;
  const selected = new Set();

  const field = (k, label, control) => h("label", {}, label, control);
  const projectSel = h("select", { name: "project" }, h("option", { value: "" }, "all"),
    [...names.projects.values()].map((p) => h("option", { value: p.id, selected: p.id === filters.project }, p.name)));
  const serviceSel = h("select", { name: "service" }, h("option", { value: "" }, "all"),
    [...names.services.values()].map((x) => h("option", { value: x.id, selected: x.id === filters.service }, x.name)));
  const statusSel = h("select", { name: "status" }, h("option", { value: "" }, "all"),
    STATUSES.map((x) => h("option", { value: x, selected: x === filters.status }, x)));
  const text = (k) => h("input", { name: k, value: filters[k], size: 14 });
  const form = h("form", { class: "card row", id: "filters" },
    me.role === "admin" ? field("project", "Project", projectSel) : null,
    field("service", "Service", serviceSel),
    field("function", "Function", text("function")),
    field("status", "Status", statusSel),
    field("trigger", "Trigger", text("trigger")),
    field("pipeline_execution", "Pipeline execution", text("pipeline_execution")),
    h("button", { type: "submit" }, "Filter"),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const data = Object.fromEntries(new FormData(form));
    if (url.searchParams.has("limit")) data.limit = limit;
    location.assign(`/executions${query(data)}`);
  });

  const counters = h("div", { class: "counters", id: "counters" });
  const tbody = h("tbody", { id: "executions" });
  const bulk = h("div", { class: "row" },
    action("Terminate selected", async () => {
      const ids = [...selected];
      const results = await Promise.allSettled(ids.map((id) => post(`${V1}/executions/${id}/terminate`)));
      const failed = results.filter((r) => r.status === "rejected").length;
      flash(`Asked to terminate ${ids.length - failed} execution(s)` + (failed ? `; ${failed} refused (already finished?)` : ""), failed > 0);
    }, "danger"),
    action("Rerun selected", async () => {
      const ids = [...selected];
      await Promise.all(ids.map((id) => post(`${V1}/executions/${id}/rerun`)));
      flash(`Reran ${ids.length} execution(s)`);
    }, "secondary"),
    h("span", { class: "muted", id: "live" }, "live"),
  );
  const headers = [...(canAct() ? [""] : []), "Execution", "Service", "Function", "Status", ["Created", { class: "opt" }], ["Duration", { class: "opt" }]];
  const tableEl = table(headers, [], { "aria-label": "executions" });
  tableEl.querySelector("tbody").replaceWith(tbody);
  // Paging follows the API's next_cursor; the cursors of the pages before are kept to go
  // back. Only the first page takes new rows from the live stream; every page shown keeps
  // its rows' statuses live.
  const cursors = []; // cursors[i]: the cursor the page i+1 was read with (null: the first)
  let next = null;
  const pageLabel = h("span", { class: "muted", id: "page-number" });
  const prevButton = h("button", { type: "button", class: "secondary", id: "previous-page" }, "Previous");
  const nextButton = h("button", { type: "button", class: "secondary", id: "next-page" }, "Next");
  const pager = h("div", { class: "row pager", id: "pager" }, pageLabel, prevButton, nextButton);
  const onFirstPage = () => cursors.length <= 1;
  const showPage = async (cursor) => {
    prevButton.disabled = nextButton.disabled = true;
    const list = await get(`${V1}/executions${query({ ...filters, limit, cursor })}`);
    selected.clear();
    fill(tbody, ...list.items.map((x) => executionRow(x, selected)));
    next = list.next_cursor;
    pageLabel.textContent = `page ${cursors.length}`;
    prevButton.disabled = onFirstPage();
    nextButton.disabled = !next;
    pager.hidden = onFirstPage() && !next; // one page: nothing to turn
    body.dataset.executionsPage = String(cursors.length);
    return list;
  };
  const turn = async (run) => {
    try {
      await run();
    } catch (err) {
      flash(`Paging: ${err.message}`, true);
      prevButton.disabled = onFirstPage();
      nextButton.disabled = !next;
    }
  };
  nextButton.addEventListener("click", () => turn(async () => {
    if (!next) return;
    cursors.push(next);
    await showPage(next);
  }));
  prevButton.addEventListener("click", () => turn(async () => {
    if (onFirstPage()) return;
    cursors.pop();
    await showPage(cursors[cursors.length - 1]);
  }));
  fill(content(), form, counters, card(null, bulk, tableEl, pager));

  const loadCounters = throttle(async () => {
    const c = await get(`${V1}/executions/counters${query({ project: filters.project, service: filters.service })}`);
    fill(counters, ...["created", "in-progress", "success", "failed", "terminated", "total"].map((k) =>
      h("div", { class: "counter", "data-counter": k }, h("b", {}, c[k] ?? 0), k)));
  }, 1000);
  loadCounters();
  cursors.push(null);
  const page1 = await showPage(null);
  if (!page1.items.length) flash("No executions yet: new ones appear here as they are created.");

  const matches = (x) =>
    (!filters.project || x.project === filters.project) &&
    (!filters.service || x.service === filters.service) &&
    (!filters.function || x.function === filters.function) &&
    (!filters.status || filters.status.split(",").includes(x.status)) &&
    (!filters.trigger || x.trigger === filters.trigger) &&
    (!filters.pipeline_execution || x.pipeline_execution === filters.pipeline_execution);
  follow(`${V1}/events/stream${query({ types: "execution.*", project: filters.project })}`, async (_, event) => {
    loadCounters();
    const id = event.resource_id;
    let x;
    try {
      x = await get(`${V1}/executions/${id}`);
    } catch {
      return;
    }
    if (!names.services.has(x.service)) await loadNames();
    const old = tbody.querySelector(`tr[data-id="${CSS.escape(id)}"]`);
    if (old) {
      if (old.dataset.status !== x.status) old.replaceWith(executionRow(x, selected));
    } else if (onFirstPage() && matches(x)) {
      const row = executionRow(x, selected);
      row.classList.add("fresh");
      tbody.prepend(row);
      flash("");
    }
  });
};

// -- one execution

pages.execution = async () => {
  const id = params.id;
  let x = await get(`${V1}/executions/${id}`);
  await loadNames();
  const head = h("div", { class: "card" });
  const timeline = h("ol", { class: "timeline", id: "timeline" });
  const attempts = h("div", { id: "attempts" });
  const io = h("div", { class: "grid" });
  const errorBox = h("div", { id: "error" });

  const render = () => {
    document.getElementById("title").textContent = `Execution ${x.function}`;
    const pct = x.progress?.percent ?? (TERMINAL.has(x.status) && x.status === "success" ? 100 : 0);
    fill(head, 
      h("div", { class: "row" },
        h("span", { id: "status" }, badge(x.status)),
        x.reason ? h("span", {}, `reason: ${x.reason}`) : null,
        h("span", { class: "muted" }, x.id),
        h("a", { href: `/services/${x.service}` }, serviceName(x.service)),
        x.pipeline_execution ? h("a", { href: `/pipeline-executions/${x.pipeline_execution}` }, `pipeline node ${x.pipeline_node}`) : null,
        x.rerun_of ? h("a", { href: `/executions/${x.rerun_of}` }, "rerun of …" + x.rerun_of.slice(-6)) : null,
        h("span", { class: "muted" }, `created ${fmtTime(x.created_at)} · took ${fmtMs(x.duration_ms)}`),
      ),
      h("div", { class: "row", style: "margin-top:8px" },
        h("div", { class: "progress", role: "progressbar", "aria-label": "progress", "aria-valuenow": pct, "aria-valuemin": 0, "aria-valuemax": 100 },
          h("div", { style: `width:${pct}%` })),
        h("span", { id: "progress-text" }, `${x.progress?.percent ?? "—"}%${x.progress?.message ? ` · ${x.progress.message}` : ""}`),
        TERMINAL.has(x.status) ? null : action("Terminate", async () => {
          x = await post(`${V1}/executions/${id}/terminate`);
          flash("Termination asked; the worker stops it shortly.");
          render();
        }, "danger"),
        action("Rerun", async () => {
          const again = await post(`${V1}/executions/${id}/rerun`);
          location.assign(`/executions/${again.id}`);
        }, "secondary"),
      ),
    );
    fill(timeline, ...x.status_log.map((e) =>
      h("li", {}, badge(e.status), ` ${fmtTime(e.at)}`, e.attempt ? ` · attempt ${e.attempt}` : "", e.reason ? ` · ${e.reason}` : "")));
    // Each attempt from the status log: an entry without an attempt belongs to the one before.
    const tries = [];
    let current = null;
    for (const e of x.status_log) {
      if (e.attempt && e.attempt !== current?.n) tries.push((current = { n: e.attempt, start: e.at }));
      if (current && e.status !== "in-progress") Object.assign(current, { end: e.at, status: e.status, reason: e.reason });
    }
    fill(attempts, h("p", {}, `Attempt ${x.attempt} of ${x.max_attempts} · timeout ${x.timeout_s} s`),
      tries.length ? table(["Attempt", "Started", "Ended", "How"], tries.map((t) => h("tr", {},
        h("td", {}, t.n), h("td", {}, fmtTime(t.start)), h("td", {}, fmtTime(t.end)),
        h("td", {}, t.status ? badge(t.status) : "running", t.reason ? ` ${t.reason}` : "")))) : null);
    fill(io, card("Input", pretty(x.input)), card("Output", x.output === null ? h("p", { class: "muted" }, TERMINAL.has(x.status) ? "none" : "none yet") : pretty(x.output)));
    fill(errorBox, x.error ? card("Error",
      h("p", {}, h("b", {}, x.error.type || "error"), `: ${x.error.message || ""}`),
      x.error.traceback ? h("pre", { class: "trace" }, x.error.traceback) : null) : "");
  };
  render();

  // Logs: the history and then live lines from one SSE stream until the execution ends.
  const logs = h("div", { class: "logs", id: "logs", tabindex: 0, role: "log", "aria-label": "logs" });
  const lines = [];
  const followBox = h("input", { type: "checkbox", id: "follow", checked: true });
  const search = h("input", { type: "search", id: "log-search", placeholder: "search the logs", "aria-label": "search the logs" });
  const applySearch = () => {
    const needle = search.value.toLowerCase();
    for (const el of logs.children) el.classList.toggle("hidden", Boolean(needle) && !el.textContent.toLowerCase().includes(needle));
  };
  search.addEventListener("input", applySearch);
  const toEnd = () => { logs.scrollTop = logs.scrollHeight; };
  const download = h("button", { type: "button", class: "secondary" }, "Download");
  download.addEventListener("click", () => {
    const blob = new Blob([lines.map((l) => `${l.at} ${l.stream} ${l.text}`).join("\n") + "\n"], { type: "text/plain" });
    const a = h("a", { href: URL.createObjectURL(blob), download: `${id}.log` });
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  });
  const end = h("button", { type: "button", class: "secondary" }, "Jump to end");
  end.addEventListener("click", toEnd);
  const refresh = throttle(async () => { x = await get(`${V1}/executions/${id}`); render(); }, 700);
  follow(`${V1}/executions/${id}/logs?follow=true&limit=10000`, (name, line) => {
    if (name === "end") { refresh(); return; }
    lines.push(line);
    const el = h("div", { class: line.stream }, line.text);
    if (search.value && !line.text.toLowerCase().includes(search.value.toLowerCase())) el.classList.add("hidden");
    logs.append(el);
    if (followBox.checked) toEnd();
    refresh();
  });
  // Status changes arrive on the event stream; progress between them is read while it runs.
  follow(`${V1}/events/stream?types=execution.*`, (_, event) => { if (event.resource_id === id) refresh(); });
  const tick = setInterval(() => { if (TERMINAL.has(x.status)) clearInterval(tick); else refresh(); }, 2000);

  fill(content(), 
    head, errorBox,
    h("div", { class: "grid" }, card("Status timeline", timeline), card("Attempts", attempts)),
    io,
    card("Logs", h("div", { class: "row", style: "margin-bottom:8px" },
      h("label", { class: "inline" }, followBox, "Follow"), search, end, download), logs),
  );
};

// -- services

pages.services = async () => {
  const list = await get(`${V1}/services?limit=1000`);
  const rows = await Promise.all(list.items.map(async (x) => {
    const st = await get(`${V1}/services/${x.id}/status`).catch(() => null);
    return h("tr", {},
      h("td", {}, h("a", { href: `/services/${x.id}` }, x.name)),
      h("td", {}, badge(x.status)),
      h("td", { class: "opt" }, `${x.package.slice(-8)} r${x.package_revision}`),
      h("td", {}, st ? `${st.replicas.length} / ${st.desired_replicas}` : "—"),
      h("td", {}, st ? st.queue_length : "—"),
      h("td", {}, st ? st.in_progress : "—"));
  }));
  fill(content(), card(null, list.items.length ? table(["Service", "Status", ["Package", { class: "opt" }], "Replicas", "Queue", "Running"], rows) : h("p", {}, "No services yet.")));
};

// The scale limits and rollout form of a service: typed fields that PATCH the service, with
// the API's 422 field errors shown next to the fields they name.
const SCALE_FIELDS = [
  ["min_replicas", "Min replicas", 0, 100],
  ["max_replicas", "Max replicas", 0, 100],
  ["target_queue_per_replica", "Target queue per replica", 1, 100000],
  ["concurrency", "Concurrency", 1, 1000],
  ["memory_mb", "Memory (MB)", 32, 262144],
];

function scaleForm(x, revisions, onApplied) {
  const errors = {};
  const fieldBox = (name, label, control) => {
    errors[name] = h("span", { class: "field-error", id: `error-${name}`, role: "alert" });
    control.setAttribute("aria-describedby", `error-${name}`);
    return h("label", { "data-field": name }, label, control, errors[name]);
  };
  const revisionSel = h("select", { name: "package_revision", id: "package_revision" },
    revisions.map((r) => h("option", { value: r.revision, selected: r.revision === x.package_revision },
      `r${r.revision}${r.revision === x.package_revision ? " (running)" : ""} · ${fmtTime(r.created_at)}`)));
  const inputs = {};
  for (const [name, , min, max] of SCALE_FIELDS)
    inputs[name] = h("input", { type: "number", name, id: name, step: 1, min, max, value: x.runtime[name], required: true });
  const formError = h("span", { class: "field-error", id: "error-form", role: "alert" });
  const submit = h("button", { type: "submit" }, "Apply");
  const form = h("form", { class: "scale-form", id: "scale-form", novalidate: true },
    h("div", { class: "row" }, SCALE_FIELDS.map(([name, label]) => fieldBox(name, label, inputs[name]))),
    h("div", { class: "row" }, fieldBox("package_revision", "Rollout: package revision", revisionSel), submit, formError),
  );
  const clear = () => {
    for (const el of [...Object.values(errors), formError]) el.textContent = "";
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  };
  const show = (name, message) => {
    const el = errors[name];
    if (!el) { formError.textContent = formError.textContent ? `${formError.textContent}; ${message}` : message; return; }
    el.textContent = message;
    form.elements[name]?.setAttribute("aria-invalid", "true");
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clear();
    const runtime = {};
    let bad = false;
    for (const [name] of SCALE_FIELDS) {
      const raw = inputs[name].value.trim();
      if (!/^-?\d+$/.test(raw)) { show(name, "a whole number"); bad = true; continue; }
      runtime[name] = Number(raw);
    }
    if (bad) return;
    const changes = { runtime };
    const revision = Number(revisionSel.value);
    if (revision !== x.package_revision) changes.package_revision = revision;
    submit.disabled = true;
    try {
      const updated = await api("PATCH", `${V1}/services/${x.id}`, changes);
      flash(changes.package_revision ? `Applied: rolling out revision ${revision}.` : "Applied.");
      await onApplied(updated);
    } catch (err) {
      if (err.status !== 422) { flash(`Apply: ${err.message}`, true); return; }
      // A runtime field is named `runtime.<name>`; a rule across fields names `runtime`.
      for (const d of err.body?.error?.details || [{ message: err.message }]) {
        let name = (d.field || "").replace(/^runtime\./, "");
        if (!errors[name]) name = SCALE_FIELDS.map(([f]) => f).find((f) => (d.message || "").includes(f)) || name;
        show(name, d.message);
      }
      flash("Not applied: see the fields marked.", true);
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

pages.service = async () => {
  const id = params.id;
  const top = h("div");
  const settings = h("div", { id: "scale" });
  const perMinute = h("span", { id: "per-minute" });
  // The form is drawn from the service once, and again after an apply, never by the live
  // refreshes, so they do not overwrite what is being typed.
  const drawForm = async (x) => {
    if (!canAct()) return;
    const revisions = await get(`${V1}/packages/${x.package}/revisions?limit=1000`).catch(() => ({ items: [] }));
    const known = revisions.items.some((r) => r.revision === x.package_revision);
    const items = known ? revisions.items : [{ revision: x.package_revision }, ...revisions.items];
    items.sort((a, b) => b.revision - a.revision);
    fill(settings, card("Scale limits and rollout",
      h("p", { class: "muted" }, "Replica limits and runtime apply to the service's next replicas; a new revision rolls out as old replicas drain."),
      scaleForm(x, items, async (updated) => { await drawForm(updated); await render(); })));
  };
  const render = async () => {
    const [x, st] = await Promise.all([get(`${V1}/services/${id}`), get(`${V1}/services/${id}/status`)]);
    document.getElementById("title").textContent = `Service ${x.name}`;
    fill(top, 
      card(null, h("div", { class: "row" }, badge(x.status),
        h("span", {}, `package revision ${x.package_revision} · module ${x.module}`),
        h("a", { href: `/executions?service=${x.id}` }, "executions"),
        perMinute,
        x.status === "active" ? action("Pause", async () => { await post(`${V1}/services/${id}/pause`); await render(); }, "secondary")
          : action("Resume", async () => { await post(`${V1}/services/${id}/resume`); await render(); }))),
      h("div", { class: "counters" },
        ...[["queue", st.queue_length], ["in progress", st.in_progress], ["desired replicas", st.desired_replicas], ["replicas", st.replicas.length]]
          .map(([k, v]) => h("div", { class: "counter" }, h("b", {}, v), k))),
      card("Replicas", st.replicas.length ? table(["Replica", "State", "Running", "Host", "Reason", "Started"],
        st.replicas.map((r) => h("tr", {}, h("td", {}, r.id.slice(-10)), h("td", {}, r.status), h("td", {}, r.running),
          h("td", {}, r.host), h("td", {}, r.message || ""), h("td", {}, fmtTime(r.started_at))))) : h("p", { class: "muted" }, "No replica runs now.")),
    );
    const since = new Date(Date.now() - 5 * 60000).toISOString();
    const recent = await get(`${V1}/executions${query({ service: id, created_after: since, limit: 1000 })}`);
    perMinute.textContent = `${(recent.items.length / 5).toFixed(1)} executions/min (last 5 min)`;
    return x;
  };
  const first = await render();
  await drawForm(first);
  const logs = h("div", { class: "logs", id: "service-logs", tabindex: 0, role: "log", "aria-label": "service log" });
  follow(`${V1}/services/${id}/logs?follow=true&limit=500`, (name, line) => {
    if (name === "end") return;
    logs.append(h("div", { class: line.stream }, `${line.at?.slice(11, 19) || ""} ${line.replica ? line.replica.slice(-6) + " " : ""}${line.text}`));
    logs.scrollTop = logs.scrollHeight;
  });
  const again = throttle(render, 3000);
  follow(`${V1}/events/stream?types=service.*,execution.*`, (_, e) => { if (e.resource_id === id || e.data?.service === id) again(); });
  fill(content(), top, settings, card("Service log", logs));
};

// -- packages

function inputControl(param) {
  const t = param.type || "json";
  const name = `in-${param.name}`;
  const common = { name: param.name, id: name, "data-type": t };
  let control;
  if (t === "integer" || t === "number") control = h("input", { ...common, type: "number", step: t === "integer" ? 1 : "any", value: param.default ?? "" });
  else if (t === "boolean") control = h("input", { ...common, type: "checkbox", checked: Boolean(param.default) });
  else if (t === "string") control = h("input", { ...common, type: "text", value: param.default ?? "" });
  else control = h("textarea", { ...common, rows: 3 }, param.default !== undefined ? JSON.stringify(param.default) : "");
  return h("label", {}, `${param.name} (${t})${param.default === undefined ? " *" : ""}`, control);
}

function readInputs(form, inputs) {
  const out = {};
  for (const p of inputs) {
    const el = form.elements[p.name];
    const t = el.dataset.type;
    if (t === "boolean") { out[p.name] = el.checked; continue; }
    if (el.value === "") continue; // a default fills it, or the API names the missing field
    if (t === "integer" || t === "number") out[p.name] = Number(el.value);
    else if (t === "string") out[p.name] = el.value;
    else {
      try { out[p.name] = JSON.parse(el.value); } catch { throw new Error(`${p.name}: not valid JSON`); }
    }
  }
  return out;
}

// The live status of one execution started from a form, without leaving the page.
function liveRun(x) {
  const status = h("span", { class: "run-status" }, badge(x.status));
  const seen = h("span", { class: "muted run-seen" }, x.status);
  const output = h("div");
  const box = h("div", { class: "card run", "data-id": x.id },
    h("div", { class: "row" }, "Execution ", h("a", { href: `/executions/${x.id}` }, x.id), status, seen), output);
  const states = [x.status];
  const update = async () => {
    const now = await get(`${V1}/executions/${x.id}`);
    for (const e of now.status_log) if (!states.includes(e.status)) states.push(e.status);
    if (!states.includes(now.status)) states.push(now.status);
    fill(status, badge(now.status));
    seen.textContent = states.join(" → ");
    if (TERMINAL.has(now.status)) {
      stream.stop();
      fill(output, now.error ? pretty(now.error) : pretty(now.output));
    }
  };
  const stream = follow(`${V1}/events/stream?types=execution.*`, (_, e) => { if (e.resource_id === x.id) update(); });
  update();
  return box;
}

pages.packages = async () => {
  const list = await get(`${V1}/packages?limit=1000`);
  fill(content(), card(null, list.items.length ? table(["Package", "Latest revision", ["Description", { class: "opt" }], ["Created", { class: "opt" }]],
    list.items.map((p) => h("tr", {}, h("td", {}, h("a", { href: `/packages/${p.id}` }, p.name)), h("td", {}, p.latest_revision),
      h("td", { class: "opt" }, p.description), h("td", { class: "opt" }, fmtTime(p.created_at))))) : h("p", {}, "No packages yet.")));
};

pages.package = async () => {
  const id = params.id;
  const [p, revisions, services] = await Promise.all([
    get(`${V1}/packages/${id}`), get(`${V1}/packages/${id}/revisions`), get(`${V1}/services?limit=1000`)]);
  document.getElementById("title").textContent = `Package ${p.name}`;
  const users = services.items.filter((x) => x.package === id);
  const runs = h("div", { id: "runs" });
  const modules = p.modules.map((m) => card(`Module ${m.name}`, ...m.functions.map((f) => {
    const form = h("form", { class: "run-form", "data-function": f.name });
    const serviceSel = h("select", { name: "__service", "aria-label": "service" },
      users.filter((x) => x.module === m.name).map((x) => h("option", { value: x.id }, x.name)));
    add(form, 
      h("h3", {}, f.name),
      f.description ? h("p", {}, f.description) : null,
      h("p", { class: "muted" }, "outputs: ", f.outputs.map((o) => `${o.name} (${o.type})`).join(", ") || "none"),
      h("div", { class: "row" }, ...f.inputs.map(inputControl)),
    );
    if (canAct() && serviceSel.options.length) {
      add(form, h("div", { class: "row", style: "margin-top:8px" }, h("label", {}, "Service", serviceSel), h("button", { type: "submit" }, `Run ${f.name}`)));
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        try {
          const input = readInputs(form, f.inputs);
          const x = await post(`${V1}/executions`, { service: serviceSel.value, function: f.name, input });
          runs.prepend(liveRun(x));
          flash("");
        } catch (err) {
          flash(`Run ${f.name}: ${err.message}`, true);
        }
      });
    } else if (!serviceSel.options.length) add(form, h("p", { class: "muted" }, "No service runs this module yet."));
    return form;
  })));
  fill(content(), 
    card(null, h("p", {}, p.description || ""), h("p", { class: "muted" }, `revision ${p.revision} of ${p.latest_revision} · requirements: ${p.requirements.join(", ") || "none"}`)),
    runs, ...modules,
    card("Revisions", table(["Revision", "Size", "Created"], revisions.items.map((r) =>
      h("tr", {}, h("td", {}, r.revision), h("td", {}, r.codebase?.size ?? ""), h("td", {}, fmtTime(r.created_at)))))),
  );
};

// -- triggers

pages.triggers = async () => {
  const list = await get(`${V1}/triggers?limit=1000`);
  const rows = await Promise.all(list.items.map(async (t) => {
    const next = t.type === "cron" && t.active ? await get(`${V1}/triggers/${t.id}/next?count=3`).catch(() => ({ items: [] })) : { items: [] };
    const spec = t.type === "cron" ? `${t.spec.cron} (${t.spec.timezone})` : `${t.spec.resource} ${t.spec.actions.join(",") || "any"} ${Object.keys(t.spec.filter).length ? JSON.stringify(t.spec.filter) : ""}`;
    return h("tr", { "data-id": t.id },
      h("td", {}, t.name), h("td", {}, t.type), h("td", {}, h("code", {}, spec)),
      h("td", {}, badge(t.active ? "active" : "paused"), t.last_error ? h("div", { class: "muted" }, t.last_error) : null),
      h("td", { class: "opt" }, next.items.map((n) => h("div", {}, fmtTime(n)))),
      h("td", { class: "opt" }, fmtTime(t.last_fired_at)),
      h("td", {}, h("a", { href: `/executions?trigger=${t.id}` }, "executions"), " ",
        t.active ? action("Pause", async () => { await post(`${V1}/triggers/${t.id}/pause`); pages.triggers(); }, "secondary")
          : action("Resume", async () => { await post(`${V1}/triggers/${t.id}/resume`); pages.triggers(); }, "secondary")));
  }));
  fill(content(), card(null, list.items.length
    ? table(["Trigger", "Type", "Schedule or filter", "State", ["Next fire times", { class: "opt" }], ["Last fired", { class: "opt" }], ""], rows)
    : h("p", {}, "No triggers yet.")));
};

// -- pipelines

// Layered layout: a node's layer is its longest path from a source; within a layer nodes are
// ordered by the mean position of their parents (one barycentre pass) to limit crossings.
function layout(nodes, connections) {
  const ids = nodes.map((n) => n.id);
  const parents = new Map(ids.map((i) => [i, []]));
  for (const c of connections) parents.get(c.target.node)?.push(c.source.node);
  const layer = new Map();
  const depth = (i, seen = new Set()) => {
    if (layer.has(i)) return layer.get(i);
    if (seen.has(i)) return 0;
    seen.add(i);
    const d = Math.max(-1, ...parents.get(i).map((p) => depth(p, seen))) + 1;
    layer.set(i, d);
    return d;
  };
  ids.forEach((i) => depth(i));
  const layers = [];
  for (const i of ids) (layers[layer.get(i)] ||= []).push(i);
  const pos = new Map();
  layers.forEach((col, li) => {
    if (li > 0) {
      const bary = (i) => {
        const ps = parents.get(i).map((p) => pos.get(p)?.row ?? 0);
        return ps.length ? ps.reduce((a, b) => a + b, 0) / ps.length : 0;
      };
      col.sort((a, b) => bary(a) - bary(b));
    }
    col.forEach((i, row) => pos.set(i, { col: li, row }));
  });
  const W = 150, H = 44, GX = 70, GY = 26;
  const rows = Math.max(1, ...layers.map((c) => c.length));
  const place = new Map();
  for (const [i, p] of pos) {
    const count = layers[p.col].length;
    const offset = ((rows - count) * (H + GY)) / 2;
    place.set(i, { x: 10 + p.col * (W + GX), y: 10 + offset + p.row * (H + GY), w: W, h: H });
  }
  return { place, width: 20 + layers.length * (W + GX) - GX, height: 20 + rows * (H + GY) - GY };
}

function drawGraph(pipeline, states, onNode) {
  const { place, width, height } = layout(pipeline.nodes, pipeline.connections);
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", style: `max-width:${width}px`, role: "img", "aria-label": `graph of ${pipeline.name}`, id: "graph" });
  for (const c of pipeline.connections) {
    const a = place.get(c.source.node), b = place.get(c.target.node);
    if (!a || !b) continue;
    const x1 = a.x + a.w, y1 = a.y + a.h / 2, x2 = b.x, y2 = b.y + b.h / 2, mx = (x1 + x2) / 2;
    svg.append(s("path", { class: "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, "marker-end": "url(#arrow)" },
      s("title", {}, `${c.source.node}.${c.source.port} → ${c.target.node}.${c.target.port}${c.condition ? " if " + JSON.stringify(c.condition) : ""}`)));
  }
  svg.prepend(s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
    s("path", { d: "M0,0 L10,5 L0,10 z", fill: "currentColor", class: "muted" }))));
  for (const n of pipeline.nodes) {
    const p = place.get(n.id);
    const st = states?.get(n.id);
    const g = s("g", { class: `node n-${st?.status || "none"}`, "data-node": n.id, "data-status": st?.status || "", tabindex: 0, role: "button",
      "aria-label": `${n.id}${st ? " " + st.status : ""}`, transform: `translate(${p.x},${p.y})` },
      s("rect", { width: p.w, height: p.h, rx: 8 }),
      s("text", { x: 10, y: 18, "font-weight": 600 }, n.id.length > 20 ? n.id.slice(0, 19) + "…" : n.id),
      s("text", { x: 10, y: 34, class: "muted" }, n.type === "merge" ? "merge" : `${n.function}${st ? " · " + st.status : ""}`));
    if (onNode) {
      g.addEventListener("click", () => onNode(n.id, g));
      g.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); onNode(n.id, g); } });
    }
    svg.append(g);
  }
  const statuses = ["pending", "in-progress", "success", "failed", "skipped", "terminated"];
  return h("div", {}, states ? h("div", { class: "legend" }, statuses.map((x) => h("span", {}, h("i", { class: `s-${x}` }), x))) : null, svg);
}

pages.pipelines = async () => {
  const list = await get(`${V1}/pipelines?limit=1000`);
  fill(content(), card(null, list.items.length ? table(["Pipeline", "Version", "Installed", "Nodes", ["Updated", { class: "opt" }]],
    list.items.map((p) => h("tr", {}, h("td", {}, h("a", { href: `/pipelines/${p.id}` }, p.name)), h("td", {}, p.version),
      h("td", {}, p.installed ? "yes" : "no"), h("td", {}, p.nodes.length), h("td", { class: "opt" }, fmtTime(p.updated_at))))) : h("p", {}, "No pipelines yet.")));
};

pages.pipeline = async () => {
  const id = params.id;
  const [p, runs] = await Promise.all([get(`${V1}/pipelines/${id}`), get(`${V1}/pipeline-executions?pipeline=${id}&limit=50`)]);
  document.getElementById("title").textContent = `Pipeline ${p.name}`;
  const input = h("textarea", { "aria-label": "pipeline input as JSON", rows: 3 }, "{}");
  fill(content(), 
    card(null, h("p", {}, p.description || ""), h("p", { class: "muted" }, `version ${p.version} · ${p.installed ? "installed" : "not installed"}`)),
    card("Graph", drawGraph(p, null, null)),
    p.installed && canAct() ? card("Execute", input, action("Execute", async () => {
      let value;
      try { value = JSON.parse(input.value || "{}"); } catch { throw new Error("input: not valid JSON"); }
      const run = await post(`${V1}/pipelines/${id}/execute`, { input: value });
      location.assign(`/pipeline-executions/${run.id}`);
    })) : null,
    card("Executions", runs.items.length ? table(["Execution", "Status", "Created"], runs.items.map((r) =>
      h("tr", {}, h("td", {}, h("a", { href: `/pipeline-executions/${r.id}` }, r.id.slice(-10))), h("td", {}, badge(r.status)), h("td", {}, fmtTime(r.created_at))))) : h("p", { class: "muted" }, "None yet.")),
  );
};

pages["pipeline-execution"] = async () => {
  const id = params.id;
  let run = await get(`${V1}/pipeline-executions/${id}`);
  const pipeline = await get(`${V1}/pipelines/${run.pipeline}/versions/${run.version}`).catch(() => get(`${V1}/pipelines/${run.pipeline}`));
  const head = h("div", { class: "card" });
  const graph = h("div", { id: "graph-box" });
  const detail = h("div", { id: "node-detail" });
  let chosen = null;
  const showNode = async (node) => {
    chosen = node;
    const list = await get(`${V1}/executions?pipeline_execution=${id}&limit=1000`);
    const mine = list.items.filter((x) => x.pipeline_node === node);
    const st = run.nodes.find((n) => n.node === node);
    fill(detail, card(`Node ${node}`,
      st ? h("p", {}, badge(st.status), " ", Object.entries(st.executions).map(([k, v]) => `${k}: ${v}`).join(" · ")) : null,
      st?.error ? pretty(st.error) : null,
      mine.length ? table(["Execution", "Status", "Duration"], mine.map((x) => h("tr", {},
        h("td", {}, h("a", { href: `/executions/${x.id}` }, x.id.slice(-10))), h("td", {}, badge(x.status)), h("td", {}, fmtMs(x.duration_ms)))))
        : h("p", { class: "muted" }, "No executions for this node yet.")));
  };
  const render = () => {
    document.getElementById("title").textContent = `${pipeline.name} run`;
    fill(head, h("div", { class: "row" }, h("span", { id: "run-status" }, badge(run.status)),
      h("a", { href: `/pipelines/${run.pipeline}` }, pipeline.name), h("span", { class: "muted" }, `version ${run.version} · round ${run.round} · ${fmtTime(run.created_at)}`),
      h("a", { href: `/executions?pipeline_execution=${id}` }, "executions"),
      TERMINAL.has(run.status) ? null : action("Terminate", async () => { await post(`${V1}/pipeline-executions/${id}/terminate`); refresh(); }, "danger"),
      TERMINAL.has(run.status) && run.status !== "success" ? action("Resume", async () => {
        const again = run.nodes.filter((n) => ["failed", "terminated"].includes(n.status)).map((n) => n.node);
        await post(`${V1}/pipeline-executions/${id}/resume`, { nodes: again });
        refresh();
      }, "secondary") : null),
      run.error ? pretty(run.error) : null);
    const states = new Map(run.nodes.map((n) => [n.node, n]));
    fill(graph, drawGraph(pipeline, states, (node) => showNode(node)));
    if (chosen) showNode(chosen);
  };
  const refresh = throttle(async () => { run = await get(`${V1}/pipeline-executions/${id}`); render(); }, 500);
  render();
  follow(`${V1}/events/stream?types=execution.*,pipeline_execution.*`, (_, e) => {
    if (e.resource_id === id || e.data?.pipeline_execution === id) refresh();
  });
  fill(content(), head, card("Graph", graph), detail);
};

// -- overview

function barChart(title, bars, { unit = "" } = {}) {
  const W = 460, rowH = 22, left = 150;
  const max = Math.max(1, ...bars.map((b) => b.value));
  const svg = s("svg", { viewBox: `0 0 ${W} ${Math.max(1, bars.length) * rowH + 10}`, width: "100%", role: "img", "aria-label": title });
  bars.forEach((b, i) => {
    const w = ((W - left - 70) * b.value) / max;
    svg.append(s("text", { x: 0, y: i * rowH + 15 }, b.label.length > 22 ? b.label.slice(0, 21) + "…" : b.label),
      s("rect", { x: left, y: i * rowH + 4, width: Math.max(1, w), height: rowH - 8, rx: 3, style: `fill:var(--${b.color || "in-progress"})` }),
      s("text", { x: left + w + 6, y: i * rowH + 15 }, `${b.text ?? b.value}${unit}`));
  });
  return card(title, bars.length ? svg : h("p", { class: "muted" }, "Nothing to show yet."));
}

function perMinuteChart(items, minutes = 30) {
  const W = 700, H = 200, pad = 28;
  const now = Math.floor(Date.now() / 60000);
  const buckets = Array.from({ length: minutes }, () => Object.fromEntries(STATUSES.map((x) => [x, 0])));
  for (const x of items) {
    const m = now - Math.floor(new Date(x.created_at).getTime() / 60000);
    if (m >= 0 && m < minutes) buckets[minutes - 1 - m][x.status]++;
  }
  const max = Math.max(1, ...buckets.map((b) => STATUSES.reduce((a, k) => a + b[k], 0)));
  const bw = (W - pad) / minutes;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", "aria-label": "executions per minute by status", id: "per-minute-chart" },
    s("line", { class: "axis", x1: pad, y1: H - 18, x2: W, y2: H - 18 }),
    s("text", { x: 0, y: 12 }, max), s("text", { x: 0, y: H - 20 }, 0),
    s("text", { x: pad, y: H - 4 }, `-${minutes} min`), s("text", { x: W - 30, y: H - 4 }, "now"));
  buckets.forEach((b, i) => {
    let y = H - 18;
    for (const k of STATUSES) {
      if (!b[k]) continue;
      const hh = ((H - 36) * b[k]) / max;
      y -= hh;
      svg.append(s("rect", { x: pad + i * bw + 1, y, width: bw - 2, height: hh, style: `fill:var(--${k})` }, s("title", {}, `${b[k]} ${k}`)));
    }
  });
  return card("Executions per minute by status", h("div", { class: "legend" }, STATUSES.map((x) => h("span", {}, h("i", { class: `s-${x}` }), x))), svg);
}

pages.overview = async () => {
  await loadNames();
  const render = async () => {
    const since = new Date(Date.now() - 30 * 60000).toISOString();
    const [counters, recent] = await Promise.all([
      get(`${V1}/executions/counters`), get(`${V1}/executions${query({ created_after: since, limit: 1000 })}`)]);
    const items = recent.items;
    const reasons = {};
    for (const x of items) if (x.status === "failed") reasons[x.reason || "unknown"] = (reasons[x.reason || "unknown"] || 0) + 1;
    const slow = {};
    for (const x of items) if (x.duration_ms !== null) {
      const key = `${serviceName(x.service)}.${x.function}`;
      (slow[key] ||= []).push(x.duration_ms);
    }
    const slowest = Object.entries(slow).map(([k, v]) => ({ label: k, value: v.reduce((a, b) => a + b, 0) / v.length }))
      .sort((a, b) => b.value - a.value).slice(0, 8).map((b) => ({ ...b, text: fmtMs(Math.round(b.value)) }));
    fill(content(), 
      h("div", { class: "counters" }, ...["created", "in-progress", "success", "failed", "terminated", "total"].map((k) =>
        h("a", { class: "counter", href: k === "total" ? "/executions" : `/executions?status=${k}` }, h("b", {}, counters[k] ?? 0), k))),
      perMinuteChart(items),
      h("div", { class: "grid" },
        barChart("Failures by reason (last 30 min)", Object.entries(reasons).map(([k, v]) => ({ label: k, value: v, color: "failed" }))),
        barChart("Slowest functions, mean duration (last 30 min)", slowest)),
    );
  };
  await render();
  const again = throttle(render, 5000);
  follow(`${V1}/events/stream?types=execution.*`, () => again());
};

// ---------------------------------------------------------------- start

const page = body.dataset.page;

async function start() {
  for (const a of document.querySelectorAll(".top nav a")) {
    const here = location.pathname;
    const href = a.getAttribute("href");
    if (href === "/" ? here === "/" : here.startsWith(href)) a.setAttribute("aria-current", "page");
  }
  if (page === "sign-in") return pages["sign-in"]();
  if (!sessionStorage.getItem(TOKEN_KEY)) { location.assign("/sign-in"); return; }
  try {
    me = await get(`${V1}/tokens/current`);
  } catch {
    return;
  }
  body.dataset.role = me.role;
  document.getElementById("who").textContent = `${me.name} · ${me.role}`;
  const out = document.getElementById("sign-out");
  out.hidden = false;
  out.addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); location.assign("/sign-in"); });
  try {
    await pages[page]();
  } catch (err) {
    flash(err.status === 404 ? "Not found (or not visible to this token)." : err.message, true);
  }
}

start();
