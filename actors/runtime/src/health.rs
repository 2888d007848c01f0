//! Storage failures: what the daemon does when the disk under the data dir fails.
//!
//! redb latches the first I/O error of a database (a failed read, write, `set_len` or fsync):
//! every later transaction fails with `PreviousIo` until the database is reopened. Reopening
//! inside the running daemon is not safe: redb would come back at its last durable commit,
//! while the actor's in-memory state (open handles, staged memfd content, lookup counts the
//! kernel holds, inode numbers already handed out) has moved past it, and the kernel's caches
//! with it. So the daemon fails stop, the way ext4 with `errors=remount-ro` or XFS after a
//! metadata I/O error do:
//!
//! - the request(s) whose storage operation failed are answered EIO (ENOSPC if the error was
//!   "no space left on device": a full disk the space guard could not see coming);
//! - from then on every request is answered EIO at once, without touching the database (no
//!   log line per request, no retries against a disk that just failed); `/readyz` fails and
//!   `spoolfs status` reports the failed state and its cause;
//! - the error is counted (`spoolfs_storage_errors_total`), `spoolfs_storage_failed` is 1, and
//!   one error line names the data dir, the error and what to do;
//! - the daemon stays up (the mountpoint answers EIO, not ENOTCONN, so the mail server defers
//!   cleanly) until it is unmounted; mounting again reopens the database at its last durable
//!   commit: everything closed or fsynced before the failure is there.
//!
//! A storage failure that does not close the database (a record that does not decode, a memfd
//! that cannot grow) only rolls back its batch, as before: the errno goes to the requests of
//! that batch and the daemon carries on. Whether the database is closed is asked of redb itself
//! (`begin_write` fails once it has latched an error), not guessed from the message.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use redb::Database;
use spoolfs_core::Errno;
use tracing::{debug, error};

use crate::metrics::Metrics;
use crate::msg::{Msg, Op, Reply};

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

    /// Enter the failed state; false if it already was.
    fn fail(&self, reason: String) -> bool {
        match self.reason.lock() {
            Ok(mut r) => {
                r.get_or_insert(reason);
            }
            Err(poisoned) => {
                poisoned.into_inner().get_or_insert(reason);
            }
        }
        !self.failed.swap(true, Ordering::AcqRel)
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

/// The actor's side: counts, logs and latches storage failures.
pub struct Faults {
    health: Arc<StorageHealth>,
    metrics: Arc<Metrics>,
    data_dir: PathBuf,
}

impl Faults {
    pub fn new(health: Arc<StorageHealth>, metrics: Arc<Metrics>, data_dir: PathBuf) -> Self {
        Faults {
            health,
            metrics,
            data_dir,
        }
    }

    pub fn is_failed(&self) -> bool {
        self.health.is_failed()
    }

    /// A storage operation (`what`) failed with `error`. Counts it, decides the errno for the
    /// requests it concerns, and enters the failed state if redb has closed the database.
    ///
    /// `db` is asked with `begin_write`: the caller must hold no write transaction (the failed
    /// one aborted or consumed by its commit), or this would wait for it.
    pub fn record(&self, db: &Database, what: &str, error: &dyn std::fmt::Display) -> Errno {
        self.metrics.storage_errors.inc();
        let message = error.to_string();
        let errno = errno_for(&message);
        let closed = match db.begin_write() {
            Ok(txn) => {
                drop(txn);
                false
            }
            Err(_) => true,
        };
        let data_dir = self.data_dir.display();
        if !closed {
            error!(%data_dir, what, error = %message, errno = errno.name(),
                "storage failure: the batch is rolled back and its requests answered with the \
                 errno; the database is still usable");
            return errno;
        }
        if !self.health.fail(format!("{what}: {message}")) {
            debug!(%data_dir, what, error = %message, "storage failure (database already closed)");
            return errno;
        }
        self.metrics.storage_failed.set(1);
        let hint = if errno == Errno::ENOSPC {
            "the data dir's filesystem is full: free space on it (df -h), then unmount and mount \
             again"
        } else {
            "check the disk (dmesg, smartctl) and the data dir's filesystem, then unmount and \
             mount again"
        };
        error!(%data_dir, what, error = %message, errno = errno.name(), hint,
            "storage I/O error: the database is closed for writing (redb does not continue \
             after an I/O error) and every request is answered EIO until the data dir is \
             mounted again; what was closed or fsynced before is safe on disk");
        errno
    }

    /// In the failed state: answer a batch without touching storage. Requests that release
    /// something succeed (the kernel ignores their errors anyway, and there is nothing to keep
    /// consistent any more); everything else is EIO.
    pub fn refuse(&self, batch: Vec<Msg>) {
        for m in batch {
            let r = match m.op {
                Op::Forget { .. } | Op::Release { .. } | Op::ReleaseDir { .. } => Ok(Reply::Empty),
                _ => Err(Errno::EIO),
            };
            (m.reply)(r);
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
    fn the_first_failure_latches_and_keeps_its_reason() {
        let h = StorageHealth::default();
        assert!(!h.is_failed());
        assert_eq!(h.reason(), None);
        assert!(h.fail("commit: boom".into()));
        assert!(!h.fail("later".into()));
        assert!(h.is_failed());
        assert_eq!(h.reason().as_deref(), Some("commit: boom"));
    }
}
