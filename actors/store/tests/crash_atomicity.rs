//! Crash atomicity of the whole storage stack (core + `Tables` + redb), at the level of the
//! bytes redb hands to its storage.
//!
//! A simulated disk (a redb `StorageBackend`) records every `write`, `set_len` and `sync_data`.
//! The core's random operation sequences (the model-test harness of `actors/core/tests`,
//! checked in lockstep against `MemStore`) run over it, committing every few operations with a
//! mix of `Durability::None` and `Durability::Immediate`, like the runtime's group commits, and
//! restarting (clean close and reopen) now and then. Before each commit the test records the
//! state that commit would make (every record of every table).
//!
//! Then, for every cut point N (release builds: every one, about 6,000; debug builds: a seeded
//! sample that always includes the operations around each sync) it rebuilds the bytes a crash
//! after the first N I/O operations could leave:
//!
//! - power loss: only what was written before the last `sync_data` survives;
//! - power loss with reordering: each later write is dropped, kept, or torn (some 512-byte
//!   sectors and a byte prefix kept), and each later `set_len` kept or not, from a seed;
//! - process crash (the page cache survives): every write up to N survives.
//!
//! Each image must open (redb's repair is fine), `spoolfs_store::fsck::check` must find no
//! problem, and its records must equal the state of one committed transaction `k` with
//! `lo <= k <= hi`: `lo` the newest transaction whose `Immediate` commit returned before the
//! cut, `hi` the newest whose commit had begun. A database reopened that way must take a new
//! commit (the daemon's start: `reclaim_orphans`) and still pass fsck.
//!
//! A second test injects I/O errors: from operation N on, the disk fails writes, or syncs,
//! once or for good. The commit during which the error happens must return an error, and the
//! bytes left (with and without the page cache) must again reopen to a committed prefix that
//! holds every acknowledged durable commit.
//!
//! Crashes while the database file is first created (before the first durable commit) are out
//! of scope: the cut points start after it.
//!
//! Environment: `SPOOLFS_CRASH_SEED` (u64) changes every seed, `SPOOLFS_CRASH_CUTS` the number
//! of cut points checked per sequence (0 = all of them). About 9 s with `--release`.

#[path = "../../core/tests/harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use redb::backends::InMemoryBackend;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, StorageBackend, WriteTransaction,
};
use spoolfs_core::{Dentry, Fs, Ino, Kind, MemStore};
use spoolfs_store::codec::decode_inode;
use spoolfs_store::{
    fsck, Tables, CHUNKS, DENTRIES, INODES, META, META_NEXT_INO, META_SCHEMA_VERSION, ORPHANS,
    SCHEMA_VERSION, SYMLINKS, XATTRS,
};

use harness::driver::Driver;
use harness::ops::{ops, Op};
use harness::sut::{RawDump, Sut};

// --- a deterministic random source ----------------------------------------------------------

/// splitmix64: enough for picking cut points and tearing writes, and reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn base_seed() -> u64 {
    env_or("SPOOLFS_CRASH_SEED", 0x0c4a_5e11)
}

// --- the simulated disk ---------------------------------------------------------------------

/// One mutating call redb made on its storage.
#[derive(Clone, Debug)]
enum Io {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    Sync,
}

fn apply_io(bytes: &mut Vec<u8>, io: &Io) {
    match io {
        Io::Write { offset, data } => {
            let start = *offset as usize;
            let end = start + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[start..end].copy_from_slice(data);
        }
        Io::SetLen(len) => bytes.resize(*len as usize, 0),
        Io::Sync => {}
    }
}

/// Which calls an injected fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultOn {
    /// `write` and `set_len`.
    Write,
    Sync,
}

#[derive(Clone, Copy, Debug)]
struct Fault {
    /// The first call of the kind made once this many operations were logged (counted from
    /// the end of the initial commit) fails.
    after: usize,
    on: FaultOn,
    /// Every later call of the kind fails too (a dead disk), not just the first.
    sticky: bool,
}

/// What the workload was doing when an operation ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Setup,
    Ops,
    Commit(usize),
    Close,
    Open,
}

