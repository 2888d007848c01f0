//! Changes held in memory in front of redb, so the actor never waits for a commit.
//!
//! The actor applies every operation to `Pending::cur`, an ordered map of changed records
//! (`Delta`). Reads look in `cur`, then in the delta being committed (`sealed`), then in the
//! committed changes the log holds but redb does not yet (`logged`: the log writes them into
//! redb every few commits, see `wal`), then in a redb read snapshot taken after redb last
//! changed. A commit task makes one sealed delta at a time durable (`CommitJob::run`:
//! through the write-ahead log, `wal`, or straight into redb with `Durability::Immediate`),
//! so the fsync runs beside the actor instead of holding redb's single write lock while
//! requests wait; everything that arrives meanwhile goes into the next delta (group commit as
//! a pipeline stage).
//!
//! Every commit is durable before it counts: the log plus redb then always hold exactly the
//! snapshot's state, so after an I/O error (redb refuses further work until reopened) the
//! database can be reopened (replaying the log) without losing anything the actor still
//! shows, and the failed delta is retried. Deltas are committed in order, so a crash leaves a
//! prefix.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use redb::{
    Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata,
};
use spoolfs_core::mem_store::{copy_in, copy_out};
use spoolfs_core::{Dentry, Ino, Inode, Kind, Store, StoreError, StoreResult};

use crate::codec::{decode_inode, encode_inode};
use crate::wal::Wal;
use crate::*;

fn err(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{context}: {e}"))
}

/// The key of any record, ordered like the tables' keys so ranges line up.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Inode(u64),
    Dentry(u64, Vec<u8>),
    Xattr(u64, Vec<u8>),
    Symlink(u64),
    Chunk(u64, u64),
    Orphan(u64),
    Meta(&'static str),
}

/// A record's new value. Inodes stay decoded until they are committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Inode(Inode),
    Dentry(Dentry),
    /// Xattr value, symlink target or chunk content.
    Bytes(Vec<u8>),
    /// Chunk content left where it was staged (see `SharedBytes`).
    Shared(SharedBytes),
    Unit,
    U64(u64),
}

impl Value {
    fn len(&self) -> usize {
        match self {
            Value::Bytes(b) => b.len(),
            Value::Shared(b) => b.len(),
            _ => 16,
        }
    }

    /// The bytes of a `Bytes` or `Shared` value.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            Value::Shared(b) => Some(b.as_slice()),
            _ => None,
        }
    }
}

/// Content that stays where it was staged: a window into an immutable buffer shared by the
/// deltas that hold it (the runtime's detached memfd, mapped). A large flush so goes from
/// the staging buffer into redb's pages with one copy, on the commit task, instead of being
/// copied into the heap by the actor first (which, for 1 GiB, was a third of its time, most
/// of it faulting in fresh pages).
#[derive(Clone)]
pub struct SharedBytes {
    buf: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    end: usize,
}

impl SharedBytes {
    /// `buf[range]`, or `None` if the range is not inside it. The caller guarantees that the
    /// bytes behind `buf` never change.
    pub fn new(
        buf: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: std::ops::Range<usize>,
    ) -> Option<SharedBytes> {
        let len = (*buf).as_ref().len();
        (range.start <= range.end && range.end <= len).then_some(SharedBytes {
            buf,
            start: range.start,
            end: range.end,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.buf).as_ref()[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

impl PartialEq for SharedBytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for SharedBytes {}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.len())
    }
}

/// Fixed cost counted per changed record (map node, key), so many small changes count too.
const RECORD_OVERHEAD: usize = 64;

fn record_size(key: &Key, value: &Option<Value>) -> usize {
    let key_len = match key {
        Key::Dentry(_, n) | Key::Xattr(_, n) => n.len(),
        _ => 0,
    };
    RECORD_OVERHEAD + key_len + value.as_ref().map_or(0, Value::len)
}

/// Changed records: `Some(value)` is a put, `None` a removal.
#[derive(Debug, Default)]
pub struct Delta {
    map: BTreeMap<Key, Option<Value>>,
    bytes: usize,
    /// While a batch is applied: each change's previous entry, to undo a failed batch.
    undo: Option<Vec<(Key, Option<Option<Value>>)>>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Records changed.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Approximate memory held, for backpressure.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The changed records in key order (`None`: removed).
    pub fn records(&self) -> impl Iterator<Item = (&Key, &Option<Value>)> {
        self.map.iter()
    }

    /// Record a change (outside any batch's undo log unless one is open).
    pub fn set_record(&mut self, key: Key, value: Option<Value>) {
        self.set(key, value);
    }

