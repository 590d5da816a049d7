// The job page's training charts, drawn with uPlot (vendor/uPlot.iife.min.js, loaded before this module as the
// global `uPlot`): training loss per step as a line and validation loss per evaluation as points on the same
// axes, and the learning rate in a small chart below that shares the cursor.
//
// The chart element carries data-testid="loss-chart", data-points = the number of training-loss points plotted, and
// data-lr-ticks = the learning-rate axis's labels as drawn (a JSON array), for tests and anyone checking the axis.

import { h, formatNumber } from "./dom.js";

const COLORS = { train: "#2563eb", val: "#dc2626", lr: "#059669" };
const LOSS_HEIGHT = 300;
const LR_HEIGHT = 150;
let charts = 0;

/** Tick increments for the step axis: whole steps only (1, 2, 5, 10, 20, 25, 50, ...). */
const STEP_INCREMENTS = [];
for (let scale = 1; scale <= 1e9; scale *= 10) STEP_INCREMENTS.push(scale, 2 * scale, 2.5 * scale, 5 * scale);
const STEP_AXIS = { label: "step", incrs: STEP_INCREMENTS.filter(Number.isInteger) };

/** One tick value with `digits` digits after the point (of the mantissa when `exponential`), trailing zeros cut. */
function tickLabel(value, digits, exponential) {
  if (exponential) {
    const [mantissa, exponent] = value.toExponential(digits).split("e");
    return `${trimZeros(mantissa)}e${exponent.replace("+", "")}`;
  }
  return trimZeros(value.toFixed(digits));
}

function trimZeros(text) {
  return text.includes(".") ? text.replace(/\.?0+$/, "") : text;
}

/**
 * Labels for an axis's tick values that tell the ticks apart and read back as their values: the fewest digits for
 * which every label is within a thousandth of the tick spacing of its tick, in exponential notation for small
 * (< 1e-3) and large (>= 1e6) scales. A learning rate peaking at 6e-4 gets 0, 2e-4, 4e-4, 6e-4 where uPlot's
 * default (3 decimals) wrote 0, 0, 0, 0.001.
 */
export function formatTicks(values) {
  const ticks = values.filter(Number.isFinite);
  if (ticks.length === 0) return values.map(() => "");
  const gaps = ticks.slice(1).map((v, i) => Math.abs(v - ticks[i])).filter((gap) => gap > 0);
  const largest = Math.max(...ticks.map(Math.abs));
  const tolerance = (gaps.length ? Math.min(...gaps) : largest || 1) * 1e-3;
  const exponential = largest !== 0 && (largest < 1e-3 || largest >= 1e6);
  const label = (v, digits) => (Math.abs(v) <= tolerance ? "0" : tickLabel(v, digits, exponential));
  for (let digits = 0; digits <= 16; digits += 1) {
    const labels = ticks.map((v) => label(v, digits));
    const exact = labels.every((text, i) => Math.abs(Number(text) - ticks[i]) <= tolerance);
    if (exact && new Set(labels).size === labels.length) {
      return values.map((v) => (Number.isFinite(v) ? label(v, digits) : ""));
    }
  }
  return values.map((v) => (Number.isFinite(v) ? String(v) : ""));
}

export class TrainingChart {
  constructor() {
    charts += 1;
    this.sync = `training-${charts}`;
    this.steps = [];
    this.train = [];
    this.val = [];
    this.lr = [];
    this.lossEl = h("div", { class: "chart-plot" });
    this.lrEl = h("div", { class: "chart-plot chart-plot-small" });
    this.empty = h("p", { class: "muted chart-empty" }, "No training metrics yet.");
    this.element = h("div", { class: "chart", "data-testid": "loss-chart", "data-points": "0" },
      this.empty, this.lossEl, this.lrEl);
    this.loss = null;
    this.rate = null;
    this.resizeObserver = new ResizeObserver(() => this.resize());
    this.resizeObserver.observe(this.element);
  }

  /** The last step plotted (the `after` for the next metrics request), or null. */
  get lastStep() {
    return this.steps.length ? this.steps[this.steps.length - 1] : null;
  }

  /** Add metrics rows ({step, train_loss, val_loss, learning_rate, ...}); steps already plotted are skipped. */
  add(rows) {
    let added = false;
    for (const r of rows) {
      if (this.lastStep !== null && r.step <= this.lastStep) continue;
      this.steps.push(r.step);
      this.train.push(r.train_loss ?? null);
      this.val.push(r.val_loss ?? null);
      this.lr.push(r.learning_rate ?? null);
      added = true;
    }
    if (added) this.draw();
  }

  get pointCount() {
    return this.train.filter((v) => v !== null).length;
  }

  width() {
    return Math.max(300, this.element.clientWidth || 800);
  }

  draw() {
    if (typeof window.uPlot !== "function") {
      this.empty.textContent = "The chart library did not load.";
      return;
    }
    const hasData = this.steps.length > 0;
    this.empty.hidden = hasData;
    if (hasData && this.loss === null) this.create();
    if (this.loss !== null) {
      this.loss.setData([this.steps, this.train, this.val]);
      this.rate.setData([this.steps, this.lr]);
    }
    this.element.dataset.points = String(this.pointCount);
  }

  create() {
    const width = this.width();
    const cursor = { sync: { key: this.sync }, drag: { x: true, y: false } };
    this.loss = new window.uPlot({
      width, height: LOSS_HEIGHT, cursor,
      scales: { x: { time: false } },
      axes: [STEP_AXIS, { label: "loss (nats)", size: 60 }],
      series: [
        { label: "step" },
        { label: "training loss", stroke: COLORS.train, width: 1.5, spanGaps: true, points: { show: false },
          value: (_u, v) => formatNumber(v) },
        { label: "validation loss", stroke: COLORS.val, width: 0, paths: () => null,
          points: { show: true, size: 8, fill: COLORS.val, stroke: COLORS.val }, value: (_u, v) => formatNumber(v) },
      ],
    }, [this.steps, this.train, this.val], this.lossEl);
    this.rate = new window.uPlot({
      width, height: LR_HEIGHT, cursor,
      scales: { x: { time: false } },
      axes: [{ ...STEP_AXIS, label: null }, // "step" is said above
        { label: "learning rate", size: 60, values: (_u, splits) => this.lrTicks(splits) }],
      series: [
        { label: "step" },
        { label: "learning rate", stroke: COLORS.lr, width: 1.5, spanGaps: true, points: { show: false },
          value: (_u, v) => (v === null ? "—" : v.toExponential(3)) },
      ],
    }, [this.steps, this.lr], this.lrEl);
  }

  /** The learning-rate axis's labels (formatTicks), noted on the element as data-lr-ticks. */
  lrTicks(splits) {
    const labels = formatTicks(splits);
    this.element.dataset.lrTicks = JSON.stringify(labels);
    return labels;
  }

  resize() {
    if (this.loss === null) return;
    const width = this.width();
    if (width === this.loss.width) return;
    this.loss.setSize({ width, height: LOSS_HEIGHT });
    this.rate.setSize({ width, height: LR_HEIGHT });
  }

  destroy() {
    this.resizeObserver.disconnect();
    this.loss?.destroy();
    this.rate?.destroy();
  }
}
