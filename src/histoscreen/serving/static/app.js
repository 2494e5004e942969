// histoscreen's pages: plain JavaScript over the REST API; nothing is loaded from outside.
"use strict";

const page = document.body.dataset.page;
const tokenKey = "histoscreen-token";

function authHeaders() {
  const token = sessionStorage.getItem(tokenKey);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function askForToken() {
  const form = document.getElementById("token-form");
  form.hidden = false;
  form.onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(tokenKey, document.getElementById("token").value);
    location.reload();
  };
}

async function api(path, options = {}) {
  const response = await fetch(`/api${path}`, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.status === 401) {
    askForToken();
    throw new Error("an access token is needed");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

const json = async (path, options) => (await api(path, options)).json();

async function imageInto(element, path) {
  const blob = await (await api(path)).blob();
  if (element.dataset.url) URL.revokeObjectURL(element.dataset.url);
  element.dataset.url = URL.createObjectURL(blob);
  element.src = element.dataset.url;
  return element.dataset.url;
}

async function download(link, path, name) {
  link.href = "#";
  link.onclick = async (event) => {
    event.preventDefault();
    const blob = await (await api(path)).blob();
    const anchor = document.createElement("a");
    anchor.href = URL.createObjectURL(blob);
    anchor.download = name;
    anchor.click();
  };
}

const percent = (value) => (value === null || value === undefined ? "" : `${(100 * value).toFixed(1)}%`);

// Pages are built from elements and text nodes, never from HTML strings: a name, an id or a
// problem from the data (or from the address bar) is always text, whatever characters it holds.
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
const cell = (content, left = false) => el("td", left ? { class: "left" } : {}, content);

// ---- home: upload and the job list -------------------------------------------------------

function upload(file) {
  const status = document.getElementById("upload-status");
  const bar = document.getElementById("upload-progress");
  const form = new FormData();
  form.append("file", file);
  form.append("name", document.getElementById("name").value);
  const mpp = document.getElementById("mpp").value.trim();
  if (mpp) form.append("mpp", mpp);
  const request = new XMLHttpRequest();
  request.open("POST", "/api/jobs");
  for (const [key, value] of Object.entries(authHeaders())) request.setRequestHeader(key, value);
  bar.hidden = false;
  request.upload.onprogress = (event) => { if (event.lengthComputable) bar.value = event.loaded / event.total; };
  request.onload = () => {
    if (request.status === 201) {
      status.textContent = `uploaded ${file.name}: queued`;
      refreshJobs();
    } else if (request.status === 401) {
      askForToken();
    } else {
      let detail = request.statusText;
      try { detail = JSON.parse(request.responseText).detail; } catch (_) { /* not JSON */ }
      status.textContent = `refused: ${detail}`;
    }
  };
  request.onerror = () => { status.textContent = "the upload failed (connection lost)"; };
  status.textContent = `uploading ${file.name} ...`;
  request.send(form);
}

async function refreshJobs() {
  const jobs = await json("/jobs");
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(...jobs.map((job) => el("tr", { class: "job", "data-id": job.id, "data-status": job.status },
    cell(el("a", { href: job.kind === "adapt" ? "/models" : `/jobs/${encodeURIComponent(job.id)}` }, job.name), true),
    cell(job.created.replace("T", " ").slice(0, 19)),
    cell(job.status + (job.error ? `: ${job.error}` : ""), true),
    cell([el("progress", { max: "1", value: String(job.progress) }), ` ${Math.round(job.progress * 100)}%`]),
    cell(job.finished ? job.finished.replace("T", " ").slice(0, 19) : ""))));
}

function startHome() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("file");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) upload(event.dataTransfer.files[0]);
  });
  input.addEventListener("change", () => { if (input.files.length) upload(input.files[0]); });
  refreshJobs();
  setInterval(() => refreshJobs().catch(() => {}), 1000);
}

// ---- a job: its ranked slides --------------------------------------------------------------