    fn set(&mut self, key: Key, value: Option<Value>) {
        self.bytes += record_size(&key, &value);
        let old = self.map.insert(key.clone(), value);
        if let Some(old) = &old {
            self.bytes = self.bytes.saturating_sub(record_size(&key, old));
        }
        if let Some(undo) = &mut self.undo {
            undo.push((key, old));
        }
    }

    /// Start recording changes so that `rollback` can undo them.
    pub fn begin_batch(&mut self) {
        self.undo = Some(Vec::new());
    }

    /// Keep the batch's changes.
    pub fn end_batch(&mut self) {
        self.undo = None;
    }

    /// Undo every change since `begin_batch`.
    pub fn rollback(&mut self) {
        let Some(undo) = self.undo.take() else {
            return;
        };
        for (key, old) in undo.into_iter().rev() {
            if let Some(now) = self.map.get(&key) {
                self.bytes = self.bytes.saturating_sub(record_size(&key, now));
            }
            match old {
                Some(old) => {
                    self.bytes += record_size(&key, &old);
                    self.map.insert(key, old);
                }
                None => {
                    self.map.remove(&key);
                }
            }
        }
    }

    /// Put `newer`'s changes over this delta's (after a failed commit, the failed delta is
    /// merged under the one collected since, and both are retried together).
    pub fn absorb(&mut self, newer: Delta) {
        for (key, value) in newer.map {
            self.set(key, value);
        }
    }

    /// `absorb` of a delta someone else still holds.
    pub(crate) fn absorb_copy(&mut self, newer: &Delta) {
        for (key, value) in &newer.map {
            self.set(key.clone(), value.clone());
        }
    }

    /// The delta out of its `Arc`, copied only if it is still shared.
    fn unshared(delta: Arc<Delta>) -> Delta {
        Arc::try_unwrap(delta).unwrap_or_else(|shared| Delta {
            map: shared.map.clone(),
            bytes: shared.bytes,
            undo: None,
        })
    }
}

/// Every table, opened in one read transaction: the state of the last commit.
pub struct Snapshot {
    inodes: ReadOnlyTable<u64, &'static [u8]>,
    dentries: ReadOnlyTable<(u64, &'static [u8]), (u64, u8)>,
    xattrs: ReadOnlyTable<(u64, &'static [u8]), &'static [u8]>,
    symlinks: ReadOnlyTable<u64, &'static [u8]>,
    chunks: ReadOnlyTable<(u64, u64), &'static [u8]>,
    orphans: ReadOnlyTable<u64, ()>,
    meta: ReadOnlyTable<&'static str, u64>,
}

impl Snapshot {
    pub fn open(db: &Database) -> StoreResult<Self> {
        let txn = db.begin_read().map_err(|e| err("begin read", e))?;
        let o = |e: redb::TableError| err("open table", e);
        Ok(Snapshot {
            inodes: txn.open_table(INODES).map_err(o)?,
            dentries: txn.open_table(DENTRIES).map_err(o)?,
            xattrs: txn.open_table(XATTRS).map_err(o)?,
            symlinks: txn.open_table(SYMLINKS).map_err(o)?,
            chunks: txn.open_table(CHUNKS).map_err(o)?,
            orphans: txn.open_table(ORPHANS).map_err(o)?,
            meta: txn.open_table(META).map_err(o)?,
        })
    }

    fn get(&self, key: &Key) -> StoreResult<Option<Value>> {
        let g = |e| err("read", e);
        Ok(match key {
            Key::Inode(i) => match self.inodes.get(*i).map_err(g)? {
                None => None,
                Some(v) => Some(Value::Inode(
                    decode_inode(*i, v.value()).map_err(|e| err(&format!("inode {i}"), e))?,
                )),
            },
            Key::Dentry(p, n) => match self.dentries.get((*p, n.as_slice())).map_err(g)? {
                None => None,
                Some(v) => Some(Value::Dentry(dentry_of(*p, v.value())?)),
            },
            Key::Xattr(i, n) => self
                .xattrs
                .get((*i, n.as_slice()))
                .map_err(g)?
                .map(|v| Value::Bytes(v.value().to_vec())),
            Key::Symlink(i) => self
                .symlinks
                .get(*i)
                .map_err(g)?
                .map(|v| Value::Bytes(v.value().to_vec())),
            Key::Chunk(i, x) => self
                .chunks
                .get((*i, *x))
                .map_err(g)?
                .map(|v| Value::Bytes(v.value().to_vec())),
            Key::Orphan(i) => self.orphans.get(*i).map_err(g)?.map(|_| Value::Unit),
            Key::Meta(m) => self.meta.get(*m).map_err(g)?.map(|v| Value::U64(v.value())),
        })
    }

    /// Stored inodes (for the inode gauge).
    pub fn inode_count(&self) -> StoreResult<u64> {
        self.inodes.len().map_err(|e| err("count inodes", e))
    }
}

fn dentry_of(parent: u64, (ino, kind): (u64, u8)) -> StoreResult<Dentry> {
    let kind = Kind::from_byte(kind)
        .ok_or_else(|| StoreError(format!("dentry in {parent} has kind {kind}")))?;
    Ok(Dentry {
        ino: Ino(ino),
        kind,
    })
}

/// Merge an ordered stored range with the newer changes over it; at most `limit` results.
fn merge<K: Ord, V>(
    stored: impl Iterator<Item = StoreResult<(K, V)>>,
    changes: BTreeMap<K, Option<V>>,
    limit: usize,
) -> StoreResult<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut stored = stored.peekable();
    let mut changes = changes.into_iter().peekable();
    while out.len() < limit {
        let order = match (stored.peek(), changes.peek()) {
            (None, None) => break,
            (Some(Err(_)), _) => {
                if let Some(Err(e)) = stored.next() {
                    return Err(e);
                }
                continue;
            }
            (None, Some(_)) => std::cmp::Ordering::Less,
            (Some(Ok(_)), None) => std::cmp::Ordering::Greater,
            (Some(Ok((sk, _))), Some((ck, _))) => ck.cmp(sk),
        };
        if order == std::cmp::Ordering::Equal {
            // The change replaces the stored record.
            stored.next();
        }
        if order != std::cmp::Ordering::Greater {
            if let Some((k, Some(v))) = changes.next() {
                out.push((k, v));
            }
        } else if let Some(Ok(kv)) = stored.next() {
            out.push(kv);
        }
    }
    Ok(out)
}

/// The actor's view of all state: pending changes over the last commit.
pub struct Pending {
    /// `None` while the database is closed after an I/O error (see `reopen`).
    db: Option<Arc<Database>>,
    snap: Option<Snapshot>,
    cur: Delta,
    sealed: Option<Arc<Delta>>,
    /// Committed (durable in the log) but not yet in redb: the same changes as the log's
    /// `Wal::has_unapplied`, under `sealed`.
    logged: Delta,
    /// The write-ahead log; `None` while a commit holds it, or if the runtime commits to redb
    /// directly.
    wal: Option<Wal>,
}

/// One commit: a sealed delta, the database, and the log it goes through first.
pub struct CommitJob {
    db: Arc<Database>,
    delta: Arc<Delta>,
    wal: Option<Wal>,
}

impl CommitJob {
    /// Make the delta durable (runs on a blocking task). Hands the log back, and lets go of
    /// the database before returning, so that the actor may reopen it.
    pub fn run(self) -> (Result<(), CommitFailure>, Option<Wal>) {
        self.run_notifying(|| {})
    }

