#!/usr/bin/env python3
"""Do the explanations point at the tissue the model uses? Grad-CAM at the last stage (7 x 7
cells on a 50-px patch), Grad-CAM one stage earlier (13 x 13) and occlusion sensitivity
(10 px squares, stride 5: what the reports show), each measured on the same IDC patches
with the shipped model.

usage: python benchmarks/explanations.py [--patches 1000] [--quick]

- border: the share of a map's energy in the outer 5 px ring, against the ring's 36% of
  the patch's area (a ratio above 1 means the map favours the border);
- randomisation (Adebayo et al. 2018): the mean Spearman correlation between each patch's map
  under the trained model and under the same architecture with fresh random weights; an
  explanation of the model must change when the model does (pass: below 0.5);
- deletion: how far the IDC logit falls when the 20% of pixels the map ranks highest are
  painted over with the training mean colour, against painting over the pixels another
  patch's map ranks highest (same shapes, wrong place); a ratio above 1 means the map knows
  where this patch's evidence is.

Patches: the IDC patches (class 1, full 50 x 50) of the official val patients in
../shared/data/idc/val.zip, a seeded sample. These patients chose the shipped model's epoch,
so the figures say how its explanations behave, not how accurate it is. --quick uses 64
SYNTHETIC patches (no ../shared needed) and only shows that the script runs.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histoscreen.constants import PATCH_SIZE
from histoscreen.models import create_model, load_model, shipped_model_path
from histoscreen.runtime import batched_logits
from histoscreen.scoring.slides import spearman as slide_spearman
from histoscreen.tasks.explain import grad_cam, occlusion_maps

from measure import cpu_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "idc"
RING_PX = 5
DELETED_SHARE = 0.2


def val_patches(count: int, seed: int, label: int = 1) -> np.ndarray:
    """Full 50 x 50 patches of one class from val.zip, a seeded sample (non-IDC ones with tissue)."""
    pattern = re.compile(rf"_class{label}\.webp$")
    with zipfile.ZipFile(SHARED / "val.zip") as archive:
        names = sorted(n for n in archive.namelist() if pattern.search(n))
        rng = np.random.default_rng(seed)
        patches = []
        for name in rng.permutation(names):
            image = np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("RGB"))
            if image.shape == (PATCH_SIZE, PATCH_SIZE, 3) and (label == 1 or image.mean() < 200):
                patches.append(image)
            if len(patches) == count:
                break
    return np.stack(patches)


def synthetic_patches(count: int, seed: int) -> np.ndarray:
    from histoscreen.data import generate_slide

    slide = generate_slide(0, seed=seed, idc_fraction=0.5).rgb
    rng = np.random.default_rng(seed)
    tops = rng.integers(0, slide.shape[0] - PATCH_SIZE, count)
    lefts = rng.integers(0, slide.shape[1] - PATCH_SIZE, count)
    return np.stack([slide[t : t + PATCH_SIZE, l : l + PATCH_SIZE] for t, l in zip(tops, lefts)])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """scoring.slides.spearman of two maps; 0 where one of them is flat (no ranking at all)."""
    found = slide_spearman(a.ravel(), b.ravel())
    return 0.0 if np.isnan(found) else found


def border_ratio(maps: np.ndarray) -> float:
    ring = np.ones((PATCH_SIZE, PATCH_SIZE), dtype=bool)
    ring[RING_PX:-RING_PX, RING_PX:-RING_PX] = False
    energy = maps.reshape(len(maps), -1).sum(1)
    shares = maps[:, ring].sum(1) / np.maximum(energy, 1e-12)
    return float(shares[energy > 0].mean() / ring.mean())


def deletion_drops(logits, patches: np.ndarray, maps: np.ndarray, fill: np.ndarray, seed: int) -> tuple[float, float]:
    """Mean fall of the IDC logit with the map's top pixels hidden, and with the top pixels of
    the next patch's map hidden instead."""

    def hidden(by: np.ndarray) -> np.ndarray:
        flat = by.reshape(len(by), -1)
        # ties at the cut (zeros of a sparse map) are broken at random, so each patch loses its share
        flat = flat + np.random.default_rng(seed).random(flat.shape) * 1e-9
        chosen = flat >= np.quantile(flat, 1 - DELETED_SHARE, axis=1, keepdims=True)
        out = patches.copy()
        out.reshape(len(out), -1, 3)[chosen] = fill
        return out

    before = logits(patches)
    return float((before - logits(hidden(maps))).mean()), float((before - logits(hidden(np.roll(maps, 1, axis=0)))).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="64 SYNTHETIC patches: shows the script runs, says nothing")
    args = parser.parse_args()
    if args.quick:
        patches, described = synthetic_patches(64, args.seed), "64 SYNTHETIC patches (--quick: no meaning)"
    elif (SHARED / "val.zip").is_file():
        patches = val_patches(args.patches, args.seed)
        described = f"{len(patches)} IDC patches of the 29 official val patients (../shared val.zip, seed {args.seed})"
    else:
        sys.exit(f"{SHARED / 'val.zip'} is not here; run with --quick")
    model, metadata = load_model(shipped_model_path())
    torch.manual_seed(args.seed)
    randomised = create_model(metadata.architecture, **metadata.architecture_kwargs).eval()
    normalisation = metadata.normalisation
    fill = np.round(np.asarray(normalisation.mean) * 255).astype(np.uint8)

    def logits_of(network):
        return lambda x: batched_logits(network, x, normalisation, batch_size=1024)

    methods = {
        "Grad-CAM, last stage (7 x 7)": lambda network: grad_cam(network, patches, normalisation),
        "Grad-CAM, stage before (13 x 13)": lambda network: grad_cam(network, patches, normalisation, layer=network.features[-2]),
        "occlusion, 10 px squares, stride 5": lambda network: occlusion_maps(logits_of(network), patches, normalisation),
    }
    print(f"shipped model {metadata.architecture} {metadata.architecture_kwargs}; {described}; {cpu_model()}, CPU")
    print(f"{'method':36s} {'border energy / area':>21s} {'randomised: Spearman':>21s} {'deletion: own, other':>21s} {'ms a patch':>10s}")
    for name, explain in methods.items():
        started = time.perf_counter()
        maps = explain(model)
        per_patch_ms = (time.perf_counter() - started) / len(patches) * 1e3
        random_maps = explain(randomised)
        correlation = float(np.mean([spearman(a, b) for a, b in zip(maps, random_maps)]))
        verdict = "pass" if correlation < 0.5 else "FAIL"
        own, other = deletion_drops(logits_of(model), patches, maps, fill, args.seed)
        print(f"{name:36s} {border_ratio(maps):21.2f} {correlation:16.2f} {verdict:>4s} {own:10.2f} {other:10.2f} {per_patch_ms:10.1f}")
    print()
    print("Where is this model's evidence? The fall of the IDC logit when a part of each patch is replaced, the outer")
    print(f"{RING_PX} px ring and the central 30 x 30 square each covering 36% of the patch:")
    ring = np.ones((PATCH_SIZE, PATCH_SIZE), dtype=bool)
    ring[RING_PX:-RING_PX, RING_PX:-RING_PX] = False
    centre = np.zeros((PATCH_SIZE, PATCH_SIZE), dtype=bool)
    centre[10:40, 10:40] = True
    donors = {"the training mean colour": np.broadcast_to(fill, patches.shape)}
    if not args.quick:
        donors["non-IDC tissue of other val patches"] = val_patches(len(patches), args.seed + 1, label=0)
    logits = logits_of(model)
    before = logits(patches)
    for described_donor, donor in donors.items():
        falls = []
        for part in (ring, centre):
            changed = patches.copy()
            changed[:, part] = donor[:, part]
            falls.append(float((before - logits(changed)).mean()))
        print(f"  by {described_donor:36s} ring hidden {falls[0]:6.2f}, centre hidden {falls[1]:6.2f}")
    print("border: 1.00 is no preference; randomised: below 0.5 passes; deletion: the fall of the IDC logit (larger for\n"
          "'own' than 'other' means the map finds this patch's evidence). Timing: torch on this CPU; the reports run\n"
          "occlusion on ONNX Runtime.")


if __name__ == "__main__":
    main()
