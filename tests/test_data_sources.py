"""PatchSource: a store, a folder and a list of files are read the same way; duplicates,
conflicts and unusable files are reported, never silently dropped."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from histoscreen.constants import KAGGLE_DUPLICATE_FOLDER
from histoscreen.data import NO_LABEL, FileSource, PatchBatch, PatchStore, StoreSource, open_sources, parse_patch_name, prepare
from histoscreen.data.sources import NO_SLIDE, UNKNOWN_COORDINATE
from histoscreen.errors import InputError


def by_key(batch: PatchBatch) -> dict:
    return {(p, int(x), int(y)): i for i, (p, x, y) in enumerate(zip(batch.patients, batch.xs, batch.ys))}


def test_store_folder_and_file_list_give_the_same_patches_in_slide_order(synthetic_archive, tmp_path):
    prepare(synthetic_archive, tmp_path / "store")
    from_store = StoreSource(PatchStore(tmp_path / "store")).read_all()
    [folder] = open_sources([synthetic_archive])
    from_folder = folder.read_all()
    files = sorted(p for p in synthetic_archive.rglob("*.png") if KAGGLE_DUPLICATE_FOLDER not in p.parts)
    from_files = FileSource(files).read_all()
    for batch in (from_folder, from_files):
        assert len(batch) == len(from_store)
        np.testing.assert_array_equal(batch.patients, from_store.patients)
        np.testing.assert_array_equal(batch.xs, from_store.xs)
        np.testing.assert_array_equal(batch.ys, from_store.ys)
        np.testing.assert_array_equal(batch.pixels, from_store.pixels)
        np.testing.assert_array_equal(batch.labels, from_store.labels)
        np.testing.assert_array_equal(batch.widths, from_store.widths)
    # slide order: patient, then row, then column
    order = np.lexsort((from_store.xs, from_store.ys, from_store.patients.astype(int)))
    np.testing.assert_array_equal(order, np.arange(len(from_store)))
    assert folder.duplicates == len(files) and folder.problems == [] and folder.conflicts == []


def test_batches_respect_the_size_and_slides_come_one_at_a_time(synthetic_archive):
    [source] = open_sources([synthetic_archive], workers=1)
    sizes = [len(b) for b in source.batches(batch_size=64)]
    assert max(sizes) == 64 and sum(sizes) == len(source)
    for slide in source.slide_ids():
        batch = source.read_slide(slide)
        assert set(batch.patients) == {slide} and len(batch) > 0


def test_a_conflicting_copy_is_reported_and_the_first_copy_kept(synthetic_archive, tmp_path):
    archive = tmp_path / "archive"
    shutil.copytree(synthetic_archive, archive)
    top = sorted(p for p in archive.rglob("*.png") if KAGGLE_DUPLICATE_FOLDER not in p.parts)[5]
    twin = archive / KAGGLE_DUPLICATE_FOLDER / top.relative_to(archive)
    other_label = "1" if top.parent.name == "0" else "0"
    moved = twin.parent.parent / other_label / twin.name.replace(f"class{top.parent.name}", f"class{other_label}")
    moved.parent.mkdir(exist_ok=True)
    twin.rename(moved)

    [source] = open_sources([archive])
    batch = source.read_all()
    [conflict] = source.conflicts
    assert conflict.kept_path == str(top) and conflict.other_path == str(moved) and conflict.labels_differ
    assert "different label" in conflict.as_problem().reason
    row = by_key(batch)[parse_patch_name(top.name).key]
    assert batch.paths[row] == str(top)


def test_one_patient_folder_reports_no_false_problems(synthetic_archive, tmp_path):
    patient = sorted(p for p in synthetic_archive.iterdir() if p.name.isdigit())[0]
    [source] = open_sources([patient])
    assert source.slide_ids() == [patient.name]
    source.read_all()
    assert source.problems == []


def test_an_empty_patient_folder_and_bad_names_are_problems(synthetic_archive, tmp_path):
    folder = tmp_path / "slides"
    shutil.copytree(synthetic_archive / KAGGLE_DUPLICATE_FOLDER, folder)
    (folder / "900077" / "0").mkdir(parents=True)
    (folder / "notes.txt").write_text("hello")
    (folder / "scan.png").write_bytes(next(folder.rglob("*.png")).read_bytes())
    [named_only] = open_sources([folder])
    reasons = {p.where: p.reason for p in named_only.problems}
    assert reasons[str(folder / "900077")] == "slide folder holds no patches"
    assert "not a .png file" in reasons[str(folder / "notes.txt")]
    assert "name does not match" in reasons[str(folder / "scan.png")]

    [lenient] = open_sources([folder], named_only=False)
    assert lenient.slide_ids()[-1] == NO_SLIDE
    unplaced = lenient.read_slide(NO_SLIDE)
    assert list(unplaced.paths) == [str(folder / "scan.png")]
    assert unplaced.xs[0] == UNKNOWN_COORDINATE and unplaced.labels[0] == NO_LABEL
    assert not unplaced.positions.known.any()


def test_missing_and_empty_inputs_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        open_sources([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no files"):
        open_sources([tmp_path / "empty"])


def test_shards_opened_in_turn_yield_what_the_source_yields(synthetic_archive, tmp_path):
    """What a Ray worker opens: store row runs, groups of slides' files (with the archive's
    twins, so copies are still compared), loose files in chunks."""
    import pickle

    prepare(synthetic_archive, tmp_path / "store")
    loose = tmp_path / "loose"
    loose.mkdir()
    for number, path in enumerate(sorted(synthetic_archive.rglob("*.png"))[:5]):
        shutil.copy(path, loose / f"scan-{number}.png")
    folder_source = open_sources([synthetic_archive, loose], named_only=False)[0]
    for source in (StoreSource(PatchStore(tmp_path / "store")), folder_source):
        whole = source.read_all()
        shards = [pickle.loads(pickle.dumps(s)) for s in source.shards(patches_per_shard=150)]
        assert len(shards) > 2 and sum(s.patches for s in shards) >= len(whole)
        opened = [shard.open(workers=1) for shard in shards]
        parts = PatchBatch.concatenate([s.read_all() for s in opened])
        np.testing.assert_array_equal(parts.paths, whole.paths)
        np.testing.assert_array_equal(parts.pixels, whole.pixels)
        assert sum(s.duplicates for s in opened) == source.duplicates
    assert folder_source.duplicates > 0 and NO_SLIDE in folder_source.slide_ids()


CHILD_IMPORT_SPY = '''
import os, sys

parent, log = os.getpid(), sys.argv[2]


class Spy:
    """Appends every import made in a process other than this one (a forked decoder) to the log."""

    def find_spec(self, name, path=None, target=None):
        if os.getpid() != parent:
            with open(log, "a") as out:
                out.write(name + "\\n")
        return None


sys.meta_path.insert(0, Spy())
from pathlib import Path
from histoscreen.data.patch_files import decode_files

files = sorted(str(p) for p in Path(sys.argv[1]).rglob("*.png"))[:600]
print(sum(len(paths) for paths, _ in decode_files([(f, i) for i, f in enumerate(files)], workers=2, chunk_size=100)))
'''


def test_forked_decoders_import_nothing(synthetic_archive, tmp_path):
    """A decoder forked while another thread of the caller imports a module inherits that
    module's lock, held, and hangs if it needs the module (the demo hung once so): what
    decoding imports is imported before the fork. A fresh interpreter, where nothing of
    Pillow's formats is imported yet."""
    import subprocess
    import sys

    script, log = tmp_path / "spy.py", tmp_path / "child-imports.txt"
    script.write_text(CHILD_IMPORT_SPY)
    done = subprocess.run([sys.executable, str(script), str(synthetic_archive), str(log)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip()) == min(600, len(list(synthetic_archive.rglob("*.png"))))
    assert not log.exists() or log.read_text().split() == [], log.read_text()
