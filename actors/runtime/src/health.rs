//! Storage failures: what the daemon does when the disk under the data dir fails.
//!
//! redb latches the first I/O error of a database (a failed read, write, `set_len` or fsync):
//! every later transaction fails with `PreviousIo` until the database is reopened. spoolfs can
//! reopen it in place, because nothing the actor shows is only in redb's memory: every commit
//! is durable (in the write-ahead log or in redb) before it counts, and a failed commit's
//! changes stay pending in the actor (see `actor.rs`). So on a failed commit:
//!
//! - the requests waiting for that commit are answered EIO (ENOSPC if the error was "no
//!   space left on device": a disk filled from outside, faster than the space guard saw);
//! - the error is counted (`spoolfs_storage_errors_total`), `spoolfs_storage_failed` is 1,
//!   `/readyz` fails and `spoolfs status` reports the cause, and one error line names the data
//!   dir, the error and what to do;
//! - the actor closes the database, and every 500 ms tries to reopen it (replaying the log)
//!   and retry the commit; meanwhile every request is answered EIO at once (the mountpoint
//!   answers EIO, not ENOTCONN, so a mail server defers cleanly);
//! - once the disk works again (space freed, a transient error gone), the reopen and the retry
//!   succeed, the failed state clears with one info line, and nothing answered is lost. If it
//!   never does, unmounting and mounting again resumes at the last durable commit.
//!
//! A storage failure that does not close the database (a record that does not decode, a memfd
//! that cannot grow) only rolls back its batch: the errno goes to the requests of that batch
//! and the daemon carries on.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use spoolfs_core::Errno;
use spoolfs_store::CommitFailure;
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;
use crate::msg::Msg;

