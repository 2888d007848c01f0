//! The actor: the one thread that owns the database, the core's in-memory tables and the
//! staging buffers.
//!
//! Group commit: the actor takes every request waiting in its queue (up to `max_batch`),
//! applies them in one redb write transaction, and commits once. A batch that holds a barrier
//! (FLUSH, fsync, fsyncdir; every mutation under `-o sync`; namespace changes under
//! `-o dirsync`) is committed with `Durability::Immediate` on a tokio blocking task, and its
//! replies are sent when that commit returns; meanwhile the actor keeps collecting the next
//! batch, so N concurrent writers share one fsync. Other batches commit with
//! `Durability::None` (no fsync), which redb makes durable with the next immediate commit:
//! after a crash the database holds a prefix of the completed operations.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableDatabase, WriteTransaction};
use spoolfs_core::{Ctx, Errno, Fs, Ino, Limits, Timestamp};
use spoolfs_store::{open_database, Tables, META_NEXT_INO};
use tracing::{debug, error, info, warn};

use std::sync::Arc;

use crate::content::{BatchStore, ContentCache};
use crate::health::{Faults, StorageHealth};
use crate::metrics::{self, Metrics};
use crate::msg::*;
use crate::space::{Reserve, SpaceGuard};

#[derive(Debug, Clone)]
pub struct ActorConfig {
    pub data_dir: PathBuf,
    /// `-o sync`: every mutation is durable before it is answered.
    pub sync: bool,
    /// `-o dirsync`: every namespace change is durable before it is answered.
    pub dirsync: bool,
    /// Most bytes the memfd staging buffers may hold together.
    pub memfd_budget: u64,
    /// Most requests applied in one transaction.
    pub max_batch: usize,
    /// Capacity of the request queue (FUSE threads block when it is full: backpressure).
    pub queue_capacity: usize,
    /// Owner and mode of the root directory of a new filesystem.
    pub root_uid: u32,
    pub root_gid: u32,
    pub root_perm: u32,
    pub limits: Limits,
    /// Space kept free on the data dir's filesystem (`-o reserve=`; see `space`).
    pub reserve: Reserve,
    /// Set once a storage I/O error has closed the database (see `health`); shared with the
    /// binary for `/readyz` and `spoolfs status`.
    pub health: Arc<StorageHealth>,
}

impl ActorConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        ActorConfig {
            data_dir,
            sync: false,
            dirsync: false,
            memfd_budget: 1 << 30,
            max_batch: 512,
            queue_capacity: 1024,
            root_uid: 0,
            root_gid: 0,
            root_perm: 0o755,
            limits: Limits::default(),
            reserve: Reserve::Default,
            health: Arc::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Open(#[from] spoolfs_store::OpenError),
    #[error("cannot prepare database in {path}: {message}")]
    Prepare { path: String, message: String },
    #[error("cannot start the actor thread: {0}")]
    Thread(std::io::Error),
}

/// The sending side of the actor's queue; cloned into every FUSE thread. When every clone is
/// dropped the actor commits what it holds and stops.
#[derive(Clone)]
pub struct ActorHandle {
    tx: flume::Sender<Msg>,
}

impl ActorHandle {
    /// Queue a request; blocks while the queue is full. If the actor is gone the responder is
    /// answered with EIO here, so no request goes unanswered.
    pub fn send(&self, msg: Msg) {
        if let Err(flume::SendError(msg)) = self.tx.send(msg) {
            (msg.reply)(Err(Errno::EIO));
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.tx.len()
    }

    /// A handle that does not keep the actor alive (for the control socket, which must not
    /// stop the actor from shutting down when the mount goes away).
    pub fn downgrade(&self) -> WeakActorHandle {
        WeakActorHandle {
            tx: self.tx.downgrade(),
        }
    }
}

#[derive(Clone)]
pub struct WeakActorHandle {
    tx: flume::WeakSender<Msg>,
}

impl WeakActorHandle {
    pub fn upgrade(&self) -> Option<ActorHandle> {
        self.tx.upgrade().map(|tx| ActorHandle { tx })
    }

