"""Journaled vs plain commits on each snapshot store, side by side.

    python benchmarks/stores.py [--quick] [--out FILE]

Needs PostgreSQL on 127.0.0.1:5432 (as the tests do) for RelStorage and
the PostgreSQL journal, and ZEO.  For each store (FileStorage, RelStorage
history-free and history-preserving, ZEO) and each journal (a file
journal, a PostgreSQL journal), the same change -- one counter
incremented -- is committed plainly and through ``JournaledDB.execute``,
runs interleaved; medians and every sample go to a JSON report.
Target (issue "Beyond one process"): journaled >= 0.85 x plain on
RelStorage.
"""
import argparse
import json
import os
import platform
import sys
import time

from zjournal.tests.stores import measure


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer commits and rounds")
    parser.add_argument("--out", help="JSON report (default:"
                        " benchmarks/results/stores-<time>.json)")
    args = parser.parse_args(argv)
    n, runs = (100, 3) if args.quick else (300, 7)
    began = time.time()
    results = measure(("filestorage", "relstorage-hf", "relstorage-hp",
                       "zeo"), n=n, runs=runs, out=sys.stderr,
                      journals=("file", "postgresql"))
    report = {"machine": {"python": platform.python_version(),
                          "platform": platform.platform(),
                          "cpus": os.cpu_count()},
              "commits_per_run": n, "runs": runs,
              "seconds": time.time() - began, "results": results}
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        "stores-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    print(json.dumps(report, indent=2, sort_keys=True))
    print("\nstore/journal              journaled    plain   ratio"
          "  (target >= 0.85 on RelStorage)")
    for label, found in sorted(results.items()):
        print("%-25s %8.0f/s %7.0f/s  %.2f" % (
            label, found["journaled"], found["plain"], found["ratio"]))
    print("JSON report: %s" % out)


if __name__ == "__main__":
    main()
