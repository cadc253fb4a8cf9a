"""The export's tee into the GGUF streams (agiasi.export.hf._Teed): each stream gets every
tensor in order, the last one's writes are finished when the ``with`` ends (the consumer stops
pulling at the last tensor), and a stream's error reaches the caller."""

from __future__ import annotations

import threading
import time

import pytest

from agiasi.errors import AgiasiError
from agiasi.export.hf import _Teed


class _SlowStream:
    def __init__(self, fail_at: str | None = None):
        self.got: list[str] = []
        self.threads: set[str] = set()
        self.fail_at = fail_at

    def add(self, name, t):
        time.sleep(0.02)  # slower than the consumer: the last add is still running at the end
        if name == self.fail_at:
            raise AgiasiError(f"disk full writing {name}")
        self.got.append(name)
        self.threads.add(threading.current_thread().name)


def _consume(teed, names):
    it = teed((n, n.upper()) for n in names)
    out = [next(it) for _ in names]  # as write_sharded does: exactly len(names) pulls
    return out


def test_every_stream_gets_every_tensor_in_order_by_the_end_of_the_with():
    names = [f"t{i}" for i in range(6)]
    streams = {"f16": _SlowStream(), "q8_0": _SlowStream()}
    with _Teed(streams) as teed:
        assert _consume(teed, names) == [(n, n.upper()) for n in names]
    for s in streams.values():
        assert s.got == names
        assert all(name.startswith("agiasi-gguf") for name in s.threads)


def test_a_streams_error_reaches_the_caller():
    streams = {"f16": _SlowStream(), "q8_0": _SlowStream(fail_at="t5")}
    with pytest.raises(AgiasiError, match="disk full writing t5"):
        with _Teed(streams) as teed:
            _consume(teed, [f"t{i}" for i in range(6)])


def test_no_streams_is_a_plain_pass_through():
    with _Teed({}) as teed:
        assert _consume(teed, ["a", "b"]) == [("a", "A"), ("b", "B")]
