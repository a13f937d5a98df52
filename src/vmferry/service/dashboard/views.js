// What the page shows, built from the API's records: hosts, VMs, and jobs with their moves
// (live progress while they run, the report with predicted vs actual and the curve after).

import { curveChart } from "./chart.js";
import { bar, el } from "./dom.js";
import { bytes, error, millis, when } from "./format.js";

const isOperator = (who) => who && who.role === "operator";

function hostCard(host, who, actions) {
  const memoryUsed = host.memory_bytes == null || host.memory_free_bytes == null
    ? null : host.memory_bytes - host.memory_free_bytes;
  const vcpusUsed = host.vcpus == null || host.vcpus_free == null
    ? null : host.vcpus - host.vcpus_free;
  return el("article", { class: `host state-${host.state}`, dataset: { host: host.host } },
    el("header", {},
      el("h3", {}, host.host),
      el("span", { class: `badge ${host.state}` }, host.state)),
    el("div", { class: "load" },
      el("span", { class: "label" }, "memory"),
      bar(memoryUsed / host.memory_bytes, "memory"),
      el("span", { class: "value" },
        memoryUsed == null ? "–" : `${bytes(memoryUsed)} of ${bytes(host.memory_bytes)}`)),
    el("div", { class: "load" },
      el("span", { class: "label" }, "vCPUs"),
      bar(vcpusUsed / host.vcpus, "cpu"),
      el("span", { class: "value" }, vcpusUsed == null ? "–" : `${vcpusUsed} of ${host.vcpus}`)),
    el("p", { class: "vms" }, host.vms.length ? `VMs: ${host.vms.join(", ")}` : "no VMs"),
    isOperator(who) && host.vms.length && host.state !== "unreachable"
      ? el("button", { class: "evacuate", type: "button", onclick: () => actions.evacuate(host) },
        "Evacuate…")
      : null);
}

export function renderHosts(hosts, who, actions) {
  if (!hosts.length) return [el("p", { class: "empty" }, "no hosts in the inventory")];
  return hosts.map((host) => hostCard(host, who, actions));
}

export function renderVms(vms, who, actions) {
  const head = el("tr", {}, ["VM", "host", "state", "memory", "vCPUs", "workload", ""].map(
    (name) => el("th", {}, name)));
  const rows = vms.map((vm) => el("tr", { dataset: { vm: vm.name } },
    el("td", { class: "name" }, vm.name),
    el("td", { class: "where" }, vm.host),
    el("td", {}, vm.state),
    el("td", { class: "num" }, bytes(vm.memory_bytes)),
    el("td", { class: "num" }, String(vm.vcpus)),
    el("td", { class: "workload" }, vm.workload || ""),
    el("td", {}, isOperator(who)
      ? el("button", { class: "migrate", type: "button", onclick: () => actions.migrate(vm) },
        "Migrate…")
      : null)));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 7, class: "empty" }, "no VMs")));
  return [el("thead", {}, head), el("tbody", {}, rows)];
}

/** The moves of a job: from its request and result, and those only seen live so far. */
export function movesOf(job, live) {
  const moves = new Map();
  const result = job.result;
  if (job.kind === "migrate") {
    const report = result && result.schema === 1 && result.vm ? result : null;
    moves.set(job.request.vm, { vm: job.request.vm, destination: job.request.to, report });
  } else if (result && Array.isArray(result.moves)) {
    for (const m of result.moves) {
      moves.set(m.vm, { vm: m.vm, source: m.source, destination: m.destination,
        report: m.report || null, error: m.error || null });
    }
  }
  for (const key of live.keys()) {
    const [id, vm] = key.split("/");
    if (Number(id) === job.id && !moves.has(vm)) moves.set(vm, { vm, report: null });
  }
  return [...moves.values()];
}

function liveView(sample) {
  const stats = sample.stats;
  const share = stats && stats.total_bytes ? 1 - stats.remaining_bytes / stats.total_bytes : 0;
  const text = stats
    ? `${bytes(stats.transferred_bytes)} sent, ${bytes(stats.remaining_bytes)} left, ` +
      `${bytes(stats.throughput_bps)}/s, dirty ${bytes(stats.dirty_pages_rate * stats.page_size)}/s, ` +
      `pass ${stats.iterations}, ${millis(stats.total_ms)}`
    : "waiting for QEMU's first sample";
  return el("div", { class: "live", dataset: { phase: sample.phase } },
    el("div", { class: "live-head" },
      el("span", { class: `badge phase ${sample.phase}` }, sample.phase),
      el("span", { class: "eta" },
        sample.eta_ms == null ? "ETA –" : `ETA ${millis(sample.eta_ms)}`)),
    bar(share, "progress"),
    el("p", { class: "stats" }, text),
    sample.points.length > 1 ? curveChart(sample.points, { vm: sample.vm }) : null);
}

