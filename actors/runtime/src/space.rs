//! Admission control for disk space: operations that need space are answered ENOSPC *before*
//! they are applied while the data dir's filesystem is nearly full; operations that free space
//! keep working, so an operator (or the mail server's delivery) can make room.
//!
//! Why not let redb run into ENOSPC and pass it on: after any I/O error redb poisons the
//! database (every later call is `PreviousIo`) until it is reopened, and the actor's in-memory
//! state cannot follow a reopen (see `health`). So spoolfs keeps a reserve free, like etcd's
//! space quota or Ceph's full ratio: growth stops at the reserve; the reserve is what
//! deletions (redb copies pages on write, so even a delete needs a few) and the persisting of
//! already admitted writes may use.
//!
//! The numbers, all in bytes:
//! - `V`: free space of the data dir's filesystem for unprivileged users (`statvfs` `f_bavail`),
//!   read at most every `REFRESH_INTERVAL`, and sooner once `REFRESH_BYTES` of growth were
//!   admitted since, or held content was written since (it reached the database file);
//! - `R`: the reserve, `-o reserve=` (default `max(64 MiB, 1%)` of the filesystem);
//! - `P`: content held in memory and not yet in the database file: written into memfd staging
//!   buffers (it will be persisted at the next flush), or persisted by a flush into the pending
//!   changes that the next commits write. Charged `STORED_PER_STAGED` times, as writes are
//!   charged when admitted, the way ext4's delayed allocation reserves blocks at write() so
//!   writeback cannot fail for space. Pending changes count until their commit is done: with
//!   concurrent writers a flush moves megabytes out of the memfds while `V` does not show
//!   them yet, and admitting against that `V` let 8 writers eat the reserve and run redb into
//!   ENOSPC;
//! - `F`: free room inside the database file. redb reuses the pages of deleted records but
//!   never shrinks its file, so after a full disk and deletions through the mount `V` stays low
//!   while the file has room. `F` = the file's allocated bytes minus an upper bound of what the
//!   live records occupy (`spoolfs_store::space`, a scan of the metadata tables run on a
//!   blocking task, only when space is short and something was freed), minus the growth
//!   admitted since. It is dropped as soon as the file grows anyway (the room was not there, or
//!   not reusable yet).
//!
//! Rules: an operation that grows storage by `c` is admitted iff `V + F - 2P - c >= R` and
//! `V >= R/2`; a FLUSH/fsync while content is staged iff `V + F - 2P >= R/2` and `V >= R/4`
//! (refused, the content stays staged and a later fsync can succeed); everything else always.
//!
//! Which operations grow storage: create, mknod, mkdir, symlink, link (a few records),
//! setxattr (its value), write (its bytes, twice: see `STORED_PER_STAGED`), fallocate
//! (checked, not charged: spoolfs stores no zeros, but a caller of fallocate wants to know that
//! the space is there). Not refused: rename (moves a record; refusing it would strand a spool
//! file between directories), setattr (a larger size is a hole, which costs nothing; a smaller
//! one frees), open, release and FORGET (they may reclaim orphans), unlink, rmdir,
//! removexattr, punching holes, and everything that only reads.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase};
use spoolfs_core::fs::FALLOC_FL_PUNCH_HOLE;
use spoolfs_core::Errno;
use tracing::{debug, info, warn};

use crate::metrics::{self, Metrics};
use crate::msg::{Op, Statfs};

/// The reserve when none is configured: the larger of this and `DEFAULT_RESERVE_PERCENT`.
pub const DEFAULT_RESERVE_MIN: u64 = 64 << 20;
pub const DEFAULT_RESERVE_PERCENT: u32 = 1;

