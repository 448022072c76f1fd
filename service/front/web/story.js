// Train vs inference, computed by the server: the eval-mode model against the same weights
// with batch statistics (a model whose metadata says batch_dependent), on the same digit
// alone and inside growing batches of test digits. The server runs each of those requests
// as a batch of its own, so row 0 of each answer is the digit's answer in exactly that batch.

import { argmax, latestOnly, percent, softmax } from "./api.js";

export const BATCH_SIZES = [1, 2, 4, 8, 16, 32];
const SVG = "http://www.w3.org/2000/svg";
const BOX = { width: 320, height: 180, left: 40, right: 12, top: 12, bottom: 34 };

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

export class Story {
  /** `companions`: test digits (64 intensities each) that fill the batches, or [] if none. */
  constructor(section, evaluation, batched, companions) {
    this.section = section;
    this.evaluation = evaluation; // {model, client}
    this.batched = batched;
    this.companions = companions;
    this.sizes = companions.length ? BATCH_SIZES : [1];
    this.answers = section.querySelector("#answers");
    this.chart = section.querySelector("#chart");
    this.figure = section.querySelector(".chart");
    // Before any input: a line saying what will appear, not an empty chart's blank area.
    this.waiting = section.querySelector("#story-waiting");
    section.querySelector("#eval-name").textContent = evaluation.model.name;
    section.querySelector("#batch-name").textContent = batched.model.name;
    section.hidden = false;
    this.epoch = 0;
    this.latest = latestOnly((pixels, exclude, epoch) => this.#run(pixels, exclude, epoch));
  }

  /** `sampleIndex`: the test digit shown, kept out of its own companions (or null). */
  submit(pixels, sampleIndex) {
    this.latest(pixels, sampleIndex, this.epoch);
  }

  reset() {
    this.epoch += 1;
    this.answers.replaceChildren();
    this.#clearChart();
    this.figure.hidden = true;
    this.waiting.hidden = false;
  }

  async #run(pixels, exclude, epoch) {
    try {
      const evaluation = await this.evaluation.client.infer([pixels]);
      const evalProbabilities = softmax(evaluation.logits[0]);
      const others = this.companions.filter((_, i) => i !== exclude);
      const points = [];
      for (const size of this.sizes) {
        if (epoch !== this.epoch) return;
        const rows = [pixels, ...others.slice(0, size - 1)];
        const { logits, ms } = await this.batched.client.infer(rows);
        points.push({ size, probabilities: softmax(logits[0]), ms });
      }
      if (epoch !== this.epoch) return;
      this.#render(evalProbabilities, evaluation.ms, points);
    } catch (error) {
      if (epoch === this.epoch) this.answers.textContent = `error: ${error.message}`;
    }
  }

  #render(evalProbabilities, evalMs, points) {
    const labels = this.evaluation.model.labels;
    const target = argmax(evalProbabilities);
    const rows = [
      {
        key: "eval",
        title: `Eval mode, running statistics (${this.evaluation.model.name}, batch of 1)`,
        probabilities: evalProbabilities,
        ms: evalMs,
      },
      ...points
        .filter((p) => p.size === 1 || p.size === this.sizes[this.sizes.length - 1])
        .map((p) => ({
          key: String(p.size),
          title:
            p.size === 1
              ? "Batch statistics, alone (batch of 1)"
              : `Batch statistics, with ${p.size - 1} test digits (batch of ${p.size})`,
          probabilities: p.probabilities,
          ms: p.ms,
        })),
    ];
    this.answers.replaceChildren(
      ...rows.flatMap((row) => {
        const best = argmax(row.probabilities);
        const answer = document.createElement("dd");
        answer.dataset.batch = row.key;
        answer.dataset.label = labels[best];
        answer.textContent =
          `says ${labels[best]} (${percent(row.probabilities[best])}); ` +
          `P(${labels[target]}) = ${percent(row.probabilities[target])}; ${row.ms.toFixed(1)} ms`;
        const title = document.createElement("dt");
        title.textContent = row.title;
        return [title, answer];
      }),
    );
    this.waiting.hidden = true;
    if (points.length > 1) this.#drawChart(points, target, evalProbabilities[target]);
    this.figure.hidden = points.length < 2;
  }

  #clearChart() {
    this.chart.replaceChildren(this.chart.querySelector("title"));
  }

  #drawChart(points, target, evalProbability) {
    this.#clearChart();
    const { width, height, left, right, top, bottom } = BOX;
    const x = (i) => left + (i * (width - left - right)) / (points.length - 1);
    const y = (p) => top + (1 - p) * (height - top - bottom);
    const parts = [
      svg("line", { x1: left, y1: y(0), x2: width - right, y2: y(0), class: "axis" }),
      svg("line", { x1: left, y1: y(1), x2: left, y2: y(0), class: "axis" }),
      svg("line", {
        x1: left, y1: y(evalProbability), x2: width - right, y2: y(evalProbability),
        class: "eval-line",
      }),
      svg("text", { x: width / 2, y: height - 2, class: "axis-title" }, "batch size"),
    ];
    for (const p of [0, 0.5, 1]) {
      parts.push(svg("text", { x: left - 6, y: y(p) + 4, class: "tick end" }, p.toFixed(1)));
    }
    const coordinates = points.map((point, i) => [x(i), y(point.probabilities[target])]);
    parts.push(svg("polyline", { points: coordinates.map((c) => c.join(",")).join(" ") }));
    points.forEach((point, i) => {
      const probability = point.probabilities[target];
      const dot = svg("circle", {
        cx: coordinates[i][0], cy: coordinates[i][1], r: 4,
        "data-batch": point.size, "data-probability": probability,
      });
      dot.append(svg("title", {}, `batch of ${point.size}: ${percent(probability)}`));
      parts.push(dot, svg("text", { x: x(i), y: height - bottom + 14, class: "tick" }, point.size));
    });
    this.chart.append(...parts);
  }
}