    /// Requests waiting in the queue (0 once the actor is gone).
    pub fn queue_depth(&self) -> usize {
        self.tx.upgrade().map_or(0, |tx| tx.len())
    }
}

/// Longest time a completed operation may stay non-durable when nobody asks for durability.
const MAX_UNDURABLE: std::time::Duration = std::time::Duration::from_secs(1);

/// A durable commit running on a blocking task, with the replies that wait for it.
struct InFlight {
    replies: Vec<(Responder, Result<Reply, Errno>)>,
}

/// How a commit ended, and how long it took.
type CommitResult = (Result<(), String>, std::time::Duration);

pub struct Actor {
    config: ActorConfig,
    db: Database,
    fs: Fs,
    cache: ContentCache,
    next_ino: u64,
    /// Some commit since the last durable one was not durable.
    undurable: bool,
    /// When the oldest commit that is not yet durable was made.
    undurable_since: Option<Instant>,
    requests: u64,
    commits: u64,
    durable_commits: u64,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    /// When the inode gauge was last refreshed (it costs a table read).
    inodes_refreshed: Option<Instant>,
    /// Disk-full admission control (check before apply).
    space: SpaceGuard,
    /// Storage failures: counted, logged, and the failed state once redb closed the database.
    faults: Faults,
}

fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::new(
        i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        d.subsec_nanos(),
    )
}

impl Actor {
    /// Open the data directory's database, create the root, reclaim orphans, and start the
    /// actor thread. Errors are reported before anything is mounted.
    pub fn start(
        config: ActorConfig,
        runtime: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
    ) -> Result<(ActorHandle, std::thread::JoinHandle<()>), StartError> {
        let path = config.data_dir.join(spoolfs_store::DB_FILE);
        let db = open_database(&path)?;
        let prepare = |message: String| StartError::Prepare {
            path: config.data_dir.display().to_string(),
            message,
        };
        let mut fs = Fs::new(config.limits);
        let next_ino;
        {
            let txn = db.begin_write().map_err(|e| prepare(e.to_string()))?;
            {
                let mut t = Tables::open(&txn).map_err(|e| prepare(e.to_string()))?;
                let ctx = Ctx {
                    uid: config.root_uid,
                    gid: config.root_gid,
                    pid: 0,
                    now: now(),
                };
                fs.init_root(&mut t, &ctx, config.root_perm)
                    .map_err(|e| prepare(format!("create root: {e}")))?;
                let reclaimed = fs
                    .reclaim_orphans(&mut t)
                    .map_err(|e| prepare(format!("reclaim orphans: {e}")))?;
                if reclaimed > 0 {
                    info!(reclaimed, "reclaimed orphaned inodes from the previous run");
                }
                next_ino = t
                    .meta(META_NEXT_INO)
                    .map_err(|e| prepare(e.to_string()))?
                    .unwrap_or(2);
            }
            txn.commit().map_err(|e| prepare(e.to_string()))?;
        }
        let (tx, rx) = flume::bounded(config.queue_capacity);
        metrics::set(&metrics.queue_capacity, config.queue_capacity as u64);
        metrics::set(&metrics.memfd_budget_bytes, config.memfd_budget);
        let space = SpaceGuard::new(
            &config.data_dir,
            config.reserve,
            metrics.clone(),
            runtime.clone(),
        );
        let faults = Faults::new(
            config.health.clone(),
            metrics.clone(),
            config.data_dir.clone(),
        );
        let actor = Actor {
            space,
            faults,
            cache: ContentCache::new(config.memfd_budget),
            config,
            db,
            fs,
            next_ino,
            undurable: false,
            undurable_since: None,
            requests: 0,
            commits: 0,
            durable_commits: 0,
            runtime,
            metrics,
            inodes_refreshed: None,
        };
        let join = std::thread::Builder::new()
            .name("spoolfs-actor".into())
            .spawn(move || actor.run(rx))
            .map_err(StartError::Thread)?;
        Ok((ActorHandle { tx }, join))
    }

