#!/usr/bin/env python3
"""Patient-grouped cross-validation of candidate models and scorings: the yardstick for new patients.

usage: python benchmarks/cv.py [CANDIDATE ...] [--folds 3] [--list]
       e.g. python benchmarks/cv.py shipped shipped-seed1 shipped+shipped-seed1

Every candidate goes through the same folds over all the patients in ../shared (the 82 train
and 29 val patients at full density, `unpack.py --split full`): trained on two thirds of the
patients (its best epoch chosen on the held-out third, as the shipped command does), then
every held-out patient is called at settings chosen on the OTHER held-out patients of its fold
(leave one patient out): the threshold, and for slide context the radius and weight. No
patient's own labels tune its own calls. "a+b" is the ensemble of two trained candidates
(their logits averaged). Results per fold: mean and worst fold of accuracy, sensitivity,
specificity, balanced accuracy and ROC-AUC, and the network's patches/s on this machine.

Everything that can be is cached under --work: fold models (a candidate trained once is
never trained again; a killed training resumes), out-of-fold logits (8 dihedral views), so a
new scoring idea costs seconds and a new network about 15 minutes a fold on 2 CPU cores.
Writes --work/results.json, per_patient-<candidate>.csv and worst-slides/ (heatmap beside
truth for each fold's five worst slides, per candidate). On a CUDA machine training runs there by
itself (--device auto); benchmarks/gpu_check.py runs the expensive candidates.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import cpu_model  # noqa: E402
from train_shipped_model import DISTIL_WEIGHT, TEACHER_SEEDS, TRAIN_ARGS as SHIPPED_ARGS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "idc"


def replaced(options: list[str], **changes: str) -> list[str]:
    """The training options with some flags' values replaced (flags named with underscores)."""
    options = list(options)
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if flag in options:
            del options[options.index(flag) : options.index(flag) + 2]
        options += [flag, value]
    return options


def without_resume(options: list[str]) -> list[str]:
    return [o for o in options if o != "--resume"]


BASE = without_resume(SHIPPED_ARGS)  # the teachers' recipe, and the shipped network's before distillation
SEEDS = tuple("shipped" if seed == 0 else f"shipped-seed{seed}" for seed in TEACHER_SEEDS)  # the shipped model's teachers


def distilled(weight: str) -> list[str]:
    """The shipped recipe taught by the four seeds' ensemble of the same split ({split} is
    filled in per fold, so a held-out patient never reaches a teacher's training either)."""
    teachers = [option for seed in SEEDS for option in ("--teacher", "{work}/" + seed + "/{split}")]
    return [*BASE, *teachers, "--distil-weight", weight]


CANDIDATES: dict[str, list[str]] = {
    "shipped": BASE,
    **{name: replaced(BASE, seed=name.removeprefix("shipped-seed")) for name in SEEDS[1:]},
    "soft-borders": replaced(BASE, border_smoothing="0.3"),
    "longer": replaced(BASE, epochs="32"),
    "wide": replaced(BASE, arch_kwargs='{"widths": [48, 96, 144], "blocks": [1, 1, 1], "stem": 24}', epochs="24"),
    "deep": replaced(BASE, arch_kwargs='{"widths": [32, 64, 96], "blocks": [2, 2, 2], "stem": 16}', epochs="24"),
    "distil": distilled(DISTIL_WEIGHT),  # the shipped recipe since issue 12
    "distil-strong": distilled("0.8"),
}
TEACHERS = {name: list(SEEDS) for name in ("distil", "distil-strong")}
RULES = {
    "BA": dict(objective="balanced_accuracy"),
    "acc>=0.87": dict(objective="accuracy", min_sensitivity=0.87, min_specificity=0.87),
    "acc>=.89/.87": dict(objective="accuracy", min_sensitivity=0.89, min_specificity=0.87),
    "acc>=.90/.85": dict(objective="accuracy", min_sensitivity=0.90, min_specificity=0.85),
    "acc>=.90/.87": dict(objective="accuracy", min_sensitivity=0.90, min_specificity=0.87),
}


