"""Adapter slots: adapter layer dict -> checks -> copy_ into preallocated per-layer GPU buffers the kernels read."""
import math

import torch

from .errors import AdapterError, SlotError

PROJS = ("w1", "w3", "w2")  # gate, up, down: the column order of `scaling` / `present`


class LoraSlots:
    """Preallocated LoRA buffers of one MoE layer for S adapter slots.

    Buffers (S slots, R max rank, E experts, hidden H, intermediate I):
      w1_a (S, E, R, H)  w1_b (S, E, I, R)   gate
      w3_a (S, E, R, H)  w3_b (S, E, I, R)   up
      w2_a (S, E, R, I)  w2_b (S, E, H, R)   down
    Per slot: `rank` (S, 3) int32, `scaling` (S, 3) fp32, `present` (S, 3) int32 (0 = the
    projection adds nothing), `shared_a` (S,) int32 (1 = gate and up share one A, so the
    kernels shrink once). Scaling is NOT folded into B: the kernels multiply the shrink
    result by `scaling` in fp32. Ranks below R are zero-padded, so the padded tail adds 0.
    load/replace/evict copy into these buffers and never reallocate: CUDA graphs that
    captured a forward over this object stay valid.
    """

    def __init__(self, num_slots, max_rank, num_experts, hidden_size, intermediate_size,
                 dtype=torch.bfloat16, device="cuda"):
        if min(num_slots, max_rank, num_experts, hidden_size, intermediate_size) < 1:
            raise SlotError("LoraSlots sizes must all be >= 1, got "
                            f"S={num_slots} R={max_rank} E={num_experts} H={hidden_size} "
                            f"I={intermediate_size}")
        S, R, E, H, I = num_slots, max_rank, num_experts, hidden_size, intermediate_size
        self.num_slots, self.max_rank, self.num_experts = S, R, E
        self.hidden_size, self.intermediate_size, self.dtype = H, I, dtype
        z = dict(dtype=dtype, device=device)
        self.w1_a, self.w1_b = torch.zeros(S, E, R, H, **z), torch.zeros(S, E, I, R, **z)
        self.w3_a, self.w3_b = torch.zeros(S, E, R, H, **z), torch.zeros(S, E, I, R, **z)
        self.w2_a, self.w2_b = torch.zeros(S, E, R, I, **z), torch.zeros(S, E, H, R, **z)
        self.rank = torch.zeros(S, 3, dtype=torch.int32, device=device)
        self.scaling = torch.zeros(S, 3, dtype=torch.float32, device=device)
        self.present = torch.zeros(S, 3, dtype=torch.int32, device=device)
        self.shared_a = torch.zeros(S, dtype=torch.int32, device=device)
        self._names = [None] * S
        self._host = [None] * S  # per slot: {proj: (rank, scaling)} mirror, no device reads

    @property
    def device(self):
        return self.w1_a.device

    def _dims(self, proj):
        """(in, out) feature sizes of a projection."""
        H, I = self.hidden_size, self.intermediate_size
        return (H, I) if proj in ("w1", "w3") else (I, H)

    def buffers(self, proj):
        """(lora_a, lora_b) slot buffers of one projection."""
        return getattr(self, proj + "_a"), getattr(self, proj + "_b")

    def _check_slot(self, slot):
        if not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise SlotError(f"slot {slot!r} out of range: expected an int in [0, {self.num_slots})")

    def _check_proj(self, proj, entry):
        """Validate one (lora_a, lora_b, scaling) entry; return (a, b, scale, rank)."""
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise AdapterError(f"{proj}: expected (lora_a, lora_b, scaling), got {type(entry).__name__}")
        a, b, scale = entry
        if a is None or b is None:
            raise AdapterError(f"{proj}: lora_{'a' if a is None else 'b'} is missing")
        E, (din, dout) = self.num_experts, self._dims(proj)
        if a.ndim != 3 or b.ndim != 3:
            raise AdapterError(f"{proj}: lora_a/lora_b must be 3D (E, r, in)/(E, out, r), "
                               f"got {tuple(a.shape)} / {tuple(b.shape)}")
        r = a.shape[1]
        if a.shape[0] != E or b.shape[0] != E:
            raise AdapterError(f"{proj}: adapter has {a.shape[0]} experts (lora_a) / "
                               f"{b.shape[0]} (lora_b), slots expect E={E}")
        if a.shape[2] != din:
            raise AdapterError(f"{proj}: lora_a input size {a.shape[2]}, expected {din}")
        if b.shape[1] != dout:
            raise AdapterError(f"{proj}: lora_b output size {b.shape[1]}, expected {dout}")
        if b.shape[2] != r:
            raise AdapterError(f"{proj}: rank mismatch, lora_a has r={r}, lora_b has r={b.shape[2]}")
        if not 1 <= r <= self.max_rank:
            raise AdapterError(f"{proj}: rank {r} outside [1, max_rank={self.max_rank}]")
        if a.dtype != self.dtype or b.dtype != self.dtype:
            raise AdapterError(f"{proj}: dtype {a.dtype}/{b.dtype}, slots hold {self.dtype}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise AdapterError(f"{proj}: scaling {scale} is not finite")
        return a, b, scale, r

    def _check_adapter(self, adapter_layer):
        """Validate a whole adapter layer before touching any buffer."""
        if not isinstance(adapter_layer, dict) or not adapter_layer:
            raise AdapterError("adapter layer must be a non-empty dict proj -> (lora_a, lora_b, scaling)")
        unknown = sorted(set(adapter_layer) - set(PROJS))
        if unknown:
            raise AdapterError(f"unknown projection(s) {unknown}; expected some of {list(PROJS)}")
        return {p: self._check_proj(p, adapter_layer[p]) for p in PROJS if p in adapter_layer}

    def _write(self, slot, checked):
        """Copy validated factors into `slot`; zero the rank tail and absent projections."""
        for j, proj in enumerate(PROJS):
            buf_a, buf_b = self.buffers(proj)
            buf_a[slot].zero_()
            buf_b[slot].zero_()
            if proj in checked:
                a, b, _, r = checked[proj]
                buf_a[slot, :, :r].copy_(a, non_blocking=True)
                buf_b[slot, :, :, :r].copy_(b, non_blocking=True)
        meta = [checked.get(p, (None, None, 0.0, 0)) for p in PROJS]
        self.rank[slot] = torch.tensor([m[3] for m in meta], dtype=torch.int32)
        self.scaling[slot] = torch.tensor([m[2] for m in meta], dtype=torch.float32)
        self.present[slot] = torch.tensor([int(p in checked) for p in PROJS], dtype=torch.int32)
        self.shared_a[slot] = int(self._is_shared(checked))
        self._host[slot] = {p: (checked[p][3], checked[p][2]) for p in checked}

    @staticmethod
    def _is_shared(checked):
        """Gate and up share one A (every 3D-born adapter): shrink once in the kernels."""
        if "w1" not in checked or "w3" not in checked:
            return False
        a1, a3 = checked["w1"][0], checked["w3"][0]
        return a1.shape == a3.shape and torch.equal(a1, a3.to(a1.device))

    def load(self, slot, adapter_layer, name=None):
        """Load an adapter layer (dict proj -> (lora_a, lora_b, scaling)) into an empty slot."""
        self._check_slot(slot)
        if self._host[slot] is not None:
            raise SlotError(f"slot {slot} holds {self._names[slot]!r}; use replace() or evict() first")
        self._write(slot, self._check_adapter(adapter_layer))
        self._names[slot] = name

    def replace(self, slot, adapter_layer, name=None):
        """Overwrite an occupied slot in place with another adapter layer."""
        self._check_slot(slot)
        if self._host[slot] is None:
            raise SlotError(f"slot {slot} is empty; use load()")
        self._write(slot, self._check_adapter(adapter_layer))
        self._names[slot] = name

    def evict(self, slot):
        """Empty a slot: tokens still pointing at it get no adapter."""
        self._check_slot(slot)
        if self._host[slot] is None:
            raise SlotError(f"slot {slot} is already empty")
        self._write(slot, {})
        self._host[slot] = None
        self._names[slot] = None

    def occupied(self, slot):
        self._check_slot(slot)
        return self._host[slot] is not None

    def as_adapters(self):
        """Per slot: dict proj -> (lora_a, lora_b, scaling) views at the loaded rank, or None."""
        out = []
        for slot in range(self.num_slots):
            host = self._host[slot]
            if host is None:
                out.append(None)
                continue
            out.append({p: (self.buffers(p)[0][slot, :, :r], self.buffers(p)[1][slot, :, :, :r], sc)
                        for p, (r, sc) in host.items()})
        return out