    fn run(mut self, rx: flume::Receiver<Msg>) {
        let (done_tx, done_rx) = flume::bounded::<CommitResult>(1);
        let mut pending: VecDeque<Msg> = VecDeque::new();
        let mut in_flight: Option<InFlight> = None;
        let mut open = true;
        loop {
            if let Some(flight) = in_flight.take() {
                // A durable commit is running: gather the next batch until it returns.
                enum Event {
                    Done(CommitResult),
                    Msg(Msg),
                    Closed,
                }
                let event = if open && pending.len() < self.config.max_batch {
                    flume::Selector::new()
                        .recv(&done_rx, |r| match r {
                            Ok(r) => Event::Done(r),
                            Err(_) => Event::Done(vanished()),
                        })
                        .recv(&rx, |r| match r {
                            Ok(m) => Event::Msg(m),
                            Err(_) => Event::Closed,
                        })
                        .wait()
                } else {
                    match done_rx.recv() {
                        Ok(r) => Event::Done(r),
                        Err(_) => Event::Done(vanished()),
                    }
                };
                match event {
                    Event::Done(result) => self.finish_durable(flight, result),
                    Event::Msg(m) => {
                        pending.push_back(m);
                        in_flight = Some(flight);
                    }
                    Event::Closed => {
                        open = false;
                        in_flight = Some(flight);
                    }
                }
                continue;
            }
            if pending.is_empty() {
                if !open {
                    break;
                }
                // Idle with a commit that is not durable yet: wait no longer than the
                // MAX_UNDURABLE bound, then make it durable without waiting for another
                // request (else an idle mount keeps its last operations non-durable for
                // ever, and a crash loses them however long ago they completed).
                let received = match self.undurable_since {
                    Some(since) => match rx.recv_deadline(since + MAX_UNDURABLE) {
                        Err(flume::RecvTimeoutError::Timeout) => {
                            in_flight = self.start_idle_durable_commit(&done_tx);
                            continue;
                        }
                        r => r.map_err(|_| ()),
                    },
                    None => rx.recv().map_err(|_| ()),
                };
                match received {
                    Ok(m) => pending.push_back(m),
                    Err(()) => {
                        open = false;
                        continue;
                    }
                }
            }
            while pending.len() < self.config.max_batch {
                match rx.try_recv() {
                    Ok(m) => pending.push_back(m),
                    Err(_) => break,
                }
            }
            let n = pending.len().min(self.config.max_batch);
            let batch: Vec<Msg> = pending.drain(..n).collect();
            in_flight = self.apply_batch(batch, &done_tx);
        }
        self.shutdown();
    }

    /// Make everything durable before the thread ends (unmount, SIGTERM).
    fn shutdown(&mut self) {
        if self.undurable {
            match self.durable_empty_commit() {
                Ok(()) => info!("final commit done"),
                Err(e) => {
                    error!(error = %e, "final commit failed: the last operations may be lost")
                }
            }
        }
        info!(
            requests = self.requests,
            commits = self.commits,
            "actor stopped"
        );
    }

    /// An empty durable commit on the blocking pool, answering nobody: it makes the earlier
    /// non-durable commits durable (see the idle wait in `run`).
    fn start_idle_durable_commit(
        &mut self,
        done_tx: &flume::Sender<CommitResult>,
    ) -> Option<InFlight> {
        if self.faults.is_failed() {
            self.undurable_since = None;
            return None;
        }
        // On failure the next attempt comes one bound later, not in a tight loop.
        self.undurable_since = Some(Instant::now());
        match self.db.begin_write() {
            Ok(txn) => self.commit_durable(txn, Vec::new(), done_tx),
            Err(e) => {
                self.faults
                    .record(&self.db, "begin the idle durable commit", &e);
                None
            }
        }
    }

    fn durable_empty_commit(&mut self) -> Result<(), String> {
        let mut txn = self.db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        self.undurable = false;
        self.undurable_since = None;
        Ok(())
    }

