"""``smim-eval --config``: the shipped configs/eval files parse for their protocol and state the defaults, options
typed on the command line win over the file, and a bad file is refused with its key named, before any compute."""

from pathlib import Path

import pytest

from smim_dist.eval.cli import main, parse_args

from conftest import REPO

CONFIGS = sorted((REPO / "configs" / "eval").glob("*.yaml"))


def test_every_protocol_has_a_config():
    assert {path.stem for path in CONFIGS} >= {"knn", "linear", "seg", "attention"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_shipped_configs_parse_and_match_the_defaults_where_the_defaults_are_the_papers(path):
    with_file = vars(parse_args([path.stem, "--checkpoint", "run", "--config", str(path)]))
    defaults = vars(parse_args([path.stem, "--checkpoint", "run"]))
    changed = {key for key in defaults if key != "config" and with_file[key] != defaults[key]}
    assert changed <= {"layer", "query", "lr"}, changed  # ViT-B specifics the code leaves to the model's size
    if path.stem == "attention":
        assert with_file["layer"] == 11 and with_file["query"] == (7, 7)


def test_shipped_configs_are_found_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    reference = vars(parse_args(["linear", "--checkpoint", "run", "--config", str(REPO / "configs/eval/linear.yaml")]))
    for name in ("linear.yaml", "linear"):
        args = vars(parse_args(["linear", "--checkpoint", "run", "--config", name]))
        assert {**args, "config": None} == {**reference, "config": None}, name
    assert main(["linear", "--checkpoint", "run", "--config", "lienar.yaml"]) == 2
    assert "the shipped configs: attention.yaml, finetune.yaml, knn.yaml, linear.yaml" in capsys.readouterr().err


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(text)
    return path


def test_the_command_line_wins_and_overrides_add_up(tmp_path):
    path = write(tmp_path, "epochs: 3\nblock: 2\nforce: true\noverrides: [data.num_workers=0]\n")
    args = parse_args(["linear", "--checkpoint", "run", "--config", str(path), "--epochs", "5", "data.demo=true"])
    assert (args.epochs, args.block, args.force) == (5, 2, True)
    assert args.overrides == ["data.num_workers=0", "data.demo=true"]


@pytest.mark.parametrize("text, expected", [
    ("epochs: 3\nlayers: 2\n", "unknown key(s) layers"),
    ("- epochs\n", "expected a mapping"),
    ("force: 1\n", "`force` is a switch"),
    ("overrides: data.demo=true\n", "must be a list"),
])
def test_a_bad_config_is_refused_naming_the_key(tmp_path, capsys, text, expected):
    path = write(tmp_path, text)
    assert main(["linear", "--checkpoint", str(tmp_path / "no_run"), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err


def test_a_value_of_the_wrong_type_gets_argparses_own_error(tmp_path, capsys):
    path = write(tmp_path, "epochs: many\n")
    with pytest.raises(SystemExit) as exit_:
        parse_args(["linear", "--checkpoint", "run", "--config", str(path)])
    assert exit_.value.code == 2 and "--epochs: invalid int value: 'many'" in capsys.readouterr().err