@dataclass
class Fold:
    """Out-of-fold logits of one fold's held-out patients."""

    views: np.ndarray  # 8 x N, the dihedral views
    labels: np.ndarray
    patients: np.ndarray
    xs: np.ndarray
    ys: np.ndarray


def full_store(work: Path) -> Path:
    store = work / "store"
    if not (store / "store.json").exists():
        patches = REPO / ".cache" / "real-idc" / "full"
        subprocess.run([sys.executable, str(SHARED / "unpack.py"), str(patches), "--split", "full"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "histoscreen.cli", "prepare", str(patches), str(store), "-q"], check=True)
    return store


def training_command(name: str, store: Path, work: Path, split: str, folds: int = 3) -> list[str]:
    """`histoscreen train` of a candidate on one fold ("1".."folds") or on the official split
    ("official": train patients, best epoch chosen on the val patients, as the shipped model)."""
    options = [o.replace("{work}", str(work)).replace("{split}", split if split == "official" else f"fold-{split}")
               for o in CANDIDATES[name]]
    scheme = [] if split == "official" else ["--split-scheme", "kfold", "--folds", str(folds), "--fold", split, "--split-seed", "0"]
    out = work / name / (split if split == "official" else f"fold-{split}")
    return [sys.executable, "-m", "histoscreen.cli", "train", str(store), "--out", str(out), "-q", *options, *scheme, "--resume"]