#[derive(Debug)]
struct Disk {
    /// What reads see: the bytes in the page cache.
    bytes: Vec<u8>,
    /// Every mutation that succeeded, in order.
    log: Vec<Io>,
    phase: Phase,
    fault: Option<Fault>,
    /// Log length from which `fault.after` counts.
    fault_base: usize,
    /// Where the first injected error happened: (log length, phase).
    fired: Option<(usize, Phase)>,
}

impl Disk {
    fn hit(&mut self, kind: FaultOn) -> io::Result<()> {
        let Some(f) = self.fault else { return Ok(()) };
        if f.on != kind || self.log.len() < self.fault_base + f.after {
            return Ok(());
        }
        if self.fired.is_some() && !f.sticky {
            return Ok(());
        }
        if self.fired.is_none() {
            self.fired = Some((self.log.len(), self.phase));
        }
        Err(io::Error::other("injected I/O error"))
    }
}

/// The handle redb gets: every instance opened on one `Disk` shares its bytes and log.
#[derive(Clone, Debug)]
struct SimBackend(Arc<Mutex<Disk>>);

fn lock(disk: &Mutex<Disk>) -> MutexGuard<'_, Disk> {
    disk.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_at(bytes: &[u8], offset: u64, out: &mut [u8]) -> io::Result<()> {
    let start = usize::try_from(offset).map_err(io::Error::other)?;
    let end = start
        .checked_add(out.len())
        .filter(|end| *end <= bytes.len())
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
    out.copy_from_slice(&bytes[start..end]);
    Ok(())
}

impl StorageBackend for SimBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.0).bytes.len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        read_at(&lock(&self.0).bytes, offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut d = lock(&self.0);
        d.hit(FaultOn::Write)?;
        let io = Io::SetLen(len);
        apply_io(&mut d.bytes, &io);
        d.log.push(io);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut d = lock(&self.0);
        d.hit(FaultOn::Sync)?;
        d.log.push(Io::Sync);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = lock(&self.0);
        d.hit(FaultOn::Write)?;
        let io = Io::Write {
            offset,
            data: data.to_vec(),
        };
        apply_io(&mut d.bytes, &io);
        d.log.push(io);
        Ok(())
    }
}

/// The bytes a crash left, opened again (nothing is recorded any more).
#[derive(Debug)]
struct Image(Mutex<Vec<u8>>);

