//! The operations of a random sequence and their proptest strategies.
//!
//! Names come from a four-letter alphabet and paths are at most three deep, so sequences keep
//! hitting existing names (EEXIST, renames over victims, ENOTEMPTY, ...). Handles are picked
//! by index modulo the number open, so a shrunk sequence stays meaningful. Every type's
//! `Debug` output is valid Rust, so a shrunk failure can be pasted into a regression test.

use std::fmt;

use proptest::prelude::*;
use spoolfs_core::CHUNK_SIZE;

/// The names entries are created with.
pub const NAMES: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];

pub fn name(i: u8) -> &'static [u8] {
    NAMES[usize::from(i) % NAMES.len()]
}

/// xattr names: two user ones, one of another supported namespace, one unsupported.
pub const XATTR_NAMES: [&[u8]; 4] = [b"user.x", b"user.y", b"trusted.t", b"os2.z"];

pub fn xattr_name(i: u8) -> &'static [u8] {
    XATTR_NAMES[usize::from(i) % XATTR_NAMES.len()]
}

/// A path from the root: name indices (empty = the root itself).
#[derive(Clone, PartialEq, Eq)]
pub struct Path(pub Vec<u8>);

impl Path {
    pub fn of(names: &[u8]) -> Path {
        Path(names.to_vec())
    }
}

impl fmt::Debug for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Path::of(&{:?})", self.0)
    }
}

/// Which existing entries a `Ref::Live` or `Loc::Entry` chooses among.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sel {
    Any,
    Dir,
    File,
    NonDir,
}

/// An inode: a path that may or may not exist, the `n`-th (modulo their number) existing
/// entry of a kind (the root counts as a directory), or the inode of an open handle (which
/// may be unlinked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ref {
    At(Path),
    Live(Sel, u8),
    Handle(u8),
}

/// A directory entry: a name in a directory, or an existing entry of a kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Loc {
    In(Ref, u8),
    Entry(Sel, u8),
}

/// Access mode of an open: 0 = O_RDONLY, 1 = O_WRONLY, 2 = O_RDWR.
pub fn acc_flags(acc: u8) -> i32 {
    match acc % 3 {
        0 => libc::O_RDONLY,
        1 => libc::O_WRONLY,
        _ => libc::O_RDWR,
    }
}

/// Directory modes, including a setgid one (inherited by subdirectories).
pub fn dir_mode(m: u8) -> u32 {
    [0o755, 0o700, 0o2775][usize::from(m) % 3]
}

pub fn file_mode(m: u8) -> u32 {
    [0o644, 0o600, 0o755][usize::from(m) % 3]
}

/// Rename flags: 0 = none, 1 = RENAME_NOREPLACE, 2 = RENAME_EXCHANGE.
pub fn rename_flags(f: u8) -> spoolfs_core::RenameFlags {
    spoolfs_core::RenameFlags {
        noreplace: f % 3 == 1,
        exchange: f % 3 == 2,
    }
}

/// fallocate modes: 0, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE.
pub fn falloc_mode(m: u8) -> i32 {
    use spoolfs_core::fs::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE};
    [
        0,
        FALLOC_FL_KEEP_SIZE,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    ][usize::from(m) % 3]
}

/// setxattr flags: 0, XATTR_CREATE, XATTR_REPLACE.
pub fn xattr_flags(f: u8) -> i32 {
    use spoolfs_core::fs::{XATTR_CREATE, XATTR_REPLACE};
    [0, XATTR_CREATE, XATTR_REPLACE][usize::from(f) % 3]
}

/// Content written by a Write op: never zero, so holes and data cannot be confused, and
/// varying with the position so misplaced bytes show.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| 1 + ((usize::from(seed) * 7 + i) % 255) as u8)
        .collect()
}

pub fn symlink_target(t: u8) -> Vec<u8> {
    let targets: [&[u8]; 3] = [b"a", b"../b/c", b"/nonexistent/target"];
    targets[usize::from(t) % 3].to_vec()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Mkdir {
        at: Loc,
        mode: u8,
    },
    /// create; the handle it returns stays open.
    Create {
        at: Loc,
        mode: u8,
        acc: u8,
    },
    /// mknod of a FIFO.
    Mknod {
        at: Loc,
    },
    Symlink {
        at: Loc,
        target: u8,
    },
    Link {
        src: Ref,
        at: Loc,
    },
    Unlink {
        at: Loc,
    },
    Rmdir {
        at: Loc,
    },
    Rename {
        from: Loc,
        to: Loc,
        flags: u8,
    },
    Lookup {
        path: Path,
    },
    /// Open a regular file (other kinds are skipped: the kernel does not send them OPEN).
    Open {
        target: Ref,
        acc: u8,
    },
    OpenDir {
        target: Ref,
    },
    Readdir {
        h: u8,
    },
    Write {
        h: u8,
        offset: u64,
        len: u32,
        seed: u8,
    },
    Read {
        h: u8,
        offset: u64,
        len: u32,
    },
    Release {
        h: u8,
    },
    /// truncate(2) by path.
    Truncate {
        target: Ref,
        size: u64,
    },
    /// ftruncate(2) through a handle.
    Ftruncate {
        h: u8,
        size: u64,
    },
    Fallocate {
        h: u8,
        offset: u64,
        len: u64,
        mode: u8,
    },
    SetXattr {
        target: Ref,
        name: u8,
        value: u8,
        flags: u8,
    },
    GetXattr {
        target: Ref,
        name: u8,
    },
    ListXattr {
        target: Ref,
    },
    RemoveXattr {
        target: Ref,
        name: u8,
    },
    Readlink {
        target: Ref,
    },
    /// FORGET one known inode: all its references, or just one.
    Forget {
        pick: u8,
        all: bool,
    },
    /// The kernel drops its whole dentry cache.
    ForgetAll,
    /// The daemon restarts: handles and kernel references vanish, orphans are reclaimed.
    Restart,
}