    fn finish_durable(&mut self, flight: InFlight, (result, took): CommitResult) {
        self.metrics.commit_duration.observe(metrics::secs(took));
        self.metrics.commits_immediate.inc();
        self.refresh_gauges();
        match result {
            Ok(()) => {
                self.undurable = false;
                self.undurable_since = None;
                self.durable_commits += 1;
                for (reply, r) in flight.replies {
                    reply(r);
                }
            }
            Err(e) => {
                let errno = self.faults.record(&self.db, "durable commit", &e);
                for (reply, _) in flight.replies {
                    reply(Err(errno));
                }
            }
        }
    }

    /// Apply a batch in one transaction. Returns the in-flight durable commit, if any.
    fn apply_batch(
        &mut self,
        batch: Vec<Msg>,
        done_tx: &flume::Sender<CommitResult>,
    ) -> Option<InFlight> {
        if self.faults.is_failed() {
            self.faults.refuse(batch);
            return None;
        }
        self.space.begin_batch(
            &self.db,
            self.cache.dirty_chunks() * spoolfs_core::CHUNK_SIZE,
            !self.undurable,
        );
        let txn = match self.db.begin_write() {
            Ok(t) => t,
            Err(e) => {
                let errno = self.faults.record(&self.db, "begin a transaction", &e);
                for m in batch {
                    (m.reply)(Err(errno));
                }
                return None;
            }
        };
        let mut replies = Vec::with_capacity(batch.len());
        let mut barrier = false;
        let mut wrote = false;
        let mut failed = None;
        let start_ino = self.next_ino;
        match Tables::open(&txn) {
            Err(e) => failed = Some(e),
            Ok(mut tables) => {
                for m in batch {
                    let started = Instant::now();
                    self.metrics
                        .queue_wait
                        .observe(metrics::secs(started.saturating_duration_since(m.queued)));
                    let stats = matches!(m.op, Op::Status).then(|| self.cache_stats());
                    let space = matches!(m.op, Op::StatFs).then(|| {
                        space_of(&self.config.data_dir).map(|s| self.space.hide_reserve(s))
                    });
                    let mut store = BatchStore::new(&mut tables, &mut self.cache);
                    let needs_durable = m.op.is_barrier()
                        || (self.config.sync && !is_read_only(&m.op))
                        || (self.config.dirsync && m.op.is_namespace());
                    let name = m.op.name();
                    // Check, then apply: an operation that needs space the disk does not have is
                    // refused before it changes anything.
                    let result = self.space.admit(&m.op).and_then(|()| {
                        apply(
                            &mut self.fs,
                            &mut store,
                            &mut self.next_ino,
                            &m,
                            stats,
                            space,
                        )
                    });
                    wrote |= store.wrote;
                    if let Some(e) = store.failed.take() {
                        failed = Some(e);
                    }
                    barrier |= needs_durable;
                    self.requests += 1;
                    log_request(&m, name, &result, started);
                    replies.push((m.reply, result));
                    if failed.is_some() {
                        break;
                    }
                }
                if failed.is_none() && self.next_ino != start_ino {
                    if let Err(e) = tables.set_meta(META_NEXT_INO, self.next_ino) {
                        failed = Some(e);
                    }
                    wrote = true;
                }
            }
        }
        if let Some(e) = failed {
            let _ = txn.abort();
            let errno = self.faults.record(&self.db, "apply a batch", &e);
            for (reply, _) in replies {
                reply(Err(errno));
            }
            return None;
        }
        // Bound what a crash can lose (and how far redb's file grows, since pages freed by
        // non-durable commits are reused only after a durable one): at most ~1 s of work.
        if wrote
            && self
                .undurable_since
                .is_some_and(|t| t.elapsed() > MAX_UNDURABLE)
        {
            barrier = true;
        }
        if !(wrote || barrier && self.undurable) {
            // Nothing to store: answer at once.
            let _ = txn.abort();
            self.refresh_gauges();
            for (reply, r) in replies {
                reply(r);
            }
            return None;
        }
        self.commits += 1;
        self.metrics.batch_size.observe(replies.len() as f64);
        if barrier {
            self.commit_durable(txn, replies, done_tx)
        } else {
            self.commit_fast(txn, replies);
            None
        }
    }

