// The dashboard: logs in, loads the cluster, follows the event stream, and keeps the page
// in step (each job's card is rebuilt only when its record changes; a progress sample
// redraws only its move).

import * as api from "./api.js";
import { evacuateForm, migrateForm } from "./forms.js";
import { jobView, moveView, movesOf, renderHistory, renderHosts, renderVms } from "./views.js";

const $ = (id) => document.getElementById(id);
const JOB_LIMIT = 20;
const HISTORY_LIMIT = 10;
const REFRESH_MS = 20000;
const FINAL = new Set(["completed", "failed", "refused", "cancelled", "interrupted"]);

const state = {
  who: null, hosts: [], vms: [], history: [], jobs: new Map(), live: new Map(), curves: new Map(),
  strategies: ["auto"], stream: null, timer: null, cards: new Map(),
};

function notice(text, kind = "info") {
  const node = $("notice");
  node.textContent = text;
  node.dataset.kind = kind;
}

function failed(err) {
  if (err instanceof api.ApiError && err.status === 401) {
    stop("Your session ended: log in again.");
    return;
  }
  notice(err.message, "error");
}

// -- drawing ---------------------------------------------------------------------------------

function drawCluster() {
  $("hosts").replaceChildren(...renderHosts(state.hosts, state.who, actions));
  $("vms").replaceChildren(...renderVms(state.vms, state.who, actions));
  $("history").replaceChildren(...renderHistory(state.history));
}

function signature(job) {
  return [job.state, job.updated_at, job.result ? 1 : 0, state.curves.has(job.id)].join("|");
}

function drawJobs() {
  const jobs = [...state.jobs.values()].sort((a, b) => b.id - a.id).slice(0, JOB_LIMIT);
  const cards = jobs.map((job) => {
    let card = state.cards.get(job.id);
    if (!card || card.dataset.signature !== signature(job)) {
      card = jobView(job, state.live, state.curves, state.who, actions);
      card.dataset.signature = signature(job);
      state.cards.set(job.id, card);
    }
    return card;
  });
  const container = $("jobs");
  const same = cards.length === container.children.length &&
    cards.every((card, i) => container.children[i] === card);
  if (!same) container.replaceChildren(...cards);
  if (!cards.length) container.textContent = "no jobs yet";
}

function drawMove(jobId, vm) {
  const job = state.jobs.get(jobId);
  const card = state.cards.get(jobId);
  const section = card && card.querySelector(`.move[data-vm="${CSS.escape(vm)}"]`);
  if (!job || !section) {
    state.cards.delete(jobId);
    drawJobs();
    return;
  }
  const move = movesOf(job, state.live).find((m) => m.vm === vm);
  section.replaceWith(moveView(job, move, state.live, state.curves));
}

// -- loading ---------------------------------------------------------------------------------

async function loadCurve(job) {
  const hasReport = job.result && (job.kind === "migrate" || Array.isArray(job.result.moves));
  if (!hasReport || state.curves.has(job.id)) return;
  const curve = await api.request("GET", `/api/v1/jobs/${job.id}/curve`);
  state.curves.set(job.id, Object.fromEntries(curve.moves.map((m) => [m.vm, m.points])));
}

async function loadJob(id) {
  const job = await api.request("GET", `/api/v1/jobs/${id}`);
  state.jobs.set(id, job);
  if (FINAL.has(job.state)) await loadCurve(job);
  drawJobs();
}

async function refreshCluster() {
  // Each part on its own: a host that does not answer leaves the rest of the page up to date.
  const [hosts, vms, history] = await Promise.allSettled([
    api.request("GET", "/api/v1/hosts"),
    api.request("GET", "/api/v1/vms"),
    api.request("GET", `/api/v1/history?limit=${HISTORY_LIMIT}`),
  ]);
  if (hosts.status === "fulfilled") state.hosts = hosts.value;
  if (vms.status === "fulfilled") state.vms = vms.value.vms;
  if (history.status === "fulfilled") state.history = history.value.reverse();
  drawCluster();
  const refused = [hosts, vms, history].find((answer) => answer.status === "rejected");
  if (refused) throw refused.reason;
  if (vms.value.unreachable.length) {
    notice(`unreachable: ${vms.value.unreachable.join(", ")}`, "error");
  }
}