function comparison(report) {
  const p = report.predicted || {};
  const rows = [
    ["total time", p.total_ms, report.total_ms, millis],
    ["QEMU downtime", p.downtime_ms, report.downtime_ms, millis],
    ["guest-felt downtime", p.guest_downtime_ms, report.guest_downtime_ms, millis],
    ["transferred", p.transferred_bytes, report.transferred_bytes, bytes],
  ];
  return el("table", { class: "compare" },
    el("thead", {}, el("tr", {}, ["", "predicted", "actual", "error"].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map(([name, predicted, actual, show]) =>
      el("tr", { dataset: { quantity: name } },
        el("th", {}, name),
        el("td", { class: "num predicted" }, predicted == null ? "–" : show(predicted)),
        el("td", { class: "num actual" }, actual == null ? "–" : show(actual)),
        el("td", { class: "num error" }, error(predicted, actual))))));
}

function reportView(report, points) {
  const integrity = report.integrity;
  const checked = integrity
    ? (integrity.ok ? `verified (${integrity.pages_checked} pages)` : "integrity check FAILED")
    : "not verified";
  const summary = [report.strategy, `${report.source} → ${report.destination}`, report.status,
    checked, report.recoveries ? `${report.recoveries} recoveries` : null].filter(Boolean);
  return el("div", { class: "report", dataset: { status: report.status } },
    el("p", { class: "summary" }, summary.join(" · ")),
    report.error ? el("p", { class: "error-text" }, report.error) : null,
    el("div", { class: "details" },
      comparison(report),
      points && points.length > 1
        ? curveChart(points, { vm: report.vm, predicted: report.predicted, actual: report })
        : el("p", { class: "no-curve" }, "no curve: the move ran before this service started")));
}

export function moveView(job, move, live, curves) {
  const sample = live.get(`${job.id}/${move.vm}`);
  const where = move.report
    ? `${move.report.source} → ${move.report.destination}`
    : move.destination ? `→ ${move.destination}` : "";
  const points = (curves.get(job.id) || {})[move.vm] || (sample && sample.points);
  let body;
  if (move.report) body = reportView(move.report, points);
  else if (sample) body = liveView(sample); // its last state until the report comes
  else if (move.error) body = el("p", { class: "error-text" }, move.error);
  else body = el("p", { class: "muted" }, job.state === "running" ? "waiting" : "did not run");
  return el("section", { class: "move", dataset: { vm: move.vm } },
    el("h4", {}, move.vm, " ", el("span", { class: "muted" }, where)), body);
}

function jobTitle(job) {
  const r = job.request || {};
  if (job.kind === "migrate") return `migrate ${r.vm} → ${r.to}`;
  if (job.kind === "evacuate") return `evacuate ${r.host}${r.dry_run ? " (dry run)" : ""}`;
  return job.kind;
}

export function jobView(job, live, curves, who, actions) {
  const asked = job.asked_by ? `${job.asked_by.name} (${job.asked_by.role})` : "?";
  return el("article", { class: `job state-${job.state}`, dataset: { job: String(job.id) } },
    el("header", {},
      el("h3", {}, `#${job.id} ${jobTitle(job)}`),
      el("span", { class: `badge ${job.state}` }, job.state),
      el("span", { class: "muted" }, `asked by ${asked} at ${when(job.created_at)}`),
      isOperator(who) && job.state === "running"
        ? el("button", { class: "cancel", type: "button", onclick: () => actions.cancel(job) },
          "Cancel")
        : null),
    job.error ? el("p", { class: "error-text" }, job.error.message) : null,
    movesOf(job, live).map((move) => moveView(job, move, live, curves)));
}

const pair = (predicted, actual, show) =>
  `${predicted == null ? "–" : show(predicted)} / ${actual == null ? "–" : show(actual)}`;

/** Every recorded move, newest first, whoever asked (the service or a CLI in-process). */
export function renderHistory(entries) {
  const head = el("tr", {}, ["started", "VM", "from → to", "strategy", "status",
    "total (pred. / actual)", "QEMU downtime", "guest-felt", "asked by"].map(
    (name) => el("th", {}, name)));
  const rows = entries.map((entry) => {
    const p = entry.predicted || {};
    return el("tr", { dataset: { history: String(entry.id), vm: entry.vm } },
      el("td", {}, when(entry.started_at)),
      el("td", { class: "name" }, entry.vm),
      el("td", {}, `${entry.source} → ${entry.destination}`),
      el("td", {}, entry.strategy),
      el("td", {}, el("span", { class: `badge ${entry.status}` }, entry.status)),
      el("td", { class: "num" }, pair(p.total_ms, entry.total_ms, millis)),
      el("td", { class: "num" }, pair(p.downtime_ms, entry.downtime_ms, millis)),
      el("td", { class: "num" }, pair(p.guest_downtime_ms, entry.guest_downtime_ms, millis)),
      el("td", { class: "asked-by" }, entry.asked_by || "–"));
  });
  if (!rows.length) {
    rows.push(el("tr", {}, el("td", { colspan: 9, class: "empty" }, "no migrations yet")));
  }
  return [el("thead", {}, head), el("tbody", {}, rows)];
}