    /// `run`, calling `on_durable` once the delta is durable, which with the log is before
    /// the commit ends (see `Wal::commit_notifying`).
    pub fn run_notifying(
        self,
        on_durable: impl FnOnce(),
    ) -> (Result<(), CommitFailure>, Option<Wal>) {
        let CommitJob { db, delta, wal } = self;
        match wal {
            Some(mut wal) => {
                let r = wal.commit_notifying(&db, &delta, on_durable);
                (r, Some(wal))
            }
            None => {
                let r = commit_delta(&db, &delta);
                if r.is_ok() {
                    on_durable();
                }
                (r, None)
            }
        }
    }
}

impl Pending {
    pub fn new(db: Database, wal: Option<Wal>) -> StoreResult<Self> {
        let snap = Snapshot::open(&db)?;
        Ok(Pending {
            db: Some(Arc::new(db)),
            snap: Some(snap),
            cur: Delta::default(),
            sealed: None,
            logged: Delta::default(),
            wal,
        })
    }

    /// The database, unless it is closed after an I/O error.
    pub fn db(&self) -> Option<&Arc<Database>> {
        self.db.as_ref()
    }

    fn snap(&self) -> StoreResult<&Snapshot> {
        self.snap.as_ref().ok_or_else(|| {
            StoreError("the database is closed after an I/O error and could not be reopened".into())
        })
    }

    /// Stored inodes (for the inode gauge).
    pub fn inode_count(&self) -> StoreResult<u64> {
        self.snap()?.inode_count()
    }

    /// Changes not yet handed to a commit.
    pub fn current(&self) -> &Delta {
        &self.cur
    }

    pub fn current_mut(&mut self) -> &mut Delta {
        &mut self.cur
    }

