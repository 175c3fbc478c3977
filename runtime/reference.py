"""Torch reference of the MoE multi-LoRA forward: loop over tokens -> their k experts, fp32 math (the oracle)."""
import torch

PROJS = ("w1", "w3", "w2")


def _act(g, u, activation):
    """act(gate) * up, for both supported activations."""
    if activation == "silu":
        return torch.nn.functional.silu(g) * u
    if activation == "swiglu_oai":
        g = g.clamp(max=7.0)
        u = u.clamp(-7.0, 7.0)
        return g * torch.sigmoid(1.702 * g) * (u + 1.0)
    raise ValueError(f"unknown activation {activation!r}; expected 'silu' or 'swiglu_oai'")


def _adapter_list(adapters):
    """Accept a LoraSlots (anything with `as_adapters()`) or a sequence of adapter dicts."""
    if adapters is None:
        return []
    if hasattr(adapters, "as_adapters"):
        return adapters.as_adapters()
    return list(adapters)


def _delta(v, adapter, proj, e):
    """scale * (v @ A_e^T) @ B_e^T for one projection of one adapter, or 0 if absent."""
    if adapter is None or proj not in adapter:
        return 0.0
    a, b, scale = adapter[proj]
    return float(scale) * ((v @ a[e].float().T) @ b[e].float().T)


def moe_reference(x, w13, w2, topk_ids, topk_weights, adapters=None, token_lora=None,
                  activation="silu", w13_bias=None, w2_bias=None):
    """Reference MoE multi-LoRA forward: out[t] = sum_k w[t,k] * expert_k(x[t]) with per-token LoRA.

    x (T, H); w13 (E, 2I, H) gate rows then up rows; w2 (E, H, I); topk_ids (T, k);
    topk_weights (T, k); adapters: LoraSlots or a sequence indexed by slot of dicts
    proj -> (lora_a, lora_b, scaling) (normalized layout, or None for an empty slot);
    token_lora (T,) slot per token, -1 for none. Returns (T, H) in x.dtype, computed in fp32.
    """
    slots = _adapter_list(adapters)
    T = x.shape[0]
    I = w2.shape[2]
    out = torch.zeros(T, w2.shape[1], dtype=torch.float32, device=x.device)
    for t in range(T):
        s = -1 if token_lora is None else int(token_lora[t])
        adapter = slots[s] if 0 <= s < len(slots) else None
        xt = x[t].float()
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gu = w13[e].float() @ xt
            if w13_bias is not None:
                gu = gu + w13_bias[e].float()
            g = gu[:I] + _delta(xt, adapter, "w1", e)
            u = gu[I:] + _delta(xt, adapter, "w3", e)
            h = _act(g, u, activation)
            y = w2[e].float() @ h + _delta(h, adapter, "w2", e)
            if w2_bias is not None:
                y = y + w2_bias[e].float()
            out[t] += float(topk_weights[t, j]) * y
    return out.to(x.dtype)


def moe_reference_vectorized(x, w13, w2, topk_ids, topk_weights, adapters=None, token_lora=None,
                             activation="silu", w13_bias=None, w2_bias=None):
    """Same function as `moe_reference`, vectorized over tokens per (expert, slot): for large T."""
    slots = _adapter_list(adapters)
    T, k = topk_ids.shape
    I = w2.shape[2]
    xf = x.float()
    tok = torch.arange(T, device=x.device).repeat_interleave(k)
    exp = topk_ids.reshape(-1).long()
    wts = topk_weights.reshape(-1).float()
    slot = (token_lora.long() if token_lora is not None
            else torch.full((T,), -1, device=x.device, dtype=torch.long))[tok]
    out = torch.zeros(T, w2.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(exp).tolist():
        for s in torch.unique(slot[exp == e]).tolist():
            sel = (exp == e) & (slot == s)
            adapter = slots[s] if 0 <= s < len(slots) else None
            xs = xf[tok[sel]]
            gu = xs @ w13[e].float().T
            if w13_bias is not None:
                gu = gu + w13_bias[e].float()
            g = gu[:, :I] + _delta(xs, adapter, "w1", e)
            u = gu[:, I:] + _delta(xs, adapter, "w3", e)
            h = _act(g, u, activation)
            y = h @ w2[e].float().T + _delta(h, adapter, "w2", e)
            if w2_bias is not None:
                y = y + w2_bias[e].float()
            out.index_add_(0, tok[sel], wts[sel, None] * y)
    return out.to(x.dtype)
