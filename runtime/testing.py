"""Random test data: layer weights -> router output -> adapters (normalized layout), never zeros."""
import torch


def random_layer(E, H, I, dtype, device, bias=False, seed=0):
    """w13 (E, 2I, H), w2 (E, H, I) and optional biases (E, 2I), (E, H), scaled to unit-ish outputs."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    b13 = torch.randn(E, 2 * I, generator=g) if bias else None
    b2 = torch.randn(E, H, generator=g) if bias else None
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return to(w13), to(w2), to(b13), to(b2)


def random_routing(T, E, k, device, seed=0, experts=None):
    """Router logits N(0,1) -> softmax -> top-k -> renormalized; `experts` restricts the choice."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if experts is not None:
        keep = torch.full((E,), float("-inf"))
        keep[list(experts)] = 0.0
        logits = logits + keep
    w, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return ids.to(device=device, dtype=torch.int32), w.to(device=device)


def random_adapter(E, H, I, rank, dtype, device, projs=("w1", "w3", "w2"), shared_a=False, seed=0):
    """Adapter layer dict proj -> (lora_a (E, r, in), lora_b (E, out, r), scaling)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for j, proj in enumerate(projs):
        din, dout = (H, I) if proj in ("w1", "w3") else (I, H)
        a = torch.randn(E, rank, din, generator=g) / din ** 0.5
        b = torch.randn(E, dout, rank, generator=g) / rank ** 0.5
        out[proj] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), 0.5 + 0.25 * j)
    if shared_a and "w1" in out and "w3" in out:
        out["w3"] = (out["w1"][0].clone(), out["w3"][1], out["w3"][2])
    return out


def ensure_interpreter():
    """Make the CPU interpreter work even if triton.language was imported before TRITON_INTERPRET=1.

    Another test module importing peft/transformers loads triton first; its @triton.jit library
    helpers (tl.sum, tl.zeros, tl.cumsum, ...) are then compiled-mode JITFunctions, which the
    interpreter refuses to call from an interpreted kernel. Rewrap them once as interpreted ones.
    The clean fix is TRITON_INTERPRET=1 in tests/conftest.py before anything imports triton.
    """
    import os

    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    wrapped = {}
    for mod in (tl, tl.core, tl.standard, tl.math):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, JITFunction):
                wrapped.setdefault(id(obj), InterpretedFunction(obj.fn))
                setattr(mod, name, wrapped[id(obj)])