    /// Bytes of changes not yet in the database file: current, being committed, and logged.
    pub fn unwritten_bytes(&self) -> usize {
        self.cur
            .bytes()
            .saturating_add(self.sealed.as_ref().map_or(0, |d| d.bytes()))
            .saturating_add(self.logged.bytes())
    }

    /// A delta is being committed.
    pub fn sealed(&self) -> Option<&Arc<Delta>> {
        self.sealed.as_ref()
    }

    /// Hand the current changes to a commit. Only one commit runs at a time, and none while
    /// the database is closed.
    pub fn seal(&mut self) -> Option<CommitJob> {
        if self.sealed.is_some() {
            return None;
        }
        let db = self.db.clone()?;
        let delta = Arc::new(std::mem::take(&mut self.cur));
        self.sealed = Some(delta.clone());
        Some(CommitJob {
            db,
            delta,
            wal: self.wal.take(),
        })
    }

    /// The sealed delta is durable. If the log has written everything into redb, read it
    /// from a new snapshot; otherwise it joins the logged changes over the old one (redb has
    /// not changed since it was taken).
    pub fn committed(&mut self, wal: Option<Wal>) -> StoreResult<()> {
        self.wal = self.wal.take().or(wal);
        let sealed = self.sealed.take();
        if self.wal.as_ref().is_some_and(Wal::has_unapplied) {
            if let Some(sealed) = sealed {
                self.logged.absorb(Delta::unshared(sealed));
            }
            return Ok(());
        }
        self.logged = Delta::default();
        self.snap = None;
        let db = self
            .db
            .as_ref()
            .ok_or_else(|| StoreError("database closed".into()))?;
        self.snap = Some(Snapshot::open(db)?);
        Ok(())
    }

    /// Make redb alone hold everything committed (before the daemon exits, so the data dir
    /// needs no log replay). Only with no commit running.
    pub fn checkpoint(&mut self) -> Result<(), CommitFailure> {
        match (&self.db, &mut self.wal) {
            (Some(db), Some(wal)) => wal.checkpoint(db, None),
            _ => Ok(()),
        }
    }

    /// The sealed delta could not be committed: its changes go back under the current ones,
    /// to be retried, and the database is closed (redb refuses all work after an I/O error
    /// until it is reopened). Call once the commit task has let go of the database. The log
    /// is reopened (and replayed) with the database.
    pub fn commit_failed(&mut self) {
        if let Some(sealed) = self.sealed.take() {
            let newer = std::mem::replace(&mut self.cur, Delta::unshared(sealed));
            self.cur.absorb(newer);
        }
        // The log holds them: reopening replays them into redb.
        self.logged = Delta::default();
        self.snap = None;
        self.db = None;
        self.wal = None;
    }

    /// Open the database of `data_dir` again after `commit_failed`, replaying the log. Every
    /// commit was durable (in the log or in redb), so it then holds exactly the state the
    /// closed snapshot showed; nothing the actor answered is lost.
    pub fn reopen(&mut self, data_dir: &Path) -> StoreResult<()> {
        self.logged = Delta::default();
        self.snap = None;
        self.db = None;
        self.wal = None;
        let db = open_database(&data_dir.join(DB_FILE)).map_err(|e| err("reopen database", e))?;
        let (wal, _) = Wal::open(&db, data_dir).map_err(|e| err("replay the log", e))?;
        self.snap = Some(Snapshot::open(&db)?);
        self.db = Some(Arc::new(db));
        self.wal = Some(wal);
        Ok(())
    }

    /// Every record as the actor sees it (tests and diagnostics: reads every table).
    pub fn records(&self) -> StoreResult<BTreeMap<Key, Value>> {
        let snap = self.snap()?;
        let e = |e: redb::StorageError| err("read all", e);
        let mut out = BTreeMap::new();
        for r in snap.inodes.iter().map_err(e)? {
            let (k, v) = r.map_err(e)?;
            let i = k.value();
            let inode = decode_inode(i, v.value()).map_err(|x| err(&format!("inode {i}"), x))?;
            out.insert(Key::Inode(i), Value::Inode(inode));
        }
        for r in snap.dentries.iter().map_err(e)? {
            let (k, v) = r.map_err(e)?;
            let (p, n) = k.value();
            out.insert(
                Key::Dentry(p, n.to_vec()),
                Value::Dentry(dentry_of(p, v.value())?),
            );
        }
        for r in snap.xattrs.iter().map_err(e)? {
            let (k, v) = r.map_err(e)?;
            let (i, n) = k.value();
            out.insert(Key::Xattr(i, n.to_vec()), Value::Bytes(v.value().to_vec()));
        }
        for r in snap.symlinks.iter().map_err(e)? {
            let (k, v) = r.map_err(e)?;
            out.insert(Key::Symlink(k.value()), Value::Bytes(v.value().to_vec()));
        }
        for r in snap.chunks.iter().map_err(e)? {
            let (k, v) = r.map_err(e)?;
            let (i, x) = k.value();
            out.insert(Key::Chunk(i, x), Value::Bytes(v.value().to_vec()));
        }
        for r in snap.orphans.iter().map_err(e)? {
            out.insert(Key::Orphan(r.map_err(e)?.0.value()), Value::Unit);
        }
        for layer in self.layers() {
            for (k, v) in &layer.map {
                match v {
                    Some(v) => out.insert(k.clone(), v.clone()),
                    None => out.remove(k),
                };
            }
        }
        Ok(out)
    }

