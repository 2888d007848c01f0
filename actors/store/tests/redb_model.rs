//! The core's random operation sequences (see `actors/core/tests/harness`) applied to
//! `Fs` + `MemStore` and to `Fs` + the redb `Tables` in lockstep: every answer, the observable
//! state after every operation, and every stored record (inodes with their times, entries,
//! chunk bytes, xattrs, symlink targets, orphans) every few operations must be the same.
//!
//! The redb side commits every few operations (mostly with `Durability::None`) and
//! `Op::Restart` commits, closes and reopens the database, so orphans and everything else
//! must survive a restart.
//!
//! The same sequences run against `Pending`, the store the runtime uses: changes held in
//! memory over a read snapshot, sealed and committed in a pipeline. The backend seals and
//! commits at staggered points so reads go through all three layers, and now and then a
//! commit "fails" (the delta goes back under the newer one and the database is reopened).

#[path = "../../core/tests/harness/mod.rs"]
mod harness;

use std::path::PathBuf;

use proptest::test_runner::{TestCaseError, TestRunner};
use redb::{Database, Durability, ReadableTable, WriteTransaction};
use spoolfs_core::{Dentry, Ino, Kind, MemStore, Store};
use spoolfs_store::pending::CommitJob;
use spoolfs_store::pending::{Key, Value};
use spoolfs_store::{open_database, Pending, Tables, Wal};

use harness::driver::Driver;
use harness::ops::Loc::*;
use harness::ops::Op::*;
use harness::ops::Ref::*;
use harness::ops::{ops, Op, Path};
use harness::sut::{Backend, RawDump, Sut};

/// A redb database in a temporary directory, with one write transaction always open.
struct Redb {
    _dir: tempfile::TempDir,
    path: PathBuf,
    db: Option<Database>,
    txn: Option<WriteTransaction>,
    commits: usize,
}

impl Redb {
    fn new() -> Redb {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(spoolfs_store::DB_FILE);
        let db = open_database(&path).expect("open database");
        let txn = db.begin_write().expect("begin write");
        Redb {
            _dir: dir,
            path,
            db: Some(db),
            txn: Some(txn),
            commits: 0,
        }
    }

    fn commit(&mut self, durability: Durability) {
        let mut txn = self.txn.take().expect("open transaction");
        txn.set_durability(durability).expect("set durability");
        txn.commit().expect("commit");
        self.commits += 1;
        let db = self.db.as_ref().expect("database");
        self.txn = Some(db.begin_write().expect("begin write"));
    }
}

impl Backend for Redb {
    type S<'a> = Tables<'a>;

    fn with<R>(&mut self, f: impl for<'a> FnOnce(&mut Tables<'a>) -> R) -> R {
        let txn = self.txn.as_ref().expect("open transaction");
        let mut tables = Tables::open(txn).expect("open tables");
        f(&mut tables)
    }

    fn dump(&mut self) -> RawDump {
        self.with(|t| {
            let mut d = RawDump::default();
            let inos: Vec<u64> = t
                .inodes
                .iter()
                .expect("inodes")
                .map(|r| r.expect("inode").0.value())
                .collect();
            for ino in inos {
                let inode = t.inode(Ino(ino)).expect("decode").expect("present");
                d.inodes.insert(ino, inode);
            }
            for r in t.dentries.iter().expect("dentries") {
                let (k, v) = r.expect("dentry");
                let (parent, name) = k.value();
                let (ino, kind) = v.value();
                let kind = Kind::from_byte(kind).expect("kind byte");
                d.dentries.insert(
                    (parent, name.to_vec()),
                    Dentry {
                        ino: Ino(ino),
                        kind,
                    },
                );
            }
            for r in t.symlinks.iter().expect("symlinks") {
                let (k, v) = r.expect("symlink");
                d.symlinks.insert(k.value(), v.value().to_vec());
            }
            for r in t.xattrs.iter().expect("xattrs") {
                let (k, v) = r.expect("xattr");
                let (ino, name) = k.value();
                d.xattrs.insert((ino, name.to_vec()), v.value().to_vec());
            }
            for r in t.chunks.iter().expect("chunks") {
                let (k, v) = r.expect("chunk");
                d.chunks.insert(k.value(), v.value().to_vec());
            }
            for r in t.orphans.iter().expect("orphans") {
                d.orphans.insert(r.expect("orphan").0.value());
            }
            d
        })
    }

    fn op_done(&mut self, index: usize) {
        if index % 7 == 6 {
            // Mostly group-commit style non-durable commits; now and then a durable one.
            let durability = if self.commits % 8 == 7 {
                Durability::Immediate
            } else {
                Durability::None
            };
            self.commit(durability);
        }
    }

    fn restart(&mut self) {
        self.commit(Durability::Immediate);
        self.txn = None;
        self.db = None;
        let db = open_database(&self.path).expect("reopen database");
        self.txn = Some(db.begin_write().expect("begin write"));
        self.db = Some(db);
    }
}

