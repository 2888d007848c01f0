//! An in-memory `Store` for tests of the pure core: plain ordered maps, no staging.

use std::collections::{BTreeMap, BTreeSet};

use crate::store::{Store, StoreResult};
use crate::types::{Dentry, Ino, Inode, CHUNK_SIZE};

#[derive(Clone, Debug, Default)]
pub struct MemStore {
    pub inodes: BTreeMap<Ino, Inode>,
    pub dentries: BTreeMap<(Ino, Vec<u8>), Dentry>,
    pub symlinks: BTreeMap<Ino, Vec<u8>>,
    pub xattrs: BTreeMap<(Ino, Vec<u8>), Vec<u8>>,
    pub chunks: BTreeMap<(Ino, u64), Vec<u8>>,
    pub orphans: BTreeSet<Ino>,
    /// Calls of the chunk methods, so tests can check that an operation's cost follows the
    /// stored chunks and not the file's length.
    pub chunk_calls: u64,
}

impl Store for MemStore {
    fn inode(&mut self, ino: Ino) -> StoreResult<Option<Inode>> {
        Ok(self.inodes.get(&ino).cloned())
    }
    fn put_inode(&mut self, inode: &Inode) -> StoreResult<()> {
        self.inodes.insert(inode.ino, inode.clone());
        Ok(())
    }
    fn remove_inode(&mut self, ino: Ino) -> StoreResult<()> {
        self.inodes.remove(&ino);
        self.symlinks.remove(&ino);
        self.xattrs.retain(|(i, _), _| *i != ino);
        self.chunks.retain(|(i, _), _| *i != ino);
        Ok(())
    }
    fn dentry(&mut self, parent: Ino, name: &[u8]) -> StoreResult<Option<Dentry>> {
        Ok(self.dentries.get(&(parent, name.to_vec())).copied())
    }
    fn put_dentry(&mut self, parent: Ino, name: &[u8], dentry: Dentry) -> StoreResult<()> {
        self.dentries.insert((parent, name.to_vec()), dentry);
        Ok(())
    }
    fn remove_dentry(&mut self, parent: Ino, name: &[u8]) -> StoreResult<()> {
        self.dentries.remove(&(parent, name.to_vec()));
        Ok(())
    }
    fn dentries(
        &mut self,
        parent: Ino,
        after: Option<&[u8]>,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, Dentry)>> {
        let start = (parent, after.map(<[u8]>::to_vec).unwrap_or_default());
        Ok(self
            .dentries
            .range(start..)
            .take_while(|((p, _), _)| *p == parent)
            .filter(|((_, n), _)| after.is_none_or(|a| n.as_slice() > a))
            .take(limit)
            .map(|((_, n), d)| (n.clone(), *d))
            .collect())
    }
    fn symlink_target(&mut self, ino: Ino) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.symlinks.get(&ino).cloned())
    }
    fn put_symlink_target(&mut self, ino: Ino, target: &[u8]) -> StoreResult<()> {
        self.symlinks.insert(ino, target.to_vec());
        Ok(())
    }
    fn xattr(&mut self, ino: Ino, name: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.xattrs.get(&(ino, name.to_vec())).cloned())
    }
    fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> StoreResult<()> {
        self.xattrs.insert((ino, name.to_vec()), value.to_vec());
        Ok(())
    }
    fn remove_xattr(&mut self, ino: Ino, name: &[u8]) -> StoreResult<()> {
        self.xattrs.remove(&(ino, name.to_vec()));
        Ok(())
    }
    fn xattr_names(&mut self, ino: Ino) -> StoreResult<Vec<Vec<u8>>> {
        Ok(self
            .xattrs
            .range((ino, Vec::new())..)
            .take_while(|((i, _), _)| *i == ino)
            .map(|((_, n), _)| n.clone())
            .collect())
    }
    fn read_chunk(&mut self, ino: Ino, idx: u64, offset: usize, buf: &mut [u8]) -> StoreResult<()> {
        self.chunk_calls += 1;
        buf.fill(0);
        if let Some(chunk) = self.chunks.get(&(ino, idx)) {
            copy_out(chunk, offset, buf);
        }
        Ok(())
    }
    fn write_chunk(&mut self, ino: Ino, idx: u64, offset: usize, data: &[u8]) -> StoreResult<()> {
        self.chunk_calls += 1;
        let chunk = self.chunks.entry((ino, idx)).or_default();
        copy_in(chunk, offset, data);
        Ok(())
    }
    fn truncate_chunk(&mut self, ino: Ino, idx: u64, len: usize) -> StoreResult<()> {
        self.chunk_calls += 1;
        if let Some(chunk) = self.chunks.get_mut(&(ino, idx)) {
            chunk.truncate(len);
        }
        Ok(())
    }
    fn remove_chunks(&mut self, ino: Ino, from: u64, to: Option<u64>) -> StoreResult<()> {
        self.chunk_calls += 1;
        let to = to.unwrap_or(u64::MAX);
        self.chunks
            .retain(|(i, idx), _| *i != ino || *idx < from || *idx >= to);
        Ok(())
    }
    fn next_chunk(&mut self, ino: Ino, from: u64) -> StoreResult<Option<u64>> {
        self.chunk_calls += 1;
        Ok(self
            .chunks
            .range((ino, from)..=(ino, u64::MAX))
            .next()
            .map(|((_, idx), _)| *idx))
    }
    fn add_orphan(&mut self, ino: Ino) -> StoreResult<()> {
        self.orphans.insert(ino);
        Ok(())
    }
    fn remove_orphan(&mut self, ino: Ino) -> StoreResult<()> {
        self.orphans.remove(&ino);
        Ok(())
    }
    fn orphans(&mut self) -> StoreResult<Vec<Ino>> {
        Ok(self.orphans.iter().copied().collect())
    }
}

/// Copy the part of `chunk` that starts at `offset` into `buf` (which is pre-zeroed).
pub fn copy_out(chunk: &[u8], offset: usize, buf: &mut [u8]) {
    if offset < chunk.len() {
        let n = buf.len().min(chunk.len() - offset);
        buf[..n].copy_from_slice(&chunk[offset..offset + n]);
    }
}

/// Write `data` at `offset` into a chunk buffer, growing it with zeros as needed.
/// Callers guarantee `offset + data.len() <= CHUNK_SIZE`.
pub fn copy_in(chunk: &mut Vec<u8>, offset: usize, data: &[u8]) {
    let end = offset + data.len();
    debug_assert!(end as u64 <= CHUNK_SIZE);
    if chunk.len() < end {
        chunk.resize(end, 0);
    }
    chunk[offset..end].copy_from_slice(data);
}
