#!/usr/bin/env python3
"""Reproduce the shipped model from the real patches in ../shared/data/idc, in one command.

usage: python benchmarks/train_shipped_model.py [--work DIR] [--install]

Unpacks the official train patients and half of each official val patient, packs them,
trains four networks of the same recipe on the train patients with seeds 0-3 (the teachers;
the best epoch chosen on those val patches), then the shipped network: the same recipe
taught by the four (`--teacher` x4 `--distil-weight 0.5`: trained on the mean of the label
and the teachers' probability), then fits the
calibration, threshold and learned slide context on every patch of the val patients
(`histoscreen calibrate`; test patients are never seen), evaluates on the val patients patch
alone and with slide context, each with and without dihedral TTA, and writes a model card. With --install the model and its card are copied
into src/histoscreen/models/shipped/, which is how the shipped model was made.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "idc"
SHIPPED = REPO / "src" / "histoscreen" / "models" / "shipped"
NAME = "idc-residual"
# How the shipped scoring is fitted on every patch of the val patients (see the model card).
CALIBRATE_ARGS = [
    "--context-model", "learned",
    "--threshold-objective", "accuracy", "--min-sensitivity", "0.90", "--min-specificity", "0.87",
]

# The settings of the shipped model (see MODEL_CARD.md for how they were chosen).
TRAIN_ARGS = [
    "--arch", "residual",
    "--arch-kwargs", '{"widths": [32, 64, 96], "blocks": [1, 1, 1], "stem": 16}',
    "--epochs", "20",
    "--balance", "weighted",
    "--stain-jitter", "0.05",
    "--seed", "0",
]
# The shipped network is TRAIN_ARGS taught by the ensemble of TRAIN_ARGS with these seeds.
TEACHER_SEEDS = (0, 1, 2, 3)
DISTIL_WEIGHT = "0.5"


def teacher_args(seed: int) -> list[str]:
    at = TRAIN_ARGS.index("--seed")
    return [*TRAIN_ARGS[:at], *TRAIN_ARGS[at + 2 :], "--seed", str(seed)]


def teacher_folder(work: Path, seed: int) -> Path:
    return work / (NAME if seed == 0 else f"{NAME}-seed{seed}")


def student_args(work: Path) -> list[str]:
    teachers = [option for seed in TEACHER_SEEDS for option in ("--teacher", str(teacher_folder(work, seed)))]
    return [*TRAIN_ARGS, *teachers, "--distil-weight", DISTIL_WEIGHT]


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


MODES = {  # card label: (evaluate options, folder)
    "patch alone": (["--no-context"], "val-plain"),
    "patch alone, dihedral TTA": (["--tta", "--no-context"], "val-tta"),
    "slide context": (["--context"], "val-context"),
    "slide context, dihedral TTA": (["--context", "--tta"], "val-context-tta"),
}


def model_card(metadata: dict, evaluations: dict[str, dict]) -> str:
    training, norm, validation = metadata["training"], metadata["normalisation"], metadata["validation"]
    scoring = metadata["scoring"]
    context, plain, tta = scoring["context"], scoring["plain"], scoring["tta"]
    context_plain, context_tta = scoring["context_plain"], scoring["context_tta"]
    rows = []
    for mode, report in evaluations.items():
        m, ci = report["metrics"], report["confidence_95"]
        rows.append(
            f"| {mode} | {report['threshold']:.4f} | {m['accuracy']:.4f} | {m['balanced_accuracy']:.4f} "
            f"({ci['balanced_accuracy'][0]:.3f}-{ci['balanced_accuracy'][1]:.3f}) | {m['sensitivity']:.4f} | "
            f"{m['specificity']:.4f} | {m['f1']:.4f} | {m['roc_auc']:.4f} ({ci['roc_auc'][0]:.3f}-{ci['roc_auc'][1]:.3f}) | "
            f"{m['ece']:.4f} |"
        )
    estimates = []
    for mode, label in (("plain", "plain"), ("tta", "dihedral TTA")):
        for kind, name in (("patch", "patch alone"), ("context", "slide context")):
            e = validation["leave_one_patient_out"][mode][kind]
            estimates.append(
                f"| {name}, {label} | {e['accuracy']:.4f} | {e['balanced_accuracy']:.4f} | {e['sensitivity']:.4f} | {e['specificity']:.4f} |"
            )
    return f"""# Model card: {NAME}

