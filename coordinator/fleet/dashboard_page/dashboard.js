// The fleet dashboard: polls /api/fleet and the selected job's /api/jobs/JOB, and draws them. Every value from the
// registry is put in the page as text (never as HTML): device ids, reasons and configurations come from devices.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
let selectedJob = null; // the job shown below the tables; the newest until the operator picks one
let pickedByOperator = false;

function el(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function row(cells, attributes = {}) {
  const tr = el("tr", null, attributes);
  for (const cell of cells) tr.append(cell instanceof Node ? cell : el("td", cell));
  return tr;
}

function stateCell(state) {
  return el("td", state, { class: `state-${state}` });
}

function mib(bytes) {
  return bytes ? `${Math.round(bytes / 2 ** 20).toLocaleString()} MiB` : "–";
}

function mb(bytes) {
  return `${(bytes / 1e6).toFixed(2)} MB`;
}

function ago(seconds) {
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}

function modelName(model) {
  return model.split("/").filter(Boolean).pop() || model; // a folder's name, not its whole path
}

function score(evaluation) {
  if (!evaluation) return "–";
  const value = evaluation.metric === "accuracy" ? `${(100 * evaluation.value).toFixed(1)} %` : evaluation.value.toFixed(2);
  return `${value} (${evaluation.examples})`;
}

function progressCell(step, steps, state) {
  const td = el("td");
  if (steps) {
    td.append(el("progress", null, { value: step || 0, max: steps }), ` ${step || 0}/${steps} `);
  }
  td.append(el("span", state, { class: `state-${state}` }));
  return td;
}

async function getJson(path, options = {}) {
  const response = await fetch(path, { cache: "no-store", ...options });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(`${response.status}: ${body.error}`);
  return body;
}

function showProblem(message) {
  const problem = document.getElementById("problem");
  problem.hidden = !message;
  problem.textContent = message || "";
}

function drawDevices(devices) {
  const body = document.querySelector("#devices tbody");
  body.replaceChildren(
    ...devices.map((d) => {
      const budget = [d.memory_budget_bytes, d.measured_budget_bytes].map(mib).join(" / ");
      const epsilon = d.epsilon_spent === null ? "none" : `${d.epsilon_spent.toFixed(2)} (${d.private_results} runs)`;
      const datasets = Object.entries(d.datasets).map(([name, n]) => `${name} (${n})`).join(", ");
      const task = d.task ? progressCell(d.task.step, d.task.steps, `${d.task.job} r${d.task.round} ${d.task.state}`) : el("td", "idle");
      return row(
        [d.id, stateCell(d.state), d.profile || "?", d.backends.join(", "), datasets, budget, mib(d.peak_memory_bytes),
          epsilon, task, ago(d.seen_seconds_ago)],
        { "data-device": d.id },
      );
    }),
  );
  if (!devices.length) body.append(row([el("td", "no device has announced itself yet", { colspan: 10 })]));
}

function cancelButton(job) {
  const button = el("button", "cancel", { type: "button", "data-cancel": job.id });
  button.addEventListener("click", async (event) => {
    event.stopPropagation();
    if (!confirm(`Cancel ${job.id}? Its devices' results will no longer be collected.`)) return;
    try {
      await getJson(`/api/jobs/${encodeURIComponent(job.id)}/cancel`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
      });
      refresh();
    } catch (error) {
      showProblem(`cancel: ${error.message}`);
    }
  });
  return button;
}

