// The operator's forms: migrate a VM, evacuate a host (the page shows them to operators only;
// the service refuses a viewer anyway).

import { el } from "./dom.js";

function field(label, input) {
  return el("label", {}, el("span", {}, label), input);
}

function options(values, selected) {
  return values.map((value) => el("option", { value, selected: value === selected }, value));
}

function formShell(id, title, fields, submitText, handlers) {
  const message = el("p", { class: "form-error", role: "alert" });
  const form = el("form", { id, class: "action" },
    el("h3", {}, title),
    el("div", { class: "fields" }, fields),
    el("div", { class: "buttons" },
      el("button", { type: "submit", class: "primary" }, submitText),
      el("button", { type: "button", onclick: handlers.close }, "Close")),
    message);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    message.textContent = "";
    try {
      await handlers.submit();
    } catch (err) {
      message.textContent = err.message;
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

const numberOrNull = (input) => (input.value.trim() === "" ? null : Number(input.value));

/** The migrate form for `vm`; `submit(body)` posts it. */
export function migrateForm(vm, hosts, strategies, submit, close) {
  const targets = hosts.filter((h) => h.host !== vm.host && h.state === "active").map((h) => h.host);
  const to = el("select", { id: "migrate-to", name: "to", required: true }, options(targets));
  const strategy = el("select", { id: "migrate-strategy", name: "strategy" },
    options(strategies, "auto"));
  const downtime = el("input", { id: "migrate-downtime", name: "max_downtime_ms", type: "number",
    min: 1, max: 600000, value: 300, required: true });
  const bandwidth = el("input", { id: "migrate-bandwidth", name: "bandwidth_mbps", type: "number",
    min: 1, max: 1000000, placeholder: "no cap" });
  const fields = [
    field("to host", to),
    field("strategy", strategy),
    field("max downtime (ms)", downtime),
    field("bandwidth (Mbit/s)", bandwidth),
  ];
  return formShell("migrate-form", `Migrate ${vm.name} from ${vm.host}`, fields,
    "Start migration", {
      close,
      submit: () => submit({
        vm: vm.name, to: to.value, strategy: strategy.value,
        max_downtime_ms: Number(downtime.value), bandwidth_mbps: numberOrNull(bandwidth),
      }),
    });
}

/** The evacuate form for `host`. */
export function evacuateForm(host, submit, close) {
  const deadline = el("input", { id: "evacuate-deadline", name: "deadline_s", type: "number",
    min: 1, max: 86400, placeholder: "none" });
  const dryRun = el("input", { id: "evacuate-dry-run", name: "dry_run", type: "checkbox" });
  const fields = [field("deadline (s)", deadline), field("dry run (plan only)", dryRun)];
  return formShell("evacuate-form", `Evacuate ${host.host} (${host.vms.join(", ")})`, fields,
    "Start evacuation", {
      close,
      submit: () => submit({ host: host.host, deadline_s: numberOrNull(deadline),
        dry_run: dryRun.checked }),
    });
}
