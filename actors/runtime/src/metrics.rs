//! Prometheus metrics of the daemon, as handles created once at start.
//!
//! Recording must not slow the actor: per-operation handles are created up front and indexed
//! by operation, so a request costs a few atomic adds and one histogram observation; label
//! sets are only built for errors (rare) and at scrape time.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::msg::OP_NAMES;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub op: &'static str,
    pub errno: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurabilityLabel {
    pub durability: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriterLabel {
    pub writer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: &'static str,
}

/// Latency buckets from 10 µs to ~10 s (factor 2, 21 buckets).
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(10e-6, 2.0, 21)
}

pub struct OpMetrics {
    pub requests: Counter,
    pub duration: Histogram,
}

pub struct Metrics {
    pub per_op: Vec<OpMetrics>,
    pub errors: Family<ErrorLabels, Counter>,
    pub in_flight: Gauge,
    pub queue_capacity: Gauge,
    pub queue_wait: Histogram,
    pub commits_immediate: Counter,
    pub commit_duration: Histogram,
    pub batch_size: Histogram,
    pub memfd_bytes: Gauge,
    pub memfd_dirty_bytes: Gauge,
    pub memfd_budget_bytes: Gauge,
    pub open_handles: Gauge,
    pub inodes: Gauge,
    pub notify_queue_depth: Gauge,
    pub notify_duration: Histogram,
    pub mounted: Gauge,
    pub storage_errors: Counter,
    /// 1 once a storage I/O error has closed the database (until remount; see `health`).
    pub storage_failed: Gauge,
    /// Space kept free on the data dir's filesystem (`-o reserve=`).
    pub space_reserve_bytes: Gauge,
    /// Replies to requests whose FUSE thread waited for the answer (the binary's `handoff`):
    /// written by that FUSE thread, after a commit (by the commit task, once the log is
    /// synced), or by the actor because the answer was slow.
    pub handoff_by_fuse_thread: Counter,
    pub handoff_after_commit: Counter,
    pub handoff_left_to_actor: Counter,
}

