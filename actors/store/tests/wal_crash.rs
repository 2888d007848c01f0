//! The write-ahead log under crashes. After every commit a crash image is taken (the files
//! copied while the database is still open, which is what a killed daemon leaves: redb's
//! non-durable commits may or may not have reached the file) and reopened; after replay it
//! must hold exactly the records of every commit so far. The log is made tiny so it wraps and
//! checkpoints every few commits, and some deltas are big enough to bypass it.

use std::collections::BTreeMap;

use spoolfs_core::{Dentry, Ino, Inode, Kind, Timestamp};
use spoolfs_store::pending::{Key, Value};
use spoolfs_store::{open_database, Delta, Pending, Wal, WalLimits, DB_FILE, WAL_FILE};

const SEED: u64 = 0x5EED_0A11;
const COMMITS: usize = 300;

fn limits() -> WalLimits {
    WalLimits {
        capacity: 64 << 10,
        checkpoint_bytes: 16 << 10,
        direct_bytes: 12 << 10,
        apply_commits: 5,
        apply_bytes: 8 << 10,
    }
}

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn inode(ino: u64, size: u64) -> Inode {
    let t = Timestamp::new(1_700_000_000 + ino as i64, 7);
    Inode {
        size,
        ..Inode::new(Ino(ino), Kind::File, 0o640, (1000, 1000), t, Ino(1))
    }
}

/// A random change to a small key space, so puts and removals hit the same records often.
fn change(rng: &mut Rng) -> (Key, Option<Value>) {
    let id = 2 + rng.below(40);
    let remove = rng.below(4) == 0;
    let (key, value) = match rng.below(5) {
        0 => (Key::Inode(id), Value::Inode(inode(id, rng.below(1 << 20)))),
        1 => {
            let name = format!("msg-{}", rng.below(60)).into_bytes();
            let d = Dentry {
                ino: Ino(id),
                kind: Kind::File,
            };
            (Key::Dentry(1, name), Value::Dentry(d))
        }
        2 => {
            // Mostly small chunks; now and then one big enough to bypass the log.
            let len = if rng.below(25) == 0 {
                20_000
            } else {
                rng.below(3_000) as usize
            };
            let byte = rng.below(256) as u8;
            (Key::Chunk(id, rng.below(4)), Value::Bytes(vec![byte; len]))
        }
        3 => {
            let name = format!("user.k{}", rng.below(5)).into_bytes();
            (
                Key::Xattr(id, name),
                Value::Bytes(vec![1; rng.below(100) as usize]),
            )
        }
        _ => (Key::Orphan(id), Value::Unit),
    };
    (key, (!remove).then_some(value))
}

/// Open a copy of `dir`'s files, replay the log, and return every record.
fn crash_image(dir: &std::path::Path) -> BTreeMap<Key, Value> {
    let image = tempfile::tempdir().expect("tempdir");
    for f in [DB_FILE, WAL_FILE] {
        std::fs::copy(dir.join(f), image.path().join(f)).expect("copy");
    }
    let db = open_database(&image.path().join(DB_FILE)).expect("open image");
    Wal::open_with(&db, image.path(), limits()).expect("replay");
    let records = Pending::new(db, None)
        .expect("snapshot")
        .records()
        .expect("records");
    records
        .into_iter()
        .filter(|(k, _)| !matches!(k, Key::Meta(_)))
        .collect()
}

#[test]
fn every_crash_image_holds_every_commit_after_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open_database(&dir.path().join(DB_FILE)).expect("open");
    let (mut wal, replayed) = Wal::open_with(&db, dir.path(), limits()).expect("open log");
    assert_eq!(replayed, 0);
    let mut rng = Rng(SEED);
    let mut model: BTreeMap<Key, Value> = BTreeMap::new();
    let mut wraps = 0;
    let mut last_len = 0;
    for i in 0..COMMITS {
        let mut delta = Delta::default();
        for _ in 0..1 + rng.below(12) {
            let (key, value) = change(&mut rng);
            match &value {
                Some(v) => drop(model.insert(key.clone(), v.clone())),
                None => drop(model.remove(&key)),
            }
            delta.set_record(key, value);
        }
        wal.commit(&db, &delta).expect("commit");
        let got = crash_image(dir.path());
        assert!(
            got == model,
            "commit #{i}: the crash image differs from the model ({} vs {} records)",
            got.len(),
            model.len()
        );
        // Count how often the log started over (its live part shrank).
        let len = wal.used();
        if len < last_len {
            wraps += 1;
        }
        last_len = len;
    }
    assert!(wraps >= 10, "the log wrapped only {wraps} times");
}

/// Logged changes reach redb in batches: every `apply_commits` commits, and at a checkpoint;
/// until then only the log (and the actor's copy) holds them, and the log says so.
#[test]
fn logged_changes_reach_redb_in_batches() {
    use redb::{ReadableDatabase, ReadableTableMetadata};
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open_database(&dir.path().join(DB_FILE)).expect("open");
    let limits = WalLimits {
        capacity: 1 << 20,
        checkpoint_bytes: 512 << 10,
        direct_bytes: 64 << 10,
        apply_commits: 3,
        apply_bytes: 256 << 10,
    };
    let (mut wal, _) = Wal::open_with(&db, dir.path(), limits).expect("open log");
    let stored = |db: &redb::Database| {
        let txn = db.begin_read().expect("read");
        txn.open_table(spoolfs_store::INODES)
            .expect("table")
            .len()
            .expect("len")
    };
    for (i, in_redb) in [(2, 0), (3, 0), (4, 3), (5, 3), (6, 3), (7, 6), (8, 6)] {
        let mut delta = Delta::default();
        delta.set_record(Key::Inode(i), Some(Value::Inode(inode(i, 1))));
        wal.commit(&db, &delta).expect("commit");
        assert_eq!(stored(&db), in_redb, "after the commit of inode {i}");
        assert_eq!(wal.has_unapplied(), in_redb < i - 1, "after inode {i}");
    }
    wal.checkpoint(&db, None).expect("checkpoint");
    assert_eq!(stored(&db), 7, "a checkpoint writes everything logged");
    assert!(!wal.has_unapplied());
    // A big delta goes to redb directly, with what was logged before it.
    let mut delta = Delta::default();
    delta.set_record(Key::Inode(9), Some(Value::Inode(inode(9, 1))));
    wal.commit(&db, &delta).expect("commit");
    assert_eq!(stored(&db), 7);
    let mut big = Delta::default();
    big.set_record(Key::Chunk(9, 0), Some(Value::Bytes(vec![1; 100 << 10])));
    wal.commit(&db, &big).expect("commit");
    assert_eq!(
        stored(&db),
        8,
        "the logged inode went in with the big delta"
    );
    assert!(!wal.has_unapplied());
}