The model `histoscreen predict`, `evaluate` and `screen` use when no `--model` is given. A
screening aid for invasive ductal carcinoma (IDC) in 50x50 px H&E patches of breast tissue
(the Kaggle "Breast Histopathology Images" set); not a diagnosis.

## Architecture and input
- `{metadata['architecture']}` with {json.dumps(metadata['architecture_kwargs'])}: {training['parameters']:,} parameters,
  {training['flops_per_patch'] / 1e6:.1f} MFLOPs per patch (conv and linear, x2 for multiply-add).
- Input: RGB uint8 patch, edge patches padded with white to 50x50, scaled to [0, 1], then
  normalised with mean {norm['mean']} and std {norm['std']} (measured on the train patches).
- Output: one logit; the patch's calibrated logit is `z = logit / T + b`.
- Patch alone (`predict`, `evaluate`): `prob_idc = sigmoid(z)`, IDC when `prob_idc >= threshold`.
- Slide context (the default of `predict`, `evaluate` and `screen` wherever patches have a
  place; `--no-context` turns it off): the learned context, a logistic regression fitted on
  the val patients over {len(context['linear']) - 1} features of z on the patch's slide (src/histoscreen/scoring/context.py:
  the patch's z; the mean z of the other patches within 1, 2, 3, 5 and 8 grid steps and
  what share of those cells hold tissue; the highest and lowest adjacent z; the spread of
  the 5x5 window; the slide's median, 10th and 90th percentile z and mean probability), gives
  `m`; then `prob_idc = sigmoid(m / Tc + bc)`, IDC when `prob_idc >= threshold`. A patch whose
  name gives no place keeps `m = z`. The weights are in the model's JSON (`scoring.context.linear`).

| mode | T | b | context Tc | context bc | threshold | context threshold |
|---|---:|---:|---:|---:|---:|---:|
| plain | {plain['temperature']:.4f} | {plain['bias']:.4f} | {context_plain['temperature']:.4f} | {context_plain['bias']:.4f} | {plain['threshold']:.4f} | {context_plain['threshold']:.4f} |
| dihedral TTA (`--tta`) | {tta['temperature']:.4f} | {tta['bias']:.4f} | {context_tta['temperature']:.4f} | {context_tta['bias']:.4f} | {tta['threshold']:.4f} | {context_tta['threshold']:.4f} |

Threshold rule: {validation['threshold_rule']}, chosen on the val patients: hold
sensitivity at 0.90 (a screening aid should miss few IDC patches), then be as accurate as
possible (section "The shipped model and scoring, by cross-validation" for why). The learned context was fitted there too.

## Training data
- Train: {len(training['train_patients'])} official train patients (Janowczyk & Madabhushi 2016 lists; 8915 and 9024
  are missing from the recovered data), {training['train_patches']:,} patches, {training['train_idc_patches']:,} IDC.
- Selection of the best epoch: {len(training['val_patients'])} official val patients, the half of each patient's
  recovered patches in ../shared ({training['val_patches']:,} patches, {training['val_idc_patches']:,} IDC).
- Calibration, threshold and learned context: the same {len(validation['patients'])} val patients at full density (every
  recovered patch, {validation['metrics']['plain']['patches']:,}), as on a whole slide: the context looks 8 patches out.
- Test patients: never seen, never used for any choice.
- Augmentation: the 8 dihedral transforms, HED stain jitter, mild brightness and contrast.
- Best epoch {training['best_epoch']} of {training['config']['epochs']} by val balanced accuracy.

## How it was made
- Teachers: {len(TEACHER_SEEDS)} networks of the same architecture and recipe with seeds {', '.join(map(str, TEACHER_SEEDS))}
  (`histoscreen train STORE --out TEACHER {' '.join(shlex.quote(a) for a in teacher_args(1))}`, the seed
  changed; seed 0 is the network shipped before, trained on this 2-core CPU).
