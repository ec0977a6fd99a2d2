"""``smim-eval``'s options: flags, help and defaults come from each protocol's options dataclass, the shipped
configs/eval files parse for their protocol and state the defaults, options typed on the command line win over the
file, and a bad file or value is refused with its key named, and the nearest valid one, before any compute."""

import dataclasses
from pathlib import Path

import pytest

from smim_dist.eval.cli import PROTOCOLS, main, parse_args
from smim_dist.eval.options import field_docs

from conftest import REPO

CONFIGS = sorted((REPO / "configs" / "eval").glob("*.yaml"))


def flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def test_every_protocol_has_a_config():
    assert {path.stem for path in CONFIGS} == set(PROTOCOLS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_shipped_configs_parse_and_match_the_defaults_where_the_defaults_are_the_papers(path):
    with_file = parse_args([path.stem, "--checkpoint", "run", "--config", str(path)]).options
    defaults = PROTOCOLS[path.stem].options()
    changed = {key for key, value in vars(defaults).items() if getattr(with_file, key) != value}
    assert changed <= {"layer", "query", "lr"}, changed  # ViT-B specifics the code leaves to the model's size
    if path.stem == "attention":
        assert with_file.layer == 11 and with_file.query == (7, 7)


def test_shipped_configs_are_found_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    reference = parse_args(["linear", "--checkpoint", "run", "--config", str(REPO / "configs/eval/linear.yaml")])
    for name in ("linear.yaml", "linear"):
        args = parse_args(["linear", "--checkpoint", "run", "--config", name])
        assert (args.options, args.overrides) == (reference.options, reference.overrides), name
    assert main(["linear", "--checkpoint", "run", "--config", "lienar.yaml"]) == 2
    assert "the shipped configs: attention.yaml, finetune.yaml, knn.yaml, linear.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_parser_adds_no_default_of_its_own(protocol):
    """Every field is a flag that takes its default written out, and a flag left out leaves the dataclass's value."""
    options = PROTOCOLS[protocol].options
    written = []
    for field in dataclasses.fields(options):
        if field.default is not None and not isinstance(field.default, bool):
            value = field.default
            written += [flag(field), ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    assert parse_args([protocol, "--checkpoint", "run"]).options == options()
    assert parse_args([protocol, "--checkpoint", "run", *written]).options == options()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_help_lists_every_field_with_its_docstring_and_default(protocol, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([protocol, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    options, docs = PROTOCOLS[protocol].options, field_docs(PROTOCOLS[protocol].options)
    for field in dataclasses.fields(options):
        assert f"{flag(field)} " in text and f"(default {field.default})" in text, field.name
    assert exit_.value.code == 0 and all(doc in text for doc in docs.values())


def test_existing_spellings_still_parse():
    assert parse_args(["finetune", "--checkpoint", "run", "--reprob", "0.5", "--global-pool", "token"]).options \
        == PROTOCOLS["finetune"].options(re_prob=0.5, global_pool="token")
    attention = parse_args(["attention", "--checkpoint", "run", "--query", "3,4", "--layer", "2"]).options
    assert (attention.query, attention.layer) == ((3, 4), 2)
    assert parse_args(["knn", "--checkpoint", "run", "--feature", "cls", "--force"]).options.force


@pytest.mark.parametrize("argv, hint", [
    (["knn", "--feature", "clss"], "did you mean 'cls'?"),
    (["finetune", "--global-pool", "tokn"], "did you mean 'token'?"),
])
def test_a_bad_choice_gets_the_nearest_one(capsys, argv, hint):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--checkpoint", "run"])
    assert exit_.value.code == 2 and hint in capsys.readouterr().err


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def runs(monkeypatch) -> list:
    """What the protocols were called with; none of them runs."""
    calls = []
    for name, protocol in PROTOCOLS.items():
        monkeypatch.setitem(PROTOCOLS, name, protocol._replace(run=lambda *args: calls.append(args)))
    return calls


def test_the_command_line_wins_and_overrides_add_up(tmp_path, runs):
    path = write(tmp_path, "epochs: 3\nblock: 2\nforce: true\noverrides: [data.num_workers=0]\n")
    assert main(["linear", "--epochs", "5", "--checkpoint", "run", "--config", str(path), "--lr", "0.2",
                 "data.demo=true"]) == 0
    [(checkpoint, out, options, overrides)] = runs
    assert (checkpoint, out, overrides) == (Path("run"), None, ["data.num_workers=0", "data.demo=true"])
    assert options == PROTOCOLS["linear"].options(epochs=5, block=2, force=True, lr=0.2)


@pytest.mark.parametrize("protocol, text, expected", [
    ("linear", "epochs: 3\nblokc: 2\n", "unknown key 'blokc'; did you mean 'block'?"),
    ("linear", "overides: [data.demo=true]\n", "unknown key 'overides'; did you mean 'overrides'?"),
    ("linear", "- epochs\n", "must be a mapping"),
    ("linear", "epochs: many\n", "epochs: expected int, got str 'many'"),
    ("linear", "force: 1\n", "force: expected bool, got int 1"),
    ("linear", "overrides: data.demo=true\n", "overrides: expected a list"),
    ("knn", "feature: clss\n", "feature: 'clss' is not one of cls, patch, both; did you mean 'cls'?"),
    ("attention", "query: [7]\n", "query: expected"),
])
def test_a_bad_config_is_refused_naming_the_file_and_the_key(tmp_path, capsys, runs, protocol, text, expected):
    path = write(tmp_path, text)
    assert main([protocol, "--checkpoint", "run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"smim-eval: {path}") and expected in err and not runs
