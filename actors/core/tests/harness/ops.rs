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

/// An inode given as a path, or as the inode of an open handle (which may be unlinked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ref {
    Path(Path),
    Handle(u8),
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
    [0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE][usize::from(m) % 3]
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
    Mkdir { dir: Ref, name: u8, mode: u8 },
    /// create + the handle it returns stays open.
    Create { dir: Ref, name: u8, mode: u8, acc: u8 },
    /// mknod of a FIFO.
    Mknod { dir: Ref, name: u8 },
    Symlink { dir: Ref, name: u8, target: u8 },
    Link { src: Ref, dir: Ref, name: u8 },
    Unlink { dir: Ref, name: u8 },
    Rmdir { dir: Ref, name: u8 },
    Rename { dir: Ref, name: u8, new_dir: Ref, new_name: u8, flags: u8 },
    Lookup { path: Path },
    /// Open a regular file (other kinds are skipped: the kernel does not send them OPEN).
    Open { path: Path, acc: u8 },
    OpenDir { path: Path },
    Readdir { h: u8 },
    Write { h: u8, offset: u64, len: u32, seed: u8 },
    Read { h: u8, offset: u64, len: u32 },
    Release { h: u8 },
    /// truncate(2) by path.
    Truncate { path: Path, size: u64 },
    /// ftruncate(2) through a writable handle.
    Ftruncate { h: u8, size: u64 },
    Fallocate { h: u8, offset: u64, len: u64, mode: u8 },
    SetXattr { target: Ref, name: u8, value: u8, flags: u8 },
    GetXattr { target: Ref, name: u8 },
    ListXattr { target: Ref },
    RemoveXattr { target: Ref, name: u8 },
    Readlink { path: Path },
    /// FORGET one known inode: all its references, or just one.
    Forget { pick: u8, all: bool },
    /// The kernel drops its whole dentry cache.
    ForgetAll,
    /// The daemon restarts: handles and kernel references vanish, orphans are reclaimed.
    Restart,
}

fn path(max_depth: usize) -> impl Strategy<Value = Path> {
    prop::collection::vec(0..NAMES.len() as u8, 0..=max_depth).prop_map(Path)
}

/// A directory: mostly by path (up to two deep, so entries go up to three deep).
fn dir_ref() -> impl Strategy<Value = Ref> {
    prop_oneof![
        10 => path(2).prop_map(Ref::Path),
        1 => any::<u8>().prop_map(Ref::Handle),
    ]
}

fn target_ref() -> impl Strategy<Value = Ref> {
    prop_oneof![
        6 => path(3).prop_map(Ref::Path),
        1 => any::<u8>().prop_map(Ref::Handle),
    ]
}

fn name_idx() -> impl Strategy<Value = u8> {
    0..NAMES.len() as u8
}

/// Offsets and sizes: mostly small, often right around a chunk boundary, sometimes anywhere
/// in the first six chunks (leaving holes).
pub fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..2_000u64,
        3 => (1..6u64, 0..200u64).prop_map(|(k, d)| k * CHUNK_SIZE - 100 + d),
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
        6 => (dir_ref(), name_idx(), any::<u8>())
            .prop_map(|(dir, name, mode)| Op::Mkdir { dir, name, mode }),
        6 => (dir_ref(), name_idx(), any::<u8>(), any::<u8>())
            .prop_map(|(dir, name, mode, acc)| Op::Create { dir, name, mode, acc }),
        2 => (dir_ref(), name_idx()).prop_map(|(dir, name)| Op::Mknod { dir, name }),
        2 => (dir_ref(), name_idx(), any::<u8>())
            .prop_map(|(dir, name, target)| Op::Symlink { dir, name, target }),
        4 => (target_ref(), dir_ref(), name_idx())
            .prop_map(|(src, dir, name)| Op::Link { src, dir, name }),
        4 => (dir_ref(), name_idx()).prop_map(|(dir, name)| Op::Unlink { dir, name }),
        3 => (dir_ref(), name_idx()).prop_map(|(dir, name)| Op::Rmdir { dir, name }),
        8 => (dir_ref(), name_idx(), dir_ref(), name_idx(), any::<u8>()).prop_map(
            |(dir, name, new_dir, new_name, flags)| Op::Rename {
                dir,
                name,
                new_dir,
                new_name,
                flags
            }
        ),
        2 => path(3).prop_map(|path| Op::Lookup { path }),
        4 => (path(3), any::<u8>()).prop_map(|(path, acc)| Op::Open { path, acc }),
        1 => path(2).prop_map(|path| Op::OpenDir { path }),
        1 => h().prop_map(|h| Op::Readdir { h }),
        10 => (h(), offset(), length(), any::<u8>())
            .prop_map(|(h, offset, len, seed)| Op::Write { h, offset, len, seed }),
        5 => (h(), offset(), length()).prop_map(|(h, offset, len)| Op::Read { h, offset, len }),
        4 => h().prop_map(|h| Op::Release { h }),
        2 => (path(3), offset()).prop_map(|(path, size)| Op::Truncate { path, size }),
        2 => (h(), offset()).prop_map(|(h, size)| Op::Ftruncate { h, size }),
        3 => (h(), offset(), 1..100_000u64, any::<u8>())
            .prop_map(|(h, offset, len, mode)| Op::Fallocate { h, offset, len, mode }),
        2 => (target_ref(), any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(target, name, value, flags)| Op::SetXattr { target, name, value, flags }),
        1 => (target_ref(), any::<u8>()).prop_map(|(target, name)| Op::GetXattr { target, name }),
        1 => target_ref().prop_map(|target| Op::ListXattr { target }),
        1 => (target_ref(), any::<u8>())
            .prop_map(|(target, name)| Op::RemoveXattr { target, name }),
        1 => path(3).prop_map(|path| Op::Readlink { path }),
        3 => (h(), any::<bool>()).prop_map(|(pick, all)| Op::Forget { pick, all }),
        1 => Just(Op::ForgetAll),
        1 => Just(Op::Restart),
    ]
}

/// A sequence of `len` operations.
pub fn ops(len: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), len)
}
