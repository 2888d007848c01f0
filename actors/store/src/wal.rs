//! A write-ahead log in front of redb, so a durable commit costs one small sequential write
//! and one fdatasync instead of a redb copy-on-write commit (every changed B-tree page, the
//! allocator state and the header, written all over the file, then synced).
//!
//! A commit appends the delta (checksummed, numbered) to `spoolfs.wal` and syncs it; the
//! barriers waiting for it may then be answered. The log keeps a copy of the delta, and
//! writes what it has kept into redb with `Durability::None`, in one transaction, every
//! `WalLimits::apply_commits` commits or `apply_bytes` bytes; until then the actor reads those
//! changes from its own copy (`Pending`'s `logged`). A redb transaction per commit cost the
//! commit thread more CPU than the log append, on a machine whose CPUs the requests need.
//! Every `WalLimits::checkpoint_bytes` of log, an empty `Durability::Immediate` commit makes
//! redb hold everything, records the next entry number in the `meta` table (`wal_seq`) and
//! the log starts over at offset 0. Deltas too big to be worth writing twice (bulk content)
//! skip the log: they are committed to redb with `Immediate` directly (with the kept
//! changes before them), which is also a checkpoint. Meanwhile `writeback` starts the disk
//! on their pages, so that it writes while redb copies instead of after.
//!
//! Recovery (mount, `spoolfs fsck`, reopening after an I/O error) replays, in order, the
//! entries from offset 0 that are intact and numbered `wal_seq`, `wal_seq + 1`, ...; the first
//! torn, stale or missing entry ends the log. Replaying an entry redb already holds is
//! harmless: each record is a whole value or a removal. Entries from before the last
//! checkpoint carry smaller numbers, so they are never replayed; and each round (from one
//! checkpoint to the next) mixes a fresh random salt, kept in `meta.wal_salt`, into every
//! checksum, so bytes from an older round (mail content quoted inside an old entry) cannot pass
//! for an entry of the current one.
//!
//! The file is created full-size and zero-filled once, so appends overwrite allocated blocks
//! and fdatasync needs no metadata journal commit.
//!
//! | bytes | field                                                          |
//! |-------|----------------------------------------------------------------|
//! | 4     | magic `SPWL`                                                   |
//! | 4     | body length (little endian)                                    |
//! | 8     | entry number                                                   |
//! | 4     | CRC-32 of the round's salt, entry number and body              |
//! | n     | body: records, each a tag byte then its key and value fields   |

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use redb::{Database, Durability};
use spoolfs_core::{Dentry, Ino, Kind};

use crate::codec::{decode_inode, encode_inode};
use crate::pending::{is_no_space, write_deltas, write_record, CommitFailure, Delta, Key, Value};
use crate::writeback::Writeback;
use crate::*;

/// File name of the log inside the data directory.
pub const WAL_FILE: &str = "spoolfs.wal";

/// Sizes that shape the log (tests shrink them to make the log wrap often).
#[derive(Debug, Clone, Copy)]
pub struct WalLimits {
    /// Size of the log file.
    pub capacity: u64,
    /// Log bytes after which redb is checkpointed and the log starts over.
    pub checkpoint_bytes: u64,
    /// Deltas bigger than this go to redb directly (content would otherwise be written twice).
    pub direct_bytes: usize,
    /// Logged changes are written into redb once this many commits ...
    pub apply_commits: usize,
    /// ... or this many bytes of them wait (whichever comes first; and at every checkpoint).
    pub apply_bytes: usize,
}

impl Default for WalLimits {
    fn default() -> Self {
        WalLimits {
            capacity: 16 << 20,
            checkpoint_bytes: 4 << 20,
            direct_bytes: 1 << 20,
            apply_commits: 32,
            apply_bytes: 256 << 10,
        }
    }
}

impl WalLimits {
    /// The default sizes, shrunk on a small filesystem so the preallocated log takes at most
    /// 1/32 of it (a 64 MiB spool on a tmpfs must not lose a quarter of it to the log).
    pub fn for_dir(data_dir: &Path) -> WalLimits {
        let d = WalLimits::default();
        let total = nix::sys::statvfs::statvfs(data_dir)
            .map(|v| v.blocks().saturating_mul(v.fragment_size()))
            .unwrap_or(u64::MAX);
        let capacity = d.capacity.min((total / 32).max(1 << 20));
        WalLimits {
            capacity,
            checkpoint_bytes: capacity / 4,
            direct_bytes: usize::try_from(capacity / 16).unwrap_or(d.direct_bytes),
            ..d
        }
    }
}