    /// The changes held in memory, oldest first: logged, sealed, current.
    fn layers(&self) -> impl DoubleEndedIterator<Item = &Delta> {
        [Some(&self.logged), self.sealed.as_deref(), Some(&self.cur)]
            .into_iter()
            .flatten()
    }

    fn get(&self, key: &Key) -> StoreResult<Option<Value>> {
        match self.with_pending(key, |v| v.cloned()) {
            Some(v) => Ok(v),
            None => self.snap()?.get(key),
        }
    }

    /// Apply `f` to the newest version of a record held in memory, if any, without cloning.
    fn with_pending<R>(&self, key: &Key, f: impl FnOnce(Option<&Value>) -> R) -> Option<R> {
        self.layers()
            .rev()
            .find_map(|layer| layer.map.get(key))
            .map(|v| f(v.as_ref()))
    }

    /// Pending changes from `from` on, while `pick` maps their keys (it returns `None` past
    /// the end of the range); newer layers win.
    fn changes<K: Ord, V>(
        &self,
        from: &Key,
        pick: impl Fn(&Key) -> Option<K>,
        value: impl Fn(&Value) -> Option<V>,
    ) -> BTreeMap<K, Option<V>> {
        let mut out = BTreeMap::new();
        for layer in self.layers() {
            for (k, v) in layer.map.range(from..) {
                let Some(k) = pick(k) else { break };
                out.insert(k, v.as_ref().and_then(&value));
            }
        }
        out
    }

    fn put(&mut self, key: Key, value: Value) {
        self.cur.set(key, Some(value));
    }

    fn delete(&mut self, key: Key) {
        self.cur.set(key, None);
    }

    fn chunk_indexes(&self, ino: Ino, from: u64, to: u64, limit: usize) -> StoreResult<Vec<u64>> {
        let changes = self.changes(
            &Key::Chunk(ino.0, from),
            |k| match k {
                Key::Chunk(i, x) if *i == ino.0 && *x < to => Some(*x),
                _ => None,
            },
            |_| Some(()),
        );
        let stored = self
            .snap()?
            .chunks
            .range((ino.0, from)..)
            .map_err(|e| err("list chunks", e))?
            .map(|r| r.map(|(k, _)| k.value()).map_err(|e| err("list chunks", e)))
            .take_while(|r| r.as_ref().map_or(true, |(i, x)| *i == ino.0 && *x < to))
            .map(|r| r.map(|(_, x)| (x, ())));
        Ok(merge(stored, changes, limit)?
            .into_iter()
            .map(|(x, ())| x)
            .collect())
    }

    /// The stored bytes of one chunk (for the runtime's staging buffers).
    pub fn chunk(&self, ino: Ino, idx: u64) -> StoreResult<Option<Vec<u8>>> {
        Ok(match self.get(&Key::Chunk(ino.0, idx))? {
            Some(Value::Bytes(b)) => Some(b),
            Some(Value::Shared(b)) => Some(b.as_slice().to_vec()),
            _ => None,
        })
    }

    pub fn put_chunk(&mut self, ino: Ino, idx: u64, bytes: &[u8]) {
        self.put(Key::Chunk(ino.0, idx), Value::Bytes(bytes.to_vec()));
    }

    /// `put_chunk` without copying the bytes.
    pub fn put_chunk_shared(&mut self, ino: Ino, idx: u64, bytes: SharedBytes) {
        self.put(Key::Chunk(ino.0, idx), Value::Shared(bytes));
    }

    pub fn remove_chunk(&mut self, ino: Ino, idx: u64) {
        self.delete(Key::Chunk(ino.0, idx));
    }

    pub fn meta(&self, key: &'static str) -> StoreResult<Option<u64>> {
        Ok(match self.get(&Key::Meta(key))? {
            Some(Value::U64(v)) => Some(v),
            _ => None,
        })
    }

