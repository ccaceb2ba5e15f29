"""Options declared once: each is a dataclass field that carries its default, its help, its command-line
spelling, its choices and its limits. The command line, config files and the checks are generated
from the fields, so that they cannot drift apart.

``option(default, help, ...)`` makes such a field. Its metadata are plain data (strings, numbers,
tuples), readable by anything that builds a form or a request schema:

- ``help``: one line for ``--help``; "(default: X)" is added unless the text gives its own.
- ``flag``: the command-line spelling (default ``--field-name``). A bool that is off by default is
  turned on by its flag; one that is on by default is turned off by a ``--no-...`` flag, or has both
  spellings (``--deterministic`` / ``--no-deterministic``).
- ``choices``: the allowed values (of every element, for a tuple).
- ``minimum``, ``exclusive_minimum``, ``maximum``, ``exclusive_maximum``: numeric limits, as in JSON Schema.
- ``parse``: a function from text to the value, for spellings beyond the type (a sampler's WebUI name).
- ``required``: the command line (or a config file) must give it, whatever the library's default.
- ``one_of``: exactly one of the fields that share this name is given.
- ``cli``: False for an option of the library only (no flag). ``file``: False for an option that only the
  command line sets (a config file's value is ignored). ``metavar``: argparse's.

Values are checked at two levels. Where text becomes a value (a flag, a config file), it must be of
the option's kind: its type and its lower limit ("expected a positive integer, got '0'"), which the
command line reports as a usage error (status 2); a comma-separated list is checked whole there.
``check_options``, which every dataclass's ``validate()`` calls, checks everything again (types,
choices, lower and upper limits) whatever the values came from, Python included; the dataclass adds
the rules between options.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from inkwash.errors import InkwashError

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    choices: typing.Iterable | None = None,
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
    maximum: float | None = None,
    exclusive_maximum: float | None = None,
    parse: Callable[[str], Any] | None = None,
    required: bool = False,
    one_of: str | None = None,
    cli: bool = True,
    file: bool = True,
    metavar: str | None = None,
) -> Any:
    """A dataclass field for an option; only the metadata that differ from the defaults are stored."""
    metadata = {
        "help": help,
        "flag": flag,
        "choices": tuple(choices) if choices is not None else None,
        "minimum": minimum,
        "exclusive_minimum": exclusive_minimum,
        "maximum": maximum,
        "exclusive_maximum": exclusive_maximum,
        "parse": parse,
        "required": required or None,
        "one_of": one_of,
        "cli": None if cli else False,
        "file": None if file else False,
        "metavar": metavar,
    }
    return field(default=default, metadata={key: value for key, value in metadata.items() if value is not None})


@dataclass(frozen=True)
class Spec:
    """One option as the machinery sees it: its field's name, type and default, and its metadata."""

    name: str
    type: type  # int, float, str or bool: of the value, or of each element of a tuple
    optional: bool  # None is a value (it means "the default behaviour")
    sequence: bool  # a tuple of values, written comma-separated on the command line
    default: Any
    meta: Mapping[str, Any]

    @property
    def flag(self) -> str:
        return self.meta.get("flag", "--" + self.name.replace("_", "-"))

    @property
    def label(self) -> str:
        """How errors name the option: its flag, or its field name when it has none."""
        return self.flag if self.meta.get("cli", True) else self.name

    @property
    def required(self) -> bool:
        return self.default is MISSING or bool(self.meta.get("required"))


@functools.cache
def specs(cls: type) -> tuple[Spec, ...]:
    """The options of a dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    result = []
    for item in fields(cls):
        kind, optional, sequence = _resolve(hints[item.name])
        result.append(Spec(item.name, kind, optional, sequence, item.default, item.metadata))
    return tuple(result)


def _resolve(hint: Any) -> tuple[type, bool, bool]:
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        optional = len(members) < len(typing.get_args(hint))
        (hint,) = members
    sequence = typing.get_origin(hint) in (tuple, list)
    if sequence:
        hint = typing.get_args(hint)[0]
    if hint not in (int, float, str, bool):
        raise TypeError(f"an option is an int, float, str or bool, or a tuple of them; got {hint}")
    return hint, optional, sequence


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _interval(spec: Spec) -> str | None:
    """Both limits as text ("[0, 1)", "4..1024"), or None when the option lacks one of them."""
    meta = spec.meta
    low, high = meta.get("minimum", meta.get("exclusive_minimum")), meta.get("maximum", meta.get("exclusive_maximum"))
    if low is None or high is None:
        return None
    if spec.type is int and "minimum" in meta and "maximum" in meta:
        return f"{_number(low)}..{_number(high)}"
    opening = "[" if "minimum" in meta else "("
    closing = "]" if "maximum" in meta else ")"
    return f"{opening}{_number(low)}, {_number(high)}{closing}"


def kind(spec: Spec) -> str:
    """What a value of the option is, with its lower limit: "a positive integer", "a number >= 0"."""
    meta = spec.meta
    noun = {int: "integer", float: "number", str: "text", bool: "true or false"}[spec.type]
    if spec.sequence:
        if "choices" in meta:
            return f"one or more of {', '.join(map(str, meta['choices']))}, comma-separated"
        limits = _interval(spec) or (f">= {_number(meta['minimum'])}" if "minimum" in meta else "")
        return f"comma-separated {noun}s" + (f" in {limits}" if limits else "")
    if spec.type not in (int, float):
        return noun
    if meta.get("exclusive_minimum") == 0 or (spec.type is int and meta.get("minimum") == 1):
        return f"a positive {noun}"
    low = f" >= {_number(meta['minimum'])}" if "minimum" in meta else ""
    low = f" > {_number(meta['exclusive_minimum'])}" if "exclusive_minimum" in meta else low
    return f"{'an' if spec.type is int else 'a'} {noun}{low}"


def _within(spec: Spec, value: float) -> tuple[bool, bool]:
    """Whether ``value`` keeps the option's lower limit and its upper limit (a non-finite one keeps neither)."""
    meta, finite = spec.meta, math.isfinite(value)
    low = finite and value >= meta.get("minimum", -math.inf) and value > meta.get("exclusive_minimum", -math.inf)
    high = finite and value <= meta.get("maximum", math.inf) and value < meta.get("exclusive_maximum", math.inf)
    return low, high