const MAGIC: &[u8; 4] = b"SPWL";
const HEADER: usize = 4 + 4 + 8 + 4;

/// The log, owned by whoever runs the current commit.
#[derive(Debug)]
pub struct Wal {
    file: File,
    /// Where the next entry goes.
    pos: u64,
    /// The next entry's number.
    seq: u64,
    /// This round's secret (see `new_salt`), mixed into every entry's checksum.
    salt: u64,
    /// Reused encoding buffer.
    buf: Vec<u8>,
    limits: WalLimits,
    /// The schema version the database had, if opening it upgraded it.
    upgraded_from: Option<u64>,
    /// Committed changes not yet written into redb, and how many commits they came from.
    unapplied: Delta,
    unapplied_commits: usize,
    /// Starts writing a bulk commit's pages while redb still copies them (None if the
    /// database file could not be opened a second time: commits are then only slower).
    writeback: Option<Writeback>,
}

fn fail(context: &str, e: impl std::fmt::Display, no_space: bool) -> CommitFailure {
    CommitFailure {
        message: format!("{context}: {e}"),
        no_space,
    }
}

fn io_fail(context: &str, e: std::io::Error) -> CommitFailure {
    let no_space =
        e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC);
    fail(context, e, no_space)
}

impl Wal {
    /// Open (or create) the log of `data_dir`, replay it into `db` and checkpoint. Returns the
    /// log, empty, and how many entries were replayed.
    pub fn open(db: &Database, data_dir: &Path) -> Result<(Wal, usize), CommitFailure> {
        Wal::open_with(db, data_dir, WalLimits::for_dir(data_dir))
    }

    /// The schema version the database was upgraded from when the log was opened.
    pub fn upgraded_from(&self) -> Option<u64> {
        self.upgraded_from
    }

