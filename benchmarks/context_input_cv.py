#!/usr/bin/env python3
"""An experiment, not the product: does a network that also sees a patch's neighbours separate new patients better?

usage: python benchmarks/context_input_cv.py [--folds 1 2 3] [--split-seed 0] [--epochs 20]

The shipped network sees one 50x50 patch; the slide context (the blend) then mixes its
score with its neighbours' scores. Most of the cross-validation's errors are false
positives at the edges of annotated tumour (benchmarks/cv_ceiling.py), where what decides
the annotation is the tissue around the patch. Here the same architecture and recipe
(`train_shipped_model.TRAIN_ARGS`, the product's own training loop) gets a second input:
the patch's 3x3 block of neighbouring patches (missing ones white, as an edge patch is
padded) shrunk to 50x50, stacked with the patch as 6 channels; augmentation moves both
alike. Each fold network of cv.py's "with-extra" recipe is matched: the same split file,
best epoch on the same val patients, the scoring fitted there as `train` fits it (blend,
balanced accuracy), the fold's patients never seen. Logits are cached in cv.py's format
under --work/seed-S/context-input, so cv.py's figures and the accuracy ceiling are
computed exactly as for the shipped recipe, side by side on the folds run. About 29 min a
fold on 2 CPU cores. Nothing in the product reads a second input yet.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

import cv
from cv_ceiling import best_accuracy
from measure import cpu_model
from train_shipped_model import TRAIN_ARGS

RECIPE = "context-input"
BLOCK = 3  # patches across the neighbourhood shown beside the patch


def context_images(store_path: Path, cache: Path) -> np.ndarray:
    """Per store patch, its BLOCK x BLOCK neighbourhood of patches (white where none) averaged
    down to one patch's size: uint8 N x 50 x 50 x 3, cached."""
    import torch

    from histoscreen.data import PatchStore
    from histoscreen.data.naming import grid_index

    if cache.exists():
        return np.load(cache, mmap_mode="r")
    store = PatchStore(store_path)
    pixels, index = store.patches, store.index
    size = pixels.shape[1]
    places = pd.DataFrame({"patient": index["patient"].astype(str).to_numpy(), "column": grid_index(index["x"].to_numpy()),
                           "row": grid_index(index["y"].to_numpy()), "at": np.arange(len(index))})
    reach = BLOCK // 2
    offsets = [(dc, dr) for dr in range(-reach, reach + 1) for dc in range(-reach, reach + 1)]
    neighbour = np.full((len(index), len(offsets)), -1)
    for k, (dc, dr) in enumerate(offsets):
        moved = places.assign(column=places.column + dc, row=places.row + dr)
        found = moved.merge(places, on=["patient", "column", "row"], how="left", suffixes=("", "_n"))
        neighbour[:, k] = found["at_n"].fillna(-1).to_numpy(dtype=np.int64)
    out = np.empty_like(pixels)
    for start in range(0, len(index), 1024):
        rows = np.arange(start, min(start + 1024, len(index)))
        mosaic = np.full((len(rows), BLOCK * size, BLOCK * size, 3), 255, np.uint8)
        for k, (dc, dr) in enumerate(offsets):
            present = neighbour[rows, k] >= 0
            top, left = (dr + reach) * size, (dc + reach) * size
            mosaic[present, top : top + size, left : left + size] = pixels[neighbour[rows[present], k]]
        shrunk = torch.nn.functional.avg_pool2d(torch.from_numpy(mosaic).permute(0, 3, 1, 2).float(), BLOCK)
        out[rows] = shrunk.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache.with_suffix(".partial.npy"), out)
    cache.with_suffix(".partial.npy").rename(cache)
    return np.load(cache, mmap_mode="r")


def normalise_pair(images, normalisation):
    """Both 3-channel halves by the patch's normalisation."""
    import torch

    mean = torch.tensor(normalisation.mean * 2).view(1, 6, 1, 1)
    std = torch.tensor(normalisation.std * 2).view(1, 6, 1, 1)
    return ((images - mean) / std).contiguous(memory_format=torch.channels_last)


