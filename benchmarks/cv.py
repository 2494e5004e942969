#!/usr/bin/env python3
"""Patient-grouped cross-validation at patch and slide level: the yardstick for new patients.

usage: python benchmarks/cv.py [RECIPE ...] [--split-seed 0] [--folds 3] [--procedures "FIT | CONTEXT | RULE",...]
       python benchmarks/cv.py RECIPE --export tests/data/cv_logits.npz
       python benchmarks/cv.py --list

All 143 patients in ../shared (`unpack.py --split everything`: the official train and val
patients at full density and 32 patients in no official list, "extra") are dealt into
folds, stratified by list, by whether the slide is complete and by IDC fraction. For each
fold, a network of RECIPE is trained exactly as the shipped one is: on the recipe's training
patients outside the fold, its best epoch picked on the official val patients outside the
fold; the fold's patients are never seen. Each scoring procedure (`Procedure` below; the
shipped one is the scoring `histoscreen train` stores with the network) is fitted on
patients outside the fold, and its calls on the fold's patients are scored as they come, at
its own threshold:

- patches: accuracy, sensitivity, specificity, balanced accuracy, ROC-AUC, for the official
  lists' patients, the extra patients, and all;
- slides (the complete ones, scoring/slides.py): burden (IDC calls / patches) against the
  true IDC fraction (Spearman, mean absolute error), IDC slides under-called (true fraction
  >= 0.20, burden below half of it), where the IDC slides rank by burden;
- density: each complete slide scored again from a third of its patches (a partial slide),
  those patches' accuracy and the slide's burden against the same patches scored whole.

Mean and worst fold of each. Choices are made on --split-seed 0; `--split-seed 1` is the
confirmation on a fold assignment no choice saw (run it once, for the final choice).

Cached under --work/seed-S: the split files, fold networks (a killed training resumes),
their logits on the held-out and val patients (8 dihedral views), so a new scoring costs
seconds. Writes --work/seed-S/results.json and per-slide-<recipe>.csv. Each network takes
about 20 min on 2 CPU cores; on CUDA training runs there by itself (--device auto).
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

from measure import cpu_model
from train_shipped_model import TRAIN_ARGS

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "idc"


@dataclass(frozen=True)
class Recipe:
    """How a network is trained: `histoscreen train` options, and which lists' patients it
    trains on (the official val patients always pick the epoch)."""

    options: tuple[str, ...]
    trains_on: tuple[str, ...]


RECIPES = {
    "with-extra": Recipe(tuple(TRAIN_ARGS), ("train", "extra")),  # the shipped recipe
    "official-train": Recipe(tuple(TRAIN_ARGS), ("train",)),
}


def list_of(patient: str) -> str:
    """'train', 'val' or 'test' for a patient of the official lists, else 'extra'."""
    from histoscreen.data.splits import official_lists

    return next((name for name, ids in official_lists().items() if patient in ids), "extra")


def population(patient: str) -> str:
    return "extra" if list_of(patient) == "extra" else "official"


def everything_store(work: Path) -> Path:
    store = work / "store"
    if not (store / "store.json").exists():
        patches = REPO / ".cache" / "real-idc" / "everything"
        subprocess.run([sys.executable, str(SHARED / "unpack.py"), str(patches), "--split", "everything"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "histoscreen.cli", "prepare", str(patches), str(store), "-q"], check=True)
    return store


@dataclass
class Patches:
    """One store's patch table, with which slides are complete."""

    patients: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    labels: np.ndarray
    complete: dict[str, bool]

    @classmethod
    def of(cls, store_path: Path) -> Patches:
        from histoscreen.data import PatchStore, SlidePositions
        from histoscreen.scoring.slides import complete_slides

        index = PatchStore(store_path).index
        patients = index["patient"].astype(str).to_numpy(dtype=object)
        xs, ys, labels = index["x"].to_numpy(), index["y"].to_numpy(), index["label"].to_numpy()
        return cls(patients, xs, ys, labels, complete_slides(SlidePositions.of(patients, xs, ys), labels))


