"""Screening: slides rebuilt exactly, burden and regions by hand, triage order, GeoJSON,
robustness to bad input, and the report in a real headless browser."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from histoscreen.data import generate_slide, synthesize
from histoscreen.data import open_sources
from histoscreen.tasks.slides import SlideGrid, build_mosaic, rank_slides, region_polygons, summarise_slide
from conftest import predict_to_csv, screen_to

CHROMIUM = Path("/usr/bin/chromium")


def test_a_rebuilt_slide_equals_the_drawn_slide(tmp_path):
    synthesize(tmp_path / "slides", patients=2, seed=8, doubled=True)
    [source] = open_sources([tmp_path / "slides"])
    assert source.slide_ids() == ["900000", "900001"] and source.problems == []
    for index, slide_id in enumerate(source.slide_ids()):
        slide = source.read_slide(slide_id)
        drawn = generate_slide(index, seed=8)
        assert slide.columns.min() == 0 and slide.rows.min() == 0  # the grid starts at the slide's origin
        mosaic = build_mosaic(slide)
        covered = np.zeros(drawn.tissue.shape, dtype=bool)
        for x, y, w, h in zip(slide.xs, slide.ys, slide.widths, slide.heights):
            covered[y - 1 : y - 1 + h, x - 1 : x - 1 + w] = True
        height, width = mosaic.shape[:2]
        np.testing.assert_array_equal(mosaic[covered[:height, :width]], drawn.rgb[:height, :width][covered[:height, :width]])
        assert (mosaic[~covered[:height, :width]] == 255).all()  # missing patches stay background
        assert covered[drawn.tissue].mean() > 0.9  # nearly all tissue was cut into patches

        reduced = build_mosaic(slide, reduction=5)  # each patch averaged down to 10 x 10 px
        rows, columns = min(reduced.shape[0], drawn.rgb.shape[0] // 5), min(reduced.shape[1], drawn.rgb.shape[1] // 5)
        blocks = drawn.rgb[: rows * 5, : columns * 5].reshape(rows, 5, columns, 5, 3)
        whole = covered[: rows * 5, : columns * 5].reshape(rows, 5, columns, 5).all(axis=(1, 3))
        np.testing.assert_array_equal(reduced[:rows, :columns][whole], np.round(blocks.mean(axis=(1, 3)))[whole])
        empty = ~covered[: rows * 5, : columns * 5].reshape(rows, 5, columns, 5).any(axis=(1, 3))
        assert whole.mean() > 0.5 and (reduced[:rows, :columns][empty] == 255).all()

def cells_of(layout: np.ndarray) -> tuple[SlideGrid, np.ndarray]:
    """The grid of a hand-drawn slide (NaN: no patch there) and its patches' values."""
    rows, columns = np.nonzero(~np.isnan(layout))
    return SlideGrid.from_cells(rows, columns), layout[rows, columns]


def test_burden_and_region_size_on_a_hand_made_grid():
    nan = np.nan
    grid = np.array(
        [
            [0.9, 0.8, 0.1, nan],
            [0.7, 0.2, 0.1, 0.95],
            [nan, 0.1, 0.55, 0.6],
            [0.3, nan, 0.1, 0.1],
        ]
    )
    cells, probabilities = cells_of(grid)
    summary = summarise_slide("p", cells, probabilities, threshold=0.5, um_per_px=2.0)
    assert summary.patches == 13
    assert summary.idc_patches == 6  # 0.9 0.8 0.7 | 0.95 0.55 0.6
    assert summary.idc_fraction == pytest.approx(6 / 13)
    assert summary.largest_region_patches == 3  # both regions have 3 cells
    assert summary.largest_region_mm2 == pytest.approx(3 * (50 * 2.0 / 1000) ** 2)
    assert summary.uncertain == 2  # 0.55 and 0.6 lie within 0.1 of the threshold
    assert summary.confident_region_patches == 3  # the 0.9/0.8/0.7 corner
    assert summary.max_prob == pytest.approx(0.95)
    assert summary.mean_prob == pytest.approx(np.nanmean(grid))
    truth = np.where(np.isnan(grid), nan, (np.nan_to_num(grid) >= 0.5).astype(float))
    truth[3, 0] = 1.0  # one IDC patch the model missed
    checked = summarise_slide("p", cells, probabilities, threshold=0.5, labels=cells_of(truth)[1])
    assert checked.sensitivity == pytest.approx(6 / 7) and checked.specificity == pytest.approx(1.0)
    assert checked.agreement == pytest.approx(12 / 13)


