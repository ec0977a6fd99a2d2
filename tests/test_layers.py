"""The package's layers: imports flow one way (docs/design.md draws them), and what login nodes load stays light."""

import io
import subprocess
import sys
import tokenize
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "smim_dist"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def statements(path: Path) -> list[list[str]]:
    """The file's logical lines as token strings. ``tokenize``, not ``ast``: on Python 3.11 ``ast`` is not thread-safe,
    and FFCV's loader threads left by earlier tests build ASTs of their own."""
    lines, line = [], []
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.NEWLINE:
            lines.append(line)
            line = []
        elif token.type in (tokenize.NAME, tokenize.OP):
            line.append(token.string)
    return lines


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every ``from smim_dist... import`` and ``import smim_dist...``, function-level ones too."""
    found = []
    for line in statements(path):
        if len(line) > 3 and line[0] == "from" and line[1] == "smim_dist":
            at = line.index("import")
            names = [word for before, word in zip(line[at:], line[at + 1:])
                     if word.isidentifier() and before != "as" and word != "as"]
            found.append(("".join(line[1:at]), names))
        elif line and line[0] == "import":
            modules = " ".join(line[1:]).split(" , ")
            found += [("".join(module.split(" as ")[0].split()), []) for module in modules
                      if module.startswith("smim_dist")]
    return found


def layer_of(module: str) -> str:
    """A subpackage, or a top-level module on its own: ``smim_dist.data.masking`` -> ``data``."""
    return module.split(".")[1] if module.count(".") else module


def import_graph(layer=lambda module: module) -> dict[str, set[str]]:
    graph = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        source = layer(module_name(path))
        for module, names in imports_of(path):
            submodules = [f"{module}.{name}" for name in names if (PACKAGE.parent / f"{module}.{name}".replace(
                ".", "/")).with_suffix(".py").exists()]
            for target in submodules or [module]:
                if layer(target) != source:
                    graph[source].add(layer(target))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                found.append(path[path.index(successor):] + [successor])
            elif successor not in state:
                visit(successor, [*path, successor])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_packages_import_each_other_in_one_direction():
    assert cycles(import_graph(layer_of)) == []


def test_modules_import_each_other_in_one_direction():
    assert cycles(import_graph()) == []


def drawn_layers() -> dict[str, int]:
    """docs/design.md's drawing: each name's row, counted from the bottom."""
    text = (REPO / "docs/design.md").read_text()
    block = text.split("<!-- layers:", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    rows = [line.split("  ")[0].split() for line in block.splitlines() if line.strip()]
    return {name.rstrip("/"): height for height, row in enumerate(reversed(rows)) for name in row}


def upward_imports(graph: dict[str, set[str]], rows: dict[str, int]) -> list[str]:
    return [f"{source} -> {target}" for source, targets in sorted(graph.items()) for target in sorted(targets)
            if rows[target] >= rows[source]]


def test_imports_point_down_the_drawing_in_the_docs():
    rows = drawn_layers()
    graph = import_graph(layer_of)
    assert set(graph) | {t for targets in graph.values() for t in targets} <= set(rows), "a layer the docs do not draw"
    assert upward_imports(graph, rows) == []
    assert upward_imports({"config": {"models"}}, rows) == ["config -> models"]


def test_the_walk_finds_a_cycle_when_there_is_one():
    assert cycles({"config": {"models"}, "models": {"config"}}) == [["config", "models", "config"]]
    assert import_graph(layer_of)["train"] >= {"config", "data", "engine"}


def test_no_module_imports_another_modules_private_names():
    private = [f"{module_name(path)}: {name} from {module}" for path in PACKAGE.rglob("*.py")
               for module, names in imports_of(path) for name in names if name.startswith("_")]
    assert private == []


@pytest.mark.e2e
def test_config_and_the_file_checks_load_without_torch_or_numba():
    """The SLURM launcher validates a run on a login node, where importing torch costs seconds (or is not there)."""
    code = ("import sys, smim_dist.config, smim_dist.preflight\n"
            "print(sorted(m for m in ('torch', 'numba', 'deepspeed', 'ffcv') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "[]"
