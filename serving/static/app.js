// The page at "/": one panel per served task (an input that fits its kind, probabilities as bars)
// and a live panel read from /metrics and /v2/models/stats. Plain JavaScript, no build step.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const text = await response.text();
  const body = text ? JSON.parse(text) : {};
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

// -- what kind of input a task takes, from its metadata and configuration ----------------------------

function kindOf(meta, config) {
  const input = meta.inputs[0];
  const shape = input.shape.slice(1);
  const vocab = Number((config.parameters.vocab_size || {}).string_value || 0);
  if (input.datatype === "UINT8" && (shape.length === 2 || (shape.length === 3 && shape[2] === 3)) && shape[0] >= 8) {
    return "image";
  }
  if (input.datatype === "UINT8" && shape.length === 1) return "bits";
  if (vocab > 0 || (input.datatype.startsWith("INT") && shape.length === 1)) return "tokens";
  return "numbers";
}

// -- inputs ------------------------------------------------------------------------------------------

function imageInput(shape) {
  // Draw white on black (as MNIST's digits are) on a large canvas; it is scaled down to the task's size.
  const [h, w] = shape;
  const channels = shape.length === 3 ? 3 : 1;
  const canvas = el("canvas", { class: "draw", width: 224, height: 224, "data-testid": "draw" });
  const ctx = canvas.getContext("2d");
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height); };
  clear();
  let drawing = false;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  };
  canvas.addEventListener("pointerdown", (e) => { drawing = true; ctx.beginPath(); ctx.moveTo(...at(e)); });
  canvas.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 18; ctx.lineCap = "round"; ctx.lineJoin = "round";
    ctx.lineTo(...at(e)); ctx.stroke();
  });
  for (const end of ["pointerup", "pointerleave"]) canvas.addEventListener(end, () => { drawing = false; });
  const upload = el("input", { type: "file", accept: "image/*" });
  upload.addEventListener("change", () => {
    const file = upload.files[0];
    if (!file) return;
    const img = new Image();
    img.onload = () => { clear(); ctx.drawImage(img, 0, 0, canvas.width, canvas.height); URL.revokeObjectURL(img.src); };
    img.src = URL.createObjectURL(file);
  });
  const node = el("div", {}, canvas, el("div", {}, el("button", { onclick: clear }, "clear"), " ", upload));
  const values = () => {
    const small = el("canvas", { width: w, height: h });
    const sctx = small.getContext("2d");
    sctx.imageSmoothingEnabled = true;
    sctx.drawImage(canvas, 0, 0, w, h);
    const rgba = sctx.getImageData(0, 0, w, h).data;
    const out = [];
    for (let i = 0; i < w * h; i++) {
      if (channels === 1) out.push(Math.round((rgba[4 * i] + rgba[4 * i + 1] + rgba[4 * i + 2]) / 3));
      else out.push(rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]);
    }
    return out;
  };
  return { node, values };
}

function bitsInput(n) {
  const bits = Array.from({ length: n }, () => (Math.random() < 0.5 ? 1 : 0));
  const box = el("div", { class: "bits", "data-testid": "bits" });
  bits.forEach((b, i) => {
    const button = el("button", { class: b ? "on" : "", title: `bit ${i}` }, String(b));
    button.addEventListener("click", () => {
      bits[i] ^= 1;
      button.textContent = String(bits[i]);
      button.classList.toggle("on", bits[i] === 1);
    });
    box.append(button);
  });
  return { node: box, values: () => bits.slice() };
}

function textInput(count, placeholder, parse) {
  const area = el("textarea", { rows: 3, placeholder, "data-testid": "text" });
  const values = () => {
    const parsed = area.value.split(/[\s,]+/).filter(Boolean).map(parse);
    if (parsed.some(Number.isNaN)) throw new Error("only numbers, separated by spaces or commas");
    if (parsed.length > count) throw new Error(`at most ${count} values`);
    while (parsed.length < count) parsed.push(0); // token id 0 is padding
    return parsed;
  };
  return { node: area, values };
}

// -- outputs -----------------------------------------------------------------------------------------

function showProbabilities(target, probs, shape, labels) {
  // probs: flat, for one example of shape [C] or [K, C]
  target.replaceChildren();
  const classes = shape[shape.length - 1];
  const groups = shape.length === 2 ? shape[0] : 1;
  const predicted = [];
  for (let g = 0; g < groups; g++) {
    const row = probs.slice(g * classes, (g + 1) * classes);
    const top = row.indexOf(Math.max(...row));
    predicted.push(labels[top] ?? String(top));
    if (groups === 1) {
      row.forEach((p, i) => target.append(bar(labels[i] ?? String(i), p, i === top)));
    } else {
      target.append(bar(`#${g}: ${labels[top] ?? top}`, row[top], true));
    }
  }
  return predicted;
}

function bar(label, p, top) {
  return el(
    "div", { class: top ? "bar top" : "bar" },
    el("span", { class: "label" }, label),
    el("div", { class: "track" }, el("div", { class: "fill", style: `width:${(100 * p).toFixed(1)}%` })),
    el("span", { class: "value" }, p.toFixed(3)),
  );
}