def train_folds(name: str, store: Path, work: Path, folds: int) -> list[Path]:
    for teacher in TEACHERS.get(name, []):
        train_folds(teacher, store, work, folds)
    models = []
    for fold in range(1, folds + 1):
        out = work / name / f"fold-{fold}"
        if not (out / "model.json").exists():
            started = time.perf_counter()
            subprocess.run(training_command(name, store, work, str(fold), folds), check=True)
            print(f"trained {name} fold {fold} in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
        models.append(out)
    return models


def fold_logits(name: str, store_path: Path, work: Path, folds: int) -> list[Fold]:
    from histoscreen.data import PatchStore, SplitSpec, StoreSource
    from histoscreen.runtime import Predictor

    if "+" in name:  # an ensemble: the mean of its members' logits
        members = [fold_logits(member, store_path, work, folds) for member in name.split("+")]
        return [Fold(np.mean([m[i].views for m in members], axis=0), *(getattr(members[0][i], f) for f in ("labels", "patients", "xs", "ys")))
                for i in range(folds)]
    store = PatchStore(store_path)
    result = []
    for fold, model in enumerate(train_folds(name, store_path, work, folds), start=1):
        cache = model / "held-out-logits.npz"
        if not cache.exists():
            held_out = SplitSpec("kfold", folds=folds, fold=fold, seed=0).resolve(store.patient_table()).val
            batch = StoreSource(store, held_out).read_all()
            views = Predictor(model, tta=True).view_logits(batch.pixels)
            np.savez(cache, views=views.astype(np.float32), labels=batch.labels, patients=batch.patients.astype(str), xs=batch.xs, ys=batch.ys)
        data = np.load(cache)
        result.append(Fold(data["views"].astype(np.float64), data["labels"], data["patients"].astype(object), data["xs"], data["ys"]))
    return result


def patches_per_second(name: str, store_path: Path, work: Path, folds: int) -> float:
    """The networks' own speed (ONNX Runtime, one view), on 8,192 store patches."""
    from histoscreen.data import PatchStore
    from histoscreen.runtime import Predictor

    patches = np.asarray(PatchStore(store_path).patches[:8192])
    seconds = 0.0
    for member in name.split("+"):
        predictor = Predictor(work / member / "fold-1")
        predictor.view_logits(patches[:256])
        started = time.perf_counter()
        predictor.view_logits(patches)
        seconds += time.perf_counter() - started
    return len(patches) / seconds


def scorings(fold: Fold) -> dict[str, dict[tuple, np.ndarray]]:
    """Every scoring to try, as candidate score arrays (the choice among them is made per
    held-out patient on the others): patch alone, slide context (radius x weight)."""
    from histoscreen.data import SlidePositions
    from histoscreen.scoring.context import CONTEXT_RADII, CONTEXT_WEIGHTS, blend_with_neighbours

    positions = SlidePositions.of(fold.patients, fold.xs, fold.ys)
    found = {}
    for mode, logits in (("plain", fold.views[0]), ("tta", fold.views.mean(0))):
        found[f"patch {mode}"] = {(): logits}
        # blending is affine-equivariant, and thresholds are monotone cuts: raw logits do
        found[f"context {mode}"] = {
            (r, w): blend_with_neighbours(logits, positions, r, w) for r in CONTEXT_RADII for w in CONTEXT_WEIGHTS
        }
    return found


def leave_one_patient_out(fold: Fold, candidates: dict[tuple, np.ndarray], rule) -> np.ndarray:
    """Each patient's calls at the candidate and threshold chosen on the other patients."""
    from histoscreen.scoring.calibration import best_balanced_accuracy, choose_threshold

    calls = np.zeros(len(fold.labels), dtype=bool)
    for patient in np.unique(fold.patients):
        held = fold.patients == patient
        rest = ~held
        key = max(candidates, key=lambda k: best_balanced_accuracy(fold.labels[rest], candidates[k][rest], rule))
        scores = candidates[key]
        calls[held] = scores[held] >= choose_threshold(fold.labels[rest], scores[rest], rule)
    return calls


def fold_figures(fold: Fold, candidates: dict[tuple, np.ndarray], rule) -> tuple[dict, np.ndarray, np.ndarray]:
    """Figures of the leave-one-patient-out calls; ROC-AUC of the candidate that fits the
    whole fold best (a threshold-free figure needs one score for all patients)."""
    from histoscreen.scoring.calibration import best_balanced_accuracy
    from histoscreen.scoring.metrics import confusion_counts, roc_auc

    calls = leave_one_patient_out(fold, candidates, rule)
    tn, fp, fn, tp = confusion_counts(fold.labels, calls)
    sensitivity, specificity = tp / max(tp + fn, 1), tn / max(tn + fp, 1)
    chosen = max(candidates, key=lambda k: best_balanced_accuracy(fold.labels, candidates[k], rule))
    return {
        "accuracy": (tp + tn) / len(calls),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "roc_auc": roc_auc(fold.labels, candidates[chosen]),
    }, calls, candidates[chosen]


def per_patient(fold_number: int, fold: Fold, calls: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"patient": fold.patients, "label": fold.labels, "call": calls})
    frame["fp"] = (frame.call & (frame.label == 0)).astype(int)
    frame["fn"] = (~frame.call & (frame.label == 1)).astype(int)
    table = frame.groupby("patient").agg(patches=("label", "size"), idc_patches=("label", "sum"), false_positives=("fp", "sum"),
                                         false_negatives=("fn", "sum")).reset_index()
    table["errors"] = table.false_positives + table.false_negatives
    table["accuracy"] = 1 - table.errors / table.patches
    table.insert(0, "fold", fold_number)
    return table


