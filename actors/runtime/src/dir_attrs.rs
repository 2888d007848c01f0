//! Which directories' cached attributes the kernel must be told to drop after a change.
//!
//! The kernel marks a directory's cached attributes stale when its own mkdir, unlink or
//! rename there returns (the reply carries the new entry's attributes, not the directory's).
//! But an answer to a GETATTR or LOOKUP of that directory that the actor gave *before* the
//! change, and that the asking thread has not taken in yet, is still cached when it is: with
//! it the old link count and mtime, for the whole attribute TTL (a day). Seen in the
//! racing-renames test: a directory with one subdirectory and a link count of 2. A mail
//! reader that watches a directory's mtime for new mail would miss it. The kernel guards
//! against exactly this with a version per inode; its own mkdir does not bump the parent's,
//! `notify_inval_inode` does: once that is sent, an older answer that arrives later is thrown
//! away, and one that came earlier is dropped by it.
//!
//! A notify for every change cost ~10% of single-writer enqueue and mknod rates on the
//! 2-core VM (the notify thread competes for a CPU). Most changes need none: a thread takes
//! in an answer before it sends its next synchronous request, so an answer to thread T is
//! harmless once T has asked anything else. `DirAttrs` keeps, per directory, the answers
//! that carried its attributes and are not known to be taken in, and asks the notify pool to
//! invalidate a changed directory only when one is left (in practice: when another thread
//! looked at it meanwhile).

use std::collections::HashMap;

use spoolfs_core::{Errno, Ino, Kind};
use tracing::warn;

use crate::msg::{Op, Reply};
use crate::notify::Invalidation;

/// Most directories (and calling threads) tracked; past it the directories still at risk
/// are invalidated at once and the tables start afresh (a tree walk by a process that then
/// exits leaves answers nobody will confirm). Below the notify queue's capacity.
const MAX_TRACKED: usize = 1024;

pub struct DirAttrs {
    /// The notify pool's queue; `None`: no kernel to tell (tests of the actor alone).
    tx: Option<flume::Sender<Invalidation>>,
    /// Number of the request being applied.
    seq: u64,
    /// Per calling thread: the number of its latest synchronous request.
    last_request: HashMap<u32, u64>,
    /// Per directory: (thread, request) of the answers that carried its attributes and may
    /// not have been taken in yet.
    unconfirmed: HashMap<Ino, Vec<(u32, u64)>>,
    /// Directories to invalidate when the batch ends.
    changed: Vec<Ino>,
    /// Whether a full notify queue has been reported (once: the pool cannot keep up).
    warned: bool,
}

impl DirAttrs {
    pub fn new(tx: Option<flume::Sender<Invalidation>>) -> Self {
        DirAttrs {
            tx,
            seq: 0,
            last_request: HashMap::new(),
            unconfirmed: HashMap::new(),
            changed: Vec::new(),
            warned: false,
        }
    }

    /// A request from thread `tid` is about to be applied.
    pub fn request(&mut self, tid: u32, op: &Op) {
        if self.tx.is_none() {
            return;
        }
        self.seq += 1;
        // Thread 0: the caller is outside the mount's pid namespace; its requests tell
        // nothing about which thread took what in.
        // A request the thread may have sent in the background proves nothing either.
        if tid != 0 && !op.may_be_sent_in_background() {
            self.last_request.insert(tid, self.seq);
            if self.last_request.len() > MAX_TRACKED {
                self.start_afresh();
            }
        }
    }

    /// The request's outcome: the directories it changed, and the directory whose
    /// attributes its answer carries.
    pub fn applied(&mut self, tid: u32, op: &Op, result: &Result<Reply, Errno>) {
        if self.tx.is_none() {
            return;
        }
        let Ok(reply) = result else { return };
        for dir in op.changed_dirs().into_iter().flatten() {
            if self.at_risk(dir) {
                self.changed.push(dir);
            }
        }
        if let Reply::Entry(i) | Reply::Attr(i) | Reply::Created(i, _) = reply {
            if i.kind == Kind::Dir {
                self.answered(tid, i.ino);
            }
        }
    }