def _is_type(kind_: type, value: Any) -> bool:
    if kind_ in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind_ is float else kind_)


def _scalar(spec: Spec, text: str) -> Any:
    if spec.type is bool:  # a bool is a flag, never text
        raise ValueError(text)
    return spec.type(text)


def parse_text(spec: Spec, text: str) -> Any:
    """The value that ``text`` gives an option, of the option's kind; ValueError with a one-line reason."""
    if "parse" in spec.meta:
        return spec.meta["parse"](text)
    expected = f"expected {kind(spec)}, got {text!r}"
    parts = [part.strip() for part in text.split(",") if part.strip()] if spec.sequence else [text]
    try:
        values = [_scalar(spec, part) for part in parts]
    except ValueError:
        raise ValueError(expected) from None
    choices = spec.meta.get("choices")
    unknown = [value for value in values if spec.sequence and choices is not None and value not in choices]
    if unknown:
        raise ValueError(f"unknown {spec.name} {', '.join(map(repr, unknown))}; choose from {', '.join(choices)}")
    limits = [_within(spec, value) for value in values if spec.type in (int, float)]
    # A single value against its lower limit (validate() checks the upper one); a list whole.
    if not values or not all(low and (high or not spec.sequence) for low, high in limits):
        raise ValueError(expected)
    return tuple(values) if spec.sequence else values[0]


def check_value(spec: Spec, value: Any, label: str) -> str | None:
    """Why ``value`` is not a valid value of the option, as one line that starts with ``label``; None if it is."""
    if value is None:
        return None if spec.optional else f"{label} must be {kind(spec)}, got None"
    if spec.sequence and (not isinstance(value, (tuple, list)) or not value):
        return f"{label} must be {kind(spec)}, got {value!r}"
    for item in value if spec.sequence else (value,):
        if not _is_type(spec.type, item):
            return f"{label} must be {kind(spec)}, got {value!r}"
        if "parse" in spec.meta:
            try:
                item = spec.meta["parse"](item)
            except ValueError as exc:
                return f"{label}: {exc}"
        choices = spec.meta.get("choices")
        if choices is not None and item not in choices:
            return f"{label} must be one of {', '.join(map(str, choices))}, got {item!r}"
        if spec.type not in (int, float):
            continue
        low, high = _within(spec, item)
        interval = _interval(spec)
        if interval is not None and not (low and high):
            return f"{label} must be in {interval}, got {value!r}"
        if not low:
            return f"{label} must be {kind(spec)}, got {value!r}"
        if not high:
            limit = spec.meta.get("maximum", spec.meta.get("exclusive_maximum"))
            return f"{label} must be {'at most' if 'maximum' in spec.meta else 'below'} {_number(limit)}, got {value!r}"
    return None


def check_options(options: Any) -> None:
    """Check every option of a dataclass instance (types, choices, limits, ``one_of``); InkwashError names it."""
    groups: dict[str, list[Spec]] = {}
    for spec in specs(type(options)):
        problem = check_value(spec, getattr(options, spec.name), spec.label)
        if problem:
            raise InkwashError(problem)
        if "one_of" in spec.meta:
            groups.setdefault(spec.meta["one_of"], []).append(spec)
    for members in groups.values():
        if sum(getattr(options, spec.name) is not None for spec in members) != 1:
            raise InkwashError(f"give exactly one of {' and '.join(spec.label for spec in members)}")


