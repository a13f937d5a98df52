// Numbers as people read them (units as the CLI prints them).

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

export function bytes(value) {
  if (value === null || value === undefined) return "–";
  let scaled = value;
  let unit = 0;
  while (Math.abs(scaled) >= 1024 && unit < UNITS.length - 1) {
    scaled /= 1024;
    unit += 1;
  }
  return `${scaled.toFixed(unit === 0 ? 0 : 1)} ${UNITS[unit]}`;
}

export function millis(value) {
  if (value === null || value === undefined) return "–";
  return value < 1000 ? `${Math.round(value)} ms` : `${(value / 1000).toFixed(1)} s`;
}

/** (actual − predicted) / predicted, as the metrics' prediction error. */
export function error(predicted, actual) {
  if (predicted === null || predicted === undefined || actual === null || actual === undefined) {
    return "–";
  }
  if (predicted === 0) return actual === 0 ? "0 %" : "–";
  const ratio = Math.round(((actual - predicted) / predicted) * 100);
  return ratio === 0 ? "0 %" : `${ratio > 0 ? "+" : "−"}${Math.abs(ratio)} %`;
}

export function when(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleTimeString();
}