    /// `open` with other sizes.
    pub fn open_with(
        db: &Database,
        data_dir: &Path,
        limits: WalLimits,
    ) -> Result<(Wal, usize), CommitFailure> {
        let path = data_dir.join(WAL_FILE);
        let shown = path.display().to_string();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_fail(&format!("open {shown}"), e))?;
        let len = file
            .metadata()
            .map_err(|e| io_fail(&format!("stat {shown}"), e))?
            .len();
        let first_seq = read_seq(db)?;
        let salt = read_meta(db, META_WAL_SALT)
            .map_err(|e| fail("read the log salt", e, false))?
            .unwrap_or(0);
        let (deltas, next_seq) = if len == 0 {
            (Vec::new(), first_seq)
        } else {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)
                .map_err(|e| io_fail(&format!("read {shown}"), e))?;
            parse(&bytes, first_seq, salt)
        };
        let replayed = deltas.len();
        let new_salt = fresh_salt();
        // One durable commit holds the replayed entries and the next number: from here on
        // the entries in the file are stale.
        let mut txn = db
            .begin_write()
            .map_err(|e| fail("begin write", e, false))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| fail("set durability", e, false))?;
        let upgraded_from;
        {
            let mut t = Tables::open(&txn).map_err(|e| fail("open tables", e, false))?;
            for delta in &deltas {
                for (key, value) in delta.records() {
                    write_record(&mut t, key, value.as_ref())
                        .map_err(|e| fail("replay the log", e, false))?;
                }
            }
            // The replayed entries are in the layout of the version the database has; an
            // upgrade comes after them, in the same transaction.
            let found = crate::migrate::upgrade(&mut t)
                .map_err(|e| fail("upgrade the schema", e, false))?;
            upgraded_from = (found != SCHEMA_VERSION).then_some(found);
            t.set_meta(META_WAL_SEQ, next_seq)
                .map_err(|e| fail("write meta", e, false))?;
            t.set_meta(META_WAL_SALT, new_salt)
                .map_err(|e| fail("write meta", e, false))?;
        }
        txn.commit()
            .map_err(|e| io_commit_fail("commit the replayed log", e))?;
        if len < limits.capacity {
            zero_fill(&mut file, len, limits.capacity)
                .map_err(|e| io_fail(&format!("preallocate {shown}"), e))?;
        }
        // The log's directory entry must be durable before any entry in it counts (every
        // open, so a crash right after creating it is repaired too).
        File::open(data_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| io_fail(&format!("sync {}", data_dir.display()), e))?;
        Ok((
            Wal {
                file,
                pos: 0,
                seq: next_seq,
                salt: new_salt,
                buf: Vec::new(),
                limits,
                upgraded_from,
                unapplied: Delta::default(),
                unapplied_commits: 0,
                writeback: File::open(data_dir.join(crate::DB_FILE))
                    .and_then(Writeback::start)
                    .ok(),
            },
            replayed,
        ))
    }

    /// Bytes of log written since the last checkpoint.
    pub fn used(&self) -> u64 {
        self.pos
    }

    /// Whether committed changes are held by the log and not yet by redb.
    pub fn has_unapplied(&self) -> bool {
        !self.unapplied.is_empty()
    }

    /// Make `delta` durable, then apply it to `db` (see the module comment).
    pub fn commit(&mut self, db: &Database, delta: &Delta) -> Result<(), CommitFailure> {
        self.commit_notifying(db, delta, || {})
    }

    /// `commit`, calling `on_durable` as soon as the delta is durable: after the log's
    /// fdatasync, before the delta is written to redb (and before a checkpoint), so that the
    /// callers waiting for durability need not wait for those too. If a later step fails,
    /// the logged entries are replayed when the database is reopened.
    pub fn commit_notifying(
        &mut self,
        db: &Database,
        delta: &Delta,
        on_durable: impl FnOnce(),
    ) -> Result<(), CommitFailure> {
        if delta.bytes() > self.limits.direct_bytes {
            let _committing = self.writeback.as_ref().map(Writeback::while_committing);
            self.checkpoint(db, Some(delta))?;
            on_durable();
            return Ok(());
        }
        self.buf.clear();
        encode_entry(&mut self.buf, self.seq, self.salt, delta);
        let len = self.buf.len() as u64;
        if self.pos + len > self.limits.capacity {
            self.checkpoint(db, Some(delta))?;
            on_durable();
            return Ok(());
        }
        self.file
            .write_all_at(&self.buf, self.pos)
            .map_err(|e| io_fail("write the log", e))?;
        self.file
            .sync_data()
            .map_err(|e| io_fail("sync the log", e))?;
        self.pos += len;
        self.seq += 1;
        on_durable();
        self.unapplied.absorb_copy(delta);
        self.unapplied_commits += 1;
        if self.pos >= self.limits.checkpoint_bytes {
            self.checkpoint(db, None)?;
        } else if self.unapplied_commits >= self.limits.apply_commits
            || self.unapplied.bytes() >= self.limits.apply_bytes
        {
            write_deltas(db, &[&self.unapplied], Durability::None, None)?;
            self.applied();
        }
        Ok(())
    }

    /// redb holds every logged change.
    fn applied(&mut self) {
        self.unapplied = Delta::default();
        self.unapplied_commits = 0;
    }

    /// One durable redb commit (with `delta`, if any) that holds everything logged so far;
    /// the log then starts over.
    pub fn checkpoint(
        &mut self,
        db: &Database,
        delta: Option<&Delta>,
    ) -> Result<(), CommitFailure> {
        let salt = fresh_salt();
        let mut deltas = vec![&self.unapplied];
        deltas.extend(delta);
        write_deltas(db, &deltas, Durability::Immediate, Some((self.seq, salt)))?;
        self.applied();
        self.pos = 0;
        self.salt = salt;
        Ok(())
    }
}

fn io_commit_fail(context: &str, e: redb::CommitError) -> CommitFailure {
    let no_space = matches!(&e, redb::CommitError::Storage(s) if is_no_space(s));
    fail(context, e, no_space)
}

/// A new round's salt: unpredictable (std's `RandomState` keys come from the OS's random
/// source), so bytes a user got into an older round's entries (mail content) can never pass
/// for an entry of the current round after a crash.
fn fresh_salt() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new()
        .hash_one((std::time::SystemTime::now(), std::process::id()))
}

fn read_seq(db: &Database) -> Result<u64, CommitFailure> {
    read_meta(db, META_WAL_SEQ)
        .map(|v| v.unwrap_or(0))
        .map_err(|e| fail("read the log number", e, false))
}

fn zero_fill(file: &mut File, from: u64, to: u64) -> std::io::Result<()> {
    let block = vec![0u8; 1 << 20];
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(block.len() as u64) as usize;
        file.write_all_at(&block[..n], pos)?;
        pos += n as u64;
    }
    file.flush()?;
    file.sync_all()
}

// --- encoding ---------------------------------------------------------------------------