def default_text(spec: Spec) -> str:
    """The default as ``--help`` shows it; empty when the flag's absence says it (an off switch, None)."""
    if spec.default is MISSING or spec.default is None:
        return ""
    if spec.type is bool and not spec.sequence:
        both_ways = spec.default is True and not spec.flag.startswith("--no-")
        return ("on" if spec.default else "off") if both_ways else ""
    if spec.sequence:
        return ",".join(map(str, spec.default))
    return str(spec.default)


def help_text(spec: Spec) -> str:
    text = spec.meta.get("help", "")
    shown = "" if spec.required else default_text(spec)  # a required option's library default is not the CLI's
    if spec.meta.get("required"):
        text = f"{text} (required)"
    elif shown and "(default" not in text:
        text = f"{text} (default: {shown})".strip()
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, required: bool = True) -> None:
    """One argument per option of ``cls``, whose ``dest`` is the field's name. None has a default: the
    namespace holds only the options given, so that they can override a config file. ``required=False``
    leaves the required options to ``missing_options`` (when a config file may give them)."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for spec in specs(cls):
        if not spec.meta.get("cli", True):
            continue
        target: Any = parser
        if "one_of" in spec.meta:
            name = spec.meta["one_of"]
            if name not in groups:
                groups[name] = parser.add_mutually_exclusive_group(required=required)
            target = groups[name]
        arguments: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": help_text(spec)}
        if spec.type is bool and not spec.sequence:
            if spec.flag.startswith("--no-"):
                arguments["action"] = "store_false"
            elif spec.default is True:
                arguments["action"] = argparse.BooleanOptionalAction
            else:
                arguments["action"] = "store_true"
        else:
            arguments["type"] = _argparse_type(spec)
            arguments["metavar"] = spec.meta.get("metavar")
            if "choices" in spec.meta and not spec.sequence:
                arguments["choices"] = spec.meta["choices"]
            if required and spec.required and "one_of" not in spec.meta:
                arguments["required"] = True
        target.add_argument(spec.flag, **arguments)


def _argparse_type(spec: Spec) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse_text(spec, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = spec.name  # argparse names the type in some messages
    return convert


def given_options(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The options of ``cls`` given on the command line."""
    return {spec.name: getattr(namespace, spec.name) for spec in specs(cls) if hasattr(namespace, spec.name)}


def missing_options(cls: type, values: Mapping[str, Any]) -> list[str]:
    """The flags of the required options that ``values`` lacks."""
    return [spec.flag for spec in specs(cls) if spec.required and spec.name not in values]


def read_config_file(cls: type, path: str | Path, section: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options of ``cls`` in a TOML, YAML or JSON file, each checked; InkwashError names the key.

    The options are the file's top-level keys (``batch_size`` or ``batch-size``), or the keys of its
    ``section`` table when it has one (a run's config.json keeps its ``TrainConfig`` under "train"; the
    rest of that file records what the run derived, and is not read). Returns ``(values, ignored)``:
    ``ignored`` holds the keys of options that only the command line sets (``file=False``).
    """
    path = Path(path)
    table = _load(path)
    if section is not None and isinstance(table.get(section), dict):
        table = table[section]
    by_name = {spec.name: spec for spec in specs(cls)}
    values, ignored = {}, {}
    for key, raw in table.items():
        name = str(key).replace("-", "_")
        spec = by_name.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InkwashError(f"{path}: unknown key {key!r}{hint}")
        label = f"{path}: {key}"
        try:
            value = _from_file(spec, raw)
        except ValueError as exc:
            raise InkwashError(f"{label}: {exc}") from None
        problem = check_value(spec, value, label)
        if problem:
            raise InkwashError(problem)
        if spec.meta.get("file", True):
            values[name] = value
        else:
            ignored[name] = value
    return values, ignored


def _from_file(spec: Spec, value: Any) -> Any:
    """A file's value in the option's type: text for a number or a list is parsed as on the command line
    (YAML reads 1e-3 as text), an integer is a float where a float is meant, a list becomes a tuple."""
    if isinstance(value, str) and (spec.type in (int, float) or spec.sequence or "parse" in spec.meta):
        return parse_text(spec, value)
    if spec.type is float and _is_type(int, value):
        return float(value)
    if spec.sequence and isinstance(value, list):
        return tuple(float(v) if spec.type is float and _is_type(int, v) else v for v in value)
    return value


def _load(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise InkwashError(f"a config file ends in {', '.join(CONFIG_SUFFIXES)}; got {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InkwashError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise InkwashError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise InkwashError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if suffix == ".json":
            table = json.loads(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            table = tomllib.loads(text)
        else:
            table = _load_yaml(text)
    except ValueError as exc:  # TOMLDecodeError, JSONDecodeError, YAMLError: their message on one line
        raise InkwashError(f"cannot parse {path}: {' '.join(str(exc).split())}") from None
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise InkwashError(f"{path} must hold a table of options (key = value), not a {type(table).__name__}")
    return table


def _load_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None
