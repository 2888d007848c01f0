//! Staging of file content in memfd buffers, and the `Store` the actor hands to the core.
//!
//! A file open for writing gets a memfd. Writes land there, chunk by chunk; a chunk is loaded
//! from redb the first time it is touched, so opening a large file costs nothing up front.
//! FLUSH, fsync and release copy only the dirty chunks (and the attributes the writes changed)
//! into the batch's transaction: the cost of a flush follows the bytes changed, not the size.
//! When the memfds together hold more than the budget at the end of an operation that loaded
//! chunks into a memfd (a write; a hole punched into part of a chunk, which zeroes it there),
//! that file is persisted and its memfd emptied. So between operations the memfds never hold
//! more than the budget; inside one they may by what that operation touches (a write of at
//! most max_write plus a partial chunk on either side, or the two edge chunks of a punch).
//!
//! Write-behind: a file with `WRITE_BEHIND_CHUNKS` dirty chunks is persisted (and its memfd
//! emptied) the same way, at the end of the write that got it there. The commit that follows
//! (the pending changes are then past the actor's seal size) writes that part to disk while
//! the file is still being written, as the kernel's writeback does for a local filesystem, so
//! the fsync or close at the end waits only for the tail. Without it, writing a 1 GiB file
//! left all of it for the fsync, with one of this machine's two cores idle during the writes.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use nix::fcntl::{fallocate, FallocateFlags};
use spoolfs_core::data::zeroed;
use spoolfs_core::{Dentry, Ino, Inode, Store, StoreError, StoreResult, CHUNK_SIZE};
use spoolfs_store::{Pending, SharedBytes};
use tracing::error;

const CHUNK: usize = CHUNK_SIZE as usize;

/// A persist of at least this many chunks of one file hands the delta the file's memfd,
/// mapped, instead of copies of the chunks, and the file gets a fresh memfd (see
/// `SharedBytes`). Below this, copying is cheaper than a new memfd and a mapping.
pub const SHARE_MIN_CHUNKS: usize = 16;

/// Dirty chunks of one file that start its write-behind (16 MiB, rounded up to whole chunks):
/// at least the actor's seal size, so each step starts a commit, and far above a mail message
/// (a spool file is persisted by its own fsync and close, never behind).
pub const WRITE_BEHIND_CHUNKS: usize = (16u64 << 20).div_ceil(CHUNK_SIZE) as usize;

fn io_err(what: &str, ino: Ino, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{what} for inode {ino}: {e}"))
}

/// The staging buffer of one file open for writing.
struct Staged {
    memfd: File,
    /// Chunks whose current bytes are in the memfd (loaded or written).
    present: BTreeSet<u64>,
    /// Chunks changed since the last flush.
    dirty: BTreeSet<u64>,
    /// Attributes changed by writes since the last flush.
    attrs: Option<Inode>,
}

/// What an operation took from one file's buffer to persist it, to give back on rollback.
struct Taken {
    ino: Ino,
    dirty: BTreeSet<u64>,
    attrs: Option<Inode>,
    /// The memfd the persist detached and shared with the delta, with the chunks it held.
    detached: Option<Detached>,
}

struct Detached {
    memfd: File,
    map: Arc<memmap2::Mmap>,
    present: BTreeSet<u64>,
}

/// All staging buffers, owned by the actor.
pub struct ContentCache {
    files: HashMap<Ino, Staged>,
    budget_bytes: u64,
    resident_chunks: u64,
    /// What the current operation took from the buffers to persist it (dirty chunks and
    /// attributes per file), so that an operation rolled back can give it back: its persisted
    /// copy is rolled back with it, and the data must stay marked unsaved.
    taken: Vec<Taken>,
    /// Files the current operation evicted: their memfds are emptied only once it succeeds
    /// (until then the memfd is the only copy of what a rollback would undo).
    evicted: Vec<Ino>,
    /// `SHARE_MIN_CHUNKS` (tests lower it).
    share_min_chunks: usize,
    /// `WRITE_BEHIND_CHUNKS` (tests lower it).
    write_behind_chunks: usize,
    /// One chunk, reused by every persist that copies (see `data::zeroed` for why not a
    /// fresh buffer each time).
    scratch: Vec<u8>,
}

