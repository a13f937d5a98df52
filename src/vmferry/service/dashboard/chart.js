// A move's progress curve as inline SVG: bytes sent and bytes left over the move's time, with
// the predicted and the actual total time and the predicted bytes marked (no chart library).

import { svg } from "./dom.js";
import { bytes, millis } from "./format.js";

const WIDTH = 560;
const HEIGHT = 210;
const PAD = { left: 70, right: 16, top: 14, bottom: 34 };

/** A step of 1, 2 or 5 times a power of ten giving about `count` ticks over `range`. */
function niceStep(range, count) {
  const raw = range / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const unit = raw / power;
  return (unit <= 1 ? 1 : unit <= 2 ? 2 : unit <= 5 ? 5 : 10) * power;
}

function ticks(max, count) {
  const step = niceStep(max, count);
  const values = [];
  for (let value = 0; value <= max + step / 1e6; value += step) values.push(value);
  return values;
}

function byteTicks(max) {
  const unit = max >= 2 ** 30 ? 2 ** 30 : max >= 2 ** 20 ? 2 ** 20 : 2 ** 10;
  return ticks(max / unit, 4).map((value) => value * unit);
}

function axes(x, y, xMax, yMax) {
  const group = svg("g", { class: "axes" });
  for (const t of ticks(xMax / 1000, 6)) {
    const px = x(t * 1000);
    group.append(
      svg("line", { class: "grid", x1: px, x2: px, y1: PAD.top, y2: HEIGHT - PAD.bottom }),
      svg("text", { class: "tick", x: px, y: HEIGHT - PAD.bottom + 14, "text-anchor": "middle" },
        `${Number(t.toPrecision(3))}`),
    );
  }
  for (const b of byteTicks(yMax)) {
    const py = y(b);
    group.append(
      svg("line", { class: "grid", x1: PAD.left, x2: WIDTH - PAD.right, y1: py, y2: py }),
      svg("text", { class: "tick", x: PAD.left - 6, y: py + 4, "text-anchor": "end" }, bytes(b)),
    );
  }
  group.append(
    svg("text", { class: "axis-label", x: WIDTH - PAD.right, y: HEIGHT - 4, "text-anchor": "end" },
      "seconds since the move began"),
  );
  return group;
}

function line(points, x, y, index, className) {
  if (points.length === 0) return null;
  const d = points
    .map((p, i) => `${i === 0 ? "M" : "L"}${x(p[0]).toFixed(1)},${y(p[index]).toFixed(1)}`)
    .join(" ");
  return svg("path", { class: className, d });
}

function marker(className, x1, y1, x2, y2, label) {
  return svg("g", { class: className }, svg("title", {}, label), svg("line", { x1, y1, x2, y2 }));
}

function legend(marked) {
  const items = [["transferred", "sent"], ["remaining", "left"]];
  if (marked) items.push(["predicted", "predicted"], ["actual", "actual"]);
  const y = HEIGHT - 8;
  let left = 8;
  return svg("g", { class: "legend" }, items.map(([className, label]) => {
    const item = svg("g", { class: className },
      svg("line", { x1: left, x2: left + 18, y1: y, y2: y }),
      svg("text", { x: left + 22, y: y + 4 }, label));
    left += 36 + label.length * 6.5;
    return item;
  }));
}

/**
 * The curve of `points` ([t_ms, sent_bytes, left_bytes], QEMU's clock). With `actual` (the
 * report), the curve is placed so that it ends at the move's actual total time: what came
 * before QEMU's stream (the destination starting) shows as the gap at the start.
 */
export function curveChart(samples, { vm, predicted = null, actual = null } = {}) {
  const start = samples.findIndex((p) => p[1] > 0 || p[2] > 0); // not QEMU's empty setup
  const points = start > 0 ? samples.slice(start) : samples;
  const last = points.length ? points[points.length - 1][0] : 0;
  const shift = actual && actual.total_ms ? Math.max(0, actual.total_ms - last) : 0;
  const placed = points.map((p) => [p[0] + shift, p[1], p[2]]);
  const xMax = 1.04 * Math.max(last + shift, predicted?.total_ms || 0, actual?.total_ms || 0, 1000);
  const yMax = 1.1 * Math.max(1024, predicted?.transferred_bytes || 0,
    ...placed.map((p) => Math.max(p[1], p[2])));
  const x = (ms) => PAD.left + (ms / xMax) * (WIDTH - PAD.left - PAD.right);
  const y = (b) => HEIGHT - PAD.bottom - (b / yMax) * (HEIGHT - PAD.top - PAD.bottom);
  const chart = svg("svg", {
    class: "curve", viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img",
    "aria-label": `progress curve of ${vm}`, dataset: { points: String(points.length) },
  }, svg("title", {}, `${vm}: bytes sent and left over time`), axes(x, y, xMax, yMax));
  const top = PAD.top;
  const bottom = HEIGHT - PAD.bottom;
  if (predicted?.transferred_bytes) {
    const py = y(predicted.transferred_bytes);
    chart.append(marker("predicted bytes", PAD.left, py, WIDTH - PAD.right, py,
      `predicted: ${bytes(predicted.transferred_bytes)} sent`));
  }
  if (predicted?.total_ms) {
    const px = x(predicted.total_ms);
    chart.append(marker("predicted total", px, top, px, bottom,
      `predicted: done after ${millis(predicted.total_ms)}`));
  }
  if (actual?.total_ms) {
    const px = x(actual.total_ms);
    chart.append(marker("actual total", px, top, px, bottom,
      `actual: done after ${millis(actual.total_ms)}`));
  }
  for (const part of [line(placed, x, y, 2, "remaining"), line(placed, x, y, 1, "transferred")]) {
    if (part) chart.append(part);
  }
  chart.append(legend(Boolean(predicted || actual)));
  return chart;
}