fn path(max_depth: usize) -> impl Strategy<Value = Path> {
    prop::collection::vec(0..NAMES.len() as u8, 0..=max_depth).prop_map(Path)
}

fn live(sel: Sel) -> impl Strategy<Value = Ref> {
    any::<u8>().prop_map(move |i| Ref::Live(sel, i))
}

/// An inode mostly of kind `sel`; sometimes a random path or a handle's inode.
fn target(sel: Sel) -> impl Strategy<Value = Ref> {
    prop_oneof![
        6 => live(sel),
        2 => live(Sel::Any),
        2 => path(3).prop_map(Ref::At),
        1 => any::<u8>().prop_map(Ref::Handle),
    ]
}

/// An xattr target: mostly one of a few inodes, so that values set are read back.
fn xattr_target() -> impl Strategy<Value = Ref> {
    prop_oneof![
        2 => Just(Ref::At(Path::of(&[]))),
        3 => (0..3u8).prop_map(|i| Ref::Live(Sel::Any, i)),
        2 => target(Sel::Any),
    ]
}

/// A name in a directory, for creating entries: mostly in an existing directory.
fn new_loc() -> impl Strategy<Value = Loc> {
    (target(Sel::Dir), 0..NAMES.len() as u8).prop_map(|(r, n)| Loc::In(r, n))
}

/// An entry to remove or rename: mostly an existing one of kind `sel`.
fn old_loc(sel: Sel) -> impl Strategy<Value = Loc> {
    prop_oneof![
        6 => any::<u8>().prop_map(move |i| Loc::Entry(sel, i)),
        2 => any::<u8>().prop_map(|i| Loc::Entry(Sel::Any, i)),
        2 => new_loc(),
    ]
}

/// Offsets and sizes: mostly small, often near a chunk boundary or within 3 bytes of one,
/// sometimes anywhere in the first six chunks (leaving holes).
pub fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..2_000u64,
        2 => (1..6u64, 0..200u64).prop_map(|(k, d)| k * CHUNK_SIZE - 100 + d),
        2 => (1..6u64, 0..7u64).prop_map(|(k, d)| k * CHUNK_SIZE + d - 3),
        1 => 0..6 * CHUNK_SIZE,
    ]
}

fn length() -> impl Strategy<Value = u32> {
    prop_oneof![
        1 => Just(0u32),
        12 => 1..300u32,
        3 => 300..5_000u32,
        1 => 60_000..140_000u32,
    ]
}

pub fn op() -> impl Strategy<Value = Op> {
    let h = any::<u8>;
    prop_oneof![
        6 => (new_loc(), any::<u8>()).prop_map(|(at, mode)| Op::Mkdir { at, mode }),
        6 => (new_loc(), any::<u8>(), any::<u8>())
            .prop_map(|(at, mode, acc)| Op::Create { at, mode, acc }),
        1 => new_loc().prop_map(|at| Op::Mknod { at }),
        1 => (new_loc(), any::<u8>()).prop_map(|(at, target)| Op::Symlink { at, target }),
        4 => (target(Sel::NonDir), new_loc()).prop_map(|(src, at)| Op::Link { src, at }),
        4 => old_loc(Sel::NonDir).prop_map(|at| Op::Unlink { at }),
        3 => old_loc(Sel::Dir).prop_map(|at| Op::Rmdir { at }),
        12 => (old_loc(Sel::Any), prop_oneof![new_loc(), old_loc(Sel::Any)], any::<u8>())
            .prop_map(|(from, to, flags)| Op::Rename { from, to, flags }),
        1 => path(3).prop_map(|path| Op::Lookup { path }),
        5 => (target(Sel::File), any::<u8>()).prop_map(|(target, acc)| Op::Open { target, acc }),
        2 => target(Sel::Dir).prop_map(|target| Op::OpenDir { target }),
        2 => h().prop_map(|h| Op::Readdir { h }),
        12 => (h(), offset(), length(), any::<u8>())
            .prop_map(|(h, offset, len, seed)| Op::Write { h, offset, len, seed }),
        5 => (h(), offset(), length()).prop_map(|(h, offset, len)| Op::Read { h, offset, len }),
        5 => h().prop_map(|h| Op::Release { h }),
        2 => (target(Sel::File), offset()).prop_map(|(target, size)| Op::Truncate { target, size }),
        2 => (h(), offset()).prop_map(|(h, size)| Op::Ftruncate { h, size }),
        // The range ends anywhere, or (like it starts) at or near a chunk boundary.
        3 => (h(), offset(), prop_oneof![1..100_000u64, offset()], any::<u8>()).prop_map(
            |(h, offset, end, mode)| Op::Fallocate {
                h,
                offset,
                len: if end > offset { end - offset } else { end.max(1) },
                mode
            }
        ),
        3 => (xattr_target(), any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(target, name, value, flags)| Op::SetXattr { target, name, value, flags }),
        2 => (xattr_target(), any::<u8>())
            .prop_map(|(target, name)| Op::GetXattr { target, name }),
        1 => xattr_target().prop_map(|target| Op::ListXattr { target }),
        1 => (xattr_target(), any::<u8>())
            .prop_map(|(target, name)| Op::RemoveXattr { target, name }),
        1 => target(Sel::NonDir).prop_map(|target| Op::Readlink { target }),
        3 => (h(), any::<bool>()).prop_map(|(pick, all)| Op::Forget { pick, all }),
        1 => Just(Op::ForgetAll),
        1 => Just(Op::Restart),
    ]
}

/// A sequence of operations.
pub fn ops(len: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), len)
}
