"""prepare: the Kaggle layout in all its shapes, bad files, duplicates, atomic publishing."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoscreen import HistoscreenError
from histoscreen.constants import KAGGLE_DUPLICATE_FOLDER, PATCH_SIZE
from histoscreen.data import PatchStore, parse_patch_name, prepare, synthesize


def read_rejects(store_path: Path) -> list[dict]:
    with open(store_path / "rejects.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def one_patient_copy(archive: Path, destination: Path) -> tuple[Path, list[Path]]:
    """A copy of the archive's first patient folder (top-level copy only) and its PNGs."""
    patient = sorted(p for p in archive.iterdir() if p.name.isdigit())[0]
    shutil.copytree(patient, destination / patient.name)
    return destination / patient.name, sorted((destination / patient.name).rglob("*.png"))


def test_doubled_archive_is_stored_once_with_true_counts(synthetic_archive, tmp_path):
    summary = prepare(synthetic_archive, tmp_path / "store")
    store = PatchStore(tmp_path / "store")

    top_level = [p for p in synthetic_archive.rglob("*.png") if KAGGLE_DUPLICATE_FOLDER not in p.parts]
    names = [parse_patch_name(p.name) for p in top_level]
    assert len(store) == len(top_level) == summary.patches
    assert summary.duplicates == len(top_level)
    assert summary.rejects == [] and summary.conflicts == []
    assert store.manifest["per_class"] == {
        str(k): v for k, v in sorted(Counter(n.label for n in names).items())
    }
    assert set(store.patients) == {n.patient for n in names}
    assert not store.index.duplicated(["patient", "x", "y"]).any()


