"""`relayout check`: exit 0 on the packaged rules, exit 1 on broken copies, every error with file, line, JSON path.

Each broken case copies the packaged rules into tmp_path, breaks one thing (or adds one broken file), runs
`relayout.cli.main(["check", DIR])` in-process and asserts the exact set of errors: file name, line, JSON path
and the words of the message. The console script and a plain (non-editable) install are checked too.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from relayout.cli import main
from relayout.rule import RULES_ENV, packaged_rules_dir
from relayout.ruleset import load_rules

ROOT = Path(__file__).resolve().parent.parent

TOY = textwrap.dedent("""\
    # A toy family for the broken cases: inherits the base layouts and adds one of its own.
    relayout: 1
    name: toy
    extends: gated_moe
    description: toy MoE
    architectures: [ToyMoeForCausalLM]
    experts: ["model.decoder.blocks.{layer}.moe.experts"]
    layouts:
      stacked:
        tensors:
          - {unit: gate_up, key: "gu.lora_A.weight", pattern: "e r h -> e r h", to: [w1.lora_a, w3.lora_a]}
          - {unit: gate_up, key: "gu.lora_B.weight", pattern: "e {gate_up} r -> two e i r", split: two, to: [w1.lora_b, w3.lora_b]}
          - {unit: down, key: "{fused[down]}.lora_A.weight", pattern: "e r i -> e r i", to: w2.lora_a}
          - {unit: down, key: "{proj[down]}.lora_B.weight", pattern: "e h r -> e h r", to: w2.lora_b}
    """)
T = "$.layouts.stacked.tensors"


@pytest.fixture(autouse=True)
def _no_user_rules(monkeypatch):
    monkeypatch.delenv(RULES_ENV, raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)


def copy_rules(tmp_path: Path) -> Path:
    folder = tmp_path / "rules"
    shutil.copytree(packaged_rules_dir(), folder, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return folder


def line_of(text: str, needle: str) -> int:
    """1-based line of the first occurrence of `needle` (which must occur exactly once)."""
    if text.count(needle) != 1:
        raise ValueError(f"{needle!r} occurs {text.count(needle)} times")
    return text[:text.index(needle)].count("\n") + 1


def run_check(capsys, *args: str) -> tuple[int, str]:
    code = main(["check", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def run_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["check", "-o", "json", *args])
    return code, json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------------------------
# Good rules.

def test_packaged_rules_pass(capsys):
    code, out = run_check(capsys)
    assert code == 0, out
    assert "ok -- validation done" in out
    assert f"({len(list(packaged_rules_dir().glob('*.yaml')))} files" in out


def test_packaged_rules_pass_json(capsys):
    code, report = run_json(capsys)
    assert code == 0 and report["ok"] is True and report["errors"] == []
    assert {"qwen3_moe", "gpt_oss", "mixtral", "llama4", "olmoe", "deepseek_v3", "glm4_moe", "qwen3_next",
            "qwen3_5_moe"} <= set(report["rules"])


def test_copy_of_packaged_rules_passes_and_quiet_is_quiet(tmp_path, capsys):
    folder = copy_rules(tmp_path)
    assert run_check(capsys, str(folder)) == (0, run_check(capsys, str(folder))[1])
    code, out = run_check(capsys, "-q", str(folder))
    assert code == 0 and out == ""


def test_toy_rule_is_valid(tmp_path, capsys):
    (tmp_path / "toy.yaml").write_text(TOY)
    code, out = run_check(capsys, str(tmp_path / "toy.yaml"))
    assert code == 0, out
    code, out = run_check(capsys, "--rules", str(tmp_path))  # added to the packaged rules
    assert code == 0, out


# ----------------------------------------------------------------------------------------------
# Broken copies. Each case: file name -> new text (or bytes), and the expected errors as
# (file name, line, JSON path, words in the message). Lines are computed from the text itself.

def _toy(old: str, new: str) -> str:
    if TOY.count(old) != 1:
        raise ValueError(old)
    return TOY.replace(old, new)


def _case_toy(old: str, new: str, path: str, *words: str, at: str | None = None):
    """Replace `old` by `new` in the toy rule; the error is expected on the line of `at` (default: new's first line)."""
    text = _toy(old, new)
    return {"toy.yaml": text}, [("toy.yaml", line_of(text, at or new.splitlines()[0]), path, words)]


def _patched(name: str, old: str, new: str) -> str:
    text = (packaged_rules_dir() / name).read_text()
    if text.count(old) != 1:
        raise ValueError(f"{name}: {old!r}")
    return text.replace(old, new)


def _bad_syntax():
    text = _patched("qwen3_moe.yaml", 'experts: ["model.layers.{layer}.mlp.experts"]',
                    'experts: ["model.layers.{layer}.mlp.experts"\nfoo: bar')
    # the parser notices on the line after the unclosed '['
    return {"qwen3_moe.yaml": text}, [("qwen3_moe.yaml", line_of(text, "foo: bar"), "$", ("YAML error", "expected ','"))]


def _wrong_types():
    text = _patched("mixtral.yaml", "projections: {gate: w1, up: w3, down: w2}", "projections: {gate: w1, up: w3, down: 7}")
    text2 = _patched("olmoe.yaml", "model_types: [olmoe]", "model_types: olmoe\ngated: \"yes\"")
    return {"mixtral.yaml": text, "olmoe.yaml": text2}, [
        ("mixtral.yaml", line_of(text, "projections:"), "$.projections.down", ("7 is not of type 'string'",)),
        ("olmoe.yaml", line_of(text2, "model_types:"), "$.model_types", ("'olmoe' is not of type 'array'",)),
        ("olmoe.yaml", line_of(text2, "gated:"), "$.gated", ("'yes' is not of type 'boolean'",)),
    ]


def _unknown_extends():
    text = _toy("extends: gated_moe", "extends: gated_moee")
    return {"toy.yaml": text}, [("toy.yaml", line_of(text, "extends:"), "$.extends",
                                 ("extends unknown rule 'gated_moee'", "known:", "gated_moe"))]


def _cycle():
    a = "relayout: 1\nname: cyc_a\nextends: cyc_b\n"
    b = "relayout: 1\nname: cyc_b\nextends: cyc_a\n"
    return {"cyc_a.yaml": a, "cyc_b.yaml": b}, [
        ("cyc_a.yaml", 3, "$.extends", ("inheritance cycle", "cyc_a", "cyc_b")),
        ("cyc_b.yaml", 3, "$.extends", ("inheritance cycle", "cyc_a", "cyc_b")),
    ]


def _self_cycle():
    text = _toy("extends: gated_moe", "extends: toy")
    return {"toy.yaml": text}, [("toy.yaml", line_of(text, "extends: toy"), "$.extends", ("inheritance cycle", "toy -> toy"))]


def _duplicate_claim():
    text = _toy("architectures: [ToyMoeForCausalLM]", "architectures: [ToyMoeForCausalLM, Qwen3MoeForCausalLM]")
    return {"toy.yaml": text}, [("toy.yaml", line_of(text, "architectures:"), "$.architectures[1]",
                                 ("'Qwen3MoeForCausalLM' is already claimed by rule 'qwen3_moe'",))]


def _duplicate_name():
    text = _toy("name: toy", "name: olmoe")
    return {"toy.yaml": text}, [("toy.yaml", line_of(text, "name: olmoe"), "$.name", ("rule 'olmoe' is already defined in", "olmoe.yaml"))]


def _anchors():
    text = "relayout: 1\nname: bomb\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    return {"bomb.yaml": text}, [("bomb.yaml", 3, "$", ("anchors (&name) are not allowed",))]


def _alias_only():
    text = _toy("description: toy MoE", "description: *undefined")
    return {"toy.yaml": text}, [("toy.yaml", line_of(text, "*undefined"), "$", ("aliases (*name) are not allowed",))]


def _huge():
    text = TOY + ("# padding\n" * 110_000)
    return {"toy.yaml": text}, [("toy.yaml", 1, "$", ("bytes; a rule file may hold at most",))]


def _deep():
    text = "relayout: 1\nname: deep\ndescription: " + "[" * 200 + "]" * 200 + "\n"
    return {"deep.yaml": text}, [("deep.yaml", 3, "$", ("too large or too deeply nested",))]


def _not_utf8():
    raw = TOY.encode().replace(b"description: toy MoE", b"description: toy \xff\xfe MoE")
    return {"toy.yaml": raw}, [("toy.yaml", line_of(TOY, "description:"), "$", ("not UTF-8",))]


def _python_tag():
    text = _toy("description: toy MoE", "description: !!python/object/apply:os.system [echo pwned]")
    scalar = _toy("description: toy MoE", "description: !!python/object:os.system x")
    return {"toy.yaml": text, "toy2.yaml": scalar.replace("name: toy", "name: toy2")}, [
        ("toy.yaml", line_of(text, "!!python"), "$", ("tag", "python/object/apply:os.system", "not allowed")),
        ("toy2.yaml", line_of(scalar, "!!python"), "$", ("YAML error", "python/object:os.system"))]


def _empty():
    return {"toy.yaml": "# nothing here\n"}, [("toy.yaml", 1, "$", ("empty",))]


def _duplicate_key():
    text = _toy("description: toy MoE", "description: toy MoE\ndescription: again")
    return {"toy.yaml": text}, [("toy.yaml", line_of(text, "description: again"), "$", ("duplicate key 'description'",))]


BROKEN = {
    "bad-yaml-syntax": _bad_syntax,
    "wrong-types": _wrong_types,
    "unknown-template": lambda: _case_toy("e {gate_up} r -> two e i r", "e {gate_upp} r -> two e i r", f"{T}[1].pattern",
                                          "unknown template {gate_upp}", "defined: gate_up"),
    "axis-lost": lambda: _case_toy('pattern: "e r i -> e r i"', 'pattern: "e r i x -> e r i"', f"{T}[2].pattern",
                                   "axis 'x' is on the left", "not on the right"),
    "axis-unbound": lambda: _case_toy(
        "  stacked:\n", "  lonely:\n    tensors:\n      - {unit: down, key: \"d.lora_A.weight\", "
        "pattern: \"r i -> e r i\", to: w2.lora_a}\n  stacked:\n",
        "$.layouts.lonely.tensors[0].pattern", "axis 'e' appears only on the right", "nothing binds its size",
        at='"r i -> e r i"'),
    "target-shape-mismatch": lambda: _case_toy('pattern: "e h r -> e h r"', 'pattern: "e h r -> e r h"', f"{T}[3].to",
                                               "w2.lora_b is (e h r)", "produces (e r h)"),
    "split-size-mismatch": lambda: _case_toy("split: two, to: [w1.lora_b, w3.lora_b]", "split: two, to: [w1.lora_b]",
                                             f"{T}[1].split", "split axis 'two'", "equal to the 1 targets, got 2"),
    "pattern-syntax": lambda: _case_toy('pattern: "e r h -> e r h"', 'pattern: "(e r h -> e r h"', f"{T}[0].pattern",
                                        "'(' is never closed"),
    "unknown-extends": _unknown_extends,
    "inheritance-cycle": _cycle,
    "self-cycle": _self_cycle,
    "duplicate-architecture": _duplicate_claim,
    "duplicate-rule-name": _duplicate_name,
    "unknown-tensor-field": lambda: _case_toy('to: w2.lora_b}', 'to: w2.lora_b, scale: 2}', f"{T}[3].scale",
                                              "Additional properties", "'scale'"),
    "unknown-key-field": lambda: _case_toy('key: "gu.lora_A.weight"', 'key: "gu.{foo}.lora_A.weight"', f"{T}[0].key",
                                           "unknown field {foo}"),
    "undeclared-projection": lambda: _case_toy('key: "{proj[down]}.lora_B.weight"', 'key: "{proj[shared]}.lora_B.weight"',
                                               f"{T}[3].key", "projection 'shared' is not declared"),
    "unit-not-a-fused-role": lambda: _case_toy('{unit: down, key: "{fused[down]}.lora_A.weight"',  # was StopIteration
                                               '{unit: shared, key: "{fused[down]}.lora_A.weight"', f"{T}[2].unit",
                                               "unit 'shared' is not a declared fused role (down, gate_up)"),
    "undeclared-fused-role": lambda: _case_toy('key: "{fused[down]}.lora_A.weight"', 'key: "{fused[up]}.lora_A.weight"',
                                               f"{T}[2].key", "fused role 'up' is not declared"),
    "unknown-top-level-key": lambda: _case_toy("description: toy MoE", "descripton: toy MoE", "$.descripton",
                                               "Additional properties", "'descripton'"),
    "alias-bomb": _anchors,
    "alias": _alias_only,
    "huge-file": _huge,
    "too-deep": _deep,
    "not-utf8": _not_utf8,
    "python-object-tag": _python_tag,
    "empty-file": _empty,
    "duplicate-key": _duplicate_key,
}


def _write(folder: Path, files: dict) -> None:
    for name, content in files.items():
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)


