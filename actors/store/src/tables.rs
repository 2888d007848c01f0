//! The tables of one write transaction, implementing the core's `Store` port directly.

use std::path::Path;

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, WriteTransaction,
};
use spoolfs_core::mem_store::{copy_in, copy_out};
use spoolfs_core::{Dentry, Ino, Inode, Kind, Store, StoreError, StoreResult};

use crate::codec::{decode_inode, encode_inode};
use crate::*;

fn err(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{context}: {e}"))
}

/// Why a data directory's database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open database {path}: {source}")]
    Database {
        path: String,
        #[source]
        source: redb::DatabaseError,
    },
    #[error(
        "database {path} has schema version {found}, this spoolfs understands 1 to {SCHEMA_VERSION}: \
         it was written by a newer spoolfs; use that release"
    )]
    Schema { path: String, found: u64 },
    #[error("cannot initialise database {path}: {message}")]
    Init { path: String, message: String },
}

/// redb's own page cache. Its default (1 GiB) made the daemon's RSS follow the database size;
/// reads that miss this cache still hit the kernel's page cache, so a modest fixed size keeps
/// memory bounded (memfd budget + pending changes + this) at little cost.
const CACHE_BYTES: usize = 64 << 20;

/// Open (or create) the database and check or stamp its schema version. `Wal::open` must
/// follow: it replays the log and upgrades an older schema (`migrate`).
pub fn open_database(path: &Path) -> Result<Database, OpenError> {
    let shown = path.display().to_string();
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|source| OpenError::Database {
            path: shown.clone(),
            source,
        })?;
    let init = |m: String| OpenError::Init {
        path: shown.clone(),
        message: m,
    };
    let found = {
        let read = db.begin_read().map_err(|e| init(e.to_string()))?;
        match read.open_table(META) {
            Ok(meta) => meta
                .get(META_SCHEMA_VERSION)
                .map_err(|e| init(e.to_string()))?
                .map(|v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(init(e.to_string())),
        }
    };
    match found {
        // Older versions are upgraded by `Wal::open`, after the log (written in their
        // layout) is replayed: open a database only through both.
        Some(1..=SCHEMA_VERSION) => {}
        Some(other) => {
            return Err(OpenError::Schema {
                path: shown,
                found: other,
            })
        }
        None => {
            let txn = db.begin_write().map_err(|e| init(e.to_string()))?;
            {
                // Creating every table up front lets readers assume they exist.
                let mut t = Tables::open(&txn).map_err(|e| init(e.to_string()))?;
                t.set_meta(META_SCHEMA_VERSION, SCHEMA_VERSION)
                    .map_err(|e| init(e.to_string()))?;
                t.set_meta(META_NEXT_INO, 2)
                    .map_err(|e| init(e.to_string()))?;
            }
            txn.commit().map_err(|e| init(e.to_string()))?;
        }
    }
    Ok(db)
}

/// Every table, opened in one write transaction.
pub struct Tables<'txn> {
    pub inodes: Table<'txn, u64, &'static [u8]>,
    pub dentries: Table<'txn, (u64, &'static [u8]), (u64, u8)>,
    pub xattrs: Table<'txn, (u64, &'static [u8]), &'static [u8]>,
    pub symlinks: Table<'txn, u64, &'static [u8]>,
    pub chunks: Table<'txn, (u64, u64), &'static [u8]>,
    pub orphans: Table<'txn, u64, ()>,
    pub meta: Table<'txn, &'static str, u64>,
}

impl<'txn> Tables<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> StoreResult<Self> {
        let o = |e: redb::TableError| err("open table", e);
        Ok(Tables {
            inodes: txn.open_table(INODES).map_err(o)?,
            dentries: txn.open_table(DENTRIES).map_err(o)?,
            xattrs: txn.open_table(XATTRS).map_err(o)?,
            symlinks: txn.open_table(SYMLINKS).map_err(o)?,
            chunks: txn.open_table(CHUNKS).map_err(o)?,
            orphans: txn.open_table(ORPHANS).map_err(o)?,
            meta: txn.open_table(META).map_err(o)?,
        })
    }

    pub fn meta(&self, key: &str) -> StoreResult<Option<u64>> {
        Ok(self
            .meta
            .get(key)
            .map_err(|e| err("read meta", e))?
            .map(|v| v.value()))
    }

    pub fn set_meta(&mut self, key: &str, value: u64) -> StoreResult<()> {
        self.meta
            .insert(key, value)
            .map_err(|e| err("write meta", e))?;
        Ok(())
    }

    /// The stored bytes of one chunk (for the runtime's staging buffers and fsck).
    pub fn chunk(&self, ino: Ino, idx: u64) -> StoreResult<Option<Vec<u8>>> {
        Ok(self
            .chunks
            .get((ino.0, idx))
            .map_err(|e| err("read chunk", e))?
            .map(|v| v.value().to_vec()))
    }

    pub fn put_chunk(&mut self, ino: Ino, idx: u64, bytes: &[u8]) -> StoreResult<()> {
        self.chunks
            .insert((ino.0, idx), bytes)
            .map_err(|e| err("write chunk", e))?;
        Ok(())
    }

    pub fn remove_chunk(&mut self, ino: Ino, idx: u64) -> StoreResult<()> {
        self.chunks
            .remove((ino.0, idx))
            .map_err(|e| err("remove chunk", e))?;
        Ok(())
    }

    pub fn inode_count(&self) -> StoreResult<u64> {
        self.inodes.len().map_err(|e| err("count inodes", e))
    }
}

