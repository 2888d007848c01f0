//! The FUSE adapter: each fuser callback turns the kernel request into one message for the
//! actor, with the fuser reply object captured in its responder. No filesystem state here.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use spoolfs_core::{Errno, Fh, Ino, Inode, Kind, SetAttr, SetTime, Timestamp};
use std::sync::Arc;

use crate::handoff::{Handoff, Waited};
use spoolfs_runtime::metrics::Metrics;
use spoolfs_runtime::pinning::ActorPlacement;
use spoolfs_runtime::{ActorHandle, Caller, Msg, Op, Reply, Responder};
use tracing::warn;

/// How long the kernel may cache entries and attributes: a day, as libfuse's passthrough_hp
/// does by default. On a single node every change reaches the filesystem through this kernel,
/// which updates or drops its own cached entries and attributes for the inodes and
/// directories an operation touches (unlink, rename, link, setattr, write); the one race it
/// leaves (an older answer about a directory cached over its change) the actor closes with
/// an invalidation (see the runtime's `dir_attrs`). pjdfstest's ctime/nlink checks and fsx
/// pass with this value, and `stat` of a known file costs no request. (atime is not updated
/// by reads, so it cannot go stale either.) Changes applied from elsewhere (replication) must
/// invalidate through the notify pool.
const TTL: Duration = Duration::from_secs(86_400);

/// Keep the kernel's page cache of a file across opens. As with the TTL above: on a single
/// node all content changes pass through this kernel's page cache (writes, truncates, hole
/// punches), so cached pages cannot be stale; remote changes will go through
/// `notify_inval_inode` from the notify pool.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE;

/// Largest write the kernel sends in one request.
const MAX_WRITE: u32 = 1 << 20;

pub struct Adapter {
    actor: ActorHandle,
    /// `None` with `--metrics-addr off`: nobody can read them, so nothing is recorded (this
    /// is also how the cost of recording is measured).
    metrics: Option<Arc<Metrics>>,
    /// How long a FUSE thread waits for the actor's answer to write the reply itself (see
    /// `handoff`); zero: the actor writes every reply.
    handoff_wait: Duration,
    /// `-o writeback_cache` was asked for; after `init`, whether the kernel accepted it.
    writeback_cache: bool,
    /// The actor's CPU, which FUSE threads keep off while it is pinned (see `pinning`).
    placement: Arc<ActorPlacement>,
}

impl Adapter {
    pub fn new(
        actor: ActorHandle,
        metrics: Option<Arc<Metrics>>,
        handoff_wait: Duration,
        writeback_cache: bool,
        placement: Arc<ActorPlacement>,
    ) -> Self {
        Adapter {
            actor,
            metrics,
            handoff_wait,
            writeback_cache,
            placement,
        }
    }

    /// Open flags as the core should see them. With the writeback cache the kernel fills
    /// partly written pages by reading through whatever handle it writes back with, write-only
    /// ones included, so those are opened read-write (as libfuse's passthrough does). Users
    /// gain nothing: the kernel still refuses `read()` on their write-only descriptors.
    fn open_flags(&self, flags: i32) -> i32 {
        if self.writeback_cache && flags & libc::O_ACCMODE == libc::O_WRONLY {
            (flags & !libc::O_ACCMODE) | libc::O_RDWR
        } else {
            flags
        }
    }

    fn send(
        &self,
        req: &Request,
        op: Op,
        reply: impl FnOnce(Result<Reply, Errno>) + Send + 'static,
    ) {
        let received = Instant::now();
        self.placement.keep_off();
        let Some(metrics) = self.metrics.clone() else {
            self.hand_off(req, op, reply, received);
            return;
        };
        // Per-request metrics: handles are indexed by operation, so this is a few atomics.
        let index = op.index();
        let name = op.name();
        metrics.in_flight.inc();
        let reply = move |r: Result<Reply, Errno>| {
            metrics.in_flight.dec();
            if let Some(m) = metrics.op(index) {
                m.requests.inc();
                m.duration.observe(received.elapsed().as_secs_f64());
            }
            if let Err(e) = &r {
                metrics.record_error(name, e.name());
            }
            reply(r);
        };
        self.hand_off(req, op, reply, received);
    }