// -- one panel per task --------------------------------------------------------------------------------

async function taskPanel(name) {
  const [meta, config] = await Promise.all([api(`/v2/models/${name}`), api(`/v2/models/${name}/config`)]);
  const input = meta.inputs[0];
  const shape = input.shape.slice(1);
  const count = shape.reduce((a, b) => a * b, 1);
  const labels = meta.parameters.labels || [];
  const kind = kindOf(meta, config);
  const control =
    kind === "image" ? imageInput(shape)
    : kind === "bits" ? bitsInput(count)
    : kind === "tokens" ? textInput(count, `up to ${count} token ids, e.g. 3 5 7`, (s) => parseInt(s, 10))
    : textInput(count, `${count} numbers`, Number);
  const bars = el("div", { class: "bars", "data-testid": `bars-${name}` });
  const result = el("div", { class: "prediction", "data-testid": `prediction-${name}` });
  const predict = async () => {
    result.classList.remove("error");
    try {
      const body = {
        inputs: [{ name: input.name, datatype: input.datatype, shape: [1, ...shape], data: control.values() }],
        outputs: [{ name: "probabilities" }],
      };
      const answer = await api(`/v2/models/${name}/infer`, { method: "POST", body: JSON.stringify(body) });
      const out = answer.outputs[0];
      const predicted = showProbabilities(bars, out.data, out.shape.slice(1), labels);
      result.textContent = `prediction: ${predicted.join(" ")}`;
    } catch (e) {
      result.classList.add("error");
      result.textContent = e.message;
    }
  };
  const button = el("button", { class: "primary", onclick: predict, "data-testid": `predict-${name}` }, "Predict");
  return el(
    "section", { class: "task", "data-task": name },
    el("h2", {}, name, " ", el("span", { class: "kind" }, `${kind} · ${input.datatype} [${shape.join(", ")}]`)),
    el("div", { class: "row" }, el("div", {}, control.node, el("p", {}, button)), el("div", { class: "bars" }, result, bars)),
  );
}

async function loadTasks() {
  const root = $("#tasks");
  try {
    const server = await api("/v2");
    $("#server-meta").textContent = `${server.name} ${server.version} · ${server.extensions.join(", ")}`;
    const index = await api("/v2/repository/index", { method: "POST", body: JSON.stringify({ ready: true }) });
    const panels = await Promise.all(index.map((m) => taskPanel(m.name)));
    root.replaceChildren(...(panels.length ? panels : [el("p", {}, "No task is loaded.")]));
  } catch (e) {
    root.replaceChildren(el("p", { class: "error" }, `cannot list the tasks: ${e.message}`));
  }
}

// -- the live panel ------------------------------------------------------------------------------------

function parseMetrics(text) {
  // Prometheus text format: name{labels} value
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    samples.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return samples;
}

const sum = (samples, name, filter = () => true) =>
  samples.filter((s) => s.name === name && filter(s.labels)).reduce((a, s) => a + s.value, 0);

let previous = null;

async function refreshLive() {
  try {
    const [text, stats] = await Promise.all([
      fetch("/metrics").then((r) => r.text()),
      api("/v2/models/stats"),
    ]);
    const samples = parseMetrics(text);
    const now = {
      t: performance.now(),
      requests: sum(samples, "nv_inference_request_success") + sum(samples, "nv_inference_request_failure"),
      calls: sum(samples, "fpt_backbone_calls_total"),
      rows: sum(samples, "fpt_backbone_call_rows_sum"),
      mixed: sum(samples, "fpt_mixed_task_backbone_calls_total"),
    };
    if (previous) {
      const dt = (now.t - previous.t) / 1000;
      const calls = now.calls - previous.calls;
      $("#live-rps").textContent = ((now.requests - previous.requests) / dt).toFixed(1);
      $("#live-batch").textContent = calls > 0 ? ((now.rows - previous.rows) / calls).toFixed(1) : "–";
      $("#live-mixed").textContent = calls > 0 ? `${((100 * (now.mixed - previous.mixed)) / calls).toFixed(0)}%` : "–";
    }
    $("#live-calls").textContent = String(now.calls);
    previous = now;
    const quantile = (model, q) =>
      samples.find((s) => s.name === "nv_inference_request_summary_us" && s.labels.model === model && s.labels.quantile === q);
    const rows = stats.model_stats
      .filter((m) => !m.name.startsWith("backbone-"))
      .map((m) => {
        const p50 = quantile(m.name, "0.5"), p99 = quantile(m.name, "0.99");
        return el(
          "tr", { "data-task": m.name },
          el("td", {}, m.name),
          el("td", {}, String(m.inference_stats.success.count)),
          el("td", {}, p50 ? (p50.value / 1000).toFixed(2) : "–"),
          el("td", {}, p99 ? (p99.value / 1000).toFixed(2) : "–"),
        );
      });
    $("#live-tasks").replaceChildren(...rows);
  } catch (e) {
    $("#live-rps").textContent = "offline";
  }
}

loadTasks();
refreshLive();
setInterval(refreshLive, 1000);
