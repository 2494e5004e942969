"""The histoscreen command as a user runs it: a real process, real files, exit codes."""

from __future__ import annotations

import ast
import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from histoscreen.data import PatchStore


def histoscreen(*args: str) -> subprocess.CompletedProcess:
    installed = Path(sys.executable).parent / "histoscreen"
    command = [str(installed)] if installed.exists() else [sys.executable, "-m", "histoscreen.cli"]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [[], ["prepare"], ["synth"], ["demo-slides"], ["serve"], ["splits"], ["train"], ["calibrate"], ["evaluate"], ["predict"], ["screen"], ["export"]])
def test_help_on_every_command(command):
    result = histoscreen(*command, "--help")
    assert result.returncode == 0
    assert "usage: histoscreen" in result.stdout


def test_help_and_a_patch_predicted_by_onnx_run_without_torch(tmp_path):
    """torch takes a second or more to import here: `--help` and the ONNX path must not pay
    it (benchmarks/startup.py times them); a cold ONNX cache still exports with torch."""
    import os

    import numpy as np
    from PIL import Image

    patch = tmp_path / "9999_idx5_x51_y51_class0.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(patch)
    env = {**os.environ, "HISTOSCREEN_CACHE": str(tmp_path / "cache")}
    probe = (
        "import contextlib, io, sys\n"
        "from histoscreen.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        "after_help = 'torch' in sys.modules\n"
        f"code = main(['predict', '-q', {str(patch)!r}, '--out', sys.argv[1], '--overwrite'])\n"
        "print(after_help, 'torch' in sys.modules, 'matplotlib' in sys.modules, code)\n"
    )
    runs = [subprocess.run([sys.executable, "-c", probe, str(tmp_path / "out.csv")], capture_output=True, text=True,
                           env=env, timeout=300) for _ in range(2)]
    assert [run.stdout.split() for run in runs] == [["False", "True", "False", "0"], ["False", "False", "False", "0"]], runs
    assert (tmp_path / "out.csv").read_text().count("\n") == 2


def test_synth_prepare_splits_round_trip(tmp_path):
    synth = histoscreen("synth", str(tmp_path / "slides"), "--patients", "2", "--seed", "3", "--doubled")
    assert synth.returncode == 0, synth.stderr
    assert "SYNTHETIC" in synth.stdout

    prepared = histoscreen("prepare", str(tmp_path / "slides"), str(tmp_path / "store"))
    assert prepared.returncode == 0, prepared.stderr
    store = PatchStore(tmp_path / "store")
    assert f"patches: {len(store):,} from 2 patients" in prepared.stdout
    assert f"duplicate copies dropped: {len(store):,}" in prepared.stdout

    splits = histoscreen("splits", str(tmp_path / "store"), "--split-scheme", "kfold", "--folds", "2", "--out", str(tmp_path / "folds.csv"))
    assert splits.returncode == 0, splits.stderr
    assert "kfold-2-of-2" in splits.stdout
    assert (tmp_path / "folds.csv").read_text().startswith("patient,split,round\n")


def test_quiet_prints_nothing(tmp_path):
    synth = histoscreen("synth", str(tmp_path / "slides"), "--patients", "1", "--quiet")
    prepared = histoscreen("prepare", str(tmp_path / "slides"), str(tmp_path / "store"), "--quiet")
    assert (synth.returncode, prepared.returncode) == (0, 0)
    assert synth.stdout + synth.stderr + prepared.stdout + prepared.stderr == ""


