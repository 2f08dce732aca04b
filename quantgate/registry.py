"""Name lookups for the small registries (formats, engine backends) with "did you mean" errors."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """registry[name], or KeyError("unknown <what> 'x'; did you mean 'y'? (known: ...)")."""
    try:
        return registry[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown {what} {name!r}{hint} (known: {', '.join(registry)})") from None
