"""The pages: small server-rendered shells; static/app.js fills them from the API. Every
asset ships in the package, so the app works offline and no request leaves the machine."""

from __future__ import annotations

from html import escape

from histoscreen import __version__

DISCLAIMER = (
    "Screening aid, not a diagnosis: the maps show where a model trained on public data estimates invasive "
    "ductal carcinoma (IDC) is likely. Every finding needs review by a pathologist."
)


def _page(title: str, body: str, page: str, **data: str) -> str:
    attributes = " ".join(f'data-{key}="{escape(value)}"' for key, value in data.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · histoscreen</title><link rel="stylesheet" href="/static/app.css"></head>
<body data-page="{page}" {attributes}>
<header><a class="brand" href="/">histoscreen</a><span class="version">{__version__}</span>
<nav><a href="/">Jobs</a> <a href="/models">Adapt to this lab</a></nav>
<form id="token-form" hidden><label>Access token <input id="token" type="password" autocomplete="off"></label><button>Use</button></form>
</header>
<p class="disclaimer">{escape(DISCLAIMER)}</p>
<main>{body}</main>
<script src="/static/openseadragon/openseadragon.min.js"></script>
<script src="/static/app.js"></script>
</body></html>
"""


def api_docs() -> str:
    """The OpenAPI reference, by Swagger UI served from this server (nothing from a CDN)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>API · histoscreen {__version__}</title>
<link rel="stylesheet" href="/docs-assets/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs-assets/swagger-ui-bundle.js"></script>
<script src="/static/docs.js"></script>
</body></html>
"""


def home() -> str:
    return _page("Screening jobs", """
<section class="upload">
  <h1>Screen slides</h1>
  <div id="drop" tabindex="0">Drop a <b>.zip of patch PNGs</b> (Kaggle layout) or a <b>whole-slide image</b> (.svs, .tif, .ndpi, ...) here,
  or <label class="button">choose a file<input id="file" type="file" hidden></label></div>
  <label>Name (optional) <input id="name" maxlength="200"></label>
  <label title="µm per level-0 pixel; only needed when a slide's metadata lacks it or is wrong">Pixel size, µm/px (optional)
    <input id="mpp" type="number" step="any" min="0.05" max="50" inputmode="decimal"></label>
  <progress id="upload-progress" max="1" value="0" hidden></progress> <span id="upload-status" role="status"></span>
</section>
<section><h2>Jobs</h2>
<table id="jobs"><thead><tr><th>name</th><th>submitted</th><th>status</th><th>progress</th><th>finished</th></tr></thead><tbody></tbody></table>
</section>""", "home")


def job(job_id: str) -> str:
    return _page(f"Job {job_id}", """
<p><a href="/">← all jobs</a></p>
<h1 id="title">Job</h1><p id="state"></p>
<p id="downloads" hidden>Download: <a id="report-zip" download>the whole report (zip)</a> · <a id="slides-csv" download>slides.csv with reviews</a></p>
<table id="slides" class="sortable" hidden><thead><tr>
<th data-key="rank" data-type="number">rank</th><th data-key="patient">slide</th><th data-key="patches" data-type="number">patches</th>
<th data-key="idc_patches" data-type="number">IDC patches</th><th data-key="idc_fraction" data-type="number">burden</th>
<th data-key="largest_region_patches" data-type="number">largest region</th><th data-key="mean_prob" data-type="number">mean p</th>
<th data-key="max_prob" data-type="number">max p</th><th data-key="uncertain" data-type="number">flags</th><th data-key="review_verdict">review</th>
</tr></thead><tbody></tbody></table>
<section id="problems" hidden><h2>Problems</h2><ul></ul></section>""", "job", job=job_id)


def slide(job_id: str, slide_id: str) -> str:
    return _page(f"Slide {slide_id}", """
<p><a id="back">← all slides</a></p>
<div class="viewer-layout">
  <div id="viewer" aria-label="slide viewer"></div>
  <aside>
    <h1 id="title">Slide</h1>
    <table id="facts"></table>
    <fieldset><legend>IDC heatmap</legend>
      <label><input id="overlay-on" type="checkbox" checked> show</label>
      <label>opacity <input id="overlay-opacity" type="range" min="0" max="1" step="0.05" value="0.7"></label>
    </fieldset>
    <section id="picked"><h2>Patch</h2><p id="picked-hint">Click the slide to see a patch, its probability and where its evidence for IDC is.</p>
      <div class="pair" id="picked-pair" hidden><figure><img id="picked-patch" alt="patch"><figcaption>patch</figcaption></figure>
      <figure><img id="picked-evidence" alt="evidence map"><figcaption>Evidence (bright: hiding this part lowers the IDC score most)</figcaption></figure></div><p id="picked-facts"></p>
      <div class="marks" id="marks" hidden>This tile is: <button data-label="1">IDC</button><button data-label="0">not IDC</button>
      <button data-label="">no mark</button> <span id="mark-saved" role="status"></span>
      <a href="#" id="labels-link">labels.csv</a> (every marked tile of this job, for <code>calibrate --labels</code>)</div></section>
    <section id="region"><h2>Label a region</h2>
      <p><button id="region-draw">Draw a region</button> then click its corners on the slide; every screened tile at least
      half inside takes the label you give (kept with the job, as tile marks are).</p>
      <div id="region-actions" hidden><span id="region-count"></span> This region is:
        <button data-label="1">IDC</button><button data-label="0">not IDC</button><button data-label="">unmarked</button>
        <button id="region-cancel">cancel</button></div>
      <p id="region-saved" role="status"></p></section>
    <section id="review"><h2>Review</h2>
      <div class="verdicts"><button data-verdict="agree">agree</button><button data-verdict="disagree">disagree</button>
      <button data-verdict="needs second look">needs second look</button></div>
      <textarea id="note" rows="2" maxlength="4000" placeholder="note"></textarea>
      <p id="review-saved" role="status"></p>
    </section>
  </aside>
</div>""", "slide", job=job_id, slide=slide_id)


def models() -> str:
    return _page("Adapt to this lab", """
<h1>Adapt to this lab</h1>
<p class="explain">A model meets a new population in every lab. Calibrating it on this lab's reviewed slides refits its
temperature, bias, slide context and threshold (the network's weights stay as they are). The labels are the tiles a
reviewer marked in the viewer and, for patch uploads, the classes in the patch names. Before a version is used, its
estimate says what it is worth here: every patient called by a calibration fitted on the other patients, against the
version it started from. Measured on a second population of public patients, calibrating on 4 to 16 patients did not
beat the shipped calibration on average (benchmarks/lab_adaptation.py): make a version active only when its estimate is
better. At least 5 patients and 50 patches of each class are needed.</p>
<section><h2>Build a version</h2>
<p>From the finished screening jobs chosen below, starting from the active version.</p>
<table id="adapt-jobs"><thead><tr><th>use</th><th>job</th><th>kind</th><th>marked tiles</th></tr></thead><tbody></tbody></table>
<label>Name <input id="version-name" maxlength="200" placeholder="e.g. our lab, 2026 review"></label>
<button id="adapt">Build a calibrated version</button> <span id="adapt-status" role="status"></span>
</section>
<section><h2>Versions</h2>
<table id="versions"><thead><tr><th>version</th><th>built</th><th>calibrated on</th><th>weights</th><th>scoring</th>
<th>estimate before → after (each patient called by a fit on the others)</th><th></th></tr></thead><tbody></tbody></table>
<p id="activate-status" role="status"></p>
</section>""", "models")