def _parse_errors(out: str) -> list[tuple[str, int, str, str]]:
    errors = []
    for line in out.splitlines():
        head, sep, message = line.partition(": ")
        if not sep or "::" not in head:
            continue
        location, path = head.split("::", 1)
        file, _, lineno = location.rpartition(":")
        errors.append((file, int(lineno), path, message))
    return errors


def _match(errors, expected) -> None:
    """Errors (file path, line, JSON path, message) against expected (file name, line, JSON path, words), as sets."""
    remaining = list(errors)
    for name, line, path, words in expected:
        hits = [e for e in remaining if Path(e[0]).name == name and e[1] == line and e[2] == path
                and all(w in e[3] for w in words)]
        assert hits, f"no error {name}:{line}::{path} with {words}; got:\n" + "\n".join(map(str, errors))
        remaining.remove(hits[0])
    assert not remaining, "unexpected errors:\n" + "\n".join(map(str, remaining))


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_copy(case, tmp_path, capsys):
    files, expected = BROKEN[case]()
    folder = copy_rules(tmp_path)
    _write(folder, files)
    code, out = run_check(capsys, str(folder))
    assert code == 1, out
    assert "Traceback" not in out
    _match(_parse_errors(out), expected)
    assert f"{len(expected)} error(s)" in out
    # the same errors as JSON
    code, report = run_json(capsys, str(folder))
    assert code == 1 and report["ok"] is False
    _match([(e["file"], e["line"], e["path"], e["message"]) for e in report["errors"]], expected)