impl Metrics {
    /// Create every metric and register it (with the `spoolfs_` prefix) in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let requests = Family::<OpLabel, Counter>::default();
        let durations =
            Family::<OpLabel, Histogram>::new_with_constructor(
                || Histogram::new(latency_buckets()),
            );
        let per_op = OP_NAMES
            .iter()
            .map(|op| OpMetrics {
                requests: requests.get_or_create_owned(&OpLabel { op }),
                duration: durations.get_or_create_owned(&OpLabel { op }),
            })
            .collect();
        let commits = Family::<DurabilityLabel, Counter>::default();
        let handoffs = Family::<WriterLabel, Counter>::default();
        let m = Metrics {
            per_op,
            errors: Family::default(),
            in_flight: Gauge::default(),
            queue_capacity: Gauge::default(),
            queue_wait: Histogram::new(latency_buckets()),
            commits_immediate: commits.get_or_create_owned(&DurabilityLabel {
                durability: "immediate",
            }),
            commit_duration: Histogram::new(latency_buckets()),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            memfd_bytes: Gauge::default(),
            memfd_dirty_bytes: Gauge::default(),
            memfd_budget_bytes: Gauge::default(),
            open_handles: Gauge::default(),
            inodes: Gauge::default(),
            notify_queue_depth: Gauge::default(),
            notify_duration: Histogram::new(latency_buckets()),
            mounted: Gauge::default(),
            storage_errors: Counter::default(),
            storage_failed: Gauge::default(),
            space_reserve_bytes: Gauge::default(),
            handoff_by_fuse_thread: handoffs.get_or_create_owned(&WriterLabel {
                writer: "fuse_thread",
            }),
            handoff_after_commit: handoffs.get_or_create_owned(&WriterLabel { writer: "commit" }),
            handoff_left_to_actor: handoffs.get_or_create_owned(&WriterLabel { writer: "actor" }),
        };
        let r = registry;
        r.register("requests", "FUSE requests answered, by operation", requests);
        r.register(
            "request_errors",
            "FUSE requests answered with an error, by operation and errno",
            m.errors.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time from receiving a FUSE request to answering it, by operation",
            Unit::Seconds,
            durations,
        );
        r.register(
            "requests_in_flight",
            "FUSE requests received and not yet answered",
            m.in_flight.clone(),
        );
        // spoolfs_actor_queue_depth is read at scrape time (a gauge set per request would
        // stay high on an idle daemon after a burst).
        r.register(
            "actor_queue_capacity",
            "Capacity of the actor's queue",
            m.queue_capacity.clone(),
        );
        r.register_with_unit(
            "actor_queue_wait",
            "Time a request waited in the actor's queue",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        r.register(
            "commits",
            "Commits, by durability (every commit is durable: a write-ahead log append or a redb commit)",
            commits,
        );
        r.register_with_unit(
            "commit_duration",
            "Time to commit one batch (durable commits include the fsync)",
            Unit::Seconds,
            m.commit_duration.clone(),
        );
        r.register(
            "commit_batch_size",
            "Requests applied per actor batch (taken from the queue together; a durable \
             commit may hold many batches)",
            m.batch_size.clone(),
        );
        r.register(
            "handoff_replies",
            "Replies to requests whose FUSE thread waited for the actor's answer, by who wrote \
             them: the FUSE thread (answer within --handoff-us), the commit task (answers \
             that wait for a commit: fsync, close) or the actor (slower answers)",
            handoffs,
        );
        r.register_with_unit(
            "memfd",
            "Bytes of file content staged in memfd buffers",
            Unit::Bytes,
            m.memfd_bytes.clone(),
        );
        r.register_with_unit(
            "memfd_dirty",
            "Bytes of staged content not yet persisted",
            Unit::Bytes,
            m.memfd_dirty_bytes.clone(),
        );
        r.register_with_unit(
            "memfd_budget",
            "Most bytes the memfd buffers may hold",
            Unit::Bytes,
            m.memfd_budget_bytes.clone(),
        );
        r.register(
            "open_handles",
            "Open file and directory handles",
            m.open_handles.clone(),
        );
        r.register("inodes", "Inodes stored in the database", m.inodes.clone());
        // spoolfs_db_size_bytes, spoolfs_data_dir_available_bytes and
        // spoolfs_fuse_waiting_requests are read at scrape time by the binary's collector.
        r.register(
            "notify_queue_depth",
            "Kernel invalidations waiting for the notify pool",
            m.notify_queue_depth.clone(),
        );
        r.register_with_unit(
            "notify_duration",
            "Time to send one kernel invalidation",
            Unit::Seconds,
            m.notify_duration.clone(),
        );
        r.register("mounted", "1 while the mount is live", m.mounted.clone());
        r.register(
            "storage_errors",
            "Storage failures: database reads, writes or commits that failed (their requests \
             are answered EIO, or ENOSPC if the disk was full)",
            m.storage_errors.clone(),
        );
        r.register(
            "storage_failed",
            "1 once a storage I/O error closed the database: every request is answered EIO \
             until the data dir is mounted again",
            m.storage_failed.clone(),
        );
        r.register_with_unit(
            "space_reserve",
            "Space kept free on the data dir's filesystem: operations that need space get \
             ENOSPC below it",
            Unit::Bytes,
            m.space_reserve_bytes.clone(),
        );
        r.register(
            "build",
            "spoolfs build information",
            Info::new(VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        m
    }

    pub fn op(&self, index: usize) -> Option<&OpMetrics> {
        self.per_op.get(index)
    }

    pub fn record_error(&self, op: &'static str, errno: &'static str) {
        self.errors.get_or_create(&ErrorLabels { op, errno }).inc();
    }
}

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Set a gauge from an unsigned count, saturating.
pub fn set(g: &Gauge, v: u64) {
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
}
