"""`relayout inspect` and `relayout convert`: adapter folder -> explanation, or -> converted adapter."""
from __future__ import annotations

import json
import sys

from relayout.convert import DTYPES, Loaded, convert, load_adapter
from relayout.outputs import FORMATS, LATEST_PEFT, normalized_shapes


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, layer in enumerate(layers):
        start = layer if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            out.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(out)


def describe(loaded: Loaded) -> dict:
    """What inspect reports, as data."""
    adapter, det = loaded.adapter, loaded.detected
    groups: dict[tuple, list[int]] = {}
    for b in det.blocks:
        shapes = normalized_shapes(b.plan)
        key = (b.experts.replace(f"layers.{b.layer}.", "layers.{layer}."), b.plan.layout, b.plan.units,
               tuple(sorted(b.scaling.items())), b.plan.size("e"),
               tuple(sorted((p.split(".")[0], s[1]) for p, s in shapes.items() if p.endswith("lora_a"))))
        groups.setdefault(key, []).append(b.layer)
    return {
        "adapter": str(adapter.path), "architecture": det.architecture, "rule": det.rule.name,
        "rule_file": det.rule.file, "architecture_from": det.how,
        "peft_version": adapter.config.get("peft_version"), "dtype": str(adapter.dtype).removeprefix("torch."),
        "bytes": adapter.nbytes, "tensors": len(adapter.tensors), "layers": len(det.blocks),
        "blocks": [{"layers": _ranges(layers), "experts": path, "layout": layout, "units": list(units),
                    "num_experts": e, "rank": dict(ranks), "scaling": dict(scales)}
                   for (path, layout, units, scales, e, ranks), layers in groups.items()],
        "passthrough": det.passthrough,
        "notes": det.notes,
    }


def _text(info: dict) -> str:
    lines = [f"adapter      {info['adapter']}",
             f"architecture {info['architecture']} (from {info['architecture_from']})",
             f"rule         {info['rule']} ({info['rule_file']})",
             f"peft_version {info['peft_version']}   dtype {info['dtype']}   "
             f"{info['bytes'] / 2**20:.1f} MiB in {info['tensors']} tensors",
             f"expert blocks in {info['layers']} layer(s):"]
    for g in info["blocks"]:
        ranks = ", ".join(f"{p}:{r}" for p, r in g["rank"].items())
        scales = ", ".join(f"{u}:{s:g}" for u, s in g["scaling"].items())
        lines.append(f"  layers {g['layers']}: {g['layout']} {g['units']} at {g['experts']}, "
                     f"{g['num_experts']} experts, rank {ranks}, scaling {scales}")
    lines += [f"note: {n}" for n in info["notes"]]
    lines.append(f"passes through unchanged: {len(info['passthrough'])} tensor(s)")
    lines += [f"  {k}" for k in info["passthrough"][:20]]
    if len(info["passthrough"]) > 20:
        lines.append(f"  ... and {len(info['passthrough']) - 20} more")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    loaded = load_adapter(args.adapter, args.arch, args.model_config, args.layout, args.rules)
    info = describe(loaded)
    print(json.dumps(info, indent=2) if args.output == "json" else _text(info))
    return 0


def cmd_convert(args) -> int:
    loaded = load_adapter(args.adapter, args.arch, args.model_config, args.layout, args.rules)
    out = convert(loaded, args.out, args.to, device=args.device, dtype=args.dtype, peft_version=args.peft_version,
                  force=args.force, progress=None if not args.quiet else False)
    for note in loaded.detected.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps({"ok": True, "out": str(out), "to": args.to}))
    elif not args.quiet:
        print(f"ok -- wrote {args.to} adapter to {out}")
    return 0


def _source_options(p) -> None:
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--arch", help="architecture (config.json 'architectures' entry or model_type)")
    p.add_argument("--model-config", metavar="PATH", help="the base model's config.json (or its folder)")
    p.add_argument("--layout", help="force the source layout (when detection reports several candidates)")


def add_commands(sub, common) -> None:
    inspect = sub.add_parser("inspect", parents=[common], help="explain an adapter: architecture, layout, ranks")
    _source_options(inspect)
    inspect.set_defaults(run=cmd_inspect)
    conv = sub.add_parser("convert", parents=[common], help="write an adapter in another layout")
    _source_options(conv)
    conv.add_argument("out", help="output folder (for --to normalized, a .safetensors file or a folder)")
    conv.add_argument("--to", required=True, choices=FORMATS)
    conv.add_argument("--device", default="cpu", help="where the relayout runs: cpu or cuda")
    conv.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the adapter's)")
    conv.add_argument("--peft-version", default=LATEST_PEFT, help="PEFT convention to write peft-3d for")
    conv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    conv.set_defaults(run=cmd_convert)
