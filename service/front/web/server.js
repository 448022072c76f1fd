// The server panel: readiness, each model's state and what /metrics counted for it.

import { getJSON, modelMetrics } from "./api.js";

const REFRESH_MS = 3000;

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

export class ServerPanel {
  constructor(section, index) {
    this.index = index; // /v2/repository/index: name, version, state, reason
    this.ready = section.querySelector("#ready");
    this.body = section.querySelector("#models tbody");
  }

  start() {
    let busy = false;
    const tick = async () => {
      if (busy || document.hidden) return; // a slow server gets no pile of requests
      busy = true;
      await this.refresh();
      busy = false;
    };
    tick();
    setInterval(tick, REFRESH_MS);
  }

  async refresh() {
    try {
      const [health, models, metrics] = await Promise.all([
        fetch("/v2/health/ready").then((r) => r.json()),
        Promise.all(this.index.map((entry) => this.#modelReady(entry))),
        fetch("/metrics").then((r) => r.text()),
      ]);
      this.ready.textContent = health.ready
        ? "Ready: every model is loaded and warmed up."
        : "Not ready: a model failed to load (see its reason below).";
      this.ready.classList.toggle("bad", !health.ready);
      this.#table(models, modelMetrics(metrics));
    } catch (error) {
      this.ready.textContent = `The server does not answer (${error.message}).`;
      this.ready.classList.add("bad");
    }
  }

  async #modelReady(entry) {
    // Only models the index lists as READY are asked: the others would answer 503.
    if (entry.state !== "READY") return { ...entry, ready: `no: ${entry.reason}` };
    const answer = await getJSON(`/v2/models/${encodeURIComponent(entry.name)}/ready`);
    return { ...entry, ready: answer.ready ? "yes" : "no" };
  }

  #table(models, metrics) {
    this.body.replaceChildren(
      ...models.map((model) => {
        const m = metrics.get(model.name);
        const row = document.createElement("tr");
        row.dataset.model = model.name;
        const name = document.createElement("th");
        name.scope = "row";
        name.textContent = model.name;
        row.append(
          name,
          cell(model.version || "-"),
          cell(model.ready),
          cell(m ? String(m.requests) : "0"),
          cell(m ? String(m.errors) : "0"),
          cell(m && m.timed ? `${((1000 * m.seconds) / m.timed).toFixed(2)} ms` : "-"),
          cell(m && m.batches ? (m.rows / m.batches).toFixed(1) : "-"),
        );
        return row;
      }),
    );
  }
}
