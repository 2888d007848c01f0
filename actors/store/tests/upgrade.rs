//! A schema-1 database (64 KiB chunks) is upgraded when the log is opened: every file reads
//! back byte for byte (full chunks, short tails, holes, stored chunks shorter than a chunk,
//! chunks past the size), chunks are re-cut to `CHUNK_SIZE`, all-hole chunks stay holes, fsck
//! finds nothing, and a second open has nothing left to do.

use redb::{Database, Durability, ReadableDatabase};
mod common;

use common::{create, ctx};
use spoolfs_core::{data, Fs, Ino, Limits, CHUNK_SIZE};
use spoolfs_store::migrate::V1_CHUNK_SIZE;
use spoolfs_store::{
    fsck, open_database, Tables, Wal, CHUNKS, META_SCHEMA_VERSION, SCHEMA_VERSION,
};

const OLD: usize = V1_CHUNK_SIZE as usize;

/// A file as schema 1 stored it: its size and its chunks (index, stored bytes).
struct V1File {
    size: u64,
    chunks: Vec<(u64, Vec<u8>)>,
}

impl V1File {
    /// What reading the file returns under schema 1's rules: a chunk's bytes at
    /// [idx * 64 KiB, + its length), zeros elsewhere, nothing past the size.
    fn content(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size as usize];
        for (idx, bytes) in &self.chunks {
            let base = *idx as usize * OLD;
            for (k, b) in bytes.iter().enumerate() {
                if let Some(slot) = out.get_mut(base + k) {
                    *slot = *b;
                }
            }
        }
        out
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn files() -> Vec<V1File> {
    vec![
        // empty
        V1File {
            size: 0,
            chunks: vec![],
        },
        // one short chunk
        V1File {
            size: 100,
            chunks: vec![(0, pattern(1, 100))],
        },
        // full chunks and an 11-byte tail
        V1File {
            size: 3 * OLD as u64 + 11,
            chunks: vec![
                (0, pattern(2, OLD)),
                (1, pattern(3, OLD)),
                (2, pattern(4, OLD)),
                (3, pattern(5, 11)),
            ],
        },
        // sparse: holes at 0, 2, 3; chunk 1 stored shorter than a chunk; the last full
        V1File {
            size: 5 * OLD as u64,
            chunks: vec![(1, pattern(6, 1000)), (4, pattern(7, OLD))],
        },
        // exactly one old chunk (two new ones: the second holds the last 64 bytes)
        V1File {
            size: OLD as u64,
            chunks: vec![(0, pattern(8, OLD))],
        },
        // a stored chunk reaching past the size, and one wholly past it (both trimmed)
        V1File {
            size: OLD as u64 + 500,
            chunks: vec![(1, pattern(9, 4000)), (3, pattern(10, 10))],
        },
    ]
}

/// Build a schema-1 database: files created through the core (so the namespace is sound),
/// then their content written in schema 1's layout.
fn v1_database(path: &std::path::Path, files: &[V1File]) -> Vec<Ino> {
    let db = open_database(path).expect("open");
    let mut fs = Fs::new(Limits::default());
    let mut inos = Vec::new();
    let mut txn = db.begin_write().expect("begin");
    {
        let mut t = Tables::open(&txn).expect("tables");
        fs.init_root(&mut t, &ctx(), 0o755).expect("root");
        let mut next = 2;
        for (i, f) in files.iter().enumerate() {
            let (ino, fh) = create(&mut fs, &mut t, &mut next, &format!("f{i}"));
            fs.release(&mut t, ino, fh).expect("release");
            fs.forget(&mut t, ino, 1).expect("forget");
            let mut inode = spoolfs_core::Store::inode(&mut t, ino)
                .expect("read inode")
                .expect("inode exists");
            inode.size = f.size;
            spoolfs_core::Store::put_inode(&mut t, &inode).expect("set size");
            for (idx, bytes) in &f.chunks {
                t.chunks
                    .insert((ino.0, *idx), bytes.as_slice())
                    .expect("v1 chunk");
            }
            inos.push(ino);
        }
        t.set_meta(META_SCHEMA_VERSION, 1).expect("stamp v1");
    }
    txn.set_durability(Durability::Immediate).expect("durable");
    txn.commit().expect("commit");
    inos
}

fn stored_chunks(db: &Database, ino: Ino) -> Vec<(u64, usize)> {
    let txn = db.begin_read().expect("read");
    let t = txn.open_table(CHUNKS).expect("chunks");
    t.range((ino.0, 0)..=(ino.0, u64::MAX))
        .expect("range")
        .map(|item| {
            let (k, v) = item.expect("chunk");
            (k.value().1, v.value().len())
        })
        .collect()
}

#[test]
fn schema_1_is_upgraded_in_place_and_reads_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(spoolfs_store::DB_FILE);
    let files = files();
    let inos = v1_database(&path, &files);

