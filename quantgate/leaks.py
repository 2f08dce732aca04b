"""Import heavy libraries without pinning the caller's frames (and their locals) in memory.

PuLP, which ModelOpt imports, keeps import errors in class bodies (`except Exception as e: err = e`
in pulp/apis/copt_api.py and cplex_api.py). Each stored exception's traceback holds the frames of
the whole import chain, and each frame holds its caller (`f_back`): the frame that first imported
ModelOpt stays alive for the life of the process, with every local it had when it returned. In
quantgate that frame was calibrate(), whose `model` argument is the calibrated model: after export,
the exported 8B FP8 model (8.5 GiB) stayed allocated through the candidate's evaluation.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


def _drop_traceback(value: Any) -> int:
    n = 0
    seen: set[int] = set()
    while isinstance(value, BaseException) and id(value) not in seen:
        seen.add(id(value))
        if value.__traceback__ is not None:
            value.__traceback__ = None  # the message stays; the frames go
            n += 1
        value = value.__context__ or value.__cause__
    return n


def scrub_stored_exceptions(module_names: set[str] | list[str]) -> int:
    """Drop the tracebacks of exceptions kept at module or class level by these modules."""
    dropped = 0
    for name in module_names:
        mod = sys.modules.get(name)
        attrs = getattr(mod, "__dict__", None)
        if not isinstance(attrs, dict):
            continue
        for value in list(attrs.values()):
            dropped += _drop_traceback(value)
            if isinstance(value, type) and getattr(value, "__module__", None) == name:
                for member in list(vars(value).values()):
                    dropped += _drop_traceback(member)
    return dropped


def import_clean(name: str) -> ModuleType:
    """`importlib.import_module(name)`, then scrub what the newly imported modules stored."""
    before = set(sys.modules)
    module = importlib.import_module(name)
    scrub_stored_exceptions(set(sys.modules) - before)
    return module
