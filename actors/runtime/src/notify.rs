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
    /// was read before this (the kernel versions attributes: see `dir_attrs`).
    Attributes { ino: Ino },
}

/// What the adapter provides to send notifications (the runtime does not name fuser).
pub trait KernelNotifier: Send + Sync + 'static {
    fn notify(&self, inv: &Invalidation) -> std::io::Result<()>;
}

/// The notify pool's threads. Its queue is made first (`channel`), so that the actor can hold
/// the sender before the mount exists; the threads start once the session can notify, and
/// end when every sender is gone.
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
    ) -> std::io::Result<()> {
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
        Ok(())
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
}
