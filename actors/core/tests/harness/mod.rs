//! Model-based testing of the core: random FUSE-level operation sequences applied in lockstep
//! to two "sides" and compared after every step.
//!
//! * [`model::Model`] is an independent reference filesystem: a tree of nodes where
//!   directories map names to inode numbers, link counts are *computed* from the tree rather
//!   than maintained, and errno precedence follows Linux's VFS.
//! * [`sut::Sut`] is the system under test: `spoolfs_core::Fs` over a [`sut::Backend`]
//!   (`MemStore` here, redb `Tables` in the store crate's tests).
//!
//! [`driver::Driver`] plays the kernel: it resolves paths with LOOKUP (counting the references
//! it holds, so it can FORGET them later), keeps the open handles, and compares the result of
//! every request and the whole state ([`Snapshot`]) after every operation.
//!
//! This module is shared with `actors/store/tests/` through `#[path]`, so not every item is
//! used by every test crate.
#![allow(dead_code)]

pub mod driver;
pub mod model;
pub mod ops;
pub mod sut;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use spoolfs_core::{Errno, Kind, RenameFlags, Timestamp};

pub type Res<T> = Result<T, Errno>;

/// What both sides report about an inode (no times: the model does not track them; the store
/// test compares full records through [`sut::RawDump`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub nlink: u32,
    pub size: u64,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
}

/// One inode as the whole-state comparison sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub kind: Kind,
    pub nlink: u32,
    pub size: u64,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// The directory holding a directory (`..`); 0 for other kinds.
    pub parent: u64,
}

/// The whole observable state of one side.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub nodes: BTreeMap<u64, NodeView>,
    pub dentries: BTreeMap<(u64, Vec<u8>), (u64, Kind)>,
    pub symlinks: BTreeMap<u64, Vec<u8>>,
    pub xattrs: BTreeMap<(u64, Vec<u8>), Vec<u8>>,
    /// Inodes with no links that are kept because they are open or known to the kernel.
    pub orphans: BTreeSet<u64>,
    /// Content of the regular files asked for.
    pub contents: BTreeMap<u64, Vec<u8>>,
    pub open_handles: usize,
    pub known_inodes: usize,
}

/// Which file contents a snapshot includes.
#[derive(Clone, Copy, Debug)]
pub enum Contents<'a> {
    All,
    Only(&'a BTreeSet<u64>),
}

impl Contents<'_> {
    pub fn wants(&self, ino: u64) -> bool {
        match self {
            Contents::All => true,
            Contents::Only(set) => set.contains(&ino),
        }
    }
}

/// One implementation of the filesystem, driven at the level of FUSE requests.
pub trait Side {
    type H: Copy + Debug;

    /// Set the time of the following requests.
    fn tick(&mut self, now: Timestamp);
    fn lookup(&mut self, parent: u64, name: &[u8]) -> Res<Attr>;
    fn forget(&mut self, ino: u64, n: u64);
    fn getattr(&mut self, ino: u64) -> Res<Attr>;
    fn mkdir(&mut self, parent: u64, name: &[u8], mode: u32, new_ino: u64) -> Res<Attr>;
    fn mknod(&mut self, parent: u64, name: &[u8], mode: u32, new_ino: u64) -> Res<Attr>;
    fn symlink(&mut self, parent: u64, name: &[u8], target: &[u8], new_ino: u64) -> Res<Attr>;
    fn create(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        new_ino: u64,
    ) -> Res<(Attr, Self::H)>;
    fn link(&mut self, ino: u64, new_parent: u64, new_name: &[u8]) -> Res<Attr>;
    fn unlink(&mut self, parent: u64, name: &[u8]) -> Res<()>;
    fn rmdir(&mut self, parent: u64, name: &[u8]) -> Res<()>;
    fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> Res<()>;
    fn open(&mut self, ino: u64, flags: i32) -> Res<Self::H>;
    fn opendir(&mut self, ino: u64) -> Res<Self::H>;
    fn release(&mut self, ino: u64, h: Self::H, dir: bool) -> Res<()>;
    fn read(&mut self, ino: u64, h: Self::H, offset: u64, size: u32) -> Res<Vec<u8>>;
    fn write(&mut self, ino: u64, h: Self::H, offset: u64, data: &[u8]) -> Res<u32>;
    fn truncate(&mut self, ino: u64, size: u64, fh: Option<Self::H>) -> Res<Attr>;
    fn fallocate(&mut self, ino: u64, h: Self::H, offset: u64, len: u64, mode: i32) -> Res<()>;
    /// A whole listing from offset 0: `.`, `..`, then the entries in name order.
    fn readdir(&mut self, ino: u64, h: Self::H) -> Res<Vec<(Vec<u8>, u64, Kind)>>;
    fn readlink(&mut self, ino: u64) -> Res<Vec<u8>>;
    fn setxattr(&mut self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Res<()>;
    fn getxattr(&mut self, ino: u64, name: &[u8]) -> Res<Vec<u8>>;
    fn listxattr(&mut self, ino: u64) -> Res<Vec<u8>>;
    fn removexattr(&mut self, ino: u64, name: &[u8]) -> Res<()>;
    /// Every entry reachable from the root, as (path, kind), in depth-first name order.
    fn tree(&mut self) -> Vec<(Vec<Vec<u8>>, Kind)>;
    /// The daemon stops and starts again: every handle and kernel reference is gone.
    fn restart(&mut self);
    /// Called after every operation (the redb side commits now and then).
    fn op_done(&mut self, _index: usize) {}
    /// The whole state, or why the side's storage breaks an internal invariant.
    fn snapshot(&mut self, contents: Contents<'_>) -> Result<Snapshot, String>;
}

/// `name` from the environment, parsed, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A deterministic proptest runner: `cases` sequences from `seed`. Failures are not persisted
/// (shrunk failures become named regression tests) and shrink at most `max_shrink_iters` times.
pub fn seeded_runner(
    cases: u32,
    seed: u64,
    max_shrink_iters: u32,
) -> proptest::test_runner::TestRunner {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters,
        ..Config::default()
    };
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}