impl ContentCache {
    pub fn new(budget_bytes: u64) -> Self {
        ContentCache {
            files: HashMap::new(),
            budget_bytes,
            resident_chunks: 0,
            taken: Vec::new(),
            evicted: Vec::new(),
            share_min_chunks: SHARE_MIN_CHUNKS,
            write_behind_chunks: WRITE_BEHIND_CHUNKS,
            scratch: zeroed(CHUNK),
        }
    }

    /// Share (instead of copy) persists of at least `chunks` chunks.
    pub fn with_share_min_chunks(mut self, chunks: usize) -> Self {
        self.share_min_chunks = chunks;
        self
    }

    /// Persist a file once it has `chunks` dirty chunks.
    pub fn with_write_behind_chunks(mut self, chunks: usize) -> Self {
        self.write_behind_chunks = chunks;
        self
    }

    /// An operation starts (see `taken`).
    pub fn begin_op(&mut self) {
        self.taken.clear();
        self.evicted.clear();
    }

    /// The operation succeeded: empty the memfds it evicted (unless written to again since).
    pub fn end_op(&mut self) {
        self.taken.clear();
        for ino in std::mem::take(&mut self.evicted) {
            let Some(f) = self.files.get_mut(&ino) else {
                continue;
            };
            if !f.dirty.is_empty() {
                continue;
            }
            // An error here only leaves the bytes resident: they are persisted already.
            if f.memfd.set_len(0).is_ok() {
                self.resident_chunks -= f.present.len() as u64;
                f.present.clear();
            }
        }
    }

    /// The operation was rolled back: what it persisted is unsaved again.
    pub fn rollback_op(&mut self) {
        self.evicted.clear();
        for t in std::mem::take(&mut self.taken).into_iter().rev() {
            if let Some(f) = self.files.get_mut(&t.ino) {
                if let Some(d) = t.detached {
                    self.resident_chunks -= f.present.len() as u64;
                    self.resident_chunks += restore(f, t.ino, d, &t.dirty);
                }
                f.dirty.extend(t.dirty);
                if f.attrs.is_none() {
                    f.attrs = t.attrs;
                }
            }
        }
    }

    pub fn resident_bytes(&self) -> u64 {
        self.resident_chunks * CHUNK_SIZE
    }

    pub fn dirty_chunks(&self) -> u64 {
        self.files.values().map(|f| f.dirty.len() as u64).sum()
    }
}

/// The view of state the core sees during one batch: redb tables overlaid with staging.
pub struct BatchStore<'a> {
    pub tables: &'a mut Pending,
    pub cache: &'a mut ContentCache,
    /// Something was written into the transaction (it must be committed, not aborted).
    pub wrote: bool,
    /// A storage call failed: the transaction may hold half an operation and must be aborted.
    pub failed: Option<StoreError>,
}

impl<'a> BatchStore<'a> {
    pub fn new(tables: &'a mut Pending, cache: &'a mut ContentCache) -> Self {
        BatchStore {
            tables,
            cache,
            wrote: false,
            failed: None,
        }
    }

    /// Record a storage failure so the actor aborts the batch.
    fn check<T>(&mut self, r: StoreResult<T>) -> StoreResult<T> {
        if let Err(e) = &r {
            if self.failed.is_none() {
                self.failed = Some(e.clone());
            }
        }
        r
    }

    fn write<T>(&mut self, r: StoreResult<T>) -> StoreResult<T> {
        self.wrote = true;
        self.check(r)
    }

