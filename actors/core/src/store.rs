//! The store port: what the core needs from persistent state, and nothing more.
//!
//! The runtime implements it over one redb write transaction plus the memfd overlay of files
//! open for writing; tests implement it with `MemStore`. Any error from the store is an I/O
//! failure to the caller (EIO); the core never sees a storage-specific type.

use crate::types::{Dentry, Ino, Inode};

/// A storage failure. The message is for the operator log, never for the kernel (which gets EIO).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

pub type StoreResult<T> = Result<T, StoreError>;

pub trait Store {
    // --- inodes -------------------------------------------------------------------------
    fn inode(&mut self, ino: Ino) -> StoreResult<Option<Inode>>;
    /// Persist a metadata change, in order with every other operation. If the file has staged
    /// content (writes not yet flushed), that content is persisted first, so the record never
    /// describes data that is not stored.
    fn put_inode(&mut self, inode: &Inode) -> StoreResult<()>;
    /// Record attributes changed by a data write (size, mtime). They become durable together
    /// with the data on the next `flush` of the file (or with `put_inode`).
    fn stage_inode(&mut self, inode: &Inode) -> StoreResult<()> {
        self.put_inode(inode)
    }
    /// Remove the inode and everything hanging off it: content, xattrs, symlink target.
    fn remove_inode(&mut self, ino: Ino) -> StoreResult<()>;

    // --- directory entries --------------------------------------------------------------
    fn dentry(&mut self, parent: Ino, name: &[u8]) -> StoreResult<Option<Dentry>>;
    fn put_dentry(&mut self, parent: Ino, name: &[u8], dentry: Dentry) -> StoreResult<()>;
    fn remove_dentry(&mut self, parent: Ino, name: &[u8]) -> StoreResult<()>;
    /// Entries of `parent` in name order, starting after `after`, at most `limit` of them.
    fn dentries(
        &mut self,
        parent: Ino,
        after: Option<&[u8]>,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, Dentry)>>;

    // --- symlink targets and xattrs -----------------------------------------------------
    fn symlink_target(&mut self, ino: Ino) -> StoreResult<Option<Vec<u8>>>;
    fn put_symlink_target(&mut self, ino: Ino, target: &[u8]) -> StoreResult<()>;
    fn xattr(&mut self, ino: Ino, name: &[u8]) -> StoreResult<Option<Vec<u8>>>;
    fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> StoreResult<()>;
    fn remove_xattr(&mut self, ino: Ino, name: &[u8]) -> StoreResult<()>;
    fn xattr_names(&mut self, ino: Ino) -> StoreResult<Vec<Vec<u8>>>;

    // --- content, in chunks of CHUNK_SIZE bytes ------------------------------------------
    /// Fill `buf` with the bytes of chunk `idx` starting at `offset` within it; bytes the
    /// chunk does not hold (a hole, or past its stored end) read as zero.
    fn read_chunk(&mut self, ino: Ino, idx: u64, offset: usize, buf: &mut [u8]) -> StoreResult<()>;
    /// Write `data` into chunk `idx` at `offset`, zero-filling any gap before it.
    fn write_chunk(&mut self, ino: Ino, idx: u64, offset: usize, data: &[u8]) -> StoreResult<()>;
    /// Keep the first `len` bytes of chunk `idx` and drop the rest.
    fn truncate_chunk(&mut self, ino: Ino, idx: u64, len: usize) -> StoreResult<()>;
    /// Remove chunks with `from <= idx < to` (`to = None`: to the end).
    fn remove_chunks(&mut self, ino: Ino, from: u64, to: Option<u64>) -> StoreResult<()>;
    /// The smallest stored chunk index `>= from`, if any.
    fn next_chunk(&mut self, ino: Ino, from: u64) -> StoreResult<Option<u64>>;

    // --- open files (the runtime stages their content in memfd buffers) ----------------
    /// A handle that may write to `ino` was opened.
    fn open_for_write(&mut self, _ino: Ino) -> StoreResult<()> {
        Ok(())
    }
    /// Persist staged content and attributes of `ino` (FLUSH, fsync, release).
    fn flush(&mut self, _ino: Ino) -> StoreResult<()> {
        Ok(())
    }
    /// The last handle of `ino` was released: staging buffers may be dropped.
    fn close_content(&mut self, _ino: Ino) -> StoreResult<()> {
        Ok(())
    }

    // --- orphans: inodes with no links that are still open or known to the kernel --------
    fn add_orphan(&mut self, ino: Ino) -> StoreResult<()>;
    fn remove_orphan(&mut self, ino: Ino) -> StoreResult<()>;
    fn orphans(&mut self) -> StoreResult<Vec<Ino>>;
}
