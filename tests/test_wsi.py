"""Whole-slide images: pyramidal TIFFs read with OpenSlide, tiled at the model's resolution
on tissue, and screened through the same scoring as patches; QuPath-ready GeoJSON."""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("openslide", reason="the [wsi] extra (openslide-python, openslide-bin) is not installed")
pytest.importorskip("tifffile", reason="tifffile writes the test slides")

from histoscreen.data import PatchBatch, open_sources, synthesize  # noqa: E402
from histoscreen.errors import InputError  # noqa: E402
from histoscreen.tasks import Screening  # noqa: E402
from conftest import screen_to, shared_data_folder, wait_done  # noqa: E402
from slide_files import stitch, upscale, write_claimed_tiff, write_pyramid_tiff  # noqa: E402
from test_screen import point_in_polygon  # noqa: E402

# A training patient whose recovered patches make a nearly complete slide (83% of its
# bounding box), with IDC (17% of patches).
COMPLETE_TRAIN_PATIENT = "9037"


def screened(inputs, **options):
    screening = Screening([str(i) for i in inputs], **options)
    return {r.patient: r for r in screening}, screening.problems


def calls_by_place(result) -> dict[tuple[int, int], bool]:
    return {(int(x), int(y)): bool(c) for x, y, c in zip(result.slide.xs, result.slide.ys, result.calls)}


def patient_from_train_zip(shared: Path, patient: str) -> PatchBatch:
    pattern = re.compile(rf"(?:^|/){patient}_idx5_x(\d+)_y(\d+)_class([01])\.")
    rows = []
    with zipfile.ZipFile(shared / "train.zip") as archive:
        for member in archive.namelist():
            match = pattern.search(member)
            if match:
                image = np.asarray(Image.open(io.BytesIO(archive.read(member))).convert("RGB"))
                padded = np.full((50, 50, 3), 255, dtype=np.uint8)
                padded[: image.shape[0], : image.shape[1]] = image
                rows.append((int(match[1]), int(match[2]), int(match[3]), padded, image.shape[1], image.shape[0]))
    xs, ys, labels, pixels, widths, heights = zip(*rows)
    count = len(rows)
    return PatchBatch(np.stack(pixels), np.full(count, "", dtype=object), np.full(count, patient, dtype=object),
                      np.array(xs), np.array(ys), np.array(widths), np.array(heights), np.array(labels))


def write_patch_folder(batch: PatchBatch, folder: Path) -> Path:
    for x, y, label, pixels, w, h in zip(batch.xs, batch.ys, batch.labels, batch.pixels, batch.widths, batch.heights):
        target = folder / batch.patients[0] / str(label)
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[:h, :w]).save(target / f"{batch.patients[0]}_idx5_x{x}_y{y}_class{label}.png")
    return folder


@pytest.mark.real_data
def test_a_real_slide_as_a_pyramidal_tiff_screens_like_its_patches(tmp_path):
    """The patches of one training patient stitched on the 50-px grid, scaled 2x (2 µm/px)
    and written as a pyramidal TIFF: the same tissue found, the same calls, the same burden."""
    shared = shared_data_folder()
    if shared is None:
        pytest.skip("real IDC patches not available: ../shared/data/idc is absent (users don't have it)")
    patches = patient_from_train_zip(shared, COMPLETE_TRAIN_PATIENT)
    # lossless, as the patches are: this checks the reader, not a compressor (see README)
    slide = write_pyramid_tiff(tmp_path / f"{COMPLETE_TRAIN_PATIENT}.tif", upscale(stitch(patches), 2), 2.0, compression="zlib")
    from_slide, problems = screened([slide])
    from_patches, _ = screened([write_patch_folder(patches, tmp_path / "patches")])
    assert problems == []
    wsi, patch = from_slide[COMPLETE_TRAIN_PATIENT], from_patches[COMPLETE_TRAIN_PATIENT]
    tiles, cut = calls_by_place(wsi), calls_by_place(patch)
    assert len(tiles.keys() & cut.keys()) / len(tiles.keys() | cut.keys()) >= 0.9  # tissue IoU
    common = tiles.keys() & cut.keys()
    assert np.mean([tiles[k] == cut[k] for k in common]) >= 0.97
    assert abs(wsi.summary.idc_fraction - patch.summary.idc_fraction) <= 0.03
    assert wsi.reading["level"] == 1 and wsi.reading["slide_um_per_px"] == pytest.approx(2.0)


@pytest.fixture(scope="module")
def synthetic_slide_image(tmp_path_factory) -> np.ndarray:
    root = tmp_path_factory.mktemp("wsi")
    synthesize(root / "slides", patients=1, seed=5, first_index=40, idc_fractions=[0.4])
    [source] = open_sources([root / "slides"])
    return stitch(source.read_all())


