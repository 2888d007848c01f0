#!/usr/bin/env python3
"""spoolfs benchmark driver: runs the workloads on ext4, tmpfs and spoolfs side by side and
writes the results dir. Normally started by bench/run.sh, which builds spoolfs, installs fio
and matplotlib, makes the work dir and cleans up mounts even if this process dies.

Every measurement runs in a forked child with a timeout: a FUSE daemon that stops answering
leaves its callers blocked in the kernel, and the driver must survive that to report it.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

import fstargets
import report
import workloads

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ALL_WORKLOADS = ("enqueue", "delivery", "metadata", "dirsize", "data")


def env(name, default):
    return os.environ.get(name, default)


def parse_size(s):
    s = s.strip().lower()
    mult = {"k": 2**10, "m": 2**20, "g": 2**30}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def human_size(n):
    for unit, m in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n} B"


def int_list(s):
    return [int(x.replace("_", "")) for x in s.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="bash bench/run.sh",
        description="spoolfs vs ext4 vs tmpfs. Every option also has an environment variable "
                    "(shown in brackets).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-w", "--workloads", default=env("BENCH_WORKLOADS", ",".join(ALL_WORKLOADS)),
                   help=f"comma list of {', '.join(ALL_WORKLOADS)} [BENCH_WORKLOADS]")
    p.add_argument("-r", "--repeats", type=int, default=int(env("BENCH_REPEATS", "3")),
                   help="runs of each measurement; the report shows medians [BENCH_REPEATS]")
    p.add_argument("--dir-sizes", default=env("BENCH_DIR_SIZES", "1000,100000"),
                   help="directory sizes for the create-cost workload [BENCH_DIR_SIZES]")
    p.add_argument("--big", action="store_true", default=env("BENCH_BIG", "") not in ("", "0"),
                   help="add the 1,000,000-entry directory (tens of minutes on a slow "
                        "filesystem) [BENCH_BIG=1]")
    p.add_argument("-o", "--out", default=env("BENCH_OUT", ""),
                   help="results dir (default /tmp/spoolfs-bench/DATE-TIME; never inside the "
                        "repo) [BENCH_OUT]")
    p.add_argument("--work-dir", default=env("BENCH_WORK_DIR", ""),
                   help="scratch dir on the disk to test: holds the ext4 dir, the spoolfs data "
                        "dirs and the mountpoints (run.sh makes one under /var/tmp) "
                        "[BENCH_WORK_DIR]")
    p.add_argument("--spoolfs", default=env("SPOOLFS_BIN", os.path.join(REPO, "target/release/spoolfs")),
                   help="spoolfs binary [SPOOLFS_BIN]")
    p.add_argument("--spoolfs-args", default=env("BENCH_SPOOLFS_ARGS", ""),
                   help="extra `spoolfs mount` arguments, e.g. '--fuse-threads 4' "
                        "[BENCH_SPOOLFS_ARGS]")
    p.add_argument("--messages", type=int, default=int(env("BENCH_MESSAGES", "2000")),
                   help="messages per enqueue and delivery run (shared by all writers) "
                        "[BENCH_MESSAGES]")
    p.add_argument("--writers", default=env("BENCH_WRITERS", "1,8"),
                   help="concurrent writer processes for enqueue [BENCH_WRITERS]")
    p.add_argument("--meta-files", type=int, default=int(env("BENCH_META_FILES", "10000")),
                   help="files for the metadata workload [BENCH_META_FILES]")
    p.add_argument("--dir-batch", type=int, default=int(env("BENCH_DIR_BATCH", "1000")),
                   help="timed creates at each directory size [BENCH_DIR_BATCH]")
    p.add_argument("--data-size", default=env("BENCH_DATA_SIZE", "1g"),
                   help="file size for the data workload (k/m/g suffixes) [BENCH_DATA_SIZE]")
    p.add_argument("--rand-seconds", type=int, default=int(env("BENCH_RAND_SECONDS", "4")),
                   help="seconds per 4 KiB random read run [BENCH_RAND_SECONDS]")
    p.add_argument("--seed", type=int, default=int(env("BENCH_SEED", "42")),
                   help="seed of message sizes, contents and orders [BENCH_SEED]")
    p.add_argument("--timeout", type=int, default=int(env("BENCH_TIMEOUT", "900")),
                   help="seconds before one measurement counts as hung [BENCH_TIMEOUT]")
    p.add_argument("--quick", action="store_true", default=env("BENCH_QUICK", "") not in ("", "0"),
                   help="smoke test: 1 repeat, small sizes (200 messages, 1,000 files, "
                        "directories of 100 and 1,000, 64 MiB data) [BENCH_QUICK=1]")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.messages, a.meta_files = 1, 200, 1000
        a.dir_sizes, a.dir_batch, a.data_size, a.rand_seconds = "100,1000", 200, "64m", 1
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in a.workloads if w not in ALL_WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; choose from {ALL_WORKLOADS}")
    a.dir_sizes = sorted(set(int_list(a.dir_sizes) + ([1_000_000] if a.big else [])))
    a.writers = int_list(a.writers)
    a.data_size = parse_size(a.data_size)
    a.spoolfs_args = a.spoolfs_args.split()
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    return a


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1)

    def __call__(self, msg):
        line = f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")


def run_isolated(fn, args, timeout, on_hang=None):
    """Run fn(*args) in a forked child (own process group) and return
    ("ok", result, elapsed) | ("error", message, elapsed) | ("hang", message, elapsed)."""
    ctx = multiprocessing.get_context("fork")
    r, w = ctx.Pipe(duplex=False)

    def child():
        os.setpgid(0, 0)  # so a hung measurement and its writer processes die together
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C
        try:
            w.send(("ok", fn(*args)))
        except BaseException as e:
            w.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))

    t0 = time.monotonic()
    p = ctx.Process(target=child)
    p.start()
    w.close()
    try:
        if r.poll(timeout):
            try:
                res = r.recv()
            except EOFError:
                p.join()
                res = ("error", f"measurement process died (exit {p.exitcode})", "")
        else:
            res = ("hang", f"no result after {timeout} s", "")
            if on_hang:
                on_hang()
    finally:
        if p.exitcode is None:
            p.join(timeout=5 if res[0] != "hang" else 0)
        if p.exitcode is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.kill()
            p.join(timeout=60)
    return res[0], res[1], time.monotonic() - t0


def cpu_snapshot():
    """(wall s, machine busy CPU s, CPU s of this process and its reaped descendants).

    The difference tells how much CPU *other* processes used while we measured: this is a
    shared machine, and a benchmark that does not say how busy it was is not worth much.
    Kernel threads (writeback, journal) count as "other" too."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)  # not idle/iowait
    t = os.times()
    return (time.monotonic(), busy / os.sysconf("SC_CLK_TCK"),
            t.user + t.system + t.children_user + t.children_system)