/// Bytes of storage one byte of file content may take once persisted: a full chunk fills a
/// 64 KiB page (measured: 1 GiB of content, 1.1 GB of file), but a leaf where small records
/// share a page with a full chunk takes twice that, so admission charges the worst case.
const STORED_PER_STAGED: u64 = 2;
/// What creating a name costs at most: an inode record, a dentry, the parent's inode, and the
/// pages redb copies to change them.
const META_COST: u64 = 4096;
/// Longest time between two `statvfs` calls while operations need space.
const REFRESH_INTERVAL: Duration = Duration::from_millis(100);
/// Least time between two scans for free room inside the database file (a scan runs only
/// while space is short, something was freed and something was refused).
const SCAN_INTERVAL: Duration = Duration::from_millis(200);
/// A scan whose room did not appear (the file grew anyway) is retried after this long, even
/// if nothing was freed since: the room may have become reusable since (pages freed by a
/// non-durable commit are reused only after a durable one).
const RESCAN_INTERVAL: Duration = Duration::from_secs(2);
/// Least time between two "nearly full" warnings (each refused request is counted in
/// `spoolfs_request_errors_total{errno="ENOSPC"}`; logging each would itself fill the disk).
const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// How much space to keep free on the data dir's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reserve {
    /// `max(DEFAULT_RESERVE_MIN, DEFAULT_RESERVE_PERCENT of the filesystem)`.
    #[default]
    Default,
    Bytes(u64),
    /// Hundredths of a percent of the filesystem's size.
    Basis(u32),
}

impl Reserve {
    /// The reserve in bytes on a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        let share = |basis: u32| {
            u64::try_from(u128::from(total) * u128::from(basis) / 10_000).unwrap_or(u64::MAX)
        };
        match self {
            Reserve::Default => DEFAULT_RESERVE_MIN.max(share(DEFAULT_RESERVE_PERCENT * 100)),
            Reserve::Bytes(b) => b,
            Reserve::Basis(b) => share(b),
        }
    }
}

impl std::str::FromStr for Reserve {
    type Err = String;

    /// `BYTES`, `BYTES` with a binary suffix `K`, `M`, `G`, `T` (e.g. `256M`), or a share of
    /// the filesystem such as `2%` or `0.5%` (at most 50%).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("reserve {s:?}: expected bytes (e.g. 512M, 2G) or a percentage (e.g. 1%)");
        if let Some(p) = s.strip_suffix('%') {
            let (whole, frac) = p.split_once('.').unwrap_or((p, ""));
            if whole.is_empty()
                || frac.len() > 2
                || !(whole.bytes().chain(frac.bytes())).all(|b| b.is_ascii_digit())
            {
                return Err(bad());
            }
            let whole: u32 = whole.parse().map_err(|_| bad())?;
            let frac: u32 = format!("{frac:0<2}").parse().map_err(|_| bad())?;
            let basis = whole
                .checked_mul(100)
                .and_then(|w| w.checked_add(frac))
                .filter(|b| *b <= 5000)
                .ok_or_else(|| format!("reserve {s:?}: at most 50%"))?;
            return Ok(Reserve::Basis(basis));
        }
        let (digits, shift) = match s.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => return Err(bad()),
                };
                (&s[..i], shift)
            }
            _ => (s, 0),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        n.checked_mul(1 << shift)
            .map(Reserve::Bytes)
            .ok_or_else(|| format!("reserve {s:?}: too large"))
    }
}

/// What an operation needs.
enum Need {
    /// Nothing (reads, deletions, ...).
    Nothing,
    /// Grows storage by this many bytes; charged when admitted.
    Grow(u64),
    /// Needs this much to be free, charges nothing (fallocate).
    Check(u64),
    /// Persists staged content (FLUSH, fsync).
    Persist,
}

fn need(op: &Op) -> Need {
    match op {
        Op::Write { data, .. } => Need::Grow((data.len() as u64).saturating_mul(STORED_PER_STAGED)),
        Op::Create { .. } | Op::MkNod { .. } | Op::MkDir { .. } | Op::Link { .. } => {
            Need::Grow(META_COST)
        }
        Op::Symlink { target, .. } => Need::Grow(
            META_COST.saturating_add((target.len() as u64).saturating_mul(STORED_PER_STAGED)),
        ),
        Op::SetXattr { name, value, .. } => {
            Need::Grow(META_COST.saturating_add(
                ((name.len() + value.len()) as u64).saturating_mul(STORED_PER_STAGED),
            ))
        }
        Op::Fallocate { length, mode, .. } if mode & FALLOC_FL_PUNCH_HOLE == 0 => {
            Need::Check(length.saturating_mul(STORED_PER_STAGED))
        }
        Op::Flush { .. } | Op::Fsync { .. } => Need::Persist,
        _ => Need::Nothing,
    }
}

