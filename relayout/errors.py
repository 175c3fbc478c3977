"""Errors of the relayout pipeline: one exception type for everything a user can cause."""


class RelayoutError(ValueError):
    """A rule file, an adapter or a request that relayout cannot honour.

    Messages name where the problem is (file, rule, tensor, axis) and what was expected
    against what was found, so that the user can fix the input without reading code.
    """
