"""Every command against bad and hostile input: a non-zero exit with one line, or the bad
file listed as a reject while the rest goes on; never a traceback, never a changed input,
never a file written outside the output."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from histoscreen.cli import main
from histoscreen.data import synthesize

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def snapshot(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file below `paths` (keyed by path)."""
    hashes = {}
    for root in paths:
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def run(capsys, *args: str) -> tuple[int, list[str], str]:
    """The command in this process, quiet: (exit code, stderr lines, stdout)."""
    code = main([args[0], "-q", *args[1:]])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def refused(capsys, words: str, *args: str) -> str:
    code, errors, out = run(capsys, *args)
    assert code != 0 and len(errors) == 1 and out == "", (code, errors)
    assert words in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def slides(tmp_path) -> Path:
    synthesize(tmp_path / "slides", patients=2, seed=3)
    return tmp_path / "slides"


@pytest.fixture
def store(slides, tmp_path) -> Path:
    assert main(["prepare", "-q", str(slides), str(tmp_path / "store")]) == 0
    return tmp_path / "store"


def png(width: int, height: int, claimed: tuple[int, int] | None = None) -> bytes:
    """A valid RGB PNG, or one whose header claims another size (a decompression bomb's trick)."""
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (width, height), (180, 90, 160)).save(buffer, format="PNG")
    data = buffer.getvalue()
    if claimed is None:
        return data
    body = struct.pack(">IIBBBBB", *claimed, 8, 2, 0, 0, 0)
    return data[:8] + struct.pack(">I", 13) + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) + data[33:]


# ---- data loss ---------------------------------------------------------------------------


def test_an_output_that_is_contains_or_sits_inside_an_input_is_refused_whatever_the_flags(capsys, slides, store, tmp_path):
    patient = next(p for p in slides.iterdir() if p.is_dir())
    one_patch = next(patient.rglob("*.png"))
    before = snapshot(slides, store)
    refused(capsys, "is also an input", "screen", str(patient), "--out", str(patient), "--overwrite")
    refused(capsys, "contains the input", "screen", str(slides), "--out", str(tmp_path), "--overwrite")
    refused(capsys, "lies inside the input", "screen", str(slides), "--out", str(slides / "report"), "--overwrite")
    refused(capsys, "is also an input", "prepare", str(slides), str(slides), "--overwrite")
    refused(capsys, "is also an input", "evaluate", str(store), "--out", str(store), "--overwrite")
    refused(capsys, "is also an input", "predict", str(one_patch), "--out", str(one_patch), "--overwrite")
    refused(capsys, "lies inside the input", "predict", str(slides), "--out", str(slides / "preds.csv"))
    assert snapshot(slides, store) == before
    assert not (slides / "report").exists() and not (slides / "preds.csv").exists()


def test_overwrite_only_replaces_what_histoscreen_wrote(capsys, slides, tmp_path):
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "thesis.docx").write_text("years of work")
    refused(capsys, "was not written by histoscreen", "prepare", str(slides), str(mine), "--overwrite")
    refused(capsys, "was not written by histoscreen", "screen", str(slides), "--out", str(mine), "--overwrite")
    assert (mine / "thesis.docx").read_text() == "years of work"
    # histoscreen's own output is replaced when asked
    assert main(["prepare", "-q", str(slides), str(tmp_path / "store")]) == 0
    refused(capsys, "already exists; choose another path or pass --overwrite", "prepare", str(slides), str(tmp_path / "store"))
    assert main(["prepare", "-q", str(slides), str(tmp_path / "store"), "--overwrite"]) == 0