class Bench:
    def __init__(self, a, out_dir, log):
        self.a = a
        self.out = out_dir
        self.log = log
        self.records = []
        self.daemons = []
        self.errors = []
        work = a.work_dir
        self.ext4 = fstargets.Ext4(work)
        self.tmpfs = fstargets.Tmpfs(work, size=max(4 * 2**30, a.data_size * 3))
        self.spoolfs = fstargets.Spoolfs(a.spoolfs, work, out_dir, a.spoolfs_args, log,
                                         os.path.join(work, "daemon.pids"))
        self.fs = [self.ext4, self.tmpfs, self.spoolfs]
        self.meta = self.describe()

    def describe(self):
        a = self.a

        def cmd(*c):
            try:
                return subprocess.run(c, capture_output=True, text=True, timeout=30).stdout.strip()
            except Exception:
                return "?"
        cpu = "?"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        git = os.environ.get("BENCH_SOURCE_DESC", "")
        if not git:  # the work tree as built by run.sh (or SPOOLFS_BIN: then only a hint)
            git = cmd("git", "-C", REPO, "rev-parse", "--short", "HEAD") + " work tree"
            dirty = cmd("git", "-C", REPO, "status", "--porcelain", "--", "src", "actors",
                        "Cargo.toml", "Cargo.lock")
            if dirty:
                git += f" with uncommitted changes in {len(dirty.splitlines())} files"
        return {
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "out_dir": self.out,
            "work_dir": a.work_dir,
            "git": git,
            "spoolfs_version": cmd(a.spoolfs, "--version"),
            "spoolfs_bin": a.spoolfs,
            "kernel": platform.release(),
            "cpu": cpu,
            "cores": os.cpu_count(),
            "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "python": platform.python_version(),
            "fio": cmd("fio", "--version"),
            "ext4_dir": self.ext4.root,
            "ext4_type": self.ext4.type,
            "ext4_options": fstargets.mount_options_of(self.ext4.root),
            "tmpfs_dir": self.tmpfs.root,
            "spoolfs_data_parent": os.path.join(a.work_dir, "spoolfs-data"),
            "params": {
                "workloads": a.workloads, "repeats": a.repeats, "dir_sizes": a.dir_sizes,
                "dir_batch": a.dir_batch, "messages": a.messages, "writers": a.writers,
                "meta_files": a.meta_files, "data_size": a.data_size,
                "data_size_h": human_size(a.data_size), "rand_seconds": a.rand_seconds,
                "seed": a.seed, "timeout": a.timeout, "spoolfs_args": a.spoolfs_args,
            },
        }

    def save(self):
        res = {"meta": self.meta, "measurements": self.records, "daemons": self.daemons,
               "errors": self.errors}
        tmp = os.path.join(self.out, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, os.path.join(self.out, "results.json"))

    def order(self, rep):
        """Rotate the filesystem order each repeat, so none always runs first (on a cold
        page cache, or right after another's writeback)."""
        k = rep % len(self.fs)
        return self.fs[k:] + self.fs[:k]

    def measure(self, workload, case, fs, rep, fn, args, timeout=None, record=True):
        """One measurement on one filesystem; records it and returns (status, value)."""
        sp = fs is self.spoolfs
        if sp:
            try:
                self.spoolfs.check()
            except fstargets.SpoolfsCrashed as e:
                status, value, elapsed = "skipped", f"spoolfs unusable: {e}", 0.0
                if record:
                    self.add(workload, case, fs, rep, status, value, elapsed, None)
                return status, value
        os.sync()  # nothing dirty from the previous measurement writes back during this one
        cpu0 = self.spoolfs.cpu_seconds() if sp else None
        status, value, elapsed = run_isolated(
            fn, args, timeout or self.a.timeout,
            on_hang=(self.spoolfs.kill_hung if sp else None))
        cpu = (self.spoolfs.cpu_seconds() - cpu0) if sp and self.spoolfs.alive() and cpu0 is not None else None
        if sp and status != "ok":
            try:
                self.spoolfs.check()
            except fstargets.SpoolfsCrashed as e:
                value = (f"{value} -- spoolfs daemon {e}; its log: "
                         f"{os.path.basename(self.spoolfs.stderr_path)}")
            if status == "hang":
                value += (" -- spoolfs stopped answering; diagnostics in "
                          f"spoolfs-hang-{workload}.txt")
        if record:
            self.add(workload, case, fs, rep, status, value, elapsed, cpu)
        return status, value

    def add(self, workload, case, fs, rep, status, value, elapsed, cpu):
        rec = {"workload": workload, "case": case, "fs": fs.name, "repeat": rep,
               "status": status, "elapsed_s": round(elapsed, 3),
               "metrics": value if status == "ok" else {}}
        if status != "ok":
            rec["error"] = value
        if cpu is not None:
            rec["daemon_cpu_s"] = round(cpu, 3)
        self.records.append(rec)
        if status == "ok":
            shown = ", ".join(f"{k}={report.fmt(v)}" for k, v in list(value.items())[:4])
            self.log(f"  {workload} {case} rep {rep + 1} {fs.name:7s}: {shown} "
                     f"({elapsed:.1f} s{f', daemon cpu {cpu:.1f} s' if cpu is not None else ''})")
        else:
            self.log(f"  {workload} {case} rep {rep + 1} {fs.name:7s}: {status.upper()}: {value}")

    # --- workloads ----------------------------------------------------------------------

    def repeated(self, workload, case, fn_for_fs):
        """The usual shape: for each repeat, each filesystem in rotating order, a fresh
        sub-directory (removed afterwards, untimed)."""
        for rep in range(self.a.repeats):
            for fs in self.order(rep):
                d = os.path.join(fs.dir(workload), f"{case.replace(' ', '_')}-{rep}")
                self.measure(workload, case, fs, rep, *fn_for_fs(d))
                self.cleanup(workload, fs, d)

    def cleanup(self, workload, fs, d):
        if fs is self.spoolfs and self.spoolfs.failed:
            return
        st, v, _ = run_isolated(workloads.remove_tree, (d,), self.a.timeout)
        if st != "ok":
            self.errors.append(f"cleanup of {d} on {fs.name}: {st}: {v}")
            self.log(f"  cleanup of {d} failed: {st}: {v}")

    def w_enqueue(self):
        for n in self.a.writers:
            case = f"{n} writer{'s' if n != 1 else ''}"
            self.log(f"enqueue, {case}: {self.a.messages} messages")
            self.repeated("enqueue", case,
                          lambda d, n=n: (workloads.enqueue, (d, n, self.a.messages, self.a.seed)))

    def w_delivery(self):
        self.log(f"delivery: {self.a.messages} messages, 1 reader")

        def both(d, messages, seed):
            workloads.delivery_prepare(d, messages, seed)  # untimed fill, then sync
            return workloads.delivery(d, messages, seed)
        self.repeated("delivery", "1 reader",
                      lambda d: (both, (d, self.a.messages, self.a.seed)))

    def w_metadata(self):
        n = self.a.meta_files
        self.log(f"metadata: create/stat/readdir/unlink of {n:,} files in one directory")
        self.repeated("metadata", f"{n:,} files",
                      lambda d: (workloads.metadata, (d, n, self.a.seed)))

    def w_dirsize(self):
        self.log(f"dirsize: create cost at {', '.join(f'{s:,}' for s in self.a.dir_sizes)} entries")
        prev = {fs.name: 0 for fs in self.fs}
        for size in self.a.dir_sizes:
            case = f"{size:,} entries"
            filled = []
            for fs in self.fs:
                d = os.path.join(fs.dir("dirsize"), "d")
                self.log(f"  filling {fs.name} to {size:,} entries (untimed)")
                # a fill slower than 100 creates/s is a hang
                st, v = self.measure("dirsize", case, fs, -1, workloads.dirsize_fill,
                                     (d, prev[fs.name], size,
                                      lambda n, fs=fs: self.log(f"    {fs.name}: {n:,}")),
                                     timeout=self.a.timeout + size // 100, record=False)
                if st == "ok":
                    prev[fs.name] = size
                    filled.append(fs)
                    self.log(f"  filled {fs.name} to {size:,} in {v:.1f} s")
                else:
                    self.add("dirsize", case, fs, 0, st, f"filling to {size:,}: {v}", 0.0, None)
            for rep in range(self.a.repeats):
                for fs in self.order(rep):
                    if fs in filled:
                        d = os.path.join(fs.dir("dirsize"), "d")
                        self.measure("dirsize", case, fs, rep, workloads.dirsize_measure,
                                     (d, size, self.a.dir_batch, rep))
        for fs in self.fs:
            if fs is not self.spoolfs:  # spoolfs: its data dir goes with the mount
                self.cleanup("dirsize", fs, fs.dir("dirsize"))

    def w_data(self):
        size = self.a.data_size
        self.log(f"data: {human_size(size)} file, fio")
        self.repeated("data", f"{human_size(size)} file",
                      lambda d: (workloads.data, (d, size, self.a.rand_seconds)))

    def run(self):
        t0 = time.monotonic()
        try:
            for wl in self.a.workloads:
                self.log(f"=== {wl}")
                snap = cpu_snapshot()
                workloads.drop_caches()  # every workload starts from the same cold state
                try:
                    self.spoolfs.start(wl)
                except Exception as e:
                    self.errors.append(f"{wl}: spoolfs did not mount: {e}")
                    self.log(f"  spoolfs did not mount: {e}")
                    self.spoolfs.failed = f"did not mount: {e}"
                for fs in (self.ext4, self.tmpfs):
                    os.makedirs(fs.dir(wl), exist_ok=True)
                if not self.spoolfs.failed:
                    os.makedirs(self.spoolfs.dir(wl), exist_ok=True)
                try:
                    getattr(self, "w_" + wl)()
                finally:
                    if self.spoolfs.proc is not None:
                        d = self.spoolfs.stop()
                        self.daemons.append(d)
                        self.log(f"  spoolfs daemon for {wl}: cpu {report.fmt(d.get('cpu_s'))} s, "
                                 f"peak RSS {report.fmt(d.get('peak_rss_mib'))} MiB, "
                                 f"{d['exit']}" + (f"; problems: {d['problems']}" if d['problems'] else ""))
                    # the data dir of a workload is not needed after it: free the disk
                    workloads.remove_tree(os.path.join(self.a.work_dir, "spoolfs-data", wl))
                    now = cpu_snapshot()
                    wall = now[0] - snap[0]
                    other = max(0.0, (now[1] - snap[1]) - (now[2] - snap[2])) / max(wall, 1e-9)
                    self.meta.setdefault("load", {})[wl] = {
                        "wall_s": round(wall, 1), "other_cores": round(other, 2),
                        "loadavg_end": open("/proc/loadavg").read().split()[:3]}
                    self.log(f"  {wl} took {wall:.0f} s; other processes used {other:.2f} "
                             f"cores meanwhile")
                    self.meta["duration_s"] = time.monotonic() - t0
                    self.save()
        finally:
            self.meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
            self.meta["duration_s"] = time.monotonic() - t0
            self.save()
            self.tmpfs.close()


def main():
    a = parse_args(sys.argv[1:])
    if os.geteuid() != 0:
        sys.exit("bench: must run as root (mounts, drop_caches)")
    if not a.work_dir:
        sys.exit("bench: --work-dir is required (bash bench/run.sh makes one)")
    a.work_dir = os.path.realpath(a.work_dir)
    out = a.out or os.path.join("/tmp/spoolfs-bench",
                                datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out = os.path.realpath(out)
    for d, what in ((out, "results"), (a.work_dir, "work")):
        if d == REPO or d.startswith(REPO + "/"):
            sys.exit(f"bench: the {what} dir {d} is inside the repository; choose another")
    os.makedirs(out, exist_ok=True)
    if not os.path.exists(a.spoolfs):
        sys.exit(f"bench: no spoolfs binary at {a.spoolfs} (cargo build --release)")
    log = Log(os.path.join(out, "run.log"))
    log(f"results: {out}; work dir: {a.work_dir}")
    b = Bench(a, out, log)
    if b.ext4.type != "ext4":
        log(f"warning: the work dir is on {b.ext4.type}, not ext4: the 'ext4' column is "
            f"{b.ext4.type}")
    try:
        b.run()
    except KeyboardInterrupt:
        log("interrupted: writing the report for what was measured")
        b.errors.append("run interrupted")
        b.save()
    text = report.render(out)
    print()
    print(text)
    print(f"Results: {out}")


if __name__ == "__main__":
    main()