def augment_pair(patches, normalisation, draw):
    """The product's training augmentation applied alike to the patch and its neighbourhood
    (uint8 N x 50 x 50 x 6): the same dihedral view, stain and colour jitter."""
    import torch

    from histoscreen.data.transforms import apply_dihedral, brightness_contrast, stain_jitter

    images = apply_dihedral(patches.permute(0, 3, 1, 2).float().div_(255.0), draw.views)
    if draw.stain_alpha is not None:
        images = torch.cat([brightness_contrast(stain_jitter(half, draw.stain_alpha, draw.stain_beta), draw.gain, draw.offset)
                            for half in (images[:, :3], images[:, 3:])], dim=1)
    return normalise_pair(images, normalisation)


def view_logits(model, pairs: np.ndarray, normalisation, views: int = 8) -> np.ndarray:
    """views x N raw logits: the dihedral views of patch and neighbourhood together."""
    import torch

    from histoscreen.data.transforms import dihedral

    model.eval()
    out = np.empty((views, len(pairs)), np.float32)
    with torch.inference_mode():
        for start in range(0, len(pairs), 1024):
            images = normalise_pair(torch.from_numpy(np.ascontiguousarray(pairs[start : start + 1024])).permute(0, 3, 1, 2).float().div_(255.0), normalisation)
            for view in range(views):
                out[view, start : start + len(images)] = model(dihedral(images, view).contiguous(memory_format=torch.channels_last)).numpy()
    return out


def training_config(epochs: int):
    from histoscreen.training.config import TrainConfig

    options = dict(zip(TRAIN_ARGS[::2], TRAIN_ARGS[1::2]))
    return TrainConfig(architecture=options["--arch"], architecture_kwargs=json.loads(options["--arch-kwargs"]), epochs=epochs,
                       balance=options["--balance"], stain_jitter=float(options["--stain-jitter"]), seed=int(options["--seed"]), device="cpu")