/// Operations that need new room in the database (the ones `SpaceGuard::admit` may refuse).
pub fn grows(op: &Op) -> bool {
    matches!(need(op), Need::Grow(_) | Need::Check(_))
}

/// Operations that may free storage (worth a new look for room inside the database file).
fn may_free(op: &Op) -> bool {
    match op {
        Op::Unlink { .. }
        | Op::RmDir { .. }
        | Op::Rename { .. }
        | Op::RemoveXattr { .. }
        | Op::Release { .. }
        | Op::Forget { .. } => true,
        Op::SetAttr { set, .. } => set.size.is_some(),
        Op::Fallocate { mode, .. } => mode & FALLOC_FL_PUNCH_HOLE != 0,
        _ => false,
    }
}

/// One reading of the filesystem and the database file.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    /// `V`
    avail: u64,
    /// Size of the filesystem.
    total: u64,
    /// Bytes the database file occupies on the filesystem.
    db_alloc: u64,
    /// `P` when read.
    held: u64,
}

/// The last scan for room inside the database file.
#[derive(Debug, Clone, Copy)]
struct Scan {
    /// The file's allocation when the scan started.
    db_alloc: u64,
    /// Upper bound of the live records' bytes.
    live: u64,
    /// Growth admitted since the scan started.
    admitted: u64,
    /// Still believed: the file has not grown beyond what was admitted.
    valid: bool,
}

type ScanResult = Result<spoolfs_store::space::LiveEstimate, String>;

/// A scan on the blocking pool.
struct Running {
    started: Instant,
    /// The file's allocation when it started.
    db_alloc: u64,
    /// Growth admitted since it started.
    admitted: u64,
    rx: flume::Receiver<ScanResult>,
}

pub struct SpaceGuard {
    data_dir: PathBuf,
    db_path: PathBuf,
    reserve_cfg: Reserve,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
    reading: Option<Reading>,
    /// Growth admitted since the reading.
    consumed: u64,
    /// Content in memfd buffers at the start of the current batch (part of `P`).
    staged: u64,
    /// Bytes of pending changes not yet written to the database file at the start of the
    /// current batch (the rest of `P`).
    unwritten: u64,
    scan: Option<Scan>,
    running: Option<Running>,
    last_scan_start: Option<Instant>,
    /// Least time between two scan starts (grows with what a scan takes).
    scan_pause: Duration,
    /// Something that may free space was admitted since the last scan started (true at start:
    /// the file may hold room from before).
    freed: bool,
    /// Growth was refused since the last scan started (a scan is only worth it then).
    wanted: bool,
    /// Currently refusing growth (for the warn / info pair in the log).
    refusing: bool,
    last_warn: Option<Instant>,
    last_error_log: Option<Instant>,
}

impl SpaceGuard {
    pub fn new(
        data_dir: &Path,
        reserve: Reserve,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let mut g = SpaceGuard {
            data_dir: data_dir.to_path_buf(),
            db_path: data_dir.join(spoolfs_store::DB_FILE),
            reserve_cfg: reserve,
            metrics,
            runtime,
            reading: None,
            consumed: 0,
            staged: 0,
            unwritten: 0,
            scan: None,
            running: None,
            last_scan_start: None,
            scan_pause: SCAN_INTERVAL,
            freed: true,
            wanted: false,
            refusing: false,
            last_warn: None,
            last_error_log: None,
        };
        g.refresh();
        match g.reading {
            Some(r) => {
                let reserve = g.reserve(&r);
                info!(data_dir = %g.data_dir.display(), reserve, filesystem_bytes = r.total,
                    available = r.avail,
                    "space reserve: operations that need space get ENOSPC when less than this \
                     is free on the data dir's filesystem (-o reserve=)");
                if reserve >= r.total {
                    warn!(data_dir = %g.data_dir.display(), reserve, filesystem_bytes = r.total,
                        "the space reserve is not smaller than the data dir's filesystem: \
                         every operation that needs space will be refused");
                }
            }
            None => warn!(data_dir = %g.data_dir.display(),
                "cannot read the free space of the data dir's filesystem: space is not checked \
                 until it can be"),
        }
        g
    }

