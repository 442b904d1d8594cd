// The console: hash routes, one view per page, all data from the public API.

import { ApiError, download, get, post, request, session, streamEvents } from "./api.js";
import { lineChart } from "./chart.js";
import { clear, errorBox, fmtBytes, fmtDuration, fmtNum, fmtTime, h, table } from "./dom.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
let pageAbort = new AbortController();  // aborted on navigation: stops timers and streams of the old page

const link = (href, text) => h("a", { href }, text);
const section = (title, ...body) => h("section", {}, h("h2", {}, title), ...body);
const statusBadge = (status) => h("span", { class: `badge ${status}`, "data-status": status }, status);

function every(ms, fn) {
  const timer = setInterval(fn, ms);
  pageAbort.signal.addEventListener("abort", () => clearInterval(timer));
}

async function guard(target, fn) {
  try { return await fn(); } catch (err) { clear(target).append(errorBox(err)); return undefined; }
}

// --- sign in --------------------------------------------------------------------------------------

function signIn(message) {
  nav.hidden = true;
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true,
    placeholder: "sk-...", size: 50 });
  const out = h("div");
  const form = h("form", { id: "signin", class: "card", onsubmit: async (ev) => {
    ev.preventDefault();
    session.key = input.value.trim();
    try {
      await get("/v1/models");
      location.hash = "#/jobs";
      route();
    } catch (err) {
      session.key = null;
      clear(out).append(errorBox(err.status === 401 ? new Error("That API key is not valid.") : err));
    }
  } },
  h("h2", {}, "Sign in"),
  h("p", { class: "muted" }, "Paste an API key of your project. It is kept in this browser tab only (sessionStorage)."),
  h("label", {}, "API key ", input), " ", h("button", { type: "submit" }, "Sign in"), out);
  if (message) out.append(h("div", { class: "error" }, message));
  clear(main).append(form);
}

window.addEventListener("tunehouse:unauthorized", () => {
  if (nav.hidden) return;  // the sign-in form reports its own failures
  session.key = null;
  signIn("Your API key was rejected: sign in again.");
});
document.getElementById("signout").addEventListener("click", () => {
  session.key = null;
  location.hash = "";
  signIn();
});

// --- files ----------------------------------------------------------------------------------------

async function filesPage() {
  const list = h("div", { id: "file-list" });
  const result = h("div", { id: "upload-result" });
  const input = h("input", { id: "upload-file", type: "file", accept: ".jsonl,.json,.csv,.txt", required: true });
  const form = h("form", { class: "card", onsubmit: async (ev) => {
    ev.preventDefault();
    if (!input.files.length) return;
    const body = new FormData();
    body.append("purpose", "fine-tune");
    body.append("file", input.files[0]);
    clear(result).append(h("p", { class: "muted" }, "Uploading and validating…"));
    try {
      const file = await request("POST", "/v1/files", body);
      clear(result).append(h("p", { class: "ok" }, "Uploaded ", link(`#/files/${file.id}`, file.id),
        ` (${file.format}, ${file.rows} rows)`));
      await loadList();
    } catch (err) {
      clear(result).append(errorBox(err));
    }
  } }, h("label", {}, "Dataset (JSONL or CSV) ", input), " ", h("button", { type: "submit", id: "upload" }, "Upload"),
  result);
  const loadList = () => guard(list, async () => {
    const files = (await get("/v1/files?limit=100")).data;
    clear(list).append(files.length ? table(["File", "Name", "Purpose", "Format", "Rows", "Bytes", "Uploaded"],
      files.map((f) => [link(`#/files/${f.id}`, f.id), f.filename, f.purpose, f.format ?? "–", fmtNum(f.rows),
        fmtNum(f.bytes), fmtTime(f.created_at)])) : h("p", { class: "muted" }, "No files yet."));
  });
  clear(main).append(section("Upload a dataset", form), section("Files", list));
  await loadList();
}

function kvTable(obj) {
  const show = (v) => (v !== null && typeof v === "object" && !Array.isArray(v)
    ? Object.entries(v).map(([k, x]) => `${k}: ${typeof x === "object" ? JSON.stringify(x) : fmtNum(x)}`).join(", ")
    : Array.isArray(v) ? JSON.stringify(v) : fmtNum(v));
  return table(["", ""], Object.entries(obj).map(([k, v]) => [k, show(v)]), { class: "kv" });
}

