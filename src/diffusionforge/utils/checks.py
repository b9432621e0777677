"""Type predicates shared by the config validators (torch-free).

YAML and overrides give ``bool`` values that are also ``int`` in Python;
a config field that wants a count or a number must reject ``true``.
"""

from __future__ import annotations


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