def test_ranking_puts_the_largest_confident_region_first():
    def slide(patient, idc_cells):
        grid = np.full((10, 10), 0.05)
        grid.flat[:idc_cells] = 0.95
        return summarise_slide(patient, *cells_of(grid), 0.5)

    ranked = rank_slides([slide("small", 3), slide("none", 0), slide("large", 30), slide("medium", 12)])
    assert [s.patient for s in ranked] == ["large", "medium", "small", "none"]
    assert [s.rank for s in ranked] == [1, 2, 3, 4]


def point_in_polygon(x: float, y: float, rings) -> bool:
    inside = False
    for ring in rings:
        for (x0, y0), (x1, y1) in zip(ring, ring[1:]):
            if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
                inside = not inside
    return inside


def test_region_polygons_cover_exactly_the_cells_above_threshold():
    rng = np.random.default_rng(4)
    mask = rng.random((14, 17)) < 0.45
    mask[5:8, 5:8] = True
    mask[6, 6] = False  # a hole
    rows, columns = np.nonzero(np.ones_like(mask))
    polygons = region_polygons(SlideGrid.from_cells(rows + 3, columns + 2), mask[rows, columns], cell=50)
    for r in range(mask.shape[0]):
        for c in range(mask.shape[1]):
            hits = sum(point_in_polygon((c + 2) * 50 + 25, (r + 3) * 50 + 25, rings) for rings in polygons)
            assert hits == int(mask[r, c]), (r, c)
    for rings in polygons:
        for ring in rings:
            assert ring[0] == ring[-1] and len(ring) >= 5


@pytest.fixture(scope="module")
def screened_batch(tiny_model, tmp_path_factory):
    """Three held-out synthetic slides with known tumour sizes, a broken patch and an empty slide folder."""
    root = tmp_path_factory.mktemp("screen")
    synthesize(root / "input", patients=3, seed=99, first_index=20, idc_fractions=[0.05, 0.5, 0.0])
    victim = sorted((root / "input" / "900020").rglob("*.png"))[7]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (root / "input" / "900077" / "0").mkdir(parents=True)
    result = screen_to(root / "input", root / "report", model=tiny_model, mpp=0.25)
    return result, root / "report", victim


def test_every_slide_page_shows_the_rank_the_index_gives(screened_batch):
    result, report, _ = screened_batch
    assert len(result.slides) >= 2
    for summary in result.slides:
        page = (report / "slides" / f"{summary.patient}.html").read_text()
        assert f'<th class="left">rank</th><td>{summary.rank}</td>' in page, summary.patient


def test_every_page_says_which_model_which_threshold_and_when_and_the_index_explains_its_columns(screened_batch, tiny_model):
    import hashlib
    import re

    from histoscreen import __version__

    result, report, _ = screened_batch
    settings = json.loads((report / "slides.json").read_text())["settings"]
    digest = hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    assert settings["weights_sha256"] == digest
    for page in [report / "index.html", *(report / "slides").glob("*.html")]:
        [line] = re.findall(r'<p class="provenance">(.*?)</p>', page.read_text())
        assert f"<code>{tiny_model.name}/model.safetensors</code> (weights sha256 <code>{digest[:12]}</code>)" in line, page
        assert f"histoscreen {__version__}" in line and f"IDC threshold {settings['threshold']:.3f} (with slide context)" in line
        assert re.search(r"screened \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", line), line
    index = (report / "index.html").read_text()
    terms = re.findall(r"<dt>(.*?)</dt>", index)
    assert {"largest confident region", "burden", "mean p, max p", "uncertain, to review", "agreement"} <= set(terms)
    [head] = re.findall(r"<thead><tr>(.*?)</tr></thead>", index)
    column = re.findall(r"<th>(.*?)</th>", head).index("largest confident region (patches)")
    keys = [int(re.findall(r"<td[^>]*>(.*?)</td>", row)[column].replace(",", "")) for row in re.findall(r'<tr class="slide">(.*?)</tr>', index)]
    assert keys == [s.confident_region_patches for s in result.slides] == sorted(keys, reverse=True) and keys[0] > 0


