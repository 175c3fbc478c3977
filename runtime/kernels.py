"""Triton kernels: route (histogram -> prefix -> scatter) -> shrink x -> gate/up+LoRA+act -> shrink h -> down+LoRA."""
import triton
import triton.language as tl


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b; UPCAST computes in fp32 (the CPU interpreter gets bf16 dots wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row blocks (one expert's, mostly) share each weight tile."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _block_rows(sorted_ids_ptr, token_lora_ptr, pid_m, P, S,
                TOPK: tl.constexpr, BLOCK_M: tl.constexpr, HAS_LORA: tl.constexpr):
    """Rows of one block: sorted row index, pair id, validity, token, slot (-1 = none)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + rows)
    valid = ids < P
    tok = ids // TOPK
    if HAS_LORA:
        slot = tl.load(token_lora_ptr + tok, mask=valid, other=-1).to(tl.int32)
        slot = tl.where(valid & (slot >= 0) & (slot < S), slot, -1)
    else:
        slot = tl.full((BLOCK_M,), -1, tl.int32)
    return rows, ids, valid, tok, slot


@triton.jit
def _block_runs(sorted_ids_ptr, token_lora_ptr, rows, slot, pid_m, P, S,
                TOPK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows are sorted by slot inside a block: run index of each row (-1 before the first run) and run count."""
    prev = tl.load(sorted_ids_ptr + rows - 1, mask=rows > pid_m * BLOCK_M, other=P)
    prev_slot = tl.load(token_lora_ptr + prev // TOPK, mask=prev < P, other=-1).to(tl.int32)
    prev_slot = tl.where((prev < P) & (prev_slot >= 0) & (prev_slot < S), prev_slot, -1)
    start = (slot >= 0) & (slot != prev_slot)
    run = tl.cumsum(start.to(tl.int32), axis=0) - 1
    return tl.where(slot >= 0, run, -1), tl.sum(start.to(tl.int32), axis=0)


@triton.jit
def _route_keys(topk_ids_ptr, token_lora_ptr, offs, P, E, S,
                TOPK: tl.constexpr, S1P: tl.constexpr, HAS_LORA: tl.constexpr):
    """Sort key expert * S1P + (slot + 1) of each (token, k) pair; mask drops bad expert ids."""
    inb = offs < P
    e = tl.load(topk_ids_ptr + offs, mask=inb, other=0).to(tl.int32)
    if HAS_LORA:
        s = tl.load(token_lora_ptr + offs // TOPK, mask=inb, other=-1).to(tl.int32)
        s = tl.where((s >= 0) & (s < S), s, -1) + 1
    else:
        s = tl.zeros_like(e)
    return e * S1P + s, inb & (e >= 0) & (e < E)


# ----------------------------------------------------------------------------- routing
@triton.jit
def route_histogram_kernel(
    topk_ids_ptr,  # (P,) int expert of each pair
    token_lora_ptr,  # (T,) int slot of each token
    counts_ptr,  # (E_PAD * S1P,) int32, zeroed: pairs per (expert, slot + 1)
    P, E, S,
    TOPK: tl.constexpr, S1P: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key, ok = _route_keys(topk_ids_ptr, token_lora_ptr, offs, P, E, S, TOPK, S1P, HAS_LORA)
    tl.atomic_add(counts_ptr + key, 1, mask=ok)


@triton.jit
def _prefix(counts_ptr, cursor_ptr, sorted_ids_ptr, block_expert_ptr, seg_ptr, nseg_ptr, P, NB_MAX,
            S1P: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BB: tl.constexpr,
            HAS_LORA: tl.constexpr):
    """Counts per key -> first row per key, padding rows, block -> expert table, segments."""
    e = tl.arange(0, E_PAD)
    idx = e[:, None] * S1P + tl.arange(0, S1P)[None, :]
    cnt = tl.load(counts_ptr + idx, cache_modifier=".cg")
    ecount = tl.sum(cnt, axis=1)
    epad = (ecount + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    eend = tl.cumsum(epad, axis=0)
    estart = eend - epad
    kstart = estart[:, None] + tl.cumsum(cnt, axis=1) - cnt
    tl.store(cursor_ptr + idx, kstart)
    if HAS_LORA:
        _store_segments(seg_ptr, nseg_ptr, cnt, kstart, e, S1P)
    j = tl.arange(0, BLOCK_M)[None, :]
    pad = tl.zeros((E_PAD, BLOCK_M), tl.int32) + P
    tl.store(sorted_ids_ptr + (estart + ecount)[:, None] + j, pad, mask=j < (epad - ecount)[:, None])
    total = tl.sum(epad, axis=0)
    for b0 in range(0, NB_MAX, BB):
        b = b0 + tl.arange(0, BB)
        start = b * BLOCK_M
        be = tl.sum((eend[None, :] <= start[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(start < total, be, -1), mask=b < NB_MAX)


@triton.jit
def route_prefix_kernel(
    counts_ptr,  # (E_PAD * S1P,) int32 pairs per key
    cursor_ptr,  # (E_PAD * S1P,) int32 out: first sorted row of each key
    sorted_ids_ptr,  # (M_MAX,) int32 out: padding rows of each expert set to P
    block_expert_ptr,  # (NB_MAX,) int32 out: expert of each row block, -1 past the end
    seg_ptr,  # (SEG_MAX, 4) int32 out: (expert, slot, first row, rows) of each non-empty adapter segment
    nseg_ptr,  # (1,) int32 out: number of segments
    P, NB_MAX,
    S1P: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BB: tl.constexpr,
    HAS_LORA: tl.constexpr,
):
    _prefix(counts_ptr, cursor_ptr, sorted_ids_ptr, block_expert_ptr, seg_ptr, nseg_ptr, P, NB_MAX,
            S1P, E_PAD, BLOCK_M, BB, HAS_LORA)


@triton.jit
def route_small_kernel(
    topk_ids_ptr,  # (P,) int
    token_lora_ptr,  # (T,) int
    counts_ptr,  # (E_PAD * S1P,) int32 scratch, zeroed here
    cursor_ptr,  # (E_PAD * S1P,) int32 scratch
    sorted_ids_ptr,  # (M_MAX,) int32 out
    block_expert_ptr,  # (NB_MAX,) int32 out
    seg_ptr,  # (SEG_MAX, 4) int32 out
    nseg_ptr,  # (1,) int32 out
    P, E, S, NB_MAX,
    TOPK: tl.constexpr, S1P: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BB: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK: tl.constexpr,
):
    """All routing in one program (small P): zero -> histogram -> prefix -> scatter, barriers between."""
    for i0 in range(0, E_PAD * S1P, BLOCK):
        tl.store(counts_ptr + i0 + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.int32),
                 mask=i0 + tl.arange(0, BLOCK) < E_PAD * S1P)
    tl.debug_barrier()
    for p0 in range(0, P, BLOCK):
        key, ok = _route_keys(topk_ids_ptr, token_lora_ptr, p0 + tl.arange(0, BLOCK), P, E, S,
                              TOPK, S1P, HAS_LORA)
        tl.atomic_add(counts_ptr + key, 1, mask=ok)
    tl.debug_barrier()
    _prefix(counts_ptr, cursor_ptr, sorted_ids_ptr, block_expert_ptr, seg_ptr, nseg_ptr, P, NB_MAX,
            S1P, E_PAD, BLOCK_M, BB, HAS_LORA)
    tl.debug_barrier()
    for p0 in range(0, P, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        key, ok = _route_keys(topk_ids_ptr, token_lora_ptr, offs, P, E, S, TOPK, S1P, HAS_LORA)
        pos = tl.atomic_add(cursor_ptr + key, 1, mask=ok)
        tl.store(sorted_ids_ptr + pos, offs, mask=ok)


@triton.jit
def _store_segments(seg_ptr, nseg_ptr, cnt, kstart, e, S1P: tl.constexpr):
    """Compact the (expert, slot >= 0) keys with rows into the segment table."""
    sidx = tl.arange(0, S1P)[None, :]
    ne = (cnt > 0) & (sidx >= 1)
    nei = ne.to(tl.int32)
    row_total = tl.sum(nei, axis=1)
    pos = (tl.cumsum(row_total, axis=0) - row_total)[:, None] + tl.cumsum(nei, axis=1) - nei
    base = seg_ptr + pos * 4
    tl.store(base, e[:, None] + sidx * 0, mask=ne)
    tl.store(base + 1, sidx - 1 + 0 * e[:, None], mask=ne)
    tl.store(base + 2, kstart, mask=ne)
    tl.store(base + 3, cnt, mask=ne)
    tl.store(nseg_ptr, tl.sum(row_total, axis=0))


@triton.jit
def route_scatter_kernel(
    topk_ids_ptr,  # (P,) int
    token_lora_ptr,  # (T,) int
    cursor_ptr,  # (E_PAD * S1P,) int32 next free sorted row of each key
    sorted_ids_ptr,  # (M_MAX,) int32 out: pair id of each sorted row
    P, E, S,
    TOPK: tl.constexpr, S1P: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key, ok = _route_keys(topk_ids_ptr, token_lora_ptr, offs, P, E, S, TOPK, S1P, HAS_LORA)
    pos = tl.atomic_add(cursor_ptr + key, 1, mask=ok)
    tl.store(sorted_ids_ptr + pos, offs, mask=ok)


# ----------------------------------------------------------------------------- LoRA shrink
@triton.jit
def _shrink_run(in_ptrs, a_ptrs, sel, k_lo, k_hi, R, a2_ptrs,
                TWO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RP: tl.constexpr,
                EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """(BLOCK_M, RP) fp32 in[sel rows, k_lo:k_hi] @ A^T (and a second A when TWO: one read of in)."""
    r_ok = (tl.arange(0, RP) < R)[None, :]
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, RP), tl.float32)
    acc2 = tl.zeros((BLOCK_M, RP), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            v = tl.load(in_ptrs, mask=sel[:, None], other=0.0)
            a = tl.load(a_ptrs, mask=r_ok, other=0.0)
        else:
            kin = (k0 + kk) < k_hi
            v = tl.load(in_ptrs, mask=sel[:, None] & kin[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=r_ok & kin[:, None], other=0.0)
        acc = _dot(v, a, acc, UPCAST, PREC)
        if TWO:
            if EVEN_K:
                a2 = tl.load(a2_ptrs, mask=r_ok, other=0.0)
            else:
                a2 = tl.load(a2_ptrs, mask=r_ok & kin[:, None], other=0.0)
            acc2 = _dot(v, a2, acc2, UPCAST, PREC)
            a2_ptrs += BLOCK_K
        in_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    return acc, acc2


@triton.jit
def lora_shrink_kernel(
    # pointers
    in_ptr,  # (T, D) x gathered by token (GATHER) | (M_MAX, D) h by sorted row
    a0_ptr,  # (S, E, R, D) lora_a: w1 (PAIR) or w2
    a1_ptr,  # (S, E, R, D) lora_a: w3 (read only if PAIR)
    out_ptr,  # (M_MAX, >= 2 * RP) fp32, zeroed: += shrink of each K split (atomics), cols gate|up
    sorted_ids_ptr,  # (M_MAX,) int32
    seg_ptr,  # (SEG_MAX, 4) int32 (expert, slot, first row, rows) per adapter segment
    nseg_ptr,  # (1,) int32
    present_ptr,  # (S, 3) int32
    shared_ptr,  # (S,) int32
    # sizes
    D, R,
    # strides
    stride_in, stride_as, stride_ae, stride_ar, stride_ok, stride_om,
    # meta
    PAIR: tl.constexpr, GATHER: tl.constexpr, TOPK: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RP: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (expert, slot) segment and K split: every row it reads uses one A."""
    # stride_ok is 0: all K splits add into the same rows
    pid = tl.program_id(0)
    ks = tl.program_id(1)
    if pid >= tl.load(nseg_ptr):
        return
    e = tl.load(seg_ptr + pid * 4)
    s = tl.load(seg_ptr + pid * 4 + 1)
    first = tl.load(seg_ptr + pid * 4 + 2)
    end = first + tl.load(seg_ptr + pid * 4 + 3)
    p0 = tl.load(present_ptr + s * 3 + 2 * (1 - PAIR)) != 0
    p1 = p0 & False
    if PAIR:
        p1 = (tl.load(present_ptr + s * 3 + 1) != 0) & (tl.load(shared_ptr + s) == 0)
    k_lo = ks * SPLIT_K
    k_hi = tl.minimum(k_lo + SPLIT_K, D)
    base = s.to(tl.int64) * stride_as + e.to(tl.int64) * stride_ae
    a_off = tl.arange(0, RP)[None, :] * stride_ar + (k_lo + tl.arange(0, BLOCK_K))[:, None]
    a0_ptrs = a0_ptr + base + a_off
    a1_ptrs = a1_ptr + base + a_off
    if p0 | p1:
        for c0 in range(first, end, BLOCK_M):
            rows = c0 + tl.arange(0, BLOCK_M)
            sel = rows < end
            ids = tl.load(sorted_ids_ptr + rows, mask=sel, other=0)
            if GATHER:
                src = ids // TOPK
            else:
                src = rows
            in_ptrs = in_ptr + src.to(tl.int64)[:, None] * stride_in + (k_lo + tl.arange(0, BLOCK_K))[None, :]
            out_ptrs = out_ptr + ks * stride_ok + rows[:, None] * stride_om + tl.arange(0, RP)[None, :]
            if p0 & p1:
                acc, acc2 = _shrink_run(in_ptrs, a0_ptrs, sel, k_lo, k_hi, R, a1_ptrs, True,
                                        BLOCK_M, BLOCK_K, RP, EVEN_K, UPCAST, PREC)
                tl.atomic_add(out_ptrs, acc, mask=sel[:, None])
                tl.atomic_add(out_ptrs + RP, acc2, mask=sel[:, None])
            elif p0:
                acc, acc2 = _shrink_run(in_ptrs, a0_ptrs, sel, k_lo, k_hi, R, a0_ptrs, False,
                                        BLOCK_M, BLOCK_K, RP, EVEN_K, UPCAST, PREC)
                tl.atomic_add(out_ptrs, acc, mask=sel[:, None])
            else:
                acc, acc2 = _shrink_run(in_ptrs, a1_ptrs, sel, k_lo, k_hi, R, a1_ptrs, False,
                                        BLOCK_M, BLOCK_K, RP, EVEN_K, UPCAST, PREC)
                tl.atomic_add(out_ptrs + RP, acc, mask=sel[:, None])


# ----------------------------------------------------------------------------- LoRA expand
@triton.jit
def _expand_reg(acc, v, sel, on, scale, b_base, n, n_ok, R, stride_bn,
                RP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc + (scale * v[sel rows]) @ B[n]^T  -- v (BLOCK_M, RP) shrink in registers, B (N, R).

    `on` (scalar) masks everything off when the slot lacks this projection: no bytes move.
    """
    r = tl.arange(0, RP)
    on_i = on.to(tl.int32)
    rows_on = sel & ((sel.to(tl.int32) * 0 + on_i) != 0)
    v = tl.where(rows_on[:, None], v, 0.0) * scale
    b = tl.load(b_base + n[None, :] * stride_bn + r[:, None],
                mask=((r < R) & ((r * 0 + on_i) != 0))[:, None] & n_ok[None, :], other=0.0)
    return _dot(v.to(b.dtype), b, acc, UPCAST, PREC)


@triton.jit
def _expand_run(acc, sh_ptrs, stride_k, scale, sel, on, b_base, n, n_ok, R, stride_bn,
                KSPLIT: tl.constexpr, RP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """_expand_reg on the sum of the shrink kernel's KSPLIT partials (KSPLIT, M_MAX, RP) of sel rows."""
    rows_on = (sel & ((sel.to(tl.int32) * 0 + on.to(tl.int32)) != 0))[:, None]
    v = tl.load(sh_ptrs, mask=rows_on, other=0.0)
    for ks in range(1, KSPLIT):
        v += tl.load(sh_ptrs + ks * stride_k, mask=rows_on, other=0.0)
    return _expand_reg(acc, v, sel, on, scale, b_base, n, n_ok, R, stride_bn, RP, UPCAST, PREC)


@triton.jit
def _load_run(sh_ptrs, b_base, sel, on, n, n_ok, R, stride_bn, RP: tl.constexpr):
    """Operands of one run's expand, masked off when the slot lacks the projection:
    shrink rows (BLOCK_M, RP) fp32 and B^T tile (RP, BLOCK_N)."""
    r = tl.arange(0, RP)
    on_i = on.to(tl.int32)
    rows_on = sel & ((sel.to(tl.int32) * 0 + on_i) != 0)
    v = tl.load(sh_ptrs, mask=rows_on[:, None], other=0.0)
    b = tl.load(b_base + n[None, :] * stride_bn + r[:, None],
                mask=((r < R) & ((r * 0 + on_i) != 0))[:, None] & n_ok[None, :], other=0.0)
    return v, b


@triton.jit
def _run_ops(sh_ptrs, run, slot, j, present_ptr, scale_ptr, shared_ptr, b_ptr, e, stride_bs, stride_bse,
             n, n_ok, R, stride_bn, stride_k, PROJ: tl.constexpr, KSPLIT: tl.constexpr, RP: tl.constexpr):
    """Run j's expand operands, scaled: v (BLOCK_M, RP) fp32 and B^T (RP, BLOCK_N); vector loads
    from scalar bases (the run's slot is one scalar); zeros when the block has no run j."""
    sel, s, on = _run_slot(run, slot, j, present_ptr, PROJ)
    if PROJ == 1:
        sh_ptrs += RP * (1 - tl.load(shared_ptr + s))
    v, b = _load_run(sh_ptrs, b_ptr + s.to(tl.int64) * stride_bs + e.to(tl.int64) * stride_bse,
                     sel, on, n, n_ok, R, stride_bn, RP)
    for ks in range(1, KSPLIT):
        v += tl.load(sh_ptrs + ks * stride_k, mask=(sel & ((sel.to(tl.int32) * 0 + on.to(tl.int32)) != 0))[:, None],
                     other=0.0)
    return v * tl.load(scale_ptr + s * 3 + PROJ), b


@triton.jit
def _cat_k(v0, v1, b0, b1):
    """[v0 | v1] along K (dim 1) and [b0 ; b1] along K (dim 0)."""
    v = tl.reshape(tl.permute(tl.join(v0, v1), (0, 2, 1)), (v0.shape[0], 2 * v0.shape[1]))
    b = tl.reshape(tl.permute(tl.join(b0, b1), (2, 0, 1)), (2 * b0.shape[0], b0.shape[1]))
    return v, b


@triton.jit
def _load_group(sh_ptrs, run, slot, j0, present_ptr, scale_ptr, shared_ptr, b_ptr, e, stride_bs, stride_bse,
                n, n_ok, R, stride_bn, stride_k, PROJ: tl.constexpr, KSPLIT: tl.constexpr,
                RG: tl.constexpr, RP: tl.constexpr):
    """Runs j0 .. j0+RG-1 (RG in 1, 2, 4) as ONE dot of K = RG*RP: v (BLOCK_M, RG*RP), row i's
    scaled shrink in the columns of its run, 0 elsewhere; b (RG*RP, BLOCK_N) the runs' B^T stacked.
    All of the group's loads issue before its one dot."""
    v, b = _run_ops(sh_ptrs, run, slot, j0, present_ptr, scale_ptr, shared_ptr, b_ptr, e, stride_bs,
                    stride_bse, n, n_ok, R, stride_bn, stride_k, PROJ, KSPLIT, RP)
    if RG >= 2:
        v1, b1 = _run_ops(sh_ptrs, run, slot, j0 + 1, present_ptr, scale_ptr, shared_ptr, b_ptr, e, stride_bs,
                          stride_bse, n, n_ok, R, stride_bn, stride_k, PROJ, KSPLIT, RP)
        if RG == 4:
            v2, b2 = _run_ops(sh_ptrs, run, slot, j0 + 2, present_ptr, scale_ptr, shared_ptr, b_ptr, e,
                              stride_bs, stride_bse, n, n_ok, R, stride_bn, stride_k, PROJ, KSPLIT, RP)
            v3, b3 = _run_ops(sh_ptrs, run, slot, j0 + 3, present_ptr, scale_ptr, shared_ptr, b_ptr, e,
                              stride_bs, stride_bse, n, n_ok, R, stride_bn, stride_k, PROJ, KSPLIT, RP)
            v01, b01 = _cat_k(v, v1, b, b1)
            v23, b23 = _cat_k(v2, v3, b2, b3)
            v, b = _cat_k(v01, v23, b01, b23)
        else:
            v, b = _cat_k(v, v1, b, b1)
    return v, b


@triton.jit
def _run_slot(run, slot, j, present_ptr, PROJ: tl.constexpr):
    """Rows of run j, its slot (0 when the block has no run j) and whether it adapts PROJ."""
    sel = run == j
    s = tl.maximum(tl.max(tl.where(sel, slot, -1), axis=0), 0)
    on = (tl.max(sel.to(tl.int32), axis=0) > 0) & (tl.load(present_ptr + s * 3 + PROJ) != 0)
    return sel, s, on


# ----------------------------------------------------------------------------- activations
@triton.jit
def _activate(g, u, ACT: tl.constexpr):
    """ACT 0: silu(g) * u; ACT 1: GPT-OSS clamped SwiGLU g*sigmoid(1.702 g)*(u+1), limit 7."""
    if ACT == 0:
        return g * tl.sigmoid(g) * u
    g = tl.minimum(g, 7.0)
    u = tl.minimum(tl.maximum(u, -7.0), 7.0)
    return g * tl.sigmoid(1.702 * g) * (u + 1.0)


# ----------------------------------------------------------------------------- gate/up
@triton.jit
def gate_up_kernel(
    # pointers
    x_ptr,  # (T, H)
    w13_ptr,  # (E, 2I, H) gate rows then up rows
    b13_ptr,  # (E, 2I) bias (read only if HAS_BIAS)
    h_ptr,  # (M_MAX, I) out: act(gate) * up per sorted row
    sorted_ids_ptr,  # (M_MAX,) int32
    block_expert_ptr,  # (NB_MAX,) int32
    token_lora_ptr,  # (T,) int
    xa_ptr,  # (KSPLIT, M_MAX, 2 * RP) fp32 gate/up shrink partials of x
    w1a_ptr,  # (S, E, R, H) gate lora_a (read only if FUSE)
    w3a_ptr,  # (S, E, R, H) up lora_a (read only if FUSE)
    w1b_ptr,  # (S, E, I, R) gate lora_b
    w3b_ptr,  # (S, E, I, R) up lora_b
    w2a_ptr,  # (S, E, R, I) down lora_a: the down shrink of h is done here if DOWN_SHRINK
    ha_ptr,  # (M_MAX, RP) fp32, zeroed: += h tile @ A_down tile^T (atomics over N tiles)
    scale_ptr,  # (S, 3) fp32
    present_ptr,  # (S, 3) int32
    shared_ptr,  # (S,) int32
    # sizes
    H, I, R, P, S, NB_MAX,
    # strides
    stride_xt, stride_we, stride_wn, stride_be, stride_hm, stride_xak, stride_xam, stride_ham,
    stride_as, stride_ae, stride_ar, stride_a2s, stride_a2e, stride_a2r, stride_bs, stride_bse, stride_bn,
    # meta
    KSPLIT: tl.constexpr, TOPK: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr, FUSE: tl.constexpr, DOWN_SHRINK: tl.constexpr, PREFETCH: tl.constexpr,
    RG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    RP: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_m, pid_n = _swizzle(tl.program_id(0), NB_MAX, tl.cdiv(I, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    rows, ids, valid, tok, slot = _block_rows(sorted_ids_ptr, token_lora_ptr, pid_m, P, S,
                                              TOPK, BLOCK_M, HAS_LORA)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    kk = tl.arange(0, BLOCK_K)
    r = tl.arange(0, RP)
    x_base = x_ptr + tok.to(tl.int64)[:, None] * stride_xt + kk[None, :]
    x_ptrs = x_base
    wg_ptrs = w13_ptr + e.to(tl.int64) * stride_we + n[None, :] * stride_wn + kk[:, None]
    wu_ptrs = wg_ptrs + I * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    xa_g = tl.zeros((BLOCK_M, RP), tl.float32)
    xa_u = tl.zeros((BLOCK_M, RP), tl.float32)
    if FUSE:  # decode: the first adapter run's shrink rides along the base K loop
        run, nruns = _block_runs(sorted_ids_ptr, token_lora_ptr, rows, slot, pid_m, P, S, TOPK, BLOCK_M)
        sel0, s0, g_on = _run_slot(run, slot, 0, present_ptr, 0)
        sel0, s0, u_on = _run_slot(run, slot, 0, present_ptr, 1)
        sh0 = tl.load(shared_ptr + s0) != 0
        a_off = s0.to(tl.int64) * stride_as + e.to(tl.int64) * stride_ae + r[None, :] * stride_ar + kk[:, None]
        ag_ptrs = w1a_ptr + a_off
        au_ptrs = w3a_ptr + a_off
        ag_on = ((r < R) & ((r * 0 + g_on.to(tl.int32)) != 0))[None, :]
        au_on = ((r < R) & ((r * 0 + (u_on & (sh0 == 0)).to(tl.int32)) != 0))[None, :]
    elif HAS_LORA and RG > 0:  # grouped expand: RG runs per dot
        run, nruns = _block_runs(sorted_ids_ptr, token_lora_ptr, rows, slot, pid_m, P, S, TOPK, BLOCK_M)
        gp = xa_ptr + rows[:, None] * stride_xam + r[None, :]
        if PREFETCH:  # the first group's operands load while the K loop streams weights
            vg0, bg0 = _load_group(gp, run, slot, 0, present_ptr, scale_ptr, shared_ptr, w1b_ptr, e, stride_bs, stride_bse,
                                   n, n_ok, R, stride_bn, stride_xak, 0, KSPLIT, RG, RP)
            vu0, bu0 = _load_group(gp, run, slot, 0, present_ptr, scale_ptr, shared_ptr, w3b_ptr, e, stride_bs, stride_bse,
                                   n, n_ok, R, stride_bn, stride_xak, 1, KSPLIT, RG, RP)
    elif HAS_LORA:
        run, nruns = _block_runs(sorted_ids_ptr, token_lora_ptr, rows, slot, pid_m, P, S, TOPK, BLOCK_M)
        xa_ptrs = xa_ptr + rows[:, None] * stride_xam + r[None, :]
        if PREFETCH:  # the first run's expand operands load while the K loop streams weights
            sel0, s0, g_on0 = _run_slot(run, slot, 0, present_ptr, 0)
            sel0, s0, u_on0 = _run_slot(run, slot, 0, present_ptr, 1)
            bs0 = s0.to(tl.int64) * stride_bs + e.to(tl.int64) * stride_bse
            vg0, bg0 = _load_run(xa_ptrs, w1b_ptr + bs0, sel0, g_on0, n, n_ok, R, stride_bn, RP)
            vu0, bu0 = _load_run(xa_ptrs + RP * (1 - tl.load(shared_ptr + s0)), w3b_ptr + bs0, sel0, u_on0,
                                 n, n_ok, R, stride_bn, RP)
            sg0 = tl.load(scale_ptr + s0 * 3)
            su0 = tl.load(scale_ptr + s0 * 3 + 1)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            xv = tl.load(x_ptrs, mask=valid[:, None], other=0.0)
            wg = tl.load(wg_ptrs, mask=n_ok[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            kin = (k0 + kk) < H
            xv = tl.load(x_ptrs, mask=valid[:, None] & kin[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=n_ok[None, :] & kin[:, None], other=0.0)
            wu = tl.load(wu_ptrs, mask=n_ok[None, :] & kin[:, None], other=0.0)
        acc_g = _dot(xv, wg, acc_g, UPCAST, PREC)
        acc_u = _dot(xv, wu, acc_u, UPCAST, PREC)
        if FUSE:
            if EVEN_K:
                ag = tl.load(ag_ptrs, mask=ag_on, other=0.0)
                au = tl.load(au_ptrs, mask=au_on, other=0.0)
            else:
                ag = tl.load(ag_ptrs, mask=ag_on & kin[:, None], other=0.0)
                au = tl.load(au_ptrs, mask=au_on & kin[:, None], other=0.0)
            xa_g = _dot(xv, ag, xa_g, UPCAST, PREC)
            xa_u = _dot(xv, au, xa_u, UPCAST, PREC)
            ag_ptrs += BLOCK_K
            au_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    if HAS_BIAS:
        b_ptrs = b13_ptr + e.to(tl.int64) * stride_be + n
        acc_g += tl.load(b_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptrs + I, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if FUSE:
        bs = s0.to(tl.int64) * stride_bs + e.to(tl.int64) * stride_bse
        acc_g = _expand_reg(acc_g, xa_g, sel0, g_on, tl.load(scale_ptr + s0 * 3), w1b_ptr + bs,
                            n, n_ok, R, stride_bn, RP, UPCAST, PREC)
        acc_u = _expand_reg(acc_u, tl.where(sh0, xa_g, xa_u), sel0, u_on, tl.load(scale_ptr + s0 * 3 + 1),
                            w3b_ptr + bs, n, n_ok, R, stride_bn, RP, UPCAST, PREC)
        for j in range(1, nruns):  # further runs (rare at decode): shrink again from x
            sel, s, g_on = _run_slot(run, slot, j, present_ptr, 0)
            sel, s, u_on = _run_slot(run, slot, j, present_ptr, 1)
            a_off = s.to(tl.int64) * stride_as + e.to(tl.int64) * stride_ae + r[None, :] * stride_ar + kk[:, None]
            xg, xu = _shrink_run(x_base, w1a_ptr + a_off, sel, 0, H, R, w3a_ptr + a_off, True,
                                 BLOCK_M, BLOCK_K, RP, EVEN_K, UPCAST, PREC)
            bs = s.to(tl.int64) * stride_bs + e.to(tl.int64) * stride_bse
            acc_g = _expand_reg(acc_g, xg, sel, g_on, tl.load(scale_ptr + s * 3), w1b_ptr + bs,
                                n, n_ok, R, stride_bn, RP, UPCAST, PREC)
            acc_u = _expand_reg(acc_u, xu, sel, u_on, tl.load(scale_ptr + s * 3 + 1), w3b_ptr + bs,
                                n, n_ok, R, stride_bn, RP, UPCAST, PREC)
    elif HAS_LORA and RG > 0:
        j0 = 0
        if PREFETCH:
            acc_g = _dot(vg0.to(bg0.dtype), bg0, acc_g, UPCAST, PREC)
            acc_u = _dot(vu0.to(bu0.dtype), bu0, acc_u, UPCAST, PREC)
            j0 = RG
        for j in range(j0, nruns, RG):
            vg, bg = _load_group(gp, run, slot, j, present_ptr, scale_ptr, shared_ptr, w1b_ptr, e, stride_bs, stride_bse,
                                 n, n_ok, R, stride_bn, stride_xak, 0, KSPLIT, RG, RP)
            vu, bu = _load_group(gp, run, slot, j, present_ptr, scale_ptr, shared_ptr, w3b_ptr, e, stride_bs, stride_bse,
                                 n, n_ok, R, stride_bn, stride_xak, 1, KSPLIT, RG, RP)
            acc_g = _dot(vg.to(bg.dtype), bg, acc_g, UPCAST, PREC)
            acc_u = _dot(vu.to(bu.dtype), bu, acc_u, UPCAST, PREC)
    elif HAS_LORA:
        j0 = 0
        if PREFETCH:
            acc_g = _dot((vg0 * sg0).to(bg0.dtype), bg0, acc_g, UPCAST, PREC)
            acc_u = _dot((vu0 * su0).to(bu0.dtype), bu0, acc_u, UPCAST, PREC)
            j0 = 1
        for j in range(j0, nruns):
            sel, s, g_on = _run_slot(run, slot, j, present_ptr, 0)
            sel, s, u_on = _run_slot(run, slot, j, present_ptr, 1)
            bs = s.to(tl.int64) * stride_bs + e.to(tl.int64) * stride_bse
            up_col = RP * (1 - tl.load(shared_ptr + s))
            acc_g = _expand_run(acc_g, xa_ptrs, stride_xak, tl.load(scale_ptr + s * 3), sel, g_on,
                                w1b_ptr + bs, n, n_ok, R, stride_bn, KSPLIT, RP, UPCAST, PREC)
            acc_u = _expand_run(acc_u, xa_ptrs + up_col, stride_xak, tl.load(scale_ptr + s * 3 + 1), sel, u_on,
                                w3b_ptr + bs, n, n_ok, R, stride_bn, KSPLIT, RP, UPCAST, PREC)
    hv = _activate(acc_g, acc_u, ACT).to(h_ptr.dtype.element_ty)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + n[None, :]
    tl.store(h_ptrs, hv, mask=n_ok[None, :])
    if DOWN_SHRINK:  # down shrink of this N tile of h, per run, summed over N tiles (atomics)
        ha_ptrs = ha_ptr + rows[:, None] * stride_ham + r[None, :]
        for j in range(nruns):
            sel, s, d_on = _run_slot(run, slot, j, present_ptr, 2)
            on_i = d_on.to(tl.int32)
            a2 = tl.load(w2a_ptr + s.to(tl.int64) * stride_a2s + e.to(tl.int64) * stride_a2e
                         + r[None, :] * stride_a2r + n[:, None],
                         mask=((r < R) & ((r * 0 + on_i) != 0))[None, :] & n_ok[:, None], other=0.0)
            part = _dot(hv, a2, tl.zeros((BLOCK_M, RP), tl.float32), UPCAST, PREC)
            tl.atomic_add(ha_ptrs, part, mask=(sel & ((sel.to(tl.int32) * 0 + on_i) != 0))[:, None])


# ----------------------------------------------------------------------------- down
@triton.jit
def down_kernel(
    # pointers
    h_ptr,  # (M_MAX, I) by sorted row
    w2_ptr,  # (E, H, I)
    b2_ptr,  # (E, H) bias (read only if HAS_BIAS)
    y_ptr,  # (P, H) out: topk_weight * expert output per (token, k) pair
    topk_w_ptr,  # (P,) router weights
    sorted_ids_ptr,  # (M_MAX,) int32
    block_expert_ptr,  # (NB_MAX,) int32
    token_lora_ptr,  # (T,) int
    ha_ptr,  # (KSPLIT, M_MAX, RP) fp32 down shrink partials of h
    w2a_ptr,  # (S, E, R, I) down lora_a (read only if FUSE)
    w2b_ptr,  # (S, E, H, R) down lora_b
    scale_ptr,  # (S, 3) fp32
    present_ptr,  # (S, 3) int32
    # sizes
    H, I, R, P, S, NB_MAX,
    # strides
    stride_hm, stride_we, stride_wn, stride_be, stride_ym, stride_hak, stride_ham,
    stride_as, stride_ae, stride_ar, stride_bs, stride_bse, stride_bn,
    # meta
    KSPLIT: tl.constexpr, TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    FUSE: tl.constexpr, PREFETCH: tl.constexpr, RG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    RP: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_m, pid_n = _swizzle(tl.program_id(0), NB_MAX, tl.cdiv(H, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    rows, ids, valid, tok, slot = _block_rows(sorted_ids_ptr, token_lora_ptr, pid_m, P, S,
                                              TOPK, BLOCK_M, HAS_LORA)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    kk = tl.arange(0, BLOCK_K)
    r = tl.arange(0, RP)
    h_base = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + kk[None, :]
    h_ptrs = h_base
    w_ptrs = w2_ptr + e.to(tl.int64) * stride_we + n[None, :] * stride_wn + kk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    ha = tl.zeros((BLOCK_M, RP), tl.float32)
    if FUSE:  # decode: the first adapter run's shrink rides along the base K loop
        run, nruns = _block_runs(sorted_ids_ptr, token_lora_ptr, rows, slot, pid_m, P, S, TOPK, BLOCK_M)
        sel0, s0, d_on = _run_slot(run, slot, 0, present_ptr, 2)
        a_off = s0.to(tl.int64) * stride_as + e.to(tl.int64) * stride_ae + r[None, :] * stride_ar + kk[:, None]
        a_ptrs = w2a_ptr + a_off
        a_on = ((r < R) & ((r * 0 + d_on.to(tl.int32)) != 0))[None, :]
    elif HAS_LORA and RG > 0:  # grouped expand: RG runs per dot
        run, nruns = _block_runs(sorted_ids_ptr, token_lora_ptr, rows, slot, pid_m, P, S, TOPK, BLOCK_M)
        dp = ha_ptr + rows[:, None] * stride_ham + r[None, :]
        if PREFETCH:
            vd0, bd0 = _load_group(dp, run, slot, 0, present_ptr, scale_ptr, present_ptr, w2b_ptr, e, stride_bs, stride_bse,
                                   n, n_ok, R, stride_bn, stride_hak, 2, KSPLIT, RG, RP)
    elif HAS_LORA:
        run, nruns = _block_runs(sorted_ids_ptr, token_lora_ptr, rows, slot, pid_m, P, S, TOPK, BLOCK_M)
        ha_ptrs = ha_ptr + rows[:, None] * stride_ham + r[None, :]
        if PREFETCH:  # the first run's expand operands load while the K loop streams weights
            sel0, s0, d_on0 = _run_slot(run, slot, 0, present_ptr, 2)
            bs0 = s0.to(tl.int64) * stride_bs + e.to(tl.int64) * stride_bse
            vd0, bd0 = _load_run(ha_ptrs, w2b_ptr + bs0, sel0, d_on0, n, n_ok, R, stride_bn, RP)
            sd0 = tl.load(scale_ptr + s0 * 3 + 2)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K:
            hv = tl.load(h_ptrs, mask=valid[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            kin = (k0 + kk) < I
            hv = tl.load(h_ptrs, mask=valid[:, None] & kin[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :] & kin[:, None], other=0.0)
        acc = _dot(hv, w, acc, UPCAST, PREC)
        if FUSE:
            if EVEN_K:
                a = tl.load(a_ptrs, mask=a_on, other=0.0)
            else:
                a = tl.load(a_ptrs, mask=a_on & kin[:, None], other=0.0)
            ha = _dot(hv, a, ha, UPCAST, PREC)
            a_ptrs += BLOCK_K
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if FUSE:
        bs = s0.to(tl.int64) * stride_bs + e.to(tl.int64) * stride_bse
        acc = _expand_reg(acc, ha, sel0, d_on, tl.load(scale_ptr + s0 * 3 + 2), w2b_ptr + bs,
                          n, n_ok, R, stride_bn, RP, UPCAST, PREC)
        for j in range(1, nruns):  # further runs (rare at decode): shrink again from h
            sel, s, d_on = _run_slot(run, slot, j, present_ptr, 2)
            a_off = s.to(tl.int64) * stride_as + e.to(tl.int64) * stride_ae + r[None, :] * stride_ar + kk[:, None]
            hs, unused = _shrink_run(h_base, w2a_ptr + a_off, sel, 0, I, R, w2a_ptr + a_off, False,
                                     BLOCK_M, BLOCK_K, RP, EVEN_K, UPCAST, PREC)
            bs = s.to(tl.int64) * stride_bs + e.to(tl.int64) * stride_bse
            acc = _expand_reg(acc, hs, sel, d_on, tl.load(scale_ptr + s * 3 + 2), w2b_ptr + bs,
                              n, n_ok, R, stride_bn, RP, UPCAST, PREC)
    elif HAS_LORA and RG > 0:
        j0 = 0
        if PREFETCH:
            acc = _dot(vd0.to(bd0.dtype), bd0, acc, UPCAST, PREC)
            j0 = RG
        for j in range(j0, nruns, RG):
            vd, bd = _load_group(dp, run, slot, j, present_ptr, scale_ptr, present_ptr, w2b_ptr, e, stride_bs, stride_bse,
                                 n, n_ok, R, stride_bn, stride_hak, 2, KSPLIT, RG, RP)
            acc = _dot(vd.to(bd.dtype), bd, acc, UPCAST, PREC)
    elif HAS_LORA:
        j0 = 0
        if PREFETCH:
            acc = _dot((vd0 * sd0).to(bd0.dtype), bd0, acc, UPCAST, PREC)
            j0 = 1
        for j in range(j0, nruns):
            sel, s, d_on = _run_slot(run, slot, j, present_ptr, 2)
            bs = s.to(tl.int64) * stride_bs + e.to(tl.int64) * stride_bse
            acc = _expand_run(acc, ha_ptrs, stride_hak, tl.load(scale_ptr + s * 3 + 2), sel, d_on,
                              w2b_ptr + bs, n, n_ok, R, stride_bn, KSPLIT, RP, UPCAST, PREC)
    if HAS_BIAS:
        acc += tl.load(b2_ptr + e.to(tl.int64) * stride_be + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    wt = tl.load(topk_w_ptr + ids, mask=valid, other=0.0).to(tl.float32)
    acc = acc * wt[:, None]
    y_ptrs = y_ptr + ids.to(tl.int64)[:, None] * stride_ym + n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])
