"""Rule-file reading: safe YAML -> plain data plus the line of every node, for error messages."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from relayout.errors import RelayoutError

MAX_BYTES = 1 << 20  # a rule file is a few KB; refuse anything that is not plausibly one
MAX_NODES = 100_000
MAX_DEPTH = 64


@dataclass(frozen=True)
class Located:
    """Parsed YAML data with the 1-based line of each JSON path ('$', '$.layouts.peft-2d', ...)."""

    data: object
    lines: dict[str, int]

    def line(self, path: str) -> int:
        """The line of `path`, or of its nearest ancestor that has one."""
        while path not in self.lines and path != "$":
            path = _parent(path)
        return self.lines.get(path, 1)


def _parent(path: str) -> str:
    cut = max(path.rfind("."), path.rfind("["))
    return path[:cut] if cut > 0 else "$"


def child_path(path: str, key: object) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"


class _Builder:
    """Turns a composed YAML node tree into dicts/lists/scalars, refusing aliases and huge inputs."""

    def __init__(self, loader: yaml.SafeLoader):
        self.loader = loader
        self.lines: dict[str, int] = {}
        self.count = 0

    def build(self, node: yaml.Node, path: str, depth: int) -> object:
        self.count += 1
        if self.count > MAX_NODES or depth > MAX_DEPTH:
            raise RelayoutError(f"line {node.start_mark.line + 1}: document too large or too deeply nested")
        self.lines[path] = node.start_mark.line + 1
        plain = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}.get(type(node))
        if plain is not None and node.tag != plain:  # scalars go through the safe constructor, which refuses tags
            raise RelayoutError(f"line {node.start_mark.line + 1}: YAML tag {node.tag!r} is not allowed in rule files")
        if isinstance(node, yaml.MappingNode):
            out: dict[str, object] = {}
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node)
                if not isinstance(key, str):
                    raise RelayoutError(f"line {key_node.start_mark.line + 1}: mapping key {key!r} is not a string")
                if key in out:
                    raise RelayoutError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
                out[key] = self.build(value_node, child_path(path, key), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(v, child_path(path, i), depth + 1) for i, v in enumerate(node.value)]
        return self.loader.construct_object(node)


def _refuse_aliases(text: str) -> None:
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise RelayoutError(f"line {event.start_mark.line + 1}: YAML aliases (*name) are not allowed in rule files")
        if getattr(event, "anchor", None):
            raise RelayoutError(f"line {event.start_mark.line + 1}: YAML anchors (&name) are not allowed in rule files")


def load_located(path: Path) -> Located:
    """Read one rule file; every problem is a RelayoutError starting with the file name and line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _located_error(path, 1, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise _located_error(path, 1, f"{len(raw)} bytes; a rule file may hold at most {MAX_BYTES}")
    try:
        text = raw.decode("utf-8")
        _refuse_aliases(text)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise RelayoutError("line 1: the file is empty")
            builder = _Builder(loader)
            data = builder.build(node, "$", 0)
        finally:
            loader.dispose()
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise _located_error(path, line, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise _located_error(path, line, f"YAML error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise _located_error(path, 1, f"YAML error: {exc}") from None
    except RelayoutError as exc:
        line, _, message = str(exc).removeprefix("line ").partition(": ")
        raise _located_error(path, int(line), message) from None
    return Located(data, builder.lines)


def _located_error(path: Path, line: int, message: str) -> RelayoutError:
    """A RelayoutError for a rule file, carrying `line` and `message` for reporters."""
    exc = RelayoutError(f"{path}:{line}: {message}")
    exc.line, exc.message = line, message
    return exc