def test_the_same_slide_at_two_pixel_sizes_gives_the_same_calls(synthetic_slide_image, tiny_model, tmp_path):
    files = [write_pyramid_tiff(tmp_path / f"at-{mpp}.tif", upscale(synthetic_slide_image, factor), mpp, compression="zlib")
             for mpp, factor in ((2.0, 2), (1.0, 4))]
    results, problems = screened(files, model=tiny_model)
    assert problems == []
    fine, coarse = results["at-1.0"], results["at-2.0"]
    assert coarse.reading["level"] == 1 and fine.reading["level"] == 2
    assert calls_by_place(fine) == calls_by_place(coarse) and len(calls_by_place(fine)) > 100
    np.testing.assert_allclose(fine.probabilities, coarse.probabilities, atol=1e-6)


def test_pixel_size_from_the_flag_or_a_clear_error_and_broken_files_do_not_stop_the_batch(synthetic_slide_image, tiny_model, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    image = upscale(synthetic_slide_image, 2)
    write_pyramid_tiff(folder / "good.tif", image, 2.0, compression="zlib")
    write_pyramid_tiff(folder / "no-mpp.tif", image, 2.0, compression="zlib", with_resolution=False)
    whole = (folder / "good.tif").read_bytes()
    (folder / "truncated.svs").write_bytes(whole[: len(whole) // 3])
    (folder / "not-a-slide.ndpi").write_text("hello")
    report = screen_to(folder, tmp_path / "report", model=tiny_model)
    assert [s.patient for s in report.slides] == ["good"]
    with open(tmp_path / "report" / "errors.csv", newline="") as handle:
        problems = {Path(r["where"]).name: r["problem"] for r in csv.DictReader(handle)}
    assert "this slide has no pixel size" in problems["no-mpp.tif"] and "give its pixel size (mpp" in problems["no-mpp.tif"]
    assert "not a slide OpenSlide can read" in problems["not-a-slide.ndpi"]
    assert "truncated.svs" in problems  # refused at opening, or while reading its tiles
    overridden, problems = screened([folder / "no-mpp.tif"], model=tiny_model, mpp=2.0)
    assert problems == [] and overridden["no-mpp"].reading["slide_um_per_px"] == 2.0
    assert overridden["no-mpp"].reading["slide_um_per_px_from"] == "given by the user"


def test_geojson_for_qupath_is_in_level_0_pixels_and_covers_the_idc_tiles(synthetic_slide_image, tiny_model, tmp_path):
    image = upscale(synthetic_slide_image, 4)
    write_pyramid_tiff(tmp_path / "slide.tif", image, 1.0, compression="zlib")
    report = screen_to(tmp_path / "slide.tif", tmp_path / "report", model=tiny_model)
    folder = tmp_path / "report" / "slides" / "slide"
    regions = json.loads((folder / "regions.geojson").read_text())
    tiles = json.loads((folder / "tiles.geojson").read_text())
    height, width = image.shape[:2]
    detections = tiles["features"]
    assert len(detections) == report.slides[0].patches
    for feature in regions["features"] + detections:
        for ring in feature["geometry"]["coordinates"]:
            points = np.array(ring)
            assert ring[0] == ring[-1] and (points >= 0).all()
            assert (points[:, 0] <= width).all() and (points[:, 1] <= height).all()
    assert {f["properties"]["objectType"] for f in regions["features"]} <= {"annotation"}
    assert all(f["properties"]["classification"]["name"] == "IDC" for f in regions["features"])
    assert {f["properties"]["objectType"] for f in detections} == {"detection"}
    polygons = [f["geometry"]["coordinates"] for f in regions["features"]]
    idc_tiles = 0
    for tile in detections:
        ring = np.array(tile["geometry"]["coordinates"][0])
        centre = ring[:4].mean(axis=0)
        called = tile["properties"]["classification"]["name"] == "IDC"
        idc_tiles += called
        assert 0 <= tile["properties"]["measurements"]["IDC probability"] <= 1
        assert sum(point_in_polygon(*centre, rings) for rings in polygons) == int(called)
        assert ring[1][0] - ring[0][0] == pytest.approx(min(200, width - ring[0][0]))  # 50 model px at 4 µm = 200 level-0 px at 1 µm
    assert idc_tiles == report.slides[0].idc_patches > 0
    with open(folder / "patches.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    corners = [tile["geometry"]["coordinates"][0][0] for tile in detections]
    assert [[float(r["x_level0"]), float(r["y_level0"])] for r in rows] == corners  # the GeoJSON's frame, row for row
    assert all(float(r["x_level0"]) == (int(r["x"]) - 1) * 4 for r in rows)  # 4 µm/px grid over a 1 µm/px level 0
    page = (tmp_path / "report" / "slides" / "slide.html").read_text()
    assert re.search(r"x=\d+, y=\d+ \(level 0: \d+, \d+ px\)", page)


def test_predict_reads_slide_files_too(synthetic_slide_image, tiny_model, tmp_path):
    from conftest import predict_to_csv

    write_pyramid_tiff(tmp_path / "slide.tif", upscale(synthetic_slide_image, 2), 2.0, compression="zlib")
    predictions = predict_to_csv([tmp_path / "slide.tif"], tmp_path / "preds.csv", model=tiny_model)
    rows = predictions.rows
    assert len(rows) > 100 and set(rows["patient"]) == {"slide"} and predictions.settings["context"] is True
    assert rows["path"].str.startswith(str(tmp_path / "slide.tif") + "#x").all()
    assert ((rows["x"] - 1) % 50 == 0).all() and predictions.problems == []


def test_a_slide_given_twice_in_a_batch_is_screened_once_and_the_second_reported(synthetic_slide_image, tiny_model, tmp_path):
    synthesize(tmp_path / "patches", patients=1, seed=5, first_index=40, idc_fractions=[0.4])
    [patient] = [p.name for p in (tmp_path / "patches").iterdir() if p.is_dir()]
    slide_file = write_pyramid_tiff(tmp_path / f"{patient}.tif", upscale(synthetic_slide_image, 2), 2.0, compression="zlib")
    report = screen_to([tmp_path / "patches", slide_file], tmp_path / "report", model=tiny_model)
    assert [s.patient for s in report.slides] == [patient]
    with open(tmp_path / "report" / "errors.csv", newline="") as handle:
        [problem] = [r for r in csv.DictReader(handle) if "is also given by" in r["problem"]]
    inputs = {str(tmp_path / "patches"), str(slide_file)}
    [other] = inputs - {problem["where"]}
    assert problem["where"] in inputs and f"slide {patient} is also given by {other};" in problem["problem"]
    screened_from_file = bool(json.loads((tmp_path / "report" / "slides.json").read_text())["whole_slide_reading"])
    assert screened_from_file == (problem["where"] != str(slide_file))


def aperio_description(mpp: str | None, app_mag: int = 10) -> str:
    """level 0's ImageDescription as an Aperio scanner writes it (MPP left out with None)."""
    fields = f"|AppMag = {app_mag}" + (f"|MPP = {mpp}" if mpp is not None else "")
    return f"Aperio Image Library v12.0.15\r\n2000x2000 [0,0 2000x2000] (256x256) JPEG/RGB Q=70{fields}"


def test_pixel_size_from_aperio_metadata_or_estimated_from_the_objective_and_refused_when_not_square(
    synthetic_slide_image, tiny_model, tmp_path
):
    folder = tmp_path / "slides"
    folder.mkdir()
    image = upscale(synthetic_slide_image, 2)  # 2 µm/px
    write_pyramid_tiff(folder / "measured.svs", image, 2.0, compression="zlib", with_resolution=False,
                       description=aperio_description("2.0", app_mag=20))  # MPP wins over the objective's 0.5
    write_pyramid_tiff(folder / "objective-only.svs", image, 2.0, compression="zlib", with_resolution=False,
                       description=aperio_description(None, app_mag=5))  # 10 µm / 5x = 2 µm/px
    write_pyramid_tiff(folder / "tall-pixels.tif", image, 2.0, mpp_y=2.4, compression="zlib")
    write_pyramid_tiff(folder / "nearly-square.tif", image, 2.0, mpp_y=2.04, compression="zlib")
    results, problems = screened(sorted(folder.iterdir()), model=tiny_model)
    assert sorted(results) == ["measured", "nearly-square", "objective-only"]
    readings = {name: result.reading for name, result in results.items()}
    assert readings["measured"]["slide_um_per_px"] == pytest.approx(2.0) and not readings["measured"]["slide_um_per_px_estimated"]
    assert "mpp-x" in readings["measured"]["slide_um_per_px_from"]
    assert readings["objective-only"]["slide_um_per_px"] == pytest.approx(2.0) and readings["objective-only"]["slide_um_per_px_estimated"]
    assert "ESTIMATED from the objective power" in readings["objective-only"]["slide_um_per_px_from"]
    assert readings["nearly-square"]["slide_um_per_px"] == pytest.approx((2.0 * 2.04) ** 0.5, rel=1e-4)
    assert calls_by_place(results["objective-only"]) == calls_by_place(results["measured"])
    [problem] = problems
    assert Path(problem.where).name == "tall-pixels.tif"
    assert "pixels are not square (openslide.mpp-x and mpp-y give 2 x 2.4 µm)" in problem.reason, problem.reason

    screen_to(folder / "objective-only.svs", tmp_path / "report", model=tiny_model)
    page = (tmp_path / "report" / "slides" / "objective-only.html").read_text()
    assert '<strong class="warning">ESTIMATED from the objective power (openslide.objective-power = 5x' in page


def test_one_slide_with_bad_metadata_is_one_line_and_the_rest_are_screened(synthetic_slide_image, tiny_model, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    image = upscale(synthetic_slide_image, 2)
    write_pyramid_tiff(folder / "good.tif", image, 2.0, compression="zlib")
    for name, mpp in (("mpp-zero", "0"), ("mpp-inf", "inf"), ("mpp-nan", "nan")):
        write_pyramid_tiff(folder / f"{name}.svs", image, 2.0, compression="zlib", with_resolution=False, description=aperio_description(mpp))
    write_pyramid_tiff(folder / "absurd-resolution.tif", image, 1e9, compression="zlib")  # a tag claiming 1 km a pixel
    write_pyramid_tiff(folder / "too-coarse.tif", image, 20.0, compression="zlib")
    write_claimed_tiff(folder / "huge-header.tif", 17_000, 4.0)  # 68 x 68 mm: no glass slide is that large
    report = screen_to(folder, tmp_path / "report", model=tiny_model)
    assert [s.patient for s in report.slides] == ["good"]
    with open(tmp_path / "report" / "errors.csv", newline="") as handle:
        problems = {Path(r["where"]).name: r["problem"] for r in csv.DictReader(handle)}
    assert set(problems) == {"mpp-zero.svs", "mpp-inf.svs", "mpp-nan.svs", "absurd-resolution.tif", "too-coarse.tif", "huge-header.tif"}
    for name in ("mpp-zero.svs", "mpp-inf.svs", "mpp-nan.svs"):
        assert "not a positive pixel size" in problems[name] or "outside 0.05-50" in problems[name], problems[name]
    assert "outside 0.05-50 µm/px" in problems["absurd-resolution.tif"]
    assert "coarser than the model can read" in problems["too-coarse.tif"]
    assert "17,000 x 17,000 px at 4 µm/px would be 68 x 68 mm" in problems["huge-header.tif"]
    slides_json = (tmp_path / "report" / "slides.json").read_text()
    json.loads(slides_json, parse_constant=lambda name: pytest.fail(f"slides.json holds {name}"))


@pytest.mark.parametrize("flag, value", [("--mpp", "inf"), ("--mpp", "1e6"), ("--slide-mpp", "nan"), ("--um-per-px", "inf")])
def test_pixel_size_options_that_no_scanner_gives_are_refused(capsys, synthetic_slide_image, tiny_model, tmp_path, flag, value):
    from histoscreen.cli import main

    write_pyramid_tiff(tmp_path / "slide.tif", upscale(synthetic_slide_image, 2), 2.0, compression="zlib")
    code = main(["screen", "-q", str(tmp_path / "slide.tif"), "--model", str(tiny_model), "--out", str(tmp_path / "r"), flag, value])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured
    [line] = captured.err.strip().splitlines()
    assert "--mpp " in line and "must be a pixel size from 0.05 to 50 µm/px" in line, line  # the old names are aliases of --mpp
    assert not (tmp_path / "r").exists()


def test_a_slide_without_a_pyramid_is_read_in_bands_of_bounded_size_with_the_same_pixels(synthetic_slide_image, tmp_path, monkeypatch):
    from histoscreen.data import wsi

    slide = write_pyramid_tiff(tmp_path / "flat.tif", upscale(synthetic_slide_image, 4), 1.0, levels=1, compression="zlib")
    whole = wsi.WholeSlideSource(slide, spacing_um_px=4.0, workers=1)
    before = np.concatenate([b.pixels for b in whole.batches()])
    whole_bands = len(whole._bands())
    tile_px = (50 * whole.level0_per_grid_px / whole.level_downsample) ** 2  # 200 x 200 level-0 px a tile here
    monkeypatch.setattr(wsi, "MAX_BAND_PX", int(3.5 * tile_px))  # as a 0.25 µm/px slide meets the real bound
    narrow = wsi.WholeSlideSource(slide, spacing_um_px=4.0, workers=1)
    bands = narrow._bands()
    assert len(bands) > whole_bands
    for rows, columns in bands:
        assert (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1) * tile_px <= wsi.MAX_BAND_PX
    assert sum(len(rows) for rows, _ in bands) == len(whole)
    after = np.concatenate([b.pixels for b in narrow.batches()])
    np.testing.assert_array_equal(before, after)


def test_min_tissue_decides_which_edge_tiles_are_kept(synthetic_slide_image, tmp_path):
    from histoscreen.data.wsi import TissueSettings, WholeSlideSource

    image = upscale(synthetic_slide_image, 2)
    # tissue up to a quarter of the way into the last column of tiles: 25 of its 100 px
    cut = (image.shape[1] // 100) * 100 - 75
    image[:, cut:] = 255
    slide = write_pyramid_tiff(tmp_path / "edge.tif", image, 2.0, compression="zlib")
    counts = [len(WholeSlideSource(slide, spacing_um_px=4.0, tissue=TissueSettings(min_tissue=share), workers=1))
              for share in (0.1, 0.5, 0.9)]
    assert counts[0] > counts[1] >= counts[2] > 0, counts



def test_tiles_that_reach_past_the_slide_edge_are_glass_there(synthetic_slide_image, tmp_path):
    """OpenSlide gives transparent pixels beyond a slide's edge: a tile that overhangs it is
    background (as an edge patch of the Kaggle set is padded), not black."""
    from histoscreen.data.wsi import TissueSettings, WholeSlideSource

    image = upscale(synthetic_slide_image, 2)
    image = np.ascontiguousarray(image[:, : (image.shape[1] // 100) * 100 - 60])  # the last tiles overhang by 60 px (30 at 4 µm)
    image[:, -200:] = [200, 120, 180]  # tissue up to the edge
    slide = write_pyramid_tiff(tmp_path / "overhang.tif", image, 2.0, compression="zlib")
    source = WholeSlideSource(slide, spacing_um_px=4.0, tissue=TissueSettings(min_tissue=0.1), workers=1)
    pixels = np.concatenate([b.pixels for b in source.batches()])
    last = source.tile_columns == source.tile_columns.max()
    assert last.sum() > 10 and source.tile_columns.max() == source.columns - 1
    assert (pixels[last][:, :, 20:] == 255).all()  # beyond the edge: glass
    assert (pixels[last][:, :, :18] != 255).any(axis=-1).mean() > 0.9  # the slide's own part: tissue

def test_a_lone_slide_that_cannot_be_read_says_why(capsys, synthetic_slide_image, tiny_model, tmp_path):
    from histoscreen.cli import main

    write_pyramid_tiff(tmp_path / "no-mpp.tif", upscale(synthetic_slide_image, 2), 2.0, compression="zlib", with_resolution=False)
    code = main(["screen", "-q", str(tmp_path / "no-mpp.tif"), "--model", str(tiny_model), "--out", str(tmp_path / "r")])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no-mpp.tif: this slide has no pixel size" in line and "no patch files named" not in line, line
    assert line.endswith("pass --mpp (µm per level-0 pixel)"), line


def test_the_web_app_takes_the_pixel_size_as_a_form_field_and_refuses_fields_it_does_not_read(synthetic_slide_image, tiny_model, tmp_path):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    from fastapi.testclient import TestClient

    from histoscreen.serving.app import ServeSettings, create_app

    image = upscale(synthetic_slide_image, 2)
    slide = write_pyramid_tiff(tmp_path / "no-mpp.tif", image, 2.0, compression="zlib", with_resolution=False)
    data = tmp_path / "data"
    with TestClient(create_app(ServeSettings(data=data, model=str(tiny_model))), base_url="http://127.0.0.1:8000") as client:
        def submit(**fields):
            return client.post("/api/jobs", files={"file": ("no-mpp.tif", slide.read_bytes(), "image/tiff")}, data=fields)

        for fields, words in (({"slide_mpp": "2"}, "unknown form field 'slide_mpp'"), ({"mpp": "inf"}, "mpp must be a pixel size"),
                              ({"mpp": "0.001"}, "mpp must be a pixel size from 0.05 to 50")):
            answer = submit(**fields)
            assert answer.status_code == 422 and words in answer.text, (fields, answer.text)
        assert client.get("/api/jobs").json() == []
        without, given = submit().json()["id"], submit(mpp="2.0").json()["id"]
        jobs = {job_id: wait_done(client, job_id) for job_id in (without, given)}
        viewer_shows_level_0_with_the_heatmap_over_the_geojson_pixels(client, given, image)
    assert jobs[without]["status"] == "failed" and "this slide has no pixel size" in jobs[without]["error"]
    assert "give its pixel size (mpp, µm per level-0 pixel)" in jobs[without]["error"] and str(data) not in jobs[without]["error"]
    assert jobs[given]["status"] == "done", jobs[given]
    [reading] = json.loads((data / "jobs" / given / "report" / "slides.json").read_text())["whole_slide_reading"].values()
    assert reading["slide_um_per_px"] == 2.0 and reading["slide_um_per_px_from"] == "given by the user"


def viewer_shows_level_0_with_the_heatmap_over_the_geojson_pixels(client, job_id: str, image: np.ndarray) -> None:
    """The viewer's deepest zoom is the slide's own level 0, and an IDC cell of the heatmap
    overlay lies on the same level-0 pixels as its square in tiles.geojson."""
    base = f"/api/jobs/{job_id}/slides/no-mpp"
    view = client.get(f"{base}/view").json()
    height, width = image.shape[:2]
    assert view["base"]["source"] == "slide" and view["base"]["size"] == [width, height]
    cell, (offset_x, offset_y) = view["base"]["cell_px"], view["base"]["offset"]
    assert cell == 100  # 50 model px at 4 µm/px over a 2 µm/px level 0
    tiles = client.get(f"{base}/tiles.geojson").json()["features"]
    idc = [t for t in tiles if t["properties"]["classification"]["name"] == "IDC"]
    patches = {(p["x_level0"], p["y_level0"]): p for p in client.get(f"{base}/patches").json()}
    assert idc and len(patches) == len(tiles)
    for tile in idc:
        left, top = tile["geometry"]["coordinates"][0][0]
        patch = patches[(left, top)]
        column, row = (patch["x"] - 1 - view["origin"][0]) // 50, (patch["y"] - 1 - view["origin"][1]) // 50
        assert (offset_x + column * cell, offset_y + row * cell) == (left, top)  # where the overlay draws this cell
    descriptor = client.get(f"{base}/mosaic.dzi").text
    assert f'Width="{width}"' in descriptor and f'Height="{height}"' in descriptor
    deepest = max(int(level) for level in range(40) if client.get(f"{base}/mosaic_files/{level}/0_0.jpeg").status_code == 200)
    left, top = idc[len(idc) // 2]["geometry"]["coordinates"][0][0]
    x, y = int(left + cell // 2), int(top + cell // 2)
    column, row = x // 254, y // 254
    answer = client.get(f"{base}/mosaic_files/{deepest}/{column}_{row}.jpeg")
    assert answer.status_code == 200
    tile = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB")).astype(int)
    x0, y0 = column * 254 - (1 if column else 0), row * 254 - (1 if row else 0)  # 1 px of overlap on inner edges
    served = tile[y - y0 - 4 : y - y0 + 4, x - x0 - 4 : x - x0 + 4]
    assert np.abs(served - image[y - 4 : y + 4, x - 4 : x + 4].astype(int)).mean() < 12  # level-0 pixels, JPEG-compressed



def test_qupath_annotations_label_the_tiles_they_cover_and_bad_ones_are_one_line(tiny_model, tmp_path):
    """A GeoJSON as QuPath exports it (a list of Features, MultiPolygons in level-0 pixels, classes
    IDC and Stroma) labels a whole-slide image's tiles: the screen's truth is the drawn truth."""
    synthesize(tmp_path / "patches", patients=1, seed=6, first_index=41, idc_fractions=[0.4])
    [source] = open_sources([tmp_path / "patches"])
    patches = source.read_all()
    image = upscale(stitch(patches), 4)  # 1 µm/px: a 50-px patch is 200 level-0 px
    write_pyramid_tiff(tmp_path / "slide.tif", image, 1.0, compression="zlib")

    def squares(rows):
        return [[[[(x - 1) * 4, (y - 1) * 4], [(x + 49) * 4, (y - 1) * 4], [(x + 49) * 4, (y + 49) * 4], [(x - 1) * 4, (y + 49) * 4],
                   [(x - 1) * 4, (y - 1) * 4]]] for x, y in rows]

    cells = list(zip(patches.xs.tolist(), patches.ys.tolist()))
    truth = dict(zip(cells, patches.labels.tolist()))
    features = [{"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": squares([c for c in cells if truth[c] == label])},
                 "properties": {"objectType": "annotation", "classification": {"name": name}}}
                for label, name in ((1, "IDC"), (0, "Stroma"))]
    features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]}, "properties": {}})  # ignored
    (tmp_path / "slide.geojson").write_text(json.dumps(features))
    [result] = Screening([str(tmp_path / "slide.tif")], model=tiny_model, labels=[tmp_path / "slide.geojson"])
    screened = {(int(x), int(y)): int(label) for x, y, label in zip(result.slide.xs, result.slide.ys, result.slide.labels)}
    assert len(screened) > 100 and screened == {cell: truth[cell] for cell in screened}  # every screened tile, its drawn class
    half = sorted(screened)[::2]  # a CSV naming every other tile: those take its labels, the rest none
    (tmp_path / "labels.csv").write_text("patient,x,y,label\n" + "".join(f"slide,{x},{y},{truth[(x, y)]}\n" for x, y in half))
    [from_csv] = Screening([str(tmp_path / "slide.tif")], model=tiny_model, labels=tmp_path / "labels.csv")
    listed = {(int(x), int(y)): int(label) for x, y, label in zip(from_csv.slide.xs, from_csv.slide.ys, from_csv.slide.labels)}
    assert listed == {cell: truth[cell] if cell in set(half) else -1 for cell in screened}

    from histoscreen.data.annotations import Annotation, label_cells

    three_quarters = Annotation(1, [[np.array([[0, 0], [150, 0], [150, 200], [0, 200]], dtype=float)]])  # 75% of cell (1, 1)
    one_quarter = Annotation(1, [[np.array([[200, 0], [250, 0], [250, 200], [200, 200]], dtype=float)]])  # 25% of cell (51, 1)
    labels = label_cells([three_quarters, one_quarter], np.array([1, 51]), np.array([1, 1]), level0_per_grid_px=4.0,
                         level0_size=(400, 200), where="test")
    assert labels.tolist() == [1, -1]

    elsewhere = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[9e6, 9e6], [9e6 + 10, 9e6], [9e6, 9e6 + 10]]]},
                  "properties": {"classification": {"name": "IDC"}}}]
    for name, content, words in (("slide.geojson", json.dumps(elsewhere), "annotation 1 lies outside the slide"),
                                 ("slide.geojson", "{not json", "is not valid JSON"),
                                 ("other.geojson", json.dumps(features), "no slide 'other' among the inputs")):
        (tmp_path / name).write_text(content)
        with pytest.raises(InputError, match=words):
            Screening([str(tmp_path / "slide.tif")], model=tiny_model, labels=[tmp_path / name])


def test_calibrate_on_a_labs_slides_and_folders_with_their_annotations(tiny_model, tmp_path):
    """`calibrate INPUT... --split-scheme all --labels SLIDE.geojson`: a whole-slide image labelled
    by its annotations and patch folders labelled by their names calibrate together."""
    from histoscreen.cli import main
    from histoscreen.models import load_model

    synthesize(tmp_path / "lab", patients=5, seed=7, first_index=80, idc_fractions=[0.4, 0.3, 0.2, 0.3, 0.5])
    first = tmp_path / "lab" / "900080"
    [source] = open_sources([first])
    patches = source.read_all()
    write_pyramid_tiff(tmp_path / "slide-a.tif", upscale(stitch(patches), 4), 1.0, compression="zlib")
    idc = [[[[(x - 1) * 4, (y - 1) * 4], [(x + 49) * 4, (y - 1) * 4], [(x + 49) * 4, (y + 49) * 4], [(x - 1) * 4, (y + 49) * 4]]]
           for x, y, label in zip(patches.xs.tolist(), patches.ys.tolist(), patches.labels.tolist()) if label == 1]
    (tmp_path / "slide-a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": idc}, "properties": {"classification": {"name": "IDC"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [99999, 0], [99999, 99999], [0, 99999]], idc[0][0]]},
         "properties": {"classification": {"name": "Stroma"}}},  # everything else, one IDC square cut out as a hole
    ]}))
    import shutil

    shutil.rmtree(first)  # that patient is now the slide file
    code = main(["calibrate", "-q", str(tmp_path / "lab"), str(tmp_path / "slide-a.tif"), "--labels", str(tmp_path / "slide-a.geojson"),
                 "--model", str(tiny_model), "--split-scheme", "all", "--out", str(tmp_path / "lab-model")])
    assert code == 0
    _, metadata = load_model(tmp_path / "lab-model")
    assert set(metadata.validation.patients) == {"slide-a", "900081", "900082", "900083", "900084"}
    assert metadata.validation.estimate["patients"] == 5 and metadata.validation.store is None
    labelled = metadata.validation.metrics["plain"]["patches"]
    assert labelled > 4 * 100