def test_existing_files_are_never_replaced_without_asking(capsys, slides, store, tmp_path, tiny_model):
    (tmp_path / "existing.csv").write_text("keep me\n")
    refused(capsys, "already exists", "predict", str(store), "--out", str(tmp_path / "existing.csv"))
    assert (tmp_path / "existing.csv").read_text() == "keep me\n"

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other, ignore=shutil.ignore_patterns("checkpoints"))
    before = snapshot(other, tiny_model)
    refused(capsys, "already exists", "calibrate", str(store), "--model", str(tiny_model), "--out", str(other),
            "--split-scheme", "kfold", "--folds", "2")
    refused(capsys, "is also an input", "calibrate", str(store), "--model", str(tiny_model), "--out", str(tiny_model),
            "--split-scheme", "kfold", "--folds", "2", "--overwrite")
    refused(capsys, "is also an input", "export", "--model", str(tiny_model), "--format", "onnx",
            "--out", str(tiny_model / "model.safetensors"), "--overwrite")
    refused(capsys, "already exists", "export", "--model", str(tiny_model), "--format", "onnx", "--out", str(other / "model.onnx"))
    (other / "model.onnx").unlink(missing_ok=True)
    assert snapshot(other, tiny_model) == before


def test_a_clean_rerun_leaves_no_stale_rejects(capsys, slides, tmp_path):
    bad = slides / "broken_idx5_x1_y1_class0.png"
    bad.write_bytes(b"not a png")
    assert main(["predict", "-q", str(slides), "--out", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.rejects.csv").is_file()
    bad.unlink()
    assert main(["predict", "-q", str(slides), "--out", str(tmp_path / "p.csv"), "--overwrite"]) == 0
    assert not (tmp_path / "p.rejects.csv").exists()


# ---- escaping the output folder ----------------------------------------------------------


def test_a_patient_id_that_is_a_path_is_refused_at_the_store(capsys, store, tmp_path):
    index = pd.read_parquet(store / "index.parquet")
    index["patient"] = index["patient"].where(index["patient"] != index["patient"].iloc[0], "../../ESCAPED")
    index.to_parquet(store / "index.parquet", index=False)
    report = tmp_path / "deep" / "er" / "report"
    refused(capsys, "'../../ESCAPED' is not a safe slide id", "screen", str(store), "--out", str(report))
    assert not list(tmp_path.rglob("ESCAPED*"))


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(capsys, slides, tmp_path):
    hostile = tmp_path / "=HYPERLINK(evil)"
    hostile.mkdir()
    (hostile / "@SUM(1).png").write_bytes(b"")
    (hostile / "+cmd.txt").write_text("x")
    assert main(["prepare", "-q", str(hostile), str(tmp_path / "store")]) == 2  # nothing valid
    assert main(["predict", "-q", str(slides), str(hostile), "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.rejects.csv", newline="") as handle:
        cells = [row["path"] for row in csv.DictReader(handle)]
    assert cells and all(not c.startswith(("=", "+", "-", "@")) for c in cells)
    assert all(c.startswith("'") or c.startswith("/") for c in cells)


# ---- one file must never sink a run ------------------------------------------------------


def test_bad_names_and_bombs_are_rejects_and_the_rest_goes_on(capsys, slides, tmp_path):
    patient = next(p for p in slides.iterdir() if p.is_dir())
    folder = patient / "0"
    bad = {
        f"{patient.name}_idx5_x10000000001_y1_class0.png": "beyond any slide",
        f"{patient.name}_idx5_x0_y1_class0.png": "not on the 50-px grid",
        f"{patient.name}_idx5_x26_y1_class0.png": "not on the 50-px grid",
        f"{patient.name}_idx5_x1001_y1001_class0.png": "does not fit in 50x50",  # a bomb by its header
    }
    for name in bad:
        (folder / name).write_bytes(png(50, 50, claimed=(20000, 20000)) if "x1001" in name else png(50, 50))
    non_utf8 = os.fsencode(str(folder)) + b"/caf\xe9_idx5_x51_y1_class0.png"
    with open(non_utf8, "wb") as handle:
        handle.write(png(50, 50))
    far = folder / f"{patient.name}_idx5_x50001_y50001_class0.png"  # on the grid, far from the rest
    far.write_bytes(png(50, 50))

    code, errors, _ = run(capsys, "prepare", str(slides), str(tmp_path / "store"))
    assert code == 0 and errors == []
    with open(tmp_path / "store" / "rejects.csv", newline="") as handle:
        rejects = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(handle)}
    for name, words in bad.items():
        assert words in rejects[name], (name, rejects.get(name))
    assert "not valid UTF-8" in rejects["caf\\xe9_idx5_x51_y1_class0.png"]

    assert main(["predict", "-q", str(slides), "--out", str(tmp_path / "p.csv"), "--context"]) == 0
    assert main(["screen", "-q", str(slides), "--out", str(tmp_path / "report")]) == 0
    slide = json.loads((tmp_path / "report" / "slides.json").read_text())["slides"]
    assert {s["patient"] for s in slide} == {p.name for p in slides.iterdir() if p.is_dir()}
    with open(tmp_path / "report" / "errors.csv", newline="") as handle:
        problems = {Path(r["where"]).name for r in csv.DictReader(handle)}
    assert set(bad) <= problems
    heatmap = tmp_path / "report" / "slides" / patient.name / "heatmap.png"
    assert heatmap.stat().st_size > 1000  # drawn, at a reduced scale, despite the far patch


def test_the_bomb_warning_is_silent_with_quiet(capsys, tmp_path):
    folder = tmp_path / "in" / "900000" / "0"
    folder.mkdir(parents=True)
    (folder / "900000_idx5_x1_y1_class0.png").write_bytes(png(50, 50))
    (folder / "900000_idx5_x51_y1_class0.png").write_bytes(png(50, 50, claimed=(10000, 10000)))
    code, errors, out = run(capsys, "prepare", str(tmp_path / "in"), str(tmp_path / "store"))
    assert code == 0 and errors == [] and out == ""


def test_silent_omissions_are_reported(capsys, slides, tmp_path):
    linked = tmp_path / "elsewhere"
    shutil.move(str(next(p for p in sorted(slides.iterdir()) if p.is_dir())), linked)
    (slides / linked.name).symlink_to(linked, target_is_directory=True)
    assert main(["prepare", "-q", str(slides), str(tmp_path / "store")]) == 0
    with open(tmp_path / "store" / "rejects.csv", newline="") as handle:
        reasons = [r["reason"] for r in csv.DictReader(handle)]
    assert any("symbolic link to a folder; not followed" in r for r in reasons)


@pytest.mark.skipif(IS_ROOT, reason="root reads folders whatever their permissions, so none is unreadable")
def test_an_unreadable_folder_is_reported(capsys, slides, tmp_path):
    locked = next(p for p in slides.iterdir() if p.is_dir()) / "1"
    locked.chmod(0)
    try:
        assert main(["prepare", "-q", str(slides), str(tmp_path / "store")]) == 0
        with open(tmp_path / "store" / "rejects.csv", newline="") as handle:
            assert any("unreadable folder" in r["reason"] for r in csv.DictReader(handle))
    finally:
        locked.chmod(0o755)


def test_conflicting_copies_are_problems_of_the_screening(capsys, slides, tmp_path):
    patient = next(p for p in sorted(slides.iterdir()) if p.is_dir())
    original = next((patient / "0").glob("*.png"))
    twin = slides / "IDC_regular_ps50_idx5" / patient.name / "1" / original.name.replace("class0", "class1")
    twin.parent.mkdir(parents=True)
    twin.write_bytes(original.read_bytes())
    assert main(["screen", "-q", str(slides), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "errors.csv", newline="") as handle:
        problems = {r["where"]: r["problem"] for r in csv.DictReader(handle)}
    assert "different label" in problems[str(twin)]


def test_one_patient_folder_screens_without_false_problems(capsys, slides, tmp_path):
    patient = next(p for p in slides.iterdir() if p.is_dir())
    code, errors, _ = run(capsys, "screen", str(patient), "--out", str(tmp_path / "report"))
    assert code == 0 and errors == []
    assert (tmp_path / "report" / "errors.csv").read_text().strip() == "where,problem"


# ---- models are validated, failures are one line ------------------------------------------


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m["scoring"]["plain"].update(temperature=-1), "temperature must lie between"),
        (lambda m: m["scoring"]["plain"].update(threshold=float("nan")), "threshold must be a finite number"),
        (lambda m: m["normalisation"].update(std=[0, 0, 0]), "positive standard deviations"),
        (lambda m: m["scoring"]["plain"].update(threshold="high"), "threshold must be a finite number"),
        (lambda m: m["scoring"]["plain"].update(bias=1e308), "bias must lie within"),
        (lambda m: m["scoring"]["plain"].update(temperature=1e-320), "temperature must lie between"),
        (lambda m: m["scoring"]["context"].update(linear=[1e308] * 19), "linear weight must lie within"),
        (lambda m: m.update(class_names="ab"), "class_names must be two names"),
    ],
)
def test_a_broken_model_is_one_line(capsys, store, tmp_path, tiny_model, edit, words):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("checkpoints"))
    metadata = json.loads((model / "model.json").read_text())
    edit(metadata)
    (model / "model.json").write_text(json.dumps(metadata))
    refused(capsys, words, "predict", str(store), "--model", str(model), "--out", str(tmp_path / "p.csv"))
    assert not (tmp_path / "p.csv").exists()