const T_INODE: u8 = 1;
const T_DENTRY: u8 = 2;
const T_XATTR: u8 = 3;
const T_SYMLINK: u8 = 4;
const T_CHUNK: u8 = 5;
const T_ORPHAN: u8 = 6;
const T_META: u8 = 7;
/// Added to a tag when the record is removed.
const REMOVED: u8 = 0x80;

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Append one entry to `out` (public for the fuzzer and tests).
pub fn encode_entry(out: &mut Vec<u8>, seq: u64, salt: u64, delta: &Delta) {
    let mut body = Vec::new();
    for (key, value) in delta.records() {
        encode_record(&mut body, key, value.as_ref());
    }
    frame(out, seq, salt, &body);
}

/// Append an entry holding `body` as it is, with a valid header and checksum (public so the
/// fuzzer can reach the record decoder past the checksum).
pub fn frame(out: &mut Vec<u8>, seq: u64, salt: u64, body: &[u8]) {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&salt.to_le_bytes());
    crc.update(&seq.to_le_bytes());
    crc.update(body);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(body);
}

fn encode_record(out: &mut Vec<u8>, key: &Key, value: Option<&Value>) {
    let removed = if value.is_some() { 0 } else { REMOVED };
    match key {
        Key::Inode(i) => {
            out.push(T_INODE | removed);
            out.extend_from_slice(&i.to_le_bytes());
            if let Some(Value::Inode(n)) = value {
                put_bytes(out, &encode_inode(n));
            }
        }
        Key::Dentry(p, name) => {
            out.push(T_DENTRY | removed);
            out.extend_from_slice(&p.to_le_bytes());
            put_bytes(out, name);
            if let Some(Value::Dentry(d)) = value {
                out.extend_from_slice(&d.ino.0.to_le_bytes());
                out.push(d.kind.to_byte());
            }
        }
        Key::Xattr(i, name) => {
            out.push(T_XATTR | removed);
            out.extend_from_slice(&i.to_le_bytes());
            put_bytes(out, name);
            if let Some(Value::Bytes(b)) = value {
                put_bytes(out, b);
            }
        }
        Key::Symlink(i) | Key::Chunk(i, _) => {
            let tag = if matches!(key, Key::Symlink(_)) {
                T_SYMLINK
            } else {
                T_CHUNK
            };
            out.push(tag | removed);
            out.extend_from_slice(&i.to_le_bytes());
            if let Key::Chunk(_, x) = key {
                out.extend_from_slice(&x.to_le_bytes());
            }
            if let Some(b) = value.and_then(Value::bytes) {
                put_bytes(out, b);
            }
        }
        Key::Orphan(i) => {
            out.push(T_ORPHAN | removed);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Key::Meta(name) => {
            out.push(T_META | removed);
            put_bytes(out, name.as_bytes());
            if let Some(Value::U64(v)) = value {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// A cursor over an entry body; every read is bounds-checked (a torn entry fails its CRC
/// first, but a decoder must not trust that).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// The metadata names a log may carry (keys are `&'static str`).
fn meta_name(b: &[u8]) -> Option<&'static str> {
    [
        META_NEXT_INO,
        META_SCHEMA_VERSION,
        META_WAL_SEQ,
        META_WAL_SALT,
    ]
    .into_iter()
    .find(|n| n.as_bytes() == b)
}

fn decode_body(body: &[u8]) -> Option<Delta> {
    let mut r = Reader(body);
    let mut delta = Delta::default();
    while !r.0.is_empty() {
        let tag = r.u8()?;
        let present = tag & REMOVED == 0;
        let (key, value) = match tag & !REMOVED {
            T_INODE => {
                let i = r.u64()?;
                let v = if present {
                    Some(Value::Inode(decode_inode(i, r.bytes()?).ok()?))
                } else {
                    None
                };
                (Key::Inode(i), v)
            }
            T_DENTRY => {
                let p = r.u64()?;
                let name = r.bytes()?.to_vec();
                let v = if present {
                    let ino = r.u64()?;
                    let kind = Kind::from_byte(r.u8()?)?;
                    Some(Value::Dentry(Dentry {
                        ino: Ino(ino),
                        kind,
                    }))
                } else {
                    None
                };
                (Key::Dentry(p, name), v)
            }
            T_XATTR => {
                let i = r.u64()?;
                let name = r.bytes()?.to_vec();
                let v = if present {
                    Some(Value::Bytes(r.bytes()?.to_vec()))
                } else {
                    None
                };
                (Key::Xattr(i, name), v)
            }
            t @ (T_SYMLINK | T_CHUNK) => {
                let i = r.u64()?;
                let key = if t == T_CHUNK {
                    Key::Chunk(i, r.u64()?)
                } else {
                    Key::Symlink(i)
                };
                let v = if present {
                    Some(Value::Bytes(r.bytes()?.to_vec()))
                } else {
                    None
                };
                (key, v)
            }
            T_ORPHAN => {
                let i = r.u64()?;
                (Key::Orphan(i), present.then_some(Value::Unit))
            }
            T_META => {
                let name = meta_name(r.bytes()?)?;
                let v = if present {
                    Some(Value::U64(r.u64()?))
                } else {
                    None
                };
                (Key::Meta(name), v)
            }
            _ => return None,
        };
        delta.set_record(key, value);
    }
    Some(delta)
}

/// The intact entries from the start of `log`, numbered from `first`; and the next number
/// (public for the fuzzer and tests).
pub fn parse(log: &[u8], first: u64, salt: u64) -> (Vec<Delta>, u64) {
    let mut out = Vec::new();
    let mut seq = first;
    let mut pos = 0usize;
    while let Some(header) = log.get(pos..pos.saturating_add(HEADER)) {
        if &header[0..4] != MAGIC {
            break;
        }
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let mut n = [0u8; 8];
        n.copy_from_slice(&header[8..16]);
        if u64::from_le_bytes(n) != seq {
            break;
        }
        let crc = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
        let Some(body) = pos
            .checked_add(HEADER)
            .and_then(|start| log.get(start..start.checked_add(len)?))
        else {
            break;
        };
        let mut h = crc32fast::Hasher::new();
        h.update(&salt.to_le_bytes());
        h.update(&header[8..16]);
        h.update(body);
        if h.finalize() != crc {
            break;
        }
        let Some(delta) = decode_body(body) else {
            break;
        };
        out.push(delta);
        let Some(next) = seq.checked_add(1) else {
            break;
        };
        seq = next;
        pos += HEADER + len;
    }
    (out, seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spoolfs_core::{Inode, Timestamp};

    fn sample() -> Delta {
        let mut d = Delta::default();
        let t = Timestamp::new(5, 6);
        d.set_record(
            Key::Inode(7),
            Some(Value::Inode(Inode {
                size: 3,
                ..Inode::new(Ino(7), Kind::File, 0o644, (1, 2), t, Ino(1))
            })),
        );
        d.set_record(
            Key::Dentry(1, b"a".to_vec()),
            Some(Value::Dentry(Dentry {
                ino: Ino(7),
                kind: Kind::File,
            })),
        );
        d.set_record(Key::Dentry(1, b"gone".to_vec()), None);
        d.set_record(
            Key::Xattr(7, b"user.x".to_vec()),
            Some(Value::Bytes(vec![1, 2])),
        );
        d.set_record(Key::Chunk(7, 0), Some(Value::Bytes(b"abc".to_vec())));
        d.set_record(Key::Chunk(7, 9), None);
        d.set_record(Key::Symlink(8), None);
        d.set_record(Key::Orphan(9), Some(Value::Unit));
        d.set_record(Key::Meta(META_NEXT_INO), Some(Value::U64(10)));
        d
    }

    fn records(d: &Delta) -> Vec<(Key, Option<Value>)> {
        d.records().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    #[test]
    fn entries_round_trip_in_order() {
        let mut log = Vec::new();
        encode_entry(&mut log, 41, 7, &sample());
        encode_entry(&mut log, 42, 7, &Delta::default());
        let (deltas, next) = parse(&log, 41, 7);
        assert_eq!(next, 43);
        assert_eq!(deltas.len(), 2);
        assert_eq!(records(&deltas[0]), records(&sample()));
    }

    #[test]
    fn a_torn_stale_or_misnumbered_entry_ends_the_log() {
        let mut log = Vec::new();
        encode_entry(&mut log, 3, 7, &sample());
        let first = log.len();
        encode_entry(&mut log, 4, 7, &sample());
        // Stale: numbered from an earlier round.
        assert_eq!(parse(&log, 4, 7).0.len(), 0);
        // Another round's salt: nothing.
        assert_eq!(parse(&log, 3, 8).0.len(), 0);
        // Torn: every cut inside the second entry keeps exactly the first.
        for cut in first..log.len() {
            assert_eq!(parse(&log[..cut], 3, 7).0.len(), 1, "cut at {cut}");
        }
        // Corrupt: any flipped byte in the second entry drops it.
        for i in first..log.len() {
            let mut bad = log.clone();
            bad[i] ^= 0x40;
            assert_eq!(parse(&bad, 3, 7).0.len(), 1, "flip at {i}");
        }
        assert_eq!(parse(&log, 3, 7).0.len(), 2);
    }
}