    /// Queue the batch's invalidations (one per directory), never waiting for the pool.
    pub fn send(&mut self) {
        let Some(tx) = &self.tx else { return };
        self.changed.sort_unstable();
        self.changed.dedup();
        for ino in self.changed.drain(..) {
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

    fn taken_in(&self, (tid, seq): (u32, u64)) -> bool {
        tid != 0 && self.last_request.get(&tid).is_some_and(|&last| last > seq)
    }

    /// Whether an answer carrying `dir`'s attributes may still be on its way. Forgets them
    /// either way: after the invalidation the kernel throws them away.
    fn at_risk(&mut self, dir: Ino) -> bool {
        self.unconfirmed
            .remove(&dir)
            .is_some_and(|answers| answers.into_iter().any(|a| !self.taken_in(a)))
    }

    fn answered(&mut self, tid: u32, dir: Ino) {
        let seq = self.seq;
        let mut answers = self.unconfirmed.remove(&dir).unwrap_or_default();
        // A newer answer to the same thread means it took the older one in.
        answers.retain(|&(t, s)| t != tid && !self.taken_in((t, s)));
        answers.push((tid, seq));
        self.unconfirmed.insert(dir, answers);
        if self.unconfirmed.len() > MAX_TRACKED {
            self.start_afresh();
        }
    }

    /// Invalidate every directory with an answer not known to be taken in, and forget all.
    fn start_afresh(&mut self) {
        let unconfirmed = std::mem::take(&mut self.unconfirmed);
        for (dir, answers) in unconfirmed {
            if answers.into_iter().any(|a| !self.taken_in(a)) {
                self.changed.push(dir);
            }
        }
        self.last_request.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spoolfs_core::{Inode, Timestamp};

    fn mkdir(parent: u64) -> Op {
        Op::MkDir {
            parent: Ino(parent),
            name: b"d".to_vec(),
            mode: 0o755,
        }
    }

    fn getattr(ino: u64) -> Op {
        Op::GetAttr { ino: Ino(ino) }
    }

    fn dir(ino: u64) -> Result<Reply, Errno> {
        Ok(Reply::Attr(Inode::new(
            Ino(ino),
            Kind::Dir,
            0o755,
            (0, 0),
            Timestamp::default(),
            Ino(1),
        )))
    }

    /// Apply `op` from `tid` answering `result`, as the actor does.
    fn apply(d: &mut DirAttrs, tid: u32, op: Op, result: Result<Reply, Errno>) {
        d.request(tid, &op);
        d.applied(tid, &op, &result);
    }

    fn sent(d: &mut DirAttrs, rx: &flume::Receiver<Invalidation>) -> Vec<u64> {
        d.send();
        rx.try_iter()
            .map(|i| match i {
                Invalidation::Attributes { ino } => ino.0,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_change_is_invalidated_only_while_another_threads_answer_may_be_on_its_way() {
        let (tx, rx) = flume::bounded(64);
        let mut d = DirAttrs::new(Some(tx));
        // One thread looks at directory 5, then changes it: it took its answer in.
        apply(&mut d, 100, getattr(5), dir(5));
        apply(&mut d, 100, mkdir(5), Ok(Reply::Empty));
        assert_eq!(sent(&mut d, &rx), Vec::<u64>::new());
        // Another thread's answer, not yet followed by any request of its: at risk.
        apply(&mut d, 200, getattr(5), dir(5));
        apply(&mut d, 100, mkdir(5), Ok(Reply::Empty));
        assert_eq!(sent(&mut d, &rx), [5]);
        // Once invalidated, that answer is harmless: the next change needs nothing.
        apply(&mut d, 100, mkdir(5), Ok(Reply::Empty));
        assert_eq!(sent(&mut d, &rx), Vec::<u64>::new());
        // The other thread moved on (a synchronous request): its answer was taken in.
        apply(&mut d, 200, getattr(5), dir(5));
        apply(&mut d, 200, getattr(9), dir(9));
        apply(&mut d, 100, mkdir(5), Ok(Reply::Empty));
        assert_eq!(sent(&mut d, &rx), Vec::<u64>::new());
        // A read or release may be sent after the thread moved on: it proves nothing.
        apply(&mut d, 200, getattr(5), dir(5));
        apply(
            &mut d,
            200,
            Op::Release {
                ino: Ino(9),
                fh: spoolfs_core::Fh(1),
            },
            Ok(Reply::Empty),
        );
        apply(&mut d, 100, mkdir(5), Ok(Reply::Empty));
        assert_eq!(sent(&mut d, &rx), [5]);
        // Thread 0 (outside the pid namespace) never proves anything.
        apply(&mut d, 0, getattr(5), dir(5));
        apply(&mut d, 0, getattr(6), dir(6));
        apply(&mut d, 100, mkdir(5), Ok(Reply::Empty));
        assert_eq!(sent(&mut d, &rx), [5]);
    }

    #[test]
    fn a_rename_invalidates_both_directories_once_and_failures_nothing() {
        let (tx, rx) = flume::bounded(64);
        let mut d = DirAttrs::new(Some(tx));
        // Two threads looked, one at each directory (a thread's second look would have
        // confirmed its first).
        for (tid, ino) in [(200, 1), (201, 7)] {
            apply(&mut d, tid, getattr(ino), dir(ino));
        }
        let rename = |from: u64, to: u64| Op::Rename {
            parent: Ino(from),
            name: b"a".to_vec(),
            new_parent: Ino(to),
            new_name: b"b".to_vec(),
            flags: Default::default(),
        };
        apply(&mut d, 100, rename(1, 7), Err(Errno::ENOENT));
        assert_eq!(sent(&mut d, &rx), Vec::<u64>::new());
        apply(&mut d, 100, rename(1, 7), Ok(Reply::Empty));
        apply(&mut d, 100, rename(7, 1), Ok(Reply::Empty));
        assert_eq!(sent(&mut d, &rx), [1, 7]);
    }

    #[test]
    fn answers_nobody_confirms_stay_bounded_and_are_invalidated_when_dropped() {
        let (tx, rx) = flume::bounded(4 * MAX_TRACKED);
        let mut d = DirAttrs::new(Some(tx));
        // A tree walk by threads that then exit: nobody confirms these answers.
        for ino in 0..3 * MAX_TRACKED as u64 {
            apply(&mut d, 1000 + ino as u32, getattr(ino), dir(ino));
        }
        assert!(d.unconfirmed.len() <= MAX_TRACKED);
        assert!(d.last_request.len() <= MAX_TRACKED + 1);
        let dropped = sent(&mut d, &rx);
        assert!(dropped.len() >= MAX_TRACKED, "{}", dropped.len());
        // Every directory is either still tracked or was invalidated when it was dropped.
        for ino in 0..3 * MAX_TRACKED as u64 {
            assert!(d.unconfirmed.contains_key(&Ino(ino)) || dropped.contains(&ino));
        }
    }

    #[test]
    fn a_full_queue_never_waits() {
        let (tx, rx) = flume::bounded(2);
        let mut d = DirAttrs::new(Some(tx));
        for ino in 10..20 {
            apply(&mut d, 200, getattr(ino), dir(ino));
            apply(&mut d, 100, mkdir(ino), Ok(Reply::Empty));
        }
        d.send();
        assert_eq!(rx.len(), 2);
        assert!(d.changed.is_empty());
    }
}