async function fileDetail(id) {
  const file = await get(`/v1/files/${encodeURIComponent(id)}`);
  const { cleaning, ...stats } = file.stats || {};
  const preview = h("div", { id: "file-preview" }, h("p", { class: "muted" }, "Loading…"));
  const cleanOut = h("div", { id: "clean-result" });
  const opts = { dedupe: true, near_dedupe: false, drop_empty: true, scrub_pii: false };
  const boxes = Object.entries(opts).map(([name, on]) => h("input", { type: "checkbox", name, checked: on }));
  const cleanBtn = h("button", { type: "button", id: "clean-file", onclick: () => guard(cleanOut, async () => {
    const body = Object.fromEntries(boxes.map((b) => [b.name, b.checked]));
    const copy = await post(`/v1/files/${encodeURIComponent(id)}/clean`, body);
    clear(cleanOut).append(h("p", { class: "ok" }, "Cleaned copy: ", link(`#/files/${copy.id}`, copy.id)));
  }) }, "Make a cleaned copy");
  clear(main).append(
    h("h1", {}, file.filename, " ", h("small", { class: "muted" }, file.id)),
    section("Summary", kvTable({ format: file.format, rows: file.rows, bytes: file.bytes, status: file.status,
      purpose: file.purpose, uploaded: fmtTime(file.created_at) })),
    section("Dataset statistics", Object.keys(stats).length ? kvTable(stats) : h("p", { class: "muted" }, "None.")),
    section("Cleaning report", h("div", { id: "cleaning-report" },
      cleaning ? kvTable(cleaning) : h("p", { class: "muted" }, "Not a cleaned copy.")),
    file.purpose === "fine-tune" && !cleaning
      ? h("p", {}, boxes.map((b) => h("label", {}, b, ` ${b.name} `)), cleanBtn) : null, cleanOut),
    section("Preview (first rows)", preview),
    h("p", {}, h("button", { type: "button", onclick: () => download(`/v1/files/${id}/content`, file.filename) },
      "Download")),
  );
  await guard(preview, async () => {
    const res = await request("GET", `/v1/files/${encodeURIComponent(id)}/content`, undefined, { raw: true });
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let text = "";
    while (text.split("\n").length <= 10) {
      const { value, done } = await reader.read();
      if (done) break;
      text += value;
    }
    reader.cancel();
    const lines = text.split("\n").filter(Boolean).slice(0, 10);
    clear(preview).append(h("ol", { class: "rows" }, lines.map((line) => h("li", {}, h("code", {}, line)))));
  });
}

// --- jobs -----------------------------------------------------------------------------------------

function progressCell(job) {
  const p = job.progress || {};
  if (job.status === "succeeded") return "100%";
  if (!p.total_steps) return "–";
  const pct = Math.round((100 * (p.step || 0)) / p.total_steps);
  return h("span", {}, h("progress", { max: 100, value: pct }), ` ${pct}% (${p.step}/${p.total_steps})`);
}

async function jobsPage() {
  const list = h("div", { id: "job-list" });
  const load = () => guard(list, async () => {
    const jobs = (await get("/v1/fine_tuning/jobs?limit=50")).data;
    clear(list).append(jobs.length ? table(["Job", "Model", "Status", "Progress", "ETA", "Created", "Fine-tuned model"],
      jobs.map((j) => [link(`#/jobs/${j.id}`, j.id), j.model, statusBadge(j.status), progressCell(j),
        FINISHED.has(j.status) ? "–" : fmtDuration(j.progress?.eta_seconds), fmtTime(j.created_at),
        j.fine_tuned_model ?? "–"])) : h("p", { class: "muted" }, "No jobs yet."));
  });
  clear(main).append(h("p", {}, h("a", { href: "#/jobs/new", class: "button", id: "new-job" }, "New job")),
    section("Fine-tuning jobs", list));
  await load();
  every(3000, load);
}

