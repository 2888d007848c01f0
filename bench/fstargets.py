"""The three filesystems under test, and everything about the spoolfs daemon: starting it,
reading its CPU time and peak RSS, noticing a crash or a hang, and tearing mounts down
whatever happened.

- ext4:    a directory in the work dir, which also holds the spoolfs data dir, so both
           share one disk and one filesystem (checked).
- tmpfs:   a tmpfs mounted in the work dir: the in-memory upper bound.
- spoolfs: a fresh data dir and mount for each workload, so each workload's daemon CPU
           seconds and peak RSS are its own and one workload's crash does not hide the next.
"""

import glob
import os
import re
import signal
import subprocess
import time


def mount_options_of(path):
    """Mount and superblock options of the filesystem holding `path` (for the report)."""
    path = os.path.realpath(path)
    best = ("", "")
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            mp, dash = unescape(fields[4]), fields.index("-")
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[0]):
                best = (mp, f"{fields[5]} / {fields[dash + 3]}")
    return best[1]


def mountinfo():
    """[(mount_point, fs_type, source, major:minor)] from /proc/self/mountinfo. Reading it
    never touches a mount, so it is safe while a FUSE daemon hangs."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            dash = fields.index("-")
            out.append((unescape(fields[4]), fields[dash + 1], unescape(fields[dash + 2]),
                        fields[2]))
    return out


def unescape(s):
    """mountinfo writes space, tab, newline and backslash as \\ooo (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def fs_type_of(path):
    """Type of the filesystem holding `path` (longest mount point prefix)."""
    path = os.path.realpath(path)
    best = ("", "?")
    for mp, typ, _, _ in mountinfo():
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[0]):
            best = (mp, typ)
    return best[1]


def mounts_under(root):
    root = os.path.realpath(root)
    return [m for m in mountinfo() if m[0] == root or m[0].startswith(root + "/")]


def lazy_unmount(path):
    subprocess.run(["umount", "-l", path], capture_output=True)


def abort_fuse_connection(devnum, log):
    """Abort a FUSE connection through fusectl, which fails every pending and future request
    with ENOTCONN: the only way to free processes stuck on a hung daemon. fusectl is
    mounted for this if it is not (and left mounted; it is harmless)."""
    conn_dir = "/sys/fs/fuse/connections"
    if not os.path.ismount(conn_dir):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", conn_dir], capture_output=True)
    minor = devnum.split(":")[1]
    p = os.path.join(conn_dir, minor, "abort")
    try:
        with open(p, "w") as f:
            f.write("1")
        log(f"aborted FUSE connection {minor}")
    except OSError as e:
        log(f"could not abort FUSE connection {minor}: {e}")


class Ext4:
    name = "ext4"

    def __init__(self, work):
        self.root = os.path.join(work, "ext4")
        os.makedirs(self.root, exist_ok=True)
        self.type = fs_type_of(self.root)

    def dir(self, workload):
        return os.path.join(self.root, workload)


class Tmpfs:
    name = "tmpfs"

    def __init__(self, work, size):
        self.root = os.path.join(work, "tmpfs")
        os.makedirs(self.root, exist_ok=True)
        # nr_inodes=0: no inode limit, so the 1,000,000-entry directory fits.
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes=0,mode=0755",
                        "spoolfs-bench", self.root], check=True)
        self.type = "tmpfs"

    def dir(self, workload):
        return os.path.join(self.root, workload)

    def close(self):
        subprocess.run(["umount", self.root], capture_output=True)
        if mounts_under(self.root):
            lazy_unmount(self.root)