def test_bad_options_and_damaged_files_are_one_line(capsys, slides, store, tmp_path):
    out = str(tmp_path / "p.csv")
    refused(capsys, "--batch-size must be at least 1", "predict", str(store), "--out", out, "--batch-size", "0")
    refused(capsys, "--workers must be at least 1", "predict", str(slides), "--out", out, "--workers", "-1")
    refused(capsys, "--arch-kwargs is not valid JSON", "train", str(store), "--out", str(tmp_path / "m"), "--arch-kwargs", "{nope")
    refused(capsys, "--bootstrap must be at least 1", "evaluate", str(store), "--out", str(tmp_path / "e"), "--bootstrap", "0")
    (tmp_path / "a-folder").mkdir()
    refused(capsys, "is a folder", "predict", str(store), "--out", str(tmp_path / "a-folder"))
    (tmp_path / "a-file").write_text("x")
    refused(capsys, "a-file: ", "screen", str(slides), "--out", str(tmp_path / "a-file" / "report"))  # the OS says why
    (tmp_path / "labels.csv").write_bytes(b"patient,x,y,label\n\xff\xfe,1,1,1\n")
    refused(capsys, "not UTF-8", "screen", str(slides), "--out", str(tmp_path / "r"), "--labels", str(tmp_path / "labels.csv"))

    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    (damaged / "patches.npy").write_bytes((store / "patches.npy").read_bytes()[:1000])
    refused(capsys, "patches.npy", "predict", str(damaged), "--out", out)
    shutil.copy(store / "patches.npy", damaged / "patches.npy")
    (damaged / "index.parquet").write_bytes(b"PAR1 garbage")
    refused(capsys, "index.parquet: unreadable or damaged", "predict", str(damaged), "--out", out)
    assert not Path(out).exists()