    pub fn set_meta(&mut self, key: &'static str, value: u64) {
        self.put(Key::Meta(key), Value::U64(value));
    }
}

/// Why a commit failed: `no_space` when the disk is full (the caller gets ENOSPC, not EIO).
#[derive(Debug, Clone)]
pub struct CommitFailure {
    pub message: String,
    pub no_space: bool,
}

impl std::fmt::Display for CommitFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The OS said the disk (or quota) is full.
pub(crate) fn is_no_space(e: &redb::StorageError) -> bool {
    matches!(e, redb::StorageError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull
        || io.raw_os_error() == Some(libc::ENOSPC))
}

/// Write one delta into the database and make it durable (runs on a blocking task; the
/// runtime normally goes through the write-ahead log instead, `wal::Wal::commit`).
pub fn commit_delta(db: &Database, delta: &Delta) -> Result<(), CommitFailure> {
    write_deltas(db, &[delta], Durability::Immediate, None)
}

/// Write `deltas`, oldest first, in one transaction with `durability`; `round` also records
/// the write-ahead log's next entry number and salt (`meta.wal_seq`, `meta.wal_salt`).
pub(crate) fn write_deltas(
    db: &Database,
    deltas: &[&Delta],
    durability: Durability,
    round: Option<(u64, u64)>,
) -> Result<(), CommitFailure> {
    let fail = |context: &str, e: &dyn std::fmt::Display, no_space: bool| CommitFailure {
        message: format!("{context}: {e}"),
        no_space,
    };
    let mut txn = db
        .begin_write()
        .map_err(|e| fail("begin write", &e, false))?;
    txn.set_durability(durability)
        .map_err(|e| fail("set durability", &e, false))?;
    {
        let mut t = Tables::open(&txn).map_err(|e| fail("open tables", &e, false))?;
        for (key, value) in deltas.iter().flat_map(|d| &d.map) {
            write_record(&mut t, key, value.as_ref())
                .map_err(|e| fail("write", &e, is_no_space(&e)))?;
        }
        if let Some((seq, salt)) = round {
            t.set_meta(META_WAL_SEQ, seq)
                .and_then(|()| t.set_meta(META_WAL_SALT, salt))
                .map_err(|e| fail("write meta", &e, false))?;
        }
    }
    txn.commit().map_err(|e| {
        let no_space = matches!(&e, redb::CommitError::Storage(s) if is_no_space(s));
        fail("commit", &e, no_space)
    })
}

pub(crate) fn write_record(
    t: &mut Tables<'_>,
    key: &Key,
    value: Option<&Value>,
) -> Result<(), redb::StorageError> {
    match (key, value) {
        (Key::Inode(i), Some(Value::Inode(n))) => {
            t.inodes.insert(*i, encode_inode(n).as_slice())?;
        }
        (Key::Inode(i), _) => {
            t.inodes.remove(*i)?;
        }
        (Key::Dentry(p, n), Some(Value::Dentry(d))) => {
            t.dentries
                .insert((*p, n.as_slice()), (d.ino.0, d.kind.to_byte()))?;
        }
        (Key::Dentry(p, n), _) => {
            t.dentries.remove((*p, n.as_slice()))?;
        }
        (Key::Xattr(i, n), Some(Value::Bytes(v))) => {
            t.xattrs.insert((*i, n.as_slice()), v.as_slice())?;
        }
        (Key::Xattr(i, n), _) => {
            t.xattrs.remove((*i, n.as_slice()))?;
        }
        (Key::Symlink(i), Some(Value::Bytes(v))) => {
            t.symlinks.insert(*i, v.as_slice())?;
        }
        (Key::Symlink(i), _) => {
            t.symlinks.remove(*i)?;
        }
        (Key::Chunk(i, x), Some(v @ (Value::Bytes(_) | Value::Shared(_)))) => {
            t.chunks.insert((*i, *x), v.bytes().unwrap_or_default())?;
        }
        (Key::Chunk(i, x), _) => {
            t.chunks.remove((*i, *x))?;
        }
        (Key::Orphan(i), Some(_)) => {
            t.orphans.insert(*i, ())?;
        }
        (Key::Orphan(i), None) => {
            t.orphans.remove(*i)?;
        }
        (Key::Meta(m), Some(Value::U64(v))) => {
            t.meta.insert(*m, *v)?;
        }
        (Key::Meta(m), _) => {
            t.meta.remove(*m)?;
        }
    }
    Ok(())
}

impl Store for Pending {
    fn inode(&mut self, ino: Ino) -> StoreResult<Option<Inode>> {
        Ok(match self.get(&Key::Inode(ino.0))? {
            Some(Value::Inode(n)) => Some(n),
            _ => None,
        })
    }

    fn put_inode(&mut self, inode: &Inode) -> StoreResult<()> {
        self.put(Key::Inode(inode.ino.0), Value::Inode(inode.clone()));
        Ok(())
    }

