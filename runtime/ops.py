"""Public op: check inputs -> allocate -> route -> shrink x -> gate/up+act -> shrink h -> down -> sum over k."""
import functools
import os

import torch
import triton

from . import kernels, tuning
from .errors import DeviceError, DtypeError, MoeLoraError, ShapeError
from .routing import route

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = {"silu": 0, "swiglu_oai": 1}
PREFETCH_ELEMS = 2048  # BLOCK_M * RP and RP * BLOCK_N / 2 up to which the first run's LoRA
#                        operands load before the K loop (beyond: register spills, ptxas sm_90)


def _prefetch(block_m, block_n, rp):
    return block_m * rp <= PREFETCH_ELEMS and rp * block_n <= 2 * PREFETCH_ELEMS


def _interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_shape(name, t, shape):
    """Raise ShapeError unless t.shape == shape (None entries match anything)."""
    if t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ShapeError(f"{name}: shape {tuple(t.shape)}, expected {want}")


def _check_inputs(x, w13, w2, topk_ids, topk_weights, slots, token_lora, activation, w13_bias, w2_bias):
    """Validate shapes, dtypes and devices; return (T, H, I, E, k)."""
    if activation not in ACTIVATIONS:
        raise MoeLoraError(f"activation {activation!r}: expected one of {sorted(ACTIVATIONS)}")
    _check_shape("x", x, (None, None))
    T, H = x.shape
    _check_shape("w13", w13, (None, None, H))
    E, I2 = w13.shape[:2]
    if I2 % 2:
        raise ShapeError(f"w13: dim 1 is {I2}, expected 2*I (gate rows then up rows)")
    I = I2 // 2
    _check_shape("w2", w2, (E, H, I))
    _check_shape("topk_ids", topk_ids, (T, None))
    k = topk_ids.shape[1]
    _check_shape("topk_weights", topk_weights, (T, k))
    if w13_bias is not None:
        _check_shape("w13_bias", w13_bias, (E, 2 * I))
    if w2_bias is not None:
        _check_shape("w2_bias", w2_bias, (E, H))
    if x.dtype not in DTYPES:
        raise DtypeError(f"x: dtype {x.dtype}, expected one of {DTYPES}")
    for name, t in (("w13", w13), ("w2", w2), ("w13_bias", w13_bias), ("w2_bias", w2_bias)):
        if t is not None and t.dtype != x.dtype:
            raise DtypeError(f"{name}: dtype {t.dtype}, must match x ({x.dtype})")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise DtypeError(f"topk_ids: dtype {topk_ids.dtype}, expected int32 or int64")
    if not topk_weights.is_floating_point():
        raise DtypeError(f"topk_weights: dtype {topk_weights.dtype}, expected a float dtype")
    _check_lora(slots, token_lora, T, E, H, I, x.dtype)
    _check_devices(x, w13, w2, topk_ids, topk_weights, token_lora, w13_bias, w2_bias,
                   None if slots is None else slots.w1_a)
    for name, t in (("w13", w13), ("w2", w2), ("w13_bias", w13_bias), ("w2_bias", w2_bias)):
        if t is not None and t.stride(-1) != 1:
            raise ShapeError(f"{name}: the last dim must be contiguous (stride 1), got strides {t.stride()}")
    return T, H, I, E, k


def _check_lora(slots, token_lora, T, E, H, I, dtype):
    """Slots and token_lora come together and match the layer."""
    if (slots is None) != (token_lora is None):
        raise MoeLoraError("slots and token_lora must be given together (or neither)")
    if slots is None:
        return
    _check_shape("token_lora", token_lora, (T,))
    if token_lora.dtype not in (torch.int32, torch.int64):
        raise DtypeError(f"token_lora: dtype {token_lora.dtype}, expected int32 or int64")
    got = (slots.num_experts, slots.hidden_size, slots.intermediate_size)
    if got != (E, H, I):
        raise ShapeError(f"slots: built for (E, H, I) = {got}, layer is {(E, H, I)}")
    if slots.dtype != dtype:
        raise DtypeError(f"slots: dtype {slots.dtype}, must match x ({dtype})")


def _check_devices(*tensors):
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise DeviceError(f"all tensors must be on one device, got {sorted(map(str, devs))}")
    dev = devs.pop()
    if dev.type != "cuda" and not _interpret():
        raise DeviceError(f"tensors on {dev}: the Triton kernels need CUDA (or TRITON_INTERPRET=1)")


def _meta(x, slots):
    """Compile-time switches shared by every launch."""
    upcast = _interpret()
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    rp = 16 if slots is None else max(16, triton.next_power_of_2(slots.max_rank))
    return dict(UPCAST=upcast, PREC=prec, RP=rp)


@functools.lru_cache(maxsize=None)
def _cuda_name(index):
    return torch.cuda.get_device_name(index)