def test_failures_are_one_line_with_a_nonzero_exit(tmp_path):
    missing = histoscreen("prepare", str(tmp_path / "nowhere"), str(tmp_path / "store"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"histoscreen prepare: error: {tmp_path / 'nowhere'}: no such folder"]

    (tmp_path / "slides" / "900000" / "0").mkdir(parents=True)
    (tmp_path / "slides" / "900000" / "0" / "900000_idx5_x1_y1_class0.png").write_bytes(b"")
    strict = histoscreen("prepare", str(tmp_path / "slides"), str(tmp_path / "store"), "--strict")
    assert strict.returncode == 2
    assert "empty file (0 bytes)" in strict.stderr and len(strict.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists()

    not_a_store = histoscreen("splits", str(tmp_path / "slides"))
    assert not_a_store.returncode == 2 and "not a patch store" in not_a_store.stderr


def test_train_evaluate_predict_from_the_command_line(synthetic_store, tmp_path):
    model = tmp_path / "model"
    trained = histoscreen(
        "train", str(synthetic_store), "--out", str(model), "--epochs", "2", "--arch-kwargs", '{"widths": [8, 16]}',
        "--split-scheme", "kfold", "--folds", "3", "--fold", "2", "--threads", "2",
    )
    assert trained.returncode == 0, trained.stderr
    assert "val patients" in trained.stdout and "epoch 2/2" in trained.stderr
    assert (model / "model.safetensors").is_file() and (model / "model.json").is_file()
    assert "histoscreen train" in (model / "model.json").read_text()  # the command is recorded

    evaluated = histoscreen(
        "evaluate", str(synthetic_store), "--model", str(model), "--split", "val", "--split-scheme", "kfold",
        "--folds", "3", "--fold", "2", "--out", str(tmp_path / "eval"), "--bootstrap", "50",
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert "balanced_accuracy" in evaluated.stdout and "95% CI" in evaluated.stdout
    assert (tmp_path / "eval" / "metrics.json").is_file() and (tmp_path / "eval" / "roc.png").is_file()

    predicted = histoscreen("predict", str(synthetic_store), "--model", str(model / "model.json"), "--out", str(tmp_path / "p.csv"))
    assert predicted.returncode == 0, predicted.stderr
    assert (tmp_path / "p.csv").read_text().startswith("path,patient,x,y,prob_idc,pred\n")

    no_official_patients = histoscreen("train", str(synthetic_store), "--out", str(tmp_path / "m2"), "--epochs", "1")
    assert no_official_patients.returncode == 2
    assert "leaves 0 train and 0 val patches" in no_official_patients.stderr


def test_a_pickle_handed_as_a_model_is_refused(tmp_path, synthetic_store):
    import torch

    torch.save({"weights": torch.zeros(3)}, tmp_path / "model.pt")
    result = histoscreen("predict", str(synthetic_store), "--model", str(tmp_path / "model.pt"), "--out", str(tmp_path / "p.csv"))
    assert result.returncode == 2
    assert "never unpickles" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.csv").exists()


COMMANDS = ["prepare", "synth", "demo-slides", "splits", "train", "calibrate", "evaluate", "predict", "screen", "serve", "export"]
SOURCE = Path(__file__).resolve().parents[1] / "src" / "histoscreen"
# Settings the Python API checks that no command exposes (so their errors are never phrased as flags).
API_ONLY_SETTINGS = {"idc_fraction", "idc_fractions", "gpus_per_worker", "patches_per_shard", "max_queued"}


def strings_in(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_every_flag_a_message_or_help_names_exists():
    from histoscreen import cli

    parser = cli.build_parser()
    every_flag = set().union(*(cli.command_flags(parser, command) for command in COMMANDS), ["--version"])
    named = {flag for text in strings_in(ast.parse((SOURCE / "cli.py").read_text())) for flag in re.findall(r"--[a-z][a-z-]*", text)}
    assert named and named <= every_flag, sorted(named - every_flag)
    for command in COMMANDS:  # the same as running `histoscreen COMMAND --help`
        with pytest.raises(SystemExit) as done:
            parser.parse_args([command, "--help"])
        assert done.value.code == 0


def _setting_error(node: ast.AST) -> bool:
    """A SettingError made, or one of histoscreen.checks' checks, which make them."""
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) in {"SettingError", "whole_number", "number", "choice"} and bool(node.args)


def test_the_library_names_no_flag_and_every_setting_error_maps_to_one():
    from histoscreen import cli

    parser = cli.build_parser()
    every_flag = set().union(*(cli.command_flags(parser, command) for command in COMMANDS))
    unmapped, settings = [], []
    for path in SOURCE.rglob("*.py"):
        if path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                flags = [t for t in strings_in(node.exc) if re.search(r"(^|\s)--[a-z]", t)]
                assert not flags, f"{path.name}:{node.lineno} names a command-line flag: {flags}"
            if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
                looped = strings_in(node.iter)  # SettingError(name, ...) inside `for name in (...)`
                for call in ast.walk(node):
                    if _setting_error(call) and isinstance(call.args[0], ast.Name) and call.args[0].id == node.target.id:
                        settings += [(path.name, call.lineno, setting) for setting in looped]
            if _setting_error(node) and isinstance(node.args[0], ast.Constant):
                settings.append((path.name, node.lineno, node.args[0].value))
    assert len(settings) > 20
    for module, line, setting in settings:
        flag = cli.FLAG_OF_SETTING.get(setting, "--" + setting.replace("_", "-"))
        if flag not in every_flag and setting not in API_ONLY_SETTINGS:
            unmapped.append(f"{module}:{line} {setting} -> {flag}")
    assert unmapped == []


def test_setting_errors_and_existing_outputs_are_phrased_with_flags(synthetic_store, tmp_path):
    zero = histoscreen("predict", str(synthetic_store), "--out", str(tmp_path / "p.csv"), "--batch-size", "0")
    assert zero.returncode == 2 and zero.stderr.strip() == "histoscreen predict: error: --batch-size must be at least 1, got 0"
    folds = histoscreen("splits", str(synthetic_store), "--split-scheme", "kfold", "--folds", "1")
    assert folds.returncode == 2 and folds.stderr.strip() == "histoscreen splits: error: --folds must be at least 2, got 1"
    (tmp_path / "taken.csv").write_text("mine\n")
    taken = histoscreen("predict", str(synthetic_store), "--out", str(tmp_path / "taken.csv"))
    assert taken.returncode == 2 and "taken.csv already exists; choose another path or pass --overwrite" in taken.stderr
    assert (tmp_path / "taken.csv").read_text() == "mine\n"


def test_predict_folds_the_archives_duplicate_copies(synthetic_archive, tmp_path):
    result = histoscreen("predict", str(synthetic_archive), "--out", str(tmp_path / "p.csv"))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    top_level = [p for p in synthetic_archive.rglob("*.png") if "IDC_regular_ps50_idx5" not in p.parts]
    assert len(rows) == len(top_level) == len({(r["patient"], r["x"], r["y"]) for r in rows})
    assert f"duplicate copies folded: {len(top_level):,}" in result.stdout


def test_every_option_of_every_command_says_what_it_does():
    import argparse

    from histoscreen.cli import build_parser

    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, sub in commands.choices.items() for action in sub._actions
               if not isinstance(action, argparse._HelpAction) and action.help is None]
    assert missing == []
