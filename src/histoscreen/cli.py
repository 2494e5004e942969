"""The `histoscreen` command: a thin layer over the Python API.

Each command parses its arguments, calls one API function with a progress bar, and
returns the lines of its summary, printed once the bar is gone; it exits 0; any HistoscreenError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tqdm import tqdm

from histoscreen import HistoscreenError, __version__
from histoscreen.progress import Progress, silent

EXIT_USAGE_OR_INPUT = 2


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