def test_ranking_follows_the_known_tumour_sizes(screened_batch):
    result, _, _ = screened_batch
    assert [s.patient for s in result.slides] == ["900021", "900020", "900022"]
    large, small, none = result.slides
    assert large.idc_fraction > small.idc_fraction > none.idc_fraction
    assert large.largest_region_patches > small.largest_region_patches
    assert large.largest_region_mm2 == pytest.approx(large.largest_region_patches * (50 * 0.25 / 1000) ** 2)


def test_broken_patch_and_empty_slide_are_reported_and_the_rest_screened(screened_batch):
    result, report, victim = screened_batch
    with open(report / "errors.csv", newline="") as handle:
        problems = {row["where"]: row["problem"] for row in csv.DictReader(handle)}
    assert "truncated" in problems[str(victim)]
    assert any(where.endswith("900077") and "no patches" in problem for where, problem in problems.items())
    assert len(result.slides) == 3
    index = (report / "index.html").read_text()
    assert "900077" in index and "truncated" in index


def test_slides_csv_and_json_hold_the_summary(screened_batch):
    result, report, _ = screened_batch
    with open(report / "slides.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    required = ["rank", "patient", "patches", "idc_patches", "idc_fraction", "largest_region_patches", "mean_prob", "max_prob", "uncertain"]
    assert list(rows[0])[0] == "rank" and set(required) <= set(rows[0])
    assert [r["patient"] for r in rows] == [s.patient for s in result.slides]
    assert all(0 <= float(r["idc_fraction"]) <= 1 for r in rows)
    data = json.loads((report / "slides.json").read_text())
    assert [s["rank"] for s in data["slides"]] == [1, 2, 3]
    assert data["slides"][0]["true_idc_fraction"] is not None  # labels from the Kaggle names


def test_geojson_regions_cover_the_above_threshold_patches(screened_batch):
    result, report, _ = screened_batch
    for summary in result.slides:
        collection = json.loads((report / "slides" / summary.patient / "regions.geojson").read_text())
        assert collection["type"] == "FeatureCollection"
        assert all(f["type"] == "Feature" and f["geometry"]["type"] == "Polygon" for f in collection["features"])
        assert sum(f["properties"]["patches"] for f in collection["features"]) == summary.idc_patches
        polygons = [f["geometry"]["coordinates"] for f in collection["features"]]
        for rings in polygons:
            assert all(ring[0] == ring[-1] and len(ring) >= 5 for ring in rings)
        with open(report / "slides" / summary.patient / "patches.csv", newline="") as handle:
            patches = list(csv.DictReader(handle))
        assert len(patches) == summary.patches
        for patch in patches:
            centre_x, centre_y = int(patch["x"]) - 1 + 25, int(patch["y"]) - 1 + 25
            hits = sum(point_in_polygon(centre_x, centre_y, rings) for rings in polygons)
            assert hits == int(patch["pred"]), patch


def probabilities_by_position(csv_path) -> dict[tuple[int, int], float]:
    with open(csv_path, newline="") as handle:
        return {(int(r["x"]), int(r["y"])): float(r["prob_idc"]) for r in csv.DictReader(handle)}


def test_screening_uses_slide_context_by_default_and_predict_agrees(screened_batch, tiny_model, tmp_path):
    result, report, victim = screened_batch
    settings = json.loads((report / "slides.json").read_text())["settings"]
    assert settings["context"] is True and settings["context_settings"]["radius"] >= 1
    assert "with slide context" in (report / "index.html").read_text()
    slide = result.slides[0].patient
    predict_to_csv([victim.parents[2] / slide], tmp_path / "preds.csv", model=tiny_model, context=True)
    expected = probabilities_by_position(tmp_path / "preds.csv")
    screened = probabilities_by_position(report / "slides" / slide / "patches.csv")
    assert screened.keys() == expected.keys()
    assert all(abs(screened[key] - expected[key]) < 1e-5 for key in screened)


def test_no_context_judges_each_patch_alone(tiny_model, tmp_path):
    synthesize(tmp_path / "input", patients=1, seed=5, first_index=30)
    screen_to(tmp_path / "input", tmp_path / "report", model=tiny_model, context=False)
    predict_to_csv([tmp_path / "input"], tmp_path / "preds.csv", model=tiny_model, context=False)
    settings = json.loads((tmp_path / "report" / "slides.json").read_text())["settings"]
    assert settings["context"] is False and "context_settings" not in settings
    expected = probabilities_by_position(tmp_path / "preds.csv")
    screened = probabilities_by_position(tmp_path / "report" / "slides" / "900030" / "patches.csv")
    assert screened.keys() == expected.keys()
    assert all(abs(screened[key] - expected[key]) < 1e-5 for key in screened)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run installs it with apt-get)")
