// Building the page from elements: every value goes in as text, never parsed as markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(node, props, children) {
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.setAttribute("class", value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** An HTML element: el("td", {class: "num"}, "12 MiB"). */
export function el(tag, props = {}, ...children) {
  return fill(document.createElement(tag), props, children);
}

/** An SVG element (inline charts). */
export function svg(tag, props = {}, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), props, children);
}

/** A bar filled to `share` (0..1); the width is set through the CSSOM, which the page's
 * Content-Security-Policy allows (inline style attributes it does not). */
export function bar(share, className = "") {
  const inner = el("div", { class: "bar-fill" });
  const clamped = Math.max(0, Math.min(1, Number.isFinite(share) ? share : 0));
  inner.style.width = `${(clamped * 100).toFixed(1)}%`;
  return el("div", { class: `bar ${className}`.trim() }, inner);
}
