#!/usr/bin/env python3
"""The soak test's workload, sampler and verdict (driven by tests/soak/run.sh).

    soak.py load    --mount MNT --seconds S --budget B [--seed N] [worker counts]
    soak.py monitor --pid PID --csv FILE --stop FILE [--interval 10] [--scrape 1]
    soak.py report  --csv FILE --budget B [--requests-csv FILE]

`load` runs a mixed mail-spool load on the mount for S seconds, every actor in its own
process with a fixed seed, and exits 0 only if no operation failed and every message
enqueued was delivered and verified.  Every actor checks what it reads against what it
wrote, so any errno or wrong byte is an error: nothing is expected to fail.

  writer      spool enqueue: create tmp/NAME (O_EXCL), write in pieces, set an xattr with the
              checksum, fsync, close, rename into queue/, now and then fsync queue/.  The
              body's first line carries its name, length and sha256.  At most --max-queued
              messages wait at once (so the file count, and the daemon's state, stay bounded).
  deliverer   readdir queue/, read each of its messages (partitioned by name), check length,
              sha256 and xattr, unlink.  After the deadline the deliverers drain the queue.
  meta        churn in its own directory against a model: mkdir/rmdir, small files, xattrs
              (set/get/list/remove), symlinks (readlink), hard links (nlink, read through the
              link), rename, chmod, utime; readdir compared with the model.
  big         a file written to several times the memfd budget in max_write (1 MiB) blocks
              while kept open, with rewrites of evicted ranges, read-backs, ftruncate down and
              up and hole punches (fallocate), all against an in-memory copy; fsync, verify
              the whole file, close, verify again through a new descriptor, unlink.
  truncator   small files rewritten and truncated (ftruncate on an open file and truncate(2)
              by path), read back against a model.

`monitor` samples the daemon every --scrape seconds (VmRSS & co from /proc/PID/status, the
memfd descriptors it holds and the memory they really use, and /metrics) and writes one CSV
row every --interval seconds with the latest values and, for the memfd columns, the largest
seen since the previous row.  It stops when the --stop file appears.

`report` prints a short table and applies the pass criteria (see the docstring of `report`).
"""

import argparse
import csv
import ctypes
import errno
import hashlib
import multiprocessing as mp
import os
import queue
import random
import re
import signal
import stat
import sys
import time
import traceback
import urllib.request

MIB = 1 << 20
KIB = 1 << 10
CHUNK = 64 * KIB  # spoolfs_core::CHUNK_SIZE
MAX_WRITE = MIB  # src/adapter.rs MAX_WRITE: the largest write the kernel sends

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(fd, offset, length):
    if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate(PUNCH_HOLE, {offset}, {length}): {os.strerror(e)}")


class Failed(Exception):
    """A check of what the filesystem returned failed."""


def check(cond, what):
    if not cond:
        raise Failed(what)


def write_all(fd, data, offset=None):
    view = memoryview(data)
    done = 0
    while done < len(view):
        if offset is None:
            n = os.write(fd, view[done:])
        else:
            n = os.pwrite(fd, view[done:], offset + done)
        check(n > 0, f"write returned {n}")
        done += n


def read_all(fd, length, offset):
    parts = []
    done = 0
    while done < length:
        b = os.pread(fd, min(length - done, MIB), offset + done)
        if not b:
            break
        parts.append(b)
        done += len(b)
    return b"".join(parts)


