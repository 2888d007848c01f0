//! `space::live_bytes_upper` must never be below what redb really allocates for the live
//! records (else the runtime's space guard would count free room inside the database file that
//! is not there). Checked against redb's own page count (`WriteTransaction::stats`, which walks
//! every page: fine for a test) for small files, large files, xattrs and symlinks, and after
//! deleting part of them.

use redb::{Database, Durability, ReadableDatabase};
mod common;

use common::{create, ctx};
use spoolfs_core::{Fs, Ino, Limits};
use spoolfs_store::space::live_bytes_upper;
use spoolfs_store::{open_database, Tables};

struct Db {
    _dir: tempfile::TempDir,
    db: Database,
    fs: Fs,
    next_ino: u64,
}

impl Db {
    fn new() -> Db {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open_database(&dir.path().join(spoolfs_store::DB_FILE)).expect("open");
        let mut fs = Fs::new(Limits::default());
        let txn = db.begin_write().expect("begin");
        {
            let mut t = Tables::open(&txn).expect("tables");
            fs.init_root(&mut t, &ctx(), 0o755).expect("root");
        }
        txn.commit().expect("commit");
        Db {
            _dir: dir,
            db,
            fs,
            next_ino: 2,
        }
    }

    /// Run `f` in one durable write transaction.
    fn batch(&mut self, f: impl FnOnce(&mut Fs, &mut Tables<'_>, &mut u64)) {
        let mut txn = self.db.begin_write().expect("begin");
        {
            let mut t = Tables::open(&txn).expect("tables");
            f(&mut self.fs, &mut t, &mut self.next_ino);
        }
        txn.set_durability(Durability::Immediate).expect("durable");
        txn.commit().expect("commit");
    }

    fn write_files(&mut self, prefix: &str, count: usize, size: usize, xattr: usize) {
        self.batch(|fs, t, next| {
            for i in 0..count {
                let (ino, fh) = create(fs, t, next, &format!("{prefix}-{i}"));
                let data = vec![(i % 251) as u8; size];
                let mut off = 0;
                while off < size {
                    let end = (off + (1 << 20)).min(size);
                    fs.write(t, &ctx(), ino, fh, off as u64, &data[off..end])
                        .expect("write");
                    off = end;
                }
                if xattr > 0 {
                    fs.setxattr(t, &ctx(), ino, b"user.k", &vec![7u8; xattr], 0)
                        .expect("setxattr");
                }
                fs.release(t, ino, fh).expect("release");
                fs.forget(t, ino, 1).expect("forget");
            }
        });
    }

    fn delete_files(&mut self, prefix: &str, range: std::ops::Range<usize>, every: usize) {
        self.batch(|fs, t, _| {
            for i in range.step_by(every) {
                let name = format!("{prefix}-{i}");
                fs.unlink(t, &ctx(), Ino::ROOT, name.as_bytes())
                    .expect("unlink");
            }
        });
    }

    /// (estimate, bytes of pages redb has allocated)
    fn measure(&mut self) -> (u64, u64) {
        // Two empty durable commits: pages freed by the last ones are released.
        for _ in 0..2 {
            let mut txn = self.db.begin_write().expect("begin");
            txn.set_durability(Durability::Immediate).expect("durable");
            txn.commit().expect("commit");
        }
        let estimate = live_bytes_upper(&self.db.begin_read().expect("read"))
            .expect("estimate")
            .bytes;
        let txn = self.db.begin_write().expect("begin");
        let stats = txn.stats().expect("stats");
        let allocated = stats.allocated_pages() * stats.page_size() as u64;
        txn.abort().expect("abort");
        (estimate, allocated)
    }
}

#[track_caller]
fn assert_upper_bound(db: &mut Db, what: &str) {
    let (estimate, allocated) = db.measure();
    eprintln!(
        "{what}: estimate {estimate}, redb allocated {allocated} ({:.2}x)",
        estimate as f64 / allocated.max(1) as f64
    );
    assert!(
        estimate >= allocated,
        "{what}: the estimate {estimate} is below what redb allocated ({allocated})"
    );
}

#[test]
fn estimate_bounds_small_files_and_survives_deletions() {
    let mut db = Db::new();
    for round in 0..4 {
        db.write_files(&format!("small{round}"), 2000, 300 + round * 1500, 0);
    }
    assert_upper_bound(&mut db, "8000 small files");
    for round in 0..4 {
        db.delete_files(&format!("small{round}"), 0..2000, 2);
    }
    assert_upper_bound(&mut db, "half of them deleted");
    for round in 0..4 {
        db.delete_files(&format!("small{round}"), 1..2000, 2);
    }
    db.write_files("again", 3000, 5000, 100);
    assert_upper_bound(&mut db, "churn");
}

#[test]
fn estimate_bounds_large_files_xattrs_and_tails() {
    let mut db = Db::new();
    db.write_files("big", 20, 3 << 20, 0);
    db.write_files("tail", 40, (1 << 20) + 12345, 60_000);
    assert_upper_bound(&mut db, "large files");
    db.delete_files("big", 0..20, 3);
    db.delete_files("tail", 0..40, 2);
    assert_upper_bound(&mut db, "a third and a half deleted");
    db.write_files("mixed", 200, 70_000, 2000);
    assert_upper_bound(&mut db, "rewritten");
}

/// Files growing in turns, one commit per step, as concurrent writers' flushes arrive: each
/// step appends part of a chunk to one file, so full chunks are inserted between other
/// files' chunks and short tails are rewritten in place again and again.
#[test]
fn estimate_bounds_files_growing_in_turns() {
    let mut db = Db::new();
    let files: Vec<(Ino, spoolfs_core::Fh)> = (0..12)
        .map(|i| {
            let mut created = None;
            db.batch(|fs, t, next| {
                created = Some(create(fs, t, next, &format!("grow-{i}")));
            });
            created.expect("created")
        })
        .collect();
    let mut sizes = vec![0u64; files.len()];
    for step in 0..240usize {
        let k = (step * 7) % files.len();
        let (ino, fh) = files[k];
        // 5 KiB to 45 KiB per step: most steps end inside a chunk
        let len = 5_000 + (step * 4099) % 40_000;
        let at = sizes[k];
        db.batch(|fs, t, _| {
            fs.write(t, &ctx(), ino, fh, at, &vec![step as u8; len])
                .expect("write");
        });
        sizes[k] += len as u64;
    }
    assert_upper_bound(&mut db, "12 files grown in turns");
    db.batch(|fs, t, _| {
        for (i, (ino, fh)) in files.iter().enumerate() {
            fs.release(t, *ino, *fh).expect("release");
            fs.forget(t, *ino, 1).expect("forget");
            if i % 2 == 0 {
                let name = format!("grow-{i}");
                fs.unlink(t, &ctx(), Ino::ROOT, name.as_bytes())
                    .expect("unlink");
            }
        }
    });
    assert_upper_bound(&mut db, "half of them deleted");
}