@pytest.mark.parametrize("case", ["unknown-template", "axis-lost", "undeclared-projection", "not-utf8"])
def test_broken_file_alone(case, tmp_path, capsys):
    # checked alone: the packaged rules still supply what `extends` names
    files, expected = BROKEN[case]()
    _write(tmp_path, files)
    code, out = run_check(capsys, *(str(tmp_path / name) for name in files))
    assert code == 1, out
    _match(_parse_errors(out), expected)


def test_all_errors_in_one_run(tmp_path, capsys):
    # two broken files and a file with two problems: every error is reported, not just the first
    folder = copy_rules(tmp_path)
    expected = []
    for case in ("bad-yaml-syntax", "duplicate-rule-name"):
        files, exp = BROKEN[case]()
        _write(folder, files)
        expected += exp
    text = _toy('key: "gu.lora_A.weight"', 'key: "gu.{foo}.lora_A.weight"').replace(
        'pattern: "e h r -> e h r"', 'pattern: "e h r -> e r h"').replace("name: toy", "name: toy2")
    (folder / "toy2.yaml").write_text(text)
    expected += [("toy2.yaml", line_of(text, "{foo}"), f"{T}[0].key", ("unknown field {foo}",)),
                 ("toy2.yaml", line_of(text, '"e h r -> e r h"'), f"{T}[3].to", ("produces (e r h)",))]
    code, out = run_check(capsys, str(folder))
    assert code == 1
    _match(_parse_errors(out), expected)
    assert "4 error(s) in 3 file(s)" in out