def fold_assignment(patches: Patches, folds: int, seed: int) -> dict[str, int]:
    """Patient -> fold (1-based): patients grouped by list and completeness, ranked by IDC
    fraction within each group and dealt to folds in blocks of `folds` at random, so every
    fold holds its share of each list, of the complete slides and of the range of burden (a
    group's last, partial block goes to the folds holding the fewest patients so far)."""
    rng = np.random.default_rng(seed)
    fraction = pd.DataFrame({"patient": patches.patients, "label": patches.labels}).groupby("patient")["label"].mean()
    fold_of: dict[str, int] = {}
    for group in sorted({(list_of(p), patches.complete[p]) for p in fraction.index}):
        members = [p for p in fraction.index if (list_of(p), patches.complete[p]) == group]
        members = [members[i] for i in rng.permutation(len(members))]  # ties in IDC fraction broken at random
        members.sort(key=lambda p: fraction[p])
        for start in range(0, len(members), folds):
            block = members[start : start + folds]
            sizes = np.bincount(list(fold_of.values()), minlength=folds + 1)[1:]
            order = rng.permutation(folds) if len(block) == folds else np.lexsort((rng.random(folds), sizes))
            for patient, fold in zip(block, order):
                fold_of[patient] = int(fold) + 1
    return fold_of


def split_file(work: Path, recipe: str, fold_of: dict[str, int], fold: int) -> Path:
    """The `--split-csv` of one fold: test = the fold, val = official val patients outside it,
    train = the recipe's lists outside it."""
    path = work / "splits" / f"{recipe}-fold-{fold}.csv"
    rows = []
    for patient, assigned in sorted(fold_of.items()):
        kind = list_of(patient)
        if assigned == fold:
            rows.append((patient, "test"))
        elif kind == "val":
            rows.append((patient, "val"))
        elif kind in RECIPES[recipe].trains_on:
            rows.append((patient, "train"))
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "patient,split\n" + "".join(f"{p},{s}\n" for p, s in rows)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def training_command(recipe: str, store: Path, work: Path, fold_of: dict[str, int], fold: int) -> tuple[Path, list[str]]:
    """The fold network's folder and the `histoscreen train` command that makes it."""
    out = work / recipe / f"fold-{fold}"
    return out, [sys.executable, "-m", "histoscreen.cli", "train", str(store), "--out", str(out), *RECIPES[recipe].options,
                 "--split-scheme", "csv", "--split-csv", str(split_file(work, recipe, fold_of, fold)), "--resume", "-q"]


