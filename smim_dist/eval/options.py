"""``smim-eval``'s options, generated from each protocol's options dataclass.

A field is at once a flag (``--field-name``, its type, its default, its docstring as help), a key of a ``--config``
file, and the value the protocol runs with, so the three cannot drift apart. A file is checked as a training config is
(``config_loading.build``: an unknown key gets the nearest valid one, a value its type), and options given on the
command line win over it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from smim_dist.config import SHIPPED_CONFIGS, find_config
from smim_dist.config_loading import ConfigError, build, not_one_of, read_chain

T = TypeVar("T")
OVERRIDES = "overrides"
"""the --config key holding data.* overrides of the run's config"""


def option(default: Any, *, flag: str | None = None, choices: Sequence[str] = (), metavar: str | None = None) -> Any:
    """A field whose flag is not spelled ``--field-name``, whose value is one of ``choices``, or whose value is
    written as ``metavar`` shows."""
    return dataclasses.field(default=default, metadata={"flag": flag, "choices": tuple(choices), "metavar": metavar})


def recipe_of(options: Any, recipe: type[T]) -> T:
    """The recipe part of a protocol's options (which extend it): what its stored results are matched on, where how
    many images one forward pass takes, say, changes no number."""
    return recipe(**{field.name: getattr(options, field.name) for field in dataclasses.fields(recipe)})


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal after it, as smim_dist.config documents its fields), inherited ones
    included. Python keeps no trace of them at run time, so they are read from the source with ``tokenize``: the
    ``ast`` module (``inspect.getsource`` of a class too) is not thread-safe on Python 3.11, where FFCV's loader
    threads build ASTs of their own."""
    docs: dict[str, str] = {}
    for klass in reversed([klass for klass in cls.__mro__ if dataclasses.is_dataclass(klass)]):
        body = _class_body(klass)
        for field, after in zip(body, body[1:]):
            annotated = len(field) > 1 and field[0].type == tokenize.NAME and field[1].string == ":"
            if annotated and len(after) == 1 and after[0].type == tokenize.STRING:
                docs[field[0].string] = " ".join(_string_value(after[0].string).split())
    return docs


def _class_body(klass: type) -> list[list[tokenize.TokenInfo]]:
    """The logical lines directly inside the top-level class ``klass`` of its module, as tokens."""
    source = Path(inspect.getsourcefile(klass)).read_text()
    body, line, depth, line_depth, inside = [], [], 0, 0, False
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.INDENT:
            depth += 1
        elif token.type == tokenize.DEDENT:
            depth -= 1
        elif token.type == tokenize.NEWLINE:
            if line_depth == 0 and inside:
                break
            if line_depth == 0 and [t.string for t in line[:2]] == ["class", klass.__name__]:
                inside = True
            elif inside and line_depth == 1:
                body.append(line)
            line = []
        elif token.type not in (tokenize.NL, tokenize.COMMENT):
            if not line:
                line_depth = depth
            line.append(token)
    return body


def _string_value(literal: str) -> str:
    """The text of a plain (not f-, not byte) string literal, without evaluating it."""
    body = literal.lstrip("rRuU")
    quote = body[:3] if body[:3] in ('"""', "'''") else body[0]
    return body[len(quote):-len(quote)]


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        problem = not_one_of(text, choices)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return text
    return parse


def _items(kinds: tuple[type, ...], metavar: str) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        parts = text.split(",")
        try:
            if len(parts) != len(kinds):
                raise ValueError
            return tuple(kind(part) for kind, part in zip(kinds, parts))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {metavar} ({len(kinds)} values: "
                                             f"{', '.join(kind.__name__ for kind in kinds)})") from None
    return parse


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """A flag per field of ``cls``. A flag left out sets nothing (argparse.SUPPRESS), so a --config file's value stands
    where the command line is silent, and the dataclass's default where both are. Bool fields default to False and
    are switches."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for field in dataclasses.fields(cls):
        flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
        text = f"{docs.get(field.name, '')} (default {field.default})".strip().replace("%", "%%")
        kind = hints[field.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind, = (member for member in typing.get_args(kind) if member is not type(None))
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action="store_true", default=argparse.SUPPRESS, help=text)
            continue
        choices, metavar = field.metadata.get("choices"), field.metadata.get("metavar")
        if choices:
            kind, metavar = _choice(choices), "{" + ",".join(choices) + "}"
        elif typing.get_origin(kind) is tuple:
            kind = _items(typing.get_args(kind), metavar or field.name.upper())
        parser.add_argument(flag, dest=field.name, type=kind, metavar=metavar, default=argparse.SUPPRESS, help=text)


def load_options(cls: type, config: Path | None, given: dict[str, Any]) -> tuple[Any, list[str]]:
    """The options a protocol runs with, the command line's (``given``) over the ``--config`` file's over the
    dataclass's defaults, and the file's data.* overrides. The file is read as a training config is, against ``cls``
    plus its ``overrides`` key, so that key is checked, and suggested for a typo, like any other."""
    if config is None:
        return cls(**given), []
    path = find_config(config, SHIPPED_CONFIGS / "eval")
    schema = dataclasses.make_dataclass(cls.__name__, [(OVERRIDES, tuple[str, ...], dataclasses.field(default=()))],
                                        bases=(cls,), frozen=True)
    from_file = build(schema, read_chain(path, schema), "", str(path))
    for field in dataclasses.fields(cls):
        choices = field.metadata.get("choices")
        problem = choices and not_one_of(getattr(from_file, field.name), choices)
        if problem:
            raise ConfigError(f"{path}: {field.name}: {problem}")
    options = cls(**{field.name: getattr(from_file, field.name) for field in dataclasses.fields(cls)})
    return dataclasses.replace(options, **given), list(getattr(from_file, OVERRIDES))