    fn reserve(&self, r: &Reading) -> u64 {
        self.reserve_cfg.bytes(r.total)
    }

    /// Start of a batch: `staged` is the content now in memfd buffers and not yet persisted;
    /// `unwritten` the bytes of pending changes (persisted, or being committed) that the
    /// database file does not hold yet; `all_durable` says every commit so far is durable
    /// (then pages freed by them are reusable, and a scan for room tells the truth).
    pub fn begin_batch(&mut self, db: &Database, staged: u64, unwritten: u64, all_durable: bool) {
        self.staged = staged;
        self.unwritten = unwritten;
        self.poll_scan();
        let Some(r) = self.reading else { return };
        let near_full =
            self.fs_free(&r).saturating_sub(self.held_cost()) < self.reserve(&r).saturating_mul(2);
        let since_last = self.last_scan_start.map_or(Duration::MAX, |t| t.elapsed());
        let worth =
            self.freed || (self.scan.is_some_and(|s| !s.valid) && since_last >= RESCAN_INTERVAL);
        if near_full
            && self.wanted
            && worth
            && all_durable
            && self.running.is_none()
            && since_last >= self.scan_pause
        {
            self.start_scan(db, r.db_alloc);
        }
    }

    /// `P`: content in memory that the database file does not hold yet.
    fn held(&self) -> u64 {
        self.staged.saturating_add(self.unwritten)
    }

    fn held_cost(&self) -> u64 {
        self.held().saturating_mul(STORED_PER_STAGED)
    }

    /// `V` minus what was admitted since it was read.
    fn fs_free(&self, r: &Reading) -> u64 {
        r.avail.saturating_sub(self.consumed)
    }

    /// `F`: room inside the database file, as far as it is believed.
    fn internal_free(&self, r: &Reading) -> u64 {
        match self.scan {
            Some(s) if s.valid => r.db_alloc.saturating_sub(s.live.saturating_add(s.admitted)),
            _ => 0,
        }
    }

    fn start_scan(&mut self, db: &Database, db_alloc: u64) {
        let txn = match db.begin_read() {
            Ok(t) => t,
            Err(e) => {
                debug!(error = %e, "cannot start a scan for free room in the database");
                return;
            }
        };
        let (tx, rx) = flume::bounded(1);
        self.runtime.spawn_blocking(move || {
            let r = spoolfs_store::space::live_bytes_upper(&txn).map_err(|e| e.to_string());
            let _ = tx.send(r);
        });
        let now = Instant::now();
        self.running = Some(Running {
            started: now,
            db_alloc,
            admitted: 0,
            rx,
        });
        self.last_scan_start = Some(now);
        self.freed = false;
        self.wanted = false;
    }

    fn poll_scan(&mut self) {
        let Some(running) = &self.running else {
            return;
        };
        let result = match running.rx.try_recv() {
            Ok(r) => r,
            Err(flume::TryRecvError::Empty) => return,
            Err(flume::TryRecvError::Disconnected) => Err("scan task vanished".into()),
        };
        let Some(running) = self.running.take() else {
            return;
        };
        let took = running.started.elapsed();
        // Scanning costs one pass over the metadata: keep it under a tenth of a core however
        // large the spool is.
        self.scan_pause = SCAN_INTERVAL.max(took.saturating_mul(10));
        match result {
            Ok(live) => {
                let took_ms = took.as_millis() as u64;
                debug!(
                    db_alloc = running.db_alloc,
                    live = live.bytes,
                    inodes = live.inodes,
                    took_ms,
                    "scanned for free room in the database file"
                );
                self.scan = Some(Scan {
                    db_alloc: running.db_alloc,
                    live: live.bytes,
                    admitted: running.admitted,
                    valid: true,
                });
            }
            Err(e) => {
                warn!(error = %e, "scan for free room in the database failed");
                self.scan = None;
            }
        }
    }

