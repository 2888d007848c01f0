//! The notify pool: kernel cache invalidations sent from dedicated threads.
//!
//! A `notify_*` call writes to /dev/fuse and can wait on the kernel, which may itself be
//! waiting for a reply from us: made from the actor or a FUSE thread it can deadlock the mount.
//! So invalidations are queued here (bounded, never blocking the sender) and sent by threads
//! that do nothing else.

use std::sync::Arc;

use spoolfs_core::Ino;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// One cache invalidation for the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Forget the kernel's entry `name` in `parent` (a remote create/unlink/rename).
    Entry { parent: Ino, name: Vec<u8> },
    /// The entry was deleted and pointed at `child`.
    Delete {
        parent: Ino,
        child: Ino,
        name: Vec<u8>,
    },
    /// Drop cached attributes and pages of `ino`.
    Inode { ino: Ino },
    /// Drop the cached attributes of `ino`, and with them any answer still on its way that
    /// was read before this (the kernel versions attributes: see `ChangedDirs`).
    Attributes { ino: Ino },
}

/// What the adapter provides to send notifications (the runtime does not name fuser).
pub trait KernelNotifier: Send + Sync + 'static {
    fn notify(&self, inv: &Invalidation) -> std::io::Result<()>;
}

/// The notify pool's threads. Its queue is made first (`channel`), so that the actor can hold
/// the sender before the mount exists; the threads start once the session can notify.
pub struct NotifyPool;

impl NotifyPool {
    /// The pool's queue: bounded, so that a stalled kernel cannot grow it without limit.
    pub fn channel(
        capacity: usize,
    ) -> (flume::Sender<Invalidation>, flume::Receiver<Invalidation>) {
        flume::bounded(capacity)
    }

    pub fn start(
        notifier: Arc<dyn KernelNotifier>,
        threads: usize,
        rx: flume::Receiver<Invalidation>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let notifier = notifier.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("spoolfs-notify-{i}"))
                .spawn(move || {
                    for inv in rx.iter() {
                        let started = std::time::Instant::now();
                        let result = notifier.notify(&inv);
                        metrics
                            .notify_duration
                            .observe(started.elapsed().as_secs_f64());
                        crate::metrics::set(&metrics.notify_queue_depth, rx.len() as u64);
                        match result {
                            Ok(()) => debug!(?inv, "invalidation sent"),
                            // ENOENT: the kernel no longer caches it, which is what we wanted.
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                            Err(e) => warn!(?inv, error = %e, "invalidation failed"),
                        }
                    }
                })?;
        }
        Ok(NotifyPool)
    }
}

/// The directories a batch changed, whose cached attributes the kernel must drop.
///
/// The kernel marks a directory's cached attributes stale when its own mkdir, unlink or
/// rename there returns, but an answer to a GETATTR or LOOKUP of that directory that the
/// actor sent *before* the change, and that the asking thread has not yet taken in, is still
/// cached when it is: with it the old link count and mtime, for the whole attribute TTL (a
/// day). Seen in the racing-renames test, a directory with one subdirectory and a link count
/// of 2; a mail reader that watches a directory's mtime for new mail would miss it. The
/// kernel guards against exactly this with a version per inode, which its mkdir does not
/// bump for the parent and `notify_inval_inode` does: sent once the change is applied, an
/// older answer that arrives later is thrown away, and one that came earlier is dropped by it.
/// One invalidation per directory per batch, queued before the batch's replies.
pub struct ChangedDirs {
    tx: Option<flume::Sender<Invalidation>>,
    dirs: Vec<Ino>,
    /// Whether a full queue has been reported (once: it means the pool cannot keep up).
    warned: bool,
}

impl ChangedDirs {
    /// `None`: no kernel to tell (tests of the actor alone).
    pub fn new(tx: Option<flume::Sender<Invalidation>>) -> Self {
        ChangedDirs {
            tx,
            dirs: Vec::new(),
            warned: false,
        }
    }

    /// Note the directories a successful operation changed.
    pub fn note(&mut self, op: &crate::msg::Op) {
        if self.tx.is_some() {
            self.dirs.extend(op.changed_dirs().into_iter().flatten());
        }
    }

    /// Queue one invalidation per noted directory, without ever waiting for the pool.
    pub fn send(&mut self) {
        let Some(tx) = &self.tx else { return };
        self.dirs.sort_unstable();
        self.dirs.dedup();
        for ino in self.dirs.drain(..) {
            match tx.try_send(Invalidation::Attributes { ino }) {
                Ok(()) => {}
                Err(flume::TrySendError::Full(_)) if !self.warned => {
                    self.warned = true;
                    warn!(
                        "the notify queue is full: a directory's link count or mtime may \
                         show an old value until it next changes (the kernel is slow to \
                         take invalidations)"
                    );
                }
                // Full again (reported once), or the pool is gone (no mount left to tell).
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what it was asked to send and from which thread.
    struct Recorder(flume::Sender<(Invalidation, std::thread::ThreadId)>);

    impl KernelNotifier for Recorder {
        fn notify(&self, inv: &Invalidation) -> std::io::Result<()> {
            let _ = self.0.send((inv.clone(), std::thread::current().id()));
            Ok(())
        }
    }

    #[test]
    fn invalidations_are_sent_from_pool_threads_in_order() -> Result<(), Box<dyn std::error::Error>>
    {
        let (tx, rx) = flume::unbounded();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let (queue, rx_pool) = NotifyPool::channel(16);
        NotifyPool::start(Arc::new(Recorder(tx)), 1, rx_pool, metrics.clone())?;
        let sent = vec![
            Invalidation::Inode { ino: Ino(5) },
            Invalidation::Entry {
                parent: Ino(1),
                name: b"a".to_vec(),
            },
            Invalidation::Delete {
                parent: Ino(1),
                child: Ino(7),
                name: b"b".to_vec(),
            },
        ];
        for inv in &sent {
            queue.try_send(inv.clone())?;
        }
        let me = std::thread::current().id();
        for want in sent {
            let (got, thread) = rx.recv_timeout(std::time::Duration::from_secs(5))?;
            assert_eq!(got, want);
            assert_ne!(thread, me, "sent from the caller's thread");
        }
        Ok(())
    }

    fn mkdir(parent: u64) -> crate::msg::Op {
        crate::msg::Op::MkDir {
            parent: Ino(parent),
            name: b"d".to_vec(),
            mode: 0o755,
        }
    }

    #[test]
    fn each_changed_directory_is_invalidated_once_per_batch_and_a_full_queue_never_waits() {
        let (tx, rx) = flume::bounded(2);
        let mut dirs = ChangedDirs::new(Some(tx));
        dirs.note(&mkdir(1));
        dirs.note(&crate::msg::Op::Rename {
            parent: Ino(1),
            name: b"a".to_vec(),
            new_parent: Ino(7),
            new_name: b"b".to_vec(),
            flags: Default::default(),
        });
        dirs.note(&crate::msg::Op::GetAttr { ino: Ino(9) });
        dirs.send();
        let sent: Vec<Invalidation> = rx.try_iter().collect();
        assert_eq!(
            sent,
            [
                Invalidation::Attributes { ino: Ino(1) },
                Invalidation::Attributes { ino: Ino(7) }
            ]
        );
        // A full queue: the batch goes on (the directories stay stale, and it is logged).
        for parent in 10..20 {
            dirs.note(&mkdir(parent));
        }
        dirs.send();
        assert_eq!(rx.len(), 2);
        assert!(dirs.dirs.is_empty());
    }
}
