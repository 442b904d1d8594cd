// A hand-drawn SVG line chart: one polyline per series, shared axes, a legend.

const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c"];

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

// series: {name: [[x, y], ...]}
export function lineChart(series, { width = 640, height = 260, xLabel = "step" } = {}) {
  const pad = { l: 52, r: 12, t: 30, b: 36 };  // the legend sits above the plot
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img" });
  const names = Object.keys(series).filter((n) => series[n].length);
  const points = names.flatMap((n) => series[n]);
  if (!points.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "muted" },
      "No metrics yet"));
    return root;
  }
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => pad.l + ((x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const sy = (y) => height - pad.b - ((y - y0) / (y1 - y0)) * (height - pad.t - pad.b);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    root.append(svg("line", { x1: pad.l, x2: width - pad.r, y1: sy(y), y2: sy(y), class: "grid" }));
    root.append(svg("text", { x: pad.l - 6, y: sy(y) + 4, "text-anchor": "end", class: "tick" }, y.toPrecision(3)));
  }
  for (let i = 0; i <= 4; i++) {
    const x = x0 + ((x1 - x0) * i) / 4;
    root.append(svg("text", { x: sx(x), y: height - pad.b + 16, "text-anchor": "middle", class: "tick" },
      String(Math.round(x))));
  }
  root.append(svg("text", { x: width / 2, y: height - 4, "text-anchor": "middle", class: "tick" }, xLabel));
  names.forEach((name, i) => {
    const color = COLORS[i % COLORS.length];
    const data = [...series[name]].sort((a, b) => a[0] - b[0]);
    const line = svg("polyline", { points: data.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "),
      fill: "none", stroke: color, "stroke-width": 2, "data-series": name });
    root.append(line);
    if (data.length === 1) root.append(svg("circle", { cx: sx(data[0][0]), cy: sy(data[0][1]), r: 3, fill: color }));
    const lx = pad.l + 10 + i * 130;
    root.append(svg("rect", { x: lx, y: 8, width: 10, height: 10, fill: color }));
    root.append(svg("text", { x: lx + 14, y: 17, class: "legend" }, name));
  });
  return root;
}