def _device_name(x):
    return _cuda_name(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.is_cuda else "cpu"


def moe_lora_forward(x, w13, w2, topk_ids, topk_weights, slots=None, token_lora=None,
                     activation="silu", w13_bias=None, w2_bias=None, out=None):
    """MoE layer forward with a per-token LoRA adapter (formats.md section 4).

    x (T, H); w13 (E, 2I, H) gate rows then up rows; w2 (E, H, I); topk_ids (T, k) int;
    topk_weights (T, k); slots: LoraSlots of this layer (or None); token_lora (T,) int slot
    per token, -1 = no adapter (ids outside [0, S) also mean none); activation "silu" or
    "swiglu_oai" (GPT-OSS clamped SwiGLU, usually with w13_bias (E, 2I) and w2_bias (E, H)).
    fp16 / bf16 / fp32, fp32 accumulation. Returns (T, H) in x.dtype. Expert ids outside
    [0, E) are dropped from the sum (not checked: checking would sync the device).
    out: optional preallocated (T, H) result tensor (x's dtype and device).
    """
    T, H, I, E, k = _check_inputs(x, w13, w2, topk_ids, topk_weights, slots, token_lora,
                                  activation, w13_bias, w2_bias)
    if out is None:
        out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    else:
        _check_shape("out", out, (T, H))
        if out.dtype != x.dtype or out.device != x.device:
            raise DtypeError(f"out: {out.dtype} on {out.device}, expected {x.dtype} on {x.device}")
    x = x if x.stride(-1) == 1 else x.contiguous()  # small inputs: copy rather than refuse
    token_lora = token_lora.contiguous() if token_lora is not None else None
    if T == 0:
        return out
    cfg = tuning.get_config(T, E, H, I, k, str(x.dtype).removeprefix("torch."), _device_name(x))
    if x.dtype == torch.float32:
        cfg = tuning.fit_fp32(cfg)
    _launch(x, w13, w2, topk_ids, topk_weights, slots, token_lora, ACTIVATIONS[activation],
            w13_bias, w2_bias, cfg, out)
    return out


def _launch(x, w13, w2, topk_ids, topk_weights, slots, token_lora, act, w13_bias, w2_bias, cfg, out):
    """Route, run the kernels, reduce over k into `out` (T, H).

    cfg["FUSE"] (decode): the LoRA shrinks ride along the base K loops, no shrink kernels.
    cfg["DOWN_IN_GATE_UP"]: the down shrink h @ A^T is summed over N tiles in the gate/up
    epilogue (atomics) instead of a second shrink launch over h.
    """
    T, H = x.shape
    E, I, k = w13.shape[0], w2.shape[2], topk_ids.shape[1]
    has_lora = slots is not None
    fuse = has_lora and bool(cfg.get("FUSE", False))
    down_in_gu = has_lora and not fuse and bool(cfg.get("DOWN_IN_GATE_UP", True))
    bm = cfg["gate_up"]["BLOCK_M"]
    rt = route(topk_ids, token_lora if has_lora else None, E, slots.num_slots if has_lora else 0, bm)
    meta = _meta(x, slots)
    lora = _lora_args(slots, token_lora, x)
    h = torch.empty(rt.num_blocks_max * bm, I, dtype=x.dtype, device=x.device)
    y = torch.empty(T * k, H, dtype=x.dtype, device=x.device)
    # GROUP_K: LoRA expand of GROUP_K // RP (1, 2 or 4) adapter runs of a block as one dot (0: one per run)
    gk = int(cfg.get("GROUP_K", 0))
    rg = min(4, max(1, gk // meta["RP"])) if gk else 0
    xa = ha = None
    if has_lora and not fuse:  # shrink results: cols [gate | up | down], RP each, fp32, zeroed
        rp = meta["RP"]
        buf = torch.zeros(rt.num_blocks_max * bm, 3 * rp, dtype=torch.float32, device=x.device)
        xa, ha = buf, buf[:, 2 * rp:]
        _shrink(x, slots.w1_a, slots.w3_a, xa, rt, slots, k, True, cfg["shrink"], meta)
    _gate_up(x, w13, w13_bias, h, rt, lora, xa, ha, act, k, fuse, down_in_gu, cfg["gate_up"], meta, rg)
    if has_lora and not fuse and not down_in_gu:
        _shrink(h, slots.w2_a, slots.w2_a, ha, rt, slots, k, False, cfg["shrink"], meta)
    _down(h, w2, w2_bias, y, topk_weights.reshape(-1), rt, lora, ha, k, fuse, cfg["down"], meta, rg)
    torch.sum(y.view(T, k, H), dim=1, out=out)


def _lora_args(slots, token_lora, x):
    """Slot tensors and sizes for the GEMM launches; dummies (never read) without adapters."""
    if slots is None:
        d = x.new_empty(1, 1, 1, 1)
        z = torch.zeros(1, 3, dtype=torch.int32, device=x.device)
        return dict(token_lora=d, w1_a=d, w3_a=d, w2_a=d, w1_b=d, w3_b=d, w2_b=d, scaling=d,
                    present=z, shared_a=z, R=1, S=0)
    return dict(token_lora=token_lora, w1_a=slots.w1_a, w3_a=slots.w3_a, w2_a=slots.w2_a,
                w1_b=slots.w1_b, w3_b=slots.w3_b, w2_b=slots.w2_b, scaling=slots.scaling,
                present=slots.present, shared_a=slots.shared_a, R=slots.max_rank, S=slots.num_slots)


def _split(D, cfg):
    """(SPLIT_K, KSPLIT): K range per shrink program and the number of partials."""
    split = cfg.get("SPLIT_K") or D
    split = max(cfg["BLOCK_K"], triton.cdiv(min(split, D), cfg["BLOCK_K"]) * cfg["BLOCK_K"])
    return split, triton.cdiv(D, split)


def _shrink(src, a0, a1, out, rt, slots, k, pair, cfg, meta):
    """out (zeroed fp32 rows) += src @ A^T per sorted row: x for gate|up (pair) or h for down.

    One program per (expert, slot) segment and K split (splits add with atomics); rows of
    absent projections stay 0 and the expand masks them off by the same presence flags.
    """
    D = src.shape[1]
    cfg = dict(cfg)
    split, ksplit = _split(D, cfg)
    cfg.pop("SPLIT_K", None)
    if rt.max_segments == 0:
        return
    kernels.lora_shrink_kernel[(rt.max_segments, ksplit)](
        src, a0, a1, out, rt.sorted_ids, rt.segments, rt.num_segments, slots.present, slots.shared_a,
        D, slots.max_rank,
        src.stride(0), a0.stride(0), a0.stride(1), a0.stride(2), 0, out.stride(0),
        PAIR=pair, GATHER=pair, TOPK=k, SPLIT_K=split,
        EVEN_K=D % cfg["BLOCK_K"] == 0 and split % cfg["BLOCK_K"] == 0, **meta, **cfg)


def _gate_up(x, w13, bias, h, rt, lora, xa, ha, act, k, fuse, down_in_gu, cfg, meta, rg):
    """h (M_MAX, I) = act(x W1^T + dW1, x W3^T + dW3) per sorted row; ha += h @ A_down^T."""
    T, H = x.shape
    I = w13.shape[1] // 2
    xa = xa if xa is not None else x.new_empty(1, 1, dtype=torch.float32)
    ha = ha if ha is not None else x.new_empty(1, 1, dtype=torch.float32)
    a2 = lora["w2_a"]
    b = bias if bias is not None else x.new_empty(1, 1)
    a, bb = lora["w1_a"], lora["w1_b"]
    cfg = dict(cfg)
    bm = cfg.pop("BLOCK_M")
    grid = (rt.num_blocks_max * triton.cdiv(I, cfg["BLOCK_N"]),)
    kernels.gate_up_kernel[grid](
        x, w13, b, h, rt.sorted_ids, rt.block_expert, lora["token_lora"], xa, lora["w1_a"], lora["w3_a"],
        lora["w1_b"], lora["w3_b"], a2, ha, lora["scaling"], lora["present"], lora["shared_a"],
        H, I, lora["R"], T * k, lora["S"], rt.num_blocks_max,
        x.stride(0), w13.stride(0), w13.stride(1), b.stride(0), h.stride(0), 0, xa.stride(0), ha.stride(0),
        a.stride(0), a.stride(1), a.stride(2), a2.stride(0), a2.stride(1), a2.stride(2),
        bb.stride(0), bb.stride(1), bb.stride(2),
        KSPLIT=1, TOPK=k, ACT=act, HAS_BIAS=bias is not None, HAS_LORA=lora["S"] > 0,
        FUSE=fuse, DOWN_SHRINK=down_in_gu, PREFETCH=_prefetch(bm, cfg["BLOCK_N"], meta["RP"] * max(rg, 1)),
        RG=rg,
        BLOCK_M=bm, EVEN_K=H % cfg["BLOCK_K"] == 0, **meta, **cfg)


def _down(h, w2, bias, y, topk_w, rt, lora, ha, k, fuse, cfg, meta, rg):
    """y (P, H) = topk_weight * (h W2^T + dW2 + b2) per pair."""
    E, H, I = w2.shape
    ha = ha if ha is not None else h.new_empty(1, 1, dtype=torch.float32)
    b = bias if bias is not None else h.new_empty(1, 1)
    a, bb = lora["w2_a"], lora["w2_b"]
    grid = (rt.num_blocks_max * triton.cdiv(H, cfg["BLOCK_N"]),)
    kernels.down_kernel[grid](
        h, w2, b, y, topk_w, rt.sorted_ids, rt.block_expert, lora["token_lora"], ha, lora["w2_a"],
        lora["w2_b"], lora["scaling"], lora["present"],
        H, I, lora["R"], y.shape[0], lora["S"], rt.num_blocks_max,
        h.stride(0), w2.stride(0), w2.stride(1), b.stride(0), y.stride(0), 0, ha.stride(0),
        a.stride(0), a.stride(1), a.stride(2), bb.stride(0), bb.stride(1), bb.stride(2),
        KSPLIT=1, TOPK=k, HAS_BIAS=bias is not None, HAS_LORA=lora["S"] > 0, FUSE=fuse,
        PREFETCH=_prefetch(rt.block_m, cfg["BLOCK_N"], meta["RP"] * max(rg, 1)), RG=rg,
        BLOCK_M=rt.block_m, EVEN_K=I % cfg["BLOCK_K"] == 0, **meta, **cfg)
