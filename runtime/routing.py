"""GPU routing metadata: (token, k) pairs -> keys (expert, slot) -> histogram -> padded offsets -> sorted rows."""
from typing import NamedTuple

import torch
import triton

from . import kernels

_BLOCK = 1024  # pairs per program in the histogram and scatter kernels
SMALL_P = 2048  # up to this many pairs, one program does all routing (one launch, no memset)


class Routing(NamedTuple):
    """Pairs sorted by (expert, slot), each expert's rows padded to a multiple of block_m.

    sorted_ids (M_MAX,) int32: pair id (t * k + j) per sorted row, P on padding rows.
    block_expert (NB_MAX,) int32: expert of each block of block_m rows, -1 past the end.
    segments: the non-empty (expert, slot >= 0) runs of sorted rows, for the LoRA shrink.
    Sizes are upper bounds known on the host, so no device->host sync is needed.
    """

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    block_m: int
    num_blocks_max: int
    segments: torch.Tensor  # (SEG_MAX, 4) int32 (expert, slot, first row, rows) per adapter segment
    num_segments: torch.Tensor  # (1,) int32 on the device
    max_segments: int


def max_blocks(num_pairs, num_experts, block_m):
    """Upper bound on row blocks: every non-empty expert adds at most one partial block."""
    return triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


def route(topk_ids, token_lora, num_experts, num_slots, block_m):
    """Sort the (token, k) pairs of `topk_ids` (T, k) by (expert, slot of `token_lora` (T,)).

    Within one (expert, slot) the order is whatever the atomics give; results do not depend
    on it. token_lora None (or num_slots 0) sorts by expert alone.
    """
    T, k = topk_ids.shape
    P, dev = T * k, topk_ids.device
    has_lora = token_lora is not None and num_slots > 0
    s1p = triton.next_power_of_2(num_slots + 1) if has_lora else 1
    e_pad = triton.next_power_of_2(num_experts)
    nb_max = max_blocks(P, num_experts, block_m)
    ids = topk_ids.reshape(-1)
    lora = token_lora if has_lora else ids
    counts = torch.empty(e_pad * s1p, dtype=torch.int32, device=dev)
    cursor = torch.empty_like(counts)
    sorted_ids = torch.empty(nb_max * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb_max, dtype=torch.int32, device=dev)
    seg_max = min(P, num_experts * num_slots) if has_lora else 0
    segments = torch.empty(max(seg_max, 1), 4, dtype=torch.int32, device=dev)
    num_segments = torch.empty(1, dtype=torch.int32, device=dev)
    tables = (sorted_ids, block_expert, segments, num_segments)
    sizes = dict(S1P=s1p, E_PAD=e_pad, BLOCK_M=block_m, BB=64, HAS_LORA=has_lora)
    if P <= SMALL_P:
        kernels.route_small_kernel[(1,)](ids, lora, counts, cursor, *tables, P, num_experts, num_slots,
                                         nb_max, TOPK=k, BLOCK=_BLOCK, num_warps=8, **sizes)
    else:
        counts.zero_()
        grid = (triton.cdiv(P, _BLOCK),)
        common = dict(TOPK=k, S1P=s1p, HAS_LORA=has_lora, BLOCK=_BLOCK)
        kernels.route_histogram_kernel[grid](ids, lora, counts, P, num_experts, num_slots, **common)
        kernels.route_prefix_kernel[(1,)](counts, cursor, *tables, P, nb_max, num_warps=8, **sizes)
        kernels.route_scatter_kernel[grid](ids, lora, cursor, sorted_ids, P, num_experts, num_slots,
                                           **common)
    return Routing(sorted_ids, block_expert, block_m, nb_max, segments, num_segments, seg_max)