def test_a_store_whose_index_lies_is_refused(capsys, store, tmp_path):
    index = pd.read_parquet(store / "index.parquet")
    index.loc[0, "x"] = np.int32(2_000_000_001 // 50 * 50 + 1)
    index.to_parquet(store / "index.parquet", index=False)
    refused(capsys, "lies outside 1..2,000,000", "screen", str(store), "--out", str(tmp_path / "report"))


def _edited_weights(tiny_model, tmp_path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("checkpoints"))
    tensors = load_file(model / "model.safetensors")
    edit(tensors)
    save_file(tensors, model / "model.safetensors")
    return model


def _first_conv(tensors) -> str:
    return next(name for name, tensor in tensors.items() if tensor.ndim == 4)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda t: t[_first_conv(t)].view(-1)[0].fill_(float("nan")), "holds NaN or infinite values"),
        (lambda t: t[next(n for n in t if n.endswith(".bias"))].fill_(float("inf")), "holds NaN or infinite values"),
        (lambda t: t.update({_first_conv(t): t[_first_conv(t)].round().to(torch.int64)}), "holds torch.int64"),
        (lambda t: t.update({_first_conv(t): t[_first_conv(t)][:1]}), "weights do not fit"),
    ],
)
def test_weights_that_would_compute_nan_are_refused_at_load(capsys, store, tmp_path, tiny_model, edit, words):
    model = _edited_weights(tiny_model, tmp_path, edit)
    refused(capsys, words, "predict", str(store), "--model", str(model), "--out", str(tmp_path / "p.csv"))
    refused(capsys, words, "screen", str(store), "--model", str(model), "--out", str(tmp_path / "report"))
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "report").exists()


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_model_that_overflows_to_nan_at_run_time_is_an_error_not_a_call(capsys, store, tmp_path, tiny_model, backend):
    # finite weights, each allowed, whose products overflow float32: only the run-time check can see it
    model = _edited_weights(tiny_model, tmp_path, lambda t: t[_first_conv(t)].fill_(3e38))
    error = refused(capsys, "non-finite", "screen", str(store), "--model", str(model), "--backend", backend,
                    "--out", str(tmp_path / "report"))
    assert str(model) in error and "no call was made" in error
    assert not (tmp_path / "report").exists()


