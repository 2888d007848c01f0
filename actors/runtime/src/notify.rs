//! The notify pool: kernel cache invalidations sent from dedicated threads.
//!
//! A `notify_*` call writes to /dev/fuse and can wait on the kernel, which may itself be
//! waiting for a reply from us: made from the actor or a FUSE thread it can deadlock the mount.
//! So invalidations are queued here (bounded, never blocking the sender) and sent by threads
//! that do nothing else.

use std::sync::Arc;

use spoolfs_core::Ino;
use tracing::{debug, warn};

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
}

/// What the adapter provides to send notifications (the runtime does not name fuser).
pub trait KernelNotifier: Send + Sync + 'static {
    fn notify(&self, inv: &Invalidation) -> std::io::Result<()>;
}

pub struct NotifyPool {
    tx: flume::Sender<Invalidation>,
}

impl NotifyPool {
    pub fn start(
        notifier: Arc<dyn KernelNotifier>,
        threads: usize,
        capacity: usize,
    ) -> std::io::Result<Self> {
        let (tx, rx) = flume::bounded::<Invalidation>(capacity);
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let notifier = notifier.clone();
            std::thread::Builder::new()
                .name(format!("spoolfs-notify-{i}"))
                .spawn(move || {
                    for inv in rx.iter() {
                        match notifier.notify(&inv) {
                            Ok(()) => debug!(?inv, "invalidation sent"),
                            // ENOENT: the kernel no longer caches it, which is what we wanted.
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                            Err(e) => warn!(?inv, error = %e, "invalidation failed"),
                        }
                    }
                })?;
        }
        Ok(NotifyPool { tx })
    }

    /// Queue an invalidation without blocking. When the queue is full the caller learns it
    /// (and should fall back to short cache lifetimes); nothing waits on the kernel here.
    pub fn send(&self, inv: Invalidation) -> bool {
        self.tx.try_send(inv).is_ok()
    }

    pub fn queue_depth(&self) -> usize {
        self.tx.len()
    }
}
