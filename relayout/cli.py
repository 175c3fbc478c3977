"""The relayout command: parse arguments -> run -> result -> reporter -> exit code (0 ok, 1 errors, 2 usage)."""
from __future__ import annotations

import argparse
import json
import sys

from relayout.commands import add_commands
from relayout.errors import RelayoutError
from relayout.rule import packaged_rules_dir, rule_paths
from relayout.ruleset import RuleSet


def _report(args, payload: dict, text: str) -> None:
    if args.output == "json":
        print(json.dumps(payload, indent=2))
    elif not args.quiet or not payload.get("ok", True):
        print(text)


def cmd_check(args) -> int:
    """Validate rule files (default: the packaged ones plus --rules / $RELAYOUT_RULES)."""
    if args.paths:
        paths = rule_paths(args.paths, packaged=False)
        ruleset = RuleSet.load(paths, bases=rule_paths(args.rules))
    else:
        paths = rule_paths(args.rules)
        ruleset = RuleSet.load(paths)
    missing = [str(p) for p in paths if not p.exists()]
    errors = [{"file": f, "line": 1, "path": "$", "message": "no such file"} for f in missing]
    errors += [vars(p) for p in ruleset.problems]
    ok = not errors and bool(paths)
    lines = [f"{e['file']}:{e['line']}::{e['path']}: {e['message']}" for e in errors]
    if args.verbose:  # what each rule serves and accepts
        lines = [f"{r.file}: rule {r.name}: {', '.join(r.architectures)}; layouts {', '.join(r.layout_names)}"
                 for r in ruleset.rules.values()] + lines
    if not paths:
        lines.append("no rule files found")
    lines.append(f"ok -- validation done ({len(paths)} files, {len(ruleset.rules)} rules)" if ok
                 else f"{len(errors)} error(s) in {len({e['file'] for e in errors})} file(s)")
    _report(args, {"ok": ok, "files": [str(p) for p in paths], "rules": sorted(ruleset.rules), "errors": errors},
            "\n".join(lines))
    return 0 if ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relayout", description="MoE LoRA adapter layouts as data.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--rules", action="append", default=[], metavar="DIR",
                        help="extra rule files or folders (added to the packaged rules; also $RELAYOUT_RULES)")
    common.add_argument("-o", "--output", choices=("text", "json"), default="text")
    common.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    common.add_argument("-v", "--verbose", action="store_true", help="check: list each rule, what it serves and accepts")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", parents=[common], help="validate rule files")
    check.add_argument("paths", nargs="*", help=f"rule files or folders (default: {packaged_rules_dir()})")
    check.set_defaults(run=cmd_check)
    add_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except RelayoutError as exc:
        if args.output == "json":
            print(json.dumps({"ok": False, "error": str(exc)}, indent=2))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head`
        return 0
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