def read_file(path):
    """The whole file.  (Not open(): Python asks isatty(), an ioctl the daemon logs as
    unimplemented, on every open.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        while b := os.read(fd, MIB):
            parts.append(b)
        return b"".join(parts)
    finally:
        os.close(fd)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the load ----------------------------------------------------------------------------


class Actor:
    """One worker process: its own seed, counters and error list."""

    MAX_ERRORS = 20

    def __init__(self, role, idx, args, shared):
        self.role, self.idx, self.args, self.shared = role, idx, args, shared
        self.name = f"{role}{idx}"
        self.rng = random.Random(f"{args.seed}/{role}/{idx}")
        self.deadline = shared["deadline"]
        self.counts = {}
        self.errors = []

    def count(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n

    def running(self):
        return time.time() < self.deadline and len(self.errors) < self.MAX_ERRORS

    def fail(self, what):
        msg = f"{self.name}: {what}"
        self.errors.append(msg)
        print(f"soak: error: {msg}", file=sys.stderr, flush=True)

    def run(self):
        while self.running():
            try:
                self.step()
            except Exception as e:  # every failure is counted, the actor goes on
                self.fail(f"{type(e).__name__}: {e}")
                if not isinstance(e, (OSError, Failed)):
                    traceback.print_exc()
                    break
        try:
            self.finish()
        except Exception as e:
            self.fail(f"finishing: {type(e).__name__}: {e}")
        return {"role": self.role, "name": self.name, "counts": self.counts,
                "errors": self.errors}

    def step(self):
        raise NotImplementedError

    def finish(self):
        pass


def spool_header(name, body):
    return f"X-Soak: {name} {len(body)} {hashlib.sha256(body).hexdigest()}\n".encode()


class Writer(Actor):
    def __init__(self, *a):
        super().__init__(*a)
        self.seq = 0
        self.tmp = os.path.join(self.args.mount, "spool", "tmp")
        self.queue = os.path.join(self.args.mount, "spool", "queue")

    def body_size(self):
        r = self.rng.random()
        if r < 0.70:
            return self.rng.randint(200, 16 * KIB)  # most mail is small
        if r < 0.95:
            return self.rng.randint(16 * KIB, 256 * KIB)
        return self.rng.randint(256 * KIB, 2 * MIB)  # attachments

    def step(self):
        queued = self.shared["queued"]
        if queued.value >= self.args.max_queued:
            time.sleep(0.01)
            return
        self.seq += 1
        name = f"{self.idx:02d}-{self.seq:08d}"
        body = self.rng.randbytes(self.body_size())
        header = spool_header(name, body)
        msg = header + body
        path = os.path.join(self.tmp, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            pos = 0
            while pos < len(msg):  # stdio-like pieces, not one big write
                n = self.rng.choice((4 * KIB, 8 * KIB, 64 * KIB, 200 * KIB))
                write_all(fd, msg[pos:pos + n])
                pos += n
            os.setxattr(fd, "user.soak.sha256", header.split()[3])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(path, os.path.join(self.queue, name))
        if self.seq % 8 == 0:
            fsync_dir(self.queue)
        with queued.get_lock():
            queued.value += 1
        self.count("enqueued")
        self.count("enqueued_bytes", len(msg))


class Deliverer(Actor):
    def __init__(self, *a):
        super().__init__(*a)
        self.queue = os.path.join(self.args.mount, "spool", "queue")

    def running(self):
        # Past the deadline: drain until the writers are done and the queue is empty.
        if len(self.errors) >= self.MAX_ERRORS:
            return False
        if time.time() < self.deadline:
            return True
        return not (self.shared["writers_done"].is_set() and self.shared["queued"].value == 0)

    def mine(self, name):
        w, s = name.split("-")
        return (int(w) + int(s)) % self.args.deliverers == self.idx

    def step(self):
        names = sorted(n for n in os.listdir(self.queue) if self.mine(n))
        self.count("readdirs")
        if not names:
            time.sleep(0.02)
            return
        for name in names:
            self.deliver(name)

    def deliver(self, name):
        path = os.path.join(self.queue, name)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            data = read_all(fd, size + 1, 0)  # one byte more: nothing past the size
            xattr = os.getxattr(fd, "user.soak.sha256")
        finally:
            os.close(fd)
        check(len(data) == size, f"{name}: read {len(data)} bytes, stat says {size}")
        header, _, body = data.partition(b"\n")
        fields = header.split()
        check(len(fields) == 4 and fields[0] == b"X-Soak:" and fields[1] == name.encode(),
              f"{name}: bad header {header[:80]!r}")
        check(int(fields[2]) == len(body), f"{name}: body {len(body)} bytes, header {fields[2]}")
        check(hashlib.sha256(body).hexdigest().encode() == fields[3], f"{name}: sha256 mismatch")
        check(xattr == fields[3], f"{name}: xattr {xattr!r} != header sha256")
        os.unlink(path)
        with self.shared["queued"].get_lock():
            self.shared["queued"].value -= 1
        self.count("delivered")
        self.count("delivered_bytes", len(data))

    def finish(self):
        left = [n for n in os.listdir(self.queue) if self.mine(n)]
        check(not left, f"{len(left)} messages left in queue/ after the drain: {left[:5]}")


class Meta(Actor):
    """Namespace and xattr churn in a directory of its own, checked against a model."""

    SLOTS = 16

    def __init__(self, *a):
        super().__init__(*a)
        self.dir = os.path.join(self.args.mount, "meta", f"m{self.idx}")
        os.mkdir(self.dir)
        self.dirs = set()  # names of (empty) subdirectories
        self.files = {}  # name -> {"data": bytes, "xattrs": {name: value}, "mode": int}
        self.links = {}  # symlink name -> target
        self.ops = [self.mkdir, self.rmdir, self.create, self.xattr, self.symlink,
                    self.hardlink, self.rename, self.chattr, self.unlink, self.listing]

    def p(self, name):
        return os.path.join(self.dir, name)

    def slot(self, prefix):
        return f"{prefix}{self.rng.randrange(self.SLOTS)}"

    def step(self):
        op = self.rng.choice(self.ops)
        op()
        self.count(op.__name__)

    def mkdir(self):
        d = self.slot("d")
        if d not in self.dirs:
            os.mkdir(self.p(d), 0o755)
            self.dirs.add(d)

    def rmdir(self):
        d = self.slot("d")
        if d in self.dirs:
            os.rmdir(self.p(d))
            self.dirs.discard(d)

    def create(self):
        f = self.slot("f")
        data = self.rng.randbytes(self.rng.randint(0, 8 * KIB))
        fd = os.open(self.p(f), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        old = self.files.get(f)
        self.files[f] = {"data": data, "xattrs": old["xattrs"] if old else {},
                         "mode": old["mode"] if old else 0o644}

    def some_file(self):
        return self.rng.choice(sorted(self.files)) if self.files else None

    def xattr(self):
        f = self.some_file()
        if f is None:
            return
        xs = self.files[f]["xattrs"]
        path = self.p(f)
        k = f"user.k{self.rng.randrange(8)}"
        if k in xs and self.rng.random() < 0.4:
            os.removexattr(path, k)
            del xs[k]
        else:
            v = self.rng.randbytes(self.rng.randint(0, 2 * KIB))
            os.setxattr(path, k, v)
            xs[k] = v
        for name, value in xs.items():
            got = os.getxattr(path, name)
            check(got == value, f"{f}: xattr {name} reads back {len(got)} bytes, not {len(value)}")
        got = sorted(n for n in os.listxattr(path) if n.startswith("user."))
        check(got == sorted(xs), f"{f}: listxattr {got} != {sorted(xs)}")

    def symlink(self):
        s = self.slot("s")
        if s in self.links:
            check(os.readlink(self.p(s)) == self.links[s], f"{s}: readlink differs")
            os.unlink(self.p(s))
            del self.links[s]
        else:
            target = "../" * self.rng.randint(0, 3) + "t" * self.rng.randint(1, 200)
            os.symlink(target, self.p(s))
            self.links[s] = target

    def hardlink(self):
        f = self.some_file()
        if f is None:
            return
        h = self.p("hardlink")
        os.link(self.p(f), h)
        try:
            check(os.stat(h).st_nlink == 2, f"{f}: nlink {os.stat(h).st_nlink} after link")
            check(read_file(h) == self.files[f]["data"], f"{f}: differs through a hard link")
        finally:
            os.unlink(h)
        check(os.stat(self.p(f)).st_nlink == 1, f"{f}: nlink after unlinking the link")

    def rename(self):
        f = self.some_file()
        if f is None:
            return
        g = self.slot("f")
        os.rename(self.p(f), self.p(g))  # may replace g
        self.files[g] = self.files.pop(f)

    def chattr(self):
        f = self.some_file()
        if f is None:
            return
        mode = self.rng.choice((0o600, 0o640, 0o644, 0o400))
        os.chmod(self.p(f), mode)
        t = self.rng.randint(0, 2**31)
        os.utime(self.p(f), ns=(t * 10**9 + 1, t * 10**9 + 2))
        st = os.stat(self.p(f))
        check(stat.S_IMODE(st.st_mode) == mode and st.st_mtime_ns == t * 10**9 + 2,
              f"{f}: mode/mtime do not read back")
        check(st.st_size == len(self.files[f]["data"]), f"{f}: size {st.st_size}")
        self.files[f]["mode"] = mode

    def unlink(self):
        f = self.some_file()
        if f is not None:
            os.unlink(self.p(f))
            del self.files[f]

    def listing(self):
        want = sorted(self.dirs | set(self.files) | set(self.links))
        got = sorted(os.listdir(self.dir))
        check(got == want, f"readdir {got} != model {want}")
        for f, m in self.files.items():
            check(read_file(self.p(f)) == m["data"], f"{f}: content differs")


class Big(Actor):
    """Files larger than the memfd budget, written while kept open."""

    def __init__(self, *a):
        super().__init__(*a)
        self.round = 0
        self.dir = os.path.join(self.args.mount, "big")

    def step(self):
        self.round += 1
        target = int(self.args.budget * self.args.big_factor)
        path = os.path.join(self.dir, f"b{self.idx}-{self.round % 2}")
        model = bytearray()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while len(model) < target and self.running():
                block = self.rng.randbytes(MAX_WRITE)
                write_all(fd, block, len(model))
                model += block
                self.count("blocks")
                r = self.rng.random()
                if r < 0.25:  # rewrite a range that has probably been evicted
                    off = self.rng.randrange(len(model))
                    data = self.rng.randbytes(min(self.rng.randint(1, 300 * KIB), len(model) - off))
                    write_all(fd, data, off)
                    model[off:off + len(data)] = data
                    self.count("rewrites")
                elif r < 0.40:  # read back a range (memfd and redb mixed)
                    off = self.rng.randrange(len(model))
                    n = self.rng.randint(1, 2 * MIB)
                    check(read_all(fd, n, off) == bytes(model[off:off + n]),
                          f"{path}: pread({n}, {off}) differs")
                    self.count("readbacks")
                elif r < 0.50:  # punch holes (KEEP_SIZE) with partial chunks at the edges:
                    # each zeroes part of a chunk, staging it in the memfd (which once went
                    # past the budget); a burst of them before the next write
                    for _ in range(self.rng.choice((1, 1, 4, 16))):
                        off = self.rng.randrange(len(model))
                        n = min(self.rng.randint(1, 3 * CHUNK), len(model) - off)
                        punch_hole(fd, off, n)
                        model[off:off + n] = bytes(n)
                        self.count("punches")
                elif r < 0.58:  # truncate down (and maybe back up: the gap reads as zeros)
                    new = self.rng.randrange(len(model))
                    os.ftruncate(fd, new)
                    del model[new:]
                    if self.rng.random() < 0.5:
                        up = new + self.rng.randint(1, 3 * CHUNK)
                        os.ftruncate(fd, up)
                        model += bytes(up - new)
                    self.count("ftruncates")
            os.fsync(fd)
            check(os.fstat(fd).st_size == len(model), f"{path}: size {os.fstat(fd).st_size}")
            check(read_all(fd, len(model) + 1, 0) == model, f"{path}: differs after fsync")
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        try:
            check(read_all(fd, len(model) + 1, 0) == model, f"{path}: differs after close")
        finally:
            os.close(fd)
        self.count("files")
        self.count("bytes", len(model))
        if self.round % 2 == 0:
            os.unlink(path)


class Truncator(Actor):
    SLOTS = 8
    MAX = 512 * KIB

    def __init__(self, *a):
        super().__init__(*a)
        self.dir = os.path.join(self.args.mount, "trunc", f"t{self.idx}")
        os.mkdir(self.dir)
        self.model = {}

    def step(self):
        name = f"f{self.rng.randrange(self.SLOTS)}"
        path = os.path.join(self.dir, name)
        model = self.model.setdefault(name, bytearray())
        if self.rng.random() < 0.3:  # truncate(2) by path, the file closed
            new = self.rng.randint(0, self.MAX)
            if not os.path.exists(path):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
            os.truncate(path, new)
            self.resize(model, new)
            self.count("truncate")
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                for _ in range(self.rng.randint(1, 6)):
                    if self.rng.random() < 0.5:
                        off = self.rng.randint(0, self.MAX)
                        data = self.rng.randbytes(self.rng.randint(1, 96 * KIB))
                        write_all(fd, data, off)
                        if off > len(model):
                            model += bytes(off - len(model))
                        model[off:off + len(data)] = data
                        self.count("write")
                    else:
                        new = self.rng.randint(0, self.MAX)
                        os.ftruncate(fd, new)
                        self.resize(model, new)
                        self.count("ftruncate")
                    check(os.fstat(fd).st_size == len(model), f"{name}: size differs")
                check(read_all(fd, len(model) + 1, 0) == model, f"{name}: differs (open)")
            finally:
                os.close(fd)
        check(read_file(path) == model, f"{name}: differs")

    @staticmethod
    def resize(model, new):
        if new < len(model):
            del model[new:]
        else:
            model += bytes(new - len(model))


ROLES = (("writer", Writer), ("deliverer", Deliverer), ("meta", Meta), ("big", Big),
         ("truncator", Truncator))


def actor_main(cls, role, idx, args, shared, results):
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        res = cls(role, idx, args, shared).run()
    except Exception as e:  # setup failed
        res = {"role": role, "name": f"{role}{idx}", "counts": {},
               "errors": [f"{role}{idx}: setup: {type(e).__name__}: {e}"]}
    results.put(res)


def load(args):
    mnt = args.mount
    for d in ("spool", "spool/tmp", "spool/queue", "meta", "big", "trunc"):
        os.mkdir(os.path.join(mnt, d))
    ctx = mp.get_context("fork")
    start = time.time()
    shared = {"deadline": start + args.seconds, "queued": ctx.Value("q", 0),
              "writers_done": ctx.Event()}
    results = ctx.Queue()
    procs = {}
    for role, cls in ROLES:
        for i in range(getattr(args, role + "s")):
            p = ctx.Process(target=actor_main, args=(cls, role, i, args, shared, results),
                            name=f"soak-{role}{i}")
            p.start()
            procs[p] = role
    print(f"soak: load: {len(procs)} processes, {args.seconds} s, seed {args.seed}", flush=True)
    out = []
    writer_procs = [p for p, r in procs.items() if r == "writer"]
    while len(out) < len(procs):
        # The deliverers drain the queue once every writer is done (reported or died).
        if not any(p.is_alive() for p in writer_procs):
            shared["writers_done"].set()
        try:
            out.append(results.get(timeout=1))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break  # a process died without reporting: counted below by its exit code
    for p in procs:
        p.join()
    took = time.time() - start

    totals, errors = {}, []
    for res in out:
        for k, v in res["counts"].items():
            key = f"{res['role']}.{k}"
            totals[key] = totals.get(key, 0) + v
        errors += res["errors"]
    for p in procs:
        if p.exitcode != 0:
            errors.append(f"{p.name} exited {p.exitcode}")
    enq, dlv = totals.get("writer.enqueued", 0), totals.get("deliverer.delivered", 0)
    if enq != dlv:
        errors.append(f"{enq} messages enqueued but {dlv} delivered")
    left = os.listdir(os.path.join(mnt, "spool", "tmp"))
    if left:
        errors.append(f"{len(left)} files left in spool/tmp")
    if enq == 0 or totals.get("big.files", 0) == 0:
        errors.append("the load did not get going (no message or no big file completed)")

    print(f"soak: load took {took:.0f} s; per role:")
    for role, _ in ROLES:
        items = [f"{k.split('.', 1)[1]}={v}" for k, v in sorted(totals.items())
                 if k.startswith(role + ".")]
        print(f"soak:   {role:<9} {' '.join(items)}")
    print(f"soak: messages: {enq} enqueued, {dlv} delivered and verified "
          f"({totals.get('writer.enqueued_bytes', 0) / MIB:.0f} MiB)")
    if errors:
        print(f"soak: load: {len(errors)} errors:", file=sys.stderr)
        for e in errors[:30]:
            print(f"soak:   {e}", file=sys.stderr)
        return 1
    return 0


# --- the sampler -------------------------------------------------------------------------

COLUMNS = ["t_s", "rss_kib", "rss_anon_kib", "rss_file_kib", "rss_shmem_kib", "hwm_kib",
           "threads", "fds", "memfds", "memfd_bytes", "memfd_bytes_max", "memfd_alloc",
           "memfd_alloc_max", "memfd_dirty_bytes", "open_handles", "inodes", "db_bytes",
           "requests", "request_errors", "queue_depth"]


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.split()[0] if v.split() else ""
    return out


def memfd_usage(pid):
    """(descriptors, memfds, bytes the memfds really hold: st_blocks, not st_size)."""
    fds = memfds = used = 0
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        fds += 1
        try:
            if os.readlink(f"{base}/{fd}").startswith("/memfd:"):
                memfds += 1
                used += os.stat(f"{base}/{fd}").st_blocks * 512
        except FileNotFoundError:  # closed meanwhile
            pass
    return fds, memfds, used


def listening_port(pid):
    """The TCP port the daemon listens on (its metrics endpoint, bound to port 0)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            m = re.match(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
        if m:
            inodes.add(m.group(1))
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    col = line.split()
                    if col[3] == "0A" and col[9] in inodes:  # LISTEN
                        return int(col[1].rsplit(":", 1)[1], 16)
        except FileNotFoundError:
            pass
    return None


def scrape(port):
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    vals = {}
    for line in body.decode().splitlines():
        if not line or line[0] == "#":
            continue
        name, _, value = line.rpartition(" ")
        base = name.split("{", 1)[0]
        vals[base] = vals.get(base, 0.0) + float(value)
    return vals


def monitor(args):
    pid = args.pid
    port = None
    for _ in range(100):
        port = listening_port(pid)
        if port:
            break
        time.sleep(0.1)
    if not port:
        print("soak: monitor: the daemon listens on no TCP port (metrics)", file=sys.stderr)
        return 1
    print(f"soak: monitor: daemon {pid}, metrics on 127.0.0.1:{port}, budget "
          f"{scrape(port).get('spoolfs_memfd_budget_bytes', 0) / MIB:.1f} MiB", flush=True)
    start = time.monotonic()
    next_row = start
    peak = {"memfd_bytes_max": 0, "memfd_alloc_max": 0}
    stop_seen = None
    with open(args.csv, "w", newline="") as out:
        w = csv.DictWriter(out, COLUMNS)
        w.writeheader()
        while True:
            if stop_seen is None and os.path.exists(args.stop):
                stop_seen = time.monotonic()
            stopping = False
            try:
                st = proc_status(pid)
                fds, memfds, used = memfd_usage(pid)
                m = scrape(port)
            except (OSError, ValueError) as e:
                print(f"soak: monitor: daemon {pid} gone or not answering: {e}", file=sys.stderr)
                return 1
            if "spoolfs_memfd_bytes" not in m:
                print("soak: monitor: no spoolfs_memfd_bytes in /metrics", file=sys.stderr)
                return 1
            gauge = int(m["spoolfs_memfd_bytes"])
            handles = int(m.get("spoolfs_open_handles", 0))
            peak["memfd_bytes_max"] = max(peak["memfd_bytes_max"], gauge)
            peak["memfd_alloc_max"] = max(peak["memfd_alloc_max"], used)
            now = time.monotonic()
            if stop_seen is not None:
                # The load has ended, every file is closed: the last row shows what stays.
                # (FUSE RELEASE is asynchronous: allow the daemon a few seconds to get it.)
                idle = memfds == 0 and handles == 0 and gauge == 0
                stopping = idle or now - stop_seen > 5
                if not stopping:
                    time.sleep(0.1)
                    continue
            if now >= next_row or stopping:
                w.writerow({
                    "t_s": round(now - start, 1), "rss_kib": st["VmRSS"],
                    "rss_anon_kib": st.get("RssAnon", ""), "rss_file_kib": st.get("RssFile", ""),
                    "rss_shmem_kib": st.get("RssShmem", ""), "hwm_kib": st["VmHWM"],
                    "threads": st["Threads"], "fds": fds, "memfds": memfds,
                    "memfd_bytes": gauge, "memfd_alloc": used, **peak,
                    "memfd_dirty_bytes": int(m.get("spoolfs_memfd_dirty_bytes", 0)),
                    "open_handles": handles,
                    "inodes": int(m.get("spoolfs_inodes", 0)),
                    "db_bytes": int(m.get("spoolfs_db_size_bytes", 0)),
                    "requests": int(m.get("spoolfs_requests_total", 0)),
                    "request_errors": int(m.get("spoolfs_request_errors_total", 0)),
                    "queue_depth": int(m.get("spoolfs_actor_queue_depth", 0)),
                })
                out.flush()
                peak = {"memfd_bytes_max": 0, "memfd_alloc_max": 0}
                next_row += args.interval
            if stopping:
                return 0
            time.sleep(max(0.0, min(args.scrape, next_row - time.monotonic())))


# --- the verdict -------------------------------------------------------------------------


def slope(points):
    """Least-squares slope of [(x, y)]."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def report(args):
    """Print a short table and apply the memory criteria; exit 1 if one fails.

    memfd budget.  content.rs evicts a file (persists it and empties its memfd) at the end of
    any operation that leaves the memfds holding more than the budget, and the gauge
    spoolfs_memfd_bytes (chunks staged x 64 KiB) is set between batches, so the gauge must
    never exceed the budget: no slack.  The memory the memfds really hold (their st_blocks)
    is checked too, as the gauge is only the daemon's own bookkeeping:
      - its peak may exceed the budget by what one operation loads before the check (one
        max_write, 1 MiB, plus the chunk at its unaligned end), and the sampler's walk over
        the descriptors is not atomic (the actor may finish another operation meanwhile), so
        the bound is budget + 2 x (1 MiB + 64 KiB);
      - once the load has ended and every file is closed, no memfd is left (none leaked,
        nothing staged) and no handle is open.
    (With shmem transparent huge pages enabled, st_blocks could round up; the default is
    "never".)

    RSS flat.  The first 20% is warm-up (redb's page cache, allocator arenas, thread stacks
    fill up).  Then the largest RSS of the last third of the run must not exceed the largest
    of the middle third by more than 10% + 16 MiB.  Comparing maxima of windows (not single
    samples) ignores the saw-tooth of malloc, and the margin covers allocator noise and the
    page cache of a database whose size moves with the load; a leak of a few bytes per
    request (at thousands of requests per second, for minutes) exceeds it.  The smallest
    steady leak this catches is printed, with the slope of RSS after the warm-up.
    """
    with open(args.csv) as f:
        rows = [{k: float(v) if v else 0.0 for k, v in r.items()} for r in csv.DictReader(f)]
    if len(rows) < 6:
        print(f"soak: report: only {len(rows)} samples in {args.csv}; need at least 6",
              file=sys.stderr)
        return 1
    budget = args.budget
    ok = True

    print("soak:   t_s   rss_MiB  anon_MiB  memfd_max_MiB  memfd_alloc_MiB  fds  handles  "
          "inodes  db_MiB  req/s")
    step = max(1, len(rows) // 12)
    prev = rows[0]
    for i, r in enumerate(rows):
        if i % step and i != len(rows) - 1:
            continue
        dt = r["t_s"] - prev["t_s"]
        rate = (r["requests"] - prev["requests"]) / dt if dt > 0 else 0.0
        prev = r
        print(f"soak: {r['t_s']:5.0f} {r['rss_kib'] / KIB:9.1f} {r['rss_anon_kib'] / KIB:9.1f} "
              f"{r['memfd_bytes_max'] / MIB:14.2f} {r['memfd_alloc_max'] / MIB:16.2f} "
              f"{r['fds']:4.0f} {r['open_handles']:8.0f} {r['inodes']:7.0f} "
              f"{r['db_bytes'] / MIB:7.1f} {rate:6.0f}")

    gauge = max(r["memfd_bytes_max"] for r in rows)
    alloc = max(r["memfd_alloc_max"] for r in rows)
    alloc_bound = budget + 2 * (MAX_WRITE + CHUNK)
    print(f"soak: memfd budget {budget / MIB:.2f} MiB: gauge max {gauge / MIB:.2f} MiB "
          f"(bound {budget / MIB:.2f}), memfd memory max {alloc / MIB:.2f} MiB "
          f"(bound {alloc_bound / MIB:.2f})")
    if gauge > budget:
        print("soak: error: spoolfs_memfd_bytes exceeded the budget", file=sys.stderr)
        ok = False
    if alloc > alloc_bound:
        print("soak: error: the daemon's memfds held more than budget + one write",
              file=sys.stderr)
        ok = False
    end = rows[-1]
    print(f"soak: after the load: {end['memfds']:.0f} memfds holding {end['memfd_alloc']:.0f} "
          f"bytes, gauge {end['memfd_bytes']:.0f} bytes, {end['open_handles']:.0f} open handles")
    if end["memfds"] or end["memfd_alloc"] or end["memfd_bytes"] or end["open_handles"]:
        print("soak: error: memfds, staged bytes or handles left after every file was closed",
              file=sys.stderr)
        ok = False
    if gauge == 0:
        print("soak: error: nothing was ever staged in a memfd: the load did not exercise it",
              file=sys.stderr)
        ok = False

    t_end = rows[-1]["t_s"]
    warm = [r for r in rows if r["t_s"] >= 0.2 * t_end]
    mid = [r["rss_kib"] for r in rows if t_end / 3 <= r["t_s"] < 2 * t_end / 3]
    last = [r["rss_kib"] for r in rows if r["t_s"] >= 2 * t_end / 3]
    if not mid or not last:
        print("soak: error: too few samples for the RSS windows", file=sys.stderr)
        return 1
    mid_max, last_max = max(mid), max(last)
    margin = 0.10 * mid_max + 16 * KIB
    kib_per_min = slope([(r["t_s"] / 60, r["rss_kib"]) for r in warm])
    kib_per_min_last = slope([(r["t_s"] / 60, r["rss_kib"]) for r in rows
                              if r["t_s"] >= 2 * t_end / 3])
    reqs = rows[-1]["requests"] - warm[0]["requests"]
    req_rate = reqs / max(1.0, t_end - warm[0]["t_s"])
    # A steady leak shows as last_max - mid_max >= rate * (t_end / 3) at the least.
    catch_kib_s = margin / (t_end / 3)
    print(f"soak: RSS: max {mid_max / KIB:.1f} MiB in the middle third, {last_max / KIB:.1f} MiB "
          f"in the last (allowed {(mid_max + margin) / KIB:.1f}); after warm-up "
          f"{min(r['rss_kib'] for r in warm) / KIB:.1f}..{max(r['rss_kib'] for r in warm) / KIB:.1f}"
          f" MiB, slope {kib_per_min:+.1f} KiB/min ({kib_per_min_last:+.1f} in the last third); peak (VmHWM) {rows[-1]['hwm_kib'] / KIB:.1f} MiB")
    # RSS is mostly redb's page cache, which follows the database file: say if that grew.
    print(f"soak: database file {warm[0]['db_bytes'] / MIB:.1f} MiB after warm-up, "
          f"{rows[-1]['db_bytes'] / MIB:.1f} MiB at the end; "
          f"{rows[-1]['threads']:.0f} threads, {rows[-1]['fds']:.0f} descriptors at the end")
    print(f"soak: requests after warm-up: {reqs:.0f} ({req_rate:.0f}/s); a steady leak of "
          f"{catch_kib_s:.0f} KiB/s ({catch_kib_s * KIB / max(req_rate, 1):.0f} bytes/request) "
          f"or more fails the check")
    if last_max > mid_max + margin:
        print(f"soak: error: RSS grew: {last_max / KIB:.1f} MiB > {mid_max / KIB:.1f} MiB + "
              f"{margin / KIB:.1f} MiB", file=sys.stderr)
        ok = False
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("load")
    a.add_argument("--mount", required=True)
    a.add_argument("--seconds", type=float, required=True)
    a.add_argument("--budget", type=int, required=True)
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--writers", type=int, default=4)
    a.add_argument("--deliverers", type=int, default=2)
    a.add_argument("--metas", type=int, default=2)
    a.add_argument("--bigs", type=int, default=2)
    a.add_argument("--truncators", type=int, default=1)
    a.add_argument("--max-queued", type=int, default=200)
    a.add_argument("--big-factor", type=float, default=2.5,
                   help="big files grow to this many times the budget")
    m = sub.add_parser("monitor")
    m.add_argument("--pid", type=int, required=True)
    m.add_argument("--csv", required=True)
    m.add_argument("--stop", required=True)
    m.add_argument("--interval", type=float, default=10)
    m.add_argument("--scrape", type=float, default=1)
    r = sub.add_parser("report")
    r.add_argument("--csv", required=True)
    r.add_argument("--budget", type=int, required=True)
    args = ap.parse_args()
    return {"load": load, "monitor": monitor, "report": report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