    /// Copy dirty chunks of `ino` (for a file of `size` bytes) and its staged attributes into
    /// the transaction.
    fn persist(&mut self, ino: Ino, size: u64) -> StoreResult<()> {
        let Some(f) = self.cache.files.get_mut(&ino) else {
            return Ok(());
        };
        if f.dirty.is_empty() && f.attrs.is_none() {
            return Ok(());
        }
        let dirty = std::mem::take(&mut f.dirty);
        let attrs = f.attrs.take();
        // A large persist shares the memfd instead of copying it (see `SHARE_MIN_CHUNKS`).
        let mut detached = None;
        if dirty.range(..size.div_ceil(CHUNK_SIZE)).count() >= self.cache.share_min_chunks {
            match detach(f, ino, size) {
                Ok(d) => detached = Some(d),
                // Not fatal: the chunks are copied instead, from the memfd still in place.
                Err(e) => error!(ino = ino.0, error = %e, "cannot share a memfd; copying"),
            }
        }
        let map: Option<Arc<dyn AsRef<[u8]> + Send + Sync>> = match &detached {
            Some(d) => {
                self.cache.resident_chunks -= d.present.len() as u64;
                Some(d.map.clone())
            }
            None => None,
        };
        self.cache.taken.push(Taken {
            ino,
            dirty: dirty.clone(),
            attrs: attrs.clone(),
            detached,
        });
        for idx in dirty {
            let base = idx * CHUNK_SIZE;
            self.wrote = true;
            if base >= size {
                self.tables.remove_chunk(ino, idx);
                continue;
            }
            let len = (size - base).min(CHUNK_SIZE) as usize;
            match &map {
                Some(map) => {
                    // base + len <= size: inside the mapping, so it fits in usize
                    let range = base as usize..base as usize + len;
                    let Some(b) = SharedBytes::new(map.clone(), range) else {
                        let e = io_err("share memfd", ino, "chunk outside the mapping");
                        return self.check(Err(e));
                    };
                    self.tables.put_chunk_shared(ino, idx, b);
                }
                None => {
                    let buf = &mut self.cache.scratch[..len];
                    let r = read_memfd(&self.cache.files[&ino].memfd, base, buf)
                        .map_err(|e| io_err("read memfd", ino, e));
                    self.check(r)?;
                    self.tables.put_chunk(ino, idx, &self.cache.scratch[..len]);
                }
            }
        }
        if let Some(attrs) = attrs {
            let r = self.tables.put_inode(&attrs);
            self.write(r)?;
        }
        Ok(())
    }

    fn size_of(&mut self, ino: Ino) -> StoreResult<u64> {
        Ok(self.inode(ino)?.map_or(0, |i| i.size))
    }

    /// Over budget with `ino` staged, or `ino` due for write-behind: persist and empty its
    /// memfd.
    fn enforce_budget(&mut self, ino: Ino) -> StoreResult<()> {
        let Some(f) = self.cache.files.get(&ino) else {
            return Ok(());
        };
        if self.cache.resident_bytes() > self.cache.budget_bytes
            || f.dirty.len() >= self.cache.write_behind_chunks
        {
            self.evict(ino)?;
        }
        Ok(())
    }

    /// Persist `ino` and drop its memfd contents (over budget, write-behind), the latter once
    /// the operation succeeds (`ContentCache::end_op`).
    fn evict(&mut self, ino: Ino) -> StoreResult<()> {
        let size = self.size_of(ino)?;
        self.persist(ino, size)?;
        if !self.cache.evicted.contains(&ino) {
            self.cache.evicted.push(ino);
        }
        Ok(())
    }
}

