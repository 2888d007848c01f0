//! The one blocking task that runs the durable commits.
//!
//! Commits run one at a time (the actor starts the next only once the last has returned), so
//! one long-lived task on tokio's blocking pool is enough, and the daemon's thread count stays
//! fixed. Starting each commit with its own `spawn_blocking` made tokio start a new thread
//! whenever the previous commit's thread had not parked yet (it answers the actor first, and
//! the actor may seal the next commit before that thread is idle again). Such threads never
//! aged out, since commits kept reusing them within tokio's 10 s keep-alive, and each brought
//! the allocator's per-thread caches with it: in one 10-minute soak the daemon went from 9 to
//! 14 threads at once and its anonymous memory stepped up by ~40 MiB for good.

use tokio::runtime::Handle;

/// One commit: a closure that runs it to the end and reports to the actor itself.
pub type CommitTask = Box<dyn FnOnce() + Send>;

pub struct Committer {
    /// Feeds the commit task. Unbounded, yet never more than one commit waits in it: the
    /// actor starts no commit while one is in flight, so it never blocks here. Dropping it
    /// (with the actor) ends the task.
    tasks: flume::Sender<CommitTask>,
}

impl Committer {
    /// Start the commit task on `runtime`'s blocking pool.
    pub fn new(runtime: &Handle) -> Self {
        let (tasks, rx) = flume::unbounded::<CommitTask>();
        runtime.spawn_blocking(move || {
            for task in rx.iter() {
                task();
            }
        });
        Committer { tasks }
    }

    /// Run `task` on the commit task.
    pub fn run(&self, task: CommitTask) {
        if let Err(flume::SendError(task)) = self.tasks.send(task) {
            // The task is gone. Each commit catches its own panics, so only a runtime that
            // shut down takes it away: run the commit here rather than leave it and its
            // waiters unanswered.
            task();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::mpsc;

    /// Every commit runs, in order, and all on the same thread, however quickly the commits
    /// follow one another (like the actor's: the next starts as soon as the last reported).
    #[test]
    fn commits_run_in_order_on_one_thread() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("a test runtime");
        let committer = Committer::new(runtime.handle());
        let mut threads = HashSet::new();
        for i in 0..1000 {
            let (tx, rx) = mpsc::channel();
            committer.run(Box::new(move || {
                let _ = tx.send((i, std::thread::current().id()));
            }));
            let (n, id) = rx.recv().expect("the commit reports");
            assert_eq!(n, i);
            threads.insert(id);
        }
        assert_eq!(threads.len(), 1, "commits ran on {} threads", threads.len());
    }
}
