"""Crash injection for the reliability suite: ``AGIASI_FAULT=point:n`` SIGKILLs the process
the n-th time ``point`` is reached. Unset (always, outside tests) it costs one dict lookup."""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def maybe_crash(point: str) -> None:
    spec = os.environ.get("AGIASI_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