    fn commit_fast(
        &mut self,
        mut txn: WriteTransaction,
        replies: Vec<(Responder, Result<Reply, Errno>)>,
    ) {
        let started = Instant::now();
        let result = txn
            .set_durability(Durability::None)
            .map_err(|e| e.to_string())
            .and_then(|_| txn.commit().map_err(|e| e.to_string()));
        self.metrics
            .commit_duration
            .observe(metrics::secs(started.elapsed()));
        self.metrics.commits_none.inc();
        self.refresh_gauges();
        match result {
            Ok(()) => {
                self.undurable = true;
                self.undurable_since.get_or_insert_with(Instant::now);
                for (reply, r) in replies {
                    reply(r);
                }
            }
            Err(e) => {
                let errno = self.faults.record(&self.db, "commit", &e);
                for (reply, _) in replies {
                    reply(Err(errno));
                }
            }
        }
    }

    fn commit_durable(
        &mut self,
        mut txn: WriteTransaction,
        replies: Vec<(Responder, Result<Reply, Errno>)>,
        done_tx: &flume::Sender<CommitResult>,
    ) -> Option<InFlight> {
        if let Err(e) = txn.set_durability(Durability::Immediate) {
            error!(error = %e, "cannot request a durable commit: answering EIO");
            for (reply, _) in replies {
                reply(Err(Errno::EIO));
            }
            return None;
        }
        let done = done_tx.clone();
        self.runtime.spawn_blocking(move || {
            let started = Instant::now();
            // A panic inside redb must still answer the actor, which waits for this message.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| txn.commit()))
                .map_err(|_| "commit panicked".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            let r = (r, started.elapsed());
            // The actor always waits for this message while a commit is in flight.
            let _ = done.send(r);
        });
        Some(InFlight { replies })
    }

    /// Update the gauges that describe the actor's state (once per batch: cheap reads).
    fn refresh_gauges(&mut self) {
        let m = &self.metrics;
        metrics::set(&m.memfd_bytes, self.cache.resident_bytes());
        metrics::set(
            &m.memfd_dirty_bytes,
            self.cache.dirty_chunks() * spoolfs_core::CHUNK_SIZE,
        );
        metrics::set(&m.open_handles, self.fs.open_handles() as u64);
        let stale = self
            .inodes_refreshed
            .is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(1));
        if stale {
            self.inodes_refreshed = Some(Instant::now());
            if let Ok(txn) = self.db.begin_read() {
                if let Ok(n) = spoolfs_store::count_inodes(&txn) {
                    metrics::set(&m.inodes, n);
                }
            }
        }
    }