function flags(row) {
  const found = [];
  if (row.confident_region_patches) found.push(el("span", { class: "flag idc" }, "IDC region"), " ");
  if (row.uncertain) found.push(el("span", { class: "flag" }, `${row.uncertain} to review`));
  return found;
}

function sortable(table, rows, render) {
  let key = "rank";
  let ascending = true;
  table.querySelectorAll("th").forEach((header) => header.addEventListener("click", () => {
    ascending = header.dataset.key === key ? !ascending : true;
    key = header.dataset.key;
    const numeric = header.dataset.type === "number";
    rows.sort((a, b) => {
      const [x, y] = [a[key] ?? "", b[key] ?? ""];
      const order = numeric ? Number(x) - Number(y) : String(x).localeCompare(String(y));
      return ascending ? order : -order;
    });
    render();
  }));
}

async function startJob() {
  const id = encodeURIComponent(document.body.dataset.job);
  const job = await json(`/jobs/${id}`);
  document.getElementById("title").textContent = `Job: ${job.name}`;
  const state = document.getElementById("state");
  if (job.status !== "done") {
    state.textContent = `${job.status}${job.error ? `: ${job.error}` : ""} (${Math.round(job.progress * 100)}%)`;
    if (job.status === "queued" || job.status === "running") setTimeout(startJob, 1000);
    return;
  }
  state.textContent = `done ${job.finished.replace("T", " ").slice(0, 19)}: slides ranked most suspicious first (largest confident IDC region, then burden).`;
  const rows = await json(`/jobs/${id}/slides`);
  const table = document.getElementById("slides");
  const render = () => {
    table.querySelector("tbody").replaceChildren(...rows.map((row) => el("tr", { class: "slide" }, cell(row.rank),
      cell(el("a", { href: `/jobs/${encodeURIComponent(id)}/slides/${encodeURIComponent(row.patient)}` }, row.patient), true),
      cell(row.patches), cell(row.idc_patches), cell(percent(row.idc_fraction)), cell(row.largest_region_patches),
      cell(row.mean_prob.toFixed(2)), cell(row.max_prob.toFixed(2)), cell(flags(row), true),
      cell(row.review_verdict || "", true))));
  };
  render();
  sortable(table, rows, render);
  table.hidden = false;
  document.getElementById("downloads").hidden = false;
  download(document.getElementById("report-zip"), `/jobs/${id}/report.zip`, `report-${id}.zip`);
  download(document.getElementById("slides-csv"), `/jobs/${id}/slides.csv`, `slides-${id}.csv`);
  const problems = await json(`/jobs/${id}/errors`);
  if (problems.length) {
    const section = document.getElementById("problems");
    section.hidden = false;
    section.querySelector("ul").replaceChildren(...problems.slice(0, 200)
      .map((p) => el("li", {}, el("code", {}, p.where), `: ${p.problem}`)));
  }
}

// ---- a slide: viewer, heatmap, patches, review ---------------------------------------------

