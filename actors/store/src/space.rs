//! How much of the database file the live records occupy, estimated from above.
//!
//! redb never gives space back to the filesystem: pages freed by a deletion are reused by later
//! writes, but the file keeps its size. So after the data dir's filesystem fills up and files
//! are deleted through the mount, `statvfs` still shows it full while the database has room
//! inside. The runtime's space guard needs that room to let writes in again, and redb has no
//! cheap way to report it (`WriteTransaction::stats` walks every page, content included).
//!
//! This module reads only the metadata tables (inodes, dentries, xattrs, symlinks, orphans;
//! never the content chunks, whose sizes follow from the inode sizes) and charges every record
//! what it can cost at most in redb's pages:
//!
//! - an entry of `k` key and `v` value bytes costs `2 * (k + v + ENTRY_OVERHEAD)`: a leaf page
//!   is allocated at the smallest power-of-two size that holds it and split or merged to stay
//!   at least half full, so one entry never holds more than twice its bytes;
//! - content: a full chunk (`CHUNK_SIZE`, 64 KiB less room for its key and the leaf header)
//!   is alone in a 64 KiB leaf page, so it is charged that page, not twice its bytes (that
//!   would charge 1 GiB of content 2 GiB where redb takes 1.1 GB, and after deletions the
//!   guard would not see the room there is); the tail chunk is charged like any entry, plus
//!   one page per file with both, for a leaf where a small record sits beside a full chunk
//!   (redb splits leaves by bytes, so that happens; the leaf then takes 128 KiB);
//! - a regular file's content is charged as if every byte up to its size were stored (holes
//!   are charged too: an over-estimate, never an under-estimate);
//! - branch pages add `1/BRANCH_DIVISOR` of the leaves, and redb's own tables and headers a
//!   fixed `SYSTEM_BYTES`.
//!
//! The result is an upper bound of the live bytes under these assumptions; the runtime treats
//! "file allocation minus this" as the free room inside the file, and stops trusting it as soon
//! as the file grows anyway.

use redb::{ReadTransaction, ReadableTable};
use spoolfs_core::{Kind, StoreError, StoreResult, CHUNK_SIZE};

use crate::codec::decode_inode;
use crate::{DENTRIES, INODES, ORPHANS, SYMLINKS, XATTRS};

/// Per-entry bookkeeping in a leaf (offsets, length prefixes, checksum share), rounded up.
const ENTRY_OVERHEAD: u64 = 48;
/// Branch pages relative to leaf pages (a branch entry is a key and a child pointer; with
/// 4 KiB pages one branch page indexes dozens of leaves).
const BRANCH_DIVISOR: u64 = 16;
/// redb's table tree, region allocator state and headers.
const SYSTEM_BYTES: u64 = 4 << 20;
/// Key of a content chunk: (ino, idx).
const CHUNK_KEY: u64 = 16;

/// Most leaf bytes one entry can cost.
fn entry_cost(key: u64, value: u64) -> u64 {
    key.saturating_add(value)
        .saturating_add(ENTRY_OVERHEAD)
        .saturating_mul(2)
}

/// The page of a leaf holding one full chunk: `CHUNK_SIZE` is chosen so that the chunk, its
/// key and the leaf header fill exactly this.
const FULL_CHUNK_PAGE: u64 = 64 << 10;
// The key (16), the value's end offset (4) and the leaf header (4) fit in the 64 bytes
// CHUNK_SIZE leaves free in the page.
const _: () = assert!(CHUNK_SIZE + CHUNK_KEY + 8 <= FULL_CHUNK_PAGE);

/// Most leaf bytes the content of a file of `size` bytes costs: a page per full chunk, twice
/// the tail (it shares a leaf with other small records), and one more page when the file has
/// both, for the leaf where the tail (or a neighbour's small record) ends up beside a full
/// chunk (redb splits a leaf by bytes, so a small record next to a full chunk can share its
/// leaf, which then takes a page of twice the size).
fn content_cost(size: u64) -> u64 {
    let full = size / CHUNK_SIZE;
    let tail = size % CHUNK_SIZE;
    let mut cost = full.saturating_mul(FULL_CHUNK_PAGE);
    if tail > 0 {
        cost = cost.saturating_add(entry_cost(CHUNK_KEY, tail));
        if full > 0 {
            cost = cost.saturating_add(FULL_CHUNK_PAGE);
        }
    }
    cost
}