- The shipped network, distilled from them: `{training['command']}`, seed {training['config']['seed']}. It trains
  on `(1 - {training['config']['distil_weight']}) * label + {training['config']['distil_weight']} * p`, with `p` the sigmoid of the teachers' mean
  logit over the 8 dihedral views: one network, as fast as each teacher, that learned from
  the ensemble where the labels are least sure.
- Teachers 1-{len(TEACHER_SEEDS) - 1} and the shipped network were trained on {training['machine']} (torch {training['torch']},
  bfloat16 autocast) by `benchmarks/gpu_cv.py` (its official-split jobs, ten trainings sharing
  the GPU; the command shows that machine's paths): {training['seconds'] / 60:.1f} min for this one.
  `python benchmarks/train_shipped_model.py` runs the same commands on a CPU (about 20 min per
  network on this 2-core machine, plus about 12 min for the teachers' scores); runs are
  seeded but not bit-identical across machines.
- Then: `histoscreen calibrate STORE_OF_EVERY_PATCH --model MODEL --out SHIPPED {' '.join(CALIBRATE_ARGS)}`
  (weights unchanged; about 2 min).

## Validation results (official val patients, every patch; the threshold and the context were fitted here, so expect new patients to be lower)
95% intervals from 1000 patient bootstrap resamples.

| mode | threshold | accuracy | balanced accuracy (95% CI) | sensitivity | specificity | F1 | ROC-AUC (95% CI) | ECE |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

These are in-sample for the context (its weights were fitted on these patches); the
leave-one-patient-out table below and the cross-validation further down are the honest ones.

### How the val-chosen settings carry over to a new patient
The figures above use settings chosen on the same patients. Leave one patient out: for
each of the {validation['leave_one_patient_out']['plain']['patch']['patients']} val patients, fit the threshold (and, with context, the learned
context) on the other {validation['leave_one_patient_out']['plain']['patch']['patients'] - 1}, then call that patient's patches; pooled over all of them:

| scoring | accuracy | balanced accuracy | sensitivity | specificity |
|---|---:|---:|---:|---:|
{chr(10).join(estimates)}

## What was tried (same data, same val patients, seed 0, this 2-core machine)
Balanced accuracy and ROC-AUC on the val patients, patch alone / with slide context (the
context fitted by `histoscreen calibrate` on the same val patients).

| run | MFLOPs | training | balanced accuracy | ROC-AUC | sensitivity / specificity |
|---|---:|---:|---:|---:|---:|
| compact 16-32-48-64, weighted loss, HED jitter 0.05, 14 epochs (shipped before) | 18 | 7 min | 0.893 / 0.922 | 0.956 / 0.969 | 0.902 / 0.883, 0.935 / 0.909 |
| same, balanced sampling instead of a weighted loss | 18 | 7 min | 0.893 / - | 0.953 / - | 0.903 / 0.882 |
| compact 16-32-48-64, HED jitter 0.15, 24 epochs | 18 | 10 min | 0.897 / 0.929 | 0.958 / 0.977 | 0.908 / 0.886, 0.965 / 0.893 |
| residual 32-64-96, one block per stage, HED jitter 0.05, 20 epochs (first run) | 54 | 25 min | 0.898 / 0.931 | 0.960 / 0.977 | 0.922 / 0.873, 0.941 / 0.920 |
| **the same command again (shipped)** | 54 | 18 min | 0.898 / 0.927 | 0.958 / 0.975 | 0.909 / 0.886, 0.932 / 0.923 |

Training is seeded, but two runs of the same command on this CPU are not bit-identical
(the losses part in the fourth decimal from epoch 2, from the order of threaded floating-point
sums), so the best epoch moved from 18 to 15; the val figures agree to within half a point.
Weighted loss and balanced sampling tie, so the simpler weighted loss stays the default.
Patch alone, no network here reaches the project's val targets (accuracy 0.92, sensitivity
and specificity 0.90, ROC-AUC 0.96 together): specificity falls short, as the issue
foresaw. With slide context the residual network reaches all four, also in the
leave-one-patient-out estimate; the compact ones do not reach accuracy 0.92 without TTA.
The residual network costs 3x the FLOPs of the compact one; it still screens thousands of
patches per second on a laptop-class CPU (README, "Fast inference"), so it ships.

Stain augmentation strength, by 3-fold patient-grouped cross-validation over all 111
patients we have (`python benchmarks/stain_cv.py`: compact 16-32-48-64, 12 epochs, each
fold's threshold and context chosen on its own held-out patients; mean over folds, worst
fold in brackets):

| HED jitter | balanced accuracy, patch alone | ROC-AUC, patch alone | balanced accuracy, slide context | ROC-AUC, slide context |
|---:|---:|---:|---:|---:|
| 0.05 (shipped) | 0.858 (0.831) | 0.925 (0.903) | 0.884 (0.848) | 0.945 (0.919) |
| 0.15 | 0.856 (0.833) | 0.923 (0.902) | 0.886 (0.853) | 0.946 (0.922) |

No difference worth a name, so 0.05 stays. Two more lessons from it: slide context gains
1.6 to 3.6 points of balanced accuracy in every fold, not only on the official val split; and
held-out thirds of these patients are harder than the official val patients (balanced
accuracy 0.83 to 0.88 patch alone).

### How the shipped settings carry to new patients
The same 3 folds with the shipped model's exact training command (`python
benchmarks/stain_cv.py --network shipped --jitter 0.05`: 20 epochs, each fold trained on
about 74 patients, 40 min in all on this machine). Each held-out patient is called at a
threshold and context chosen on the other held-out patients of its fold, so no patient's own
labels tune its calls (the best epoch is still chosen on the fold's held-out patients); mean
over folds, worst fold in brackets:

| scoring | accuracy | balanced accuracy | sensitivity | specificity | ROC-AUC |
|---|---:|---:|---:|---:|---:|
| patch alone | 0.857 (0.831) | 0.862 (0.840) | 0.874 (0.858) | 0.850 (0.822) | 0.932 (0.919) |
| slide context | 0.877 (0.836) | 0.889 (0.856) | 0.914 (0.898) | 0.865 (0.814) | 0.954 (0.938) |

This is the most honest estimate we can make without the test patients, and it is well below
the val table: expect accuracy near 0.88, balanced accuracy near 0.89 and specificity near
0.86 with slide context on the official test patients, which meets the mission's floor for
sensitivity and specificity (0.85) but not for accuracy (above 0.90). As the issue foresaw,
the loss on new patients is mostly specificity: IDC is over-called on some patients' tissue.

Stain normalisation, in the same compact cross-validation (`python
benchmarks/slide_normalisation_cv.py`: each slide Reinhard-normalised in optical density,
its tissue pixels' per-channel mean and spread matched to those of all patients): balanced
accuracy 0.861 patch alone and 0.887 with context, ROC-AUC 0.928 and 0.951, against 0.858,
0.884, 0.925 and 0.945 without it; called at thresholds chosen on the other held-out
patients, specificity 0.833 and 0.835 against 0.836 and 0.844. Half a point on the
threshold-free figures and none where it matters (specificity on new patients) does not pay
for making every prediction depend on a whole slide's statistics, so the product does not
normalise.
### The shipped model and scoring, by cross-validation at full density (`benchmarks/cv.py`, `benchmarks/cv_learned_context.py`)
Each recipe through 3 patient-grouped folds over all 111 patients with the val patients at
full density (43,899 patches): trained on two thirds of the patients (the distilled network
taught by the four seeds trained on the same two thirds), the best epoch chosen on the
held-out third. For each fold, the context (the learned one with its calibration, or the
blend's radius and weight) is fitted on the other folds' held-out patients, whose scores came
from networks that never saw them, and each held-out patient is called at a threshold chosen
on the other held-out patients of its fold; mean over folds (worst fold):

| network, scoring, threshold rule | accuracy | sensitivity | specificity | balanced acc. | ROC-AUC |
|---|---:|---:|---:|---:|---:|
| **distilled (shipped), learned context, highest accuracy with sensitivity >= 0.90 and specificity >= 0.87** | **0.904 (0.871)** | **0.901 (0.898)** | **0.905 (0.860)** | **0.903 (0.882)** | **0.966 (0.955)** |
| distilled, learned context, highest balanced accuracy | 0.894 (0.863) | 0.933 (0.926) | 0.881 (0.842) | 0.907 (0.884) | 0.966 (0.955) |
| distilled, learned context, highest accuracy, both recalls >= 0.87 | 0.912 (0.889) | 0.869 (0.857) | 0.926 (0.900) | 0.897 (0.879) | 0.966 (0.955) |
| distilled, blend context, highest balanced accuracy | 0.894 (0.876) | 0.913 (0.889) | 0.887 (0.872) | 0.900 (0.881) | 0.962 (0.949) |
| distilled, patch alone, highest balanced accuracy | 0.870 (0.858) | 0.885 (0.876) | 0.865 (0.852) | 0.875 (0.864) | 0.944 (0.936) |
| one network (shipped before), learned context, the shipped rule | 0.902 (0.876) | 0.897 (0.894) | 0.904 (0.869) | 0.900 (0.884) | 0.964 (0.954) |
| one network, learned context, highest balanced accuracy | 0.892 (0.872) | 0.928 (0.908) | 0.880 (0.860) | 0.903 (0.884) | 0.964 (0.954) |
| one network, blend (shipped before that), highest balanced accuracy | 0.890 (0.870) | 0.923 (0.906) | 0.879 (0.858) | 0.901 (0.882) | 0.961 (0.950) |
| one network, patch alone, highest balanced accuracy | 0.864 (0.853) | 0.887 (0.858) | 0.857 (0.836) | 0.872 (0.863) | 0.941 (0.934) |
| the four teachers' ensemble (4x the compute), learned context, the shipped rule | 0.903 (0.875) | 0.894 (0.888) | 0.907 (0.871) | 0.900 (0.879) | 0.965 (0.954) |
| wider network, 48-96-144 channels, 24 epochs (2.2x the FLOPs), learned context, the shipped rule | 0.903 (0.867) | 0.901 (0.899) | 0.903 (0.855) | 0.902 (0.879) | 0.965 (0.954) |
| distilled with weight 0.8 on the teachers, learned context, the shipped rule | 0.905 (0.876) | 0.898 (0.896) | 0.907 (0.870) | 0.902 (0.883) | 0.965 (0.955) |

Three changes, each measured alone. Distillation: the one network taught by the four seeds'
ensemble separates new patients' patches better than any single seed (ROC-AUC patch alone
0.944 against 0.941-0.942 for seeds 0-3) and as well as the ensemble itself, at the speed of
one network. The learned context separates better than the blend (ROC-AUC +0.3 to +0.4
points; for the network before, at the same rule, accuracy +0.5 and specificity +0.7 at
equal sensitivity). The operating rule moves the point on that curve: accuracy weighs the classes by prevalence
(about 30% IDC), so the highest balanced accuracy sits at a sensitivity (0.93) well above
the floor the mission needs; holding sensitivity at 0.90 on the val patients and taking the
most accurate threshold above it trades 3 points of sensitivity for 2.4 of specificity at
equal balanced accuracy. The rule with both floors at 0.87 gains a little more accuracy but
gives up 3 (distilled) to 6 (before) points of sensitivity, the weak side on patients annotated broadly around
stroma-rich tumour, so the sensitivity floor is 0.90. Together: accuracy 0.904, sensitivity
0.901, specificity 0.905, ROC-AUC 0.966 on new patients, the issue's four targets (0.90,
0.87, 0.90, 0.965). The worst fold stays below 0.90 accuracy (0.871, its specificity 0.860):
the in-situ-like tumour bed of a few patients (below). The rule, the features and the
distillation weight were chosen looking at these folds, and each fold's best epoch on its
held-out patients, so the estimate is slightly optimistic. `histoscreen calibrate
--context-model learned` (or `blend`) with `--threshold-objective balanced_accuracy` gives
the other rows' scorings.
With the blend context, 80% of the distilled network's cross-validated errors are false
positives (82% before), and the same ten patients carry 45% of them: the model calls the
whole tumour bed where the annotation marks separate islands (`.cache/cv/worst-slides/`
after `benchmarks/cv.py`). Distillation cut the errors by 4% (4,584 against 4,793) but
left those ten patients the worst, in the same order: it is not learned from the patients
we have by any lever tried here.

Tried in the same CV, not shipped (README, "The shipped model"): the teachers' ensemble and
the wider network (no better than the distilled network, at 4x and 2.2x its compute), a CNN on the 11x11 window of scores
(ROC-AUC 0.962; with the blend added 0.964), soft targets near region borders (fold 1: +0.1
point ROC-AUC), and per-slide batch statistics at test time (AdaBN: mixing 30%, 60% or all
of each slide's own statistics into the batch-norm layers lowered ROC-AUC with context from
0.961 to 0.960, 0.953 and 0.926). Not tried: deeper networks and longer training (queued on
the GPU, not reached in its 15 minutes), timm backbones (timm needs torchvision, which does
not import beside the pinned torch here).

For comparison, published patient-level results on the official test patients: balanced
accuracy 0.847 and F1 0.765 (Janowczyk & Madabhushi 2016), balanced accuracy 0.890 (Romero
et al. 2019). Those are patch-alone test figures; these are val figures, and not directly
comparable.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "shipped-model")
    parser.add_argument("--install", action="store_true", help="copy the result into the package")
    args = parser.parse_args()
    if not (SHARED / "unpack.py").is_file():
        sys.exit(f"needs the real patches in {SHARED}")
    histoscreen = [sys.executable, "-m", "histoscreen.cli"]
    patches, store, model, work = REPO / ".cache" / "real-idc" / "all", args.work / "store", args.work / NAME, args.work
    every_patch, full_store, shipped = REPO / ".cache" / "real-idc" / "full", args.work / "store-full", args.work / f"{NAME}-shipped"
    run(sys.executable, str(SHARED / "unpack.py"), str(patches), "--split", "all")
    run(sys.executable, str(SHARED / "unpack.py"), str(every_patch), "--split", "full")
    if not store.exists():
        run(*histoscreen, "prepare", str(patches), str(store))
    if not full_store.exists():
        run(*histoscreen, "prepare", str(every_patch), str(full_store))
    for seed in TEACHER_SEEDS:
        teacher = teacher_folder(work, seed)
        if (teacher / "model.safetensors").exists():
            print(f"{teacher} is trained already; delete it to train again")
        else:
            run(*histoscreen, "train", str(store), "--out", str(teacher), *teacher_args(seed), "--resume")
    model = work / f"{NAME}-distilled"
    if (model / "model.safetensors").exists():
        print(f"{model} is trained already; delete it to train again")
    else:
        run(*histoscreen, "train", str(store), "--out", str(model), *student_args(work), "--resume")
    # the learned context looks 8 patches out: fit it, the calibration and the threshold on
    # the val patients' slides at full density, as a whole slide has them
    run(*histoscreen, "calibrate", str(full_store), "--model", str(model), "--out", str(shipped), *CALIBRATE_ARGS, "--overwrite")
    model = shipped
    evaluations = {}
    for mode, (extra, folder) in MODES.items():
        out = work / folder
        run(*histoscreen, "evaluate", str(full_store), "--model", str(model), "--split", "val", "--out", str(out), "--overwrite", *extra)
        evaluations[mode] = json.loads((out / "metrics.json").read_text())
    metadata = json.loads((model / "model.json").read_text())
    card = model_card(metadata, evaluations)
    (work / "MODEL_CARD.md").write_text(card)
    print(card)
    if args.install:
        SHIPPED.mkdir(parents=True, exist_ok=True)
        shutil.copy(model / "model.safetensors", SHIPPED / f"{NAME}.safetensors")
        shutil.copy(model / "model.json", SHIPPED / f"{NAME}.json")
        (SHIPPED / "MODEL_CARD.md").write_text(card)
        for plot in ("roc.png", "calibration.png", "training_curves.png"):
            shutil.copy(work / "val-plain" / plot, SHIPPED / f"val-{plot}")
        shutil.copy(work / "val-context" / "roc.png", SHIPPED / "val-context-roc.png")
        print(f"installed into {SHIPPED}")


if __name__ == "__main__":
    main()
