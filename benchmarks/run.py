"""zjournal benchmark suite: zjournal side by side with its baselines.

    python benchmarks/run.py [--quick] [--rounds N] [--out REPORT.json]

See benchmarks/README.rst.  Every section runs once per round, and the
rounds interleave all sections (and rotate the order of the cases inside
each), so that a noisy stretch of time hits every case a little rather
than one case a lot.  The report gives, for every figure, the median and
the spread over the rounds; every target is judged on the median of the
per-round ratios.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_util  # noqa: E402
from bench_util import median  # noqa: E402
from bench_util import rotate  # noqa: E402
from bench_util import summary  # noqa: E402

# Sizes: (full, quick).  The sizes are the full ones.
SIZES = {
    "rounds": (5, 3),
    "commit_commands": (500, 300),
    "group_commands": (960, 320),      # divisible by 1, 4 and 16
    "group_threads": ([1, 4, 16], [1, 4, 16]),
    "rebuild_small": (100_000, 50_000),
    "rebuild_large": (1_000_000, 300_000),
    "rebuild_notes": (10_000, 2_000),
    "memory_small": (10_000, 10_000),  # memory_large is rebuild_large
    "open_small": (1_000, 1_000),      # open_large is rebuild_large
    "open_repeats": (15, 15),            # opens per case per round
    "bank_commands": (20_000, 4_000),  # attempted; a few are rejected
    "bank_chunk": (1_000, 500),
    "profile_commands": (100_000, 50_000),
}

TARGETS = {
    "commit_ratio": (">=", 0.65),
    "group_commit_ratio_16": (">=", 1.5),
    "rebuild_rate": (">=", 150_000),
    "rebuild_vs_coopy": (">=", 1.2),
    "rebuild_vs_eventsourcing": (">=", 1.0),
    "scan_rate": (">=", 1_000_000),
    "open_ratio": ("<=", 2.0),
    "memory_ratio": ("<=", 1.5),
    "size_overhead": ("<=", 100),
}


def source_digest():
    """A digest of the zjournal package's sources, to notice edits mid-run.

    Children import the package afresh, the parent only once: if the
    sources change during a run, its figures mix two versions.
    """
    import hashlib
    try:
        import zjournal
    except ImportError:
        return None
    root = os.path.dirname(zjournal.__file__)
    digest = hashlib.sha1()
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("tests", "__pycache__"))
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), "rb") as f:
                    digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:12]


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr,
          flush=True)


class Suite:

    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        pick = 1 if self.quick else 0
        self.size = {k: v[pick] for k, v in SIZES.items()}
        if args.rounds:
            self.size["rounds"] = args.rounds
        self.dir = tempfile.mkdtemp(prefix="zjournal-bench-", dir=args.tmpdir)
        self.samples = {}    # (section, case) -> list of per-round samples
        self.extra = {}      # section -> facts measured once
        self.errors = {}     # section -> traceback text

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def add(self, section, case, value):
        self.samples.setdefault((section, case), []).append(value)

    def get(self, section, case):
        return self.samples.get((section, case), [])

    def guarded(self, section, func, *args):
        if section in self.errors:
            return  # failed before: do not repeat a broken section
        try:
            func(*args)
        except Exception:
            text = traceback.format_exc()
            self.errors[section] = text
            log("section %s FAILED:\n%s" % (section, text))

    # -- setup -------------------------------------------------------------

    def setup(self):
        import bench_zjournal as bz
        s = self.size
        log("building journals in %s" % self.dir)
        self.journals = {}
        for key, kind, n in (
                ("small", "tiny", s["rebuild_small"]),
                ("large", "tiny", s["rebuild_large"]),
                ("notes", "note", s["rebuild_notes"]),
                ("memory_small", "tiny", s["memory_small"]),
                ("open_small", "tiny", s["open_small"])):
            info = bz.make_journal(self.path("journal-" + key), kind, n)
            self.journals[key] = info
            log("  %s: %d %s commands, %.1f MB in %.1fs"
                % (key, n, kind, info["bytes"] / 1e6, info["build_seconds"]))
        self.extra["size"] = bz.size_figures(self.journals["large"])
        # A ZODB whose marker is current, for the open(1k) case; the
        # open(large) one is kept from the first large rebuild.
        db = bz.open_fs(self.path("open-small.fs"))
        import zjournal
        from zjournal import recovery
        journal = zjournal.FileJournal(self.path("journal-open_small"),
                                       readonly=True)
        recovery.rebuild(db, journal)
        db.close()
        journal.close()
        self.open_fs = {"small": self.path("open-small.fs"),
                        "large": self.path("open-large.fs")}
        self.machine_fsync()

    def machine_fsync(self):
        """The cost of one small append + fdatasync here, for context."""
        path = self.path("fsync-probe")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        times = []
        try:
            for _ in range(200):
                began = time.perf_counter()
                os.write(fd, b"x" * 64)
                os.fdatasync(fd)
                times.append((time.perf_counter() - began) * 1e6)
        finally:
            os.close(fd)
            os.remove(path)
        self.extra["fsync_probe_us"] = summary(times, 3, keep_values=False)

    # -- sections, one round each --------------------------------------------

    def commit_round(self, r):
        import bench_zjournal as bz
        n = self.size["commit_commands"]
        sub = self.path("commit-%d" % r)
        os.makedirs(sub)
        rates, cpu_us = bz.interleaved_commits(sub, n, offset=r)
        for case, rate in rates.items():
            self.add("commit", case, rate)
            wall_us = 1e6 / rate
            self.add("commit", case + "_wall_us", wall_us)
            self.add("commit", case + "_cpu_us", cpu_us[case])
            self.add("commit", case + "_wait_us", wall_us - cpu_us[case])
        self.add("commit", "ratio", rates["journaled"] / rates["plain"])
        self.add("commit", "nosync_ratio",
                 rates["journaled_nosync"] / rates["plain"])
        shutil.rmtree(sub, ignore_errors=True)
        log("  commit: plain %.0f/s, journaled %.0f/s, journaled without"
            " journal fsync %.0f/s" % (rates["plain"], rates["journaled"],
                                       rates["journaled_nosync"]))

    def group_round(self, r):
        import bench_zjournal as bz
        total = self.size["group_commands"]
        cases = [(p, t) for t in self.size["group_threads"]
                 for p in ("always", "batch")]
        rates = {}
        for policy, threads in rotate(cases, r):
            if policy == "batch" and "unavailable" in self.extra.get(
                    "group_commit", {}):
                continue
            sub = self.path("group-%d-%s-%d" % (r, policy, threads))
            os.makedirs(sub)
            try:
                rate, txns = bz.threaded_commits(sub, policy, threads, total)
            except bz.Unavailable as e:
                self.extra.setdefault("group_commit", {})["unavailable"] = str(e)
                log("  group commit: %s" % e)
                continue
            finally:
                shutil.rmtree(sub, ignore_errors=True)
            rates[policy, threads] = rate
            self.add("group", "%s_%d" % (policy, threads), rate)
            self.add("group", "%s_%d_mean_group" % (policy, threads),
                     total / txns)
        for threads in self.size["group_threads"]:
            if ("batch", threads) in rates:
                self.add("group", "ratio_%d" % threads,
                         rates["batch", threads] / rates["always", threads])
        log("  group commit: " + ", ".join(
            "%s/%d %.0f/s" % (p, t, v) for (p, t), v in sorted(rates.items())))

    def rebuild_round(self, r):
        cases = ["small", "large", "notes", "memory_small"]
        for case in rotate(cases, r):
            info = self.journals[case]
            spec = {"journal": info["path"], "kind": info["kind"],
                    "target": self.path("rebuilt-%s.fs" % case)}
            if case == "large" and not os.path.exists(self.open_fs["large"]):
                spec["target"] = self.open_fs["large"]
                spec["keep"] = True
            out = bench_util.run_child("rebuild", **spec)
            assert out["replayed"] == info["commands"], out
            self.add("rebuild", case + "_rate", out["rate"])
            self.add("rebuild", case + "_seconds", out["seconds"])
            self.add("rebuild", case + "_seconds_with_open",
                     out["seconds_with_open"])
            self.add("rebuild", case + "_mb_per_s",
                     info["bytes"] / out["seconds"] / 1e6)
            self.add("memory", case + "_peak_rss_kib", out["peak_rss_kib"])
            self.add("memory", case + "_growth_kib",
                     out["peak_rss_kib"] - out["baseline_peak_rss_kib"])
            log("  rebuild %s: %d commands in %.2fs (%.0f/s), peak RSS %.1f MB"
                % (case, out["replayed"], out["seconds"], out["rate"],
                   out["peak_rss_kib"] / 1024))
        large = self.get("memory", "large_peak_rss_kib")[-1]
        small = self.get("memory", "memory_small_peak_rss_kib")[-1]
        self.add("memory", "ratio", large / small)

    def scan_round(self, r):
        import bench_zjournal as bz
        cases = ["small", "large", "notes"]
        if getattr(self, "bank", None):
            cases.append("bank")
        for case in rotate(cases, r):
            path = (self.bank["zjournal"] if case == "bank"
                    else self.journals[case]["path"])
            out = bz.scan(path)
            self.add("scan", case + "_records_per_s", out["records_per_s"])
            self.add("scan", case + "_mb_per_s", out["mb_per_s"])
            self.add("scan", case + "_seconds", out["seconds"])
        log("  scan: " + ", ".join(
            "%s %.0f rec/s" % (c, self.get("scan", c + "_records_per_s")[-1])
            for c in cases))

    def open_round(self, r):
        import bench_zjournal as bz
        paths = {"small": self.journals["open_small"]["path"],
                 "large": self.journals["large"]["path"]}
        times = {"small": [], "large": []}
        jtimes = {"small": [], "large": []}
        budget = time.perf_counter() + 5.0  # seconds per round, after 3
        for i in range(self.size["open_repeats"]):
            if i >= 3 and time.perf_counter() > budget:
                break  # opening is slow (it should not be): enough samples
            for case in rotate(["small", "large"], r + i):
                times[case].append(bz.time_open(self.open_fs[case],
                                                paths[case]))
                jtimes[case].append(bz.time_journal_open(paths[case]))
        for case in ("small", "large"):
            self.add("open", case + "_seconds", median(times[case]))
            self.add("open", case + "_journal_only_seconds",
                     median(jtimes[case]))
        self.add("open", "ratio", median(times["large"]) /
                 median(times["small"]))
        self.add("open", "journal_only_ratio", median(jtimes["large"]) /
                 median(jtimes["small"]))
        log("  open: 1k %.2f ms, large %.2f ms"
            % (1e3 * median(times["small"]), 1e3 * median(times["large"])))

    # -- the bank workload, three systems ------------------------------------

    def bank_record(self):
        import bench_peers as bp
        from zjournal import demo
        n, chunk = self.size["bank_commands"], self.size["bank_chunk"]
        rec = bp.Recorder(self.path("bank"))
        workload = list(demo.workload(n))
        chunks = [workload[i:i + chunk] for i in range(0, n, chunk)]
        pending = None  # the peers run chunk k-1 while zjournal runs chunk k
        step = 0
        log("recording the bank workload: %d commands, chunks of %d"
            % (n, chunk))
        while chunks or pending:
            jobs = []
            if chunks:
                jobs.append("zjournal")
            if pending:
                jobs += ["eventsourcing", "coopy"]
            next_pending = None
            for job in rotate(jobs, step):
                if job == "zjournal":
                    seconds, next_pending = rec.zjournal_chunk(chunks.pop(0))
                    # rate of durable, journaled commands
                    self.add("bank_record", "zjournal",
                             len(next_pending) / seconds)
                elif job == "eventsourcing":
                    seconds = rec.es_chunk(pending)
                    self.add("bank_record", job, len(pending) / seconds)
                else:
                    seconds = rec.coopy_chunk(pending)
                    self.add("bank_record", job, len(pending) / seconds)
            pending = next_pending
            step += 1
        states = rec.close()
        if not (states["zjournal"] == states["eventsourcing"]
                == states["coopy"]):
            raise AssertionError("the three systems disagree on the final"
                                 " state of the bank")
        self.bank = {
            "zjournal": rec.zj_journal, "coopy": rec.coopy_dir,
            "eventsourcing": rec.es_dir, "bank_id": rec.es_bank_id,
            "state": states["zjournal"],
        }
        self.extra["peers"] = {
            "attempted_commands": rec.attempted,
            "rejected_by_the_bank": rec.rejected,
            "recorded_commands": rec.recorded,
            "final_states_equal": True,
            "storage_bytes": rec.sizes(),
        }
        log("  recorded %s (%d rejected)" % (rec.recorded, rec.rejected))

    def bank_replay_round(self, r):
        if not getattr(self, "bank", None):
            return
        n = self.extra["peers"]["recorded_commands"]["zjournal"]
        rates = {}
        for system in rotate(["zjournal", "eventsourcing", "coopy"], r):
            out = bench_util.run_child(
                "replay", system=system, source=self.bank[system],
                bank_id=self.bank["bank_id"],
                work=self.path("replay-%s" % system))
            if out["state"] != self.bank["state"]:
                raise AssertionError("%s replayed a different state" % system)
            if out["replayed"] is not None and out["replayed"] != n:
                raise AssertionError("%s replayed %s commands, not %d"
                                     % (system, out["replayed"], n))
            rates[system] = n / out["seconds"]
            self.add("bank_replay", system, rates[system])
            self.add("bank_replay", system + "_peak_rss_kib",
                     out["peak_rss_kib"])
        self.add("bank_replay", "ratio_vs_coopy",
                 rates["zjournal"] / rates["coopy"])
        self.add("bank_replay", "ratio_vs_eventsourcing",
                 rates["zjournal"] / rates["eventsourcing"])
        log("  bank replay: " + ", ".join(
            "%s %.0f/s" % kv for kv in sorted(rates.items())))

    # -- profile ---------------------------------------------------------

    def profile(self):
        import bench_zjournal as bz
        n = self.size["profile_commands"]
        path = (self.journals["small"]["path"]
                if n == self.journals["small"]["commands"]
                else bz.make_journal(self.path("journal-profile"), "tiny",
                                     n)["path"])
        out = bench_util.run_child(
            "rebuild", journal=path, kind="tiny", profile=True, top=25,
            target=self.path("rebuilt-profile.fs"))
        self.extra["profile"] = {
            "what": "cProfile of recovery.rebuild of %d tiny commands into a"
                    " fresh FileStorage (child process); the profiler slows"
                    " it down, so read shares, not seconds" % n,
            "rate_under_profiler": out["rate"],
            "tiny": out["profile"]}
        self.extra["rebuild_breakdown"] = bench_util.run_child(
            "breakdown", journal=path, repeat=3,
            target=self.path("rebuilt-breakdown.fs"))
        log("  breakdown (us/command): %s" % ", ".join(
            "%s %.2f" % kv for kv in
            self.extra["rebuild_breakdown"]["us_per_command_by_layer"].items()))
        if getattr(self, "bank", None):
            out = bench_util.run_child(
                "profile_bank", source=self.bank["zjournal"],
                work=self.path("profile-bank"))
            self.extra["profile"]["bank"] = out["profile"]

    # -- the whole run ---------------------------------------------------------

    def run(self):
        began = time.perf_counter()
        started = datetime.datetime.now(datetime.timezone.utc)
        self.src_at_start = source_digest()
        self.setup()
        self.guarded("peers", self.bank_record)
        for r in range(self.size["rounds"]):
            log("round %d of %d" % (r + 1, self.size["rounds"]))
            sections = [("commit", self.commit_round),
                        ("group_commit", self.group_round),
                        ("rebuild", self.rebuild_round),
                        ("scan", self.scan_round),
                        ("open", self.open_round),
                        ("peers_replay", self.bank_replay_round)]
            # open needs the large ZODB kept by the first large rebuild.
            for name, func in sections:
                if name == "open" and not os.path.exists(self.open_fs["large"]):
                    continue
                self.guarded(name, func, r)
        log("profiling the rebuild")
        self.guarded("profile", self.profile)
        report = self.report(started, time.perf_counter() - began)
        return report

    # -- the report ---------------------------------------------------------

    def section(self, name, cases):
        out = {}
        for case in cases:
            s = summary(self.get(name, case))
            if s is not None:
                out[case] = s
        return out

    def report(self, started, seconds):
        s = self.size
        j = self.journals
        rep = {
            "benchmark": "zjournal",
            "mode": "quick" if self.quick else "full",
            "quick_note": ("--quick shrinks the sizes (see 'sizes'); the"
                           " targets are judged on the shrunk sizes, which"
                           " flatters nothing but the wall time")
            if self.quick else None,
            "started": started.isoformat(timespec="seconds"),
            "duration_seconds": round(seconds, 1),
            "rounds": s["rounds"],
            "sizes": dict(s),
            "machine": self.machine(),
            "src_digest": {"start": self.src_at_start,
                           "end": source_digest()},
            "notes": [
                "rates are per second; every figure is a summary over"
                " rounds: median, min, max, spread_pct = (max-min)/median,"
                " n, values (and iqr when n >= 4)",
                "ratios are computed per round (the cases of a round ran"
                " back to back) and then summarized",
                "journals for rebuild/scan/open/memory are built by direct"
                " appends in transactions of 'records_per_transaction'"
                " records; the bank journal is written by jdb.execute, one"
                " record per transaction",
                "rebuilds and replays run in a fresh child process each;"
                " rebuild 'seconds' exclude opening the FileStorage and"
                " journal, bank replay seconds include opening (for the"
                " peers, opening is the replay)",
            ],
        }
        rep["commit"] = {
            "what": "tiny command: jdb.execute (journal fsync='always') vs a"
                    " plain FileStorage commit of the same mutation;"
                    " commands/s; the paths alternate in blocks of 25"
                    " commits",
            "commands_per_round": s["commit_commands"],
            "diagnostics": "journaled_nosync: jdb.execute with journal"
                           " fsync='never' (not a target). Per commit:"
                           " *_wall_us, *_cpu_us (process CPU time) and"
                           " *_wait_us (wall - CPU: mostly fsync)",
            **self.section("commit", [
                "plain", "journaled", "ratio", "journaled_nosync",
                "nosync_ratio"] + [
                "%s_%s_us" % (case, kind)
                for case in ("plain", "journaled", "journaled_nosync")
                for kind in ("wall", "cpu", "wait")])}
        gc = {"what": "total tiny commands/s from N threads; mean_group ="
                      " commands per journal transaction",
              "commands_per_case": s["group_commands"]}
        gc.update(self.extra.get("group_commit", {}))
        cases = []
        for t in s["group_threads"]:
            cases += ["always_%d" % t, "batch_%d" % t, "ratio_%d" % t,
                      "always_%d_mean_group" % t, "batch_%d_mean_group" % t]
        gc.update(self.section("group", cases))
        if "unavailable" in gc:
            for t in s["group_threads"]:
                gc["batch_%d" % t] = None
                gc["ratio_%d" % t] = None
        rep["group_commit"] = gc
        rep["rebuild"] = {
            "what": "recovery.rebuild into a fresh FileStorage; commands/s",
            "journals": {k: {kk: v[kk] for kk in (
                "kind", "commands", "bytes", "records_per_transaction",
                "build_seconds")} for k, v in j.items()},
            **self.section("rebuild", [
                c + suffix for c in ("small", "large", "notes",
                                     "memory_small")
                for suffix in ("_rate", "_seconds", "_seconds_with_open",
                               "_mb_per_s")])}
        rep["scan"] = {
            "what": "FileJournal(readonly=True).verify(); records/s and"
                    " MB/s",
            **self.section("scan", [
                c + suffix for c in ("small", "large", "notes", "bank")
                for suffix in ("_records_per_s", "_mb_per_s", "_seconds")])}
        rep["open"] = {
            "what": "seconds to open a JournaledDB (FileStorage + journal)"
                    " whose marker is current; journal_only: FileJournal"
                    " alone (median of up to %d opens per round, at least"
                    " 3, fewer when they take more than 5 s)"
                    % s["open_repeats"],
            "small_commands": j["open_small"]["commands"],
            "large_commands": j["large"]["commands"],
            **self.section("open", [
                "small_seconds", "large_seconds", "ratio",
                "small_journal_only_seconds", "large_journal_only_seconds",
                "journal_only_ratio"])}
        rep["memory"] = {
            "what": "peak RSS (VmHWM of the child process, KiB) of a"
                    " rebuild, one fresh process per case; growth = peak minus the peak before the"
                    " rebuild started (interpreter and imports)",
            "small_commands": j["memory_small"]["commands"],
            "large_commands": j["large"]["commands"],
            **self.section("memory", [
                "memory_small_peak_rss_kib", "large_peak_rss_kib", "ratio",
                "memory_small_growth_kib", "large_growth_kib",
                "small_peak_rss_kib", "notes_peak_rss_kib"])}
        rep["size"] = self.extra.get("size")
        peers = {"what": "zjournal.demo's bank workload; the commands"
                         " zjournal accepted are sent to the peers in the"
                         " same order, with the same transfer fees; final"
                         " states compared",
                 **self.extra.get("peers", {})}
        peers["record_commands_per_s"] = self.section(
            "bank_record", ["zjournal", "eventsourcing", "coopy"])
        peers["replay_commands_per_s"] = self.section(
            "bank_replay", ["zjournal", "eventsourcing", "coopy",
                            "ratio_vs_coopy", "ratio_vs_eventsourcing"])
        peers["replay_peak_rss_kib"] = self.section(
            "bank_replay", ["zjournal_peak_rss_kib",
                            "eventsourcing_peak_rss_kib",
                            "coopy_peak_rss_kib"])
        rep["peers"] = peers
        rep["fsync_probe_us"] = self.extra.get("fsync_probe_us")
        rep["profile"] = self.extra.get("profile")
        rep["rebuild_breakdown"] = self.extra.get("rebuild_breakdown")
        rep["errors"] = self.errors or None
        rep["src_changed_during_run"] = (
            rep["src_digest"]["start"] != rep["src_digest"]["end"])
        rep["targets"] = self.targets(rep)
        return rep

    def targets(self, rep):
        s = self.size
        large_label = "%s" % format(s["rebuild_large"], ",")

        def med(section, case):
            return median(self.get(section, case))

        def spread(section, case):
            x = summary(self.get(section, case))
            return None if x is None else [x["min"], x["max"]]

        rows = []

        def target(key, label, section, case, unit="", value=None,
                   reason=None):
            op, goal = TARGETS[key]
            if value is None and section is not None:
                value = med(section, case)
            holds = None
            if value is not None:
                holds = value >= goal if op == ">=" else value <= goal
            rows.append({
                "target": key, "label": label, "measured": value,
                "range": spread(section, case) if section else None,
                "op": op, "goal": goal, "unit": unit, "holds": holds,
                "reason": reason if value is None else None})

        target("commit_ratio", "commit: jdb.execute / plain FileStorage",
               "commit", "ratio", "x")
        unavailable = self.extra.get("group_commit", {}).get("unavailable")
        target("group_commit_ratio_16",
               "group commit: batch / always, 16 threads", "group",
               "ratio_16", "x", reason=unavailable or self.errors.get(
                   "group_commit", "no data"))
        target("rebuild_rate", "rebuild %s tiny commands"
               % format(s["rebuild_small"], ","), "rebuild", "small_rate",
               "cmd/s")
        rows[-1]["target"] = "rebuild_rate_small"
        target("rebuild_rate", "rebuild %s tiny commands" % large_label,
               "rebuild", "large_rate", "cmd/s")
        rows[-1]["target"] = "rebuild_rate_large"
        target("rebuild_vs_coopy", "bank replay: zjournal / coopy",
               "bank_replay", "ratio_vs_coopy", "x",
               reason=self.errors.get("peers") or self.errors.get(
                   "peers_replay"))
        target("rebuild_vs_eventsourcing",
               "bank replay: zjournal / eventsourcing", "bank_replay",
               "ratio_vs_eventsourcing", "x",
               reason=self.errors.get("peers") or self.errors.get(
                   "peers_replay"))
        target("scan_rate", "scan (verify) %s tiny records" % large_label,
               "scan", "large_records_per_s", "rec/s")
        target("open_ratio", "open: %s / %s entries" % (
            large_label, format(s["open_small"], ",")), "open", "ratio", "x")
        target("memory_ratio", "memory: peak RSS rebuild %s / %s" % (
            large_label, format(s["memory_small"], ",")), "memory", "ratio",
            "x")
        size = self.extra.get("size")
        target("size_overhead", "size: tiny command bytes beyond pickled args", None, None, "B",
               value=size and size["overhead_bytes_per_command"])
        return rows

    def machine(self):
        info = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                "platform": platform.platform()}
        try:
            info["loadavg_at_end"] = os.getloadavg()
        except OSError:
            pass
        try:
            from importlib.metadata import version
            info["versions"] = {p: version(p) for p in (
                "zjournal", "ZODB", "transaction", "eventsourcing", "coopy")}
        except Exception:
            pass
        try:
            info["zjournal_git"] = subprocess.run(
                ["git", "describe", "--always", "--dirty"], cwd=HERE,
                capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            pass
        return info


def fmt(value, unit):
    if value is None:
        return "n/a"
    if unit in ("cmd/s", "rec/s"):
        return "%s %s" % (format(round(value), ","), unit)
    if unit == "x":
        return "%.3fx" % value if value < 10 else "%.1fx" % value
    if unit == "B":
        return "%.1f B" % value
    return "%.4g" % value


def print_summary(rep, out=sys.stdout):
    print("", file=out)
    print("zjournal benchmarks (%s mode, %d rounds, %.0fs): median over"
          " rounds [min..max]" % (rep["mode"], rep["rounds"],
                                  rep["duration_seconds"]), file=out)
    for row in rep["targets"]:
        if row["holds"] is None:
            verdict = "UNAVAILABLE"
        else:
            verdict = "holds" if row["holds"] else "FAILS"
        rng = ""
        if row["range"]:
            rng = " [%s..%s]" % (fmt(row["range"][0], row["unit"]),
                                 fmt(row["range"][1], row["unit"]))
        line = "  %-52s %s%s  target %s %s  %s" % (
            row["label"] + ":", fmt(row["measured"], row["unit"]), rng,
            row["op"], fmt(row["goal"], row["unit"]), verdict)
        if row["holds"] is None and row.get("reason"):
            line += " (%s)" % str(row["reason"]).strip().splitlines()[-1]
        print(line, file=out)
    if rep.get("src_changed_during_run"):
        print("  WARNING: src/zjournal changed during the run: the figures"
              " mix two versions of the code; run again", file=out)
    if rep.get("errors"):
        print("  errors in sections: %s" % ", ".join(rep["errors"]),
              file=out)


def child_main(spec_text):
    spec = json.loads(spec_text)
    task = spec["task"]
    if task == "rebuild":
        import bench_zjournal
        result = bench_zjournal.child_rebuild(spec)
    elif task == "replay":
        import bench_peers
        result = bench_peers.child_replay(spec)
    elif task == "breakdown":
        import bench_zjournal
        result = bench_zjournal.child_breakdown(spec)
    elif task == "profile_bank":
        result = profile_bank(spec)
    else:
        raise SystemExit("unknown child task %r" % task)
    print(json.dumps(result))


def profile_bank(spec):
    import cProfile
    import ZODB
    import ZODB.FileStorage
    import zjournal
    from zjournal import demo  # registers the bank's commands
    from zjournal import recovery
    import bench_zjournal
    demo  # imported for its side effect
    os.makedirs(spec["work"], exist_ok=True)
    db = ZODB.DB(ZODB.FileStorage.FileStorage(
        os.path.join(spec["work"], "bank.fs")))
    journal = zjournal.FileJournal(spec["source"], readonly=True)
    profiler = cProfile.Profile()
    profiler.enable()
    recovery.rebuild(db, journal)
    profiler.disable()
    db.close()
    journal.close()
    shutil.rmtree(spec["work"], ignore_errors=True)
    return {"profile": bench_zjournal.top_functions(profiler, 15)}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="zjournal benchmarks, side by side with plain"
                    " FileStorage, eventsourcing and coopy")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and fewer rounds (~2 minutes)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds (default 5, or 3 with --quick)")
    parser.add_argument("--out", default=None,
                        help="where to write the JSON report (default:"
                             " benchmarks/results/<mode>-<time>.json)")
    parser.add_argument("--tmpdir", default=None,
                        help="where to put the journals and storages")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory")
    parser.add_argument("--no-json", action="store_true",
                        help="do not print the JSON report on stdout")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child)
    suite = Suite(args)
    try:
        rep = suite.run()
    finally:
        if not args.keep:
            shutil.rmtree(suite.dir, ignore_errors=True)
        else:
            log("kept %s" % suite.dir)
    out = args.out or os.path.join(
        HERE, "results", "%s-%s.json" % (
            rep["mode"], time.strftime("%Y%m%d-%H%M%S")))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    text = json.dumps(rep, indent=2, sort_keys=False)
    with open(out, "w") as f:
        f.write(text + "\n")
    if not args.no_json:
        print(text)
    print_summary(rep)
    print("JSON report: %s" % out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