# ---- a full disk, planted links and concurrent runs -----------------------------------------


def _cli_with_file_limit(args: list[str], limit_bytes: int):
    """The real CLI in a child process whose files may not grow past `limit_bytes`: writes
    past it fail as on a full disk (EFBIG rather than ENOSPC, both an OSError mid-write)."""
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal that would kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "histoscreen.cli", *args], capture_output=True, text=True,
                          preexec_fn=limit, timeout=300)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".replaced-" in p.name)


def test_a_report_that_cannot_be_written_whole_fails_and_the_old_report_stays(capsys, slides, tmp_path):
    report = tmp_path / "report"
    assert main(["screen", "-q", str(slides), "--out", str(report), "--backend", "torch"]) == 0
    before = snapshot(report)
    failed = _cli_with_file_limit(["screen", "-q", str(slides), "--out", str(report), "--overwrite", "--backend", "torch"], 20_000)
    assert failed.returncode != 0, failed.stdout
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(lines) == 1 and lines[0].startswith("histoscreen screen: error: "), failed.stderr
    assert snapshot(report) == before
    assert _leftovers(tmp_path) == []


def test_predictions_that_cannot_be_written_whole_fail_and_leave_nothing(capsys, store, tmp_path):
    out = tmp_path / "preds.csv"
    failed = _cli_with_file_limit(["predict", "-q", str(store), "--out", str(out), "--backend", "torch"], 4_000)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(lines) == 1 and lines[0].startswith("histoscreen predict: error: "), failed.stderr
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_temporary_name_planted_as_a_link_is_never_followed(tmp_path):
    from histoscreen.atomic import atomic_write_text

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "preds.csv"
    (tmp_path / f".preds.csv.partial-{os.getpid()}").symlink_to(victim)  # the name a run once used
    atomic_write_text(out, "patient,x,y\n")
    assert victim.read_text() == "keep me\n" and out.read_text() == "patient,x,y\n"
    assert not out.is_symlink()


def test_a_run_that_finishes_second_never_replaces_the_first_without_overwrite(tmp_path):
    from histoscreen.atomic import atomic_folder, atomic_write_text
    from histoscreen.errors import OutputExistsError

    out = tmp_path / "out"
    with pytest.raises(OutputExistsError):
        with atomic_folder(out) as slower:
            (slower / "from").write_text("b")
            with atomic_folder(out) as faster:  # started after, finished first
                (faster / "from").write_text("a")
    assert (out / "from").read_text() == "a" and _leftovers(tmp_path) == []

    single = tmp_path / "model.json"
    single.write_text("first\n")
    with pytest.raises(OutputExistsError):
        atomic_write_text(single, "second\n", replace=False)
    assert single.read_text() == "first\n" and _leftovers(tmp_path) == []


def test_a_rejects_file_histoscreen_did_not_write_is_never_removed(capsys, store, tmp_path):
    out = tmp_path / "preds.csv"
    theirs = tmp_path / "preds.rejects.csv"
    theirs.write_text("my own notes\n")
    refused(capsys, "not a rejects list histoscreen wrote", "predict", str(store), "--out", str(out))
    assert theirs.read_text() == "my own notes\n" and not out.exists()
    theirs.unlink()
    assert main(["predict", "-q", str(store), "--out", str(out)]) == 0