def proc_cpu_seconds(pid):
    """utime + stime of all threads, from /proc/PID/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


ANSI = re.compile(r"\x1b\[[0-9;]*m")  # in case the daemon colours its log anyway


class SpoolfsCrashed(Exception):
    pass


class Spoolfs:
    """One spoolfs daemon per workload.

    The daemon is started with `spoolfs mount -f` as our own child rather than through the
    daemonizing `spoolfs mount`: it is the same code path (the background daemon is this
    very process with stdout/stderr sent to /dev/null), but we keep its stderr, so a panic
    message and backtrace are captured, and we get its exit status from waitpid()."""

    name = "spoolfs"
    type = "fuse.spoolfs"

    def __init__(self, binary, work, out_dir, extra_args, log, pid_file):
        self.binary = binary
        self.work = work
        self.out_dir = out_dir
        self.extra_args = extra_args
        self.log = log
        self.pid_file = pid_file
        self.mnt = os.path.join(work, "mnt-spoolfs")
        os.makedirs(self.mnt, exist_ok=True)
        self.proc = None
        self.workload = None
        self.data_dir = None
        self.stderr_path = None
        self.failed = None  # why this workload's daemon is no longer usable

    def dir(self, workload):
        return os.path.join(self.mnt, workload)

    def start(self, workload):
        self.workload = workload
        self.failed = None
        self.data_dir = os.path.join(self.work, "spoolfs-data", workload)
        self.stderr_path = os.path.join(self.out_dir, f"spoolfs-{workload}.stderr.log")
        env = dict(os.environ, RUST_BACKTRACE="1", NO_COLOR="1")
        cmd = [self.binary, "mount", "-f", *self.extra_args, self.data_dir, self.mnt]
        self.cmd = cmd
        with open(self.stderr_path, "wb") as err:
            # Own session: a Ctrl-C in the terminal reaches the driver, which then unmounts
            # in order; the daemon must not race it by unmounting itself.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         env=env, start_new_session=True)
        with open(self.pid_file, "a") as f:
            f.write(f"{self.proc.pid}\n")
        deadline = time.monotonic() + 60
        while not any(m[0] == self.mnt and m[1] == "fuse.spoolfs" for m in mountinfo()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"spoolfs mount exited {self.proc.returncode} before the "
                                   f"mount was live: {self.stderr_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError("spoolfs mount did not come up in 60 s")
            time.sleep(0.02)
        try:  # the data dir lock names the daemon: it must be the process we measure
            with open(os.path.join(self.data_dir, "spoolfs.lock")) as f:
                locked = int(f.read().strip() or 0)
        except (OSError, ValueError):
            locked = None
        if locked != self.proc.pid:
            self.log(f"warning: {self.data_dir}/spoolfs.lock names PID {locked}, "
                     f"not the daemon {self.proc.pid}")
        self.cpu_base = proc_cpu_seconds(self.proc.pid)
        self.log(f"spoolfs mounted for {workload}: pid {self.proc.pid}, data dir {self.data_dir}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self):
        try:
            return proc_cpu_seconds(self.proc.pid) - self.cpu_base
        except OSError:
            return None

    def check(self):
        """Raise if the daemon has died (crash) since the last check."""
        if self.proc is not None and self.proc.poll() is not None and not self.failed:
            self.failed = f"daemon exited: {self.exit_description()}"
        if self.failed:
            raise SpoolfsCrashed(self.failed)

    def exit_description(self):
        rc = self.proc.returncode
        if rc is None:
            return "still running"
        if rc < 0:
            return f"killed by signal {signal.Signals(-rc).name}"
        return f"exit status {rc}"

    def stderr_tail(self, lines=40):
        try:
            with open(self.stderr_path, errors="replace") as f:
                return "".join(ANSI.sub("", x) for x in f.readlines()[-lines:])
        except OSError:
            return ""

    def notable_log_lines(self, limit=60):
        """WARN/ERROR lines and panics from the daemon's stderr (its log in -f mode)."""
        keep = []
        try:
            with open(self.stderr_path, errors="replace") as f:
                for line in f:
                    line = ANSI.sub("", line)
                    if any(w in line for w in (" WARN ", " ERROR ", "panicked", "thread '")):
                        keep.append(line.rstrip("\n"))
        except OSError:
            pass
        return keep[:limit] + ([f"... {len(keep) - limit} more"] if len(keep) > limit else [])

    def diagnose_hang(self, tag):
        """Where is the daemon stuck? Thread states, kernel stacks, and a gdb backtrace of
        every thread (gdb is in Debian; skipped if absent). Written to the results dir."""
        pid = self.proc.pid
        path = os.path.join(self.out_dir, f"spoolfs-hang-{tag}.txt")
        with open(path, "w") as out:
            out.write(f"spoolfs pid {pid} ({self.exit_description()}), workload {tag}\n\n")
            for task in sorted(glob.glob(f"/proc/{pid}/task/*")):
                try:
                    comm = open(f"{task}/comm").read().strip()
                    state = open(f"{task}/stat").read().rsplit(")", 1)[1].split()[0]
                    wchan = open(f"{task}/wchan").read().strip()
                    stack = open(f"{task}/stack").read() if os.path.exists(f"{task}/stack") else ""
                except OSError as e:
                    out.write(f"{task}: {e}\n")
                    continue
                out.write(f"--- tid {os.path.basename(task)} {comm} state={state} wchan={wchan}\n{stack}\n")
            if self.alive() and subprocess.run(["which", "gdb"], capture_output=True).returncode == 0:
                try:
                    bt = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "set pagination off",
                                         "-ex", "thread apply all bt 30"],
                                        capture_output=True, text=True, timeout=120)
                    out.write("\n=== gdb: thread apply all bt\n" + bt.stdout[-200000:])
                except subprocess.TimeoutExpired:
                    out.write("\n(gdb timed out)\n")
        self.log(f"spoolfs hang diagnostics written to {path}")
        return path

    def stop(self):
        """Unmount and collect the daemon's numbers. Never raises: a daemon that will not go
        is torn down (lazy unmount, FUSE abort, SIGKILL) and that is reported."""
        rec = {"workload": self.workload, "pid": self.proc.pid, "cmd": self.cmd,
               "data_dir": self.data_dir, "stderr_log": self.stderr_path,
               "problems": []}
        if self.failed:
            rec["problems"].append(self.failed)
        if self.alive():
            rec["cpu_s"] = self.cpu_seconds()
            rec["peak_rss_mib"] = (proc_status_kib(self.proc.pid, "VmHWM") or 0) / 1024
            rec["rss_at_end_mib"] = (proc_status_kib(self.proc.pid, "VmRSS") or 0) / 1024
            rec["threads"] = proc_status_kib(self.proc.pid, "Threads")
        try:
            rec["db_mib"] = os.path.getsize(os.path.join(self.data_dir, "spoolfs.redb")) / 2**20
        except OSError:
            pass
        entry = [m for m in mountinfo() if m[0] == self.mnt]
        hung = self.failed and "hung" in self.failed
        if hung and self.alive():
            # Already diagnosed when the request hung: do not wait for it again.
            self.proc.kill()
        elif entry and self.alive():
            t0 = time.monotonic()
            try:
                p = subprocess.run([self.binary, "umount", self.mnt], capture_output=True,
                                   text=True, timeout=120)
                rec["umount_s"] = time.monotonic() - t0
                if p.returncode != 0:
                    rec["problems"].append(f"`spoolfs umount` exited {p.returncode}: "
                                           f"{p.stderr.strip()}")
            except subprocess.TimeoutExpired:
                rec["problems"].append("`spoolfs umount` did not return in 120 s")
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rec["problems"].append("daemon still running 60 s after unmount: hang")
            rec["hang_diagnostics"] = self.diagnose_hang(f"{self.workload}-exit")
        # Whatever is left: clear it.
        for mp, _, _, dev in [m for m in mountinfo() if m[0] == self.mnt]:
            abort_fuse_connection(dev, self.log)
            lazy_unmount(mp)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        rec["exit"] = self.exit_description()
        if self.proc.returncode != 0 and not hung and not any("exited" in p for p in rec["problems"]):
            rec["problems"].append(f"daemon {rec['exit']}")
        rec["log_notable"] = self.notable_log_lines()
        self.proc = None
        return rec

    def kill_hung(self):
        """After a measurement hung: record where, then tear down so the run can go on."""
        self.failed = self.failed or "hung: a request got no answer"
        path = self.diagnose_hang(self.workload)
        for mp, _, _, dev in [m for m in mountinfo() if m[0] == self.mnt]:
            abort_fuse_connection(dev, self.log)
        return path
