//! The actor: the one thread that owns all state (the pending changes over redb, the core's
//! in-memory tables and the staging buffers).
//!
//! Group commit as a pipeline: the actor takes every request waiting in its queue (up to
//! `max_batch`) and applies them to the pending changes in memory (`spoolfs_store::Pending`),
//! answering at once every request that does not ask for durability. A commit task makes the
//! pending changes durable (a write-ahead log append and fdatasync, then redb; see
//! `spoolfs_store::wal`), one commit at a time, on a tokio blocking thread; whatever arrives
//! while it runs goes into the next one. A barrier (FLUSH,
//! fsync, fsyncdir; every mutation under `-o sync`; namespace changes under `-o dirsync`) is
//! answered when a commit holding everything before it returns, so N concurrent writers share
//! one fsync and the actor never waits for the disk. Nothing stays non-durable longer than
//! `MAX_UNDURABLE`; commits land in order, so after a crash the database holds a prefix of the
//! completed operations.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use spoolfs_core::{Ctx, Errno, Fs, Ino, Limits, Timestamp};
use spoolfs_store::{open_database, CommitFailure, Pending, Tables, Wal, META_NEXT_INO};
use tracing::{debug, error, info, warn};

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::callers;
use crate::committer::Committer;
use crate::content::{BatchStore, ContentCache};
use crate::dir_attrs::DirAttrs;
use crate::health::{Faults, StorageHealth};
use crate::metrics::{self, Metrics};
use crate::msg::*;
use crate::notify::Invalidation;
use crate::pinning::{ActorPlacement, Pinning};
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
    /// How long the actor polls its queue for the next request before it sleeps. Each sleep
    /// and wakeup of the actor costs two context switches per request, which on a VM (an idle
    /// vCPU halts and must be woken by an interrupt) cost more than the request itself:
    /// polling for 50 µs doubled create/unlink rates on the 2-core test VM. Like io_uring's
    /// SQPOLL idle time or Seastar's poll mode, bounded: an idle mount sleeps.
    pub poll: Duration,
    /// The CPU the actor thread runs on while its callers are fewer than the daemon's CPUs,
    /// or `None` to let the scheduler move it always. Pinned, it stays off the CPU its callers
    /// and the FUSE threads run on, so that a request and its answer cross between two
    /// running CPUs (cheap) instead of waking an idle one (on a VM, an interrupt and a halt
    /// exit: ~25 µs on the test VM); see `pinning` and the binary's `handoff`.
    pub cpu: Option<usize>,
    /// The actor may move off `cpu` to another when a caller runs there (`cpu` was chosen for
    /// it; an operator who named a CPU keeps it). See `pinning`.
    pub cpu_movable: bool,
    /// Where the actor runs, for the FUSE threads (they keep off its CPU while it is pinned).
    pub placement: Arc<ActorPlacement>,
    /// Owner and mode of the root directory of a new filesystem.
    pub root_uid: u32,
    pub root_gid: u32,
    pub root_perm: u32,
    pub limits: Limits,
    /// Space kept free on the data dir's filesystem (`-o reserve=`; see `space`).
    pub reserve: Reserve,
    /// Longest wait for durability before the waiter is answered EIO (`-o commit_timeout=`).
    pub commit_timeout: Duration,
    /// Whether the database is closed after a storage failure (see `health`); shared with
    /// the binary for `/readyz` and `spoolfs status`.
    pub health: Arc<StorageHealth>,
    /// The notify pool's queue, for the directories each batch changes (see `dir_attrs`);
    /// `None` when there is no kernel to tell.
    pub invalidations: Option<flume::Sender<Invalidation>>,
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
            poll: Duration::from_micros(50),
            cpu: None,
            cpu_movable: false,
            placement: Arc::default(),
            root_uid: 0,
            root_gid: 0,
            root_perm: 0o755,
            limits: Limits::default(),
            reserve: Reserve::Default,
            commit_timeout: DEFAULT_COMMIT_TIMEOUT,
            health: Arc::default(),
            invalidations: None,
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

    /// `send` for async callers: waits for room in the queue without holding a thread.
    pub async fn send_async(&self, msg: Msg) {
        if let Err(flume::SendError(msg)) = self.tx.send_async(msg).await {
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
const MAX_UNDURABLE: Duration = Duration::from_secs(1);

/// Pending changes that start a commit without a barrier (keeps each commit's size and the
/// memory held for it moderate).
const SEAL_BYTES: usize = 16 << 20;

// A file's write-behind step fills the pending changes to the seal size: it starts a commit
// at once instead of waiting for the next barrier or `MAX_UNDURABLE`.
const _: () = assert!(
    crate::content::WRITE_BEHIND_CHUNKS as u64 * spoolfs_core::CHUNK_SIZE >= SEAL_BYTES as u64
);

/// Pending changes past which new data is refused while a commit is stuck or failing (the
/// memory held in front of a slow or failed disk is bounded).
const MAX_PENDING_BYTES: usize = 256 << 20;

/// Longest a request waits for a durable commit before it is answered EIO. The commit keeps
/// running; its changes stay pending and are retried, but the caller learns the disk is not
/// keeping up instead of hanging (a hung disk must not hang every process using the mount).
const DEFAULT_COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause before retrying a failed commit (after reopening the database).
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// A reply held until the changes it depends on are durable, with when it started waiting
/// and the task that waits (the request's pid: a thread id).
type Held = (Responder, Result<Reply, Errno>, Instant, u32);

/// How old a wait must be before the actor checks whether its caller gave up, and how often
/// it checks (see `callers::gave_up`). Healthy commits take well under this.
const CALLER_CHECK: Duration = Duration::from_millis(200);

/// The commit running on a blocking task, with the replies that wait for it.
struct InFlight {
    waiters: Arc<Mutex<FlightWaiters>>,
    started: Instant,
}

/// The replies that wait for the commit in flight. They are shared with its task, which
/// answers them itself the moment the log is synced: waking the actor to answer them cost
/// ~60 µs per fsync on the 2-core VM (probe of the fsync path: 16 µs to the seal, 5 to start
/// the task, ~160 to write and sync the log, 55-65 for the actor to wake and take the event,
/// 17 to write the reply). The actor still answers them when the commit fails or is too slow
/// (`expire_waits`), so whoever takes a reply out of the list answers it.
#[derive(Default)]
struct FlightWaiters {
    /// The commit's changes are durable (in the log) while it still writes them to redb:
    /// replies that would wait for it are answered at once.
    durable: bool,
    replies: Vec<Held>,
}

/// The waiters of the commit in flight. A panic while the lock was held (in a reply: fuser
/// writing to /dev/fuse) leaves a list that is still whole, so poisoning is ignored.
fn waiters_of(flight: &InFlight) -> MutexGuard<'_, FlightWaiters> {
    flight
        .waiters
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// How a commit ended, how long it took, and the log it hands back.
type CommitResult = (Result<(), CommitFailure>, Duration, Option<Wal>);

pub struct Actor {
    config: ActorConfig,
    /// All state: changes pending in memory over the last commit's snapshot.
    state: Pending,
    fs: Fs,
    cache: ContentCache,
    next_ino: u64,
    /// Replies that wait for the commit after the one in flight.
    waiting: Vec<Held>,
    in_flight: Option<InFlight>,
    /// When the oldest change that is not yet durable was made.
    undurable_since: Option<Instant>,
    /// The last commit failed: no new commit before this instant.
    retry_at: Option<Instant>,
    requests: u64,
    commits: u64,
    durable_commits: u64,
    /// Runs the commits, one at a time, on one blocking task.
    committer: Committer,
    metrics: Arc<Metrics>,
    /// When the inode gauge was last refreshed (it costs a table read).
    inodes_refreshed: Option<Instant>,
    /// Disk-full admission control (check before apply).
    space: SpaceGuard,
    /// Storage failures: counted, logged, and the shared health state.
    faults: Faults,
    /// When the callers of old waits were last looked at (`CALLER_CHECK`).
    callers_checked: Instant,
    /// Releases and forgets that arrived while the database was closed after a storage
    /// failure: answered at once (the kernel ignores their answers), applied once it is
    /// reopened, so that handles and lookup counts do not leak and an unlinked file closed
    /// meanwhile is still reclaimed.
    deferred: Vec<Msg>,
    /// The actor thread's CPU placement (`None`: never pinned).
    pinning: Option<Pinning>,
    /// Reads callers' `/proc` entries off this thread (see `callers`).
    probe: callers::Probe,
    /// Directories whose cached attributes the kernel must drop after a change.
    dir_attrs: DirAttrs,
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

/// What woke the actor.
enum Event {
    Commit(CommitResult),
    Msg(Msg),
    Probe(callers::Answer),
    /// The probe's thread is gone (it cannot be, short of a panic there): no more answers.
    ProbeGone,
    Closed,
    Tick,
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
        // Recovery: what the log holds beyond redb's last durable commit goes in first.
        let (wal, replayed) = Wal::open(&db, &config.data_dir)
            .map_err(|e| prepare(format!("replay the write-ahead log: {e}")))?;
        if replayed > 0 {
            info!(
                replayed,
                "replayed write-ahead log entries from the previous run"
            );
        }
        if let Some(from) = wal.upgraded_from() {
            info!(
                from,
                to = spoolfs_store::SCHEMA_VERSION,
                "upgraded the database's schema"
            );
        }
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
        let state = Pending::new(db, Some(wal)).map_err(|e| prepare(e.to_string()))?;
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
        let (config_cpu, cpu_movable) = (config.cpu, config.cpu_movable);
        let placement = config.placement.clone();
        let (probe, answers) =
            callers::Probe::start(callers::Reader::PROC).map_err(StartError::Thread)?;
        let dir_attrs = DirAttrs::new(config.invalidations.clone());
        let mut actor = Actor {
            space,
            faults,
            cache: ContentCache::new(config.memfd_budget),
            config,
            state,
            fs,
            next_ino,
            waiting: Vec::new(),
            in_flight: None,
            undurable_since: None,
            retry_at: None,
            requests: 0,
            commits: 0,
            durable_commits: 0,
            committer: Committer::new(&runtime),
            metrics,
            inodes_refreshed: None,
            deferred: Vec::new(),
            callers_checked: Instant::now(),
            pinning: Pinning::new(config_cpu, cpu_movable, placement, probe.clone()),
            probe,
            dir_attrs,
        };
        let join = std::thread::Builder::new()
            .name("spoolfs-actor".into())
            .spawn(move || {
                if let Some(p) = &mut actor.pinning {
                    p.start();
                }
                actor.run(rx, answers)
            })
            .map_err(StartError::Thread)?;
        Ok((ActorHandle { tx }, join))
    }

    fn run(mut self, rx: flume::Receiver<Msg>, answers: flume::Receiver<callers::Answer>) {
        // How each commit ended, sent by its task.
        let (done_tx, done_rx) = flume::bounded::<CommitResult>(2);
        let mut answers = Some(answers);
        let mut open = true;
        loop {
            // The probe's answers, also while requests keep the actor busy.
            while let Some(a) = answers.as_ref().and_then(|r| r.try_recv().ok()) {
                self.probe_answered(a);
            }
            // Waits past their deadline are answered even while requests keep the actor busy
            // (the deadline only wakes an idle actor).
            if self.next_deadline().is_some_and(|d| d <= Instant::now()) {
                self.expire_waits();
            }
            self.maybe_commit(&done_tx);
            if !open && self.in_flight.is_none() {
                break;
            }
            let accept = open && !self.over_limit();
            if accept && !self.config.poll.is_zero() {
                if let Some(m) = poll_for_request(&rx, &done_rx, self.config.poll) {
                    self.apply_with_queued(m, &rx);
                    continue;
                }
            }
            let mut selector = flume::Selector::new().recv(&done_rx, |r| match r {
                Ok(e) => Event::Commit(e),
                Err(_) => Event::Commit(vanished()),
            });
            if let Some(answers) = &answers {
                selector = selector.recv(answers, |r| match r {
                    Ok(a) => Event::Probe(a),
                    Err(_) => Event::ProbeGone,
                });
            }
            if accept {
                selector = selector.recv(&rx, |r| match r {
                    Ok(m) => Event::Msg(m),
                    Err(_) => Event::Closed,
                });
            }
            let event = match self.next_deadline() {
                Some(deadline) => selector.wait_deadline(deadline).unwrap_or(Event::Tick),
                None => selector.wait(),
            };
            match event {
                Event::Commit(result) => self.finish_commit(result),
                Event::Msg(m) => self.apply_with_queued(m, &rx),
                Event::Closed => open = false,
                Event::Tick => self.expire_waits(),
                Event::Probe(a) => self.probe_answered(a),
                Event::ProbeGone => {
                    error!(
                        "the callers' probe thread ended: callers killed while they wait \
                        for a commit are answered at the commit timeout"
                    );
                    answers = None;
                }
            }
        }
        self.shutdown();
    }

    /// Apply a request with whatever queued behind it (up to `max_batch`), as one batch.
    fn apply_with_queued(&mut self, m: Msg, rx: &flume::Receiver<Msg>) {
        let mut batch = vec![m];
        while batch.len() < self.config.max_batch {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        self.apply_batch(batch);
    }

    /// Pending changes are past the memory bound and no commit is draining them: stop taking
    /// requests until the commit returns (backpressure). A commit stuck past the timeout does
    /// not count as draining, so requests keep being answered (mutations with EIO).
    fn over_limit(&self) -> bool {
        self.state.current().bytes() > MAX_PENDING_BYTES
            && self
                .in_flight
                .as_ref()
                .is_some_and(|f| f.started.elapsed() < self.config.commit_timeout)
    }

    /// The next instant something is due: a forced commit, a retry, a wait's timeout, or a
    /// look at whether old waits' callers gave up.
    fn next_deadline(&self) -> Option<Instant> {
        let in_flight = self
            .in_flight
            .as_ref()
            .and_then(|f| waiters_of(f).replies.first().map(|(_, _, since, _)| *since));
        let oldest = in_flight.or(self.waiting.first().map(|(_, _, since, _)| *since));
        let oldest_wait = oldest.map(|since| {
            let timeout = since + self.config.commit_timeout;
            let check = (since + CALLER_CHECK).max(self.callers_checked + CALLER_CHECK);
            timeout.min(check)
        });
        let commit_due = if self.in_flight.is_some() {
            None
        } else {
            match self.retry_at {
                Some(at) => Some(at),
                None => self.undurable_since.map(|t| t + MAX_UNDURABLE),
            }
        };
        [oldest_wait, commit_due].into_iter().flatten().min()
    }

    /// Start a commit if one is due and none is running.
    fn maybe_commit(&mut self, done_tx: &flume::Sender<CommitResult>) {
        if self.in_flight.is_some() {
            return;
        }
        if let Some(at) = self.retry_at {
            if Instant::now() < at {
                return;
            }
            // Reopen first, whether or not anything is pending: while the database is closed
            // every request is refused, so nothing new would ever become pending.
            if self.state.db().is_none() {
                let dir = &self.config.data_dir;
                match self.state.reopen(dir) {
                    Ok(()) => {
                        info!(data_dir = %dir.display(), "database reopened; retrying the commit");
                        let deferred = std::mem::take(&mut self.deferred);
                        if !deferred.is_empty() {
                            self.apply_batch(deferred);
                        }
                    }
                    Err(e) => {
                        self.faults.reopen_failed(&e);
                        self.retry_at = Some(Instant::now() + RETRY_DELAY);
                        return;
                    }
                }
            }
            if self.state.current().is_empty() {
                // Reopened with nothing to retry: the storage works again.
                self.retry_at = None;
                self.faults.recovered();
            }
        }
        if self.state.current().is_empty() {
            // Everything answered so far is durable.
            self.undurable_since = None;
            for (reply, r, _, _) in self.waiting.drain(..) {
                reply(r);
            }
            return;
        }
        let due = !self.waiting.is_empty()
            || self.retry_at.is_some()
            || self.state.current().bytes() >= SEAL_BYTES
            || self
                .undurable_since
                .is_some_and(|t| t.elapsed() >= MAX_UNDURABLE);
        if !due {
            return;
        }
        let Some(job) = self.state.seal() else {
            return;
        };
        self.retry_at = None;
        self.commits += 1;
        let done = done_tx.clone();
        let waiters = Arc::new(Mutex::new(FlightWaiters {
            durable: false,
            replies: std::mem::take(&mut self.waiting),
        }));
        let answer = Arc::clone(&waiters);
        self.committer.run(Box::new(move || {
            let started = Instant::now();
            // A panic inside redb must still answer the actor, which waits for this message.
            // (`run` lets go of the database before it returns, so the actor may reopen it.)
            let on_durable = || {
                let replies = {
                    let mut w = answer.lock().unwrap_or_else(PoisonError::into_inner);
                    w.durable = true;
                    std::mem::take(&mut w.replies)
                };
                for (reply, r, _, _) in replies {
                    reply(r);
                }
            };
            let (r, wal) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                job.run_notifying(on_durable)
            }))
            .unwrap_or_else(|_| {
                let failure = CommitFailure {
                    message: "commit panicked".into(),
                    no_space: false,
                };
                (Err(failure), None)
            });
            let _ = done.send((r, started.elapsed(), wal));
        }));
        self.in_flight = Some(InFlight {
            waiters,
            started: Instant::now(),
        });
    }

    fn finish_commit(&mut self, (result, took, wal): CommitResult) {
        let Some(flight) = self.in_flight.take() else {
            return;
        };
        // Normally empty: the task answered them when the log was synced. A failure in what it
        // did after that (writing redb, a checkpoint) cannot lose what the log holds:
        // reopening replays it.
        let replies = std::mem::take(&mut waiters_of(&flight).replies);
        self.metrics.commit_duration.observe(metrics::secs(took));
        self.metrics.commits_immediate.inc();
        match result {
            Ok(()) => {
                self.durable_commits += 1;
                match self.state.committed(wal) {
                    Ok(()) => self.faults.recovered(),
                    Err(e) => {
                        // The commit is durable; only the new snapshot failed. Reading goes
                        // through a reopen like after a failed commit.
                        error!(error = %e, "cannot read the committed state; reopening the database");
                        self.state.commit_failed();
                        self.retry_at = Some(Instant::now());
                    }
                }
                if self.state.current().is_empty() {
                    self.undurable_since = None;
                } else {
                    self.undurable_since = Some(Instant::now());
                }
                for (reply, r, _, _) in replies {
                    reply(r);
                }
            }
            Err(e) => {
                let errno = self.faults.commit_failed(&e);
                self.state.commit_failed();
                self.retry_at = Some(Instant::now() + RETRY_DELAY);
                for (reply, _, _, _) in replies {
                    reply(Err(errno));
                }
            }
        }
        self.refresh_gauges();
    }

    /// Take out of the held replies (waiting and in flight) those `pick` chooses.
    fn take_held(&mut self, mut pick: impl FnMut(&Held) -> bool) -> Vec<Held> {
        let mut taken = Vec::new();
        let mut sort = |held: Vec<Held>| {
            let (t, keep): (Vec<Held>, Vec<Held>) = held.into_iter().partition(&mut pick);
            taken.extend(t);
            keep
        };
        if let Some(flight) = &self.in_flight {
            let mut w = waiters_of(flight);
            let held = std::mem::take(&mut w.replies);
            w.replies = sort(held);
        }
        self.waiting = sort(std::mem::take(&mut self.waiting));
        taken
    }

    /// Answer EIO to every reply that has waited for durability longer than the timeout, and
    /// ask the callers' probe which callers of waits older than `CALLER_CHECK` gave up
    /// (answered in `callers_gave_up`).
    fn expire_waits(&mut self) {
        let timeout = self.config.commit_timeout;
        let late = self.take_held(|h| h.2.elapsed() >= timeout);
        if self.callers_checked.elapsed() >= CALLER_CHECK {
            self.callers_checked = Instant::now();
            let old_wait = |h: &Held| (h.2.elapsed() >= CALLER_CHECK && h.3 != 0).then_some(h.3);
            let mut old: Vec<u32> = self.waiting.iter().filter_map(old_wait).collect();
            if let Some(flight) = &self.in_flight {
                old.extend(waiters_of(flight).replies.iter().filter_map(old_wait));
            }
            old.sort_unstable();
            old.dedup();
            if !old.is_empty() {
                self.probe.ask_gave_up(old);
            }
        }
        if !late.is_empty() {
            self.metrics.storage_errors.inc();
            error!(waiting = late.len(), timeout_s = timeout.as_secs(),
                data_dir = %self.config.data_dir.display(),
                "a durable commit did not finish in time: answering EIO; the changes stay pending. \
                 Check the disk holding the data dir");
            for (reply, _, _, _) in late {
                reply(Err(Errno::EIO));
            }
        }
    }

    /// The probe's answer: these callers are killed or exiting. Their waits (older than
    /// `CALLER_CHECK`, as asked) are answered EINTR, as a libfuse filesystem answers an
    /// INTERRUPT (fuser cannot pass the kernel's on; see `callers`).
    fn callers_gave_up(&mut self, tids: &[u32]) {
        let abandoned = self.take_held(|h| h.2.elapsed() >= CALLER_CHECK && tids.contains(&h.3));
        if !abandoned.is_empty() {
            info!(
                callers = abandoned.len(),
                "callers killed or exiting while they waited for a commit: answered EINTR"
            );
            for (reply, _, _, _) in abandoned {
                reply(Err(Errno::EINTR));
            }
        }
    }

    /// An answer from the callers' probe.
    fn probe_answered(&mut self, answer: callers::Answer) {
        match answer {
            callers::Answer::GaveUp(tids) => self.callers_gave_up(&tids),
            callers::Answer::LastCpu { tid, cpu } => {
                if let Some(p) = &mut self.pinning {
                    p.caller_ran_on(tid, cpu);
                }
            }
        }
    }

    /// Make everything durable before the thread ends (unmount, SIGTERM).
    fn shutdown(&mut self) {
        if self.retry_at.is_some() && self.state.db().is_none() {
            if let Err(e) = self.state.reopen(&self.config.data_dir) {
                error!(error = %e, "cannot reopen the database for the final commit");
            }
        }
        let mut result = Ok(());
        if !self.state.current().is_empty() {
            result = match self.state.seal() {
                Some(job) => {
                    let (r, wal) = job.run();
                    r.map_err(|e| e.to_string())
                        .and_then(|()| self.state.committed(wal).map_err(|e| e.to_string()))
                }
                None => Err("the database is closed".to_string()),
            };
            match &result {
                Ok(()) => info!("final commit done"),
                Err(e) => {
                    error!(error = %e, "final commit failed: the last operations may be lost")
                }
            }
        }
        if result.is_ok() {
            // redb alone then holds everything: the data dir needs no log replay.
            if let Err(e) = self.state.checkpoint() {
                warn!(error = %e, "final checkpoint failed: the next mount replays the log");
            }
        }
        for (reply, r, _, _) in self.waiting.drain(..) {
            reply(r.and_then(|r| result.clone().map(|()| r).map_err(|_| Errno::EIO)));
        }
        info!(
            requests = self.requests,
            commits = self.commits,
            "actor stopped"
        );
    }

    /// Apply a batch to the pending state. Replies go out at once, except those that must
    /// wait for durability (barriers; every mutation under `-o sync`).
    fn apply_batch(&mut self, batch: Vec<Msg>) {
        let Some(db) = self.state.db().cloned() else {
            // The database is closed after a storage failure (reopened by `maybe_commit`).
            let (releases, refused): (Vec<Msg>, Vec<Msg>) =
                batch.into_iter().partition(|m| m.op.releases());
            for mut m in releases {
                let reply = std::mem::replace(&mut m.reply, Box::new(|_| {}));
                reply(Ok(Reply::Empty));
                self.deferred.push(m);
            }
            self.faults.refuse(refused);
            return;
        };
        let all_durable = self.state.current().is_empty() && self.in_flight.is_none();
        let unwritten = self.state.unwritten_bytes();
        self.space.begin_batch(
            &db,
            self.cache.dirty_chunks() * spoolfs_core::CHUNK_SIZE,
            u64::try_from(unwritten).unwrap_or(u64::MAX),
            all_durable,
        );
        drop(db);
        let mut replies = Vec::with_capacity(batch.len());
        let start_ino = self.next_ino;
        let refuse_growth = self.state.current().bytes() > MAX_PENDING_BYTES;
        for m in batch {
            let started = Instant::now();
            if let Some(p) = &mut self.pinning {
                p.saw(m.caller.pid, started);
            }
            self.metrics
                .queue_wait
                .observe(metrics::secs(started.saturating_duration_since(m.queued)));
            let stats = matches!(m.op, Op::Status).then(|| self.cache_stats());
            let space = matches!(m.op, Op::StatFs)
                .then(|| space_of(&self.config.data_dir).map(|s| self.space.hide_reserve(s)));
            let needs_durable = m.op.is_barrier()
                || (self.config.sync && !is_read_only(&m.op))
                || (self.config.dirsync && m.op.is_namespace());
            let name = m.op.name();
            self.dir_attrs.request(m.caller.pid, &m.op);
            let result = if refuse_growth && adds_data(&m.op) {
                // The disk is not keeping up (see `over_limit`): refuse new data.
                Err(Errno::EIO)
            } else if let Err(e) = self.space.admit(&m.op) {
                // Check, then apply: an operation that needs space the disk does not have is
                // refused before it changes anything.
                Err(e)
            } else {
                self.apply_one(&m, stats, space)
            };
            self.dir_attrs.applied(m.caller.pid, &m.op, &result);
            self.requests += 1;
            log_request(&m, name, &result, started);
            replies.push((m.reply, result, needs_durable, m.caller.pid, m.later));
        }
        if self.next_ino != start_ino {
            self.state.set_meta(META_NEXT_INO, self.next_ino);
        }
        if !self.state.current().is_empty() {
            self.undurable_since.get_or_insert_with(Instant::now);
        }
        self.metrics.batch_size.observe(replies.len() as f64);
        // Queued before the replies: the pool has usually sent them when a caller looks.
        self.dir_attrs.send();
        let now = Instant::now();
        for (reply, result, needs_durable, pid, later) in replies {
            if !needs_durable || result.is_err() {
                reply(result);
            } else if !self.state.current().is_empty() {
                // Its changes (or earlier ones) are pending: wait for the next commit.
                mark_later(later);
                self.waiting.push((reply, result, now, pid));
            } else if let Some(flight) = &self.in_flight {
                let mut w = waiters_of(flight);
                if w.durable {
                    drop(w);
                    reply(result);
                } else {
                    // Everything before it is in the commit already running.
                    mark_later(later);
                    w.replies.push((reply, result, now, pid));
                }
            } else {
                // Everything before it is durable.
                reply(result);
            }
        }
        self.refresh_gauges();
    }

    /// Apply one operation. If storage fails part way (a snapshot read, a memfd), its changes
    /// to the pending state and to the staging buffers are undone and it alone gets EIO.
    fn apply_one(
        &mut self,
        m: &Msg,
        stats: Option<StatusReport>,
        space: Option<Result<Statfs, Errno>>,
    ) -> Result<Reply, Errno> {
        self.state.current_mut().begin_batch();
        self.cache.begin_op();
        let mut store = BatchStore::new(&mut self.state, &mut self.cache);
        let result = apply(
            &mut self.fs,
            &mut store,
            &mut self.next_ino,
            m,
            stats,
            space,
        );
        match store.failed.take() {
            None => {
                self.state.current_mut().end_batch();
                self.cache.end_op();
                result
            }
            Some(e) => {
                self.faults.batch_failed(&e);
                self.state.current_mut().rollback();
                self.cache.rollback_op();
                Err(Errno::EIO)
            }
        }
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
            .is_none_or(|t| t.elapsed() > Duration::from_secs(1));
        if stale {
            self.inodes_refreshed = Some(Instant::now());
            if let Ok(n) = self.state.inode_count() {
                metrics::set(&m.inodes, n);
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

/// Operations that add data or records (refused while pending changes are past their bound):
/// those the space guard counts as growth, and every setattr and fallocate.
fn adds_data(op: &Op) -> bool {
    crate::space::grows(op) || matches!(op, Op::SetAttr { .. } | Op::Fallocate { .. })
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
    s: &mut BatchStore<'_>,
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
            kill_privileges,
        } => {
            if *kill_privileges {
                fs.kill_privileges(s, *ino)?;
            }
            Reply::Written(fs.write(s, &ctx, *ino, *fh, *offset, data)?)
        }
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
    let failure = CommitFailure {
        message: "commit task vanished".into(),
        no_space: false,
    };
    (Err(failure), Duration::ZERO, None)
}

impl std::fmt::Debug for WeakActorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakActorHandle").finish_non_exhaustive()
    }
}

/// Poll the request queue for up to `poll` before sleeping (see `ActorConfig::poll`); stop
/// early when a commit result is waiting (the select in `run` takes it).
fn poll_for_request(
    rx: &flume::Receiver<Msg>,
    done_rx: &flume::Receiver<CommitResult>,
    poll: Duration,
) -> Option<Msg> {
    let until = Instant::now() + poll;
    loop {
        if !done_rx.is_empty() {
            return None;
        }
        if let Ok(m) = rx.try_recv() {
            return Some(m);
        }
        if Instant::now() >= until {
            return None;
        }
        // Yield rather than spin: a caller or FUSE thread that shares this CPU runs at once.
        std::thread::yield_now();
    }
}