/// What a scan found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LiveEstimate {
    /// Upper bound of the bytes of redb pages the live records occupy.
    pub bytes: u64,
    /// Inodes seen (live and orphaned).
    pub inodes: u64,
}

fn err(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{context}: {e}"))
}

/// Scan the metadata tables of a read transaction (cost: one pass over inodes, dentries,
/// xattrs, symlinks and orphans; content is never read).
pub fn live_bytes_upper(txn: &ReadTransaction) -> StoreResult<LiveEstimate> {
    let mut leaves: u64 = 0;
    let mut inodes: u64 = 0;
    let table = txn.open_table(INODES).map_err(|e| err("open inodes", e))?;
    for item in table.iter().map_err(|e| err("scan inodes", e))? {
        let (k, v) = item.map_err(|e| err("scan inodes", e))?;
        let value = v.value();
        leaves = leaves.saturating_add(entry_cost(8, value.len() as u64));
        inodes += 1;
        // A record that does not decode is fsck's business; charge it as one full chunk so
        // the estimate stays on the safe side.
        let content = match decode_inode(k.value(), value) {
            Ok(inode) if inode.kind == Kind::File => content_cost(inode.size),
            Ok(_) => 0,
            Err(_) => 2 * FULL_CHUNK_PAGE,
        };
        leaves = leaves.saturating_add(content);
    }
    let table = txn
        .open_table(DENTRIES)
        .map_err(|e| err("open dentries", e))?;
    for item in table.iter().map_err(|e| err("scan dentries", e))? {
        let (k, _) = item.map_err(|e| err("scan dentries", e))?;
        // key: parent + name (+ its length prefix); value: ino + kind
        let (_, name) = k.value();
        leaves = leaves.saturating_add(entry_cost(8 + 4 + name.len() as u64, 9));
    }
    let table = txn.open_table(XATTRS).map_err(|e| err("open xattrs", e))?;
    for item in table.iter().map_err(|e| err("scan xattrs", e))? {
        let (k, v) = item.map_err(|e| err("scan xattrs", e))?;
        let (_, name) = k.value();
        leaves = leaves.saturating_add(entry_cost(
            8 + 4 + name.len() as u64,
            v.value().len() as u64,
        ));
    }
    let table = txn
        .open_table(SYMLINKS)
        .map_err(|e| err("open symlinks", e))?;
    for item in table.iter().map_err(|e| err("scan symlinks", e))? {
        let (_, v) = item.map_err(|e| err("scan symlinks", e))?;
        leaves = leaves.saturating_add(entry_cost(8, v.value().len() as u64));
    }
    let table = txn
        .open_table(ORPHANS)
        .map_err(|e| err("open orphans", e))?;
    for item in table.iter().map_err(|e| err("scan orphans", e))? {
        item.map_err(|e| err("scan orphans", e))?;
        leaves = leaves.saturating_add(entry_cost(8, 0));
    }
    let bytes = leaves
        .saturating_add(leaves / BRANCH_DIVISOR)
        .saturating_add(SYSTEM_BYTES);
    Ok(LiveEstimate { bytes, inodes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_chunk_is_charged_at_least_the_page_redb_gives_it() {
        assert_eq!(content_cost(0), 0);
        assert_eq!(content_cost(3 * CHUNK_SIZE), 3 * FULL_CHUNK_PAGE);
        assert_eq!(content_cost(10), entry_cost(16, 10));
        assert_eq!(
            content_cost(CHUNK_SIZE + 1),
            2 * FULL_CHUNK_PAGE + entry_cost(16, 1)
        );
        assert_eq!(content_cost(u64::MAX), u64::MAX);
    }
}