def test_each_stored_patch_matches_its_file_and_edges_are_padded_white(synthetic_archive, tmp_path):
    prepare(synthetic_archive, tmp_path / "store")
    store = PatchStore(tmp_path / "store")
    edge = store.index[(store.index.width < PATCH_SIZE) | (store.index.height < PATCH_SIZE)]
    assert len(edge) > 0, "synthetic slides must contain edge patches"
    checked = list(edge.index[:20]) + list(store.index.index[:: max(1, len(store) // 30)])
    for row in checked:
        record = store.index.loc[row]
        original = np.asarray(Image.open(record.source))
        assert original.shape == (record.height, record.width, 3)
        stored = store.patches[row]
        np.testing.assert_array_equal(stored[: record.height, : record.width], original)
        assert (stored[record.height :, :] == 255).all() and (stored[:, record.width :] == 255).all()
        name = parse_patch_name(Path(record.source).name)
        assert (name.patient, name.x, name.y, name.label) == (record.patient, record.x, record.y, record.label)


@pytest.mark.parametrize("shape", ["duplicate-folder-alone", "one-patient", "loose-files"])
def test_other_shapes_of_the_dataset(synthetic_archive, tmp_path, shape):
    if shape == "duplicate-folder-alone":
        source = synthetic_archive / KAGGLE_DUPLICATE_FOLDER
        expected = len(list(source.rglob("*.png")))
    elif shape == "one-patient":
        source, files = one_patient_copy(synthetic_archive, tmp_path)
        expected = len(files)
    else:
        source = tmp_path / "loose"
        source.mkdir()
        files = list((synthetic_archive / KAGGLE_DUPLICATE_FOLDER).rglob("*.png"))[:150]
        for path in files:
            shutil.copy(path, source / path.name)
        expected = len(files)
    summary = prepare(source, tmp_path / "store", workers=2)
    assert summary.patches == expected
    assert summary.duplicates == 0 and summary.rejects == []


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _text(path: Path) -> None:
    path.write_text("this is not an image\n")


def _rgba(path: Path) -> None:
    Image.open(path).convert("RGBA").save(path)


def _grayscale(path: Path) -> None:
    Image.open(path).convert("L").save(path)


def _too_large(path: Path) -> None:
    Image.new("RGB", (64, 50), (200, 100, 150)).save(path)


def _unparsable_name(path: Path) -> Path:
    return path.rename(path.with_name("scan_0001.png"))


def _wrong_folder(path: Path) -> Path:
    other = path.parent.parent / ("1" if path.parent.name == "0" else "0")
    other.mkdir(exist_ok=True)
    return path.rename(other / path.name)


def _not_png_suffix(path: Path) -> Path:
    return path.rename(path.with_name("notes.txt"))


def _off_grid(path: Path) -> Path:
    name = parse_patch_name(path.name)
    return path.rename(path.with_name(path.name.replace(f"_x{name.x}_", f"_x{name.x + 7}_")))


@pytest.mark.parametrize(
    "damage, reason_words",
    [
        (_truncated, "truncated"),
        (_zero_bytes, "empty file"),
        (_text, "not an image"),
        (_rgba, "alpha"),
        (_grayscale, "grayscale"),
        (_too_large, "64x50"),
        (_unparsable_name, "name does not match"),
        (_wrong_folder, "disagrees with its folder"),
        (_not_png_suffix, "not a .png file"),
        (_off_grid, "not on the 50-px grid"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] if callable(v) else "",
)
def test_a_bad_file_is_rejected_with_its_reason_and_the_rest_is_kept(synthetic_archive, tmp_path, damage, reason_words):
    _, files = one_patient_copy(synthetic_archive, tmp_path / "src")
    victim = files[len(files) // 2]
    damaged = damage(victim) or victim

    summary = prepare(tmp_path / "src", tmp_path / "store", workers=2)

    assert summary.patches == len(files) - 1
    rejects = read_rejects(tmp_path / "store")
    assert [r["path"] for r in rejects] == [str(damaged)]
    assert reason_words in rejects[0]["reason"]
    assert len(PatchStore(tmp_path / "store")) == len(files) - 1
    assert "rejected files: 1" in "\n".join(summary.lines())


def test_strict_mode_turns_a_reject_into_an_error_and_writes_nothing(synthetic_archive, tmp_path):
    _, files = one_patient_copy(synthetic_archive, tmp_path / "src")
    _zero_bytes(files[0])
    with pytest.raises(HistoscreenError, match="empty file"):
        prepare(tmp_path / "src", tmp_path / "store", strict=True)
    assert not (tmp_path / "store").exists()
    assert list(tmp_path.glob(".store*")) == []


def _relabel(path: Path) -> Path:
    """Move a patch to the other class: same patient, x and y, opposite label."""
    name = parse_patch_name(path.name)
    flipped = 1 - name.label
    target = path.parent.parent / str(flipped) / path.name.replace(f"class{name.label}", f"class{flipped}")
    target.parent.mkdir(exist_ok=True)
    return path.rename(target)


def test_copies_that_disagree_are_reported(synthetic_archive, tmp_path):
    source = tmp_path / "archive"
    shutil.copytree(synthetic_archive, source)
    twins = sorted((source / KAGGLE_DUPLICATE_FOLDER).rglob("*.png"))
    repainted = twins[5]
    pixels = np.asarray(Image.open(repainted)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(repainted)
    relabelled = _relabel(twins[9])

    summary = prepare(source, tmp_path / "store")

    with open(tmp_path / "store" / "conflicts.csv", newline="") as handle:
        conflicts = {row["other_path"]: row for row in csv.DictReader(handle)}
    assert conflicts[str(repainted)]["pixels_differ"] == "1" and conflicts[str(repainted)]["labels_differ"] == "0"
    assert conflicts[str(relabelled)]["labels_differ"] == "1" and conflicts[str(relabelled)]["pixels_differ"] == "0"
    assert len(summary.conflicts) == 2
    assert any("disagree" in line for line in summary.lines())
    with pytest.raises(HistoscreenError, match="conflicting duplicates"):
        prepare(source, tmp_path / "strict-store", strict=True)


def test_empty_and_missing_sources_are_clear_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(HistoscreenError, match="holds no files"):
        prepare(tmp_path / "empty", tmp_path / "store")
    with pytest.raises(HistoscreenError, match="no such folder"):
        prepare(tmp_path / "missing", tmp_path / "store")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"")
    with pytest.raises(HistoscreenError, match="none of 1 files is a valid patch"):
        prepare(tmp_path / "junk", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_an_existing_store_is_kept_unless_overwrite(synthetic_archive, tmp_path):
    source, files = one_patient_copy(synthetic_archive, tmp_path / "src")
    prepare(source, tmp_path / "store")
    files[0].unlink()
    with pytest.raises(HistoscreenError, match="already exists"):
        prepare(source, tmp_path / "store")
    assert len(PatchStore(tmp_path / "store")) == len(files)
    prepare(source, tmp_path / "store", overwrite=True)
    assert len(PatchStore(tmp_path / "store")) == len(files) - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "store"]


def test_a_killed_run_leaves_no_store(tmp_path):
    source = tmp_path / "big"
    synthesize(source, patients=14, seed=5, doubled=True)
    out = tmp_path / "store"
    command = [sys.executable, "-m", "histoscreen.cli", "prepare", str(source), str(out), "--workers", "1", "--quiet"]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".store.partial-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "prepare finished before it could be killed; give it more work"
    time.sleep(0.3)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    assert not out.exists()
    assert list(tmp_path.glob(".store.partial-*")), "the killed run's temporary folder should be the only trace"
    prepare(source, out)  # the next run clears the dead run's leftovers
    assert list(tmp_path.glob(".store.partial-*")) == []
    assert len(PatchStore(out)) > 0


def test_a_damaged_store_is_refused_with_a_clear_message(synthetic_archive, tmp_path):
    source, _ = one_patient_copy(synthetic_archive, tmp_path / "src")
    prepare(source, tmp_path / "store")
    (tmp_path / "store" / "patches.npy").unlink()
    with pytest.raises(HistoscreenError, match="missing patches.npy"):
        PatchStore(tmp_path / "store")
    with pytest.raises(HistoscreenError, match="not a patch store"):
        PatchStore(tmp_path / "src")