/// Whether the database is closed after a storage I/O error; shared with the binary (for
/// `/readyz` and `spoolfs status`).
#[derive(Debug, Default)]
pub struct StorageHealth {
    failed: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl StorageHealth {
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// What failed, for the operator (`None` while healthy).
    pub fn reason(&self) -> Option<String> {
        match self.reason.lock() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_reason(&self, reason: Option<String>) {
        match self.reason.lock() {
            Ok(mut r) => *r = reason,
            Err(poisoned) => *poisoned.into_inner() = reason,
        }
    }

    /// Enter the failed state; false if it already was (the first reason is kept).
    fn fail(&self, reason: String) -> bool {
        let first = !self.failed.swap(true, Ordering::AcqRel);
        if first {
            self.set_reason(Some(reason));
        }
        first
    }

    /// Leave the failed state; false if it was not failed.
    fn recover(&self) -> bool {
        let was = self.failed.swap(false, Ordering::AcqRel);
        self.set_reason(None);
        was
    }
}

/// The errno for a storage error message: ENOSPC when the operating system said the disk (or
/// quota) is full, EIO for everything else. The messages end in std's rendering of an OS
/// error, `... (os error N)`, which is all that survives of the error's kind once the store
/// has turned it into text.
pub fn errno_for(message: &str) -> Errno {
    let code = message.rfind("(os error ").and_then(|at| {
        let rest = &message[at + "(os error ".len()..];
        rest.split(')').next()?.parse::<i32>().ok()
    });
    match code {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Errno::ENOSPC,
        _ => Errno::EIO,
    }
}

/// Least time between two warnings that the database still cannot be reopened.
const REOPEN_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// The actor's side: counts and logs storage failures and keeps the shared health state.
pub struct Faults {
    health: Arc<StorageHealth>,
    metrics: Arc<Metrics>,
    data_dir: PathBuf,
    last_reopen_warning: Option<Instant>,
}

impl Faults {
    pub fn new(health: Arc<StorageHealth>, metrics: Arc<Metrics>, data_dir: PathBuf) -> Self {
        Faults {
            health,
            metrics,
            data_dir,
            last_reopen_warning: None,
        }
    }

    /// A commit failed and the database is closed: count it, enter the failed state (one
    /// error line per episode) and return the errno for the requests that waited for it.
    pub fn commit_failed(&mut self, failure: &CommitFailure) -> Errno {
        self.metrics.storage_errors.inc();
        let errno = if failure.no_space || errno_for(&failure.message) == Errno::ENOSPC {
            Errno::ENOSPC
        } else {
            Errno::EIO
        };
        let data_dir = self.data_dir.display();
        if !self.health.fail(format!("commit: {failure}")) {
            debug!(%data_dir, error = %failure, "commit failed again");
            return errno;
        }
        self.metrics.storage_failed.set(1);
        let hint = if errno == Errno::ENOSPC {
            "the data dir's filesystem is full: free space on it (df -h); spoolfs resumes by \
             itself once there is room"
        } else {
            "check the disk (dmesg, smartctl) and the data dir's filesystem; spoolfs resumes by \
             itself if the error goes away, else unmount and mount again"
        };
        error!(%data_dir, error = %failure, errno = errno.name(), hint,
            "storage I/O error: callers waiting for durability get the error; the changes stay \
             pending while the database is reopened and the commit retried; until then every \
             request is answered EIO. What was closed or fsynced before is safe on disk");
        errno
    }

    /// Reopening the database failed (it is retried): logged at most once a minute, and not
    /// counted again (`spoolfs_storage_failed` shows the outage lasts).
    pub fn reopen_failed(&mut self, error: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self
            .last_reopen_warning
            .is_none_or(|t| now.duration_since(t) >= REOPEN_WARN_INTERVAL)
        {
            self.last_reopen_warning = Some(now);
            warn!(data_dir = %self.data_dir.display(), %error,
                "cannot reopen the database yet; retrying every 500 ms, requests get EIO");
        } else {
            debug!(data_dir = %self.data_dir.display(), %error, "reopen failed");
        }
    }

    /// The database is open again and a commit went through: leave the failed state.
    pub fn recovered(&mut self) {
        self.last_reopen_warning = None;
        if self.health.recover() {
            self.metrics.storage_failed.set(0);
            info!(data_dir = %self.data_dir.display(),
                "storage recovered: the database is reopened and pending changes are committed");
        }
    }

    /// A storage read failed inside a batch, which is rolled back.
    pub fn batch_failed(&mut self, error: &dyn std::fmt::Display) {
        self.metrics.storage_errors.inc();
        error!(data_dir = %self.data_dir.display(), %error,
            "storage failure: the batch is rolled back and answered EIO");
    }

    /// While the database is closed: answer EIO without touching storage. (Releases and
    /// forgets are not refused: the actor answers them and applies them after the reopen.)
    pub fn refuse(&self, batch: Vec<Msg>) {
        for m in batch {
            (m.reply)(Err(Errno::EIO));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_map_to_their_errno() {
        assert_eq!(
            errno_for("commit: I/O error: No space left on device (os error 28)"),
            Errno::ENOSPC
        );
        assert_eq!(
            errno_for("Disk quota exceeded (os error 122)"),
            Errno::ENOSPC
        );
        assert_eq!(
            errno_for("write chunk: I/O error: Input/output error (os error 5)"),
            Errno::EIO
        );
        assert_eq!(
            errno_for("Previous I/O error occurred. Please close and re-open the database."),
            Errno::EIO
        );
        assert_eq!(errno_for("(os error "), Errno::EIO);
        assert_eq!(errno_for("(os error x)"), Errno::EIO);
    }

    #[test]
    fn the_first_failure_latches_its_reason_until_recovery() {
        let h = StorageHealth::default();
        assert!(!h.is_failed());
        assert_eq!(h.reason(), None);
        assert!(h.fail("commit: boom".into()));
        assert!(!h.fail("later".into()));
        assert!(h.is_failed());
        assert_eq!(h.reason().as_deref(), Some("commit: boom"));
        assert!(h.recover());
        assert!(!h.is_failed());
        assert_eq!(h.reason(), None);
        assert!(!h.recover());
    }
}
