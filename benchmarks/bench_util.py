"""Helpers shared by the benchmark modules: statistics, child processes.

Nothing here knows about zjournal: it summarizes lists of samples and runs
one measurement in a fresh interpreter, which reports back one JSON object
on its last line of standard output.
"""
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_SCRIPT = os.path.join(HERE, "run.py")


def summary(values, digits=4, keep_values=True):
    """Median and spread of a list of samples (None when there are none).

    ``spread_pct`` is (max - min) / median, in percent: on a noisy machine
    it says how far apart the rounds were, which is what a reader needs to
    judge a median.
    """
    values = [v for v in values if v is not None]
    if not values:
        return None
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    out = {
        "median": _round(med, digits),
        "min": _round(lo, digits),
        "max": _round(hi, digits),
        "spread_pct": _round(100.0 * (hi - lo) / med, 1) if med else None,
        "n": len(values),
    }
    if keep_values:
        out["values"] = [_round(v, digits) for v in values]
    if len(values) >= 4:
        q = statistics.quantiles(values, n=4)
        out["iqr"] = [_round(q[0], digits), _round(q[2], digits)]
    return out


def _round(x, digits):
    if isinstance(x, float):
        if x == 0 or abs(x) >= 10 ** digits:
            return round(x, 1)
        # Keep `digits` significant digits for small numbers.
        return float("%.*g" % (digits + 2, x))
    return x


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def peak_rss_kib():
    """This process's peak resident set size so far, in KiB.

    On Linux, VmHWM from /proc/self/status: the high-water mark of this
    process's own address space.  ``ru_maxrss`` is not used there because
    a child started by fork and exec inherits the parent's maximum (a
    child of a 40 MB parent reports at least 40 MB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there
        rss //= 1024
    return rss


def current_rss_kib():
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError):
        return None


def run_child(task, timeout=1800, **spec):
    """Run ``run.py --child TASK`` with ``spec`` in a fresh interpreter.

    Returns the child's JSON result.  A fresh process per measurement keeps
    one case's garbage, caches and peak memory out of the next one.
    """
    spec = dict(spec, task=task)
    cmd = [sys.executable, RUN_SCRIPT, "--child", json.dumps(spec)]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError("child %s failed (exit %d):\n%s\n%s"
                           % (task, proc.returncode, proc.stdout[-3000:],
                              proc.stderr[-3000:]))
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    result["child_wall_seconds"] = time.perf_counter() - began
    return result


def rotate(items, r):
    """``items`` rotated by ``r``: each round starts with another case."""
    items = list(items)
    if not items:
        return items
    r %= len(items)
    return items[r:] + items[:r]


def dir_bytes(path, suffixes=None):
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            if suffixes is None or name.endswith(tuple(suffixes)):
                total += os.path.getsize(os.path.join(dirpath, name))
    return total


def remove(*paths):
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            for suffix in ("", ".index", ".lock", ".tmp", ".old"):
                try:
                    os.remove(path + suffix)
                except FileNotFoundError:
                    pass