    /// Read `statvfs` of the data dir and the database file's allocation.
    fn refresh(&mut self) {
        let v = match nix::sys::statvfs::statvfs(&self.data_dir) {
            Ok(v) => v,
            Err(e) => {
                if self
                    .last_error_log
                    .is_none_or(|t| t.elapsed() > WARN_INTERVAL)
                {
                    self.last_error_log = Some(Instant::now());
                    warn!(data_dir = %self.data_dir.display(), error = %e,
                        "cannot read the free space of the data dir's filesystem");
                }
                return;
            }
        };
        let frsize = v.fragment_size();
        let db_alloc = std::fs::metadata(&self.db_path)
            .map(|m| m.blocks().saturating_mul(512))
            .unwrap_or(0);
        let reading = Reading {
            at: Instant::now(),
            avail: v.blocks_available().saturating_mul(frsize),
            total: v.blocks().saturating_mul(frsize),
            db_alloc,
            held: self.held(),
        };
        if let Some(s) = &mut self.scan {
            let slack = (1 << 20u64).max(self.reserve_cfg.bytes(reading.total) / 16);
            if s.valid && db_alloc > s.db_alloc.saturating_add(s.admitted).saturating_add(slack) {
                // The file grew although there was room inside: the room was not there (or
                // not reusable yet). Stop counting on it until the next scan.
                debug!(
                    db_alloc,
                    scanned_alloc = s.db_alloc,
                    admitted = s.admitted,
                    "the database file grew: free room inside it no longer counted"
                );
                s.valid = false;
            }
        }
        self.consumed = 0;
        self.reading = Some(reading);
        metrics::set(
            &self.metrics.space_reserve_bytes,
            self.reserve_cfg.bytes(reading.total),
        );
    }

    fn refresh_if_stale(&mut self) {
        let stale = match self.reading {
            None => true,
            Some(r) => {
                r.at.elapsed() >= REFRESH_INTERVAL
                    || self.consumed >= refresh_bytes(self.reserve(&r))
                    || self.held() < r.held
            }
        };
        if stale {
            self.refresh();
        }
    }

    /// Check-then-apply: `Err(ENOSPC)` if `op` may not run now. Called for every request,
    /// before it is applied; cheap for everything that does not need space.
    pub fn admit(&mut self, op: &Op) -> Result<(), Errno> {
        if may_free(op) {
            self.freed = true;
        }
        let need = need(op);
        if matches!(need, Need::Nothing) || (matches!(need, Need::Persist) && self.staged == 0) {
            return Ok(());
        }
        self.refresh_if_stale();
        // Space that cannot be read is not checked (better than refusing every write).
        let Some(r) = self.reading else { return Ok(()) };
        let reserve = self.reserve(&r);
        let fs_free = self.fs_free(&r);
        let total_free = fs_free
            .saturating_add(self.internal_free(&r))
            .saturating_sub(self.held_cost());
        let (ok, charge) = match need {
            Need::Nothing => (true, 0),
            Need::Grow(c) | Need::Check(c) => (
                fs_free >= reserve / 2 && total_free >= reserve.saturating_add(c),
                if let Need::Grow(c) = need { c } else { 0 },
            ),
            Need::Persist => (fs_free >= reserve / 4 && total_free >= reserve / 2, 0),
        };
        if !ok {
            self.wanted = true;
            self.note_refusal(op, fs_free, reserve);
            return Err(Errno::ENOSPC);
        }
        if charge > 0 {
            self.consumed = self.consumed.saturating_add(charge);
            if let Some(s) = &mut self.scan {
                s.admitted = s.admitted.saturating_add(charge);
            }
            if let Some(r) = &mut self.running {
                r.admitted = r.admitted.saturating_add(charge);
            }
            if self.refusing && matches!(need, Need::Grow(_)) {
                self.refusing = false;
                if self.last_warn.is_some() {
                    info!(data_dir = %self.data_dir.display(), available = fs_free, reserve,
                        "space is available again: operations that need space are admitted");
                }
            }
        }
        Ok(())
    }

