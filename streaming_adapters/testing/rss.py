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
import os
import time


from ..report import rss_anon_of  # noqa: E402,F401  (re-exported: tests import it from here)


_SAMPLER = r"""
import signal, sys, time
pids, interval, out = [int(p) for p in sys.argv[1].split(",")], float(sys.argv[2]), sys.argv[3]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
rows = []
def sample():
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        rows.append(f"{pid} {time.monotonic()!r} {int(line.split()[1]) * 1024}")
                        break
        except OSError:
            pass
print("ready", flush=True)
while not stop:
    sample()
    time.sleep(interval)
sample()
open(out, "w").write("\n".join(rows))
"""


class RssSampler:
    """Reads every pid's RssAnon every ``interval_s`` from a separate sampler *process* (a thread of the
    test process would share its GIL with whatever else runs there); ``samples[pid]`` = [(t, bytes)],
    filled when the ``with`` block ends.  Measure fresh interpreters, not forks of the test process: a fork
    reuses the parent's freed-but-resident heap and shows no growth."""

    def __init__(self, pids: list[int], interval_s: float = 0.002) -> None:
        self.pids = list(pids)
        self.interval_s = interval_s
        self.samples: dict[int, list[tuple[float, int]]] = {p: [] for p in self.pids}
        self._proc = None
        self._out = None

    def _sample(self) -> None:
        for pid in self.pids:
            v = rss_anon_of(pid)
            if v is not None:
                self.samples[pid].append((time.monotonic(), v))

    def __enter__(self) -> "RssSampler":
        import subprocess
        import sys
        import tempfile

        self._sample()  # a baseline sample at entry, whatever the sampler process does
        fd, self._out = tempfile.mkstemp(prefix="rss-samples-")
        os.close(fd)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SAMPLER, ",".join(map(str, self.pids)), repr(self.interval_s), self._out],
            stdout=subprocess.PIPE, text=True)
        self._proc.stdout.readline()  # "ready": sampling has begun
        return self

    def __exit__(self, *exc) -> None:
        import signal

        self._proc.send_signal(signal.SIGTERM)
        self._proc.wait(timeout=60)
        self._proc.stdout.close()
        with open(self._out) as f:
            for line in f.read().splitlines():
                pid, t, v = line.split()
                self.samples[int(pid)].append((float(t), int(v)))
        os.unlink(self._out)
        self._sample()
        for s in self.samples.values():
            s.sort()

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
