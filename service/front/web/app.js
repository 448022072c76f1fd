// The page: wires the pad and the sample picker to every served model, the train-vs-inference
// panel and the server panel. Models come from the server's own index and metadata.

import { ModelClient, getJSON, loadModels } from "./api.js";
import { Card, otherModel } from "./cards.js";
import { Pad, drawPreview } from "./pad.js";
import { ServerPanel } from "./server.js";
import { Story } from "./story.js";

const $ = (id) => document.getElementById(id);

function note(id, text) {
  const node = $(id);
  node.textContent = text;
  node.hidden = false;
}

async function loadSamples(info) {
  if (!info.samples) {
    note("samples-note", `No test samples on this server: build them with ${info.build_command}.`);
    return null;
  }
  let data;
  try {
    data = await getJSON("/ui/samples.json");
  } catch (error) {
    // Drawing works without them: say why the picker is off instead of failing the page.
    note("samples-note", `Test samples unavailable: ${error.message}`);
    return null;
  }
  return {
    labels: data.labels,
    pixels: data.images.map((image) => image.map((v) => v / data.scale)),
  };
}

function showReport(info) {
  const caption = $("report-caption");
  const [plot] = info.report_plots;
  if (!plot) {
    caption.textContent =
      `The behaviour report measures this on the training code itself; make its plots ` +
      `with ${info.report_command} (about two minutes) and reload.`;
    return;
  }
  const image = $("report-plot");
  image.src = `/ui/report/${encodeURIComponent(plot)}`;
  image.hidden = false;
  caption.textContent =
    `From the behaviour report (${info.report_command}): accuracy in train vs eval mode ` +
    "by batch size, and how far one digit's logits move between batches.";
}

function showLengthReport(info) {
  // Only when the report made it: an older report has no such plot, and the page says
  // nothing about an experiment it cannot show.
  if (!info.length_plot) return;
  const image = $("length-plot");
  image.src = `/ui/report/${encodeURIComponent(info.length_plot)}`;
  image.hidden = false;
  const caption = $("length-caption");
  caption.textContent =
    `From the behaviour report (${info.report_command}): digits read as sequences of rows of ` +
    "varying count. LayerNorm normalizes each step of each sample on its own and keeps its " +
    "accuracy past the longest training sequence; BatchNorm with statistics per time step has " +
    "none there, and each fallback costs accuracy (digits_sequence is the LayerNorm one).";
  $("length-report").hidden = false;
}

async function main() {
  // Everything is fetched first, then set up in one go: nothing can be drawn or picked
  // before every part of the page listens.
  const asked = getJSON("/ui/info.json");
  const [{ index, models }, info, samples] = await Promise.all([
    loadModels(),
    asked,
    asked.then(loadSamples),
  ]);
  new ServerPanel($("server"), index).start();
  const digits = models.filter((m) => m.fitsDigits);
  const clients = new Map(digits.map((m) => [m.name, new ModelClient(m)]));
  const summary = $("summary");
  const spoken = () => {
    const said = cards.filter((c) => c.label !== null).map((c) => `${c.model.name} says ${c.label}`);
    const text = said.length ? `${said.join(", ")}.` : "Draw a digit or choose a test sample.";
    if (summary.textContent !== text) summary.textContent = text; // speak changes only
  };
  // Batch-dependent models are not predictors: they appear in the train-vs-inference panel.
  const cards = digits
    .filter((m) => !m.batchDependent)
    .map((m) => new Card($("cards"), m, clients.get(m.name), spoken));
  if (!cards.length) summary.textContent = "This server serves no model that takes an 8x8 digit.";
  // Served models the pad cannot feed (a user's 3x32x32 model...): listed, not left off.
  for (const model of models.filter((m) => !m.fitsDigits)) otherModel($("cards"), model);

  const batched = digits.find((m) => m.batchDependent && clients.has(m.derivedFrom));
  let story = null;
  if (batched) {
    const evaluated = digits.find((m) => m.name === batched.derivedFrom);
    story = new Story(
      $("story"),
      { model: evaluated, client: clients.get(evaluated.name) },
      { model: batched, client: clients.get(batched.name) },
      samples ? samples.pixels : [],
    );
    showReport(info);
    showLengthReport(info);
  }

  const trueLabel = $("true-label");
  // The inputs the cards and the batch-statistics panel last got: frames that change nothing
  // send nothing. The panel costs seven requests an input, so it follows finished strokes
  // (and samples), not every frame of one.
  let shown = null;
  let explained = null;
  const update = (pixels, sampleIndex = null, drawing = false) => {
    const key = pixels ? `${sampleIndex}:${pixels.join(",")}` : null;
    if (pixels && !drawing && key !== explained) {
      explained = key;
      story?.submit(pixels, sampleIndex);
    }
    if (key !== null && key === shown) return;
    shown = key;
    drawPreview($("preview"), pixels);
    if (sampleIndex === null) {
      trueLabel.textContent = "";
      delete trueLabel.dataset.label;
    }
    if (!pixels) {
      explained = null;
      for (const card of cards) card.reset();
      story?.reset();
      spoken();
      return;
    }
    for (const card of cards) card.submit(pixels);
  };
  const pad = new Pad($("pad"), (pixels, drawing) => update(pixels, null, drawing));
  drawPreview($("preview"), null);

  $("clear").addEventListener("click", () => {
    pad.clear();
    update(null);
  });
  if (samples) {
    const picker = $("sample-index");
    const last = samples.labels.length - 1;
    picker.max = String(last);
    $("sample-range").textContent = `(0 to ${last})`;
    const show = (i) => {
      const index = Math.min(last, Math.max(0, Math.trunc(i) || 0));
      picker.value = String(index);
      pad.showSample(samples.pixels[index]);
      trueLabel.textContent = `Test sample ${index}: true label ${samples.labels[index]}`;
      trueLabel.dataset.label = samples.labels[index];
      update(samples.pixels[index], index);
    };
    $("show-sample").addEventListener("click", () => show(Number(picker.value)));
    picker.addEventListener("keydown", (e) => {
      if (e.key === "Enter") show(Number(picker.value));
    });
    $("random-sample").addEventListener("click", () => show(Math.random() * (last + 1)));
    for (const id of ["sample-index", "show-sample", "random-sample"]) $(id).disabled = false;
  }
}

main()
  .catch((error) => {
    $("summary").textContent = `The page could not start: ${error.message}`;
  })
  .finally(() => {
    document.querySelector("main").setAttribute("aria-busy", "false");
  });