# ---- input errors are one line, never an internal error ------------------------------------


def test_damaged_stores_models_and_tables_are_one_line_each(capsys, store, tmp_path, tiny_model):
    out = str(tmp_path / "p.csv")

    def damaged_store(edit) -> Path:
        copy = tmp_path / f"store-{len(list(tmp_path.glob('store-*')))}"
        shutil.copytree(store, copy)
        edit(copy)
        return copy

    cases = [
        (lambda s: (s / "store.json").write_text("[1, 2]"), "a store manifest is a JSON object"),
        (lambda s: (s / "store.json").write_bytes(b'{"format": "\xff\xfe"}'), "not UTF-8"),
        (lambda s: (s / "store.json").write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
        (lambda s: (s / "patches.npy").write_bytes(b""), "patches.npy: unreadable or damaged"),
    ]
    for edit, words in cases:
        refused(capsys, words, "predict", str(damaged_store(edit)), "--out", out)

    def repeat_rows(s: Path) -> None:
        index = pd.read_parquet(s / "index.parquet")
        index.loc[1, ["patient", "x", "y"]] = index.loc[0, ["patient", "x", "y"]]
        index.to_parquet(s / "index.parquet", index=False)

    refused(capsys, "rows share a place", "screen", str(damaged_store(repeat_rows)), "--out", str(tmp_path / "r"))

    model_cases = [
        ('{"format": "histoscreen-model", "x": ' + "9" * 5000 + "}", "holds a number this reader refuses"),
        ('{"format": "histoscreen-model", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ]
    for text, words in model_cases:
        model = tmp_path / f"model-{len(words)}"
        shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("checkpoints"))
        (model / "model.json").write_text(text)
        refused(capsys, words, "predict", str(store), "--model", str(model), "--out", out)
    assert not Path(out).exists()

    labels = tmp_path / "labels.csv"
    labels.write_text("patient,x,y,label\n" + "a" * (200 << 10) + ",1,1,1\n")
    refused(capsys, "not a readable CSV", "screen", str(store), "--out", str(tmp_path / "r"), "--labels", str(labels))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"widths": [200_000, 64, 96], "blocks": [1, 1, 1], "stem": 16}, "widths must be whole numbers from 1 to 1024"),
        ({"widths": [32, 64, 96], "blocks": [1, 1, 1], "stem": -4}, "stem must be whole numbers from 1 to 512"),
        ({"widths": [32, 64, 96], "blocks": [1e9, 1, 1], "stem": 16}, "blocks must be whole numbers from 1 to 16"),
        ({"widths": [1024, 1024, 1024], "blocks": [16, 16, 16], "stem": 16}, "parameters; at most"),
    ],
)
def test_architectures_that_would_eat_the_machine_are_refused_before_building(capsys, store, tmp_path, tiny_model, kwargs, words):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("checkpoints"))
    metadata = json.loads((model / "model.json").read_text())
    metadata["architecture"], metadata["architecture_kwargs"] = "residual", kwargs
    (model / "model.json").write_text(json.dumps(metadata))
    refused(capsys, words, "predict", str(store), "--model", str(model), "--out", str(tmp_path / "p.csv"))
    refused(capsys, words, "train", str(store), "--out", str(tmp_path / "m"), "--arch", "residual", "--arch-kwargs", json.dumps(kwargs))