def test_the_report_opens_in_a_headless_browser_without_outside_requests(screened_batch):
    from playwright.sync_api import sync_playwright

    result, report, _ = screened_batch
    outside, broken = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync"],
        )
        page = browser.new_page()
        page.on("request", lambda request: outside.append(request.url) if not request.url.startswith(("file://", "data:")) else None)
        page.on("requestfailed", lambda request: broken.append(request.url))
        page.goto((report / "index.html").as_uri())
        rows = page.locator("#slides tbody tr.slide")
        assert rows.count() == len(result.slides) == 3
        assert "not a diagnosis" in page.content()
        links = page.eval_on_selector_all("#slides a", "links => links.map(a => a.href)")
        slide_pages = sorted({link for link in links if link.endswith(".html")})
        assert len(slide_pages) == 3
        for link in slide_pages + [(report / "index.html").as_uri()]:
            page.goto(link)
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.src, i.complete && i.naturalWidth > 0])")
            assert images, link
            assert all(ok for _, ok in images), [src for src, ok in images if not ok]
            for href in page.eval_on_selector_all("a", "links => links.map(a => a.href)"):
                assert href.startswith("file://"), href
                assert Path(href[len("file://"):].split("#")[0]).exists(), href
        browser.close()
    assert outside == [] and broken == []


def test_a_report_of_one_slide_says_one_slide(tiny_model, tmp_path):
    synthesize(tmp_path / "input", patients=1, seed=8, first_index=70)
    screen_to(tmp_path / "input", tmp_path / "report", model=tiny_model)
    index = (tmp_path / "report" / "index.html").read_text()
    assert "<h1>IDC screening: 1 slide</h1>" in index


def test_patch_screening_gives_areas_in_mm2_at_the_models_spacing_by_default(tiny_model, tmp_path):
    from histoscreen.models import load_metadata

    synthesize(tmp_path / "input", patients=1, seed=8, first_index=71, idc_fractions=[0.4])
    [slide] = screen_to(tmp_path / "input", tmp_path / "report", model=tiny_model).slides
    spacing = load_metadata(tiny_model).spacing_um_px
    assert spacing == 4.0 and slide.largest_region_patches > 0
    assert slide.largest_region_mm2 == pytest.approx(slide.largest_region_patches * (50 * spacing / 1000) ** 2)


def test_progress_counts_each_slides_patches_as_they_are_scored(tiny_model, tmp_path):
    """One whole-slide image is one slide: progress in slides alone sat at 0/1 for minutes."""
    from histoscreen.report import write_screening_report
    from histoscreen.tasks import Screening

    synthesize(tmp_path / "input", patients=2, seed=8, first_index=72)
    heard = []
    screening = Screening([tmp_path / "input"], model=tiny_model)
    screening.predictor.batch_size = 64  # several batches a slide
    write_screening_report(screening, tmp_path / "report", progress=lambda *call: heard.append(call))
    slides = [call for call in heard if call[0] == "screening slides"]
    assert slides[0] == ("screening slides", 0, 2) and slides[-1] == ("screening slides", 2, 2)
    for source, slide_id in screening.slides:
        counts = [(done, total) for stage, done, total in heard if stage == f"slide {slide_id}"]
        assert len(counts) > 2 and counts[-1][0] == counts[-1][1] == len(source.cells(slide_id)[0])
        assert [done for done, _ in counts] == sorted({done for done, _ in counts})