def test_json_output_lists_errors(tmp_path, capsys):
    files, expected = BROKEN["axis-lost"]()
    _write(tmp_path, files)
    code, report = run_json(capsys, str(tmp_path))
    assert code == 1
    assert report["ok"] is False and report["files"] == [str((tmp_path / "toy.yaml").resolve())]
    (error,) = report["errors"]
    assert set(error) == {"file", "line", "path", "message"}
    assert (Path(error["file"]).name, error["line"], error["path"]) == expected[0][:3]


def test_missing_path_and_empty_folder(tmp_path, capsys):
    code, out = run_check(capsys, str(tmp_path / "nope.yaml"))
    assert code == 1 and "nope.yaml:1::$: no such file" in out
    (tmp_path / "empty").mkdir()
    code, out = run_check(capsys, str(tmp_path / "empty"))
    assert code == 1 and "no rule files found" in out


def test_rules_env_adds_broken_file(tmp_path, capsys, monkeypatch):
    files, expected = BROKEN["split-size-mismatch"]()
    _write(tmp_path, files)
    monkeypatch.setenv(RULES_ENV, str(tmp_path))
    code, out = run_check(capsys)
    assert code == 1
    _match(_parse_errors(out), expected)


# ----------------------------------------------------------------------------------------------
# The installed console script, and a plain (non-editable) install.

