#!/usr/bin/env python3
"""Would normalising each slide's stain help on new patients? A patient-grouped CV experiment.

usage: python benchmarks/slide_normalisation_cv.py [--store STORE] [--network compact|shipped]

Writes a copy of STORE in which every patient's patches are Reinhard-normalised in optical
density: each colour channel's mean and spread over the slide's tissue pixels (not the white
background) are matched to those of all patients together. Then runs benchmarks/stain_cv.py on
the copy, with the same folds, network and seed, so its table can be set beside the one for
the untouched store. The product does not normalise slides; this measures whether it should.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
from histoscreen.data.store import INDEX_FILE, MANIFEST_FILE, PATCHES_FILE, PatchStore

BACKGROUND_OPTICAL_DENSITY = 0.3  # summed over channels; below it a pixel is glass, not tissue


def pixel_densities(patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel's optical density (pixels x 3) and whether it is tissue."""
    density = -np.log((patches.astype(np.float32) + 1.0) / 256.0).reshape(-1, 3)
    return density, density.sum(axis=1) > BACKGROUND_OPTICAL_DENSITY


def normalised_store(source: PatchStore, out: Path) -> None:
    if (out / MANIFEST_FILE).exists():
        return
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    patients = source.index["patient"].to_numpy()
    statistics = {}
    for patient in source.patients:
        density, tissue = pixel_densities(source.patches[patients == patient])
        statistics[patient] = (density[tissue].mean(axis=0), density[tissue].std(axis=0) + 1e-6)
    target_mean = np.mean([mean for mean, _ in statistics.values()], axis=0)
    target_spread = np.mean([spread for _, spread in statistics.values()], axis=0)
    normalised = np.lib.format.open_memmap(partial / PATCHES_FILE, mode="w+", dtype=np.uint8, shape=source.patches.shape)
    for patient, (mean, spread) in statistics.items():
        rows = np.flatnonzero(patients == patient)
        density, tissue = pixel_densities(source.patches[rows])
        density[tissue] = (density[tissue] - mean) / spread * target_spread + target_mean
        pixels = np.clip(256.0 * np.exp(-density) - 1.0, 0, 255).round().astype(np.uint8)
        normalised[rows] = pixels.reshape(len(rows), *source.patches.shape[1:])
    normalised.flush()
    del normalised
    for name in (INDEX_FILE, MANIFEST_FILE):
        shutil.copy(source.path / name, partial / name)
    partial.rename(out)
    print(f"wrote {out}: {len(statistics)} patients normalised to optical-density mean {np.round(target_mean, 3)}, "
          f"spread {np.round(target_spread, 3)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=REPO / ".cache" / "shipped-model" / "store")
    parser.add_argument("--network", choices=["compact", "shipped"], default="compact")
    args = parser.parse_args()
    # named after its source, so a different --store never reuses another store's copy or models
    out = args.store.with_name(args.store.name + "-slide-normalised")
    normalised_store(PatchStore(args.store), out)
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "stain_cv.py"), "--store", str(out), "--network", args.network,
         "--jitter", "0.05", "--work", str(out.with_name(out.name + "-cv"))],
        check=True,
    )


if __name__ == "__main__":
    main()