impl Image {
    fn bytes(&self) -> MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StorageBackend for Image {
    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes().len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        read_at(&self.bytes(), offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.bytes().resize(len as usize, 0);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        apply_io(
            &mut self.bytes(),
            &Io::Write {
                offset,
                data: data.to_vec(),
            },
        );
        Ok(())
    }
}

// --- whole-database state -------------------------------------------------------------------

/// Every record of every table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct State {
    raw: RawDump,
    meta: BTreeMap<String, u64>,
}

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// Read every table, from a write transaction's `Tables` or a read transaction alike.
#[allow(clippy::too_many_arguments)]
fn dump_tables(
    inodes: &impl ReadableTable<u64, &'static [u8]>,
    dentries: &impl ReadableTable<(u64, &'static [u8]), (u64, u8)>,
    symlinks: &impl ReadableTable<u64, &'static [u8]>,
    xattrs: &impl ReadableTable<(u64, &'static [u8]), &'static [u8]>,
    chunks: &impl ReadableTable<(u64, u64), &'static [u8]>,
    orphans: &impl ReadableTable<u64, ()>,
    meta: &impl ReadableTable<&'static str, u64>,
) -> Result<State, String> {
    let mut s = State::default();
    for r in inodes.iter().map_err(e)? {
        let (k, v) = r.map_err(e)?;
        let inode = decode_inode(k.value(), v.value()).map_err(e)?;
        s.raw.inodes.insert(k.value(), inode);
    }
    for r in dentries.iter().map_err(e)? {
        let (k, v) = r.map_err(e)?;
        let (parent, name) = k.value();
        let (ino, kind) = v.value();
        let kind = Kind::from_byte(kind).ok_or_else(|| format!("dentry kind {kind}"))?;
        s.raw.dentries.insert(
            (parent, name.to_vec()),
            Dentry {
                ino: Ino(ino),
                kind,
            },
        );
    }
    for r in symlinks.iter().map_err(e)? {
        let (k, v) = r.map_err(e)?;
        s.raw.symlinks.insert(k.value(), v.value().to_vec());
    }
    for r in xattrs.iter().map_err(e)? {
        let (k, v) = r.map_err(e)?;
        let (ino, name) = k.value();
        s.raw
            .xattrs
            .insert((ino, name.to_vec()), v.value().to_vec());
    }
    for r in chunks.iter().map_err(e)? {
        let (k, v) = r.map_err(e)?;
        s.raw.chunks.insert(k.value(), v.value().to_vec());
    }
    for r in orphans.iter().map_err(e)? {
        s.raw.orphans.insert(r.map_err(e)?.0.value());
    }
    for r in meta.iter().map_err(e)? {
        let (k, v) = r.map_err(e)?;
        s.meta.insert(k.value().to_string(), v.value());
    }
    Ok(s)
}

fn dump_txn(t: &Tables<'_>) -> Result<State, String> {
    dump_tables(
        &t.inodes,
        &t.dentries,
        &t.symlinks,
        &t.xattrs,
        &t.chunks,
        &t.orphans,
        &t.meta,
    )
}

fn dump_db(db: &Database) -> Result<State, String> {
    let txn = db.begin_read().map_err(e)?;
    dump_tables(
        &txn.open_table(INODES).map_err(e)?,
        &txn.open_table(DENTRIES).map_err(e)?,
        &txn.open_table(SYMLINKS).map_err(e)?,
        &txn.open_table(XATTRS).map_err(e)?,
        &txn.open_table(CHUNKS).map_err(e)?,
        &txn.open_table(ORPHANS).map_err(e)?,
        &txn.open_table(META).map_err(e)?,
    )
}

/// A short description of how two states differ.
fn diff(a: &State, b: &State) -> String {
    fn keys<K: Ord + std::fmt::Debug, V: PartialEq>(
        out: &mut String,
        what: &str,
        a: &BTreeMap<K, V>,
        b: &BTreeMap<K, V>,
    ) {
        for (k, v) in a {
            match b.get(k) {
                None => {
                    let _ = writeln!(out, "    {what} {k:?} only in the first");
                }
                Some(w) if w != v => {
                    let _ = writeln!(out, "    {what} {k:?} differs");
                }
                _ => {}
            }
        }
        for k in b.keys().filter(|k| !a.contains_key(k)) {
            let _ = writeln!(out, "    {what} {k:?} only in the second");
        }
    }
    let mut out = String::new();
    keys(&mut out, "inode", &a.raw.inodes, &b.raw.inodes);
    keys(&mut out, "dentry", &a.raw.dentries, &b.raw.dentries);
    keys(&mut out, "symlink", &a.raw.symlinks, &b.raw.symlinks);
    keys(&mut out, "xattr", &a.raw.xattrs, &b.raw.xattrs);
    keys(&mut out, "chunk", &a.raw.chunks, &b.raw.chunks);
    keys(&mut out, "meta", &a.meta, &b.meta);
    if a.raw.orphans != b.raw.orphans {
        let _ = writeln!(
            out,
            "    orphans {:?} vs {:?}",
            a.raw.orphans, b.raw.orphans
        );
    }
    out
}

// --- the workload: the harness driving Fs + Tables over the simulated disk --------------------

#[derive(Clone, Copy, Debug)]
struct CommitRec {
    /// Log length when `commit()` was called and when it returned.
    start_io: usize,
    end_io: usize,
    immediate: bool,
    ok: bool,
}

/// The redb side of the harness: one write transaction always open on a `SimBackend`.
struct Crashy {
    disk: Arc<Mutex<Disk>>,
    db: Option<Database>,
    txn: Option<WriteTransaction>,
    /// `states[k]`: the records transaction `k` committed (or would have, had it succeeded).
    states: Vec<State>,
    commits: Vec<CommitRec>,
    rng: Rng,
    /// The first error redb returned, and what was being done.
    error: Option<String>,
    /// Once the real database failed, the harness keeps running on this throwaway one until
    /// the driver notices the difference and stops.
    scratch: Option<(Database, WriteTransaction)>,
}

impl Crashy {
    fn set_phase(&self, phase: Phase) {
        lock(&self.disk).phase = phase;
    }

    /// A fresh database on an empty disk, stamped like `open_database` does.
    fn new(seed: u64) -> Crashy {
        let disk = Arc::new(Mutex::new(Disk {
            bytes: Vec::new(),
            log: Vec::new(),
            phase: Phase::Setup,
            fault: None,
            fault_base: 0,
            fired: None,
        }));
        let db = Database::builder()
            .create_with_backend(SimBackend(Arc::clone(&disk)))
            .expect("create database");
        let txn = db.begin_write().expect("begin write");
        {
            let mut t = Tables::open(&txn).expect("open tables");
            t.set_meta(META_SCHEMA_VERSION, SCHEMA_VERSION)
                .expect("schema version");
            t.set_meta(META_NEXT_INO, 2).expect("next ino");
        }
        txn.commit().expect("initial commit");
        let txn = db.begin_write().expect("begin write");
        Crashy {
            disk,
            db: Some(db),
            txn: Some(txn),
            states: Vec::new(),
            commits: Vec::new(),
            rng: Rng::new(seed),
            error: None,
            scratch: None,
        }
    }

    fn failed(&mut self, what: String) {
        if self.error.is_none() {
            self.error = Some(what);
        }
        self.txn = None;
        self.db = None;
    }

    fn commit(&mut self, durability: Durability) {
        let Some(mut txn) = self.txn.take() else {
            return;
        };
        let k = self.commits.len();
        self.set_phase(Phase::Commit(k));
        // Like the runtime, store the inode counter with the batch; then note what this
        // transaction holds.
        let state = Tables::open(&txn)
            .map_err(e)
            .and_then(|mut t| {
                let top = t.inodes.last().map_err(e)?.map_or(1, |(k, _)| k.value());
                let next = t.meta(META_NEXT_INO).map_err(e)?.unwrap_or(2).max(top + 1);
                t.set_meta(META_NEXT_INO, next).map_err(e)?;
                dump_txn(&t)
            })
            .expect("read the transaction's records");
        txn.set_durability(durability).expect("set durability");
        let start_io = lock(&self.disk).log.len();
        let result = txn.commit();
        let end_io = lock(&self.disk).log.len();
        self.states.push(state);
        self.commits.push(CommitRec {
            start_io,
            end_io,
            immediate: matches!(durability, Durability::Immediate),
            ok: result.is_ok(),
        });
        self.set_phase(Phase::Ops);
        if let Err(err) = result {
            return self.failed(format!("commit {k}: {err}"));
        }
        match self.db.as_ref().map(|db| db.begin_write()) {
            Some(Ok(txn)) => self.txn = Some(txn),
            Some(Err(err)) => self.failed(format!("begin write after commit {k}: {err}")),
            None => {}
        }
    }

    /// Commit durably and close the database (its clean shutdown writes included).
    fn close(&mut self) {
        self.commit(Durability::Immediate);
        self.set_phase(Phase::Close);
        self.txn = None;
        self.db = None;
        self.set_phase(Phase::Ops);
    }
}

impl harness::sut::Backend for Crashy {
    type S<'a> = Tables<'a>;

    fn with<R>(&mut self, f: impl for<'a> FnOnce(&mut Tables<'a>) -> R) -> R {
        if self.txn.is_none() && self.scratch.is_none() {
            let db = Database::builder()
                .create_with_backend(InMemoryBackend::new())
                .expect("scratch database");
            let txn = db.begin_write().expect("scratch transaction");
            self.scratch = Some((db, txn));
        }
        let txn = match (&self.txn, &self.scratch) {
            (Some(t), _) => t,
            (None, Some((_, t))) => t,
            (None, None) => unreachable!("a transaction was just made"),
        };
        let mut tables = Tables::open(txn).expect("open tables");
        f(&mut tables)
    }

    fn dump(&mut self) -> RawDump {
        self.with(|t| dump_txn(t).expect("dump").raw)
    }

    fn op_done(&mut self, index: usize) {
        // A batch every 1 to 4 operations; about a third of them durable (FLUSH, fsync).
        if index % 4 == 3 || self.rng.chance(25) {
            let durability = if self.rng.chance(35) {
                Durability::Immediate
            } else {
                Durability::None
            };
            self.commit(durability);
        }
    }

    fn restart(&mut self) {
        self.close();
        if self.error.is_some() {
            return;
        }
        self.set_phase(Phase::Open);
        let opened = Database::builder().create_with_backend(SimBackend(Arc::clone(&self.disk)));
        self.set_phase(Phase::Ops);
        match opened {
            Err(err) => self.failed(format!("reopen: {err}")),
            Ok(db) => match db.begin_write() {
                Ok(txn) => {
                    self.txn = Some(txn);
                    self.db = Some(db);
                }
                Err(err) => self.failed(format!("begin write after reopen: {err}")),
            },
        }
    }
}

/// A deterministic operation sequence from the harness's generator.
fn gen_ops(seed: u64, len: usize) -> Vec<Op> {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    ops(len..=len)
        .new_tree(&mut runner)
        .expect("generate operations")
        .current()
}

/// Everything a run leaves to check.
struct Run {
    log: Vec<Io>,
    /// Log length after the initial durable commit (transaction 0, the empty filesystem).
    base_io: usize,
    commits: Vec<CommitRec>,
    states: Vec<State>,
    fired: Option<(usize, Phase)>,
    error: Option<String>,
    /// The page cache at the end (what a process crash leaves).
    bytes: Vec<u8>,
    ops: usize,
}

fn run_workload(seed: u64, len: usize, fault: Option<Fault>) -> Result<Run, String> {
    let ops = gen_ops(seed, len);
    let mut redb = Sut::new(Crashy::new(seed));
    // Transaction 0: the empty filesystem, durable. Cut points and faults start after it.
    redb.backend.commit(Durability::Immediate);
    let base_io = {
        let mut d = lock(&redb.backend.disk);
        d.fault = fault;
        d.fault_base = d.log.len();
        d.phase = Phase::Ops;
        d.log.len()
    };
    let mut d = Driver::new(Sut::new(MemStore::default()), redb);
    let fired = |d: &Driver<Sut<MemStore>, Sut<Crashy>>| lock(&d.b.backend.disk).fired.is_some();
    let mut applied = 0;
    let mut outcome = Ok(());
    for (i, op) in ops.iter().enumerate() {
        if let Err(err) = d.apply(op) {
            outcome = Err(format!("op #{i} {op:?}:\n  {err}"));
            break;
        }
        applied += 1;
        if d.b.backend.error.is_some() {
            break;
        }
    }
    if outcome.is_ok() && d.b.backend.error.is_none() {
        outcome = d.finish().map_err(|err| format!("at the end: {err}"));
    }
    match outcome {
        // With a fault injected, the harness sees the failure as a difference from MemStore.
        Err(_) if fired(&d) => {}
        Err(err) => return Err(format!("seed {seed:#x}: {err}")),
        Ok(()) => {}
    }
    d.b.backend.close();
    let b = &mut d.b.backend;
    let disk = lock(&b.disk);
    Ok(Run {
        log: disk.log.clone(),
        base_io,
        commits: std::mem::take(&mut b.commits),
        states: std::mem::take(&mut b.states),
        fired: disk.fired,
        error: b.error.clone(),
        bytes: disk.bytes.clone(),
        ops: applied,
    })
}

// --- checking what a crash leaves -----------------------------------------------------------

/// The committed states a database cut after `n` logged operations may show: at least the
/// newest acknowledged durable commit, at most the newest commit that had begun.
fn bounds(commits: &[CommitRec], n: usize) -> (usize, usize) {
    let lo = (0..commits.len())
        .filter(|k| {
            let c = &commits[*k];
            c.ok && c.immediate && c.end_io <= n
        })
        .max()
        .unwrap_or(0);
    let hi = (0..commits.len())
        .filter(|k| commits[*k].start_io < n)
        .max()
        .unwrap_or(0)
        .max(lo);
    (lo, hi)
}

/// Open `bytes` as a database, check it with fsck, and start on it like the daemon does
/// (reclaim orphans, commit) and check again. Returns every `k` whose committed state the
/// database held, and the records themselves.
fn recover(bytes: Vec<u8>, states: &[State]) -> Result<(Vec<usize>, State), String> {
    let db = Database::builder()
        .create_with_backend(Image(Mutex::new(bytes)))
        .map_err(|err| format!("does not open: {err}"))?;
    let report = fsck::check(&db, false, &mut |_, _, _| {})?;
    if !report.problems.is_empty() {
        return Err(format!("fsck: {:?}", report.problems));
    }
    let got = dump_db(&db)?;
    let matches = (0..states.len()).filter(|k| states[*k] == got).collect();
    // The daemon's start on the recovered database.
    let txn = db
        .begin_write()
        .map_err(|err| format!("begin write: {err}"))?;
    {
        let mut t = Tables::open(&txn).map_err(e)?;
        Fs::default()
            .reclaim_orphans(&mut t)
            .map_err(|err| format!("reclaim orphans: {err}"))?;
    }
    txn.commit()
        .map_err(|err| format!("commit after recovery: {err}"))?;
    let report = fsck::check(&db, false, &mut |_, _, _| {})?;
    if !report.problems.is_empty() || report.pending_orphans > 0 {
        return Err(format!(
            "after reclaiming orphans: {:?}, {} orphans",
            report.problems, report.pending_orphans
        ));
    }
    Ok((matches, got))
}

/// The newest of `matches` within `lo..=hi`, or why there is none.
fn within(
    (matches, got): &(Vec<usize>, State),
    states: &[State],
    lo: usize,
    hi: usize,
) -> Result<usize, String> {
    matches
        .iter()
        .rev()
        .copied()
        .find(|k| (lo..=hi).contains(k))
        .ok_or_else(|| {
            format!(
                "holds no committed state in {lo}..={hi} (equal to {matches:?}); \
                 vs state {hi}:\n{}",
                diff(got, &states[hi])
            )
        })
}

fn check_image(bytes: Vec<u8>, states: &[State], lo: usize, hi: usize) -> Result<usize, String> {
    within(&recover(bytes, states)?, states, lo, hi)
}

/// The bytes a power loss after `n` logged operations leaves when writes since the last sync
/// reach the disk partly, in any order (`synced`: the bytes up to that sync).
fn torn_image(synced: &[u8], pending: &[Io], rng: &mut Rng) -> Vec<u8> {
    const SECTOR: u64 = 512;
    let mut bytes = synced.to_vec();
    for io in pending {
        match io {
            Io::Sync => {}
            Io::SetLen(_) => {
                if rng.chance(50) {
                    apply_io(&mut bytes, io);
                }
            }
            Io::Write { offset, data } => match rng.below(3) {
                0 => {}
                1 => apply_io(&mut bytes, io),
                _ => {
                    // Torn: each sector lands or not; a landing one may stop part-way.
                    let end = offset + data.len() as u64;
                    let mut at = *offset;
                    while at < end {
                        let next = ((at / SECTOR + 1) * SECTOR).min(end);
                        if rng.chance(50) {
                            let keep = if rng.chance(20) {
                                1 + rng.below(next - at)
                            } else {
                                next - at
                            };
                            let from = (at - offset) as usize;
                            apply_io(
                                &mut bytes,
                                &Io::Write {
                                    offset: at,
                                    data: data[from..from + keep as usize].to_vec(),
                                },
                            );
                        }
                        at = next;
                    }
                }
            },
        }
    }
    bytes
}

#[derive(Default)]
struct Tally {
    images: usize,
    cuts: usize,
    /// How many images recovered to each position relative to their bounds.
    at_lo: usize,
    above_lo: usize,
}

/// Check the cut points `cuts` (sorted) of a run; the first failure, with how to see it again.
fn check_cuts(run: &Run, cuts: &[usize], seed: u64, tally: &mut Tally) -> Result<(), String> {
    let mut rng = Rng::new(seed ^ 0x7045);
    let mut synced = Vec::new();
    let mut cache = Vec::new();
    let mut applied = 0;
    let mut last_sync = 0;
    // The power-loss image only changes at a sync: recover it once per sync, check its
    // state against the bounds of every cut.
    let mut power_loss: Option<(usize, (Vec<usize>, State))> = None;
    for &n in cuts {
        while applied < n {
            apply_io(&mut cache, &run.log[applied]);
            if matches!(run.log[applied], Io::Sync) {
                for io in &run.log[last_sync..=applied] {
                    apply_io(&mut synced, io);
                }
                last_sync = applied + 1;
            }
            applied += 1;
        }
        let (lo, hi) = bounds(&run.commits, n);
        let pending = &run.log[last_sync..n];
        let what = |kind: &str, err: String| {
            format!(
                "seed {seed:#x}, {kind} after I/O operation {n} of {} \
                 ({} since the last sync, commits {lo}..={hi}): {err}",
                run.log.len(),
                pending.len()
            )
        };
        if power_loss.as_ref().is_none_or(|(at, _)| *at != last_sync) {
            let found = recover(synced.clone(), &run.states).map_err(|e| what("power loss", e))?;
            power_loss = Some((last_sync, found));
            tally.images += 1;
        }
        if let Some((_, found)) = &power_loss {
            within(found, &run.states, lo, hi).map_err(|e| what("power loss", e))?;
        }
        let mut images: Vec<(&str, Vec<u8>)> = vec![("process crash", cache.clone())];
        if !pending.is_empty() {
            for _ in 0..TORN_PER_CUT {
                images.push(("torn power loss", torn_image(&synced, pending, &mut rng)));
            }
        }
        for (kind, bytes) in images {
            let k = check_image(bytes, &run.states, lo, hi).map_err(|e| what(kind, e))?;
            tally.images += 1;
            if k == lo {
                tally.at_lo += 1;
            } else {
                tally.above_lo += 1;
            }
        }
        tally.cuts += 1;
    }
    Ok(())
}

/// Which cut points to check: all of them, or `max` of them chosen by `seed`, always
/// including those right before and after each sync.
fn pick_cuts(run: &Run, max: usize, seed: u64) -> Vec<usize> {
    let all: Vec<usize> = (run.base_io..=run.log.len()).collect();
    if max == 0 || all.len() <= max {
        return all;
    }
    let mut picked = std::collections::BTreeSet::new();
    for (i, io) in run.log.iter().enumerate().skip(run.base_io) {
        if matches!(io, Io::Sync) {
            picked.insert(i);
            picked.insert(i + 1);
        }
    }
    picked.insert(run.log.len());
    let mut rng = Rng::new(seed ^ 0xc075);
    while picked.len() < max {
        picked.insert(all[rng.below(all.len() as u64) as usize]);
    }
    picked.into_iter().collect()
}

/// Sequences, operations per sequence, cut points checked per sequence (0 = every one), and
/// torn images per cut point. Debug builds (a plain `cargo test`) check a sample.
const SEQUENCES: u64 = if cfg!(debug_assertions) { 3 } else { 12 };
const SEQUENCE_LEN: usize = if cfg!(debug_assertions) { 120 } else { 200 };
const CUTS_PER_SEQUENCE: usize = if cfg!(debug_assertions) { 250 } else { 0 };
const TORN_PER_CUT: usize = if cfg!(debug_assertions) { 1 } else { 3 };
/// Fault points (each tried on writes and on syncs) for the I/O error test.
const FAULT_POINTS: usize = if cfg!(debug_assertions) { 12 } else { 40 };

#[test]
fn every_crash_point_recovers_to_a_committed_prefix() {
    let max = env_or("SPOOLFS_CRASH_CUTS", CUTS_PER_SEQUENCE);
    let mut tally = Tally::default();
    let mut totals = (0, 0, 0, 0, 0);
    for i in 0..SEQUENCES {
        let seed = base_seed().wrapping_add(i);
        let run = run_workload(seed, SEQUENCE_LEN, None).unwrap_or_else(|err| panic!("{err}"));
        assert!(run.error.is_none(), "seed {seed:#x}: {:?}", run.error);
        let durable = run.commits.iter().filter(|c| c.immediate).count();
        let syncs = run.log.iter().filter(|io| matches!(io, Io::Sync)).count();
        totals.0 += run.ops;
        totals.1 += run.commits.len();
        totals.2 += durable;
        totals.3 += run.log.len() - run.base_io;
        totals.4 = totals.4.max(run.bytes.len());
        assert!(
            durable >= 5,
            "seed {seed:#x}: only {durable} durable commits"
        );
        assert!(syncs >= 5, "seed {seed:#x}: only {syncs} syncs");
        let cuts = pick_cuts(&run, max, seed);
        if let Err(err) = check_cuts(&run, &cuts, seed, &mut tally) {
            panic!("{err}");
        }
    }
    eprintln!(
        "crash atomicity: {} operations, {} commits ({} durable), {} I/O operations; \
         database up to {} KiB; {} cut points, {} images reopened ({} at the last durable \
         commit, {} later)",
        totals.0,
        totals.1,
        totals.2,
        totals.3,
        totals.4 / 1024,
        tally.cuts,
        tally.images,
        tally.at_lo,
        tally.above_lo
    );
    // The images must not all recover to the same place: some crashes must lose
    // non-durable commits, and some must keep commits whose fsync had not returned.
    assert!(tally.at_lo > 0 && tally.above_lo > 0);
}

#[test]
fn io_errors_fail_the_commit_and_leave_a_committed_prefix() {
    let seed = base_seed().wrapping_add(100);
    // A run without faults shows where the I/O operations are.
    let clean = run_workload(seed, SEQUENCE_LEN, None).unwrap_or_else(|err| panic!("{err}"));
    let span = clean.log.len() - clean.base_io;
    let mut rng = Rng::new(seed ^ 0xfa17);
    let mut points: Vec<usize> = (0..FAULT_POINTS)
        .map(|_| rng.below(span as u64) as usize)
        .collect();
    // Right at the start, and at a few syncs (the commit points themselves).
    points.push(0);
    let syncs: Vec<usize> = clean
        .log
        .iter()
        .enumerate()
        .skip(clean.base_io)
        .filter(|(_, io)| matches!(io, Io::Sync))
        .map(|(i, _)| i - clean.base_io)
        .collect();
    for _ in 0..FAULT_POINTS / 2 {
        if !syncs.is_empty() {
            points.push(syncs[rng.below(syncs.len() as u64) as usize]);
        }
    }
    let mut runs = 0;
    let mut in_commit = 0;
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    for (j, after) in points.iter().enumerate() {
        for on in [FaultOn::Write, FaultOn::Sync] {
            let sticky = j % 2 == 0;
            let fault = Fault {
                after: *after,
                on,
                sticky,
            };
            let what = format!("seed {seed:#x}, {fault:?}");
            let run = run_workload(seed, SEQUENCE_LEN, Some(fault))
                .unwrap_or_else(|err| panic!("{what}: {err}"));
            runs += 1;
            let Some((at, phase)) = run.fired else {
                // No call of that kind came after the point.
                *phases.entry("never".into()).or_default() += 1;
                continue;
            };
            let name = match phase {
                Phase::Commit(k) if run.commits[k].immediate => "durable commit",
                Phase::Commit(_) => "non-durable commit",
                Phase::Close => "close",
                Phase::Open => "reopen",
                Phase::Ops | Phase::Setup => "operation",
            };
            *phases.entry(name.into()).or_default() += 1;
            match phase {
                Phase::Commit(k) => {
                    in_commit += 1;
                    let c = run.commits[k];
                    assert!(
                        !c.ok,
                        "{what}: the error at I/O operation {at} during commit {k} was not reported"
                    );
                    assert!(run.error.is_some(), "{what}: no error reported");
                }
                // Errors while closing cannot be reported (redb closes on drop); errors while
                // reopening must be.
                Phase::Close => {}
                Phase::Open => assert!(run.error.is_some(), "{what}: reopen did not fail"),
                Phase::Ops | Phase::Setup => {}
            }
            let n = run.log.len();
            let (lo, hi) = bounds(&run.commits, n);
            let last_sync = run
                .log
                .iter()
                .rposition(|io| matches!(io, Io::Sync))
                .map_or(0, |i| i + 1);
            let mut synced = Vec::new();
            for io in &run.log[..last_sync] {
                apply_io(&mut synced, io);
            }
            for (kind, bytes) in [("process crash", run.bytes.clone()), ("power loss", synced)] {
                check_image(bytes, &run.states, lo, hi).unwrap_or_else(|err| {
                    panic!("{what}, fired at {at} in {phase:?}, {kind}: {err}")
                });
            }
        }
    }
    eprintln!("I/O errors: {runs} runs over {span} I/O operations; first error during {phases:?}");
    assert!(in_commit >= 10, "only {in_commit} errors hit a commit");
}