def test_occlusion_maps_light_where_the_score_comes_from_and_nowhere_else():
    """A scorer that reads only the red of pixels 20-29 x 30-39: hiding anything else changes nothing."""
    from histoscreen.data.views import Normalisation
    from histoscreen.tasks.explain import occlusion_maps

    def redness_there(patches: np.ndarray) -> np.ndarray:
        return patches[:, 20:30, 30:40, 0].mean(axis=(1, 2)).astype(np.float64)

    patches = np.full((3, 50, 50, 3), 200, dtype=np.uint8)
    patches[1] = 90  # hiding with the (grey) mean colour raises its score: no evidence for IDC anywhere
    maps = occlusion_maps(redness_there, patches, Normalisation((0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))
    assert maps.shape == (3, 50, 50) and maps.dtype == np.float32
    inside = np.zeros((50, 50), dtype=bool)
    inside[20:30, 30:40] = True
    reach = np.zeros((50, 50), dtype=bool)
    reach[10:40, 20:50] = True  # the squares that overlap the read pixels
    for evidence in maps[[0, 2]]:
        assert evidence[inside].min() > 0.5 and evidence.max() == pytest.approx(1.0)
        assert (evidence[~reach] == 0).all()
    assert (maps[1] == 0).all()


def test_the_report_reader_reads_what_the_writer_wrote_and_refuses_a_later_layout(screened_batch, tmp_path):
    import shutil

    from histoscreen.errors import InputError
    from histoscreen.report.reader import ReportReader

    result, report, _ = screened_batch
    reader = ReportReader(report)
    assert [row["patient"] for row in reader.rows] == [s.patient for s in result.slides]
    slide = result.slides[0].patient
    patches = reader.patches(slide)
    assert len(patches) == result.slides[0].patches and {type(patches[0][k]) for k in ("x", "y")} == {int}
    assert reader.view(slide)["threshold"] == reader.settings["threshold"] and reader.explained(slide)
    copy = tmp_path / "report"
    shutil.copytree(report, copy)
    payload = json.loads((copy / "slides.json").read_text())
    (copy / "slides.json").write_text(json.dumps({**payload, "format_version": payload["format_version"] + 1}))
    with pytest.raises(InputError, match="this version of histoscreen reads histoscreen-screening-report up to version 1"):
        ReportReader(copy)


IMPORT_SPY = '''
import json, sys, threading

imports = []


class Spy:
    """Records which thread imports which module; finds nothing itself."""

    def find_spec(self, name, path=None, target=None):
        imports.append((threading.current_thread().name, name))
        return None


sys.meta_path.insert(0, Spy())
from histoscreen.report import write_screening_report
from histoscreen.tasks import Screening

write_screening_report(Screening([sys.argv[1]], model=sys.argv[2]), sys.argv[3])
print(json.dumps(sorted({name for thread, name in imports if thread.startswith("report-writer")})))
'''


def test_the_report_writer_thread_imports_nothing(synthetic_archive, tiny_model, tmp_path):
    """The writer draws one slide while the next is decoded by forked processes; a fork taken
    while it imports a module leaves that module's lock held in the child, and a decoder that
    needs it hangs (the demo did once). Everything it needs is imported before it starts.
    Run in a fresh interpreter, where nothing is imported yet."""
    import json
    import subprocess
    import sys

    script = tmp_path / "spy.py"
    script.write_text(IMPORT_SPY)
    done = subprocess.run([sys.executable, str(script), str(synthetic_archive), str(tiny_model), str(tmp_path / "report")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert len(list((tmp_path / "report" / "slides").glob("*.html"))) == 3