async function startSlide() {
  const { slide } = document.body.dataset;
  const id = encodeURIComponent(document.body.dataset.job);
  const base = `/jobs/${id}/slides/${encodeURIComponent(slide)}`;
  document.getElementById("back").href = `/jobs/${id}`;
  const view = await json(`${base}/view`);
  const row = view.slide;
  document.getElementById("title").textContent = `Slide ${slide}`;
  const facts = [["rank", row.rank], ["patches screened", row.patches], ["IDC patches", row.idc_patches],
    ["tumour burden", percent(row.idc_fraction)], ["largest IDC region", `${row.largest_region_patches} patches`],
    ["uncertain (to review)", row.uncertain], ["threshold", view.threshold.toFixed(3)]];
  if (row.true_idc_fraction !== null) facts.push(["true burden", percent(row.true_idc_fraction)], ["agreement", percent(row.agreement)]);
  document.getElementById("facts").replaceChildren(...facts.map(([k, v]) => el("tr", {}, el("th", { class: "left" }, k), el("td", {}, v))));

  const overlayUrl = await imageInto(new Image(), `${base}/overlay.png`);
  const descriptor = new DOMParser().parseFromString(await (await api(`${base}/mosaic.dzi`)).text(), "application/xml");
  const size = descriptor.querySelector("Size");
  const viewer = OpenSeadragon({
    id: "viewer", prefixUrl: "/static/openseadragon/images/", showNavigator: true, imageSmoothingEnabled: false,
    loadTilesWithAjax: true, ajaxHeaders: authHeaders(), crossOriginPolicy: false, maxZoomPixelRatio: 4,
    tileSources: { Image: { xmlns: "http://schemas.microsoft.com/deepzoom/2008", Url: `/api${base}/mosaic_files/`,
      Format: "jpeg", Overlap: "0", TileSize: descriptor.documentElement.getAttribute("TileSize"),
      Size: { Width: size.getAttribute("Width"), Height: size.getAttribute("Height") } } },
  });
  window.histoscreenViewer = viewer;
  const opacity = document.getElementById("overlay-opacity");
  const shown = document.getElementById("overlay-on");
  viewer.addOnceHandler("open", () => {
    viewer.addTiledImage({
      // one overlay pixel per grid cell, laid over the cells' place on the base picture
      tileSource: { type: "image", url: overlayUrl }, x: view.base.offset[0] / view.base.size[0], y: view.base.offset[1] / view.base.size[0],
      width: (view.grid[1] * view.base.cell_px) / view.base.size[0], opacity: shown.checked ? Number(opacity.value) : 0,
      success: (event) => {
        const overlay = event.item;
        const apply = () => overlay.setOpacity(shown.checked ? Number(opacity.value) : 0);
        opacity.addEventListener("input", apply);
        shown.addEventListener("change", apply);
        document.body.dataset.overlay = "ready";
      },
    });
  });
  const region = startRegion(viewer, view, base);
  viewer.addHandler("canvas-click", (event) => {
    if (!event.quick) return;
    const point = viewer.world.getItemAt(0).viewerElementToImageCoordinates(event.position);
    if (region.drawing()) {
      event.preventDefaultAction = true;  // a corner, not a zoom
      region.add(point);
      return;
    }
    const column = Math.floor((point.x - view.base.offset[0]) / view.base.cell_px);
    const rowIndex = Math.floor((point.y - view.base.offset[1]) / view.base.cell_px);
    if (column < 0 || rowIndex < 0) return;
    pick(base, view.origin[0] + column * 50 + 1, view.origin[1] + rowIndex * 50 + 1);
  });

  const saved = document.getElementById("review-saved");
  const showReview = (verdict, note, when) => {
    document.querySelectorAll(".verdicts button").forEach((b) => b.classList.toggle("chosen", b.dataset.verdict === verdict));
    saved.textContent = verdict ? `Saved: ${verdict}${note ? ` (${note})` : ""}, ${when.replace("T", " ").slice(0, 19)}` : "";
  };
  if (row.review_verdict) {
    document.getElementById("note").value = row.review_note;
    showReview(row.review_verdict, row.review_note, row.review_reviewed);
  }
  startMarks(base, `/jobs/${id}`);
  document.querySelectorAll(".verdicts button").forEach((button) => button.addEventListener("click", async () => {
    const note = document.getElementById("note").value;
    const stored = await json(`${base}/review`, { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ verdict: button.dataset.verdict, note }) });
    showReview(stored.verdict, stored.note, stored.reviewed);
  }));
}