function drawJobs(jobs, control) {
  if (!pickedByOperator || !jobs.some((j) => j.id === selectedJob)) selectedJob = jobs.length ? jobs[0].id : null;
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(
    ...jobs.map((j) => {
      const devices = j.devices ? `${j.received}/${j.devices} received` + (j.skipped ? `, ${j.skipped} skipped` : "") : "–";
      const action = el("td");
      if (control && !["done", "failed"].includes(j.state)) action.append(cancelButton(j));
      const tr = row(
        [j.id, stateCell(j.state), `${j.round}/${j.rounds}`, `${modelName(j.model)} · ${j.adapter_kind}`, devices,
          score(j.latest), score(j.zero_shot), action],
        { "data-job": j.id, class: j.id === selectedJob ? "selected" : "", title: j.reason || "" },
      );
      tr.addEventListener("click", () => {
        selectedJob = j.id;
        pickedByOperator = true;
        refresh();
      });
      return tr;
    }),
  );
  if (!jobs.length) body.append(row([el("td", "no jobs yet", { colspan: 8 })]));
}

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Plug-in score by round (points and line) beside the full model's zero-shot score (dashed).
function drawPlot(job) {
  const plot = document.getElementById("score-plot");
  const width = 460, height = 260, left = 52, right = 16, top = 16, bottom = 36;
  const points = job.rounds_detail.filter((r) => r.evaluation).map((r) => [r.round, r.evaluation.value]);
  const metric = (job.zero_shot || (points.length ? job.rounds_detail.find((r) => r.evaluation).evaluation : null) || {}).metric;
  const percent = metric === "accuracy";
  const values = points.map((p) => p[1]).concat(job.zero_shot ? [job.zero_shot.value] : []);
  plot.replaceChildren();
  plot.dataset.points = String(points.length);
  const caption = document.getElementById("score-caption");
  if (!values.length) {
    plot.append(svg("text", { x: left, y: height / 2 }, job.request.test ? "no round scored yet" : "not scored: dispatch with --test"));
    caption.textContent = "";
    return;
  }
  let low = Math.min(...values), high = Math.max(...values);
  const pad = Math.max((high - low) * 0.15, percent ? 0.02 : 0.5);
  low = percent ? Math.max(0, low - pad) : low - pad;
  high = percent ? Math.min(1, high + pad) : high + pad;
  const rounds = Math.max(job.rounds, 1);
  const x = (round) => left + (rounds === 1 ? (width - left - right) / 2 : ((round - 1) / (rounds - 1)) * (width - left - right));
  const y = (value) => top + (1 - (value - low) / (high - low)) * (height - top - bottom);
  const shown = (value) => (percent ? `${(100 * value).toFixed(1)}` : value.toFixed(2));
  plot.append(svg("line", { x1: left, y1: top, x2: left, y2: height - bottom, stroke: "#8a94a3" }));
  plot.append(svg("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, stroke: "#8a94a3" }));
  for (let i = 0; i <= 4; i++) {
    const value = low + ((high - low) * i) / 4;
    plot.append(svg("text", { x: 4, y: y(value) + 4 }, shown(value)));
  }
  for (let round = 1; round <= rounds; round++) {
    plot.append(svg("text", { x: x(round) - 4, y: height - bottom + 16 }, String(round)));
  }
  plot.append(svg("text", { x: width / 2 - 20, y: height - 4 }, "round"));
  if (job.zero_shot) {
    const at = y(job.zero_shot.value);
    plot.append(svg("line", { x1: left, y1: at, x2: width - right, y2: at, stroke: "#b42318", "stroke-dasharray": "5 4", class: "zero-shot" }));
    plot.append(svg("text", { x: width - right - 120, y: at - 5 }, `full zero-shot ${shown(job.zero_shot.value)}`));
  }
  if (points.length > 1) {
    plot.append(svg("polyline", { points: points.map(([r, v]) => `${x(r)},${y(v)}`).join(" "), fill: "none", stroke: "#1f6feb", "stroke-width": 2 }));
  }
  for (const [round, value] of points) {
    const point = svg("circle", { cx: x(round), cy: y(value), r: 4, fill: "#1f6feb", class: "point", "data-round": round });
    point.append(svg("title", {}, `round ${round}: ${shown(value)}`));
    plot.append(point);
  }
  const unit = percent ? "accuracy, %" : metric;
  caption.textContent = `Plug-in ${unit} of each round's aggregate in the full model (blue) and the full model zero-shot (dashed), on ${(job.zero_shot || job.rounds_detail.find((r) => r.evaluation).evaluation).examples} test examples.`;
}

function ranText(task) {
  const ran = task.ran;
  if (!ran) return task.chosen || "–";
  const parts = [ran.backend, `${ran.emulator} (${ran.emulator_layers} layers)`, ran.adapter_kind, `${ran.steps} steps`];
  if (ran.micro_batch) parts.push(`micro-batch ${ran.micro_batch}`);
  parts.push(`peak ${mib(ran.peak_memory_bytes)} of ${mib(ran.budget_bytes)}`);
  if (ran.epsilon !== null) parts.push(`ε ${ran.epsilon.toFixed(2)}`);
  if (ran.cut_epsilon !== null) parts.push(`cut ε ${ran.cut_epsilon.toFixed(2)}`);
  if (ran.split_bytes_up !== null) parts.push(`split exchanges ${mb(ran.split_bytes_up)} up, ${mb(ran.split_bytes_down)} down`);
  return (task.chosen ? `${task.chosen}; ` : "") + parts.join(", ");
}

function drawJob(job) {
  document.getElementById("job").hidden = false;
  document.getElementById("job-id").textContent = job.id;
  const state = document.getElementById("job-state");
  state.textContent = job.state + (job.reason ? `: ${job.reason}` : "");
  state.className = `badge state-${job.state}`;
  const r = job.request;
  document.getElementById("job-request").textContent =
    `${modelName(r.model)} on ${r.dataset}: ${r.adapter_kind} adapter ${JSON.stringify(r.adapter_layers)} through emulator ` +
    `${r.emulator}, ${r.steps} steps per device per round, ${r.rounds} rounds, ${r.aggregate}` +
    (r.per_device ? ", chosen per device" : "") + (r.split_after ? `, split after layer ${r.split_after}` : "") +
    (r.dp ? `, DP ε ${r.dp.epsilon}` : "") + (r.deadline_s ? `, deadline ${r.deadline_s} s` : "");
  drawPlot(job);
  const progress = document.getElementById("job-progress");
  progress.replaceChildren();
  for (const round of [...job.rounds_detail].reverse()) {
    progress.append(el("h3", `Round ${round.round}: ${round.state}, ${round.done}/${round.tasks.length} devices done, ` +
      `${mb(round.bytes_sent)} sent, ${mb(round.bytes_received)} received, plug-in ${score(round.evaluation)}`));
    const table = el("table", null, { class: "round", "data-round": round.round });
    table.append(row(["device", "progress", "loss", "examples", "sent", "received", "what it ran"].map((h) => el("th", h))));
    for (const task of round.tasks) {
      const state = task.state + (task.reason ? `: ${task.reason}` : "");
      table.append(row(
        [task.device, progressCell(task.step, task.steps, state), task.loss === null ? "–" : task.loss.toFixed(3),
          task.examples ?? "–", mb(task.bytes_sent), mb(task.bytes_received), el("td", ranText(task), { class: "small" })],
        { "data-device": task.device },
      ));
    }
    progress.append(table);
  }
  for (const [device, why] of Object.entries(job.left_out)) progress.append(el("p", `${device}: left out, ${why}`, { class: "small" }));
}

function drawOverview(fleet) {
  document.getElementById("updated").textContent = `updated ${new Date(fleet.now * 1000).toLocaleTimeString()}`;
  document.getElementById("refused").textContent = `${fleet.service.refused} refused`;
  document.getElementById("mode").textContent = fleet.control ? "control enabled" : "read-only";
  document.getElementById("dispatch").hidden = !fleet.control;
  drawDevices(fleet.devices);
  drawJobs(fleet.jobs, fleet.control);
  const list = document.getElementById("rejections");
  list.replaceChildren(...[...fleet.service.rejections].reverse().map((reason) => el("li", reason)));
  if (!fleet.service.rejections.length) list.append(el("li", "none"));
}

let refreshing = false;

async function refresh() {
  if (refreshing) return; // a slow answer is not asked for twice
  refreshing = true;
  try {
    drawOverview(await getJson("/api/fleet"));
    if (selectedJob) drawJob(await getJson(`/api/jobs/${encodeURIComponent(selectedJob)}`));
    showProblem(null);
  } catch (error) {
    showProblem(`the dashboard cannot read the fleet: ${error.message}`);
  } finally {
    refreshing = false;
  }
}

// Splits the form's text like a shell would for plain options: quotes group, no other expansion.
function splitArguments(text) {
  return [...text.matchAll(/"([^"]*)"|'([^']*)'|(\S+)/g)].map((m) => m[1] ?? m[2] ?? m[3]);
}

document.getElementById("dispatch").addEventListener("submit", async (event) => {
  event.preventDefault();
  const output = document.getElementById("dispatch-result");
  try {
    const answer = await getJson("/api/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ args: splitArguments(document.getElementById("dispatch-args").value) }),
    });
    output.textContent = `queued ${answer.job}`;
    selectedJob = answer.job;
    pickedByOperator = true;
    refresh();
  } catch (error) {
    output.textContent = error.message;
  }
});

refresh();
setInterval(refresh, POLL_MS);
