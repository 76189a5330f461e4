"""One command shape: --model everywhere, global flags anywhere, help on every option, the same
precision vocabulary and default, and --out checked before any work."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from medlite.cli import DEFAULT_PRECISION, build_parser, main
from test_fileio import read_only_dir

MODEL_COMMANDS = ("inspect", "convert", "ask", "eval", "export", "plan", "build", "verify")


def _subparsers(p: argparse.ArgumentParser, prefix=()):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield prefix + (name,), sp
                yield from _subparsers(sp, prefix + (name,))


def test_every_option_and_positional_has_help():
    missing = []
    for path, sp in [((), build_parser()), *_subparsers(build_parser())]:
        for a in sp._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)):
                continue
            if not a.help or a.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path) or 'medlite'} {a.option_strings or a.dest}")
    assert not missing, missing


def test_model_option_is_listed_the_same_way_everywhere():
    subs = dict(_subparsers(build_parser()))
    helps = set()
    for name in MODEL_COMMANDS:
        (model,) = [a for a in subs[(name,)]._actions if "--model" in a.option_strings]
        assert model.metavar == "PATH" and model.default is None
        helps.add(model.help)
    assert len(helps) == 1


@pytest.mark.parametrize("argv", [
    ["validate", "r.yaml", "--quiet", "--json", "--cache-dir", "/c", "--seed", "3"],
    ["--quiet", "--json", "--cache-dir", "/c", "--seed", "3", "validate", "r.yaml"],
    ["--quiet", "validate", "r.yaml", "--json", "--seed", "3", "--cache-dir", "/c"],
])
def test_global_flags_before_or_after_the_subcommand(argv):
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.json, args.cache_dir, args.seed) == (True, True, "/c", 3)


def test_defaults_without_global_flags():
    args = build_parser().parse_args(["recipes", "ls"])
    assert (args.quiet, args.json, args.cache_dir, args.seed) == (False, False, None, 0)


def test_export_default_precision_is_the_recipes_default():
    from medlite.recipes.options import ExportOptions

    subs = dict(_subparsers(build_parser()))
    (prec,) = [a for a in subs[("export",)]._actions if "--precision" in a.option_strings]
    assert prec.default == DEFAULT_PRECISION == ExportOptions().precision == "fp16"
    (conv,) = [a for a in subs[("convert",)]._actions if "--precision" in a.option_strings]
    assert set(conv.choices) >= {"fp32", "fp16"}


def test_demo_random_defaults_to_a_small_preset():
    args = build_parser().parse_args(["demo", "random", "--out", "x"])
    assert args.preset == "tiny"


def test_recipes_alone_lists_and_json_works(capsys):
    assert main(["recipes"]) == 0
    assert "xavier-agx-fp16" in capsys.readouterr().out
    assert main(["recipes", "ls", "--json"]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)["recipes"]]
    assert "xavier-agx-fp16" in names


def test_convert_dtype_is_a_deprecated_spelling_of_precision():
    from medlite.cli import _deprecated_positionals
    from medlite.context import RunContext

    ctx = RunContext(quiet=True)
    args = build_parser().parse_args(["convert", "ckpt", "--out", "o", "--dtype", "float16"])
    _deprecated_positionals(args, ctx)
    assert (args.model, args.precision) == ("ckpt", "fp16")
    assert any("--precision fp16" in w for w in ctx.warnings)
    assert any("--model ckpt" in w for w in ctx.warnings)


# -- --out is checked before any model loads ---------------------------------------------------------
@pytest.mark.parametrize("cmd", [
    lambda ro: ["export", "--out", str(ro / "export")],
    lambda ro: ["eval", "--out", str(ro / "result.json")],
    lambda ro: ["build", "xavier-agx-fp16", "--out", str(ro / "artifacts")],
    lambda ro: ["recipes", "cp", "xavier-agx-fp16", str(ro / "mine.yaml")],
    lambda ro: ["convert", "--out", str(ro / "hf")],
    lambda ro: ["demo", "random", "--out", str(ro / "rand")],
])
def test_read_only_out_is_one_clear_line_before_any_work(cmd, tmp_path, capsys, monkeypatch):
    import medlite.demo.model as demo

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(demo, "ensure_demo_model", no_model)
    ro = read_only_dir(tmp_path)
    assert main(cmd(ro) + ["--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "cannot write in" in err[-1] and "Traceback" not in "\n".join(err)


def test_inspect_on_an_artifact_points_to_verify_and_ask(tmp_path, capsys):
    art = tmp_path / "art"
    art.mkdir()
    (art / "medlite_runtime.json").write_text("{}")
    assert main(["inspect", "--model", str(art)]) == 2
    err = capsys.readouterr().err
    assert "is a medlite artifact" in err and f"medlite verify {art}" in err and "medlite ask" in err
    # eval evaluates artifacts on ONNX Runtime since issue 30: a broken runtime config is one line naming it
    assert main(["eval", "--model", str(art), "--limit", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: {art / 'medlite_runtime.json'}: ") and "Traceback" not in "\n".join(err)


def test_a_stray_folder_is_pointed_to_model(tmp_path, capsys):
    """`medlite bench ARTIFACT` (the folder without --model): the usage error says where it goes."""
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"medlite bench --model {tmp_path}" in err and "unrecognized arguments" in err
    with pytest.raises(SystemExit):
        main(["bench", str(tmp_path / "missing")])
    assert "--model" not in capsys.readouterr().err.splitlines()[-1]
