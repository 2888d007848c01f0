//! Upgrades of an older database to the current schema, run by `Wal::open` in the same
//! transaction as the log replay, so a database is either wholly old or wholly new: a crash
//! during an upgrade leaves the old version, and the next open upgrades it again.
//!
//! | from | to | change                                                                      |
//! |------|----|-----------------------------------------------------------------------------|
//! | 1    | 2  | content chunks of 65,536 bytes become `CHUNK_SIZE` (65,472) bytes           |
//!
//! Why version 2 re-chunks: redb keeps a chunk and its leaf header in one page, and pages come
//! in powers of two, so a 65,536-byte chunk took a 128 KiB page: the database grew by twice
//! the content written, and every byte was written to disk twice. 64 bytes less per chunk
//! and each fits a 64 KiB page.

use redb::{ReadableTable, ReadableTableMetadata};
use spoolfs_core::{StoreError, StoreResult, CHUNK_SIZE};

use crate::codec::decode_inode;
use crate::{Tables, META_SCHEMA_VERSION, SCHEMA_VERSION};

/// The chunk size of schema version 1.
pub const V1_CHUNK_SIZE: u64 = 64 * 1024;

fn err(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("upgrade the database: {context}: {e}"))
}

/// Bring the tables from the version they carry to `SCHEMA_VERSION`. Returns the version
/// found (`SCHEMA_VERSION` when there was nothing to do).
pub fn upgrade(t: &mut Tables<'_>) -> StoreResult<u64> {
    let found = t.meta(META_SCHEMA_VERSION)?.unwrap_or(SCHEMA_VERSION);
    match found {
        SCHEMA_VERSION => return Ok(found),
        1 => rechunk(t, V1_CHUNK_SIZE, CHUNK_SIZE)?,
        other => {
            return Err(StoreError(format!(
                "schema version {other} cannot be upgraded to {SCHEMA_VERSION}"
            )))
        }
    }
    t.set_meta(META_SCHEMA_VERSION, SCHEMA_VERSION)?;
    Ok(found)
}

/// Re-cut every file's content from chunks of `old` bytes into chunks of `new` bytes
/// (`new < old`). A new chunk none of whose bytes were stored stays a hole; bytes past the
/// file size are dropped. Chunks of an inode without a record are left alone (fsck reports
/// them). Memory: two old chunks at a time.
fn rechunk(t: &mut Tables<'_>, old: u64, new: u64) -> StoreResult<()> {
    if t.chunks.len().map_err(|e| err("count chunks", e))? == 0 {
        return Ok(());
    }
    let mut inos: Vec<u64> = Vec::new();
    for item in t.chunks.iter().map_err(|e| err("scan chunks", e))? {
        let (k, _) = item.map_err(|e| err("scan chunks", e))?;
        let (ino, _) = k.value();
        if inos.last() != Some(&ino) {
            inos.push(ino);
        }
    }
    for ino in inos {
        let size = match t.inodes.get(ino).map_err(|e| err("read inode", e))? {
            Some(v) => match decode_inode(ino, v.value()) {
                Ok(inode) => inode.size,
                Err(_) => continue,
            },
            None => continue,
        };
        let count = size.div_ceil(new);
        // New chunk j only needs old chunks with index <= j, and old chunk j is only needed
        // by new chunks >= j: going from the last chunk down, every old chunk is read before
        // it is overwritten.
        for j in (0..count).rev() {
            let start = j * new;
            let end = (start + new).min(size);
            let mut bytes = vec![0u8; (end - start) as usize];
            let mut any = false;
            for i in start / old..=(end - 1) / old {
                let Some(v) = t.chunks.get((ino, i)).map_err(|e| err("read chunk", e))? else {
                    continue;
                };
                let v = v.value();
                // The overlap of old chunk i's stored bytes with [start, end).
                let from = (i * old).max(start);
                let to = (i * old + v.len() as u64).min(end);
                if from < to {
                    any = true;
                    bytes[(from - start) as usize..(to - start) as usize]
                        .copy_from_slice(&v[(from - i * old) as usize..(to - i * old) as usize]);
                }
            }
            if any {
                t.chunks
                    .insert((ino, j), bytes.as_slice())
                    .map_err(|e| err("write chunk", e))?;
            } else {
                t.chunks
                    .remove((ino, j))
                    .map_err(|e| err("remove chunk", e))?;
            }
        }
        // Whatever lies at or past the new count is past the file size.
        let beyond: Vec<u64> = t
            .chunks
            .range((ino, count)..=(ino, u64::MAX))
            .map_err(|e| err("scan chunks", e))?
            .map(|item| item.map(|(k, _)| k.value().1))
            .collect::<Result<_, _>>()
            .map_err(|e| err("scan chunks", e))?;
        for i in beyond {
            t.chunks
                .remove((ino, i))
                .map_err(|e| err("remove chunk", e))?;
        }
    }
    Ok(())
}