    /// Send the request to the actor; unless its answer may wait for a commit, wait briefly
    /// for the answer and write the reply on this thread (see `handoff`).
    fn hand_off(
        &self,
        req: &Request,
        op: Op,
        reply: impl FnOnce(Result<Reply, Errno>) + Send + 'static,
        received: Instant,
    ) {
        // Only a request that finds the actor idle is waited for: with others queued ahead of it
        // the answer takes longer, and this thread is better spent reading the next request.
        // Releases are not (nobody waits for their answer); a barrier's answer may wait for a
        // commit, and then the actor says so (`Msg::later`) and the wait ends at once.
        let wait = !self.handoff_wait.is_zero() && !op.releases() && self.actor.queue_depth() == 0;
        let handoff = wait.then(Handoff::new);
        let responder: Responder = match &handoff {
            Some(h) => {
                let answer = h.clone();
                Box::new(move |r| answer.deliver(Box::new(move || reply(r))))
            }
            None => Box::new(reply),
        };
        self.actor.send(Msg {
            caller: caller(req),
            op,
            reply: responder,
            queued: received,
            later: handoff.as_ref().map(|h| h.later_flag()),
        });
        let Some(handoff) = handoff else {
            return;
        };
        let waited = handoff.wait(self.handoff_wait);
        if let Some(m) = &self.metrics {
            match waited {
                Waited::WrittenHere => m.handoff_by_fuse_thread.inc(),
                Waited::AfterCommit => m.handoff_after_commit.inc(),
                Waited::TooSlow => m.handoff_left_to_actor.inc(),
            };
        }
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        unique: req.unique().0,
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn errno(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e.0)
}

fn ino(i: INodeNo) -> Ino {
    Ino(i.0)
}

fn fh(f: FileHandle) -> Fh {
    Fh(f.0)
}

fn name(n: &OsStr) -> Vec<u8> {
    n.as_bytes().to_vec()
}

fn system_time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs.unsigned_abs(), t.nanos)
    } else {
        UNIX_EPOCH - Duration::new(t.secs.unsigned_abs(), 0) + Duration::new(0, t.nanos)
    }
}

/// `-secs` as an i64, saturating (so 2^63 s before the epoch is i64::MIN, not MIN + 1).
fn neg_secs(secs: u64) -> i64 {
    i64::try_from(-i128::from(secs)).unwrap_or(i64::MIN)
}

fn timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp::new(
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(before) => {
            // Before the epoch: floor to whole seconds plus a positive nanosecond part.
            let d = before.duration();
            if d.subsec_nanos() == 0 {
                Timestamp::new(neg_secs(d.as_secs()), 0)
            } else {
                Timestamp::new(
                    neg_secs(d.as_secs()).saturating_sub(1),
                    1_000_000_000 - d.subsec_nanos(),
                )
            }
        }
    }
}

/// A time from a SETATTR request. fuser 0.18 decodes a pre-epoch kernel timespec
/// `(-S, n)` as `UNIX_EPOCH - (S s + n ns)` instead of `UNIX_EPOCH - S s + n ns` (its
/// `system_time_from_time`; fixed upstream in cberner/fuser#705), so `utimensat` with e.g.
/// `(-2, 5e8)` would be stored as `(-3, 5e8)`. Undo that here: the duration before the
/// epoch is exactly `S s + n ns`. Drop this (use `timestamp`) once fuser has the fix.
fn request_timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(_) => timestamp(t),
        Err(before) => {
            let d = before.duration();
            Timestamp::new(neg_secs(d.as_secs()), d.subsec_nanos())
        }
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(request_timestamp(t)),
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

