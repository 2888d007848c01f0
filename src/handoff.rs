//! Hands a request's answer back to the FUSE thread that read the request, when the actor
//! answers quickly, so the reply is written (and the caller woken) on that thread's CPU.
//!
//! Why: on a VM, waking a thread on another, idle vCPU costs an inter-processor interrupt and
//! a halt exit, ~25 µs on the 2-core test VM, while a wakeup on the same CPU costs ~2 µs.
//! Measured there: a trivial single-threaded FUSE filesystem answers a lookup in 4 µs when it
//! and its caller share a CPU and in 60 µs when they do not. The kernel wakes a FUSE thread
//! on (or near) the caller's CPU; if the actor, running elsewhere, wrote the reply, the caller
//! would be woken across CPUs on every request. So the FUSE thread waits a few microseconds
//! (spinning, yielding its CPU to anything runnable there, such as the actor) for the actor's
//! answer and writes the reply itself. Answers that take longer (a durable close waits for a
//! commit) are written by whoever produces them, as before; the FUSE thread goes back to
//! reading requests, so slow requests never hold it. The actor flags an answer that waits for
//! a commit (`Msg::later`), and the FUSE thread stops waiting at once: barriers (close, fsync)
//! are waited for too, and the close of a file whose changes are already durable (after an
//! fsync, or a read-only open) is answered on the caller's CPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Writes one reply to the kernel.
type Answer = Box<dyn FnOnce() + Send>;

enum State {
    /// The FUSE thread is still waiting: the answer is left for it.
    Waiting,
    Ready(Answer),
    /// The FUSE thread stopped waiting: the answer is written where it is produced.
    Gone,
}

/// The meeting point of one request's FUSE thread and its answer.
pub struct Handoff {
    ready: AtomicBool,
    /// Set by the actor: the answer waits for a commit.
    later: Arc<AtomicBool>,
    state: Mutex<State>,
}

impl Handoff {
    pub fn new() -> Arc<Self> {
        Arc::new(Handoff {
            ready: AtomicBool::new(false),
            later: Arc::new(AtomicBool::new(false)),
            state: Mutex::new(State::Waiting),
        })
    }

    /// The flag the actor sets when the answer waits for a commit (`Msg::later`).
    pub fn later_flag(&self) -> Arc<AtomicBool> {
        self.later.clone()
    }

    /// Called by whoever answers the request: leave the answer for the FUSE thread if it is
    /// still waiting, or write it now.
    pub fn deliver(&self, answer: Answer) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match *state {
            State::Waiting => {
                *state = State::Ready(answer);
                self.ready.store(true, Ordering::Release);
            }
            State::Ready(_) | State::Gone => {
                drop(state);
                answer();
            }
        }
    }

    /// Called by the FUSE thread after sending the request: wait up to `spin` for the answer
    /// (or until the actor says it waits for a commit) and write it here; after that, leave
    /// it to be written where it is produced. Returns who writes it.
    pub fn wait(&self, spin: Duration) -> Waited {
        let until = Instant::now() + spin;
        loop {
            if self.ready.load(Ordering::Acquire)
                || self.later.load(Ordering::Acquire)
                || Instant::now() >= until
            {
                break;
            }
            // Let the actor run if it shares this CPU; otherwise this returns at once.
            std::thread::yield_now();
        }
        let answer = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            match std::mem::replace(&mut *state, State::Gone) {
                State::Ready(answer) => Some(answer),
                State::Waiting | State::Gone => None,
            }
        };
        match answer {
            Some(answer) => {
                answer();
                Waited::WrittenHere
            }
            None if self.later.load(Ordering::Acquire) => Waited::AfterCommit,
            None => Waited::TooSlow,
        }
    }
}

/// Who writes a handed-off answer (`Handoff::wait`; the `handoff_replies` metric's label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waited {
    /// The FUSE thread that waited for it.
    WrittenHere,
    /// The answer waits for a commit: written by whoever finishes it (normally the commit
    /// task, once the log is synced).
    AfterCommit,
    /// It came after the wait: written by the actor.
    TooSlow,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn counting(count: &Arc<AtomicUsize>) -> Answer {
        let count = count.clone();
        Box::new(move || {
            count.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn an_answer_before_the_wait_is_written_by_the_waiter() {
        let written = Arc::new(AtomicUsize::new(0));
        let h = Handoff::new();
        h.deliver(counting(&written));
        assert_eq!(
            written.load(Ordering::SeqCst),
            0,
            "left for the FUSE thread"
        );
        assert_eq!(h.wait(Duration::ZERO), Waited::WrittenHere);
        assert_eq!(written.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_answer_after_the_wait_is_written_at_once() {
        let written = Arc::new(AtomicUsize::new(0));
        let h = Handoff::new();
        assert_eq!(h.wait(Duration::from_micros(10)), Waited::TooSlow);
        h.deliver(counting(&written));
        assert_eq!(written.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_answer_flagged_for_later_ends_the_wait_and_is_written_by_its_producer() {
        let written = Arc::new(AtomicUsize::new(0));
        let h = Handoff::new();
        let flag = h.later_flag();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let waiter = h.clone();
        // Waits up to an hour unless the flag ends the wait.
        std::thread::spawn(move || {
            let _ = done_tx.send(waiter.wait(Duration::from_secs(3600)));
        });
        flag.store(true, Ordering::Release);
        let written_by_waiter = done_rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|e| format!("the flag did not end the wait: {e}"));
        assert_eq!(written_by_waiter, Ok(Waited::AfterCommit));
        h.deliver(counting(&written));
        assert_eq!(written.load(Ordering::SeqCst), 1, "written by the producer");
    }

    #[test]
    fn every_answer_is_written_exactly_once_under_races() {
        let written = Arc::new(AtomicUsize::new(0));
        for i in 0..2000u64 {
            let h = Handoff::new();
            let h2 = h.clone();
            let answer = counting(&written);
            let t = std::thread::spawn(move || {
                if i % 3 == 0 {
                    std::thread::yield_now();
                }
                h2.deliver(answer);
            });
            let _ = h.wait(Duration::from_nanos(i % 7 * 500));
            t.join().expect("deliver thread");
        }
        assert_eq!(written.load(Ordering::SeqCst), 2000);
    }
}