impl Store for Tables<'_> {
    fn inode(&mut self, ino: Ino) -> StoreResult<Option<Inode>> {
        match self.inodes.get(ino.0).map_err(|e| err("read inode", e))? {
            None => Ok(None),
            Some(v) => decode_inode(ino.0, v.value())
                .map(Some)
                .map_err(|e| err(&format!("inode {ino}"), e)),
        }
    }

    fn put_inode(&mut self, inode: &Inode) -> StoreResult<()> {
        self.inodes
            .insert(inode.ino.0, encode_inode(inode).as_slice())
            .map_err(|e| err("write inode", e))?;
        Ok(())
    }

    fn remove_inode(&mut self, ino: Ino) -> StoreResult<()> {
        self.inodes
            .remove(ino.0)
            .map_err(|e| err("remove inode", e))?;
        self.symlinks
            .remove(ino.0)
            .map_err(|e| err("remove symlink", e))?;
        let empty: &[u8] = &[];
        self.xattrs
            .retain_in((ino.0, empty)..(ino.0 + 1, empty), |_, _| false)
            .map_err(|e| err("remove xattrs", e))?;
        self.remove_chunks(ino, 0, None)
    }

    fn dentry(&mut self, parent: Ino, name: &[u8]) -> StoreResult<Option<Dentry>> {
        match self
            .dentries
            .get((parent.0, name))
            .map_err(|e| err("read dentry", e))?
        {
            None => Ok(None),
            Some(v) => {
                let (ino, kind) = v.value();
                let kind = Kind::from_byte(kind)
                    .ok_or_else(|| StoreError(format!("dentry in {parent} has kind {kind}")))?;
                Ok(Some(Dentry {
                    ino: Ino(ino),
                    kind,
                }))
            }
        }
    }

    fn put_dentry(&mut self, parent: Ino, name: &[u8], d: Dentry) -> StoreResult<()> {
        self.dentries
            .insert((parent.0, name), (d.ino.0, d.kind.to_byte()))
            .map_err(|e| err("write dentry", e))?;
        Ok(())
    }

    fn remove_dentry(&mut self, parent: Ino, name: &[u8]) -> StoreResult<()> {
        self.dentries
            .remove((parent.0, name))
            .map_err(|e| err("remove dentry", e))?;
        Ok(())
    }

    fn dentries(
        &mut self,
        parent: Ino,
        after: Option<&[u8]>,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, Dentry)>> {
        let empty: &[u8] = &[];
        let start = (parent.0, after.unwrap_or(empty));
        let range = self
            .dentries
            .range(start..(parent.0 + 1, empty))
            .map_err(|e| err("list dentries", e))?;
        let mut out = Vec::new();
        for item in range {
            let (k, v) = item.map_err(|e| err("list dentries", e))?;
            let (_, name) = k.value();
            if after.is_some_and(|a| name == a) {
                continue;
            }
            let (ino, kind) = v.value();
            let kind = Kind::from_byte(kind)
                .ok_or_else(|| StoreError(format!("dentry in {parent} has kind {kind}")))?;
            out.push((
                name.to_vec(),
                Dentry {
                    ino: Ino(ino),
                    kind,
                },
            ));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn symlink_target(&mut self, ino: Ino) -> StoreResult<Option<Vec<u8>>> {
        Ok(self
            .symlinks
            .get(ino.0)
            .map_err(|e| err("read symlink", e))?
            .map(|v| v.value().to_vec()))
    }

    fn put_symlink_target(&mut self, ino: Ino, target: &[u8]) -> StoreResult<()> {
        self.symlinks
            .insert(ino.0, target)
            .map_err(|e| err("write symlink", e))?;
        Ok(())
    }

    fn xattr(&mut self, ino: Ino, name: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self
            .xattrs
            .get((ino.0, name))
            .map_err(|e| err("read xattr", e))?
            .map(|v| v.value().to_vec()))
    }

    fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> StoreResult<()> {
        self.xattrs
            .insert((ino.0, name), value)
            .map_err(|e| err("write xattr", e))?;
        Ok(())
    }

    fn remove_xattr(&mut self, ino: Ino, name: &[u8]) -> StoreResult<()> {
        self.xattrs
            .remove((ino.0, name))
            .map_err(|e| err("remove xattr", e))?;
        Ok(())
    }

    fn xattr_names(&mut self, ino: Ino) -> StoreResult<Vec<Vec<u8>>> {
        let empty: &[u8] = &[];
        let range = self
            .xattrs
            .range((ino.0, empty)..(ino.0 + 1, empty))
            .map_err(|e| err("list xattrs", e))?;
        let mut out = Vec::new();
        for item in range {
            let (k, _) = item.map_err(|e| err("list xattrs", e))?;
            out.push(k.value().1.to_vec());
        }
        Ok(out)
    }

    fn read_chunk(&mut self, ino: Ino, idx: u64, offset: usize, buf: &mut [u8]) -> StoreResult<()> {
        buf.fill(0);
        if let Some(v) = self
            .chunks
            .get((ino.0, idx))
            .map_err(|e| err("read chunk", e))?
        {
            copy_out(v.value(), offset, buf);
        }
        Ok(())
    }

    fn write_chunk(&mut self, ino: Ino, idx: u64, offset: usize, data: &[u8]) -> StoreResult<()> {
        let mut chunk = self.chunk(ino, idx)?.unwrap_or_default();
        copy_in(&mut chunk, offset, data);
        self.put_chunk(ino, idx, &chunk)
    }

    fn truncate_chunk(&mut self, ino: Ino, idx: u64, len: usize) -> StoreResult<()> {
        if let Some(mut chunk) = self.chunk(ino, idx)? {
            if chunk.len() > len {
                chunk.truncate(len);
                self.put_chunk(ino, idx, &chunk)?;
            }
        }
        Ok(())
    }

    fn remove_chunks(&mut self, ino: Ino, from: u64, to: Option<u64>) -> StoreResult<()> {
        let result = match to {
            Some(to) => self
                .chunks
                .retain_in((ino.0, from)..(ino.0, to), |_, _| false),
            None => self
                .chunks
                .retain_in((ino.0, from)..=(ino.0, u64::MAX), |_, _| false),
        };
        result.map_err(|e| err("remove chunks", e))
    }

    fn next_chunk(&mut self, ino: Ino, from: u64) -> StoreResult<Option<u64>> {
        let mut range = self
            .chunks
            .range((ino.0, from)..=(ino.0, u64::MAX))
            .map_err(|e| err("find chunk", e))?;
        match range.next() {
            None => Ok(None),
            Some(item) => Ok(Some(item.map_err(|e| err("find chunk", e))?.0.value().1)),
        }
    }

    fn add_orphan(&mut self, ino: Ino) -> StoreResult<()> {
        self.orphans
            .insert(ino.0, ())
            .map_err(|e| err("write orphan", e))?;
        Ok(())
    }

    fn remove_orphan(&mut self, ino: Ino) -> StoreResult<()> {
        self.orphans
            .remove(ino.0)
            .map_err(|e| err("remove orphan", e))?;
        Ok(())
    }

    fn orphans(&mut self) -> StoreResult<Vec<Ino>> {
        let mut out = Vec::new();
        for item in self.orphans.iter().map_err(|e| err("list orphans", e))? {
            out.push(Ino(item.map_err(|e| err("list orphans", e))?.0.value()));
        }
        Ok(out)
    }
}

/// Read-only access for tools (fsck, status) goes through normal read transactions.
pub fn read_meta(db: &Database, key: &str) -> StoreResult<Option<u64>> {
    let txn = db.begin_read().map_err(|e| err("begin read", e))?;
    let meta = txn.open_table(META).map_err(|e| err("open meta", e))?;
    Ok(meta
        .get(key)
        .map_err(|e| err("read meta", e))?
        .map(|v| v.value()))
}

/// Number of stored inodes, from a read transaction (for the inode gauge and fsck).
pub fn count_inodes(txn: &redb::ReadTransaction) -> StoreResult<u64> {
    let t = txn.open_table(INODES).map_err(|e| err("open inodes", e))?;
    t.len().map_err(|e| err("count inodes", e))
}
