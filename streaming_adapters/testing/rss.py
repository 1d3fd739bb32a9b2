"""Sample other processes' anonymous memory from outside (``/proc/<pid>/status`` ``RssAnon``).

A measurement taken inside the measured process perturbs it (a Python thread, its allocations) and stops
when the process stalls; this one runs in the parent, e.g. the test process of a ``ProcessGroupPool``::

    with RssSampler(pool.pids, interval_s=0.002) as rss:
        results = pool.run(body)               # bodies return time.monotonic() marks
    peak = rss.peak(pool.pids[0], t0, t1)       # largest sample within [t0, t1]
    base = rss.at(pool.pids[0], t0)             # last sample at or before t0

``time.monotonic()`` is CLOCK_MONOTONIC on Linux: one clock for all processes of the machine, so marks taken
by a worker compare with the parent's sample times.  RssAnon excludes page-cache pages of mapped files
(the checkpoint's mmap), which are reclaimable and shared.
"""

from __future__ import annotations

import bisect
import threading
import time


from ..report import rss_anon_of  # noqa: E402,F401  (re-exported: tests import it from here)


class RssSampler:
    """A thread that reads every pid's RssAnon every ``interval_s``; ``samples[pid]`` = [(t, bytes)]."""

    def __init__(self, pids: list[int], interval_s: float = 0.002) -> None:
        self.pids = list(pids)
        self.interval_s = interval_s
        self.samples: dict[int, list[tuple[float, int]]] = {p: [] for p in self.pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid in self.pids:
            v = rss_anon_of(pid)
            if v is not None:
                self.samples[pid].append((time.monotonic(), v))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def window(self, pid: int, t0: float, t1: float) -> list[int]:
        s = self.samples[pid]
        i, j = bisect.bisect_left(s, (t0, -1)), bisect.bisect_right(s, (t1, float("inf")))
        return [v for _, v in s[i:j]]

    def peak(self, pid: int, t0: float, t1: float) -> int:
        vals = self.window(pid, t0, t1)
        if not vals:
            raise ValueError(f"no sample of pid {pid} within [{t0:.3f}, {t1:.3f}]")
        return max(vals)

    def at(self, pid: int, t: float) -> int:
        s = self.samples[pid]
        i = bisect.bisect_right(s, (t, float("inf")))
        if i == 0:
            raise ValueError(f"no sample of pid {pid} at or before {t:.3f}")
        return s[i - 1][1]