function field(label, control) {
  return h("label", { class: "field" }, h("span", {}, label), control);
}

async function newJobPage() {
  const [models, files] = await Promise.all([get("/v1/models"), get("/v1/files?limit=200")]);
  const bases = models.data.filter((m) => m.kind === "base");
  const usable = files.data.filter((f) => f.purpose === "fine-tune");
  const fileOptions = (blank) => [blank ? h("option", { value: "" }, "(none)") : null,
    ...usable.map((f) => h("option", { value: f.id }, `${f.filename} — ${f.id} (${f.format}, ${f.rows} rows)`))];
  const c = {
    model: h("select", { id: "job-model" }, bases.map((m) => h("option", { value: m.id }, m.id))),
    task: h("select", { id: "job-task" }),
    training_file: h("select", { id: "job-training-file" }, fileOptions(false)),
    validation_file: h("select", { id: "job-validation-file" }, fileOptions(true)),
    training_type: h("select", { id: "job-training-type" }),
    n_epochs: h("input", { id: "job-epochs", type: "number", min: 1, max: 50, placeholder: "auto" }),
    batch_size: h("input", { id: "job-batch-size", type: "number", min: 1, placeholder: "auto" }),
    learning_rate: h("input", { id: "job-learning-rate", type: "number", step: "any", placeholder: "default" }),
    max_seq_length: h("input", { id: "job-max-seq-length", type: "number", min: 8, placeholder: "default" }),
    suffix: h("input", { id: "job-suffix", maxlength: 64, placeholder: "optional" }),
  };
  const syncModel = () => {
    const m = bases.find((b) => b.id === c.model.value) || { tasks: [], training_types: [] };
    clear(c.task).append(...m.tasks.map((t) => h("option", { value: t }, t)));
    clear(c.training_type).append(...m.training_types.map((t) => h("option", { value: t }, t)));
  };
  c.model.addEventListener("change", syncModel);
  syncModel();
  const body = () => {
    const hp = {};
    if (c.n_epochs.value) hp.n_epochs = Number(c.n_epochs.value);
    if (c.batch_size.value) hp.batch_size = Number(c.batch_size.value);
    const out = { model: c.model.value, task: c.task.value, training_file: c.training_file.value,
      training_type: c.training_type.value, hyperparameters: hp };
    if (c.validation_file.value) out.validation_file = c.validation_file.value;
    if (c.learning_rate.value) out.learning_rate = Number(c.learning_rate.value);
    if (c.max_seq_length.value) out.max_seq_length = Number(c.max_seq_length.value);
    if (c.suffix.value) out.suffix = c.suffix.value;
    return out;
  };
  const estimateOut = h("div", { id: "estimate" });
  const start = h("button", { type: "submit", id: "start-job", disabled: true }, "Start job");
  const estimate = h("button", { type: "button", id: "estimate-job", onclick: () => guard(estimateOut, async () => {
    const e = await post("/v1/fine_tuning/estimate", body());
    const m = e.memory;
    const mem = m ? `${fmtBytes(m.peak_bytes)}${m.fits === false ? ` (over the device's ${fmtBytes(m.device_bytes)})` : ""}`
      : "–";
    clear(estimateOut).append(h("div", { class: "card ok" }, h("strong", {},
      `About ${fmtDuration(e.estimated_seconds)} (${e.basis} throughput)`),
    kvTable({ steps: e.steps, epochs: e.n_epochs, batch_size: e.batch_size, examples: e.examples,
      trained_tokens: e.trained_tokens, tokens_per_second: e.tokens_per_second, peak_memory: mem })));
    start.disabled = false;
  }) }, "Estimate");
  Object.values(c).forEach((el) => el.addEventListener("change", () => { start.disabled = true; }));
  const out = h("div");
  const form = h("form", { id: "job-form", class: "card grid", onsubmit: (ev) => {
    ev.preventDefault();
    guard(out, async () => {
      const job = await post("/v1/fine_tuning/jobs", body());
      location.hash = `#/jobs/${job.id}`;
    });
  } },
  field("Base model", c.model), field("Task", c.task), field("Training file", c.training_file),
  field("Validation file", c.validation_file), field("Training type", c.training_type), field("Epochs", c.n_epochs),
  field("Batch size", c.batch_size), field("Learning rate", c.learning_rate),
  field("Max sequence length", c.max_seq_length), field("Suffix", c.suffix),
  h("p", { class: "muted" }, "Estimate first: the time and memory the job would take are shown before it starts."),
  h("div", {}, estimate, " ", start), estimateOut, out);
  clear(main).append(section("New fine-tuning job", form));
}

function metricSeries(events) {
  const series = {};
  for (const e of events) {
    if (e.type !== "metrics" || !e.data) continue;
    for (const [key, value] of Object.entries(e.data)) {
      if (!/loss/.test(key) || typeof value !== "number") continue;
      (series[key] ||= []).push([e.data.step, value]);
    }
  }
  return series;
}

async function jobPage(id) {
  const path = `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`;
  const head = h("div", { id: "job-head" });
  const chart = h("div", { id: "loss-chart" });
  const lastMetrics = h("div", { id: "last-metrics" });
  const eventsList = h("ol", { id: "events", class: "events", reversed: true });
  const checkpoints = h("div", { id: "checkpoints" });
  const report = h("div", { id: "evaluation" });
  const actions = h("div", { id: "job-actions" });
  const events = [];
  clear(main).append(head, actions, section("Loss", chart, lastMetrics), section("Evaluation report", report),
    section("Checkpoints", checkpoints), section("Events", eventsList));

  const drawChart = () => {
    clear(chart).append(lineChart(metricSeries(events)));
    const last = [...events].reverse().find((e) => e.type === "metrics" && e.data);
    clear(lastMetrics).append(last ? kvTable(last.data) : "");
  };
  const refresh = async () => {
    const job = await get(path);
    const p = job.progress || {};
    clear(head).append(h("h1", {}, job.id, " ", statusBadge(job.status)),
      kvTable({ model: job.model, task: job.task, training_type: job.training_type?.type,
        fine_tuned_model: job.fine_tuned_model, progress: p.total_steps ? `${p.step}/${p.total_steps} steps` : "–",
        eta: FINISHED.has(job.status) ? "–" : fmtDuration(p.eta_seconds), trained_tokens: job.trained_tokens,
        created: fmtTime(job.created_at), finished: fmtTime(job.finished_at) }),
      job.error ? errorBox(job.error) : "");
    clear(actions).append(jobButtons(job, refresh));
    drawReport(report, job.evaluation);
    await drawCheckpoints(checkpoints, job);
    return job;
  };
  await refresh();
  drawChart();
  const { signal } = pageAbort;
  streamEvents(`${path}/events?stream=true`, (frame) => {
    if (frame.event === "end") { refresh(); return; }
    if (typeof frame.data !== "object") return;
    events.push(frame.data);
    eventsList.prepend(h("li", { class: frame.data.level }, h("time", {}, fmtTime(frame.data.created_at)), " ",
      frame.data.message));
    if (frame.data.type === "metrics") drawChart();
  }, { signal }).catch((err) => eventsList.prepend(h("li", { class: "error" }, err.message)));
  every(3000, async () => {
    const job = await get(path).catch(() => null);
    if (job && !head.dataset.finished) {
      await refresh();
      if (FINISHED.has(job.status)) head.dataset.finished = "1";
    }
  });
}

function jobButtons(job, refresh) {
  const act = (verb) => h("button", { type: "button", id: `job-${verb}`, onclick: async (ev) => {
    ev.target.disabled = true;
    try { await post(`/v1/fine_tuning/jobs/${job.id}/${verb}`); } catch (err) { alert(err.message); }
    await refresh();
  } }, verb[0].toUpperCase() + verb.slice(1));
  const running = ["validating_files", "queued", "running"].includes(job.status);
  return h("p", { class: "actions" },
    running || job.status === "paused" ? act("cancel") : null,
    running ? act("pause") : null,
    job.status === "paused" ? act("resume") : null,
    job.result_files.map((f) => h("button", { type: "button", onclick: () => download(`/v1/files/${f}/content`,
      `${job.id}-metrics.csv`) }, "Download metrics CSV")),
    job.status === "succeeded" ? [
      h("button", { type: "button", id: "download-model", onclick: () => downloadWeights(job.id, "final") },
        "Download model"),
      h("a", { href: `#/playground?model=${encodeURIComponent(job.fine_tuned_model)}`, class: "button",
        id: "try-model" }, "Try it in the playground")] : null);
}

async function downloadWeights(jobId, checkpoint) {
  try {
    const pending = await download(`/v1/fine_tuning/jobs/${jobId}/checkpoints/${checkpoint}/download`,
      `${jobId}-${checkpoint}.tar`);
    if (pending) alert(`The export is ${pending.status}: try again in a moment.`);
  } catch (err) { alert(err.message); }
}

function drawReport(target, evaluation) {
  if (!evaluation) {
    clear(target).append(h("p", { class: "muted" }, "No report (it is written when a job with a validation file succeeds)."));
    return;
  }
  const base = evaluation.metrics?.base || {};
  const tuned = evaluation.metrics?.fine_tuned || {};
  const keys = [...new Set([...Object.keys(base), ...Object.keys(tuned)])].filter((k) => k !== "head");
  clear(target).append(
    h("p", { class: "muted" }, `${evaluation.validation_examples} validation examples of ${evaluation.validation_file}`),
    table(["Metric", "Base", "Fine-tuned", "Change"], keys.map((k) => [k, fmtNum(base[k]), fmtNum(tuned[k]),
      fmtNum(evaluation.delta?.[k])]), { class: "report" }));
}

async function drawCheckpoints(target, job) {
  const rows = (await get(`/v1/fine_tuning/jobs/${job.id}/checkpoints?limit=100`)).data;
  clear(target).append(rows.length ? table(["Checkpoint", "Step", "Epoch", "Metrics", ""],
    rows.map((c) => [h("span", {}, c.fine_tuned_model_checkpoint, c.is_best ? h("span", { class: "badge best" }, "best") : null),
      c.step_number, fmtNum(c.epoch),
      Object.entries(c.metrics).map(([k, v]) => `${k}=${fmtNum(v)}`).join(", "),
      h("button", { type: "button", onclick: () => downloadWeights(job.id, c.id) }, "Download")]))
    : h("p", { class: "muted" }, "No checkpoints yet."));
}

// --- models and playground ------------------------------------------------------------------------

async function modelsPage() {
  const models = (await get("/v1/models")).data;
  clear(main).append(section("Models", table(["Model", "Kind", "Tasks", "Base", "Job", ""],
    models.map((m) => [m.id, m.kind, m.tasks.join(", "), m.base_model ?? "–",
      m.fine_tuning_job ? link(`#/jobs/${m.fine_tuning_job}`, m.fine_tuning_job) : "–",
      m.kind === "fine-tuned" ? link(`#/playground?model=${encodeURIComponent(m.id)}`, "Try") : ""]),
    { id: "model-list" })));
}

async function servable(model, chat) {
  // A causal LM's base model is served as itself (first); then the fine-tuned model and its job's
  // checkpoints. A base classifier's head is untrained, so classifiers compare checkpoints only.
  const out = chat && model.base_model ? [{ id: model.base_model, label: `${model.base_model} (base)` }] : [];
  out.push({ id: model.id, label: `${model.id} (final)` });
  if (model.fine_tuning_job) {
    const ckpts = (await get(`/v1/fine_tuning/jobs/${model.fine_tuning_job}/checkpoints?limit=100`)).data;
    ckpts.sort((a, b) => a.step_number - b.step_number);
    for (const c of ckpts) out.push({ id: c.fine_tuned_model_checkpoint, label: `step ${c.step_number}` });
  }
  return out;
}

async function playgroundPage(params) {
  const tuned = (await get("/v1/models")).data.filter((m) => m.kind === "fine-tuned");
  if (!tuned.length) {
    clear(main).append(section("Playground", h("p", { class: "muted" }, "No fine-tuned models yet.")));
    return;
  }
  const chosen = tuned.find((m) => m.id === params.get("model")) || tuned[0];
  const task = chosen.tasks[0];
  const picker = h("select", { id: "pg-model", onchange: () => { location.hash = `#/playground?model=${encodeURIComponent(picker.value)}`; } },
    tuned.map((m) => h("option", { value: m.id, selected: m.id === chosen.id }, m.id)));
  const isChat = task === "causal_lm";
  const options = await servable(chosen, isChat);
  // chat: base | final; classifiers: final | earliest checkpoint
  const side = (i) => h("select", { id: `pg-side-${i}` },
    options.map((o, j) => h("option", { value: o.id, selected: j === Math.min(i, options.length - 1) },
      o.label)));
  const sides = [side(0), side(1)];
  const prompt = h("textarea", { id: "pg-input", rows: 4, cols: 60,
    placeholder: isChat ? "Ask something…" : "One text per line" });
  const outs = [h("div", { class: "pg-out", id: "pg-out-0" }), h("div", { class: "pg-out", id: "pg-out-1" })];
  const maxTokens = h("input", { id: "pg-max-tokens", type: "number", value: 48, min: 1, max: 2048 });
  const run = async (ev) => {
    ev.preventDefault();
    await Promise.all(sides.map((sel, i) => guard(outs[i], async () => {
      clear(outs[i]).append(h("p", { class: "muted" }, "…"));
      if (isChat) {
        const r = await post("/v1/chat/completions", { model: sel.value, temperature: 0,
          max_tokens: Number(maxTokens.value) || 48, messages: [{ role: "user", content: prompt.value }] });
        clear(outs[i]).append(h("div", { class: "reply" }, (r.choices[0].message.content ?? "").trim()),
          h("p", { class: "muted" }, `${r.usage?.completion_tokens ?? "?"} tokens`));
      } else {
        const inputs = prompt.value.split("\n").map((s) => s.trim()).filter(Boolean);
        const r = await post("/v1/predictions", { model: sel.value, input: inputs });
        clear(outs[i]).append(table(["Input", "Prediction", "Score"], r.data.map((d) => [inputs[d.index],
          d.label ?? (d.value !== undefined ? fmtNum(d.value) : JSON.stringify(d.fills)), fmtNum(d.score)]),
        { class: "predictions" }));
      }
    })));
  };
  clear(main).append(section("Playground",
    h("p", {}, field("Model", picker), ` task: ${task}`),
    h("p", { class: "muted", id: "pg-help" }, isChat
      ? `Side by side: the base model ${chosen.base_model ?? ""} and the fine-tuned model, the same prompt to both `
        + "(any checkpoint can be picked on either side)."
      : "Side by side: the final model and an earlier checkpoint (the earliest is closest to the base model "
        + `${chosen.base_model ?? ""}). A base model is not served for predictions: its classification head is `
        + "untrained, so the job page's evaluation report is the base-vs-fine-tuned comparison."),
    h("form", { id: "pg-form", onsubmit: run }, prompt, isChat ? field("Max tokens", maxTokens) : null,
      h("button", { type: "submit", id: "pg-run" }, isChat ? "Send" : "Predict")),
    h("div", { class: "columns" }, sides.map((s, i) => h("div", { class: "card" }, s, outs[i])))));
}

// --- routing --------------------------------------------------------------------------------------

async function route() {
  pageAbort.abort();
  pageAbort = new AbortController();
  if (!session.key) { signIn(); return; }
  nav.hidden = false;
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const parts = path.split("/").filter(Boolean);
  const params = new URLSearchParams(query || "");
  for (const a of nav.querySelectorAll("a")) a.classList.toggle("active", a.getAttribute("href") === `#/${parts[0]}`);
  clear(main).append(h("p", { class: "muted" }, "Loading…"));
  try {
    if (parts[0] === "files") await (parts[1] ? fileDetail(parts[1]) : filesPage());
    else if (parts[0] === "jobs" && parts[1] === "new") await newJobPage();
    else if (parts[0] === "jobs" && parts[1]) await jobPage(parts[1]);
    else if (parts[0] === "models") await modelsPage();
    else if (parts[0] === "playground") await playgroundPage(params);
    else await jobsPage();
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) clear(main).append(errorBox(err));
  }
}

window.addEventListener("hashchange", route);
route();