// A region drawn corner by corner, kept in the slide's grid pixels (what the API takes) and
// drawn on a canvas over the viewer, redrawn as it pans and zooms.
function startRegion(viewer, view, base) {
  const canvas = el("canvas", { class: "region-canvas" });
  viewer.canvas.append(canvas);
  const actions = document.getElementById("region-actions");
  const saved = document.getElementById("region-saved");
  let drawing = false;
  let corners = [];
  const toImage = ([gx, gy]) => new OpenSeadragon.Point(view.base.offset[0] + ((gx - view.origin[0]) / 50) * view.base.cell_px,
    view.base.offset[1] + ((gy - view.origin[1]) / 50) * view.base.cell_px);
  const draw = () => {
    canvas.width = viewer.canvas.clientWidth;
    canvas.height = viewer.canvas.clientHeight;
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, canvas.width, canvas.height);
    if (!corners.length) return;
    const item = viewer.world.getItemAt(0);
    const points = corners.map((corner) => item.imageToViewerElementCoordinates(toImage(corner)));
    context.beginPath();
    points.forEach((p, i) => (i ? context.lineTo(p.x, p.y) : context.moveTo(p.x, p.y)));
    context.closePath();
    context.fillStyle = "rgba(91, 63, 140, 0.25)";
    context.strokeStyle = "#5b3f8c";
    context.lineWidth = 2;
    context.fill();
    context.stroke();
    points.forEach((p) => context.fillRect(p.x - 3, p.y - 3, 6, 6));
  };
  const stop = () => {
    drawing = false;
    corners = [];
    actions.hidden = true;
    document.getElementById("region-draw").textContent = "Draw a region";
    draw();
  };
  viewer.addHandler("update-viewport", draw);
  document.getElementById("region-draw").addEventListener("click", () => {
    stop();
    drawing = true;
    saved.textContent = "";
    document.getElementById("region-draw").textContent = "Drawing: click the corners";
  });
  document.getElementById("region-cancel").addEventListener("click", stop);
  actions.querySelectorAll("button[data-label]").forEach((button) => button.addEventListener("click", async () => {
    const label = button.dataset.label === "" ? null : Number(button.dataset.label);
    try {
      const done = await json(`${base}/region`, { method: "PUT", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ polygon: corners, label }) });
      saved.textContent = `${done.marked} tile${done.marked === 1 ? "" : "s"} ${label === null ? "unmarked" : `marked ${label ? "IDC" : "not IDC"}`}`;
      stop();
    } catch (error) {
      saved.textContent = `refused: ${error.message}`;
    }
  }));
  return {
    drawing: () => drawing,
    add: (point) => {
      corners.push([view.origin[0] + ((point.x - view.base.offset[0]) / view.base.cell_px) * 50,
        view.origin[1] + ((point.y - view.base.offset[1]) / view.base.cell_px) * 50]);
      document.getElementById("region-count").textContent = `${corners.length} corner${corners.length === 1 ? "" : "s"}.`;
      actions.hidden = corners.length < 3;
      draw();
    },
  };
}

function showMark(label) {
  document.querySelectorAll("#marks button").forEach((b) => b.classList.toggle("chosen", b.dataset.label === (label === null ? "" : String(label))));
  document.getElementById("mark-saved").textContent = label === null ? "" : `marked ${label ? "IDC" : "not IDC"}`;
}

function startMarks(base, jobBase) {
  download(document.getElementById("labels-link"), `${jobBase}/labels.csv`, "labels.csv");
  document.querySelectorAll("#marks button").forEach((button) => button.addEventListener("click", async () => {
    const [x, y] = document.body.dataset.picked.split(",").map(Number);
    const label = button.dataset.label === "" ? null : Number(button.dataset.label);
    await json(`${base}/tiles`, { method: "PUT", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ marks: [{ x, y, label }] }) });
    showMark(label);
  }));
}

async function pick(base, x, y) {
  const facts = document.getElementById("picked-facts");
  try {
    const patch = await json(`${base}/patch?x=${x}&y=${y}`);
    document.getElementById("picked-hint").textContent = `x=${x}, y=${y}`;
    facts.textContent = `p(IDC) ${patch.prob_idc.toFixed(3)}: ${patch.pred ? "IDC" : "non-IDC"}`
      + `${patch.uncertain ? ", uncertain" : ""}${patch.label === null ? "" : `; true ${patch.label ? "IDC" : "non-IDC"}`}`;
    await Promise.all([imageInto(document.getElementById("picked-patch"), `${base}/patch.png?x=${x}&y=${y}`),
      imageInto(document.getElementById("picked-evidence"), `${base}/evidence.png?x=${x}&y=${y}`)]);
    document.getElementById("picked-pair").hidden = false;
    document.body.dataset.picked = `${x},${y}`;
    const marks = await json(`${base}/tiles`);
    const mark = marks.find((m) => m.x === x && m.y === y);
    showMark(mark ? mark.label : null);
    document.getElementById("marks").hidden = false;
  } catch (error) {
    facts.textContent = error.message;
  }
}