    fn remove_inode(&mut self, ino: Ino) -> StoreResult<()> {
        self.delete(Key::Inode(ino.0));
        self.delete(Key::Symlink(ino.0));
        for name in self.xattr_names(ino)? {
            self.delete(Key::Xattr(ino.0, name));
        }
        self.remove_chunks(ino, 0, None)
    }

    fn dentry(&mut self, parent: Ino, name: &[u8]) -> StoreResult<Option<Dentry>> {
        let key = Key::Dentry(parent.0, name.to_vec());
        if let Some(v) = self.with_pending(&key, |v| match v {
            Some(Value::Dentry(d)) => Some(*d),
            _ => None,
        }) {
            return Ok(v);
        }
        match self
            .snap()?
            .dentries
            .get((parent.0, name))
            .map_err(|e| err("read dentry", e))?
        {
            None => Ok(None),
            Some(v) => dentry_of(parent.0, v.value()).map(Some),
        }
    }

    fn put_dentry(&mut self, parent: Ino, name: &[u8], d: Dentry) -> StoreResult<()> {
        self.put(Key::Dentry(parent.0, name.to_vec()), Value::Dentry(d));
        Ok(())
    }

    fn remove_dentry(&mut self, parent: Ino, name: &[u8]) -> StoreResult<()> {
        self.delete(Key::Dentry(parent.0, name.to_vec()));
        Ok(())
    }

    fn dentries(
        &mut self,
        parent: Ino,
        after: Option<&[u8]>,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, Dentry)>> {
        let p = parent.0;
        let start = after.unwrap_or(&[]);
        let skip = |name: &[u8]| after.is_some_and(|a| a == name);
        let changes = self.changes(
            &Key::Dentry(p, start.to_vec()),
            |k| match k {
                Key::Dentry(pp, n) if *pp == p => Some(n.clone()),
                _ => None,
            },
            |v| match v {
                Value::Dentry(d) => Some(*d),
                _ => None,
            },
        );
        let mut changes = changes;
        if let Some(a) = after {
            changes.remove(a);
        }
        let stored = self
            .snap()?
            .dentries
            .range((p, start)..)
            .map_err(|e| err("list dentries", e))?
            .map(|r| r.map_err(|e| err("list dentries", e)))
            .take_while(|r| r.as_ref().map_or(true, |(k, _)| k.value().0 == p))
            .filter(|r| r.as_ref().map_or(true, |(k, _)| !skip(k.value().1)))
            .map(|r| r.and_then(|(k, v)| Ok((k.value().1.to_vec(), dentry_of(p, v.value())?))));
        merge(stored, changes, limit)
    }

    fn symlink_target(&mut self, ino: Ino) -> StoreResult<Option<Vec<u8>>> {
        Ok(match self.get(&Key::Symlink(ino.0))? {
            Some(Value::Bytes(b)) => Some(b),
            _ => None,
        })
    }

    fn put_symlink_target(&mut self, ino: Ino, target: &[u8]) -> StoreResult<()> {
        self.put(Key::Symlink(ino.0), Value::Bytes(target.to_vec()));
        Ok(())
    }

    fn xattr(&mut self, ino: Ino, name: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(match self.get(&Key::Xattr(ino.0, name.to_vec()))? {
            Some(Value::Bytes(b)) => Some(b),
            _ => None,
        })
    }

    fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> StoreResult<()> {
        self.put(
            Key::Xattr(ino.0, name.to_vec()),
            Value::Bytes(value.to_vec()),
        );
        Ok(())
    }

    fn remove_xattr(&mut self, ino: Ino, name: &[u8]) -> StoreResult<()> {
        self.delete(Key::Xattr(ino.0, name.to_vec()));
        Ok(())
    }

    fn xattr_names(&mut self, ino: Ino) -> StoreResult<Vec<Vec<u8>>> {
        let i = ino.0;
        let changes = self.changes(
            &Key::Xattr(i, Vec::new()),
            |k| match k {
                Key::Xattr(ii, n) if *ii == i => Some(n.clone()),
                _ => None,
            },
            |_| Some(()),
        );
        let empty: &[u8] = &[];
        let stored = self
            .snap()?
            .xattrs
            .range((i, empty)..)
            .map_err(|e| err("list xattrs", e))?
            .map(|r| r.map_err(|e| err("list xattrs", e)))
            .take_while(|r| r.as_ref().map_or(true, |(k, _)| k.value().0 == i))
            .map(|r| r.map(|(k, _)| (k.value().1.to_vec(), ())));
        Ok(merge(stored, changes, usize::MAX)?
            .into_iter()
            .map(|(n, ())| n)
            .collect())
    }

