"""The `histoscreen` command: a thin layer over the Python API.

Each command parses its arguments, calls the API with a progress bar, hands the result to
a writer, and returns the lines of its summary, printed once the bar is gone; it exits 0.
A HistoscreenError becomes one line on stderr and exit code 2; library errors name
settings and values, and are phrased here in terms of flags.

Options come in groups, one per concept (model, scoring, split, runtime), shared by
every command that takes them, with choices and defaults taken from the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Sequence

from tqdm import tqdm

from pathlib import Path

from histoscreen import __version__
from histoscreen.atomic import check_output_file, check_output_folder
from histoscreen.checks import whole_number
from histoscreen.errors import HistoscreenError, InputError, OutputExistsError, RunExistsError, SettingError
from histoscreen.problems import printable_path
from histoscreen.progress import Progress, silent

EXIT_USAGE_OR_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 3
CONTEXT_DEFAULT = "on when the model has a slide-context calibration, as the shipped model has"

# Library setting names whose flag is not simply --setting-name.
FLAG_OF_SETTING = {
    "architecture": "--arch",
    "architecture_kwargs": "--arch-kwargs",
    "learning_rate": "--lr",
    "bootstrap_rounds": "--bootstrap",
    "csv_path": "--split-csv",
    "scheme": "--split-scheme",
    "objective": "--threshold-objective",
}


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


def _default(record: type, name: str):
    """The default of a dataclass field, so a flag's default is the library's."""
    found = record.__dataclass_fields__[name]
    return found.default_factory() if found.default_factory is not dataclasses.MISSING else found.default


# ---- option groups ---------------------------------------------------------------------


def _quiet_options(group: argparse.ArgumentParser) -> None:
    group.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")


def _overwrite_options(group: argparse.ArgumentParser) -> None:
    group.add_argument("--overwrite", action="store_true", help="replace the output if it exists (only once the new one is complete)")


def _model_options(group: argparse.ArgumentParser) -> None:
    group.add_argument("--model", help="model (.safetensors with its .json, or a folder); default: the shipped model")


def _scoring_options(group: argparse.ArgumentParser, context_default: str) -> None:
    group.add_argument("--tta", action="store_true", help="average the 8 dihedral views (and flag patches whose views disagree)")
    group.add_argument("--context", action=argparse.BooleanOptionalAction, default=None,
                       help="blend each patch's score with its neighbours' on the slide, with the model's slide-context "
                       f"calibration (default: {context_default})")


def _runtime_options(group: argparse.ArgumentParser, *, workers: bool, batch_size: bool, backend: bool) -> None:
    from histoscreen.runtime import BACKENDS

    group.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    group.add_argument("--threads", type=int, help="CPU threads for the model, torch or ONNX Runtime (default: one per physical core)")
    if backend:
        group.add_argument("--backend", choices=BACKENDS, default="auto",
                           help="auto (default): ONNX Runtime on CPU, torch on CUDA")
    if batch_size:
        group.add_argument("--batch-size", type=int, default=256,
                           help="patches per forward pass (default 256: as fast here as larger batches, with a quarter of the memory)")
    if workers:
        group.add_argument("--workers", type=int, help="decoding processes for PNG input, reader threads for slide files (default: all cores)")


def _slide_options(group: argparse.ArgumentParser) -> None:
    from histoscreen.data.wsi import TissueSettings

    group.add_argument("--mpp", type=float,
                       help="µm per pixel of the inputs: whole-slide images' level 0, where the file's metadata lacks it "
                       "or is wrong; patches' own, for areas in mm² (default: the model's spacing)")
    # the old names of --mpp, kept working
    for alias in ("--slide-mpp", "--um-per-px"):
        group.add_argument(alias, dest="mpp", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    group.add_argument("--min-tissue", type=float, default=_default(TissueSettings, "min_tissue"),
                       help="whole-slide images: share of a tile that must be tissue to screen it (default %(default)s)")


def _engine_options(group: argparse.ArgumentParser) -> None:
    group.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local (default): this process; ray: shards scored by a pool of Ray actors (the [distributed] extra)")
    group.add_argument("--ray-address", help="ray: join this running cluster (e.g. 10.0.0.1:6379, or 'auto'); "
                       "default: start a local Ray instance for the run")
    group.add_argument("--ray-workers", type=int, help="ray: actors (default: one per CPU of the cluster)")
    group.add_argument("--ray-cpus-per-worker", type=int, default=1, help="ray: CPUs (model threads) per actor (default %(default)s)")


def _engine(args: argparse.Namespace):
    from histoscreen.tasks import RayEngine

    if args.engine == "local":
        if args.ray_address or args.ray_workers:
            raise HistoscreenError("--ray-address and --ray-workers only mean something with --engine ray")
        return None
    return RayEngine(address=args.ray_address, workers=args.ray_workers, cpus_per_worker=args.ray_cpus_per_worker)


def _split_options(group: argparse.ArgumentParser) -> None:
    from histoscreen.data.splits import SPLIT_SCHEMES, SplitSpec

    group.add_argument("--split-scheme", choices=SPLIT_SCHEMES, default=_default(SplitSpec, "scheme"),
                       help="official 84/29/49 patient lists (default), a k-fold round, --split-csv, or all (every patient "
                       "is a val patient: calibrate on a lab's own labelled patients)")
    group.add_argument("--extra-to-train", action="store_true", help="official: add patients outside the lists to train")
    group.add_argument("--folds", type=int, default=_default(SplitSpec, "folds"),
                       help="kfold: number of folds (default %(default)s); official test patients are left out")
    group.add_argument("--fold", type=int, default=_default(SplitSpec, "fold"), help="kfold: the round whose held-out fold is val (1-based)")
    group.add_argument("--split-seed", type=int, default=_default(SplitSpec, "seed"), help="kfold: seed of the fold assignment")
    group.add_argument("--split-csv", help="csv: file with columns patient,split")


def _threshold_options(group: argparse.ArgumentParser) -> None:
    from histoscreen.scoring.calibration import THRESHOLD_OBJECTIVES, ThresholdRule

    group.add_argument("--threshold-objective", choices=THRESHOLD_OBJECTIVES, default=_default(ThresholdRule, "objective"),
                       help="what the threshold maximises on the val patients (default %(default)s)")
    group.add_argument("--min-sensitivity", type=float, help="threshold: keep sensitivity (IDC recall) at least this")
    group.add_argument("--min-specificity", type=float, help="threshold: keep specificity (non-IDC recall) at least this")


def _threshold_rule(args: argparse.Namespace):
    from histoscreen.scoring.calibration import ThresholdRule

    return ThresholdRule(args.threshold_objective, args.min_sensitivity, args.min_specificity)


def _split_spec(args: argparse.Namespace):
    from histoscreen.data.splits import SplitSpec

    return SplitSpec(scheme=args.split_scheme, folds=args.folds, fold=args.fold, seed=args.split_seed,
                     csv_path=args.split_csv, extra_to_train=args.extra_to_train)


def _model_files(model: str | None) -> list:
    from histoscreen.models import shipped_model_path
    from histoscreen.models.bundle import model_paths

    return list(model_paths(model or shipped_model_path()))


def _apply_threads(args: argparse.Namespace) -> None:
    """The thread budget is process-wide: set here, at the entry point, never in the library."""
    if getattr(args, "threads", None) is not None:
        whole_number("threads", args.threads)
        from histoscreen.runtime.device import set_threads

        set_threads(args.threads)


# ---- commands --------------------------------------------------------------------------


def _command_prepare(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.data import prepare

    summary = prepare(args.source, args.out, workers=args.workers, strict=args.strict, overwrite=args.overwrite, progress=progress)
    return summary.lines()


def _command_synth(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.data import synthesize

    slides = synthesize(
        args.out, patients=args.patients, seed=args.seed, first_index=args.first_index, doubled=args.doubled,
        overwrite=args.overwrite, progress=progress,
    )
    patches = sum(s.patches for s in slides)
    idc = sum(s.idc_patches for s in slides)
    return [
        f"SYNTHETIC slides (not real tissue) written to {args.out}",
        f"{len(slides)} slides, patients {slides[0].patient}..{slides[-1].patient}: {patches:,} patches, "
        f"{idc:,} IDC ({idc / max(patches, 1):.0%})" + (", every patch twice as in the Kaggle archive" if args.doubled else ""),
    ]


def _command_demo_slides(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.data.demo import write_demo_slides

    counts = write_demo_slides(args.out, overwrite=args.overwrite, progress=progress)
    return [
        f"REAL slides of official val patients written to {args.out}: "
        + ", ".join(f"{patient} ({count:,} patches)" for patient, count in counts.items()),
        "these patients helped choose the shipped model's epoch, threshold and context: they show the product, not its accuracy",
    ]


def _command_splits(args: argparse.Namespace, progress: Progress) -> list[str]:
    import pandas as pd

    from histoscreen.tables import write_frame
    from histoscreen.tasks.splits import describe_splits

    summaries = describe_splits(args.store, _split_spec(args))
    lines = []
    for summary in summaries:
        lines.append(f"{summary.split.name}:")
        lines += [f"  {p.name:5s} {p.patients:4d} patients  {p.patches:8,d} patches  {p.idc_patches:7,d} IDC" for p in summary.parts]
        if summary.unassigned:
            lines.append(f"  not in any split: {summary.unassigned} patients")
    if args.out:
        check_output_file(Path(args.out), overwrite=args.overwrite, inputs=[args.store])
        write_frame(Path(args.out), pd.concat([summary.to_frame() for summary in summaries]))
        lines.append(f"written: {args.out}")
    return lines


def _command_train(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.training import TrainConfig, train

    try:
        architecture_kwargs = json.loads(args.arch_kwargs) if args.arch_kwargs else {}
    except json.JSONDecodeError as error:
        raise SettingError("architecture_kwargs", f"is not valid JSON ({error})") from None
    config = TrainConfig(
        architecture=args.arch, architecture_kwargs=architecture_kwargs, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, balance=args.balance,
        stain_jitter=args.stain_jitter, border_smoothing=args.border_smoothing,
        teachers=[str(Path(t).resolve()) for t in args.teacher], distil_weight=args.distil_weight,
        seed=args.seed, split=_split_spec(args), threshold_rule=_threshold_rule(args),
        max_train_patches=args.max_train_patches, device=args.device,
    )
    log = (lambda line: None) if args.quiet else (lambda line: tqdm.write(line, file=sys.stderr))
    command = "histoscreen " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = train(args.store, args.out, config, resume=args.resume, progress=progress, log=log, command=command)
    return [f"model: {result.model_path}", *_validation_lines(result.metadata)]


def _validation_lines(metadata) -> list[str]:
    validation = metadata.validation
    lines = []
    for mode, label in (("plain", "each patch alone"), ("context_plain", "with slide context")):
        if mode not in validation.metrics:
            continue
        figures = validation.metrics[mode]
        settings = ""
        if mode.startswith("context"):
            context = metadata.scoring.context
            settings = " (learned)" if context.linear else f" (radius {context.radius}, weight {context.weight})"
        lines.append(
            f"val patients ({figures['patches']:,} patches), {label}{settings}, threshold {figures['threshold']:.4f}: "
            f"accuracy {figures['accuracy']:.4f}, balanced accuracy {figures['balanced_accuracy']:.4f}, "
            f"sensitivity {figures['sensitivity']:.4f}, specificity {figures['specificity']:.4f}, AUC {figures['roc_auc']:.4f}"
        )
    return lines


def _command_calibrate(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.models import save_model, shipped_model_path
    from histoscreen.models.bundle import model_paths
    from histoscreen.tasks import calibrate

    out = Path(args.out)
    target = out if out.suffix == ".safetensors" else out / "model.safetensors"
    inputs = [*args.inputs, *args.labels, *_model_files(args.model)]
    for written in model_paths(target):
        check_output_file(written, overwrite=args.overwrite, inputs=inputs)
    model, metadata = calibrate(
        args.inputs, args.model or shipped_model_path(), split_spec=_split_spec(args),
        rule=_threshold_rule(args), context_model=args.context_model, device=args.device, labels=args.labels, mpp=args.mpp,
    )
    path = save_model(model, metadata, target, overwrite=args.overwrite, inputs=inputs)
    return [
        f"model: {path}",
        f"calibrated on {len(metadata.validation.patients)} {metadata.validation.split} patients",
        *_validation_lines(metadata),
        *_estimate_lines(metadata.validation.estimate),
    ]


def _estimate_lines(estimate: dict | None) -> list[str]:
    """What the refit is worth on the lab's patients, and a warning when it is not better."""
    if estimate is None:
        return []

    def described(figures: dict) -> str:
        return (f"balanced accuracy {figures['balanced_accuracy']:.4f}, sensitivity {figures['sensitivity']:.4f}, "
                f"specificity {figures['specificity']:.4f}, IDC slides under-called {len(figures['under_called'])} of "
                f"{figures['complete_slides']} complete slides")

    before, after = estimate["before"], estimate["after"]
    lines = [f"on these {estimate['patients']} patients, the model you started from: {described(before)}",
             f"on these {estimate['patients']} patients, this refit (each patient called by a refit on the others): {described(after)}"]
    if after["balanced_accuracy"] <= before["balanced_accuracy"] or len(after["under_called"]) > len(before["under_called"]):
        lines.append("warning: the refit is not estimated to be better on these patients than the model you started from; "
                     "keep using that model (or review more patients and calibrate again)")
    return lines