    fn note_refusal(&mut self, op: &Op, available: u64, reserve: u64) {
        if self.refusing {
            return;
        }
        self.refusing = true;
        if self.last_warn.is_some_and(|t| t.elapsed() < WARN_INTERVAL) {
            return;
        }
        self.last_warn = Some(Instant::now());
        warn!(data_dir = %self.data_dir.display(), available, reserve, staged = self.staged,
            unwritten = self.unwritten, op = op.name(),
            "the data dir's filesystem is nearly full: operations that need space are answered \
             ENOSPC (deletions still work); free space on it or delete files from the mount \
             (spoolfs_request_errors_total{{errno=\"ENOSPC\"}} counts the refusals)");
    }

    /// `statfs` of the mount: the reserve is not available to users, like ext4's reserved
    /// blocks (`bfree` keeps it, `bavail` does not).
    pub fn hide_reserve(&self, mut s: Statfs) -> Statfs {
        let reserve = self.reading.map_or(0, |r| self.reserve(&r));
        let frsize = u64::from(s.frsize.max(1));
        s.bavail = s.bavail.saturating_sub(reserve.div_ceil(frsize));
        s.ffree = s.ffree.saturating_sub(reserve / 512);
        s
    }
}

/// Growth admitted between two readings at most: a small share of the reserve, so that even a
/// stale reading cannot let much of the reserve go.
fn refresh_bytes(reserve: u64) -> u64 {
    (reserve / 16).clamp(1 << 20, 64 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_parses_bytes_suffixes_and_percentages() {
        let p = |s: &str| s.parse::<Reserve>();
        assert_eq!(p("0"), Ok(Reserve::Bytes(0)));
        assert_eq!(p("1048576"), Ok(Reserve::Bytes(1 << 20)));
        assert_eq!(p("64M"), Ok(Reserve::Bytes(64 << 20)));
        assert_eq!(p("2g"), Ok(Reserve::Bytes(2 << 30)));
        assert_eq!(p("1T"), Ok(Reserve::Bytes(1 << 40)));
        assert_eq!(p("1%"), Ok(Reserve::Basis(100)));
        assert_eq!(p("0.5%"), Ok(Reserve::Basis(50)));
        assert_eq!(p("12.25%"), Ok(Reserve::Basis(1225)));
        for bad in [
            "",
            "M",
            "12X",
            "-1",
            "1.5M",
            "51%",
            "%",
            ".5%",
            "1.234%",
            "99999999999T",
        ] {
            assert!(p(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn default_reserve_is_64_mib_or_one_percent() {
        assert_eq!(Reserve::Default.bytes(1 << 30), 64 << 20);
        assert_eq!(Reserve::Default.bytes(100 << 30), (100 << 30) / 100);
        assert_eq!(Reserve::Basis(5000).bytes(u64::MAX), u64::MAX / 2);
    }

    #[test]
    fn only_growth_is_refused() {
        use spoolfs_core::{Fh, Ino};
        let w = Op::Write {
            ino: Ino(2),
            fh: Fh(1),
            offset: 0,
            data: vec![0; 10],
            kill_privileges: false,
        };
        assert!(matches!(need(&w), Need::Grow(20)));
        let punch = Op::Fallocate {
            ino: Ino(2),
            fh: Fh(1),
            offset: 0,
            length: 1 << 30,
            mode: FALLOC_FL_PUNCH_HOLE | 1,
        };
        assert!(matches!(need(&punch), Need::Nothing));
        assert!(may_free(&punch));
        let unlink = Op::Unlink {
            parent: Ino(1),
            name: b"x".to_vec(),
        };
        assert!(matches!(need(&unlink), Need::Nothing));
        assert!(matches!(
            need(&Op::Flush {
                ino: Ino(2),
                fh: Fh(1)
            }),
            Need::Persist
        ));
    }
}