/// `Pending` over a database in a temporary directory, with its commits driven by hand and
/// going through the write-ahead log.
struct Staged {
    dir: tempfile::TempDir,
    state: Option<Pending>,
    /// A sealed delta whose commit has not run yet.
    held: Option<CommitJob>,
    ops: usize,
}

fn open_staged(dir: &std::path::Path) -> Pending {
    let db = open_database(&dir.join(spoolfs_store::DB_FILE)).expect("open database");
    let (wal, _) = Wal::open(&db, dir).expect("open log");
    Pending::new(db, Some(wal)).expect("snapshot")
}

impl Staged {
    fn new() -> Staged {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = Some(open_staged(dir.path()));
        Staged {
            dir,
            state,
            held: None,
            ops: 0,
        }
    }

    fn state(&mut self) -> &mut Pending {
        self.state.as_mut().expect("state")
    }

    /// Seal the current changes and commit them, the way the actor's commit task does.
    fn seal_and_commit(&mut self) {
        if let Some(job) = self.state().seal() {
            let (r, wal) = job.run();
            r.expect("commit");
            self.state().committed(wal).expect("new snapshot");
        }
    }
}

impl Backend for Staged {
    type S<'a> = Pending;

    fn with<R>(&mut self, f: impl for<'a> FnOnce(&mut Pending) -> R) -> R {
        f(self.state())
    }

    fn dump(&mut self) -> RawDump {
        // Read through all three layers (pending, sealed, snapshot), committing nothing.
        let mut d = RawDump::default();
        for (k, v) in self.state().records().expect("records") {
            match (k, v) {
                (Key::Inode(i), Value::Inode(n)) => drop(d.inodes.insert(i, n)),
                (Key::Dentry(p, n), Value::Dentry(x)) => drop(d.dentries.insert((p, n), x)),
                (Key::Xattr(i, n), Value::Bytes(b)) => drop(d.xattrs.insert((i, n), b)),
                (Key::Symlink(i), Value::Bytes(b)) => drop(d.symlinks.insert(i, b)),
                (Key::Chunk(i, x), Value::Bytes(b)) => drop(d.chunks.insert((i, x), b)),
                (Key::Orphan(i), _) => drop(d.orphans.insert(i)),
                (Key::Meta(_), _) => {}
                (k, v) => panic!("record {k:?} has the wrong kind of value {v:?}"),
            }
        }
        d
    }

    fn op_done(&mut self, _index: usize) {
        self.ops += 1;
        match self.ops % 9 {
            // Seal, keep operating on top of the sealed delta (the job waits), then commit.
            2 => self.held = self.state().seal(),
            6 => {
                if let Some(job) = self.held.take() {
                    let (r, wal) = job.run();
                    r.expect("commit");
                    self.state().committed(wal).expect("new snapshot");
                }
            }
            // Every other round the commit fails (with newer changes made on top of the
            // sealed ones): they go back under the newer ones and the database is reopened;
            // the retry must land them all, newest last.
            5 if (self.ops / 9).is_multiple_of(2) => {
                self.held = None;
                self.state().commit_failed();
                let dir = self.dir.path().to_path_buf();
                self.state().reopen(&dir).expect("reopen");
            }
            _ => {}
        }
    }

    fn restart(&mut self) {
        // Everything goes through the log, then the daemon "crashes" and the reopen must
        // replay the log.
        if let Some(job) = self.held.take() {
            let (r, wal) = job.run();
            r.expect("commit");
            self.state().committed(wal).expect("new snapshot");
        }
        self.seal_and_commit();
        // A crash image: the files as they are now, while the database is still open (its
        // non-durable commits may be in the file or not; the log must make up for them).
        let image = tempfile::tempdir().expect("tempdir");
        for f in [spoolfs_store::DB_FILE, spoolfs_store::WAL_FILE] {
            std::fs::copy(self.dir.path().join(f), image.path().join(f)).expect("copy");
        }
        self.state = None;
        self.dir = image;
        self.state = Some(open_staged(self.dir.path()));
    }
}

const CASES: u32 = 12;
const SEED: u64 = 0x0590_01f5;

fn runner() -> TestRunner {
    harness::seeded_runner(
        harness::env_or("PROPTEST_CASES", CASES),
        harness::env_or("SPOOLFS_MODEL_SEED", SEED),
        2_000,
    )
}

/// Apply `ops` to both stores; every 10 operations and at the end compare every record.
fn check(ops: &[Op]) -> Result<usize, String> {
    check_with(ops, Redb::new())
}

