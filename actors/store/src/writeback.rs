//! Starts the disk on a big commit's pages while redb is still writing them.
//!
//! A commit of bulk content (the `direct` path of the log, 16 MiB at a time while a big file
//! is written) copies every page into the page cache and then waits in fsync for the disk
//! to write them all: the copy and the disk take turns, and each idles while the other works.
//! While such a commit runs, a helper thread asks the kernel every millisecond to start
//! writing whatever is dirty in the database file (`sync_file_range(SYNC_FILE_RANGE_WRITE)`:
//! it starts I/O and waits for nothing), so the disk writes the first pages while redb copies
//! the later ones and the fsync finds little left to do. It is a hint only: durability still
//! comes from redb's own fsync.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How often the helper starts writeback while a commit runs.
const PERIOD: Duration = Duration::from_millis(1);

#[derive(Debug, Default)]
struct State {
    /// A commit is running.
    active: bool,
    /// The owner is gone: the helper ends.
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is two flags, valid whatever a panicking holder left behind.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

/// The helper thread, owned by the log; it ends when this is dropped.
#[derive(Debug)]
pub struct Writeback {
    shared: Arc<Shared>,
}

impl Writeback {
    /// Start the helper for `file` (any descriptor of the database file: writeback is per
    /// inode).
    pub fn start(file: File) -> std::io::Result<Writeback> {
        let shared = Arc::new(Shared::default());
        let theirs = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("spoolfs-writeback".into())
            .spawn(move || run(&theirs, &file))?;
        Ok(Writeback { shared })
    }

    /// Start writeback every `PERIOD` until the returned guard is dropped (at the end of the
    /// commit, however it ends).
    pub fn while_committing(&self) -> Committing {
        self.shared.set(|s| s.active = true);
        Committing {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// A commit is running: the helper starts writeback until this is dropped.
pub struct Committing {
    shared: Arc<Shared>,
}

impl Drop for Committing {
    fn drop(&mut self) {
        self.shared.set(|s| s.active = false);
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.shared.set(|s| s.closed = true);
    }
}

fn run(shared: &Shared, file: &File) {
    let mut state = shared.lock();
    loop {
        if state.closed {
            return;
        }
        if !state.active {
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        drop(state);
        // SAFETY: a plain syscall on a descriptor this thread owns; no memory is passed.
        // Errors are ignored: this only starts I/O early, the commit's fsync reports failures.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
        state = shared.lock();
        if state.active && !state.closed {
            state = shared
                .changed
                .wait_timeout(state, PERIOD)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::time::Instant;

    /// `cachestat(2)` (Linux 6.5): how many of a file's cached pages are dirty.
    fn dirty_pages(file: &File) -> u64 {
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            nr_cache: u64,
            nr_dirty: u64,
            nr_writeback: u64,
            nr_evicted: u64,
            nr_recently_evicted: u64,
        }
        const SYS_CACHESTAT: libc::c_long = 451;
        let range = Range { off: 0, len: 0 };
        let mut stat = Stat::default();
        // SAFETY: both pointers are to live structs of the layout the kernel expects.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const Range,
                &mut stat as *mut Stat,
                0u32,
            )
        };
        assert_eq!(r, 0, "cachestat: {}", std::io::Error::last_os_error());
        stat.nr_dirty + stat.nr_writeback
    }

    /// While a commit runs, the file's dirty pages are written out without any fsync: the
    /// kernel alone would leave them dirty for its 30 s expiry.
    #[test]
    fn dirty_pages_go_out_while_a_commit_runs() {
        // On a disk, not a tmpfs (whose pages are never written back): beside the sources.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("a temp dir");
        let path = dir.path().join("db");
        let mut file = File::create(&path).expect("create");
        let block = vec![7u8; 1 << 20];
        for _ in 0..8 {
            file.write_all(&block).expect("write");
        }
        assert!(dirty_pages(&file) > 0, "the written pages start dirty");
        let writeback = Writeback::start(File::open(&path).expect("open")).expect("start");
        let start = Instant::now();
        let committing = writeback.while_committing();
        while dirty_pages(&file) > 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let left = dirty_pages(&file);
        drop(committing);
        assert_eq!(left, 0, "pages still dirty or under writeback after 10 s");
        // Between commits it stays quiet: new dirty pages are left to the kernel.
        file.write_all_at(&block, 0).expect("rewrite");
        std::thread::sleep(Duration::from_millis(50));
        assert!(dirty_pages(&file) > 0, "written back outside a commit");
        drop(writeback);
    }
}