pub fn file_attr(i: &Inode) -> FileAttr {
    FileAttr {
        ino: INodeNo(i.ino.0),
        size: i.size,
        blocks: i.size.div_ceil(512),
        atime: system_time(i.atime),
        mtime: system_time(i.mtime),
        ctime: system_time(i.ctime),
        crtime: system_time(i.crtime),
        kind: file_type(i.kind),
        perm: (i.perm & 0o7777) as u16,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// A reply of the wrong shape for the request is a bug in the actor; answer EIO, never panic.
fn mismatch(op: &str, r: &Reply) -> fuser::Errno {
    warn!(op, reply = ?r, "actor answered with an unexpected reply kind");
    fuser::Errno::EIO
}

fn entry_reply(reply: ReplyEntry) -> impl FnOnce(Result<Reply, Errno>) + Send {
    move |r| match r {
        Ok(Reply::Entry(i)) => reply.entry(&TTL, &file_attr(&i), Generation(0)),
        Ok(other) => reply.error(mismatch("entry", &other)),
        Err(e) => reply.error(errno(e)),
    }
}

fn attr_reply(reply: ReplyAttr) -> impl FnOnce(Result<Reply, Errno>) + Send {
    move |r| match r {
        Ok(Reply::Attr(i)) => reply.attr(&TTL, &file_attr(&i)),
        Ok(other) => reply.error(mismatch("attr", &other)),
        Err(e) => reply.error(errno(e)),
    }
}

fn empty_reply(reply: ReplyEmpty) -> impl FnOnce(Result<Reply, Errno>) + Send {
    move |r| match r {
        Ok(Reply::Empty) => reply.ok(),
        Ok(other) => reply.error(mismatch("empty", &other)),
        Err(e) => reply.error(errno(e)),
    }
}

fn data_reply(reply: ReplyData) -> impl FnOnce(Result<Reply, Errno>) + Send {
    move |r| match r {
        Ok(Reply::Data(d)) => reply.data(&d),
        Ok(other) => reply.error(mismatch("data", &other)),
        Err(e) => reply.error(errno(e)),
    }
}

fn open_reply(reply: ReplyOpen) -> impl FnOnce(Result<Reply, Errno>) + Send {
    move |r| match r {
        Ok(Reply::Opened(f)) => reply.opened(FileHandle(f.0), OPEN_FLAGS),
        Ok(other) => reply.error(mismatch("open", &other)),
        Err(e) => reply.error(errno(e)),
    }
}

fn xattr_reply(reply: ReplyXattr) -> impl FnOnce(Result<Reply, Errno>) + Send {
    move |r| match r {
        Ok(Reply::XattrSize(n)) => reply.size(n),
        Ok(Reply::Data(d)) => reply.data(&d),
        Ok(other) => reply.error(mismatch("xattr", &other)),
        Err(e) => reply.error(errno(e)),
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(max);
        }
        // The filesystem drops set-ID bits and capabilities itself (on writes the kernel flags,
        // chown and truncate: `Fs::setattr`, `Fs::kill_privileges`). The kernel then marks
        // inodes S_NOSEC after their first write instead of asking
        // getxattr("security.capability") before every write: a round trip per write saved.
        // Refused by an older kernel: then it keeps doing the check itself.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        if self.writeback_cache {
            if let Err(refused) = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE) {
                warn!(
                    ?refused,
                    "the kernel does not offer the writeback cache; -o writeback_cache is \
                     ignored and writes go to the daemon one by one"
                );
                self.writeback_cache = false;
            }
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEntry) {
        let op = Op::Lookup {
            parent: ino(parent),
            name: name(n),
        };
        self.send(req, op, entry_reply(reply));
    }

    fn forget(&self, req: &Request, i: INodeNo, nlookup: u64) {
        self.send(
            req,
            Op::Forget {
                nodes: vec![(ino(i), nlookup)],
            },
            |_| {},
        );
    }

    // batch_forget: fuser 0.18 keeps `ForgetOne` private, so its default (one `forget` per
    // node) is used.

    fn getattr(&self, req: &Request, i: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.send(req, Op::GetAttr { ino: ino(i) }, attr_reply(reply));
    }

    fn setattr(
        &self,
        req: &Request,
        i: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        f: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime: ctime.map(request_timestamp),
            fh: f.map(fh),
        };
        self.send(req, Op::SetAttr { ino: ino(i), set }, attr_reply(reply));
    }

    fn readlink(&self, req: &Request, i: INodeNo, reply: ReplyData) {
        self.send(req, Op::ReadLink { ino: ino(i) }, data_reply(reply));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let op = Op::MkNod {
            parent: ino(parent),
            name: name(n),
            mode,
            rdev,
        };
        self.send(req, op, entry_reply(reply));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let op = Op::MkDir {
            parent: ino(parent),
            name: name(n),
            mode,
        };
        self.send(req, op, entry_reply(reply));
    }

    fn unlink(&self, req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let op = Op::Unlink {
            parent: ino(parent),
            name: name(n),
        };
        self.send(req, op, empty_reply(reply));
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let op = Op::RmDir {
            parent: ino(parent),
            name: name(n),
        };
        self.send(req, op, empty_reply(reply));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, n: &OsStr, target: &Path, reply: ReplyEntry) {
        let op = Op::Symlink {
            parent: ino(parent),
            name: name(n),
            target: target.as_os_str().as_bytes().to_vec(),
        };
        self.send(req, op, entry_reply(reply));
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !(flags - (RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE)).is_empty() {
            // RENAME_WHITEOUT is for overlay filesystems.
            reply.error(fuser::Errno::EINVAL);
            return;
        }
        let op = Op::Rename {
            parent: ino(parent),
            name: name(n),
            new_parent: ino(new_parent),
            new_name: name(new_name),
            flags: spoolfs_core::RenameFlags {
                noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
                exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
            },
        };
        self.send(req, op, empty_reply(reply));
    }

    fn link(
        &self,
        req: &Request,
        i: INodeNo,
        new_parent: INodeNo,
        new_name: &OsStr,
        reply: ReplyEntry,
    ) {
        let op = Op::Link {
            ino: ino(i),
            new_parent: ino(new_parent),
            new_name: name(new_name),
        };
        self.send(req, op, entry_reply(reply));
    }

    fn open(&self, req: &Request, i: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.send(
            req,
            Op::Open {
                ino: ino(i),
                flags: self.open_flags(flags.0),
            },
            open_reply(reply),
        );
    }

    fn read(
        &self,
        req: &Request,
        i: INodeNo,
        f: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let op = Op::Read {
            ino: ino(i),
            fh: fh(f),
            offset,
            size,
        };
        self.send(req, op, data_reply(reply));
    }

    fn write(
        &self,
        req: &Request,
        i: INodeNo,
        f: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let op = Op::Write {
            ino: ino(i),
            fh: fh(f),
            offset,
            data: data.to_vec(),
            kill_privileges: write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID),
        };
        self.send(req, op, move |r| match r {
            Ok(Reply::Written(n)) => reply.written(n),
            Ok(other) => reply.error(mismatch("write", &other)),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn flush(
        &self,
        req: &Request,
        i: INodeNo,
        f: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.send(
            req,
            Op::Flush {
                ino: ino(i),
                fh: fh(f),
            },
            empty_reply(reply),
        );
    }

    fn release(
        &self,
        req: &Request,
        i: INodeNo,
        f: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.send(
            req,
            Op::Release {
                ino: ino(i),
                fh: fh(f),
            },
            empty_reply(reply),
        );
    }

    fn fsync(&self, req: &Request, i: INodeNo, f: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.send(
            req,
            Op::Fsync {
                ino: ino(i),
                fh: fh(f),
            },
            empty_reply(reply),
        );
    }

    fn opendir(&self, req: &Request, i: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.send(req, Op::OpenDir { ino: ino(i) }, open_reply(reply));
    }

    fn readdir(
        &self,
        req: &Request,
        i: INodeNo,
        f: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let op = Op::ReadDir {
            ino: ino(i),
            fh: fh(f),
            offset,
        };
        self.send(req, op, move |r| match r {
            Ok(Reply::Dir(entries)) => {
                for (off, e) in entries {
                    if reply.add(
                        INodeNo(e.ino.0),
                        off,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Ok(other) => reply.error(mismatch("readdir", &other)),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn releasedir(
        &self,
        req: &Request,
        i: INodeNo,
        f: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.send(
            req,
            Op::ReleaseDir {
                ino: ino(i),
                fh: fh(f),
            },
            empty_reply(reply),
        );
    }

    fn fsyncdir(
        &self,
        req: &Request,
        i: INodeNo,
        f: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.send(
            req,
            Op::FsyncDir {
                ino: ino(i),
                fh: fh(f),
            },
            empty_reply(reply),
        );
    }

    fn statfs(&self, req: &Request, _i: INodeNo, reply: ReplyStatfs) {
        self.send(req, Op::StatFs, move |r| match r {
            Ok(Reply::Statfs(s)) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Ok(other) => reply.error(mismatch("statfs", &other)),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn setxattr(
        &self,
        req: &Request,
        i: INodeNo,
        n: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let op = Op::SetXattr {
            ino: ino(i),
            name: name(n),
            value: value.to_vec(),
            flags,
        };
        self.send(req, op, empty_reply(reply));
    }

    fn getxattr(&self, req: &Request, i: INodeNo, n: &OsStr, size: u32, reply: ReplyXattr) {
        let op = Op::GetXattr {
            ino: ino(i),
            name: name(n),
            size,
        };
        self.send(req, op, xattr_reply(reply));
    }

    fn listxattr(&self, req: &Request, i: INodeNo, size: u32, reply: ReplyXattr) {
        self.send(req, Op::ListXattr { ino: ino(i), size }, xattr_reply(reply));
    }

    fn removexattr(&self, req: &Request, i: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let op = Op::RemoveXattr {
            ino: ino(i),
            name: name(n),
        };
        self.send(req, op, empty_reply(reply));
    }

    fn access(&self, req: &Request, i: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let op = Op::Access {
            ino: ino(i),
            mask: mask.bits(),
        };
        self.send(req, op, empty_reply(reply));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let op = Op::Create {
            parent: ino(parent),
            name: name(n),
            mode,
            flags: self.open_flags(flags),
        };
        self.send(req, op, move |r| match r {
            Ok(Reply::Created(i, f)) => reply.created(
                &TTL,
                &file_attr(&i),
                Generation(0),
                FileHandle(f.0),
                OPEN_FLAGS,
            ),
            Ok(other) => reply.error(mismatch("create", &other)),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn fallocate(
        &self,
        req: &Request,
        i: INodeNo,
        f: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let op = Op::Fallocate {
            ino: ino(i),
            fh: fh(f),
            offset,
            length,
            mode,
        };
        self.send(req, op, empty_reply(reply));
    }

    /// No ioctls are supported: ENOTTY, the answer a regular file on a local filesystem gives
    /// for an unknown ioctl (Python's `open()` probes one per file). fuser's default logs a
    /// warning for each, which flooded the log under load.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(fuser::Errno::ENOTTY);
    }

    fn lseek(
        &self,
        req: &Request,
        i: INodeNo,
        f: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let op = Op::Lseek {
            ino: ino(i),
            fh: fh(f),
            offset,
            whence,
        };
        self.send(req, op, move |r| match r {
            Ok(Reply::Offset(o)) => reply.offset(o),
            Ok(other) => reply.error(mismatch("lseek", &other)),
            Err(e) => reply.error(errno(e)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_through_system_time() {
        for t in [
            Timestamp::new(0, 0),
            Timestamp::new(1_700_000_000, 123_456_789),
            Timestamp::new(-1, 500),
            Timestamp::new(-12345, 999_999_999),
        ] {
            assert_eq!(timestamp(system_time(t)), t);
        }
    }

    #[test]
    fn request_times_undo_fusers_pre_epoch_decoding() {
        // What fuser 0.18 hands us for the kernel timespec (-2, 500_000_000).
        let decoded = UNIX_EPOCH - Duration::new(2, 500_000_000);
        assert_eq!(request_timestamp(decoded), Timestamp::new(-2, 500_000_000));
        let decoded = UNIX_EPOCH - Duration::new(5, 0);
        assert_eq!(request_timestamp(decoded), Timestamp::new(-5, 0));
        let after = UNIX_EPOCH + Duration::new(7, 9);
        assert_eq!(request_timestamp(after), Timestamp::new(7, 9));
    }
}