async function refreshAll() {
  const jobs = await api.request("GET", `/api/v1/jobs?limit=${JOB_LIMIT}`);
  state.jobs = new Map(jobs.map((job) => [job.id, job]));
  await Promise.all(jobs.filter((job) => FINAL.has(job.state)).map(loadCurve));
  drawJobs();
  await refreshCluster();
}

// -- events ----------------------------------------------------------------------------------

function onProgress(data) {
  const key = `${data.job}/${data.vm}`;
  const entry = state.live.get(key) || { vm: data.vm, points: [], offset: 0, lastMs: 0 };
  entry.phase = data.phase;
  entry.eta_ms = data.eta_ms;
  if (data.stats) {
    const s = data.stats;
    if (s.total_ms < entry.lastMs) entry.offset += entry.lastMs; // QEMU's counters restarted
    entry.lastMs = s.total_ms;
    entry.stats = s;
    entry.points.push([entry.offset + s.total_ms, s.transferred_bytes, s.remaining_bytes]);
  }
  state.live.set(key, entry);
  if (state.jobs.has(data.job)) drawMove(data.job, data.vm);
  else loadJob(data.job).catch(failed);
}

function onJob(data) {
  const known = state.jobs.get(data.id);
  state.jobs.set(data.id, { ...(known || {}), ...data });
  drawJobs();
  if (FINAL.has(data.state) || !known) {
    loadJob(data.id).then(refreshCluster).catch(failed);
  }
}

function onEvent(kind, data) {
  if (kind === "hello" || kind === "dropped") refreshAll().catch(failed); // whatever was missed
  else if (kind === "job") onJob(data);
  else if (kind === "progress") onProgress(data);
}

async function onStream(text) {
  $("stream").textContent = `events: ${text}`;
  $("stream").dataset.state = text;
  if (text === "closed") {
    try {
      await api.whoami();
      setTimeout(() => state.who && openStream(), 2000); // refused for a moment: try again
    } catch (err) {
      failed(err);
    }
  }
}

function openStream() {
  if (state.stream) state.stream.close();
  state.stream = api.watch(onEvent, onStream);
}

// -- actions ---------------------------------------------------------------------------------

function closeAction() {
  $("action").replaceChildren();
  $("action").hidden = true;
}

function openAction(form) {
  $("action").replaceChildren(form);
  $("action").hidden = false;
  form.querySelector("select, input")?.focus();
}

async function submitJob(path, body) {
  const job = await api.request("POST", path, body);
  state.jobs.set(job.id, job);
  drawJobs();
  closeAction();
  notice(`job #${job.id} started: ${job.kind}`);
}

const actions = {
  migrate: (vm) => openAction(migrateForm(vm, state.hosts, state.strategies,
    (body) => submitJob("/api/v1/migrations", body), closeAction)),
  evacuate: (host) => openAction(evacuateForm(host,
    (body) => submitJob("/api/v1/evacuations", body), closeAction)),
  cancel: (job) => api.request("POST", `/api/v1/jobs/${job.id}/cancel`)
    .then(() => notice(`job #${job.id}: cancel asked`)).catch(failed),
};

// -- session ---------------------------------------------------------------------------------

async function loadStrategies() {
  const doc = await api.request("GET", "/openapi.json");
  const schema = doc.components.schemas.MigrateRequest.properties.strategy;
  if (Array.isArray(schema.enum)) state.strategies = schema.enum;
}

function start(who) {
  state.who = who;
  document.body.dataset.role = who.role;
  $("whoami").textContent = `${who.name} (${who.role})`;
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("session").hidden = false;
  notice("");
  loadStrategies().catch(failed);
  openStream(); // its hello loads everything
  state.timer = setInterval(() => refreshCluster().catch(failed), REFRESH_MS);
}

function stop(message = "") {
  if (state.stream) state.stream.close();
  clearInterval(state.timer);
  Object.assign(state, { who: null, stream: null, jobs: new Map(), live: new Map(),
    curves: new Map(), cards: new Map(), hosts: [], vms: [], history: [] });
  delete document.body.dataset.role;
  closeAction();
  $("jobs").replaceChildren();
  $("dashboard").hidden = true;
  $("session").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("token").focus();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  $("token").value = "";
  try {
    start(await api.login(token));
  } catch (err) {
    $("login-error").textContent = err.status === 401 ? "Unknown token." : err.message;
  }
});

$("logout").addEventListener("click", () => {
  api.logout().catch(() => {}).finally(() => stop("Logged out."));
});

api.whoami().then(start, () => stop());