def train_fold(store_path: Path, contexts: np.ndarray, split_csv: Path, out: Path, epochs: int) -> None:
    """One fold network with the second input, by the product's epoch loop; caches its logits."""
    import torch

    import histoscreen.training.loop as loop
    from histoscreen.data import PatchStore
    from histoscreen.data.transforms import Normalisation
    from histoscreen.models import create_model
    from histoscreen.progress import silent

    loop.augment = augment_pair  # the loop's one call that sees pixels: both halves moved alike
    config = training_config(epochs)
    store = PatchStore(store_path)
    split = pd.read_csv(split_csv, dtype=str)
    rows_of = {part: store.rows_of(set(split.patient[split.split == part])) for part in ("train", "val", "test")}
    pairs = {part: np.concatenate([store.patches[rows], contexts[rows]], axis=3) for part, rows in rows_of.items()}
    labels = {part: store.labels[rows] for part, rows in rows_of.items()}
    normalisation = Normalisation.of(store.patches[rows_of["train"]], seed=config.seed)
    torch.manual_seed(config.seed)
    model = create_model(config.architecture, **config.architecture_kwargs)
    stem = model.features[0][0]
    model.features[0][0] = torch.nn.Conv2d(6, stem.out_channels, 3, padding=1, bias=False)
    model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}], lr=config.learning_rate)
    train_pixels, train_labels = torch.from_numpy(pairs["train"]), torch.as_tensor(labels["train"])
    steps = math.ceil(len(train_labels) / config.batch_size)
    best, best_score, history, started = None, -1.0, [], time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        loss, _ = loop.train_one_epoch(model, optimizer, train_pixels, train_labels, train_labels.float(), normalisation, config,
                                       epoch, (epoch - 1) * steps, steps * config.epochs, torch.device("cpu"), silent)
        record = {"epoch": epoch, "train_loss": loss, **loop.evaluate_logits(labels["val"], view_logits(model, pairs["val"], normalisation, 1)[0])}
        history.append(record)
        if record["val_best_balanced_accuracy"] > best_score:
            best_score, best = record["val_best_balanced_accuracy"], (epoch, copy.deepcopy(model.state_dict()))
        print(f"  epoch {epoch}: loss {loss:.4f}, val AUC {record['val_auc']:.4f}, best-threshold balanced accuracy "
              f"{record['val_best_balanced_accuracy']:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.load_state_dict(best[1])
    index = store.index
    saved = {}
    for part, name in (("test", "held_out"), ("val", "val")):
        rows = rows_of[part]
        saved.update({f"{name}_views": view_logits(model, pairs[part], normalisation), f"{name}_labels": labels[part],
                      f"{name}_patients": index["patient"].to_numpy().astype(str)[rows], f"{name}_xs": index["x"].to_numpy()[rows],
                      f"{name}_ys": index["y"].to_numpy()[rows]})
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    (out / "best_epoch.json").write_text(json.dumps({"best_epoch": best[0], "seconds": round(time.perf_counter() - started)}) + "\n")
    np.savez(out / "logits.partial.npz", **saved)
    (out / "logits.partial.npz").rename(out / "logits.npz")


def official_ceiling(folds: list[cv.FoldLogits]) -> list[float]:
    """Per fold, the best accuracy of any threshold on the official-list held-out patients,
    scored by the blend fitted on the fold network's val patients (as `train` fits it)."""
    found = []
    for logits in folds:
        part = cv.Part.of(logits.held_out)
        probabilities, _ = cv.Scorer(cv.Procedure("val", "blend", "BA"), cv.Part.of(logits.val))(part)
        official = np.array([cv.population(p) == "official" for p in part.patients])
        found.append(best_accuracy(part.labels[official], probabilities[official]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--work", type=Path, default=cv.REPO / ".cache" / "cv")
    args = parser.parse_args()
    import torch

    from histoscreen.scoring.metrics import roc_auc

    torch.set_num_threads(2)
    store = cv.everything_store(args.work)
    patches = cv.Patches.of(store)
    fold_of = cv.fold_assignment(patches, 3, args.split_seed)
    work = args.work / f"seed-{args.split_seed}"
    contexts = context_images(store, args.work / "context-images.npy")
    print(f"split seed {args.split_seed}, folds {args.folds}, {args.epochs} epochs ({cpu_model()})", flush=True)
    mine, theirs = [], []
    for fold in args.folds:
        out = work / RECIPE / f"fold-{fold}"
        if not (out / "logits.npz").exists():
            print(f"training fold {fold}", flush=True)
            train_fold(store, contexts, cv.split_file(work, "with-extra", fold_of, fold), out, args.epochs)
        mine.append(cv.FoldLogits.load(out / "logits.npz"))
        theirs.append(cv.fold_logits("with-extra", store, work, fold_of, fold))
    procedure = cv.Procedure("val", "blend", "BA")
    print(f"\nheld-out patients of folds {args.folds}; mean (worst fold); slides: the complete ones pooled\n{cv.HEADER}")
    for name, folds in (("with-extra (shipped recipe)", theirs), (RECIPE, mine)):
        print(cv.summary_line(name, cv.evaluate(procedure, folds, patches, [])))
    for name, folds in (("with-extra (shipped recipe)", theirs), (RECIPE, mine)):
        ceilings = official_ceiling(folds)
        alone = [roc_auc(p.labels, p.views[0]) for p in map(cv.Part.of, (f.held_out for f in folds))]
        print(f"{name:34} accuracy ceiling (official-list) {np.mean(ceilings):.3f} ({' / '.join(f'{c:.3f}' for c in ceilings)}); "
              f"patch-alone ROC-AUC, all held-out {np.mean(alone):.3f}")


if __name__ == "__main__":
    main()
