//! The messages FUSE threads send to the actor: one variant per operation, each carrying the
//! responder that answers the kernel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use spoolfs_core::{DirEntry, Errno, Fh, Ino, Inode, RenameFlags, SetAttr};

/// Answers one request. Called exactly once; the adapter maps the `Reply` onto the fuser reply
/// object it captured. (A responder dropped unused makes fuser answer EIO, so the kernel never
/// waits forever.)
pub type Responder = Box<dyn FnOnce(Result<Reply, Errno>) + Send>;

/// Every operation's name, in `Op::index` order.
pub const OP_NAMES: [&str; 32] = [
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "create",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "releasedir",
    "fsyncdir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "access",
    "fallocate",
    "lseek",
    "status",
];

#[derive(Debug)]
pub enum Op {
    Lookup {
        parent: Ino,
        name: Vec<u8>,
    },
    Forget {
        nodes: Vec<(Ino, u64)>,
    },
    GetAttr {
        ino: Ino,
    },
    SetAttr {
        ino: Ino,
        set: SetAttr,
    },
    ReadLink {
        ino: Ino,
    },
    MkNod {
        parent: Ino,
        name: Vec<u8>,
        mode: u32,
        rdev: u32,
    },
    MkDir {
        parent: Ino,
        name: Vec<u8>,
        mode: u32,
    },
    Unlink {
        parent: Ino,
        name: Vec<u8>,
    },
    RmDir {
        parent: Ino,
        name: Vec<u8>,
    },
    Symlink {
        parent: Ino,
        name: Vec<u8>,
        target: Vec<u8>,
    },
    Rename {
        parent: Ino,
        name: Vec<u8>,
        new_parent: Ino,
        new_name: Vec<u8>,
        flags: RenameFlags,
    },
    Link {
        ino: Ino,
        new_parent: Ino,
        new_name: Vec<u8>,
    },
    Open {
        ino: Ino,
        flags: i32,
    },
    Create {
        parent: Ino,
        name: Vec<u8>,
        mode: u32,
        flags: i32,
    },
    Read {
        ino: Ino,
        fh: Fh,
        offset: u64,
        size: u32,
    },
    Write {
        ino: Ino,
        fh: Fh,
        offset: u64,
        data: Vec<u8>,
        /// The kernel asks to drop set-ID bits and capabilities first
        /// (`FUSE_WRITE_KILL_SUIDGID`: the writer lacks CAP_FSETID).
        kill_privileges: bool,
    },
    Flush {
        ino: Ino,
        fh: Fh,
    },
    Release {
        ino: Ino,
        fh: Fh,
    },
    Fsync {
        ino: Ino,
        fh: Fh,
    },
    OpenDir {
        ino: Ino,
    },
    ReadDir {
        ino: Ino,
        fh: Fh,
        offset: u64,
    },
    ReleaseDir {
        ino: Ino,
        fh: Fh,
    },
    FsyncDir {
        ino: Ino,
        fh: Fh,
    },
    StatFs,
    SetXattr {
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
    },
    GetXattr {
        ino: Ino,
        name: Vec<u8>,
        size: u32,
    },
    ListXattr {
        ino: Ino,
        size: u32,
    },
    RemoveXattr {
        ino: Ino,
        name: Vec<u8>,
    },
    Access {
        ino: Ino,
        mask: i32,
    },
    Fallocate {
        ino: Ino,
        fh: Fh,
        offset: u64,
        length: u64,
        mode: i32,
    },
    Lseek {
        ino: Ino,
        fh: Fh,
        offset: i64,
        whence: i32,
    },
    /// Operator status (the `status` command): answered with `Reply::Status`.
    Status,
}