/// Read `buf.len()` bytes at `offset`; bytes past the memfd's end read as zero.
fn read_memfd(memfd: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = memfd.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

fn new_memfd(ino: Ino) -> std::io::Result<File> {
    let memfd = memfd::MemfdOptions::default()
        .close_on_exec(true)
        .create(format!("spoolfs-{ino}"))
        .map_err(std::io::Error::other)?;
    Ok(memfd.into_file())
}

/// Give `f` a fresh, empty memfd and map the old one, whose bytes up to `size` the delta
/// then shares. On failure `f` keeps its memfd.
fn detach(f: &mut Staged, ino: Ino, size: u64) -> Result<Detached, StoreError> {
    let len = usize::try_from(size).map_err(|e| io_err("map memfd", ino, e))?;
    // Bytes past the memfd's end read as zeros; mapping them would fault (SIGBUS).
    let have = f
        .memfd
        .metadata()
        .map_err(|e| io_err("stat memfd", ino, e))?;
    if have.len() < size {
        f.memfd
            .set_len(size)
            .map_err(|e| io_err("extend memfd", ino, e))?;
    }
    // SAFETY: the mapping covers bytes below the memfd's length, and from here on nothing
    // writes or truncates this memfd: it leaves the file's staging buffer now, and comes back
    // only on rollback, once the delta that shared it has dropped every reference
    // (`restore`). So the bytes behind the slices never change or go away.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(&f.memfd) }
        .map_err(|e| io_err("map memfd", ino, e))?;
    let fresh = new_memfd(ino).map_err(|e| io_err("create memfd", ino, e))?;
    Ok(Detached {
        memfd: std::mem::replace(&mut f.memfd, fresh),
        map: Arc::new(map),
        present: std::mem::take(&mut f.present),
    })
}

/// Undo `detach` after a rollback dropped the delta's shares: the old memfd is the staging
/// buffer again (anything the rolled-back operation put in the fresh one goes with it).
/// Returns the chunks now present.
fn restore(f: &mut Staged, ino: Ino, d: Detached, dirty: &BTreeSet<u64>) -> u64 {
    let Detached {
        memfd,
        map,
        present,
    } = d;
    if Arc::strong_count(&map) == 1 {
        drop(map);
        f.memfd = memfd;
        f.present = present;
        return f.present.len() as u64;
    }
    // Something still reads the old memfd, so it must not be written again: copy the unsaved
    // chunks into the current one instead.
    for idx in dirty {
        let mut buf = zeroed(CHUNK);
        let base = idx * CHUNK_SIZE;
        let r = read_memfd(&memfd, base, &mut buf).and_then(|()| f.memfd.write_all_at(&buf, base));
        match r {
            Ok(()) => {
                f.present.insert(*idx);
            }
            Err(e) => error!(
                ino = ino.0,
                chunk = idx,
                error = %e,
                "cannot restore a rolled-back chunk into the staging buffer"
            ),
        }
    }
    f.present.len() as u64
}

fn punch(memfd: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
    };
    fallocate(
        memfd,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
    .map_err(std::io::Error::from)
}

impl Store for BatchStore<'_> {
    fn inode(&mut self, ino: Ino) -> StoreResult<Option<Inode>> {
        if let Some(attrs) = self.cache.files.get(&ino).and_then(|f| f.attrs.as_ref()) {
            return Ok(Some(attrs.clone()));
        }
        let r = self.tables.inode(ino);
        self.check(r)
    }

    fn put_inode(&mut self, inode: &Inode) -> StoreResult<()> {
        self.persist(inode.ino, inode.size)?;
        let r = self.tables.put_inode(inode);
        self.write(r)?;
        // Not only writes load chunks: punching a hole into part of a chunk zeroes it in the
        // memfd (fallocate, which ends with put_inode). Without this check every punch on an
        // open file could stage one more chunk, up to the whole file, whatever the budget.
        self.enforce_budget(inode.ino)
    }

    fn stage_inode(&mut self, inode: &Inode) -> StoreResult<()> {
        let Some(f) = self.cache.files.get_mut(&inode.ino) else {
            return self.put_inode(inode);
        };
        f.attrs = Some(inode.clone());
        self.enforce_budget(inode.ino)
    }

    fn remove_inode(&mut self, ino: Ino) -> StoreResult<()> {
        if let Some(f) = self.cache.files.remove(&ino) {
            self.cache.resident_chunks -= f.present.len() as u64;
        }
        let r = self.tables.remove_inode(ino);
        self.write(r)
    }

    fn dentry(&mut self, parent: Ino, name: &[u8]) -> StoreResult<Option<Dentry>> {
        let r = self.tables.dentry(parent, name);
        self.check(r)
    }

    fn put_dentry(&mut self, parent: Ino, name: &[u8], d: Dentry) -> StoreResult<()> {
        let r = self.tables.put_dentry(parent, name, d);
        self.write(r)
    }

    fn remove_dentry(&mut self, parent: Ino, name: &[u8]) -> StoreResult<()> {
        let r = self.tables.remove_dentry(parent, name);
        self.write(r)
    }

    fn dentries(
        &mut self,
        parent: Ino,
        after: Option<&[u8]>,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, Dentry)>> {
        let r = self.tables.dentries(parent, after, limit);
        self.check(r)
    }

    fn symlink_target(&mut self, ino: Ino) -> StoreResult<Option<Vec<u8>>> {
        let r = self.tables.symlink_target(ino);
        self.check(r)
    }

    fn put_symlink_target(&mut self, ino: Ino, target: &[u8]) -> StoreResult<()> {
        let r = self.tables.put_symlink_target(ino, target);
        self.write(r)
    }

    fn xattr(&mut self, ino: Ino, name: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let r = self.tables.xattr(ino, name);
        self.check(r)
    }

    fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> StoreResult<()> {
        let r = self.tables.put_xattr(ino, name, value);
        self.write(r)
    }

    fn remove_xattr(&mut self, ino: Ino, name: &[u8]) -> StoreResult<()> {
        let r = self.tables.remove_xattr(ino, name);
        self.write(r)
    }

    fn xattr_names(&mut self, ino: Ino) -> StoreResult<Vec<Vec<u8>>> {
        let r = self.tables.xattr_names(ino);
        self.check(r)
    }

    fn read_chunk(&mut self, ino: Ino, idx: u64, offset: usize, buf: &mut [u8]) -> StoreResult<()> {
        if let Some(f) = self.cache.files.get(&ino) {
            if f.present.contains(&idx) {
                let r = read_memfd(&f.memfd, idx * CHUNK_SIZE + offset as u64, buf)
                    .map_err(|e| io_err("read memfd", ino, e));
                return self.check(r);
            }
        }
        let r = self.tables.read_chunk(ino, idx, offset, buf);
        self.check(r)
    }

    fn write_chunk(&mut self, ino: Ino, idx: u64, offset: usize, data: &[u8]) -> StoreResult<()> {
        if !self.cache.files.contains_key(&ino) {
            let r = self.tables.write_chunk(ino, idx, offset, data);
            return self.write(r);
        }
        let base = idx * CHUNK_SIZE;
        let loaded = if self.cache.files[&ino].present.contains(&idx) {
            None
        } else {
            let r = self.tables.chunk(ino, idx);
            Some(self.check(r)?)
        };
        let Some(f) = self.cache.files.get_mut(&ino) else {
            return Ok(());
        };
        let mut r = Ok(());
        if let Some(stored) = loaded {
            if let Some(bytes) = stored {
                r = f.memfd.write_all_at(&bytes, base);
            }
            f.present.insert(idx);
            self.cache.resident_chunks += 1;
        }
        if r.is_ok() {
            r = f.memfd.write_all_at(data, base + offset as u64);
        }
        f.dirty.insert(idx);
        let r = r.map_err(|e| io_err("write memfd", ino, e));
        self.check(r)
    }

    fn truncate_chunk(&mut self, ino: Ino, idx: u64, len: usize) -> StoreResult<()> {
        if let Some(f) = self.cache.files.get_mut(&ino) {
            if f.present.contains(&idx) {
                f.dirty.insert(idx);
                let base = idx * CHUNK_SIZE;
                let r = punch(&f.memfd, base + len as u64, (CHUNK - len) as u64)
                    .map_err(|e| io_err("punch memfd", ino, e));
                return self.check(r);
            }
        }
        let r = self.tables.truncate_chunk(ino, idx, len);
        self.write(r)
    }

    fn remove_chunks(&mut self, ino: Ino, from: u64, to: Option<u64>) -> StoreResult<()> {
        if let Some(f) = self.cache.files.get_mut(&ino) {
            let end = to.unwrap_or(u64::MAX);
            let gone: Vec<u64> = f.present.range(from..end).copied().collect();
            for idx in &gone {
                f.present.remove(idx);
            }
            f.dirty.retain(|idx| *idx < from || *idx >= end);
            self.cache.resident_chunks -= gone.len() as u64;
            let mut r = Ok(());
            for idx in gone {
                r = r.and_then(|_| punch(&f.memfd, idx * CHUNK_SIZE, CHUNK_SIZE));
            }
            let r = r.map_err(|e| io_err("punch memfd", ino, e));
            self.check(r)?;
        }
        let r = self.tables.remove_chunks(ino, from, to);
        self.write(r)
    }

    fn next_chunk(&mut self, ino: Ino, from: u64) -> StoreResult<Option<u64>> {
        let staged = self
            .cache
            .files
            .get(&ino)
            .and_then(|f| f.present.range(from..).next().copied());
        let r = self.tables.next_chunk(ino, from);
        let stored = self.check(r)?;
        Ok(match (staged, stored) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn open_for_write(&mut self, ino: Ino) -> StoreResult<()> {
        if self.cache.files.contains_key(&ino) {
            return Ok(());
        }
        let memfd = new_memfd(ino).map_err(|e| io_err("create memfd", ino, e));
        let memfd = self.check(memfd)?;
        self.cache.files.insert(
            ino,
            Staged {
                memfd,
                present: BTreeSet::new(),
                dirty: BTreeSet::new(),
                attrs: None,
            },
        );
        Ok(())
    }

    fn flush(&mut self, ino: Ino) -> StoreResult<()> {
        let size = self.size_of(ino)?;
        self.persist(ino, size)
    }

    fn close_content(&mut self, ino: Ino) -> StoreResult<()> {
        self.flush(ino)?;
        if let Some(f) = self.cache.files.remove(&ino) {
            self.cache.resident_chunks -= f.present.len() as u64;
        }
        Ok(())
    }

    fn add_orphan(&mut self, ino: Ino) -> StoreResult<()> {
        let r = self.tables.add_orphan(ino);
        self.write(r)
    }

    fn remove_orphan(&mut self, ino: Ino) -> StoreResult<()> {
        let r = self.tables.remove_orphan(ino);
        self.write(r)
    }

    fn orphans(&mut self) -> StoreResult<Vec<Ino>> {
        let r = self.tables.orphans();
        self.check(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spoolfs_core::{data, Kind, Timestamp};

    const BUDGET: u64 = 4 * CHUNK_SIZE;

    fn file(ino: Ino, size: u64) -> Inode {
        Inode {
            size,
            ..Inode::new(ino, Kind::File, 0o644, (0, 0), Timestamp::default(), Ino(1))
        }
    }

    /// Every operation that loads chunks into a memfd ends within the budget: writes (the
    /// file written is evicted) and hole punches into parts of stored chunks (which zero
    /// them in the memfd: this once staged the whole file past any budget).
    #[test]
    fn operations_end_within_the_budget() -> Result<(), Box<dyn std::error::Error>> {
        // persists copied, and persists shared
        for share in [usize::MAX, 1] {
            end_within_the_budget(share)?;
        }
        Ok(())
    }

    fn end_within_the_budget(share: usize) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let db = spoolfs_store::open_database(&dir.path().join("db"))?;
        let mut state = Pending::new(db, None)?;
        let mut cache = ContentCache::new(BUDGET).with_share_min_chunks(share);
        let mut s = BatchStore::new(&mut state, &mut cache);
        let ino = Ino(2);
        let chunks = 32;
        let size = chunks * CHUNK_SIZE;
        s.put_inode(&file(ino, 0))?;
        s.open_for_write(ino)?;
        let block = vec![7u8; 3 * CHUNK + 100];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(block.len() as u64);
            data::write(&mut s, ino, pos, &block[..n as usize])?;
            s.stage_inode(&file(ino, pos + n))?;
            s.cache.end_op();
            assert!(s.cache.resident_bytes() <= BUDGET, "after write at {pos}");
            pos += n;
        }
        for idx in 0..chunks {
            let start = idx * CHUNK_SIZE + 100;
            data::punch_hole(&mut s, ino, start, start + 100, size)?;
            s.put_inode(&file(ino, size))?;
            s.cache.end_op();
            assert!(
                s.cache.resident_bytes() <= BUDGET,
                "after punch in chunk {idx}: {} bytes staged",
                s.cache.resident_bytes()
            );
        }
        // What was evicted was persisted first: every byte reads back.
        for idx in 0..chunks {
            let got = data::read(&mut s, ino, idx * CHUNK_SIZE, CHUNK)?;
            let mut want = vec![7u8; CHUNK];
            want[100..200].fill(0);
            assert!(got == want, "chunk {idx} reads back wrong");
        }
        assert!(s.failed.is_none());
        Ok(())
    }

    /// An operation rolled back after it persisted (and evicted) staged content leaves that
    /// content staged and unsaved: the pending records went with the rollback, so a later
    /// flush must write it again, from a memfd that still holds it.
    #[test]
    fn a_rolled_back_operation_leaves_its_persisted_content_unsaved(
    ) -> Result<(), Box<dyn std::error::Error>> {
        // persists copied, and persists shared (the detached memfd comes back)
        for share in [usize::MAX, 1] {
            rolled_back_persist_is_unsaved(share)?;
        }
        Ok(())
    }

    fn rolled_back_persist_is_unsaved(share: usize) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let db = spoolfs_store::open_database(&dir.path().join("db"))?;
        let mut state = Pending::new(db, None)?;
        let mut cache = ContentCache::new(BUDGET).with_share_min_chunks(share);
        let ino = Ino(2);
        let data = vec![9u8; 6 * CHUNK];
        {
            let mut s = BatchStore::new(&mut state, &mut cache);
            s.put_inode(&file(ino, 0))?;
            s.open_for_write(ino)?;
        }
        // One operation writes past the budget (evicting) and is then rolled back.
        state.current_mut().begin_batch();
        cache.begin_op();
        {
            let mut s = BatchStore::new(&mut state, &mut cache);
            data::write(&mut s, ino, 0, &data)?;
            s.stage_inode(&file(ino, data.len() as u64))?;
        }
        state.current_mut().rollback();
        cache.rollback_op();
        assert!(
            cache.dirty_chunks() > 0,
            "the rolled-back persist left nothing unsaved"
        );
        // A later flush stores every byte.
        let mut s = BatchStore::new(&mut state, &mut cache);
        s.stage_inode(&file(ino, data.len() as u64))?;
        s.flush(ino)?;
        s.cache.end_op();
        let got = data::read(&mut s, ino, 0, data.len())?;
        assert!(got == data, "content lost after a rollback");
        Ok(())
    }

    /// A file written past the write-behind size is persisted while it is still being
    /// written: its content goes to the pending changes in steps of that size (so commits
    /// write it beside the writes), its memfd holds at most one step, and a flush at the end
    /// has only the tail left. Every byte reads back.
    #[test]
    fn a_large_write_is_persisted_behind_the_writes() -> Result<(), Box<dyn std::error::Error>> {
        const STEP: usize = 4;
        let dir = tempfile::tempdir()?;
        let db = spoolfs_store::open_database(&dir.path().join("db"))?;
        let mut state = Pending::new(db, None)?;
        // no budget pressure: only the write-behind persists; shared and copied persists
        let mut cache = ContentCache::new(u64::MAX)
            .with_share_min_chunks(2)
            .with_write_behind_chunks(STEP);
        let ino = Ino(2);
        let chunks = 3 * STEP as u64 + 1;
        let size = chunks * CHUNK_SIZE;
        let content: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut s = BatchStore::new(&mut state, &mut cache);
        s.put_inode(&file(ino, 0))?;
        s.open_for_write(ino)?;
        // writes of a chunk and a half, so steps end inside a write and inside a chunk
        let block = CHUNK + CHUNK / 2;
        let mut pos = 0usize;
        while pos < content.len() {
            let end = (pos + block).min(content.len());
            data::write(&mut s, ino, pos as u64, &content[pos..end])?;
            s.stage_inode(&file(ino, end as u64))?;
            s.cache.end_op();
            assert!(
                s.cache.dirty_chunks() < STEP as u64,
                "after the write ending at {end}: {} dirty chunks",
                s.cache.dirty_chunks()
            );
            assert!(
                s.cache.resident_bytes() <= (STEP as u64 + 2) * CHUNK_SIZE,
                "after the write ending at {end}: {} bytes staged",
                s.cache.resident_bytes()
            );
            pos = end;
        }
        // Before any flush, all but the tail is in the pending changes already.
        let behind = s
            .tables
            .current()
            .records()
            .filter(|(key, value)| {
                matches!(key, spoolfs_store::pending::Key::Chunk(i, _) if *i == ino.0)
                    && value.is_some()
            })
            .count() as u64;
        assert!(
            behind >= chunks - STEP as u64,
            "only {behind} of {chunks} chunks persisted before the flush"
        );
        s.flush(ino)?;
        s.cache.end_op();
        assert_eq!(s.cache.dirty_chunks(), 0);
        let got = data::read(&mut s, ino, 0, content.len())?;
        assert!(got == content, "content differs after write-behind");
        assert!(s.failed.is_none());
        Ok(())
    }

    /// A shared persist hands the delta the file's memfd: writes after it (while that delta
    /// is being committed) must go to a new memfd and never change what the delta holds.
    #[test]
    fn a_shared_persist_is_not_changed_by_later_writes() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let db = spoolfs_store::open_database(&dir.path().join("db"))?;
        let mut state = Pending::new(db, None)?;
        let mut cache = ContentCache::new(u64::MAX).with_share_min_chunks(1);
        let ino = Ino(2);
        let size = 3 * CHUNK_SIZE + 5;
        for (round, byte) in [1u8, 2].into_iter().enumerate() {
            let mut s = BatchStore::new(&mut state, &mut cache);
            if round == 0 {
                s.put_inode(&file(ino, 0))?;
                s.open_for_write(ino)?;
            }
            data::write(&mut s, ino, 0, &vec![byte; size as usize])?;
            s.stage_inode(&file(ino, size))?;
            s.flush(ino)?;
            assert!(s.failed.is_none());
            s.cache.end_op();
            if round == 0 {
                // The first content goes to a commit, which is still running below.
                assert!(state.seal().is_some(), "nothing to commit");
            }
        }
        let sealed = state.sealed().cloned().ok_or("no commit in flight")?;
        let mut chunks = 0;
        for (key, value) in sealed.records() {
            if let spoolfs_store::pending::Key::Chunk(_, idx) = key {
                let bytes = value
                    .as_ref()
                    .and_then(|v| v.bytes())
                    .ok_or("chunk removed")?;
                let want = (size - idx * CHUNK_SIZE).min(CHUNK_SIZE) as usize;
                assert!(
                    bytes == vec![1u8; want],
                    "chunk {idx} changed under its commit"
                );
                chunks += 1;
            }
        }
        assert_eq!(chunks, 4);
        // And the file reads the second content.
        let mut s = BatchStore::new(&mut state, &mut cache);
        assert!(data::read(&mut s, ino, 0, size as usize)? == vec![2u8; size as usize]);
        Ok(())
    }
}