def test_console_script(tmp_path):
    exe = shutil.which("relayout")
    if exe is None:
        pytest.skip("relayout console script not on PATH")
    env = {k: v for k, v in os.environ.items() if k != RULES_ENV}
    ok = subprocess.run([exe, "check"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok -- validation done" in ok.stdout
    files, expected = BROKEN["python-object-tag"]()
    _write(tmp_path, files)
    bad = subprocess.run([exe, "check", *(str(tmp_path / name) for name in files)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    _match(_parse_errors(bad.stdout), expected)


@pytest.mark.slow
def test_plain_install_into_fresh_venv(tmp_path):
    """`pip install .` (not editable) into a new venv: the rules ship inside the package and check passes."""
    try:  # --no-build-isolation builds with this interpreter's setuptools (offline); pyproject needs >= 68
        if int(version("setuptools").split(".")[0]) < 68:
            pytest.skip(f"setuptools {version('setuptools')} < 68 in this interpreter")
    except PackageNotFoundError:
        pytest.skip("no setuptools in this interpreter to build the package offline")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("relayout", "rules", "runtime"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    # --without-pip: the venv uses the system pip and setuptools (ensurepip would shadow them with old bundled ones)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True, timeout=120)
    py, exe = venv / "bin" / "python", venv / "bin" / "relayout"
    env = {k: v for k, v in os.environ.items() if k not in (RULES_ENV, "PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    install = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--disable-pip-version-check", "--no-index", str(src)],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    where = subprocess.run([str(py), "-c", "import relayout.rule as r; print(r.__file__); print(r.packaged_rules_dir())"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    module, rules = where.stdout.split()
    assert Path(module).is_relative_to(venv) and Path(rules).is_relative_to(venv), where.stdout  # not the source tree
    assert sorted(p.name for p in Path(rules).glob("*.yaml")) == sorted(p.name for p in (ROOT / "rules").glob("*.yaml"))
    shutil.rmtree(src)  # nothing may still read the copied sources
    ok = subprocess.run([str(exe), "check"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok -- validation done" in ok.stdout


def test_verbose_lists_each_rule(capsys):
    assert main(["check", "-v"]) == 0
    out = capsys.readouterr().out
    assert "rule gpt_oss: GptOssForCausalLM; layouts peft-2d" in out and out.rstrip().endswith("rules)")
    assert out.count(": rule ") == len(load_rules().rules)