def train_fold(recipe: str, store: Path, work: Path, fold_of: dict[str, int], fold: int) -> Path:
    out, command = training_command(recipe, store, work, fold_of, fold)
    if not (out / "model.json").exists():
        started = time.perf_counter()
        subprocess.run(command, check=True)
        print(f"trained {recipe} fold {fold} in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return out


@dataclass
class FoldLogits:
    """One fold network's raw logits (8 dihedral views) on the fold's held-out patients and on
    its own val patients, with their place and label."""

    held_out: dict[str, np.ndarray]
    val: dict[str, np.ndarray]

    @classmethod
    def load(cls, path: Path) -> FoldLogits:
        data = np.load(path)
        return cls(*({name: data[f"{part}_{name}"] for name in ("views", "labels", "patients", "xs", "ys")} for part in ("held_out", "val")))


def fold_logits(recipe: str, store_path: Path, work: Path, fold_of: dict[str, int], fold: int) -> FoldLogits:
    from histoscreen.data import PatchStore, StoreSource
    from histoscreen.runtime import Predictor

    model = train_fold(recipe, store_path, work, fold_of, fold)
    cache = model / "logits.npz"
    if not cache.exists():
        store, predictor = PatchStore(store_path), Predictor(model, tta=True)
        saved = {}
        for part, patients in (("held_out", [p for p, f in fold_of.items() if f == fold]),
                               ("val", [p for p, f in fold_of.items() if f != fold and list_of(p) == "val"])):
            batch = StoreSource(store, patients).read_all()
            saved.update({f"{part}_views": predictor.view_logits(batch.pixels).astype(np.float32), f"{part}_labels": batch.labels,
                          f"{part}_patients": batch.patients.astype(str), f"{part}_xs": batch.xs, f"{part}_ys": batch.ys})
        np.savez(cache.with_suffix(".partial.npz"), **saved)
        cache.with_suffix(".partial.npz").rename(cache)
    return FoldLogits.load(cache)


@dataclass
class Part:
    """Logits of some patients from one network, with where each patch sits and its label."""

    views: np.ndarray  # 8 x N raw logits, the dihedral views (view 0: the patch as it is)
    labels: np.ndarray
    patients: np.ndarray
    xs: np.ndarray
    ys: np.ndarray

    @classmethod
    def of(cls, arrays: dict[str, np.ndarray]) -> Part:
        return cls(arrays["views"].astype(np.float64), arrays["labels"], arrays["patients"].astype(object), arrays["xs"], arrays["ys"])

    @classmethod
    def joined(cls, parts: list[Part]) -> Part:
        return cls(np.concatenate([p.views for p in parts], axis=1),
                   *(np.concatenate([getattr(p, name) for p in parts]) for name in ("labels", "patients", "xs", "ys")))

    def scaled(self, temperature: float, bias: float) -> Part:
        return Part(self.views / temperature + bias, self.labels, self.patients, self.xs, self.ys)

    def subset(self, rows: np.ndarray) -> Part:
        return Part(self.views[:, rows], self.labels[rows], self.patients[rows], self.xs[rows], self.ys[rows])

    @property
    def positions(self):
        from histoscreen.data import SlidePositions

        return SlidePositions.of(self.patients, self.xs, self.ys)


RULES = {
    "BA": dict(objective="balanced_accuracy"),
    "acc>=.90/.87": dict(objective="accuracy", min_sensitivity=0.90, min_specificity=0.87),
}
CONTEXTS = ("none", "blend", "learned", "monotone")
FITS = ("model", "val", "oof", "val+oof")


@dataclass(frozen=True)
class Procedure:
    """How a scoring is fitted: on which patients' logits (`fit`), with which context and
    threshold rule.

    fit "model": the scoring `histoscreen train` stored with the fold network (fitted on its
    val patients with the blend and the balanced-accuracy rule: its defaults, the shipped
    procedure), used as it is; "val": refitted on the network's own val patients, with any
    context and rule, as `histoscreen calibrate` does;
    "oof": on the out-of-fold logits of every patient outside the fold (from the other
    folds' networks, which never saw them); "val+oof": each network's logits first put on
    even odds by a temperature and bias fitted on its own val patients, then the rest
    fitted on the out-of-fold ones."""

    fit: str
    context: str
    rule: str

    @property
    def name(self) -> str:
        return f"{self.fit} | {self.context} | {self.rule}"


class Scorer:
    """Applies a fitted scoring to plain (one view) logits: probabilities and the threshold."""

    def __init__(self, procedure: Procedure, fit: Part | None, model: Path | None = None):
        from histoscreen.scoring.calibration import ThresholdRule, fit_calibration, fit_scoring, probability_threshold
        from histoscreen.scoring.metrics import sigmoid

        self.procedure, rule = procedure, ThresholdRule(**RULES[procedure.rule])
        if procedure.fit == "model":
            from histoscreen.models import load_metadata

            self.scoring = load_metadata(model).scoring
            return
        if procedure.context == "monotone":
            temperature, bias = fit_calibration(fit.labels, fit.views[0])
            self.temperature, self.bias = temperature, bias
            features = monotone_features(fit.views[0] / temperature + bias, fit.positions)
            self.linear = fit_non_negative_logistic(features, fit.labels)
            mixed = features @ self.linear[:-1] + self.linear[-1]
            self.context_temperature, self.context_bias = fit_calibration(fit.labels, mixed)
            self.threshold = probability_threshold(fit.labels, sigmoid(mixed / self.context_temperature + self.context_bias), rule)
            return
        self.scoring, _ = fit_scoring(fit.labels, fit.views[0], fit.views.mean(0), positions=fit.positions, rule=rule,
                                      context_model="learned" if procedure.context == "learned" else "blend")

    def __call__(self, part: Part) -> tuple[np.ndarray, float]:
        from histoscreen.scoring.calibration import scored
        from histoscreen.scoring.metrics import sigmoid

        if self.procedure.context == "monotone":
            mixed = monotone_features(part.views[0] / self.temperature + self.bias, part.positions) @ self.linear[:-1] + self.linear[-1]
            return sigmoid(mixed / self.context_temperature + self.context_bias), self.threshold
        return scored(self.scoring, self.scoring.plain.calibrated(part.views[0]), part.positions, tta=False,
                      context=self.procedure.context != "none")


def monotone_features(logits: np.ndarray, positions) -> np.ndarray:
    """Features that only ever rise with any patch's logit: the patch's own, its neighbours'
    mean at five radii (its own where it has none), the highest and lowest adjacent one."""
    from histoscreen.scoring.context import LEARNED_RADII, neighbourhoods

    around = neighbourhoods(logits, positions, LEARNED_RADII)
    columns = [logits] + [np.where(around[r].counts > 0, around[r].means, logits) for r in LEARNED_RADII]
    adjacent = around[1].counts > 0
    columns += [np.where(adjacent, around[1].highest, logits), np.where(adjacent, around[1].lowest, logits)]
    return np.column_stack(columns)


def fit_non_negative_logistic(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logistic regression with every feature weight >= 0 (intercept free, last)."""
    from scipy.optimize import minimize

    design = np.column_stack([features, np.ones(len(features))])
    labels = labels.astype(np.float64)

    def loss(weights):
        scaled = design @ weights
        probabilities = 1 / (1 + np.exp(-scaled))
        return np.mean(np.logaddexp(0, scaled) - labels * scaled), design.T @ (probabilities - labels) / len(labels)

    start = np.zeros(design.shape[1])
    start[0] = 1.0
    bounds = [(0, None)] * features.shape[1] + [(None, None)]
    return minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds).x


def patch_figures(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict:
    from histoscreen.scoring.metrics import classification_metrics

    found = classification_metrics(labels, probabilities, threshold)
    return {k: found[k] for k in ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "roc_auc")}


def evaluate(procedure: Procedure, folds: list[FoldLogits], patches: Patches, models: list[Path]) -> dict:
    """Every fold's held-out patients called by `procedure` fitted outside the fold; patch
    figures by population, slide figures and the density check on the complete slides."""
    from histoscreen.scoring.calibration import fit_calibration
    from histoscreen.scoring.slides import partial_slide_check, slide_burdens, slide_figures

    held = [Part.of(f.held_out) for f in folds]
    val = [Part.of(f.val) for f in folds]
    on_even_odds = [fit_calibration(v.labels, v.views[0]) for v in val]
    complete = {p for p, c in patches.complete.items() if c}
    per_fold, burdens, density = [], [], []
    sizes = []
    for k, part in enumerate(held):
        others = [j for j in range(len(held)) if j != k]
        if procedure.fit == "model":
            scorer = Scorer(procedure, None, models[k])
        elif procedure.fit == "val":
            scorer = Scorer(procedure, val[k])
        elif procedure.fit == "oof":
            scorer = Scorer(procedure, Part.joined([held[j] for j in others]))
        else:
            scorer = Scorer(procedure, Part.joined([held[j].scaled(*on_even_odds[j]) for j in others]))
            part = part.scaled(*on_even_odds[k])
        probabilities, threshold = scorer(part)
        calls = probabilities >= threshold
        figures = {}
        for name in ("official", "extra", "all"):
            rows = np.array([name == "all" or population(p) == name for p in part.patients])
            figures[name] = patch_figures(part.labels[rows], probabilities[rows], threshold)
        fold_burdens = slide_burdens(part.patients, part.labels, calls, only=complete)
        figures["slides"] = slide_figures(fold_burdens)
        per_fold.append(figures)
        burdens += fold_burdens
        checked = partial_slide_check(lambda rows: scorer(part.subset(rows)), part.patients, part.labels, complete)
        density.append(checked)
        sizes.append(sum(part.patients == slide for slide in complete).sum())
    weights = np.array(sizes) / sum(sizes)  # pooled over every complete slide's patches
    pooled = {"agreement": float(sum(w * d["agreement"] for w, d in zip(weights, density))),
              "accuracy_change": float(sum(w * d["accuracy_change"] for w, d in zip(weights, density))),
              "burden_change_mean": float(np.average([d["burden_change_mean"] for d in density], weights=[d["slides"] for d in density])),
              "burden_change_max": float(max(d["burden_change_max"] for d in density))}
    return {"per_fold": per_fold, "slides": slide_figures(burdens), "burdens": burdens, "density": pooled}


def summary_line(name: str, result: dict) -> str:
    def mean_worst(population: str, key: str) -> str:
        values = [f[population][key] for f in result["per_fold"]]
        return f"{np.mean(values):.3f} ({np.min(values):.3f})"

    slides, density = result["slides"], result["density"]
    return (f"{name:34}" + "".join(f" {mean_worst('official', k):>14}" for k in ("accuracy", "sensitivity", "specificity", "roc_auc"))
            + "".join(f" {mean_worst('extra', k):>14}" for k in ("sensitivity", "specificity"))
            + f" {slides['spearman']:8.3f} {slides['burden_mae']:6.3f} {len(slides['under_called']):3d} {slides['worst_idc_rank']:3d}/{slides['slides']}"
            + f" {density['accuracy_change']:+7.3f} {density['burden_change_mean']:6.3f} {density['burden_change_max']:6.3f}")


HEADER = (f"{'fit | context | rule':34}" + "".join(f" {n:>14}" for n in ("off. accuracy", "off. sens.", "off. spec.", "off. ROC-AUC", "extra sens.", "extra spec."))
          + f" {'Spearman':>8} {'MAE':>6} {'und':>3} {'rank':>6} {'dens.acc':>7} {'dBurd':>6} {'max':>6}")


def export_logits(path: Path, recipe: str, folds: list[FoldLogits], patches: Patches, split_seed: int, config: dict) -> None:
    """The fold networks' logits as a small file the test suite reads (tests/data/cv_logits.npz):
    per fold, its held-out patients (part 0) and its network's val patients (part 1), with
    one view's logit and the mean of the 8 dihedral views', place, label and which slides are
    complete, and the fold networks' training settings (their split aside). Logits and names
    only, no pixels."""
    from histoscreen.data.naming import grid_index

    rows = []
    for fold, logits in enumerate(folds, start=1):
        for part_number, part in enumerate((Part.of(logits.held_out), Part.of(logits.val))):
            rows.append(pd.DataFrame({"fold": fold, "part": part_number, "patient": part.patients.astype(str),
                                      "column": grid_index(part.xs), "row": grid_index(part.ys), "label": part.labels,
                                      "plain": part.views[0], "tta": part.views.mean(0)}))
    table = pd.concat(rows, ignore_index=True)
    names = np.array(sorted(set(table.patient), key=lambda p: (len(p), p)))
    code = {name: number for number, name in enumerate(names)}
    np.savez_compressed(
        path, recipe=recipe, split_seed=split_seed, training_config=json.dumps({k: v for k, v in config.items() if k != "split"}), names=names, complete=np.array([patches.complete[n] for n in names]),
        population=np.array([population(n) for n in names]), patient=np.array([code[p] for p in table.patient], dtype=np.int16),
        fold=table.fold.to_numpy(np.int8), part=table.part.to_numpy(np.int8), column=table.column.to_numpy(np.int16),
        row=table.row.to_numpy(np.int16), label=table.label.to_numpy(np.int8), plain=table.plain.to_numpy(np.float32),
        tta=table.tta.to_numpy(np.float32))
    print(f"wrote {path}: {len(table):,} logits of {len(names)} patients ({path.stat().st_size / 2**20:.2f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=["with-extra"])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "cv")
    parser.add_argument("--train-only", action="store_true", help="train (and cache logits), evaluate nothing")
    parser.add_argument("--export", type=Path, help="write the first recipe's fold logits here (tests/data/cv_logits.npz)")
    parser.add_argument("--procedures", help="comma-separated 'fit | context | rule' (default: every one)")
    parser.add_argument("--list", action="store_true", help="list the recipes")
    args = parser.parse_args()
    if args.list:
        for name, recipe in RECIPES.items():
            print(f"{name}: trains on {'+'.join(recipe.trains_on)}: {' '.join(recipe.options)}")
        return
    for name in args.recipes:
        if name not in RECIPES:
            sys.exit(f"unknown recipe {name!r}; --list shows them")
    store = everything_store(args.work)
    patches = Patches.of(store)
    work = args.work / f"seed-{args.split_seed}"
    fold_of = fold_assignment(patches, args.folds, args.split_seed)
    print(f"{args.folds}-fold patient-grouped CV, split seed {args.split_seed}, {len(fold_of)} patients of {store} ({cpu_model()})", flush=True)
    for name in args.recipes:
        for fold in range(1, args.folds + 1):
            fold_logits(name, store, work, fold_of, fold)
    if args.train_only:
        return
    if args.export:
        export_logits(args.export, args.recipes[0], [fold_logits(args.recipes[0], store, work, fold_of, f) for f in range(1, args.folds + 1)],
                      patches, args.split_seed, json.loads((work / args.recipes[0] / "fold-1" / "model.json").read_text())["training"]["config"])
        return
    wanted = [Procedure(*name.split(" | ")) for name in args.procedures.split(",")] if args.procedures else \
        [Procedure("model", "blend", "BA")] + [Procedure(fit, context, rule) for fit in FITS[1:] for context in CONTEXTS for rule in RULES]
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.recipes:
        folds = [fold_logits(name, store, work, fold_of, fold) for fold in range(1, args.folds + 1)]
        print(f"\n{name}: mean (worst fold) over the held-out patients; slides: the {sum(patches.complete.values())} complete ones pooled")
        print(HEADER)
        slides = []
        for procedure in wanted:
            result = evaluate(procedure, folds, patches, [work / name / f"fold-{fold}" for fold in range(1, args.folds + 1)])
            print(summary_line(procedure.name, result), flush=True)
            results[f"{name} | {procedure.name}"] = {k: v for k, v in result.items() if k != "burdens"}
            slides += [{"procedure": procedure.name, "slide": b.slide, "true_fraction": b.true_fraction, "burden": b.burden,
                        "under_called": b.under_called} for b in result["burdens"]]
        pd.DataFrame(slides).to_csv(work / f"per-slide-{name}.csv", index=False)
        results_path.write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
