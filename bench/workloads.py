"""The workloads, written with os.* calls so that what is timed is (almost) only the system
calls a mail server makes.

Every function takes the directory to work in (on the filesystem under test) and returns a
dict of metric name -> value. They run in a child process (see bench.py: a hung FUSE mount
must not hang the driver), so they raise on any error and never catch OSError themselves:
an error on one filesystem is a finding, not something to paper over.

Paths: the workloads open a directory once and then use dir_fd-relative names, the way a
mail server that chdir()s into its spool does. With an absolute path every component would
cost spoolfs one extra LOOKUP round trip (its entry cache lifetime is zero), which would
measure path walking rather than the operation named in the table.
"""

import json
import math
import multiprocessing
import os
import queue
import random
import stat
import subprocess
import time

KIB = 1024
MIB = 1024 * KIB
WRITE_CHUNK = 4 * KIB  # the spec: messages are written in 4 KiB write() calls
MSG_MIN = 1 * KIB
MSG_MAX = 64 * KIB
PAYLOAD = 128 * KIB  # messages are slices of one seeded random buffer

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY
CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC


def now_ns():
    return time.perf_counter_ns()


def percentile(values, p):
    """Nearest-rank percentile (no interpolation: p99 of 1000 samples is the 990th)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))
    return s[k]


def message_sizes(seed, count):
    """Message sizes between 1 and 64 KiB with a mean of about 8 KiB.

    1 KiB plus an exponential tail of mean 7 KiB, capped at 64 KiB: most mail is small, a
    few messages are large. The cap cuts off e^-9 of the mass, so the mean stays ~8 KiB.
    Seeded, so every filesystem gets exactly the same messages.
    """
    rng = random.Random(seed)
    return [min(MSG_MAX, MSG_MIN + int(rng.expovariate(1.0 / (7 * KIB)))) for _ in range(count)]


def payload(seed):
    return random.Random(seed ^ 0x5A5A).randbytes(PAYLOAD)


def message_body(buf, index, size):
    """The bytes of message `index`: a slice of the payload, different for each message."""
    off = (index * 4099) % (PAYLOAD - MSG_MAX)
    return buf[off:off + size]


def mkdirs(root, *names):
    for n in names:
        os.makedirs(os.path.join(root, n), exist_ok=True)


def remove_tree(path):
    """Untimed cleanup between repeats (rm -rf without following symlinks)."""
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", path], check=True)


# --- (1) spool enqueue -------------------------------------------------------------------

def _enqueue_writer(root, writer, sizes, seed, barrier, results):
    """One writer process: for each message create tmp/NAME, write it in 4 KiB writes,
    fsync, close, rename to queue/NAME. Latency = open() to the end of rename()."""
    try:
        results.put(_enqueue_messages(root, writer, sizes, seed, barrier))
    except BaseException as e:  # report the errno to the parent instead of just dying
        results.put((writer, None, None, f"writer {writer}: {type(e).__name__}: {e}"))
        raise


def _enqueue_messages(root, writer, sizes, seed, barrier):
    buf = memoryview(payload(seed))
    tmp_fd = os.open(os.path.join(root, "tmp"), DIR_FLAGS)
    queue_fd = os.open(os.path.join(root, "queue"), DIR_FLAGS)
    lat = []
    barrier.wait(timeout=120)  # all start together, so 8 writers really are concurrent
    start = now_ns()
    for i, size in enumerate(sizes):
        name = f"{writer:02d}-{i:06d}-msg"  # unique per writer, like an Exim message id
        body = message_body(buf, writer * 100003 + i, size)
        t0 = now_ns()
        fd = os.open(name, CREATE_FLAGS, 0o600, dir_fd=tmp_fd)
        for off in range(0, size, WRITE_CHUNK):
            chunk = body[off:off + WRITE_CHUNK]
            if os.write(fd, chunk) != len(chunk):
                raise OSError(f"short write to tmp/{name} at offset {off}")
        os.fsync(fd)
        os.close(fd)
        os.rename(name, name, src_dir_fd=tmp_fd, dst_dir_fd=queue_fd)
        lat.append(now_ns() - t0)
    end = now_ns()
    os.close(tmp_fd)
    os.close(queue_fd)
    return (writer, start, end, lat)


def enqueue(root, writers, messages, seed):
    """Spool enqueue with `writers` concurrent processes sharing `messages` messages."""
    mkdirs(root, "tmp", "queue")
    sizes = message_sizes(seed, messages)
    per = [sizes[w::writers] for w in range(writers)]  # same total bytes for any writer count
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(writers)
    results = ctx.Queue()
    procs = [ctx.Process(target=_enqueue_writer, args=(root, w, per[w], seed, barrier, results))
             for w in range(writers)]
    for p in procs:
        p.start()
    got = []
    try:
        while len(got) < writers:
            try:
                got.append(results.get(timeout=1))
            except queue.Empty:
                # A writer that died (an exception, printed on stderr) never reports: stop
                # waiting for it instead of waiting for the hang timeout.
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.exitcode is None:
                p.kill()
                p.join()
    errors = [g[3] for g in got if g[1] is None]
    if errors:
        raise RuntimeError("enqueue: " + "; ".join(errors))
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad or len(got) != writers:
        raise RuntimeError(f"enqueue writer(s) failed: exit codes {bad}")
    start = min(g[1] for g in got)
    end = max(g[2] for g in got)
    lat = [x for g in got for x in g[3]]
    queued = len(os.listdir(os.path.join(root, "queue")))
    if queued != messages:
        raise RuntimeError(f"enqueue: {queued} messages in queue/, expected {messages}")
    wall = (end - start) / 1e9
    return {
        "msgs_per_s": messages / wall,
        "p50_ms": percentile(lat, 50) / 1e6,
        "p99_ms": percentile(lat, 99) / 1e6,
        "mib_per_s": sum(sizes) / MIB / wall,
    }


# --- (2) spool delivery ------------------------------------------------------------------

def delivery_prepare(root, messages, seed):
    """Fill queue/ with `messages` messages (untimed; no fsync, one sync() at the end so the
    timed phase starts with nothing dirty). Returns the expected sizes by name."""
    mkdirs(root, "queue")
    buf = memoryview(payload(seed))
    qfd = os.open(os.path.join(root, "queue"), DIR_FLAGS)
    for i, size in enumerate(message_sizes(seed, messages)):
        fd = os.open(f"m{i:06d}", CREATE_FLAGS, 0o600, dir_fd=qfd)
        body = message_body(buf, i, size)
        for off in range(0, size, WRITE_CHUNK):
            os.write(fd, body[off:off + WRITE_CHUNK])
        os.close(fd)
    os.close(qfd)
    os.sync()


def delivery(root, messages, seed):
    """Spool delivery: readdir queue/, then per message open, read to EOF, close, unlink.
    Every message's bytes are checked afterwards (outside the timing): a delivery that
    returns wrong data is a bug, not a fast run."""
    qpath = os.path.join(root, "queue")
    buf = memoryview(payload(seed))
    sizes = message_sizes(seed, messages)
    qfd = os.open(qpath, DIR_FLAGS)
    lat = []
    got = {}
    start = now_ns()
    names = os.listdir(qfd)  # readdir of the whole queue, as a queue runner does
    listed = now_ns()
    for name in names:
        t0 = now_ns()
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=qfd)
        parts = []
        while True:
            b = os.read(fd, 64 * KIB)
            if not b:
                break
            parts.append(b)
        os.close(fd)
        os.unlink(name, dir_fd=qfd)
        lat.append(now_ns() - t0)
        got[name] = parts
    end = now_ns()
    os.close(qfd)
    if len(names) != messages:
        raise RuntimeError(f"delivery: readdir listed {len(names)} messages, expected {messages}")
    for name, parts in got.items():
        i = int(name[1:])
        if b"".join(parts) != message_body(buf, i, sizes[i]):
            data = b"".join(parts)
            raise RuntimeError(f"delivery: queue/{name} read back {len(data)} bytes that differ "
                               f"from the {sizes[i]} bytes written")
    left = os.listdir(qpath)
    if left:
        raise RuntimeError(f"delivery: {len(left)} entries left in queue/ after unlinking all")
    wall = (end - start) / 1e9
    return {
        "msgs_per_s": messages / wall,
        "p50_ms": percentile(lat, 50) / 1e6,
        "p99_ms": percentile(lat, 99) / 1e6,
        "readdir_ms": (listed - start) / 1e6,
    }


# --- (3) metadata ------------------------------------------------------------------------

def metadata(root, files, seed):
    """create, stat, readdir and unlink of `files` empty files in one directory.

    stat and unlink go in a seeded random order (a queue runner does not visit files in
    creation order, and hash-ordered directories should not get an easy ride)."""
    os.makedirs(root, exist_ok=True)
    dfd = os.open(root, DIR_FLAGS)
    names = [f"{i:016x}" for i in range(files)]  # 16 chars, like a mail queue id
    order = names[:]
    random.Random(seed).shuffle(order)
    out = {}

    t0 = now_ns()
    for n in names:
        os.close(os.open(n, CREATE_FLAGS, 0o644, dir_fd=dfd))
    out["create_per_s"] = files / ((now_ns() - t0) / 1e9)

    t0 = now_ns()
    for n in order:
        os.stat(n, dir_fd=dfd, follow_symlinks=False)
    out["stat_per_s"] = files / ((now_ns() - t0) / 1e9)

    t0 = now_ns()
    with os.scandir(root) as it:  # getdents only: d_type comes with the entry, no stat
        listed = sum(1 for _ in it)
    out["readdir_entries_per_s"] = files / ((now_ns() - t0) / 1e9)
    if listed != files:
        raise RuntimeError(f"metadata: readdir listed {listed} entries, expected {files}")

    t0 = now_ns()
    for n in order:
        os.unlink(n, dir_fd=dfd)
    out["unlink_per_s"] = files / ((now_ns() - t0) / 1e9)
    left = os.listdir(root)
    if left:
        raise RuntimeError(f"metadata: {len(left)} entries left after unlinking all")

    # Not a target, a diagnosis: creating the same files with mknod() involves no open
    # file, so no close(). On spoolfs close() (FLUSH) is a durability barrier; the gap
    # between this rate and "create" is what that barrier costs.
    t0 = now_ns()
    for n in names:
        os.mknod(n, 0o644 | stat.S_IFREG, dir_fd=dfd)
    out["mknod_per_s"] = files / ((now_ns() - t0) / 1e9)
    for n in names:
        os.unlink(n, dir_fd=dfd)
    os.close(dfd)
    os.rmdir(root)
    return out


# --- (3b) create cost as a directory grows -----------------------------------------------

def dirsize_fill(root, start, end, progress=None):
    """Grow the directory from `start` to `end` empty files (untimed). Returns seconds."""
    os.makedirs(root, exist_ok=True)
    dfd = os.open(root, DIR_FLAGS)
    t0 = time.monotonic()
    for i in range(start, end):
        os.close(os.open(f"e{i:015d}", CREATE_FLAGS, 0o644, dir_fd=dfd))
        if progress and (i + 1) % 100000 == 0:
            progress(i + 1)
    os.close(dfd)
    return time.monotonic() - t0


def dirsize_measure(root, size, batch, rep):
    """Create `batch` new files in a directory that holds `size` entries; report the mean
    cost of one create. The batch is unlinked again (untimed) so the size stays exact."""
    dfd = os.open(root, DIR_FLAGS)
    names = [f"n{rep:02d}{i:013d}" for i in range(batch)]
    lat = []
    t0 = now_ns()
    for n in names:
        a = now_ns()
        os.close(os.open(n, CREATE_FLAGS, 0o644, dir_fd=dfd))
        lat.append(now_ns() - a)
    total = now_ns() - t0
    for n in names:
        os.unlink(n, dir_fd=dfd)
    os.close(dfd)
    return {
        "create_us": total / batch / 1e3,
        "create_per_s": batch / (total / 1e9),
        "create_p99_us": percentile(lat, 99) / 1e3,
    }


# --- (4) data, with fio ------------------------------------------------------------------

def drop_caches():
    """Write back and drop the page cache, dentries and inodes ("cold"). For spoolfs this
    also drops the cached pages of its redb file on the data disk."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fio(path, rw, bs, size, runtime_s=None, log=None):
    """One fio job on one file; returns the parsed job.

    psync (one pread/pwrite per block, like an application), invalidate=0 (fio would
    otherwise fadvise(DONTNEED) the file first and every "warm" read would be cold; cold
    runs drop caches explicitly instead), fallocate=none (write the file, do not reserve
    it), end_fsync=1 on writes (durable data is the product; fio's runtime includes it)."""
    cmd = ["fio", "--output-format=json", "--name=" + rw, "--filename=" + path,
           "--rw=" + rw, "--bs=" + bs, "--size=" + str(size), "--ioengine=psync",
           "--invalidate=0", "--fallocate=none", "--randrepeat=1", "--numjobs=1"]
    if rw in ("write", "randwrite"):
        cmd.append("--end_fsync=1")
    if runtime_s:
        cmd += ["--time_based=1", f"--runtime={runtime_s}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if log is not None:
        log.append({"cmd": cmd, "stderr": p.stderr[-2000:]})
    if p.returncode != 0:
        raise RuntimeError(f"fio {rw} bs={bs} on {path} failed ({p.returncode}): "
                           f"{p.stderr.strip()[-500:]}")
    # fio may print warnings before the JSON document
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio {rw} bs={bs} on {path}: error {job['error']}")
    return job


def data(root, size, rand_seconds):
    """Sequential write and read (128 KiB and 1 MiB blocks) and 4 KiB random reads.

    Cold = after dropping caches; warm = the file was read once before (the spec's
    definition). Each write makes a new file, so no run overwrites a cached one."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "bigfile")
    out = {}
    log = []

    def mbps(job, d):
        return job[d]["bw_bytes"] / 1e6

    for bs, tag in (("128k", "128k"), ("1m", "1m")):
        if os.path.exists(path):
            os.unlink(path)
        os.sync()
        out[f"seqwrite_{tag}_mbps"] = mbps(fio(path, "write", bs, size, log=log), "write")
        if os.path.getsize(path) != size:
            raise RuntimeError(f"data: {path} has {os.path.getsize(path)} bytes after writing "
                               f"{size}")
        drop_caches()
        out[f"seqread_cold_{tag}_mbps"] = mbps(fio(path, "read", bs, size, log=log), "read")
        out[f"seqread_warm_{tag}_mbps"] = mbps(fio(path, "read", bs, size, log=log), "read")
        if tag == "128k":
            # The file has just been read twice in full: random reads now are warm.
            j = fio(path, "randread", "4k", size, runtime_s=rand_seconds, log=log)
            out["randread_warm_4k_iops"] = j["read"]["iops"]
            drop_caches()
            j = fio(path, "randread", "4k", size, runtime_s=rand_seconds, log=log)
            out["randread_cold_4k_iops"] = j["read"]["iops"]
    os.unlink(path)
    return out
