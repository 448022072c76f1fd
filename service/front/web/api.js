// Talking to this server, and only to it: V2 model metadata and inference, health, metrics.

const JSON_POST = { method: "POST", headers: { "Content-Type": "application/json" } };

/** The JSON body of `url`; an Error carrying the server's own {"error": ...} message. */
export async function getJSON(url, options = {}) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${url}: HTTP ${response.status}`);
  return body;
}

/** The repository index and the ready models' V2 metadata, as the page uses it. */
export async function loadModels() {
  const index = await getJSON("/v2/repository/index", { ...JSON_POST, body: "{}" });
  // One entry per served version: the page shows each model once (its unversioned route).
  const names = [...new Set(index.filter((e) => e.state === "READY").map((e) => e.name))];
  const ready = names.map((name) => ({ name }));
  const metadata = await Promise.all(
    ready.map((entry) => getJSON(`/v2/models/${encodeURIComponent(entry.name)}`)),
  );
  return { index, models: metadata.map(describe) };
}

/**
 * The per-row shape the page sends: the served one, except that a sequence input (one
 * variable axis and 8 values per step, [-1, 8]) reads the digit as its 8 rows.
 */
function rowShape(shape) {
  const dims = shape.slice(1);
  const variable = dims.filter((d) => d === -1).length;
  const step = dims.filter((d) => d > 0).reduce((a, b) => a * b, 1);
  return variable === 1 && step === 8 ? dims.map((d) => (d === -1 ? 8 : d)) : dims;
}

function describe(meta) {
  const input = meta.inputs[0];
  const dims = rowShape(input.shape);
  const output = meta.outputs.find((o) => o.shape.length === 2) || meta.outputs[0];
  const parameters = meta.parameters || {};
  return {
    name: meta.name,
    version: meta.versions.at(-1), // the highest: what the unversioned route serves
    input: input.name,
    inputs: meta.inputs.map((i) => `${i.name} ${i.datatype} [${i.shape.join(", ")}]`),
    dims,
    output: output.name,
    // Class names from the metadata; column numbers for a model that has none.
    labels: parameters.labels || Array.from({ length: output.shape[1] }, (_, i) => String(i)),
    batchDependent: parameters.batch_dependent === true,
    derivedFrom: parameters.derived_from || null,
    // An 8x8 digit fits a single FP32 input of 64 values per row ([1,8,8], [8,8], [64] ...,
    // and a sequence of rows of 8 given 8 of them).
    fitsDigits:
      meta.inputs.length === 1 &&
      input.datatype === "FP32" &&
      dims.every((d) => d > 0) &&
      dims.reduce((a, b) => a * b, 1) === 64,
  };
}

/**
 * One model's requests, one at a time: a request waits for the previous one to finish, so
 * however fast someone draws, this page never has two requests to a model in flight.
 */
export class ModelClient {
  constructor(model) {
    this.model = model;
    this.tail = Promise.resolve();
  }

  /** {logits: one array per row, ms: the request's round trip} for `rows` of 64 numbers. */
  infer(rows) {
    const send = () => this.#send(rows);
    const result = this.tail.then(send, send);
    this.tail = result.catch(() => undefined);
    return result;
  }

  async #send(rows) {
    const { model } = this;
    const body = JSON.stringify({
      inputs: [
        {
          name: model.input,
          datatype: "FP32",
          shape: [rows.length, ...model.dims],
          data: rows.flat(),
        },
      ],
    });
    const url = `/v2/models/${encodeURIComponent(model.name)}/infer`;
    const started = performance.now();
    const answer = await getJSON(url, { ...JSON_POST, body });
    const ms = performance.now() - started;
    const out = answer.outputs.find((o) => o.name === model.output);
    const width = out.shape[1];
    const logits = rows.map((_, i) => out.data.slice(i * width, (i + 1) * width));
    return { logits, ms };
  }
}

/** Runs `job(...args)` for the newest arguments only, one run at a time. */
export function latestOnly(job) {
  let pending = null;
  let running = false;
  return async (...args) => {
    pending = args;
    if (running) return;
    running = true;
    try {
      while (pending) {
        const next = pending;
        pending = null;
        await job(...next); // a job shows its own errors on the page
      }
    } finally {
      running = false;
    }
  };
}

export function softmax(logits) {
  const top = Math.max(...logits);
  const exp = logits.map((v) => Math.exp(v - top));
  const sum = exp.reduce((a, b) => a + b, 0);
  return exp.map((v) => v / sum);
}

export const argmax = (values) => values.reduce((best, v, i) => (v > values[best] ? i : best), 0);

export const percent = (p) => `${(100 * p).toFixed(1)} %`;

/** Per model: requests, errors, summed latency and batch rows from Prometheus text. */
export function modelMetrics(text) {
  const models = new Map();
  const entry = (name) => {
    if (!models.has(name)) {
      models.set(name, { requests: 0, errors: 0, seconds: 0, timed: 0, rows: 0, batches: 0 });
    }
    return models.get(name);
  };
  for (const line of text.split("\n")) {
    const match = /^([a-zA-Z_:][\w:]*)\{(.*)\}\s+(\S+)$/.exec(line);
    if (!match) continue;
    const labels = Object.fromEntries(
      [...match[2].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((m) => [m[1], m[2]]),
    );
    if (!labels.model) continue;
    const m = entry(labels.model);
    const value = Number(match[3]);
    switch (match[1]) {
      case "normserve_requests_total":
        m.requests += value;
        if (!labels.status.startsWith("2")) m.errors += value;
        break;
      case "normserve_request_duration_seconds_sum":
        m.seconds += value;
        break;
      case "normserve_request_duration_seconds_count":
        m.timed += value;
        break;
      case "normserve_batch_size_sum":
        m.rows += value;
        break;
      case "normserve_batch_size_count":
        m.batches += value;
        break;
      default:
    }
  }
  return models;
}
