//! spoolfs's persistent layout in redb: table definitions, record encodings, schema version.
//! This is the only crate that names `redb`'s tables.
//!
//! # Key layout
//!
//! | table      | key                   | value                          | notes                                  |
//! |------------|-----------------------|--------------------------------|----------------------------------------|
//! | `inodes`   | ino `u64`             | inode record (`codec`, 86 B)   | one per live or orphaned inode         |
//! | `dentries` | (parent `u64`, name)  | (ino `u64`, kind `u8`)         | readdir needs no inode reads           |
//! | `xattrs`   | (ino `u64`, name)     | value bytes                    | names carry their namespace prefix     |
//! | `symlinks` | ino `u64`             | target bytes                   |                                        |
//! | `chunks`   | (ino `u64`, idx `u64`)| up to CHUNK_SIZE (65,472) B    | bytes [idx*CHUNK_SIZE, ...); a missing chunk is a hole; no byte at or past the file size |
//! | `orphans`  | ino `u64`             | `()`                           | nlink 0 but still open/looked up; reclaimed at start |
//! | `meta`     | name `&str`           | `u64`                          | `schema_version`, `next_ino`, `wal_seq`, `wal_salt` |
//!
//! Changes reach these tables through the write-ahead log `spoolfs.wal` (see `wal`).

pub mod codec;
pub mod fsck;
pub mod migrate;
pub mod pending;
pub mod space;
mod tables;
pub mod wal;
mod writeback;

pub use pending::{commit_delta, CommitFailure, Delta, Pending, SharedBytes, Snapshot};
pub use tables::{count_inodes, open_database, read_meta, OpenError, Tables};
pub use wal::{Wal, WalLimits, WAL_FILE};

use redb::TableDefinition;

pub const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
pub const DENTRIES: TableDefinition<(u64, &[u8]), (u64, u8)> = TableDefinition::new("dentries");
pub const XATTRS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("xattrs");
pub const SYMLINKS: TableDefinition<u64, &[u8]> = TableDefinition::new("symlinks");
pub const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("chunks");
pub const ORPHANS: TableDefinition<u64, ()> = TableDefinition::new("orphans");
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Bumped whenever a record encoding or the key layout changes.
/// Older versions are upgraded when the log is opened (`migrate`).
pub const SCHEMA_VERSION: u64 = 2;
pub const META_SCHEMA_VERSION: &str = "schema_version";
/// The next inode number to hand out; numbers are never reused.
pub const META_NEXT_INO: &str = "next_ino";
/// The number of the first write-ahead log entry not yet in redb (see `wal`).
pub const META_WAL_SEQ: &str = "wal_seq";
/// The current write-ahead log round's checksum salt (see `wal`).
pub const META_WAL_SALT: &str = "wal_salt";

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "spoolfs.redb";