def draw_worst_slides(table: pd.DataFrame, folds: list[Fold], scores_of_fold: list[np.ndarray], calls_of_fold: list[np.ndarray],
                      store_path: Path, out: Path, per_fold: int = 5) -> None:
    from PIL import Image

    from histoscreen.data import PatchStore, StoreSource
    from histoscreen.report.pictures import heatmap_image
    from histoscreen.tasks.slides import SlideGrid, build_mosaic, mosaic_reduction

    out.mkdir(parents=True, exist_ok=True)
    store = PatchStore(store_path)
    for fold_number, fold in enumerate(folds, start=1):
        worst = table[table.fold == fold_number].nlargest(per_fold, "errors")
        for patient in worst.patient:
            slide = StoreSource(store, [patient]).read_all()
            grid = SlideGrid.of(slide)
            rows = np.flatnonzero(fold.patients == patient)  # same store order as the slide
            reduction = mosaic_reduction(grid)
            mosaic = build_mosaic(slide, grid, reduction)
            errors = int(worst[worst.patient == patient].errors.iloc[0])
            scores = 1 / (1 + np.exp(-scores_of_fold[fold_number - 1][rows]))
            heatmap_image(mosaic, grid, scores, 0.5, out / f"fold{fold_number}-{patient}-scores.png", reduction=reduction,
                          title=f"{patient}: score (outlined: called IDC), {errors} errors")
            heatmap_image(mosaic, grid, calls_of_fold[fold_number - 1][rows].astype(float), 0.5, out / f"fold{fold_number}-{patient}-calls.png",
                          reduction=reduction, title=f"{patient}: calls")
            heatmap_image(mosaic, grid, slide.labels.astype(float), 0.5, out / f"fold{fold_number}-{patient}-truth.png",
                          reduction=reduction, title=f"{patient}: truth")
            parts = [Image.open(out / f"fold{fold_number}-{patient}-{kind}.png") for kind in ("calls", "truth")]
            joined = Image.new("RGB", (sum(p.width for p in parts), max(p.height for p in parts)), "white")
            joined.paste(parts[0], (0, 0))
            joined.paste(parts[1], (parts[0].width, 0))
            joined.save(out / f"fold{fold_number}-{patient}.png")
            for kind in ("calls", "truth"):
                (out / f"fold{fold_number}-{patient}-{kind}.png").unlink()


def main() -> None:
    from histoscreen.scoring.calibration import ThresholdRule

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", nargs="*", default=["shipped"])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "cv")
    parser.add_argument("--list", action="store_true", help="list the candidates and their training options")
    parser.add_argument("--scorings", default="patch plain,patch tta,context plain,context tta", help="comma-separated (default: all four)")
    args = parser.parse_args()
    if args.list:
        for name, options in CANDIDATES.items():
            print(f"{name}: {' '.join(options)}")
        return
    for name in args.candidates:
        unknown = [m for m in name.split("+") if m not in CANDIDATES]
        if unknown:
            sys.exit(f"unknown candidate {unknown[0]!r}; --list shows them")
    store = full_store(args.work)
    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    print(f"{args.folds}-fold patient-grouped CV over the patients of {store} ({cpu_model()})")
    print(f"{'candidate':28} {'scoring':16} {'rule':10}" + "".join(f"{n:>17}" for n in ("accuracy", "sensitivity", "specificity", "bal. accuracy", "ROC-AUC")) + f"{'patches/s':>10}")
    for name in args.candidates:
        folds = fold_logits(name, store, args.work, args.folds)
        speed = patches_per_second(name, store, args.work, args.folds)
        tables = []
        for scoring in args.scorings.split(","):
            for rule_name, rule in RULES.items():
                figures, calls_of_fold, scores_of_fold = [], [], []
                for fold in folds:
                    candidates = scorings(fold)[scoring]
                    got, calls, scores = fold_figures(fold, candidates, ThresholdRule(**rule))
                    figures.append(got)
                    calls_of_fold.append(calls)
                    scores_of_fold.append(scores)
                summary = {k: (float(np.mean([f[k] for f in figures])), float(np.min([f[k] for f in figures]))) for k in figures[0]}
                results[f"{name} | {scoring} | {rule_name}"] = {"mean_worst": summary, "patches_per_second": speed}
                print(f"{name:28} {scoring:16} {rule_name:10}" + "".join(f"  {m:.4f} ({w:.3f})" for m, w in summary.values()) + f"{speed:10,.0f}", flush=True)
                if scoring == "context plain" and rule_name == "BA":
                    tables = [per_patient(i, fold, calls) for i, (fold, calls) in enumerate(zip(folds, calls_of_fold), start=1)]
                    kept = (scores_of_fold, calls_of_fold)
        table = pd.concat(tables)
        table.sort_values("errors", ascending=False).to_csv(args.work / f"per_patient-{name}.csv", index=False)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        draw_worst_slides(table, folds, *kept, store, args.work / "worst-slides" / name)


if __name__ == "__main__":
    main()