impl Op {
    /// Position of the operation in `OP_NAMES` (indexes per-operation metric handles).
    pub fn index(&self) -> usize {
        match self {
            Op::Lookup { .. } => 0,
            Op::Forget { .. } => 1,
            Op::GetAttr { .. } => 2,
            Op::SetAttr { .. } => 3,
            Op::ReadLink { .. } => 4,
            Op::MkNod { .. } => 5,
            Op::MkDir { .. } => 6,
            Op::Unlink { .. } => 7,
            Op::RmDir { .. } => 8,
            Op::Symlink { .. } => 9,
            Op::Rename { .. } => 10,
            Op::Link { .. } => 11,
            Op::Open { .. } => 12,
            Op::Create { .. } => 13,
            Op::Read { .. } => 14,
            Op::Write { .. } => 15,
            Op::Flush { .. } => 16,
            Op::Release { .. } => 17,
            Op::Fsync { .. } => 18,
            Op::OpenDir { .. } => 19,
            Op::ReadDir { .. } => 20,
            Op::ReleaseDir { .. } => 21,
            Op::FsyncDir { .. } => 22,
            Op::StatFs => 23,
            Op::SetXattr { .. } => 24,
            Op::GetXattr { .. } => 25,
            Op::ListXattr { .. } => 26,
            Op::RemoveXattr { .. } => 27,
            Op::Access { .. } => 28,
            Op::Fallocate { .. } => 29,
            Op::Lseek { .. } => 30,
            Op::Status => 31,
        }
    }

    /// The FUSE operation name, for logs and metric labels.
    pub fn name(&self) -> &'static str {
        OP_NAMES[self.index()]
    }

    /// Operations that change the namespace (made durable before replying under `dirsync`).
    pub fn is_namespace(&self) -> bool {
        matches!(
            self,
            Op::MkNod { .. }
                | Op::MkDir { .. }
                | Op::Unlink { .. }
                | Op::RmDir { .. }
                | Op::Symlink { .. }
                | Op::Rename { .. }
                | Op::Link { .. }
                | Op::Create { .. }
        )
    }

    /// The directories whose attributes (link count, mtime, ctime) this namespace change
    /// alters without the kernel learning their new values: its reply carries the new
    /// entry's attributes, not theirs. The kernel only marks its cached copy stale, which
    /// does not stop an answer to an older GETATTR or LOOKUP that is still on its way from
    /// being cached over it for the whole TTL (see `dir_attrs`).
    pub fn changed_dirs(&self) -> [Option<Ino>; 2] {
        match self {
            Op::MkNod { parent, .. }
            | Op::MkDir { parent, .. }
            | Op::Unlink { parent, .. }
            | Op::RmDir { parent, .. }
            | Op::Symlink { parent, .. }
            | Op::Create { parent, .. } => [Some(*parent), None],
            Op::Link { new_parent, .. } => [Some(*new_parent), None],
            Op::Rename {
                parent, new_parent, ..
            } => [Some(*parent), (new_parent != parent).then_some(*new_parent)],
            _ => [None, None],
        }
    }

    /// Operations whose reply promises durability of everything before them.
    pub fn is_barrier(&self) -> bool {
        matches!(
            self,
            Op::Flush { .. } | Op::Fsync { .. } | Op::FsyncDir { .. }
        )
    }

    /// Operations that let go of a handle or of the kernel's references to inodes: the
    /// kernel does not look at their answer and never sends them again.
    pub fn releases(&self) -> bool {
        matches!(
            self,
            Op::Forget { .. } | Op::Release { .. } | Op::ReleaseDir { .. }
        )
    }

    /// Requests the kernel may send after the thread that caused them has moved on
    /// (readahead, writeback, a close that does not wait, batched forgets). Every other
    /// request is sent by a thread that waits for its answer and takes it in before its next.
    pub fn may_be_sent_in_background(&self) -> bool {
        self.releases() || matches!(self, Op::Read { .. } | Op::Write { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// A snapshot of the daemon for `spoolfs status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub requests: u64,
    pub commits: u64,
    pub durable_commits: u64,
    pub open_handles: u64,
    pub known_inodes: u64,
    pub memfd_bytes: u64,
    pub memfd_dirty_chunks: u64,
    pub db_bytes: u64,
}

#[derive(Debug)]
pub enum Reply {
    Entry(Inode),
    Attr(Inode),
    Data(Vec<u8>),
    Written(u32),
    Opened(Fh),
    Created(Inode, Fh),
    Dir(Vec<(u64, DirEntry)>),
    Statfs(Statfs),
    /// getxattr/listxattr size probe (the caller passed size 0).
    XattrSize(u32),
    Offset(i64),
    Status(StatusReport),
    Empty,
}

/// Who sent a request: the fields of the FUSE header the core needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub unique: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

pub struct Msg {
    pub caller: Caller,
    pub op: Op,
    pub reply: Responder,
    /// When the FUSE thread queued it (time spent waiting for the actor).
    pub queued: Instant,
    /// Set by the actor when the answer waits for a commit, so that a FUSE thread waiting
    /// for it (the binary's `handoff`) stops waiting at once instead of spinning in vain.
    pub later: Option<Arc<AtomicBool>>,
}

/// Tell a FUSE thread waiting for this answer (if any) that it waits for a commit.
pub fn mark_later(later: Option<Arc<AtomicBool>>) {
    if let Some(flag) = later {
        flag.store(true, Ordering::Release);
    }
}

/// Key arguments of a request for the access log: ids, names, offsets and sizes, never file
/// content or xattr values.
pub struct OpArgs<'a>(&'a Op);

impl Op {
    pub fn args(&self) -> OpArgs<'_> {
        OpArgs(self)
    }
}

