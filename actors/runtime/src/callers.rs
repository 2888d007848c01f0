//! Callers that gave up waiting for a commit.
//!
//! The kernel tells a filesystem that a caller was interrupted with FUSE INTERRUPT, but fuser
//! (0.18) answers INTERRUPT itself with ENOSYS (it has no hook for it), after which the kernel
//! stops sending them. A task killed while its request is already in userspace then sleeps
//! uninterruptibly until the answer comes, and so does a task closing its files while it exits
//! (the FLUSH of `close` at exit cannot be interrupted at all). A durability wait can last up
//! to the commit timeout when the disk hangs, so the actor looks at the callers of old waits
//! and answers EINTR to those that are being killed or are exiting, as a libfuse filesystem
//! answers an INTERRUPT: the killed process goes away at once instead of after the timeout.

use procfs::process::Process;

/// `PF_EXITING` in `/proc/TID/stat`'s flags: the task is in `do_exit`.
const PF_EXITING: u32 = 0x4;

/// SIGKILL's bit in `/proc/TID/status`'s pending-signal masks.
const SIGKILL_PENDING: u64 = 1 << (libc::SIGKILL - 1);

/// Whether the task `tid` (a FUSE request's pid is the calling thread's id) no longer waits
/// for its answer: it is gone, exiting, or has SIGKILL pending. 0 (a caller in another pid
/// namespace, or the kernel itself) is never taken for gone: its wait ends at the timeout.
pub fn gave_up(tid: u32) -> bool {
    let Ok(tid) = i32::try_from(tid) else {
        return false;
    };
    if tid == 0 {
        return false;
    }
    let Ok(task) = Process::new(tid) else {
        return true; // gone
    };
    let exiting = task.stat().is_ok_and(|s| s.flags & PF_EXITING != 0);
    let killed = task
        .status()
        .is_ok_and(|s| (s.sigpnd | s.shdpnd) & SIGKILL_PENDING != 0);
    exiting || killed
}

/// The CPU task `tid` last ran on (for a caller blocked in a request: the CPU it sent it
/// from), or `None` if it cannot be read.
pub fn last_cpu(tid: u32) -> Option<usize> {
    let tid = i32::try_from(tid).ok().filter(|&t| t > 0)?;
    let cpu = Process::new(tid).ok()?.stat().ok()?.processor?;
    usize::try_from(cpu).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_task_has_not_given_up_and_a_dead_one_has() {
        assert!(!gave_up(std::process::id()));
        assert!(
            !gave_up(0),
            "pid 0 is a caller we cannot see, not a dead one"
        );
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait for true");
        assert!(gave_up(pid), "a reaped child is gone");
    }

    #[test]
    fn a_killed_task_has_given_up() {
        // SIGKILL stays pending only while the task sleeps uninterruptibly (what a FUSE wait
        // is; the mount test in tests/hang.rs covers it). Here: killed and not reaped, the
        // child is a zombie with PF_EXITING set.
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        assert!(!gave_up(pid));
        child.kill().expect("kill sleep");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !gave_up(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(gave_up(pid), "a killed child is taken as gone");
        child.wait().expect("reap sleep");
    }
}
