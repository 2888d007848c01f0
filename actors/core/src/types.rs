//! Value types shared by every layer: ids, attributes, timestamps, errnos.
//!
//! Everything here is plain data. Time, inode numbers and handles are decided by the caller and
//! carried in commands, so applying the same command sequence always yields the same state
//! (the property a replicated log will rely on).

use std::fmt;

/// An inode number. `Ino::ROOT` is the mount's root directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ino(pub u64);

impl Ino {
    pub const ROOT: Ino = Ino(1);
}

impl fmt::Display for Ino {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An open file or directory handle, as handed to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fh(pub u64);

/// A positive errno value returned to the kernel.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

macro_rules! errnos {
    ($($name:ident),* $(,)?) => {
        impl Errno {
            $(pub const $name: Errno = Errno(libc::$name);)*

            /// The symbolic name (`"ENOENT"`), for logs and metric labels.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $(libc::$name => stringify!($name),)*
                    _ => "EOTHER",
                }
            }
        }
    };
}

errnos!(
    EPERM,
    ENOENT,
    EINTR,
    EIO,
    ENXIO,
    E2BIG,
    EBADF,
    EAGAIN,
    ENOMEM,
    EACCES,
    EBUSY,
    EEXIST,
    EXDEV,
    ENODEV,
    ENOTDIR,
    EISDIR,
    EINVAL,
    ENFILE,
    EMFILE,
    EFBIG,
    ENOSPC,
    ESPIPE,
    EROFS,
    EMLINK,
    ERANGE,
    ENAMETOOLONG,
    ENOSYS,
    ENOTEMPTY,
    ELOOP,
    ENODATA,
    EOPNOTSUPP,
    EOVERFLOW,
    ENOTCONN,
    ETIMEDOUT,
);

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl std::error::Error for Errno {}

/// Nanosecond-resolution wall-clock time, as seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub const fn new(secs: i64, nanos: u32) -> Self {
        Timestamp { secs, nanos }
    }
}

/// The kind of an inode, stored as one byte in dentries and inodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    pub fn to_byte(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::Fifo => 4,
            Kind::Socket => 5,
            Kind::CharDev => 6,
            Kind::BlockDev => 7,
        }
    }

    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDev,
            7 => Kind::BlockDev,
            _ => return None,
        })
    }

    /// The kind encoded in the `S_IFMT` bits of a mode, as given to mknod.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// Permission bits a mode may carry (rwx for three classes plus setuid, setgid, sticky).
pub const PERM_MASK: u32 = 0o7777;

/// One inode's attributes: the record stored under its number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: Ino,
    pub kind: Kind,
    /// Permission bits only (`PERM_MASK`); the kind is in `kind`.
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub rdev: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    /// For directories: the one directory that holds it (needed for `..` and the rename
    /// cycle check). For other kinds: the parent it was created in (informational).
    pub parent: Ino,
}

impl Inode {
    /// A new inode of `kind` made at `now`: empty, with the link count of a new node (a
    /// directory counts its `.` and its entry in `parent`).
    pub fn new(
        ino: Ino,
        kind: Kind,
        perm: u32,
        (uid, gid): (u32, u32),
        now: Timestamp,
        parent: Ino,
    ) -> Inode {
        Inode {
            ino,
            kind,
            perm,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            uid,
            gid,
            size: 0,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            parent,
        }
    }
}

/// What a directory entry stores: enough for readdir without reading the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dentry {
    pub ino: Ino,
    pub kind: Kind,
}

/// Who is asking and when: the deterministic inputs of every mutation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub now: Timestamp,
}

/// A time given to setattr: a specific time, or "now" (UTIME_NOW), resolved from `Ctx::now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    At(Timestamp),
    Now,
}

/// The fields a setattr call changes; `None` leaves a field alone (UTIME_OMIT for times).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<Timestamp>,
    pub fh: Option<Fh>,
}

/// Limits the daemon enforces itself, whatever the kernel lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest file name, in bytes (ENAMETOOLONG past it).
    pub name_max: usize,
    /// Longest symlink target, in bytes (ENAMETOOLONG past it).
    pub symlink_max: usize,
    /// Largest file size (EFBIG past it).
    pub file_size_max: u64,
    /// Longest xattr name including its namespace prefix (ERANGE past it).
    pub xattr_name_max: usize,
    /// Largest xattr value (E2BIG past it).
    pub xattr_value_max: usize,
    /// Most hard links to one inode (EMLINK past it).
    pub link_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            name_max: 255,
            symlink_max: 4095,
            // 2^44 bytes = 16 TiB: far beyond any mail, far below where offset arithmetic wraps.
            file_size_max: 1 << 44,
            xattr_name_max: 255,
            xattr_value_max: 65536,
            link_max: 65000,
        }
    }
}

/// A directory entry as returned by readdir: position cookies are `index + 1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: Ino,
    pub kind: Kind,
    pub name: Vec<u8>,
}

/// Content is stored in chunks of this many bytes, keyed by (ino, offset / CHUNK_SIZE).
/// 64 KiB less 64 bytes: redb stores a chunk with its leaf header in one page, and pages
/// are powers of two, so a full 64 KiB chunk took a 128 KiB page (twice the disk writes and
/// database size). Schema version 1 used 64 KiB (see `spoolfs_store::migrate`).
pub const CHUNK_SIZE: u64 = 64 * 1024 - 64;