    fn read_chunk(&mut self, ino: Ino, idx: u64, offset: usize, buf: &mut [u8]) -> StoreResult<()> {
        buf.fill(0);
        let key = Key::Chunk(ino.0, idx);
        let pending = self.with_pending(&key, |v| {
            if let Some(b) = v.and_then(Value::bytes) {
                copy_out(b, offset, buf);
            }
        });
        if pending.is_none() {
            if let Some(v) = self
                .snap()?
                .chunks
                .get((ino.0, idx))
                .map_err(|e| err("read chunk", e))?
            {
                copy_out(v.value(), offset, buf);
            }
        }
        Ok(())
    }

    fn write_chunk(&mut self, ino: Ino, idx: u64, offset: usize, data: &[u8]) -> StoreResult<()> {
        let mut chunk = self.chunk(ino, idx)?.unwrap_or_default();
        copy_in(&mut chunk, offset, data);
        self.put(Key::Chunk(ino.0, idx), Value::Bytes(chunk));
        Ok(())
    }

    fn truncate_chunk(&mut self, ino: Ino, idx: u64, len: usize) -> StoreResult<()> {
        if let Some(mut chunk) = self.chunk(ino, idx)? {
            if chunk.len() > len {
                chunk.truncate(len);
                self.put(Key::Chunk(ino.0, idx), Value::Bytes(chunk));
            }
        }
        Ok(())
    }

    fn remove_chunks(&mut self, ino: Ino, from: u64, to: Option<u64>) -> StoreResult<()> {
        for idx in self.chunk_indexes(ino, from, to.unwrap_or(u64::MAX), usize::MAX)? {
            self.delete(Key::Chunk(ino.0, idx));
        }
        // A chunk at index u64::MAX is past any file size limit, so it never exists.
        Ok(())
    }

    fn next_chunk(&mut self, ino: Ino, from: u64) -> StoreResult<Option<u64>> {
        Ok(self
            .chunk_indexes(ino, from, u64::MAX, 1)?
            .into_iter()
            .next())
    }

    fn add_orphan(&mut self, ino: Ino) -> StoreResult<()> {
        self.put(Key::Orphan(ino.0), Value::Unit);
        Ok(())
    }

    fn remove_orphan(&mut self, ino: Ino) -> StoreResult<()> {
        self.delete(Key::Orphan(ino.0));
        Ok(())
    }

    fn orphans(&mut self) -> StoreResult<Vec<Ino>> {
        let changes = self.changes(
            &Key::Orphan(0),
            |k| match k {
                Key::Orphan(i) => Some(*i),
                _ => None,
            },
            |_| Some(()),
        );
        let stored = self
            .snap()?
            .orphans
            .iter()
            .map_err(|e| err("list orphans", e))?
            .map(|r| {
                r.map(|(k, _)| (k.value(), ()))
                    .map_err(|e| err("list orphans", e))
            });
        Ok(merge(stored, changes, usize::MAX)?
            .into_iter()
            .map(|(i, ())| Ino(i))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &[(u32, u32)]) -> Vec<StoreResult<(u32, u32)>> {
        x.iter().map(|kv| Ok(*kv)).collect()
    }

    #[test]
    fn merge_prefers_changes_and_drops_removals() -> StoreResult<()> {
        let stored = s(&[(1, 10), (2, 20), (4, 40)]);
        let changes = BTreeMap::from([(2, None), (3, Some(30)), (4, Some(41)), (5, Some(50))]);
        let got = merge(stored.into_iter(), changes, usize::MAX)?;
        assert_eq!(got, vec![(1, 10), (3, 30), (4, 41), (5, 50)]);
        Ok(())
    }

    #[test]
    fn merge_honours_limit_across_removals() -> StoreResult<()> {
        let stored = s(&[(1, 10), (2, 20), (3, 30)]);
        let changes = BTreeMap::from([(1, None), (2, None)]);
        let got = merge(stored.into_iter(), changes, 1)?;
        assert_eq!(got, vec![(3, 30)]);
        Ok(())
    }

    #[test]
    fn rollback_restores_previous_entries() {
        let mut d = Delta::default();
        d.set(Key::Orphan(1), Some(Value::Unit));
        let before = d.bytes();
        d.begin_batch();
        d.set(Key::Orphan(1), None);
        d.set(Key::Orphan(2), Some(Value::Unit));
        d.rollback();
        assert_eq!(d.map.get(&Key::Orphan(1)), Some(&Some(Value::Unit)));
        assert!(!d.map.contains_key(&Key::Orphan(2)));
        assert_eq!(d.bytes(), before);
    }
}