// ---- adapt to this lab: model versions ----------------------------------------------------


function estimateText(estimate) {
  if (!estimate) return "as shipped";
  const side = (f) => `sens ${percent(f.sensitivity)}, spec ${percent(f.specificity)}, BA ${percent(f.balanced_accuracy)}, `
    + `${f.under_called.length} of ${f.complete_slides} complete slides under-called`;
  const gain = estimate.after.balanced_accuracy - estimate.before.balanced_accuracy;
  return [el("div", {}, `before: ${side(estimate.before)}`), el("div", {}, `after: ${side(estimate.after)}`),
    el("div", { class: gain > 0 ? "better" : "worse" }, gain > 0
      ? `balanced accuracy ${(100 * gain).toFixed(1)} points better, on ${estimate.patients} patients`
      : `not better than the version it started from (${(100 * gain).toFixed(1)} points, on ${estimate.patients} patients): keep the active one`)];
}

async function refreshVersions() {
  const { versions } = await json("/models");
  const body = document.querySelector("#versions tbody");
  body.replaceChildren(...versions.map((v) => el("tr", { class: "version", "data-id": v.id, "data-active": String(v.active) },
    cell(v.name, true), cell(v.created ? v.created.replace("T", " ").slice(0, 19) : ""),
    cell(v.jobs.length ? `${v.jobs.length} job${v.jobs.length === 1 ? "" : "s"}` : ""),
    cell(el("code", {}, v.weights_sha256.slice(0, 12))), cell(el("code", {}, v.scoring_sha256.slice(0, 12))),
    cell(estimateText(v.estimate), true),
    cell(v.active ? el("b", {}, "active") : el("button", { class: "activate", "data-id": v.id }, "Make active")))));
  body.querySelectorAll("button.activate").forEach((button) => button.addEventListener("click", async () => {
    await json(`/models/${encodeURIComponent(button.dataset.id)}/activate`, { method: "POST" });
    document.getElementById("activate-status").textContent = "active now: new jobs are scored by it";
    refreshVersions();
  }));
}

async function startModels() {
  const jobs = (await json("/jobs")).filter((job) => job.kind !== "adapt" && job.status === "done");
  const marked = await Promise.all(jobs.map(async (job) => (await (await api(`/jobs/${encodeURIComponent(job.id)}/labels.csv`)).text())
    .trim().split("\n").length - 1));
  document.querySelector("#adapt-jobs tbody").replaceChildren(...jobs.map((job, index) => el("tr", {},
    cell(el("input", { type: "checkbox", class: "use", value: job.id, checked: "" })), cell(job.name, true), cell(job.kind),
    cell(marked[index]))));
  const status = document.getElementById("adapt-status");
  document.getElementById("adapt").addEventListener("click", async () => {
    const chosen = [...document.querySelectorAll("#adapt-jobs input.use:checked")].map((box) => box.value);
    try {
      const queued = await json("/models", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ jobs: chosen, name: document.getElementById("version-name").value }) });
      status.textContent = "calibrating ...";
      const timer = setInterval(async () => {
        const job = await json(`/jobs/${encodeURIComponent(queued.id)}`);
        if (job.status === "done" || job.status === "failed") {
          clearInterval(timer);
          status.textContent = job.status === "done" ? "built: see its estimate below" : `failed: ${job.error}`;
          refreshVersions();
        }
      }, 1000);
    } catch (error) {
      status.textContent = `refused: ${error.message}`;
    }
  });
  refreshVersions();
}

const start = { home: startHome, job: startJob, slide: startSlide, models: startModels }[page];
if (start) Promise.resolve(start()).catch((error) => { console.error(error); });
