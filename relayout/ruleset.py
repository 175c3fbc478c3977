"""Rule files -> RuleSet: load, validate against the schema, resolve `extends`, check, index by architecture."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import jsonschema

from relayout.errors import RelayoutError
from relayout.rule import MERGED_DICTS, NOT_INHERITED, RULES_ENV, Problem, Rule, _schema, rule_paths
from relayout.semantics import build_rule
from relayout.yamlsafe import Located, load_located


@dataclass
class Source:
    """One rule file as read: its path, parsed data with lines."""

    file: str
    located: Located

    @property
    def data(self) -> dict:
        return self.located.data


@dataclass
class Resolved:
    """A rule after inheritance: merged data plus, per field, the file it came from."""

    data: dict
    origin: dict[str, Source]

    def locate(self, path: str) -> tuple[str, int]:
        """File and line of a JSON path in the merged data."""
        parts = path.removeprefix("$.").replace("[", ".[").split(".")
        for n in range(len(parts), 0, -1):
            src = self.origin.get(".".join(parts[:n]))
            if src is not None:
                return src.file, src.located.line(path)
        src = next(iter(self.origin.values()))
        return src.file, 1


def _schema_problems(src: Source, validator: jsonschema.Draft202012Validator) -> list[Problem]:
    problems = []
    for err in sorted(validator.iter_errors(src.data), key=lambda e: list(map(str, e.absolute_path))):
        path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):  # point at the unexpected key
            path += next((f".{k}" for k in err.instance if k not in err.schema.get("properties", {})), "")
        problems.append(Problem(src.file, src.located.line(path), path, err.message))
    return problems


def _merge(parent: Resolved, child: Source) -> Resolved:
    data = {k: v for k, v in parent.data.items() if k not in NOT_INHERITED}
    origin = {k: v for k, v in parent.origin.items() if k.split(".")[0] not in NOT_INHERITED}
    for key, value in child.data.items():
        if key in MERGED_DICTS:
            data[key] = {**data.get(key, {}), **value}
        elif key == "layouts":
            layouts = dict(data.get("layouts", {}))
            for name, layout in value.items():
                layouts[name] = {**layouts.get(name, {}), **layout}
                origin.update({f"layouts.{name}.{f}": child for f in layout})
            data[key] = layouts
            continue
        else:
            data[key] = value
        origin[key] = child
    return Resolved(data, origin)


@dataclass
class RuleSet:
    """Every rule from a set of files, with every problem found in them."""

    rules: dict[str, Rule] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, paths: list[Path], bases: list[Path] = ()) -> "RuleSet":
        """Check `paths`; `bases` (e.g. the packaged rules) only supply rules that `extends` may name."""
        out = cls(files=[str(p) for p in paths])
        sources = out._read(paths)
        base_sources = cls()._read([b for b in bases if b not in paths])
        resolved = out._resolve({**{k: v for k, v in base_sources.items() if k not in sources}, **sources})
        resolved = {k: v for k, v in resolved.items() if k in sources}
        for name, res in resolved.items():
            rule, problems = build_rule(res)
            out.problems += problems
            if rule is not None:
                out.rules[name] = rule
        out._check_claims(resolved)
        return out

    def _read(self, paths: list[Path]) -> dict[str, Source]:
        validator = jsonschema.Draft202012Validator(_schema())
        sources: dict[str, Source] = {}
        for path in paths:
            try:
                src = Source(str(path), load_located(path))
            except RelayoutError as exc:
                self.problems.append(Problem(str(path), getattr(exc, "line", 1), "$", getattr(exc, "message", str(exc))))
                continue
            schema_problems = _schema_problems(src, validator)
            self.problems += schema_problems
            if schema_problems:
                continue
            name = src.data["name"]
            if name in sources:
                self.problems.append(Problem(src.file, src.located.line("$.name"), "$.name",
                                             f"rule {name!r} is already defined in {sources[name].file}"))
                continue
            sources[name] = src
        return sources

    def _resolve(self, sources: dict[str, Source]) -> dict[str, Resolved]:
        resolved: dict[str, Resolved] = {}

        def resolve(name: str, chain: tuple[str, ...]) -> Resolved | None:
            if name in resolved:
                return resolved[name]
            src = sources[name]
            parent_name = src.data.get("extends")
            base = Resolved({}, {})
            if parent_name is not None:
                if parent_name in chain:
                    return self._fail(src, "$.extends", f"inheritance cycle: {' -> '.join(chain + (parent_name,))}")
                if parent_name not in sources:
                    known = ", ".join(sorted(sources)) or "none"
                    return self._fail(src, "$.extends", f"extends unknown rule {parent_name!r} (known: {known})")
                base = resolve(parent_name, chain + (parent_name,))
                if base is None:
                    return None
            resolved[name] = _merge(base, src)
            return resolved[name]

        for name in sources:
            resolve(name, (name,))
        return resolved

    def _fail(self, src: Source, path: str, message: str) -> None:
        self.problems.append(Problem(src.file, src.located.line(path), path, message))
        return None

    def _check_claims(self, resolved: dict[str, Resolved]) -> None:
        for field_name in ("architectures", "model_types"):
            claimed: dict[str, str] = {}
            for name, res in resolved.items():
                for i, value in enumerate(res.data.get(field_name, [])):
                    if value in claimed:
                        file, line = res.locate(f"$.{field_name}[{i}]")
                        self.problems.append(Problem(file, line, f"$.{field_name}[{i}]",
                                                     f"{value!r} is already claimed by rule {claimed[value]!r}"))
                    claimed.setdefault(value, name)

    def find(self, architecture: str) -> Rule:
        """The rule serving an `architectures` string or a `model_type`."""
        for rule in self.rules.values():
            if architecture in rule.architectures or architecture in rule.model_types:
                return rule
        known = sorted(a for r in self.rules.values() for a in r.architectures)
        raise RelayoutError(f"no rule serves architecture {architecture!r}; known: {', '.join(known)}. "
                            f"Add a rule file with --rules DIR or ${RULES_ENV}")


def load_rules(extra: list[str | Path] = (), packaged: bool = True) -> RuleSet:
    """Load the packaged rules plus user rule files; raise if any file has a problem."""
    ruleset = RuleSet.load(rule_paths(extra, packaged))
    if ruleset.problems:
        raise RelayoutError("invalid rule files:\n" + "\n".join(f"  {p}" for p in ruleset.problems))
    return ruleset