def _command_evaluate(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.report import write_evaluation
    from histoscreen.tasks import evaluate

    check_output_folder(Path(args.out), overwrite=args.overwrite, inputs=[args.store, *_model_files(args.model)])
    evaluation = evaluate(
        args.store, model=args.model, split=args.split, split_spec=_split_spec(args), tta=args.tta,
        context=args.context, bootstrap_rounds=args.bootstrap, device=args.device, backend=args.backend,
        progress=progress,
    )
    written = write_evaluation(evaluation, args.out, overwrite=args.overwrite)
    measured, metrics, intervals = evaluation.measured_on, evaluation.metrics, evaluation.intervals
    lines = [f"{measured['split']}: {measured['patients']} patients, {measured['patches']:,} patches ({measured['idc_patches']:,} IDC)"]
    for name in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc"):
        interval = intervals[name]
        lines.append(f"  {name:18s} {metrics[name]:.4f}  (95% CI {interval.low:.4f}-{interval.high:.4f}, patient bootstrap)")
    lines.append(f"  {'brier':18s} {metrics['brier']:.4f}")
    lines.append(f"  {'ece':18s} {metrics['ece']:.4f}")
    lines.append(f"written: {args.out}/" + ", ".join(written))
    return lines


def _command_predict(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.report import write_predictions
    from histoscreen.tasks import predict

    check_output_file(Path(args.out), overwrite=args.overwrite, inputs=[*args.inputs, *_model_files(args.model)])
    predictions = predict(
        args.inputs, model=args.model, tta=args.tta, context=args.context, batch_size=args.batch_size,
        workers=args.workers, device=args.device, backend=args.backend, mpp=args.mpp, engine=_engine(args),
        progress=progress,
    )
    if predictions.rows.empty:  # nothing to write is a failed run, as it is for screen
        first = f"; the first: {predictions.problems[0].where}: {predictions.problems[0].reason}" if predictions.problems else ""
        raise InputError(f"{', '.join(args.inputs)}: no readable patch among the inputs ({len(predictions.problems)} rejected){first}")
    written = write_predictions(predictions, args.out, overwrite=args.overwrite)
    return [f"predictions: {written[0]}", *predictions.lines()[:-1],
            predictions.lines()[-1] + (f" (see {written[1]})" if len(written) > 1 else "")]


def _command_screen(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.data.wsi import TissueSettings
    from histoscreen.report import write_screening_report
    from histoscreen.tasks import Screening

    screening = Screening(
        args.inputs, model=args.model, tta=args.tta, context=args.context, mpp=args.mpp,
        labels=args.labels, use_name_labels=not args.ignore_name_labels, device=args.device, backend=args.backend,
        workers=args.workers, tissue=TissueSettings(min_tissue=args.min_tissue),
        engine=_engine(args),
    )
    return write_screening_report(screening, args.out, overwrite=args.overwrite, progress=progress).lines()


def _command_serve(args: argparse.Namespace, progress: Progress) -> list[str]:
    try:
        import uvicorn

        from histoscreen.serving.app import LOOPBACK_HOSTS, ServeSettings, create_app
        from histoscreen.serving.jobs import default_data_folder
    except ImportError:
        raise HistoscreenError("the web app needs the [serve] extra: pip install 'histoscreen[serve]'") from None
    loopback = args.host in LOOPBACK_HOSTS
    settings = ServeSettings(
        data=Path(args.data) if args.data else default_data_folder(), token=args.token, model=args.model,
        max_upload_bytes=args.max_upload_mb << 20, max_unzipped_bytes=args.max_unzipped_mb << 20, workers=args.workers,
        allowed_hosts=LOOPBACK_HOSTS if loopback else None,  # on a loopback bind, a foreign Host is DNS rebinding
    )
    if not loopback and not args.token:
        print(f"histoscreen serve: warning: listening on {args.host} without --token: anyone who can reach this machine "
              "can upload slides and read every report", file=sys.stderr)
    if not args.quiet:
        print(f"histoscreen: http://{args.host}:{args.port}/ (API docs at /docs); data in {settings.data}", file=sys.stderr)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")
    return []


def _command_export(args: argparse.Namespace, progress: Progress) -> list[str]:
    from histoscreen.models import shipped_model_path
    from histoscreen.runtime import export_model

    written = export_model(args.model or shipped_model_path(), args.out, format=args.format, mpp=args.mpp,
                           overwrite=args.overwrite)
    return [f"written: {path}" for path in written]


# ---- the parser ------------------------------------------------------------------------
#
# One entry per command: what it runs, its one-line help and description, and a function
# that adds its options. A command's options are added only when that command runs (or the
# whole parser is asked for): they take their choices and defaults from the library, and
# some of it imports torch, which `histoscreen --help` and an ONNX `predict` never need.


@dataclasses.dataclass(frozen=True)
class Command:
    run: object
    options: object  # (argparse.ArgumentParser) -> None
    help: str
    description: str


def _prepare_options(sub: argparse.ArgumentParser) -> None:
    _overwrite_options(sub)
    sub.add_argument("source", help="folder holding patch PNGs, searched recursively")
    sub.add_argument("out", help="store folder to create")
    sub.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    sub.add_argument("--strict", action="store_true", help="fail on any rejected file or conflicting duplicate")


def _synth_options(sub: argparse.ArgumentParser) -> None:
    _overwrite_options(sub)
    sub.add_argument("out", help="folder to create")
    sub.add_argument("--patients", type=int, default=4, help="number of slides (default 4)")
    sub.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sub.add_argument("--first-index", type=int, default=0, help="first patient is 900000 + this (default 0)")
    sub.add_argument("--doubled", action="store_true", help="also write every patch under IDC_regular_ps50_idx5/, like the Kaggle archive")


def _demo_slides_options(sub: argparse.ArgumentParser) -> None:
    _overwrite_options(sub)
    sub.add_argument("out", help="folder to create")


def _splits_options(sub: argparse.ArgumentParser) -> None:
    _split_options(sub)
    _overwrite_options(sub)
    sub.add_argument("store", help="a store written by 'histoscreen prepare'")
    sub.add_argument("--out", help="write the split(s) as CSV: patient,split,round")


def _train_options(sub: argparse.ArgumentParser) -> None:
    from histoscreen.models import list_models
    from histoscreen.training import BALANCE_CHOICES, TrainConfig

    _split_options(sub)
    _threshold_options(sub)
    _runtime_options(sub, workers=False, batch_size=False, backend=False)
    sub.add_argument("store", help="a store written by 'histoscreen prepare'")
    sub.add_argument("--out", required=True, help="model folder to create (or to resume)")
    sub.add_argument("--arch", choices=list_models(), default=_default(TrainConfig, "architecture"), help="architecture (default %(default)s)")
    sub.add_argument("--arch-kwargs", help='architecture options as JSON, e.g. \'{"widths": [16, 32, 48, 64]}\'')
    sub.add_argument("--epochs", type=int, default=_default(TrainConfig, "epochs"),
                     help="passes over the train patches; the best epoch on the val patients is kept (default %(default)s)")
    sub.add_argument("--batch-size", type=int, default=_default(TrainConfig, "batch_size"),
                     help="patches per optimiser step (default %(default)s)")
    sub.add_argument("--lr", type=float, default=_default(TrainConfig, "learning_rate"), help="peak learning rate of AdamW (default %(default)s)")
    sub.add_argument("--weight-decay", type=float, default=_default(TrainConfig, "weight_decay"),
                     help="AdamW's decoupled weight decay (default %(default)s)")
    sub.add_argument("--warmup-epochs", type=float, default=_default(TrainConfig, "warmup_epochs"),
                     help="epochs of linear learning-rate warm-up before the cosine decay (default %(default)s)")
    sub.add_argument("--balance", choices=BALANCE_CHOICES, default=_default(TrainConfig, "balance"),
                     help="class imbalance: weighted loss (default), balanced sampling, or neither")
    sub.add_argument("--stain-jitter", type=float, default=_default(TrainConfig, "stain_jitter"),
                     help="HED stain jitter strength; 0 for none (default %(default)s)")
    sub.add_argument("--border-smoothing", type=float, default=_default(TrainConfig, "border_smoothing"),
                     help="train on (1-s)*label + s*(mean label of the 8 neighbours): soft targets near region borders (default %(default)s)")
    sub.add_argument("--teacher", action="append", default=[], metavar="MODEL",
                     help="a trained model to distil from (repeat for an ensemble); needs --distil-weight")
    sub.add_argument("--distil-weight", type=float, default=_default(TrainConfig, "distil_weight"),
                     help="train on (1-w)*label + w*(the teachers' probability) (default %(default)s)")
    sub.add_argument("--seed", type=int, default=_default(TrainConfig, "seed"),
                     help="seeds weights, shuffling and augmentation (default %(default)s)")
    sub.add_argument("--max-train-patches", type=int, help="train on a seeded subsample of this many patches")
    sub.add_argument("--resume", action="store_true", help="continue a killed run in OUT where it stopped")


def _calibrate_options(sub: argparse.ArgumentParser) -> None:
    from histoscreen.scoring.calibration import CONTEXT_MODELS

    _model_options(sub)
    _split_options(sub)
    _threshold_options(sub)
    _runtime_options(sub, workers=False, batch_size=False, backend=False)
    _overwrite_options(sub)
    sub.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="a store written by 'histoscreen prepare' (its split's val patients calibrate); with --split-scheme all, "
                     "any inputs screen takes, every labelled patch of them calibrating")
    sub.add_argument("--out", required=True, help="model file (.safetensors) or folder to write")
    _labels_option(sub)
    sub.add_argument("--mpp", type=float, help="whole-slide images: µm per level-0 pixel, where the file's metadata lacks it")
    sub.add_argument("--context-model", choices=CONTEXT_MODELS, default="blend",
                     help="slide context: blend each patch with its neighbours' mean (default), or learn how to "
                     "weigh its neighbours out to 8 patches and its slide's overall scores (what the shipped model uses)")


def _evaluate_options(sub: argparse.ArgumentParser) -> None:
    from histoscreen.data.splits import SPLIT_NAMES

    _model_options(sub)
    _split_options(sub)
    _scoring_options(sub, CONTEXT_DEFAULT)
    _runtime_options(sub, workers=False, batch_size=False, backend=True)
    _overwrite_options(sub)
    sub.add_argument("store", help="a store written by 'histoscreen prepare'")
    sub.add_argument("--split", choices=SPLIT_NAMES, default="test", help="which patients of the split (default test)")
    sub.add_argument("--out", required=True, help="folder for metrics.json, per_patient.csv and plots")
    sub.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for the 95%% intervals (default 1000)")


def _scoring_run_options(sub: argparse.ArgumentParser, *, batch_size: bool) -> None:
    """What predict and screen share: a model and its scoring run over slides, here or on Ray."""
    _model_options(sub)
    _scoring_options(sub, CONTEXT_DEFAULT)
    _slide_options(sub)
    _runtime_options(sub, workers=True, batch_size=batch_size, backend=True)
    _engine_options(sub)
    _overwrite_options(sub)


def _predict_options(sub: argparse.ArgumentParser) -> None:
    _scoring_run_options(sub, batch_size=True)
    sub.add_argument("inputs", nargs="+", help="packed stores, folders of patch PNGs, PNG files, whole-slide images (.svs, .tif, .ndpi, .mrxs, ...)")
    sub.add_argument("--out", required=True, help="CSV file to write")


def _screen_options(sub: argparse.ArgumentParser) -> None:
    _scoring_run_options(sub, batch_size=False)
    sub.add_argument("inputs", nargs="+", help="Kaggle-layout folders (one patient or many), folders of named patches, stores, "
                     "or whole-slide images (.svs, .tif, .ndpi, .mrxs, ...) and folders of them")
    sub.add_argument("--out", required=True, help="report folder to create")
    _labels_option(sub)
    sub.add_argument("--ignore-name-labels", action="store_true", help="the class in file names is not ground truth")


def _labels_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--labels", action="append", default=[], metavar="FILE",
                     help="ground truth (else the labels in names): a CSV with columns patient,x,y,label, or a GeoJSON "
                     "exported from QuPath named after its slide (SLIDE.geojson: polygons classified IDC or otherwise, in "
                     "level-0 pixels; a patch takes a class covering half of it); repeat for several")


def _serve_options(sub: argparse.ArgumentParser) -> None:
    _model_options(sub)
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sub.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    sub.add_argument("--data", help="folder for jobs, reviews, uploads and reports (default: ~/.local/share/histoscreen)")
    sub.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every API call")
    sub.add_argument("--parallel-jobs", dest="workers", type=int, default=1,
                     help="jobs screened at once, each in a worker process of its own (default 1)")
    sub.add_argument("--workers", dest="workers", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # its old name; --workers means decoding processes elsewhere
    sub.add_argument("--max-upload-mb", type=int, default=4096, help="largest upload accepted (default 4096 MiB)")
    sub.add_argument("--max-unzipped-mb", type=int, default=8192, help="largest total a zip may expand to (default 8192 MiB)")


def _export_options(sub: argparse.ArgumentParser) -> None:
    from histoscreen.runtime import EXPORT_FORMATS

    _model_options(sub)
    _overwrite_options(sub)
    sub.add_argument("--format", choices=EXPORT_FORMATS, required=True,
                     help="onnx (uint8 patches in, logits out) or torchscript (with a WSInfer/QuPath config.json)")
    sub.add_argument("--out", required=True, help="file to write (e.g. model.onnx or torchscript_model.pt)")
    sub.add_argument("--mpp", type=float, help="µm per pixel for config.json (default: the model's spacing_um_px)")
    sub.add_argument("--um-per-px", dest="mpp", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # its old name


COMMANDS = {
    "prepare": Command(
        _command_prepare, _prepare_options,
        help="pack a folder of Kaggle-layout patch PNGs into a patch store",
        description="Scan SOURCE (the Kaggle archive, IDC_regular_ps50_idx5/, one patient folder or a loose "
        "folder of patches) and write a packed store to OUT. Invalid files are listed in OUT/rejects.csv.",
    ),
    "synth": Command(
        _command_synth, _synth_options,
        help="write SYNTHETIC H&E-like slides as patches in the Kaggle layout (for tests and demos)",
        description="Generate synthetic whole-mount slides (patient ids from 900000) and cut them into 50x50 "
        "patches in the Kaggle layout. Not real tissue.",
    ),
    "demo-slides": Command(
        _command_demo_slides, _demo_slides_options,
        help="write the three real val slides that ship with the package (for the demo)",
        description="Write official val patients 8917, 8956 and 16896 of the Kaggle set (CC0), every patch recovered "
        "for them, as Kaggle-layout PNGs. Stored in the package as lossy WebP mosaics, so pixels differ slightly from "
        "the originals; these patients helped choose the shipped model, so they show the product, not its accuracy.",
    ),
    "splits": Command(
        _command_splits, _splits_options,
        help="show (and optionally save) a patient-level split of a store",
        description="Show the patients and patches per split (every round of a k-fold scheme). Every split is by "
        "patient and checked for overlap.",
    ),
    "train": Command(
        _command_train, _train_options,
        help="train an IDC model on a store's train patients, select and calibrate on its val patients",
        description="Train on the train patients of a patient split, keep the epoch with the best val balanced "
        "accuracy, then fit calibration, threshold and slide context on the val patients. Writes "
        "OUT/model.safetensors + model.json, OUT/metrics.jsonl and a checkpoint every epoch (OUT/checkpoints).",
    ),
    "calibrate": Command(
        _command_calibrate, _calibrate_options,
        help="refit a model's calibration, thresholds and slide context on the val patients of a store",
        description="Write a copy of MODEL whose calibration, thresholds and slide-context settings are fitted on the "
        "val patients of STORE (for example a lab's own labelled patients in a csv split). The weights are unchanged.",
    ),
    "evaluate": Command(
        _command_evaluate, _evaluate_options,
        help="metrics with patient-bootstrap confidence intervals, per-patient table and plots",
        description="Evaluate a model on the patients of one split of a store, at the model's own threshold.",
    ),
    "predict": Command(
        _command_predict, _predict_options,
        help="IDC probability and call for every patch of stores, folders, files or whole-slide images",
        description="Write a CSV with one row per patch: path,patient,x,y,prob_idc,pred. Folders are searched "
        "recursively; a patch present twice (as in the Kaggle archive) is predicted once; files that are not "
        "valid patches are listed in OUT.rejects.csv. With slide context (the default) every patch is read before a row is written.",
    ),
    "screen": Command(
        _command_screen, _screen_options,
        help="screen a batch of slides: heatmaps, tumour burden, triage ranking, explanations, HTML report",
        description="Rebuild every slide in INPUT from its patches, predict IDC, and write OUT/index.html "
        "(open it from disk), slides.csv, slides.json, errors.csv and per-slide heatmaps, GeoJSON regions and "
        "explanations (where each explained patch's evidence for IDC is). A screening aid, not a diagnosis.",
    ),
    "serve": Command(
        _command_serve, _serve_options,
        help="the web app and REST API: upload, watch, rank, view and review screening jobs",
        description="Serve the web app and REST API on this machine (localhost by default). Jobs, reviews, uploads "
        "and reports live under --data; screening runs in worker processes. A screening aid, not a diagnosis.",
    ),
    "export": Command(
        _command_export, _export_options,
        help="export a model to ONNX or TorchScript (with a WSInfer/QuPath config.json)",
        description="ONNX: uint8 patches (N x 50 x 50 x 3) in, IDC logits out, normalisation inside; the "
        "metadata JSON is written beside it. TorchScript: normalised float patches in, two calibrated logits "
        "(non-IDC, IDC) out, with config.json for QuPath's WSInfer extension.",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; with `command`, only that command's options are added (the others
    keep their names and help, which is all `histoscreen --help` shows)."""
    parser = argparse.ArgumentParser(
        prog="histoscreen",
        description="Screen breast histopathology patches for invasive ductal carcinoma (IDC).",
    )
    parser.add_argument("--version", action="version", version=f"histoscreen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        sub = commands.add_parser(name, help=spec.help, description=spec.description)
        sub.set_defaults(run=spec.run)
        if command is None or command == name:
            _quiet_options(sub)
            spec.options(sub)
    return parser


def _named_command(argv: Sequence[str]) -> str | None:
    """The command an argument list names: its first word that is not an option (the
    top-level options, --help and --version, take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def command_flags(parser: argparse.ArgumentParser, command: str) -> set[str]:
    """Every option string the subcommand `command` accepts."""
    for action in parser._subparsers._group_actions:  # argparse keeps subcommands here
        if command in action.choices:
            return {flag for a in action.choices[command]._actions for flag in a.option_strings}
    return set()


def phrase(error: HistoscreenError, flags: set[str]) -> str:
    """A library error in terms of the command line."""
    if isinstance(error, SettingError):
        flag = FLAG_OF_SETTING.get(error.setting, "--" + error.setting.replace("_", "-"))
        if flag in flags:
            return f"{flag} {error.problem}"
    if isinstance(error, OutputExistsError):
        hint = " or pass --overwrite" if "--overwrite" in flags else ""
        return f"{error.path} already exists; choose another path{hint}"
    if isinstance(error, RunExistsError):
        return f"{error.path} holds a training run already; pass --resume to continue it or choose another folder"
    if "--mpp" in flags:
        from histoscreen.data.wsi import GIVE_MPP

        return str(error).replace(GIVE_MPP, "pass --mpp (µm per level-0 pixel)")
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_named_command(argv) or "")
    args = parser.parse_args(argv)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone speaks
        args.quiet = True
    bar = None if args.quiet else ProgressBar()
    try:
        _apply_threads(args)
        lines = args.run(args, bar or silent)
    except HistoscreenError as error:
        print(f"histoscreen {args.command}: error: {phrase(error, command_flags(parser, args.command))}", file=sys.stderr)
        return EXIT_USAGE_OR_INPUT
    except KeyboardInterrupt:
        print(f"histoscreen {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:  # the disk, not the data: full, read-only, gone
        where = f"{printable_path(error.filename)}: " if error.filename else ""
        print(f"histoscreen {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE_OR_INPUT
    except MemoryError:
        print(f"histoscreen {args.command}: error: out of memory", file=sys.stderr)
        return EXIT_USAGE_OR_INPUT
    except Exception as error:  # a bug: still one line, the traceback on request
        if os.environ.get("HISTOSCREEN_DEBUG"):
            raise
        print(f"histoscreen {args.command}: internal error: {type(error).__name__}: {error} "
              "(please report it; HISTOSCREEN_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