fn check_with<B: Backend>(ops: &[Op], backend: B) -> Result<usize, String> {
    let mem = Sut::new(MemStore::default());
    let redb = Sut::new(backend);
    let mut d = Driver::new(mem, redb);
    let raw = |d: &mut Driver<Sut<MemStore>, Sut<B>>| -> Result<(), String> {
        let a = d.a.backend.dump();
        let b = d.b.backend.dump();
        if a != b {
            return Err(format!("stored records differ:\n{}", diff_raw(&a, &b)));
        }
        Ok(())
    };
    for (i, op) in ops.iter().enumerate() {
        d.apply(op).map_err(|e| format!("op #{i} {op:?}:\n  {e}"))?;
        if i % 10 == 9 {
            raw(&mut d).map_err(|e| format!("after op #{i} {op:?}:\n  {e}"))?;
        }
    }
    raw(&mut d)?;
    d.finish().map_err(|e| format!("at the end: {e}"))?;
    raw(&mut d)?;
    // What was committed is what a restart finds.
    d.a.backend.restart();
    d.b.backend.restart();
    raw(&mut d).map_err(|e| format!("after reopening: {e}"))?;
    Ok(d.applied)
}

fn diff_raw(a: &RawDump, b: &RawDump) -> String {
    fn keys<K: Ord + Clone + std::fmt::Debug, V: PartialEq>(
        out: &mut String,
        what: &str,
        a: &std::collections::BTreeMap<K, V>,
        b: &std::collections::BTreeMap<K, V>,
    ) {
        for (k, va) in a {
            if b.get(k) != Some(va) {
                out.push_str(&format!("  {what} {k:?} differs or only in memory\n"));
            }
        }
        for k in b.keys() {
            if !a.contains_key(k) {
                out.push_str(&format!("  {what} {k:?} only in redb\n"));
            }
        }
    }
    let mut out = String::new();
    for (ino, ia) in &a.inodes {
        match b.inodes.get(ino) {
            Some(ib) if ib == ia => {}
            other => out.push_str(&format!("  inode {ino}: {ia:?}\n    vs {other:?}\n")),
        }
    }
    keys(&mut out, "inode", &a.inodes, &b.inodes);
    keys(&mut out, "dentry", &a.dentries, &b.dentries);
    keys(&mut out, "symlink", &a.symlinks, &b.symlinks);
    keys(&mut out, "xattr", &a.xattrs, &b.xattrs);
    keys(&mut out, "chunk", &a.chunks, &b.chunks);
    if a.orphans != b.orphans {
        out.push_str(&format!("  orphans {:?} vs {:?}\n", a.orphans, b.orphans));
    }
    out
}

#[test]
fn redb_store_matches_mem_store() {
    let total = std::sync::atomic::AtomicUsize::new(0);
    let result = runner().run(&ops(1..=400), |ops| {
        let n = check(&ops).map_err(TestCaseError::fail)?;
        total.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!(
        "redb model test: {} operations",
        total.load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[test]
fn pending_store_matches_mem_store() {
    let total = std::sync::atomic::AtomicUsize::new(0);
    let result = runner().run(&ops(1..=400), |ops| {
        let n = check_with(&ops, Staged::new()).map_err(TestCaseError::fail)?;
        total.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!(
        "pending model test: {} operations",
        total.load(std::sync::atomic::Ordering::Relaxed)
    );
}

fn replay(ops: &[Op]) {
    if let Err(e) = check(ops) {
        panic!("{e}");
    }
}

/// Orphans (unlinked while open) and their content survive a restart of the database until
/// `reclaim_orphans` frees them, in both stores alike.
#[test]
fn orphans_survive_reopen_then_are_reclaimed() {
    let root = || At(Path::of(&[]));
    replay(&[
        Mkdir {
            at: In(root(), 0),
            mode: 0,
        },
        Create {
            at: In(At(Path::of(&[0])), 1),
            mode: 0,
            acc: 2,
        },
        Write {
            h: 0,
            offset: 65_000,
            len: 70_000,
            seed: 9,
        },
        SetXattr {
            target: Handle(0),
            name: 0,
            value: 5,
            flags: 0,
        },
        OpenDir {
            target: At(Path::of(&[0])),
        },
        Unlink {
            at: In(At(Path::of(&[0])), 1),
        },
        Rmdir { at: In(root(), 0) },
        ForgetAll,
        Read {
            h: 0,
            offset: 64_000,
            len: 5_000,
        },
        Restart,
        Create {
            at: In(root(), 2),
            mode: 1,
            acc: 1,
        },
        Fallocate {
            h: 0,
            offset: 10,
            len: 200_000,
            mode: 0,
        },
        Fallocate {
            h: 0,
            offset: 70_000,
            len: 1_000,
            mode: 2,
        },
    ]);
}
