// One card per served model: its prediction, the class probabilities as bars, the latency.

import { argmax, latestOnly, percent, softmax } from "./api.js";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export class Card {
  /** `onAnswer(card)` after each answer, for the page's spoken summary. */
  constructor(container, model, client, onAnswer) {
    this.model = model;
    this.client = client;
    this.onAnswer = onAnswer;
    this.label = null;
    this.root = element("article", "card");
    this.root.dataset.model = model.name;
    const title = element("h3", "", model.name);
    title.append(element("span", "version", ` v${model.version}`));
    this.top = element("p", "top", "waiting for a digit");
    this.latency = element("p", "latency");
    this.bars = element("ol", "bars");
    this.rows = model.labels.map((label) => {
      const row = element("li");
      row.dataset.label = label;
      const track = element("span", "track");
      const fill = element("span", "fill");
      track.setAttribute("aria-hidden", "true");
      track.append(fill);
      const value = element("span", "value", "");
      row.append(element("span", "name", label), track, value);
      this.bars.append(row);
      return { row, fill, value };
    });
    this.root.append(title, this.top, this.latency, this.bars);
    container.append(this.root);
    // Bumped by reset(): an answer to an input from before a reset is not shown.
    this.epoch = 0;
    this.latest = latestOnly((pixels, epoch) => this.#predict(pixels, epoch));
  }

  submit(pixels) {
    this.latest(pixels, this.epoch);
  }

  async #predict(pixels, epoch) {
    try {
      const { logits, ms } = await this.client.infer([pixels]);
      if (epoch === this.epoch) this.show(softmax(logits[0]), ms);
    } catch (error) {
      if (epoch === this.epoch) this.#fail(error.message);
    }
    this.onAnswer(this);
  }

  show(probabilities, ms) {
    const best = argmax(probabilities);
    this.label = this.model.labels[best];
    probabilities.forEach((p, i) => {
      const { row, fill, value } = this.rows[i];
      fill.style.width = `${(100 * p).toFixed(2)}%`;
      value.textContent = percent(p);
      row.dataset.probability = String(p);
      row.classList.toggle("best", i === best);
    });
    this.root.dataset.label = this.label;
    this.top.textContent = `says ${this.label} (${percent(probabilities[best])})`;
    this.latency.textContent = `${ms.toFixed(1)} ms round trip`;
    this.root.classList.remove("failed");
  }

  #fail(message) {
    this.label = null;
    delete this.root.dataset.label;
    this.top.textContent = `error: ${message}`;
    this.latency.textContent = "";
    this.root.classList.add("failed");
  }

  reset() {
    this.epoch += 1;
    this.label = null;
    delete this.root.dataset.label;
    this.top.textContent = "waiting for a digit";
    this.latency.textContent = "";
    for (const { row, fill, value } of this.rows) {
      fill.style.width = "0";
      value.textContent = "";
      row.classList.remove("best");
      delete row.dataset.probability;
    }
  }
}

/** A served model the pad cannot feed (its input is not one 8x8 digit): listed, not drawn. */
export function otherModel(container, model) {
  const root = element("article", "card other");
  root.dataset.model = model.name;
  const title = element("h3", "", model.name);
  title.append(element("span", "version", ` v${model.version}`));
  const what = element("p", "top", "served, not drawable here");
  const input = element("p", "latency", `input: ${model.inputs.join("; ")}`);
  const how = element("p", "note");
  how.append("Send it requests of its own shape at ");
  how.append(element("code", "", `POST /v2/models/${model.name}/infer`));
  how.append(".");
  root.append(title, what, input, how);
  container.append(root);
}
