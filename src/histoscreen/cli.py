"""The `histoscreen` command: a thin layer over the Python API.

Each command parses its arguments, calls one API function with a progress bar, and
returns the lines of its summary, printed once the bar is gone; it exits 0; any HistoscreenError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from tqdm import tqdm

from histoscreen import HistoscreenError, __version__
from histoscreen.progress import Progress, silent

EXIT_USAGE_OR_INPUT = 2
CONTEXT_HELP = "blend each patch's score with its neighbours' on the slide (the model's slide-context calibration)"


class ProgressBar:
    """A Progress drawn with tqdm on stderr, one bar per stage."""

    def __init__(self) -> None:
        self._bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=stage, unit="", file=sys.stderr, leave=False)
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def _command_prepare(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.data import prepare

    summary = prepare(
        args.source, args.out, workers=args.workers, strict=args.strict, overwrite=args.overwrite, progress=progress
    )
    return summary.lines()


def _command_synth(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.data import synthesize

    slides = synthesize(
        args.out,
        patients=args.patients,
        seed=args.seed,
        first_index=args.first_index,
        doubled=args.doubled,
        overwrite=args.overwrite,
        progress=progress,
    )
    patches = sum(s.patches for s in slides)
    idc = sum(s.idc_patches for s in slides)
    return [
        f"SYNTHETIC slides (not real tissue) written to {args.out}",
        f"{len(slides)} slides, patients {slides[0].patient}..{slides[-1].patient}: {patches:,} patches, "
        f"{idc:,} IDC ({idc / max(patches, 1):.0%})" + (", every patch twice as in the Kaggle archive" if args.doubled else ""),
    ]


def _command_splits(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.data import PatchStore, csv_split, kfold_splits, official_split
    from histoscreen.data.splits import SPLIT_NAMES, official_lists

    store = PatchStore(args.store)
    if args.scheme == "official":
        splits = [official_split(store.patients, extra_to_train=args.extra_to_train)]
    elif args.scheme == "kfold":
        splits = kfold_splits(
            store.patient_table(), args.folds, seed=args.seed, exclude=official_lists()["test"]
        )
    else:
        if args.csv is None:
            raise HistoscreenError("--scheme csv needs --csv PATH")
        splits = [csv_split(args.csv)]
    table = store.patient_table().set_index("patient")
    lines = []
    for split in splits:
        lines.append(f"{split.name}:")
        for name in SPLIT_NAMES:
            members = [p for p in split.patients(name) if p in table.index]
            patches = int(table.loc[members, "patches"].sum()) if members else 0
            idc = int(table.loc[members, "idc_patches"].sum()) if members else 0
            lines.append(f"  {name:5s} {len(members):4d} patients  {patches:8,d} patches  {idc:7,d} IDC")
        unassigned = [p for p in store.patients if split.split_of(p) is None]
        if unassigned:
            lines.append(f"  not in any split: {len(unassigned)} patients")
    if args.out:
        import pandas as pd

        from histoscreen.atomic import atomic_write_text

        frames = [s.to_frame().assign(round=s.name) for s in splits]
        atomic_write_text(args.out, pd.concat(frames).to_csv(index=False))
        lines.append(f"written: {args.out}")
    return lines


def _split_options(args: argparse.Namespace) -> dict:
    return {
        "extra_to_train": getattr(args, "extra_to_train", False),
        "folds": args.folds,
        "fold": args.fold,
        "seed": args.split_seed,
        "csv_path": args.split_csv,
    }


def _add_split_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split-scheme", choices=["official", "kfold", "csv"], default="official",
                        help="official 84/29/49 lists (default), a k-fold round, or --split-csv")
    parser.add_argument("--folds", type=int, default=5, help="kfold: number of folds (default 5)")
    parser.add_argument("--fold", type=int, default=1, help="kfold: the round whose held-out fold is val (1-based)")
    parser.add_argument("--split-seed", type=int, default=0, help="kfold: seed of the fold assignment")
    parser.add_argument("--split-csv", help="csv: file with columns patient,split")


def _command_train(args: argparse.Namespace, progress: Progress) -> list[str]:
    import json

    from histoscreen.training import TrainConfig, train

    options = _split_options(args)
    config = TrainConfig(
        architecture=args.arch,
        architecture_kwargs=json.loads(args.arch_kwargs) if args.arch_kwargs else {},
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        balance=args.balance,
        stain_jitter=args.stain_jitter,
        seed=args.seed,
        split=args.split_scheme,
        extra_to_train=options["extra_to_train"],
        folds=args.folds,
        fold=args.fold,
        split_seed=args.split_seed,
        split_csv=args.split_csv,
        min_sensitivity=args.min_sensitivity,
        max_train_patches=args.max_train_patches,
        device=args.device,
        threads=args.threads,
    )
    lines: list[str] = []
    log = (lambda line: None) if args.quiet else (lambda line: tqdm.write(line, file=sys.stderr))
    command = "histoscreen " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = train(args.store, args.out, config, resume=args.resume, progress=progress, log=log, command=command)
    validation = result.metadata.validation["plain"]
    lines.append(f"model: {result.model_path}")
    lines.append(
        f"val patients ({validation['patches']:,} patches), threshold {result.metadata.threshold:.4f}: "
        f"accuracy {validation['accuracy']:.4f}, balanced accuracy {validation['balanced_accuracy']:.4f}, "
        f"sensitivity {validation['sensitivity']:.4f}, specificity {validation['specificity']:.4f}, "
        f"AUC {validation['roc_auc']:.4f}"
    )
    return lines + _context_lines(result.metadata)


def _context_lines(metadata) -> list[str]:
    if not metadata.context:
        return []
    validation = metadata.validation["context_plain"]
    return [
        f"with slide context (radius {metadata.context['radius']}, weight {metadata.context['weight']}), threshold "
        f"{metadata.context['threshold']:.4f}: accuracy {validation['accuracy']:.4f}, balanced accuracy "
        f"{validation['balanced_accuracy']:.4f}, sensitivity {validation['sensitivity']:.4f}, specificity "
        f"{validation['specificity']:.4f}, AUC {validation['roc_auc']:.4f}"
    ]


def _command_calibrate(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.inference import shipped_model_path
    from histoscreen.training import recalibrate

    options = {k: v for k, v in _split_options(args).items() if k != "extra_to_train"}
    metadata, path = recalibrate(
        args.store, args.model or shipped_model_path(), args.out, scheme=args.split_scheme, split_options=options,
        min_sensitivity=args.min_sensitivity, device=args.device,
    )
    validation = metadata.validation["plain"]
    return [
        f"model: {path}",
        f"calibrated on {len(metadata.validation['patients'])} {metadata.validation['split']} patients "
        f"({validation['patches']:,} patches), threshold {metadata.threshold:.4f}: accuracy {validation['accuracy']:.4f}, "
        f"balanced accuracy {validation['balanced_accuracy']:.4f}, sensitivity {validation['sensitivity']:.4f}, "
        f"specificity {validation['specificity']:.4f}",
        *_context_lines(metadata),
    ]


def _command_evaluate(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.inference import evaluate

    report = evaluate(
        args.store, args.out, model=args.model, split=args.split, scheme=args.split_scheme,
        split_options={k: v for k, v in _split_options(args).items() if k != "extra_to_train"},
        tta=args.tta, context=args.context, bootstrap_rounds=args.bootstrap, device=args.device, backend=args.backend,
        overwrite=args.overwrite, progress=progress,
    )
    measured, metrics, ci = report["measured_on"], report["metrics"], report["confidence_95"]
    lines = [f"{measured['split']}: {measured['patients']} patients, {measured['patches']:,} patches ({measured['idc_patches']:,} IDC)"]
    for name in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc"):
        lines.append(f"  {name:18s} {metrics[name]:.4f}  (95% CI {ci[name][0]:.4f}-{ci[name][1]:.4f}, patient bootstrap)")
    lines.append(f"  {'brier':18s} {metrics['brier']:.4f}")
    lines.append(f"  {'ece':18s} {metrics['ece']:.4f}")
    lines.append(f"written: {args.out}/metrics.json, per_patient.csv, " + ", ".join(report["plots"]))
    return lines


def _command_predict(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.inference import predict

    summary = predict(
        args.inputs, args.out, model=args.model, tta=args.tta, context=args.context, batch_size=args.batch_size,
        workers=args.workers, device=args.device, backend=args.backend, progress=progress,
    )
    return summary.lines()


def _command_screen(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.screening import screen

    result = screen(
        args.input, args.out, model=args.model, tta=args.tta, context=False if args.no_context else None, um_per_px=args.um_per_px, labels_csv=args.labels,
        use_name_labels=not args.ignore_name_labels, device=args.device, backend=args.backend, workers=args.workers,
        overwrite=args.overwrite, progress=progress,
    )
    return result.lines()


def _command_export(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.backends import export_model
    from histoscreen.inference import shipped_model_path

    written = export_model(args.model or shipped_model_path(), args.out, format=args.format, um_per_px=args.um_per_px)
    return [f"written: {path}" for path in written]


def _add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                        help="auto (default): ONNX Runtime on CPU when installed, else torch")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

    parser = argparse.ArgumentParser(
        prog="histoscreen",
        description="Screen breast histopathology patches for invasive ductal carcinoma (IDC).",
    )
    parser.add_argument("--version", action="version", version=f"histoscreen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = commands.add_parser(
        "prepare",
        parents=[common],
        help="pack a folder of Kaggle-layout patch PNGs into a patch store",
        description="Scan SOURCE (the Kaggle archive, IDC_regular_ps50_idx5/, one patient folder or a loose "
        "folder of patches) and write a packed store to OUT. Invalid files are listed in OUT/rejects.csv.",
    )
    prepare.add_argument("source", help="folder holding patch PNGs, searched recursively")
    prepare.add_argument("out", help="store folder to create")
    prepare.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    prepare.add_argument("--strict", action="store_true", help="fail on any rejected file or conflicting duplicate")
    prepare.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new store is complete)")
    prepare.set_defaults(run=_command_prepare)

    synth = commands.add_parser(
        "synth",
        parents=[common],
        help="write SYNTHETIC H&E-like slides as patches in the Kaggle layout (for tests and demos)",
        description="Generate synthetic whole-mount slides (patient ids from 900000) and cut them into 50x50 "
        "patches in the Kaggle layout. Not real tissue.",
    )
    synth.add_argument("out", help="folder to create")
    synth.add_argument("--patients", type=int, default=4, help="number of slides (default 4)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--first-index", type=int, default=0, help="first patient is 900000 + this (default 0)")
    synth.add_argument("--doubled", action="store_true", help="also write every patch under IDC_regular_ps50_idx5/, like the Kaggle archive")
    synth.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    synth.set_defaults(run=_command_synth)

    splits = commands.add_parser(
        "splits",
        parents=[common],
        help="show (and optionally save) a patient-level split of a store",
        description="Show the patients and patches per split. Every split is by patient and checked for overlap.",
    )
    splits.add_argument("store", help="a store written by 'histoscreen prepare'")
    splits.add_argument("--scheme", choices=["official", "kfold", "csv"], default="official")
    splits.add_argument("--extra-to-train", action="store_true", help="official: add patients outside the official lists to train")
    splits.add_argument("--folds", type=int, default=5, help="kfold: number of folds (default 5); official test patients are left out")
    splits.add_argument("--seed", type=int, default=0, help="kfold: random seed (default 0)")
    splits.add_argument("--csv", help="csv: file with columns patient,split")
    splits.add_argument("--out", help="write the split(s) as CSV: patient,split,round")
    splits.set_defaults(run=_command_splits)

    train = commands.add_parser(
        "train",
        parents=[common],
        help="train an IDC model on a store's train patients, select and calibrate on its val patients",
        description="Train on the train patients of a patient split, keep the epoch with the best val balanced "
        "accuracy, then fit temperature and threshold on the val patients. Writes OUT/model.safetensors + "
        "model.json, OUT/metrics.jsonl and a checkpoint every epoch (OUT/checkpoints).",
    )
    train.add_argument("store", help="a store written by 'histoscreen prepare'")
    train.add_argument("--out", required=True, help="model folder to create (or to resume)")
    train.add_argument("--arch", default="compact", help="architecture: compact (default) or residual")
    train.add_argument("--arch-kwargs", help='architecture options as JSON, e.g. \'{"widths": [16, 32, 48, 64]}\'')
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW (default 2e-3)")
    train.add_argument("--weight-decay", type=float, default=0.05)
    train.add_argument("--warmup-epochs", type=float, default=1.0)
    train.add_argument("--balance", choices=["weighted", "sampler", "none"], default="weighted",
                       help="class imbalance: weighted loss (default), balanced sampling, or neither")
    train.add_argument("--stain-jitter", type=float, default=0.05, help="HED stain jitter strength; 0 for none (default 0.05)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--extra-to-train", action="store_true", help="official split: add patients outside the lists to train")
    _add_split_arguments(train)
    train.add_argument("--min-sensitivity", type=float, help="threshold: highest specificity with at least this sensitivity")
    train.add_argument("--max-train-patches", type=int, help="train on a seeded subsample of this many patches")
    train.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    train.add_argument("--threads", type=int, help="CPU threads for torch")
    train.add_argument("--resume", action="store_true", help="continue a killed run in OUT where it stopped")
    train.set_defaults(run=_command_train)

    calibrate = commands.add_parser(
        "calibrate",
        parents=[common],
        help="refit a model's temperature, threshold and slide context on the val patients of a store",
        description="Write a copy of MODEL whose calibration, threshold and slide-context settings are fitted on the "
        "val patients of STORE (for example a lab's own labelled patients in a csv split). The weights are unchanged.",
    )
    calibrate.add_argument("store", help="a store written by 'histoscreen prepare'")
    calibrate.add_argument("--model", help="model to start from (default: the shipped model)")
    calibrate.add_argument("--out", required=True, help="model file (.safetensors) or folder to write")
    _add_split_arguments(calibrate)
    calibrate.add_argument("--min-sensitivity", type=float, help="threshold: highest specificity with at least this sensitivity")
    calibrate.add_argument("--device", default="auto")
    calibrate.set_defaults(run=_command_calibrate)

    evaluate = commands.add_parser(
        "evaluate",
        parents=[common],
        help="metrics with patient-bootstrap confidence intervals, per-patient table and plots",
        description="Evaluate a model on the patients of one split of a store, at the model's own threshold.",
    )
    evaluate.add_argument("store", help="a store written by 'histoscreen prepare'")
    evaluate.add_argument("--model", help="model (.safetensors with its .json, or a folder); default: the shipped model")
    evaluate.add_argument("--split", choices=["train", "val", "test"], default="test")
    _add_split_arguments(evaluate)
    evaluate.add_argument("--out", required=True, help="folder for metrics.json, per_patient.csv and plots")
    evaluate.add_argument("--tta", action="store_true", help="average the 8 dihedral views")
    evaluate.add_argument("--context", action="store_true", help=CONTEXT_HELP)
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for the 95%% intervals")
    evaluate.add_argument("--device", default="auto")
    _add_backend_argument(evaluate)
    evaluate.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    evaluate.set_defaults(run=_command_evaluate)

    predict = commands.add_parser(
        "predict",
        parents=[common],
        help="IDC probability and call for every patch of stores, folders or files",
        description="Write a CSV with one row per patch: path,patient,x,y,prob_idc,pred. Folders are searched "
        "recursively; files that are not valid patches are listed in OUT.rejects.csv.",
    )
    predict.add_argument("inputs", nargs="+", help="packed stores, folders of patch PNGs, or PNG files")
    predict.add_argument("--out", required=True, help="CSV file to write")
    predict.add_argument("--model", help="model (.safetensors with its .json, or a folder); default: the shipped model")
    predict.add_argument("--tta", action="store_true", help="average the 8 dihedral views")
    predict.add_argument("--context", action="store_true", help=CONTEXT_HELP + " (all patches are read before any row is written)")
    predict.add_argument("--batch-size", type=int, default=256, help="patches per forward pass (default 256: as fast here as larger batches, with a quarter of the memory)")
    predict.add_argument("--workers", type=int, help="decoding processes for PNG input (default: all cores)")
    predict.add_argument("--device", default="auto")
    _add_backend_argument(predict)
    predict.set_defaults(run=_command_predict)

    screen = commands.add_parser(
        "screen",
        parents=[common],
        help="screen a batch of slides: heatmaps, tumour burden, triage ranking, explanations, HTML report",
        description="Rebuild every slide in INPUT from its patches, predict IDC, and write REPORT_DIR/index.html "
        "(open it from disk), slides.csv, slides.json, errors.csv and per-slide heatmaps, GeoJSON regions and "
        "Grad-CAM explanations. A screening aid, not a diagnosis.",
    )
    screen.add_argument("input", help="a Kaggle-layout folder (one patient or many), a folder of named patches, or a store")
    screen.add_argument("--out", required=True, help="report folder to create")
    screen.add_argument("--model", help="model (.safetensors with its .json, or a folder); default: the shipped model")
    screen.add_argument("--tta", action="store_true", help="average the 8 dihedral views; flag patches whose views disagree")
    screen.add_argument("--no-context", action="store_true",
                        help="judge each patch on its own (default: blend with its neighbours when the model has a slide-context calibration)")
    screen.add_argument("--um-per-px", type=float, help="pixel size in micrometres, to report region areas in mm²")
    screen.add_argument("--labels", help="ground truth CSV with columns patient,x,y,label (else the labels in names)")
    screen.add_argument("--ignore-name-labels", action="store_true", help="the class in file names is not ground truth")
    screen.add_argument("--workers", type=int, help="decoding processes for PNG input (default: all cores)")
    screen.add_argument("--device", default="auto")
    _add_backend_argument(screen)
    screen.add_argument("--overwrite", action="store_true", help="replace REPORT_DIR if it exists")
    screen.set_defaults(run=_command_screen)

    export = commands.add_parser(
        "export",
        parents=[common],
        help="export a model to ONNX or TorchScript (with a WSInfer/QuPath config.json)",
        description="ONNX: uint8 patches (N x 50 x 50 x 3) in, IDC logits out, normalisation inside; the "
        "metadata JSON is written beside it. TorchScript: normalised float patches in, two calibrated logits "
        "(non-IDC, IDC) out, with config.json for QuPath's WSInfer extension.",
    )
    export.add_argument("model", nargs="?", help="model to export (default: the shipped model)")
    export.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    export.add_argument("--out", required=True, help="file to write (e.g. model.onnx or torchscript_model.pt)")
    export.add_argument("--um-per-px", type=float, help="pixel size for config.json (default 4.0, the Kaggle set's 2.5x)")
    export.set_defaults(run=_command_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bar = None if args.quiet else ProgressBar()
    try:
        lines = args.run(args, bar or silent)
    except HistoscreenError as error:
        print(f"histoscreen {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE_OR_INPUT
    except KeyboardInterrupt:
        print(f"histoscreen {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
