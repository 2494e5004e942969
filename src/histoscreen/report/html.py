"""The static HTML report: opens from disk, needs no server and loads nothing from outside."""

from __future__ import annotations

from html import escape
from pathlib import Path

from histoscreen.models.bundle import DEFAULT_WEIGHTS_NAME, model_paths
from histoscreen.problems import Problem
from histoscreen.tasks.slides import SlideSummary

DISCLAIMER = (
    "Screening aid, not a diagnosis. These maps show where a model trained on public data "
    "estimates invasive ductal carcinoma (IDC) is likely; every finding needs review by a pathologist."
)

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 1.5rem; color: #1d1d1f; }
.disclaimer { background: #fff4e5; border-left: 4px solid #f0a020; padding: .6rem 1rem; margin: 1rem 0; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { border-bottom: 1px solid #ddd; padding: .35rem .6rem; text-align: right; vertical-align: middle; }
th { background: #f4f4f6; position: sticky; top: 0; }
td.left, th.left { text-align: left; }
.flag { display: inline-block; padding: 0 .4rem; border-radius: .3rem; font-size: .8rem; margin: 0 .1rem; }
.flag.idc { background: #fde2e2; color: #8a1010; }
.flag.review { background: #fff1c2; color: #6b5200; }
.gallery { display: flex; flex-wrap: wrap; gap: .8rem; }
.gallery figure { margin: 0; }
.gallery figcaption { font-size: .8rem; max-width: 440px; }
img.thumb { max-height: 90px; max-width: 160px; }
img.view { max-width: 100%; }
.pictures { display: flex; flex-wrap: wrap; gap: 1rem; }
.pictures > div { flex: 1 1 480px; }
.warning { color: #8a1010; }
.provenance { font-size: .85rem; color: #444; }
.legend { font-size: .85rem; margin: 1rem 0; max-width: 60rem; }
.legend dt { font-weight: 600; float: left; clear: left; width: 13rem; }
.legend dd { margin: 0 0 .3rem 13.5rem; }
"""


def _page(title: str, body: str, settings: dict) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f"<p class=\"disclaimer\">{escape(DISCLAIMER)}</p>\n{_provenance(settings)}\n{body}\n</body></html>\n"
    )


def _provenance(settings: dict) -> str:
    """Which model, exactly, judged these slides, with which threshold and when: on every
    page, since a page is printed or passed on alone."""
    weights = model_paths(settings["model"])[0]
    model = f"{weights.parent.name}/{weights.name}" if weights.name == DEFAULT_WEIGHTS_NAME else weights.name  # a folder model: its folder
    digest = settings.get("weights_sha256", "")[:12]
    scoring = "with slide context" if settings.get("context") else "each patch alone"
    parts = [
        f"Model <code>{escape(model)}</code>" + (f" (weights sha256 <code>{escape(digest)}</code>)" if digest else ""),
        f"histoscreen {escape(str(settings.get('histoscreen_version', '')))}",
        f"IDC threshold {settings['threshold']:.3f} ({scoring}{', dihedral TTA' if settings.get('tta') else ''})",
    ]
    if settings.get("started"):
        parts.append(f"screened {escape(settings['started'].replace('T', ' ').replace('+00:00', ' UTC'))}")
    return f'<p class="provenance">{" · ".join(parts)}</p>'


LEGEND = (
    ("rank", "most suspicious first: by the largest confident region, then burden, then max p"),
    ("largest confident region", "the ranking key: the largest group of touching IDC patches (4-connected) "
     "that are all above the threshold and none uncertain, in patches"),
    ("burden", "IDC patches / patches screened (the tumour burden estimate)"),
    ("largest region", "the largest group of touching IDC patches, uncertain ones included (in mm² where the pixel size is known)"),
    ("mean p, max p", "the mean and the highest calibrated IDC probability over the slide's patches"),
    ("uncertain, to review", "patches within 0.1 of the threshold, or with TTA whose 8 views fall on both sides of it: look at these"),
    ("agreement", "with ground truth only: the share of patches whose call matches their label"),
)


def _legend(labelled: bool) -> str:
    items = "".join(f"<dt>{escape(term)}</dt><dd>{escape(text)}</dd>" for term, text in LEGEND
                    if labelled or term != "agreement")
    return f'<details class="legend" open><summary>What the columns mean</summary><dl>{items}</dl></details>'


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _flags(summary: SlideSummary) -> str:
    flags = []
    if summary.confident_region_patches:
        flags.append('<span class="flag idc">IDC region</span>')
    if summary.uncertain:
        flags.append(f'<span class="flag review">{summary.uncertain} to review</span>')
    return "".join(flags)


def _region(summary: SlideSummary) -> str:
    text = f"{summary.largest_region_patches}"
    if summary.largest_region_mm2 is not None:
        text += f" ({summary.largest_region_mm2:.2f} mm²)"
    return text


def write_index(folder: Path, slides: list[SlideSummary], errors: list[Problem], settings: dict) -> None:
    labelled = any(s.true_idc_fraction is not None for s in slides)
    header = ["rank", "slide", "thumbnail", "largest confident region (patches)", "patches", "IDC patches", "burden",
              "largest region (patches)", "mean p", "max p", "flags"]
    if labelled:
        header += ["true burden", "sensitivity", "specificity", "agreement"]
    rows = []
    for s in slides:
        link = f"slides/{escape(s.patient)}.html"
        cells = [
            f"<td>{s.rank}</td>",
            f'<td class="left"><a href="{link}">{escape(s.patient)}</a></td>',
            f'<td class="left"><a href="{link}"><img class="thumb" src="slides/{escape(s.patient)}/thumbnail.png" alt="slide {escape(s.patient)}"></a></td>',
            f"<td>{s.confident_region_patches:,}</td>",
            f"<td>{s.patches:,}</td>",
            f"<td>{s.idc_patches:,}</td>",
            f"<td>{_percent(s.idc_fraction)}</td>",
            f"<td>{_region(s)}</td>",
            f"<td>{s.mean_prob:.2f}</td>",
            f"<td>{s.max_prob:.2f}</td>",
            f'<td class="left">{_flags(s)}</td>',
        ]
        if labelled:
            cells += [f"<td>{_percent(s.true_idc_fraction)}</td>", f"<td>{_percent(s.sensitivity)}</td>",
                      f"<td>{_percent(s.specificity)}</td>", f"<td>{_percent(s.agreement)}</td>"]
        rows.append(f'<tr class="slide">{"".join(cells)}</tr>')
    problems = ""
    if errors:
        items = "".join(f"<li><code>{escape(e.where)}</code>: {escape(e.reason)}</li>" for e in errors[:200])
        more = f"<p>… and {len(errors) - 200} more in errors.csv</p>" if len(errors) > 200 else ""
        problems = f'<h2>Problems ({len(errors)})</h2><ul id="problems">{items}</ul>{more}'
    body = (
        f"<h1>IDC screening: {len(slides)} slide{'' if len(slides) == 1 else 's'}</h1>"
        f"<p>Ranked most suspicious first: largest confident IDC region (patches above the threshold "
        f"{settings['threshold']:.3f} and not uncertain), then burden (IDC patches / patches screened). "
        f"Model: <code>{escape(Path(settings['model']).name)}</code>{' with dihedral TTA' if settings['tta'] else ''}"
        f"{_context_note(settings)}. "
        f"Machine-readable: <a href=\"slides.csv\">slides.csv</a>, <a href=\"slides.json\">slides.json</a>, "
        f"<a href=\"errors.csv\">errors.csv</a>.</p>"
        f'<table id="slides"><thead><tr>{"".join(f"<th>{h}</th>" for h in header)}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>{_legend(labelled)}{problems}"
    )
    (folder / "index.html").write_text(_page("IDC screening report", body, settings))


def write_slide_page(
    folder: Path, summary: SlideSummary, settings: dict, gallery: list[dict], has_truth: bool, reading: dict | None = None
) -> None:
    """The slide's page; `gallery` lists the explained patches (file, caption)."""
    patient = escape(summary.patient)
    facts = [
        ("rank", f"{summary.rank}"),
        ("largest confident region (the ranking key)", f"{summary.confident_region_patches:,} patches"),
        ("patches screened", f"{summary.patches:,}"),
        ("IDC patches", f"{summary.idc_patches:,}"),
        ("tumour burden (IDC patches / patches)", _percent(summary.idc_fraction)),
        ("largest IDC region", f"{_region(summary)} patches" if summary.largest_region_mm2 is None else _region(summary)),
        ("mean / max probability", f"{summary.mean_prob:.3f} / {summary.max_prob:.3f}"),
        ("uncertain patches (flagged for review)", f"{summary.uncertain:,}"),
    ]
    if summary.true_idc_fraction is not None:
        facts += [
            ("true burden", _percent(summary.true_idc_fraction)),
            ("sensitivity / specificity on this slide", f"{_percent(summary.sensitivity) or 'n/a'} / {_percent(summary.specificity) or 'n/a'}"),
            ("agreement with ground truth", _percent(summary.agreement)),
        ]
    table = "".join(f'<tr><th class="left">{escape(k)}</th><td>{escape(v)}</td></tr>' for k, v in facts)
    truth = ""
    if has_truth:
        truth = f'<div><h3>Ground truth</h3><img class="view" src="{patient}/truth.png" alt="ground truth map"></div>'
    figures = "".join(
        f'<figure><img src="{patient}/{escape(item["file"])}" alt="{escape(item["caption"])}">'
        f"<figcaption>{escape(item['caption'])}</figcaption></figure>"
        for item in gallery
    )
    read_note = ""
    if reading:
        tissue = reading["tissue"]
        pixel_size_from = escape(reading.get("slide_um_per_px_from", "from the slide's metadata"))
        if reading.get("slide_um_per_px_estimated"):
            pixel_size_from = f'<strong class="warning">{pixel_size_from}</strong>'
        read_note = (
            f"<p>Read from the whole-slide image at {reading['slide_um_per_px']:.3g} µm/px ({pixel_size_from}): pyramid level {reading['level']} "
            f"(downsample {reading['level_downsample']:.3g}), resampled by area averaging to the model's "
            f"{reading['model_um_per_px']:.3g} µm/px; {reading['tissue_tiles']:,} tiles of 50 px with tissue. Tissue: "
            f"{escape(tissue['method'])} on a {tissue['mask_um_per_px']:.3g} µm/px image (saturation above "
            f"{tissue['saturation_threshold']:.0f}), holes of {tissue['hole_px']} px closed, specks of {tissue['speck_px']} px "
            f"dropped; a tile is kept when at least {tissue['min_tissue']:.0%} of it is tissue.</p>"
        )
    body = (
        f'<p><a href="../index.html">← all slides</a></p><h1>Slide {patient}</h1>{read_note}'
        f"<table>{table}</table>"
        f'<div class="pictures"><div><h3>IDC heatmap</h3><img class="view" src="{patient}/heatmap.png" alt="IDC heatmap"></div>{truth}</div>'
        f'<p>The rebuilt slide: <a href="{patient}/mosaic.jpg">mosaic.jpg</a>. '
        f'For QuPath (File > Import objects; GeoJSON in the slide\'s pixel coordinates): IDC regions as annotations, '
        f'<a href="{patient}/regions.geojson">regions.geojson</a>; every scored tile as a detection with its probability, '
        f'<a href="{patient}/tiles.geojson">tiles.geojson</a>. '
        f'Every patch with its probability and call: <a href="{patient}/patches.csv">patches.csv</a>.</p>'
        f"<h2>Explained patches</h2><p>The most suspicious patches and the uncertain ones (within 0.1 of the threshold"
        f"{' or whose dihedral views disagree' if settings['tta'] else ''}): each patch, then where its evidence for "
        "IDC is: each 10 px square of the patch was hidden in turn, and the brighter a place, the more hiding it "
        "lowered the IDC score (occlusion sensitivity). Bright patch borders are the model's own habit, not the "
        "map's: hiding a patch's outer 5 px lowers this model's IDC score far more than hiding its centre "
        f'(benchmarks/explanations.py).</p><div class="gallery">{figures}</div>'
    )
    (folder / "slides" / f"{summary.patient}.html").write_text(_page(f"Slide {summary.patient}", body, settings))


def _context_note(settings: dict) -> str:
    if not settings.get("context"):
        return ", each patch judged on its own"
    context = settings["context_settings"]
    if "learned" in context:
        return (
            ", with learned slide context: each patch's score weighed together with its neighbours' out to 8 patches "
            "(400 µm) and with its slide's overall scores, by a regression fitted on labelled val patients"
        )
    return (
        f", with slide context: each patch's score blended (weight {context['weight']:.2f}) with the mean of its "
        f"neighbours within {context['radius']} patches"
    )
