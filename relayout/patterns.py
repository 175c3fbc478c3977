"""Rule patterns: parse einops-style relayout patterns once into immutable recipes."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from relayout.errors import RelayoutError

_AXIS = re.compile(r"[a-z][a-z0-9_]*\Z")


@dataclass(frozen=True)
class Side:
    """One side of a pattern: a tuple of dimensions, each a tuple of axis names ('1' for a unit axis)."""

    dims: tuple[tuple[str, ...], ...]

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(a for dim in self.dims for a in dim if a != "1")

    def text(self) -> str:
        return " ".join(d[0] if len(d) == 1 else "(" + " ".join(d) + ")" for d in self.dims)


@dataclass(frozen=True)
class Pattern:
    """A parsed `lhs -> rhs` pattern."""

    lhs: Side
    rhs: Side

    def text(self) -> str:
        return f"{self.lhs.text()} -> {self.rhs.text()}"

    def reverse(self) -> "Pattern":
        return Pattern(self.rhs, self.lhs)


def _parse_side(text: str, where: str) -> Side:
    dims: list[tuple[str, ...]] = []
    group: list[str] | None = None
    for token in re.findall(r"\(|\)|[^\s()]+", text):
        if token == "(":
            if group is not None:
                raise RelayoutError(f"{where}: nested parentheses are not allowed")
            group = []
        elif token == ")":
            if group is None:
                raise RelayoutError(f"{where}: ')' without '('")
            if not group:
                raise RelayoutError(f"{where}: empty group '()'")
            dims.append(tuple(group))
            group = None
        elif token != "1" and not _AXIS.match(token):
            raise RelayoutError(f"{where}: {token!r} is not an axis name (lowercase letters, digits, '_')")
        elif group is not None:
            group.append(token)
        else:
            dims.append((token,))
    if group is not None:
        raise RelayoutError(f"{where}: '(' is never closed")
    if not dims:
        raise RelayoutError(f"{where}: no dimensions")
    side = Side(tuple(dims))
    repeated = sorted({a for a in side.axes if side.axes.count(a) > 1})
    if repeated:
        raise RelayoutError(f"{where}: axis {repeated[0]!r} appears twice")
    return side


@functools.lru_cache(maxsize=1024)
def parse(text: str) -> Pattern:
    """Parse 'lhs -> rhs'; raises RelayoutError quoting the pattern on any syntax problem."""
    if text.count("->") != 1:
        raise RelayoutError(f"pattern {text!r}: expected exactly one '->'")
    lhs, rhs = text.split("->")
    return Pattern(_parse_side(lhs, f"pattern {text!r} (left side)"), _parse_side(rhs, f"pattern {text!r} (right side)"))