    fn cache_stats(&self) -> StatusReport {
        StatusReport {
            requests: self.requests,
            commits: self.commits,
            durable_commits: self.durable_commits,
            open_handles: self.fs.open_handles() as u64,
            known_inodes: self.fs.known_inodes() as u64,
            memfd_bytes: self.cache.resident_bytes(),
            memfd_dirty_chunks: self.cache.dirty_chunks(),
            db_bytes: std::fs::metadata(self.config.data_dir.join(spoolfs_store::DB_FILE))
                .map(|m| m.len())
                .unwrap_or(0),
        }
    }
}

fn is_read_only(op: &Op) -> bool {
    matches!(
        op,
        Op::Lookup { .. }
            | Op::GetAttr { .. }
            | Op::ReadLink { .. }
            | Op::Read { .. }
            | Op::OpenDir { .. }
            | Op::ReadDir { .. }
            | Op::StatFs
            | Op::GetXattr { .. }
            | Op::ListXattr { .. }
            | Op::Access { .. }
            | Op::Lseek { .. }
            | Op::Status
    )
}

fn log_request(m: &Msg, name: &'static str, result: &Result<Reply, Errno>, started: Instant) {
    let latency_us = started.elapsed().as_micros() as u64;
    let queued_us = started.saturating_duration_since(m.queued).as_micros() as u64;
    match result {
        Ok(_) => {
            debug!(req = m.caller.unique, op = name, args = ?m.op.args(), latency_us, queued_us, "ok")
        }
        Err(e) if expected_error(&m.op, *e) => {
            debug!(req = m.caller.unique, op = name, args = ?m.op.args(), errno = e.name(), latency_us, "error")
        }
        Err(e) => {
            warn!(req = m.caller.unique, op = name, args = ?m.op.args(), errno = e.name(), latency_us, "error")
        }
    }
}

/// Errors that are part of normal operation (a lookup of a missing name, a probe for an
/// absent xattr) and so are not worth a warning.
fn expected_error(op: &Op, e: Errno) -> bool {
    matches!(
        (op, e),
        (Op::Lookup { .. }, Errno::ENOENT)
            | (Op::GetXattr { .. }, Errno::ENODATA)
            // The size-probe protocol: a buffer too small is part of it.
            | (Op::GetXattr { .. }, Errno::ERANGE)
            | (Op::ListXattr { .. }, Errno::ERANGE)
            | (Op::Lseek { .. }, Errno::ENXIO)
            // A full disk: the space guard logs it once (a line per refusal would fill the
            // disk it is about); the refusals are counted by errno.
            | (_, Errno::ENOSPC)
    )
}

fn alloc_ino(next: &mut u64) -> Result<Ino, Errno> {
    let ino = *next;
    *next = next.checked_add(1).ok_or(Errno::ENOSPC)?;
    Ok(Ino(ino))
}

/// Size-probe protocol of getxattr/listxattr: size 0 asks for the length; a buffer too small
/// is ERANGE.
fn xattr_reply(value: Vec<u8>, size: u32) -> Result<Reply, Errno> {
    let len = u32::try_from(value.len()).map_err(|_| Errno::E2BIG)?;
    if size == 0 {
        Ok(Reply::XattrSize(len))
    } else if len > size {
        Err(Errno::ERANGE)
    } else {
        Ok(Reply::Data(value))
    }
}

/// Most directory entries returned by one readdir (the kernel asks again for more).
const READDIR_PAGE: usize = 256;

fn apply(
    fs: &mut Fs,
    s: &mut BatchStore<'_, '_>,
    next_ino: &mut u64,
    m: &Msg,
    stats: Option<StatusReport>,
    space: Option<Result<Statfs, Errno>>,
) -> Result<Reply, Errno> {
    let ctx = Ctx {
        uid: m.caller.uid,
        gid: m.caller.gid,
        pid: m.caller.pid,
        now: now(),
    };
    Ok(match &m.op {
        Op::Lookup { parent, name } => Reply::Entry(fs.lookup(s, *parent, name)?),
        Op::Forget { nodes } => {
            for (ino, n) in nodes {
                fs.forget(s, *ino, *n)?;
            }
            Reply::Empty
        }
        Op::GetAttr { ino } => Reply::Attr(fs.getattr(s, *ino)?),
        Op::SetAttr { ino, set } => Reply::Attr(fs.setattr(s, &ctx, *ino, set)?),
        Op::ReadLink { ino } => Reply::Data(fs.readlink(s, *ino)?),
        Op::MkNod {
            parent,
            name,
            mode,
            rdev,
        } => {
            let ino = alloc_ino(next_ino)?;
            Reply::Entry(fs.mknod(s, &ctx, *parent, name, *mode, *rdev, ino)?)
        }
        Op::MkDir { parent, name, mode } => {
            let ino = alloc_ino(next_ino)?;
            Reply::Entry(fs.mkdir(s, &ctx, *parent, name, *mode, ino)?)
        }
        Op::Unlink { parent, name } => {
            fs.unlink(s, &ctx, *parent, name)?;
            Reply::Empty
        }
        Op::RmDir { parent, name } => {
            fs.rmdir(s, &ctx, *parent, name)?;
            Reply::Empty
        }
        Op::Symlink {
            parent,
            name,
            target,
        } => {
            let ino = alloc_ino(next_ino)?;
            Reply::Entry(fs.symlink(s, &ctx, *parent, name, target, ino)?)
        }
        Op::Rename {
            parent,
            name,
            new_parent,
            new_name,
            flags,
        } => {
            fs.rename(s, &ctx, *parent, name, *new_parent, new_name, *flags)?;
            Reply::Empty
        }
        Op::Link {
            ino,
            new_parent,
            new_name,
        } => Reply::Entry(fs.link(s, &ctx, *ino, *new_parent, new_name)?),
        Op::Open { ino, flags } => Reply::Opened(fs.open(s, *ino, *flags)?),
        Op::Create {
            parent,
            name,
            mode,
            flags,
        } => {
            let ino = alloc_ino(next_ino)?;
            let (inode, fh) = fs.create(s, &ctx, *parent, name, *mode, *flags, ino)?;
            Reply::Created(inode, fh)
        }
        Op::Read {
            ino,
            fh,
            offset,
            size,
        } => Reply::Data(fs.read(s, *ino, *fh, *offset, *size)?),
        Op::Write {
            ino,
            fh,
            offset,
            data,
        } => Reply::Written(fs.write(s, &ctx, *ino, *fh, *offset, data)?),
        Op::Flush { ino, fh } | Op::Fsync { ino, fh } => {
            fs.flush(s, *ino, *fh)?;
            Reply::Empty
        }
        Op::Release { ino, fh } => {
            fs.release(s, *ino, *fh)?;
            Reply::Empty
        }
        Op::OpenDir { ino } => Reply::Opened(fs.opendir(s, *ino)?),
        Op::ReadDir { ino, fh, offset } => {
            let mut entries = fs.readdir(s, *ino, *fh, *offset)?;
            entries.truncate(READDIR_PAGE);
            Reply::Dir(entries)
        }
        Op::ReleaseDir { ino, fh } => {
            fs.releasedir(s, *ino, *fh)?;
            Reply::Empty
        }
        Op::FsyncDir { ino, .. } => {
            fs.getattr(s, *ino)?;
            Reply::Empty
        }
        Op::StatFs => Reply::Statfs(space.ok_or(Errno::EIO)??),
        Op::SetXattr {
            ino,
            name,
            value,
            flags,
        } => {
            fs.setxattr(s, &ctx, *ino, name, value, *flags)?;
            Reply::Empty
        }
        Op::GetXattr { ino, name, size } => xattr_reply(fs.getxattr(s, *ino, name)?, *size)?,
        Op::ListXattr { ino, size } => xattr_reply(fs.listxattr(s, *ino)?, *size)?,
        Op::RemoveXattr { ino, name } => {
            fs.removexattr(s, &ctx, *ino, name)?;
            Reply::Empty
        }
        Op::Access { ino, mask } => {
            fs.access(s, &ctx, *ino, *mask)?;
            Reply::Empty
        }
        Op::Fallocate {
            ino,
            fh,
            offset,
            length,
            mode,
        } => {
            fs.fallocate(s, &ctx, *ino, *fh, *offset, *length, *mode)?;
            Reply::Empty
        }
        Op::Lseek {
            ino,
            fh,
            offset,
            whence,
        } => Reply::Offset(fs.lseek(s, *ino, *fh, *offset, *whence)?),
        Op::Status => Reply::Status(stats.ok_or(Errno::EIO)?),
    })
}

/// Space is that of the filesystem holding the data directory (where content really goes);
/// inodes are limited only by space, so the free count follows free blocks.
fn space_of(data_dir: &std::path::Path) -> Result<Statfs, Errno> {
    let v = nix::sys::statvfs::statvfs(data_dir).map_err(|e| Errno(e as i32))?;
    let frsize = v.fragment_size();
    Ok(Statfs {
        blocks: v.blocks(),
        bfree: v.blocks_free(),
        bavail: v.blocks_available(),
        files: v.blocks().saturating_mul(frsize / 512).max(v.files()),
        ffree: v
            .blocks_available()
            .saturating_mul(frsize / 512)
            .max(v.files_free()),
        bsize: u32::try_from(v.block_size()).unwrap_or(4096),
        namelen: 255,
        frsize: u32::try_from(frsize).unwrap_or(4096),
    })
}

fn vanished() -> CommitResult {
    (
        Err("commit task vanished".into()),
        std::time::Duration::ZERO,
    )
}

impl std::fmt::Debug for WeakActorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakActorHandle").finish_non_exhaustive()
    }
}