impl std::fmt::Debug for OpArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match self.0 {
            Op::Lookup { parent, name }
            | Op::Unlink { parent, name }
            | Op::RmDir { parent, name } => write!(f, "parent={parent} name={:?}", n(name)),
            Op::MkNod {
                parent, name, mode, ..
            }
            | Op::MkDir { parent, name, mode }
            | Op::Create {
                parent, name, mode, ..
            } => {
                write!(f, "parent={parent} name={:?} mode={mode:o}", n(name))
            }
            Op::Symlink { parent, name, .. } => write!(f, "parent={parent} name={:?}", n(name)),
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
            } => write!(
                f,
                "parent={parent} name={:?} new_parent={new_parent} new_name={:?} flags={flags:?}",
                n(name),
                n(new_name)
            ),
            Op::Link {
                ino,
                new_parent,
                new_name,
            } => {
                write!(
                    f,
                    "ino={ino} new_parent={new_parent} new_name={:?}",
                    n(new_name)
                )
            }
            Op::Read {
                ino,
                fh,
                offset,
                size,
            } => {
                write!(f, "ino={ino} fh={} offset={offset} size={size}", fh.0)
            }
            Op::Write {
                ino,
                fh,
                offset,
                data,
                ..
            } => {
                write!(
                    f,
                    "ino={ino} fh={} offset={offset} size={}",
                    fh.0,
                    data.len()
                )
            }
            Op::Open { ino, flags } => write!(f, "ino={ino} flags={flags:#x}"),
            Op::SetAttr { ino, set } => write!(f, "ino={ino} {set:?}"),
            Op::SetXattr {
                ino,
                name,
                value,
                flags,
            } => write!(
                f,
                "ino={ino} name={:?} size={} flags={flags}",
                n(name),
                value.len()
            ),
            Op::GetXattr { ino, name, size } => {
                write!(f, "ino={ino} name={:?} size={size}", n(name))
            }
            Op::RemoveXattr { ino, name } => write!(f, "ino={ino} name={:?}", n(name)),
            Op::Fallocate {
                ino,
                offset,
                length,
                mode,
                ..
            } => {
                write!(
                    f,
                    "ino={ino} offset={offset} length={length} mode={mode:#x}"
                )
            }
            Op::Forget { nodes } => write!(f, "nodes={}", nodes.len()),
            Op::GetAttr { ino }
            | Op::ReadLink { ino }
            | Op::OpenDir { ino }
            | Op::ListXattr { ino, .. }
            | Op::Access { ino, .. } => write!(f, "ino={ino}"),
            Op::Flush { ino, fh }
            | Op::Release { ino, fh }
            | Op::Fsync { ino, fh }
            | Op::ReleaseDir { ino, fh }
            | Op::FsyncDir { ino, fh } => write!(f, "ino={ino} fh={}", fh.0),
            Op::ReadDir { ino, fh, offset } => write!(f, "ino={ino} fh={} offset={offset}", fh.0),
            Op::Lseek {
                ino,
                offset,
                whence,
                ..
            } => {
                write!(f, "ino={ino} offset={offset} whence={whence}")
            }
            Op::StatFs | Op::Status => Ok(()),
        }
    }
}
