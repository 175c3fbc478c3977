"""Errors raised by the runtime: bad shapes/dtypes/devices -> bad adapters -> bad files."""


class MoeLoraError(ValueError):
    """Base class: every user-facing error of `runtime` is one of these."""


class ShapeError(MoeLoraError):
    """A tensor has the wrong number of dimensions or the wrong size."""


class DtypeError(MoeLoraError):
    """A tensor has a dtype the op does not take, or differs from its peers."""


class DeviceError(MoeLoraError):
    """Tensors live on different devices, or on one the kernels cannot run on."""


class AdapterError(MoeLoraError):
    """An adapter layer cannot go into a slot (sizes, rank, missing factor)."""


class SlotError(MoeLoraError):
    """A slot index is out of range, or empty/occupied when it should not be."""


class NormalizedFormatError(MoeLoraError):
    """A normalized adapter file breaks the `relayout-normalized` contract."""
