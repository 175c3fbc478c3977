"""Rule files -> validated Rule objects: schema, inheritance, templates and semantic checks."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from relayout.errors import RelayoutError
from relayout.patterns import Pattern

# The normalized layout (formats.md section 3): target name -> its axes.
NORMALIZED = {
    "w1.lora_a": ("e", "r", "h"), "w1.lora_b": ("e", "i", "r"),
    "w3.lora_a": ("e", "r", "h"), "w3.lora_b": ("e", "i", "r"),
    "w2.lora_a": ("e", "r", "i"), "w2.lora_b": ("e", "h", "r"),
}
NOT_INHERITED = ("name", "extends", "abstract", "architectures", "model_types", "description")
MERGED_DICTS = ("projections", "axes", "templates", "model_config")
KEY_FIELDS = {"expert", "nest", "proj", "fused"}
RULES_ENV = "RELAYOUT_RULES"


@dataclass(frozen=True)
class Problem:
    """One error found in a rule file: where (file, line, JSON path) and what."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}::{self.path}: {self.message}"


@dataclass(frozen=True)
class TensorRule:
    """How one source tensor of a layout maps to normalized targets."""

    unit: str
    key: str
    pattern: Pattern
    targets: tuple[str, ...]
    split: str | None
    diagonal: tuple[str, str] | None


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    experts: tuple[str, ...]
    orientation: str | None
    rank: tuple[tuple[str, tuple[str, ...]], ...]
    tensors: tuple[TensorRule, ...]

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.unit for t in self.tensors))

    @property
    def per_expert(self) -> bool:
        return any("{expert}" in t.key for t in self.tensors)

    def rank_axes(self, unit: str) -> tuple[str, ...]:
        return dict(self.rank).get(unit, ("r",))


@dataclass(frozen=True)
class FusedParam:
    role: str
    name: str
    storage: str
    marked_transposed: bool


@dataclass(frozen=True)
class Rule:
    """A resolved, checked rule: one architecture family."""

    name: str
    file: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    gated: bool
    experts: tuple[str, ...]
    projections: tuple[tuple[str, str], ...]
    fused: tuple[FusedParam, ...]
    axes: tuple[tuple[str, int], ...]
    peft_orientation: tuple[tuple[str | None, str], ...]
    model_config: tuple[tuple[str, tuple[str, ...]], ...]
    layouts: tuple[Layout, ...] = field(repr=False)

    def layout(self, name: str) -> Layout:
        for layout in self.layouts:
            if layout.name == name:
                return layout
        raise RelayoutError(f"{self.file}: rule {self.name} has no layout {name!r} (it has {', '.join(self.layout_names)})")

    @property
    def layout_names(self) -> tuple[str, ...]:
        return tuple(layout.name for layout in self.layouts)

    def fused_param(self, role: str) -> FusedParam:
        return next(p for p in self.fused if p.role == role)


def _schema() -> dict:
    return json.loads(resources.files("relayout").joinpath("rule_schema.json").read_text())


def packaged_rules_dir() -> Path:
    """The rules shipped inside the package (the repository's rules/ folder, installed as relayout.rules)."""
    # Not importlib.resources: relayout.rules is a namespace package, whose files() is a MultiplexedPath
    # (str() of it is no path), and an editable install does not map it at all.
    installed = Path(__file__).resolve().parent / "rules"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "rules"


def rule_paths(extra: list[str | Path] = (), packaged: bool = True) -> list[Path]:
    """Rule files: the packaged ones, then $RELAYOUT_RULES (os.pathsep-separated), then `extra` (files or folders)."""
    roots = [packaged_rules_dir()] if packaged else []
    roots += [Path(p) for p in os.environ.get(RULES_ENV, "").split(os.pathsep) if p]
    roots += [Path(p) for p in extra]
    paths: list[Path] = []
    for root in roots:
        paths += sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml")) if root.is_dir() else [root]
    return list(dict.fromkeys(p.resolve() for p in paths))