    let db = open_database(&path).expect("a schema-1 database opens");
    let (wal, _) = Wal::open(&db, dir.path()).expect("open log and upgrade");
    assert_eq!(wal.upgraded_from(), Some(1));
    drop(wal);

    let txn = db.begin_write().expect("begin");
    {
        let mut t = Tables::open(&txn).expect("tables");
        assert_eq!(
            t.meta(META_SCHEMA_VERSION).expect("meta"),
            Some(SCHEMA_VERSION)
        );
        for (f, ino) in files.iter().zip(&inos) {
            let got = data::read(&mut t, *ino, 0, f.size as usize).expect("read");
            assert!(got == f.content(), "inode {ino}: content changed");
        }
    }
    txn.abort().expect("abort");
    for (f, ino) in files.iter().zip(&inos) {
        for (idx, len) in stored_chunks(&db, *ino) {
            let start = idx * CHUNK_SIZE;
            assert!(start < f.size, "inode {ino}: chunk {idx} past the size");
            assert!(
                len as u64 == CHUNK_SIZE.min(f.size - start),
                "inode {ino}: chunk {idx} has {len} bytes"
            );
        }
    }
    // New chunks that no stored byte falls in stay holes: in the sparse file, new chunk 1
    // holds old chunk 1's 1,000 bytes, 4 and 5 old chunk 4; 0, 2 and 3 are holes.
    let sparse: Vec<u64> = stored_chunks(&db, inos[3]).iter().map(|c| c.0).collect();
    assert_eq!(sparse, vec![1, 4, 5], "sparse file's chunks");

    let report = fsck::check(&db, false, &mut |_, _, _| {}).expect("fsck");
    assert!(report.problems.is_empty(), "fsck: {:?}", report.problems);
    drop(db);

    // A second open finds the current version: nothing to upgrade, content unchanged.
    let db = open_database(&path).expect("reopen");
    let (wal, _) = Wal::open(&db, dir.path()).expect("open log");
    assert_eq!(wal.upgraded_from(), None);
    let txn = db.begin_write().expect("begin");
    {
        let mut t = Tables::open(&txn).expect("tables");
        for (f, ino) in files.iter().zip(&inos) {
            let got = data::read(&mut t, *ino, 0, f.size as usize).expect("read");
            assert!(got == f.content(), "inode {ino}: content changed on reopen");
        }
    }
    txn.abort().expect("abort");
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(spoolfs_store::DB_FILE);
    {
        let db = open_database(&path).expect("open");
        let txn = db.begin_write().expect("begin");
        {
            let mut t = Tables::open(&txn).expect("tables");
            t.set_meta(META_SCHEMA_VERSION, SCHEMA_VERSION + 1)
                .expect("stamp");
        }
        txn.commit().expect("commit");
    }
    let e = open_database(&path).expect_err("a newer schema must be refused");
    assert!(e.to_string().contains("newer spoolfs"), "{e}");
}