def test_a_damaged_onnx_cache_is_rebuilt_not_a_failure_every_time(capsys, store, tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("HISTOSCREEN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "p.csv"
    assert main(["predict", "-q", str(store), "--model", str(tiny_model), "--backend", "onnx", "--out", str(out)]) == 0
    first = out.read_text()
    [cached] = (tmp_path / "cache" / "onnx").glob("*.onnx")
    cached.write_bytes(cached.read_bytes()[:200])  # a run killed while the disk filled
    for _ in range(2):
        assert main(["predict", "-q", str(store), "--model", str(tiny_model), "--backend", "onnx", "--out", str(out), "--overwrite"]) == 0
        assert out.read_text() == first
    assert cached.stat().st_size > 200  # rebuilt once, then read


def test_predict_on_inputs_that_are_all_rejected_fails(capsys, tmp_path):
    folder = tmp_path / "bad" / "900000" / "0"
    folder.mkdir(parents=True)
    (folder / "900000_idx5_x1_y1_class0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "notes.png").write_bytes(b"not an image at all")
    error = refused(capsys, "no readable patch among the inputs (2 rejected)", "predict", str(tmp_path / "bad"), "--out", str(tmp_path / "p.csv"))
    assert "the first:" in error
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "p.rejects.csv").exists()


def _settings_cases():
    """(what to build, the setting it must name): for every public entry that takes numbers or
    names, a NaN, a boolean, a fraction where a count is meant, a string, and a value out of
    range. Each once passed at least one entry silently (NaN compares False with everything)."""
    from histoscreen.data.splits import SplitSpec
    from histoscreen.data.wsi import TissueSettings
    from histoscreen.runtime import Predictor
    from histoscreen.scoring.calibration import ThresholdRule
    from histoscreen.serving.app import ServeSettings
    from histoscreen.tasks.ray_engine import RayEngine
    from histoscreen.training.config import TrainConfig

    nan = float("nan")
    return [
        (lambda: TrainConfig(epochs=2.5), "epochs"),
        (lambda: TrainConfig(batch_size=True), "batch_size"),
        (lambda: TrainConfig(learning_rate=nan), "learning_rate"),
        (lambda: TrainConfig(learning_rate=0.0), "learning_rate"),
        (lambda: TrainConfig(warmup_epochs="1"), "warmup_epochs"),
        (lambda: TrainConfig(border_smoothing=1.5), "border_smoothing"),
        (lambda: TrainConfig(seed=-1), "seed"),
        (lambda: TrainConfig(balance="both"), "balance"),
        (lambda: RayEngine(gpus_per_worker=nan), "gpus_per_worker"),
        (lambda: RayEngine(workers=0), "ray_workers"),
        (lambda: RayEngine(patches_per_shard=0.5), "patches_per_shard"),
        (lambda: ServeSettings(data=Path("."), max_queued=0), "max_queued"),
        (lambda: ServeSettings(data=Path("."), workers=1.5), "parallel_jobs"),
        (lambda: ServeSettings(data=Path("."), max_upload_bytes=1000), "max_upload_mb"),
        (lambda: ThresholdRule(min_sensitivity=nan), "min_sensitivity"),
        (lambda: ThresholdRule(min_specificity=0.0), "min_specificity"),
        (lambda: ThresholdRule(objective="f1"), "threshold_objective"),
        (lambda: TissueSettings(min_tissue=nan), "min_tissue"),
        (lambda: SplitSpec(scheme="kfold", folds=3, fold=4), "fold"),
        (lambda: SplitSpec(scheme="kfold", folds=1, fold=1), "folds"),
        (lambda: Predictor(batch_size=2.5), "batch_size"),
        (lambda: Predictor(backend="tensorrt"), "backend"),
    ]


@pytest.mark.parametrize("build, setting", _settings_cases(), ids=[setting for _, setting in _settings_cases()])
def test_every_public_setting_is_checked_at_the_boundary_and_named(build, setting):
    from histoscreen.errors import SettingError

    with pytest.raises(SettingError) as refused:
        build()
    assert refused.value.setting == setting, refused.value
    assert str(refused.value).startswith(f"{setting} ") and "\n" not in str(refused.value)


def test_the_defaults_of_every_checked_setting_pass():
    from histoscreen.data.splits import SplitSpec
    from histoscreen.data.wsi import TissueSettings
    from histoscreen.scoring.calibration import ThresholdRule
    from histoscreen.serving.app import ServeSettings
    from histoscreen.tasks.ray_engine import RayEngine
    from histoscreen.training.config import TrainConfig

    for made in (TrainConfig(), RayEngine(), ServeSettings(data=Path(".")), ThresholdRule(), TissueSettings(),
                 SplitSpec(scheme="kfold", folds=3, fold=3), TrainConfig(learning_rate=1e-3, seed=7)):
        assert made is not None