def test_screening_a_slide_file_imports_neither_pandas_nor_torch(synthetic_slide_image, tiny_model, tmp_path):
    """A lab screens slide files in batches: each run should not pay pandas' (about half a
    second here) or torch's start-up for tables and training it does not use."""
    import os
    import subprocess
    import sys

    slide = write_pyramid_tiff(tmp_path / "slide.tif", upscale(synthetic_slide_image, 2), 2.0, compression="zlib")

    def run(out: str) -> subprocess.CompletedProcess:
        probe = ("import sys\nfrom histoscreen.cli import main\n"
                 f"code = main(['screen', {str(slide)!r}, '--out', {str(tmp_path / out)!r}, '--model', {str(tiny_model)!r}, '-q'])\n"
                 "print(code, 'pandas' in sys.modules, 'torch' in sys.modules)\n")
        env = {**os.environ, "HISTOSCREEN_CACHE": str(tmp_path / "cache")}
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)

    warm = run("warm")  # a cold ONNX cache exports the graph, with torch
    assert warm.returncode == 0, warm.stderr
    screened = run("report")
    assert screened.stdout.split() == ["0", "False", "False"], screened
    assert json.loads((tmp_path / "report" / "slides.json").read_text())["slides"][0]["patches"] > 100


def test_histoscreens_own_regions_edited_as_in_qupath_come_back_as_the_labels_drawn(synthetic_slide_image, tiny_model, tmp_path):
    """The round trip a reviewer makes: screen, open regions.geojson in QuPath, delete a region
    that is not IDC and draw one that is stroma, export, and use the file as labels."""
    slide = write_pyramid_tiff(tmp_path / "slide.tif", upscale(synthetic_slide_image, 2), 2.0, compression="zlib")
    screen_to(slide, tmp_path / "report", model=tiny_model)
    folder = tmp_path / "report" / "slides" / "slide"
    regions = json.loads((folder / "regions.geojson").read_text())
    assert len(regions["features"]) >= 2
    with open(folder / "patches.csv", newline="") as handle:
        tiles = [(int(r["x"]), int(r["y"]), float(r["x_level0"]), float(r["y_level0"])) for r in csv.DictReader(handle)]
    removed = regions["features"].pop(0)
    x0, y0 = tiles[len(tiles) // 2][2:]  # a square of 3 x 3 tiles (100 level-0 px each here), classed stroma
    square = [[x0, y0], [x0 + 300, y0], [x0 + 300, y0 + 300], [x0, y0 + 300], [x0, y0]]
    regions["features"].append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
                                "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "color": [0, 150, 0]}}})
    (tmp_path / "slide.geojson").write_text(json.dumps(regions))

    def inside(feature, x, y) -> bool:
        geometry = feature["geometry"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        return any(point_in_polygon(x, y, rings) for rings in polygons)

    expected = {}
    for x, y, left, top in tiles:  # each tile by its centre: the regions follow tile edges
        centre = (left + 50, top + 50)
        idc = any(inside(f, *centre) for f in regions["features"] if f["properties"]["classification"]["name"] == "IDC")
        expected[(x, y)] = 1 if idc else 0 if inside(regions["features"][-1], *centre) else -1
    assert list(expected.values()).count(0) >= 3 and not any(inside(removed, left + 50, top + 50) and expected[(x, y)] != -1
                                                             for x, y, left, top in tiles)
    [result] = Screening([str(slide)], model=tiny_model, labels=[tmp_path / "slide.geojson"])
    assert dict(zip(zip(result.slide.xs.tolist(), result.slide.ys.tolist()), result.slide.labels.tolist())) == expected


@pytest.mark.parametrize("name, features, words", [
    ("huge coordinates", [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1e12, 0], [0, 100], [0, 0]]]},
                           "properties": {"classification": {"name": "IDC"}}}], "beyond any slide"),
    ("a million vertices", None, "more than 250,000 polygon points"),
    ("wrong types", [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": "everywhere"},
                      "properties": {"classification": {"name": "IDC"}}}], "a polygon needs a list of rings"),
    ("a geometry that is not one", [{"type": "Feature", "geometry": [1, 2], "properties": {}}], "not a Feature with a geometry"),
    ("not JSON", "{'type': 'FeatureCollection'", "is not valid JSON"),
])
def test_hostile_annotations_are_one_line_and_nothing_is_written(capsys, synthetic_slide_image, tiny_model, tmp_path, name, features, words):
    from histoscreen.cli import main

    slide = write_pyramid_tiff(tmp_path / "slide.tif", upscale(synthetic_slide_image, 2), 2.0, compression="zlib")
    if features is None:
        ring = np.stack([np.cos(np.linspace(0, 2 * np.pi, 1_000_000)) * 500 + 600, np.sin(np.linspace(0, 2 * np.pi, 1_000_000)) * 500 + 600], 1)
        features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring.round(1).tolist()]},
                     "properties": {"classification": {"name": "IDC"}}}]
    (tmp_path / "slide.geojson").write_text(features if isinstance(features, str) else json.dumps(features))
    code = main(["screen", str(slide), "--labels", str(tmp_path / "slide.geojson"), "--out", str(tmp_path / "report"),
                 "--model", str(tiny_model), "-q"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(errors) == 1 and words in errors[0] and "slide.geojson" in errors[0], errors
    assert not (tmp_path / "report").exists()


def test_reader_threads_give_one_readers_tiles_in_order_and_stop_with_the_caller(synthetic_slide_image, tmp_path, monkeypatch):
    import threading

    import openslide

    from histoscreen.data.wsi import WholeSlideSource

    def readers() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("slide-reader")]

    readers_at_close = []
    close = openslide.OpenSlide.close
    monkeypatch.setattr(openslide.OpenSlide, "close", lambda self: (readers_at_close.append(readers()), close(self))[1])

    slide = write_pyramid_tiff(tmp_path / "slide.tif", upscale(synthetic_slide_image, 2), 2.0, compression="zlib")
    one = WholeSlideSource(slide, spacing_um_px=4.0, workers=1, band_tiles=8)
    assert len(one._bands()) > 6  # enough bands for the readers to run ahead and out of order
    expected = list(one.batches(batch_size=16))
    threaded = list(WholeSlideSource(slide, spacing_um_px=4.0, workers=3, band_tiles=8).batches(batch_size=16))
    assert len(threaded) == len(expected)
    for got, want in zip(threaded, expected):
        np.testing.assert_array_equal(got.xs, want.xs)
        np.testing.assert_array_equal(got.ys, want.ys)
        np.testing.assert_array_equal(got.pixels, want.pixels)
    # a caller that stops after one batch: the readers are gone when the generator is closed
    batches = WholeSlideSource(slide, spacing_um_px=4.0, workers=3, band_tiles=8).batches(batch_size=16)
    next(batches)
    batches.close()
    assert not readers()
    assert readers_at_close and not any(readers_at_close), readers_at_close  # no read may run on a closed slide


def test_explained_patches_are_cut_from_the_slides_picture_not_read_again(synthetic_slide_image, synthetic_archive, tiny_model,
                                                                         tmp_path, monkeypatch):
    """A tile is read once: the patches to explain come from the picture painted while the
    slide streamed past, and they are the pixels the source would give again."""
    from histoscreen.data.sources import FileSource
    from histoscreen.data.wsi import WholeSlideSource

    slide = write_pyramid_tiff(tmp_path / "slide.tif", upscale(synthetic_slide_image, 2), 2.0, compression="zlib")
    screening = Screening([slide, synthetic_archive], model=tiny_model)
    again = []
    for kind in (WholeSlideSource, FileSource):
        read_cells = kind.read_cells
        monkeypatch.setattr(kind, "read_cells", lambda self, *args, read_cells=read_cells: (again.append(len(args[1])), read_cells(self, *args))[1])
    results = list(screening.results())
    short = sum(int(((r.slide.heights[rows] < 50) | (r.slide.widths[rows] < 50)).sum())
                for r in results for rows in [[e.row for e in r.explanations]])
    assert len(results) == 4 and sum(again) == short, (again, short)  # only short edge patches are read again
    assert short > 0 and sum(len(r.explanations) for r in results) > 4 * short  # both paths taken
    sources = {slide_id: source for source in screening.sources for slide_id in source.slide_ids()}
    for result in results:
        rows = [e.row for e in result.explanations]
        assert rows
        expected = sources[result.patient].read_cells(result.patient, result.slide.xs[rows], result.slide.ys[rows])
        np.testing.assert_array_equal(np.stack([e.pixels for e in result.explanations]), expected)
