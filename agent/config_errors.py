"""Where a config problem is: the line of a TOML key path, and errors as `FILE:LINE: field: ...`.

Turns tomllib and pydantic errors into messages that name the file, the line and the key.
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

from runtimes.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - JetPack 6 ships Python 3.10
    import tomli as tomllib

__all__ = [
    "ConfigProblem",
    "Loc",
    "LocatedValueError",
    "TomlLocator",
    "decode_error_position",
    "describe",
    "format_loc",
    "report",
    "tomllib",
]

Loc = tuple[str | int, ...]


class ConfigProblem(ConfigError):
    """A config problem that knows the key path it belongs to."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(f"{format_loc(loc)}: {message}")
        self.loc = loc
        self.message = message


class LocatedValueError(ValueError):
    """Raised inside validators: pydantic keeps it in `ctx`, so its `loc` reaches the line."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc


def format_loc(loc: Loc) -> str:
    """`("pipelines", 1, "conf")` as `pipelines[1].conf`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


class TomlLocator:
    """The line of every key and table header in a TOML text, by key path.

    Array-of-tables headers count up: the second `[[pipelines]]` is `("pipelines", 1)`.
    The text must already be valid TOML (parse it with tomllib first).
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._newlines = [i for i, ch in enumerate(text) if ch == "\n"]
        self._lines: dict[Loc, int] = {}
        with contextlib.suppress(ValueError, IndexError):  # a shape it misreads: fewer lines
            self._scan()

    def line_of(self, loc: Loc) -> int:
        """The line of the longest prefix of `loc` found in the text (1 if none)."""
        for end in range(len(loc), 0, -1):
            line = self._lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return 1

    def _record(self, loc: Loc, pos: int) -> None:
        self._lines.setdefault(loc, bisect.bisect_right(self._newlines, pos) + 1)

    def _scan(self) -> None:
        text, i = self._text, 0
        table: Loc = ()
        arrays: dict[Loc, int] = {}
        while i < len(text):
            ch = text[i]
            if ch in " \t\r\n":
                i += 1
            elif ch == "#":
                i = _end_of_line(text, i)
            elif ch == "[":
                start, is_array = i, text.startswith("[[", i)
                parts, i = _parse_key(text, i + (2 if is_array else 1))
                i = text.index("]", i) + (2 if is_array else 1)
                table = self._resolve_header(parts, arrays, is_array, start)
            else:
                start = i
                parts, i = _parse_key(text, i)
                i = text.index("=", i) + 1
                self._record(table + tuple(parts), start)
                i = _skip_value(text, i)

    def _resolve_header(
        self, parts: list[str], arrays: dict[Loc, int], is_array: bool, pos: int
    ) -> Loc:
        resolved: list[str | int] = []
        for n, part in enumerate(parts):
            resolved.append(part)
            key = tuple(resolved)
            if is_array and n == len(parts) - 1:
                self._record(key, pos)
                arrays[key] = arrays.get(key, -1) + 1
                resolved.append(arrays[key])
            elif key in arrays:
                resolved.append(arrays[key])
        self._record(tuple(resolved), pos)
        return tuple(resolved)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _parse_key(text: str, i: int) -> tuple[list[str], int]:
    parts: list[str] = []
    while True:
        while text[i] in " \t":
            i += 1
        if text[i] in "\"'":
            end = _skip_string(text, i)
            parts.append(str(tomllib.loads("k = " + text[i:end])["k"]))
            i = end
        else:
            match = _BARE_KEY.match(text, i)
            if match is None:
                raise ValueError(f"no TOML key at offset {i}")
            parts.append(match.group())
            i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == ".":
            i += 1
            continue
        return parts, i


def _end_of_line(text: str, i: int) -> int:
    end = text.find("\n", i)
    return len(text) if end < 0 else end


def _skip_string(text: str, i: int) -> int:
    """From an opening quote to just past the closing one (all four TOML string kinds)."""
    quote = text[i]
    if text.startswith(quote * 3, i):
        j = i + 3
        while True:
            j = text.index(quote * 3, j)
            if quote == '"' and _escaped(text, j):
                j += 1
                continue
            j += 3
            while j < len(text) and text[j] == quote:  # up to two quotes may end the content
                j += 1
            return j
    j = i + 1
    while True:
        j = text.index(quote, j)
        if quote == '"' and _escaped(text, j):
            j += 1
            continue
        return j + 1


def _escaped(text: str, j: int) -> bool:
    backslashes = 0
    while j - backslashes - 1 >= 0 and text[j - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def _skip_value(text: str, i: int) -> int:
    while text[i] in " \t":
        i += 1
    if text[i] in "\"'":
        return _skip_string(text, i)
    if text[i] not in "[{":
        return _end_of_line(text, i)
    depth = 0
    while True:
        ch = text[i]
        if ch in "\"'":
            i = _skip_string(text, i)
            continue
        if ch == "#":
            i = _end_of_line(text, i)
            continue
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1


def decode_error_position(exc: tomllib.TOMLDecodeError, text: str) -> tuple[int, int, str]:
    message = str(exc)
    lineno, colno = getattr(exc, "lineno", None), getattr(exc, "colno", None)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        message = message[: match.start()]
        lineno, colno = int(match.group(1)), int(match.group(2))
    elif message.endswith("(at end of document)"):
        message = message.removesuffix("(at end of document)").rstrip()
        lineno, colno = text.count("\n") + 1, 1
    if isinstance(exc.args, tuple) and len(exc.args) > 1 and isinstance(exc.args[0], str):
        message = exc.args[0]  # Python 3.14 keeps the bare message first
    return int(lineno or 1), int(colno or 1), message


def describe(error: Any, data: Any, root: type[BaseModel]) -> tuple[Loc, str]:
    """One pydantic error as (key path in the file, message a person can act on)."""
    loc: Loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, LocatedValueError):
        loc = loc + cause.loc
    loc = _strip_union_tags(loc, data)
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        allowed = _fields_at(root, loc[:-1], data)
        message = f"unknown key {loc[-1]!r}"
        if allowed:
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            if close:
                message += f", did you mean {close[0]!r}?"
            message += f" (allowed here: {', '.join(allowed)})"
    elif kind == "missing":
        message = f"required key {loc[-1]!r} is missing"
    elif kind == "union_tag_not_found":
        message = "needs a 'type' key"
    elif kind == "value_error":
        message = str(cause) if cause is not None else message.removeprefix("Value error, ")
    return loc, message


def _strip_union_tags(loc: Loc, data: Any) -> Loc:
    """Drop the tag pydantic inserts for a tagged union (`runtime.onnx.threads`)."""
    out: list[str | int] = []
    node: Any = data
    for part in loc:
        if isinstance(node, (dict, list)) and _has(node, part):
            node = node[part]  # type: ignore[index]
        elif isinstance(node, dict) and node.get("type") == part:
            continue
        else:
            node = None
        out.append(part)
    return tuple(out)


def _fields_at(root: type[BaseModel], loc: Loc, data: Any) -> list[str]:
    """The field names allowed in the table at `loc` (empty if it is not a model)."""
    annotation: Any = root
    node: Any = data
    for part in loc:
        model = _model_of(annotation, node)
        if isinstance(part, int):
            args = get_args(_unwrap(annotation, node))
            annotation = args[0] if args else None
        elif model is not None and part in model.model_fields:
            annotation = model.model_fields[part].annotation
        else:
            return []
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None  # type: ignore[index]
    model = _model_of(annotation, node)
    return list(model.model_fields) if model is not None else []


def _has(node: dict[str, Any] | list[Any], part: str | int) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(part, int) and 0 <= part < len(node)


def _unwrap(annotation: Any, node: Any) -> Any:
    """Optional[X] -> X; a union of models -> the member whose `type` matches the data."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0], node)
        tag = node.get("type") if isinstance(node, dict) else None
        for member in members:
            if isinstance(member, type) and issubclass(member, BaseModel):
                field = member.model_fields.get("type")
                if field is not None and tag in get_args(field.annotation):
                    return member
        return None
    return annotation


def _model_of(annotation: Any, node: Any) -> type[BaseModel] | None:
    annotation = _unwrap(annotation, node)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def report(file: Path, locator: TomlLocator, problems: list[tuple[Loc, str]]) -> str:
    lines = sorted((locator.line_of(loc), format_loc(loc), msg) for loc, msg in problems)
    head = f"invalid config {file} ({len(lines)} problem{'s' if len(lines) != 1 else ''}):"
    return "\n".join([head, *(f"  {file}:{line}: {where}: {msg}" for line, where, msg in lines)])
