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
//!
//! The actor never reads `/proc` itself: it asks a `Probe`, whose thread reads and sends the
//! answer back as a message. Reading a task's `/proc` entries can sleep in the kernel until
//! that task moves on, and the task may be waiting for this very daemon's answer: a caller
//! killed in the middle of a write once left the actor thread in `do_task_stat` of that
//! caller for good (uninterruptible, not even SIGKILL ended the daemon), while the caller
//! waited for the write's answer only the actor could give. With the read on the probe's
//! thread, the actor answers the write, the caller goes away, and the read returns.

use procfs::process::Process;
use tracing::warn;

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

/// Questions waiting for the probe's thread. Beyond this the probe is stuck or slow and a
/// question is dropped: each is asked again at the next look.
const QUESTIONS: usize = 4;

/// A question for the probe's thread.
#[derive(Debug)]
enum Question {
    /// Which of these tasks gave up (`gave_up`).
    GaveUp(Vec<u32>),
    /// Where this task last ran (`last_cpu`).
    LastCpu(u32),
}

/// The probe's answer, a message for the actor.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The tasks asked about that gave up.
    GaveUp(Vec<u32>),
    /// Where task `tid` last ran.
    LastCpu { tid: u32, cpu: Option<usize> },
}

/// How the probe's thread reads a task (the functions above; a test gives its own).
#[derive(Clone, Copy)]
pub struct Reader {
    pub gave_up: fn(u32) -> bool,
    pub last_cpu: fn(u32) -> Option<usize>,
}

impl Reader {
    pub const PROC: Reader = Reader { gave_up, last_cpu };
}

/// Reads callers' `/proc` entries on a thread of its own (see the module doc): asking never
/// waits, the answer arrives on the receiver `start` returned.
#[derive(Clone)]
pub struct Probe {
    questions: flume::Sender<Question>,
    /// The last question was dropped (warned once, not at every look).
    behind: std::cell::Cell<bool>,
}

impl Probe {
    /// Start the probe's thread. It ends when every `Probe` is dropped (after the read it is
    /// in, if any) or when the answers' receiver is.
    pub fn start(reader: Reader) -> std::io::Result<(Probe, flume::Receiver<Answer>)> {
        let (questions, asked) = flume::bounded::<Question>(QUESTIONS);
        let (answer, answers) = flume::unbounded();
        std::thread::Builder::new()
            .name("spoolfs-callers".into())
            .spawn(move || {
                for q in asked.iter() {
                    let a = match q {
                        Question::GaveUp(tids) => Answer::GaveUp(
                            tids.into_iter().filter(|&t| (reader.gave_up)(t)).collect(),
                        ),
                        Question::LastCpu(tid) => Answer::LastCpu {
                            tid,
                            cpu: (reader.last_cpu)(tid),
                        },
                    };
                    if answer.send(a).is_err() {
                        break;
                    }
                }
            })?;
        Ok((
            Probe {
                questions,
                behind: Default::default(),
            },
            answers,
        ))
    }

    /// Ask which of `tids` gave up; false if the question was dropped (see `QUESTIONS`).
    pub fn ask_gave_up(&self, tids: Vec<u32>) -> bool {
        self.ask(Question::GaveUp(tids))
    }

    /// Ask where `tid` last ran; false if the question was dropped.
    pub fn ask_last_cpu(&self, tid: u32) -> bool {
        self.ask(Question::LastCpu(tid))
    }

    fn ask(&self, q: Question) -> bool {
        match self.questions.try_send(q) {
            Ok(()) => {
                self.behind.set(false);
                true
            }
            Err(flume::TrySendError::Full(q)) => {
                if !self.behind.replace(true) {
                    warn!(question = ?q, "the callers' probe is behind (a /proc read sleeps \
                        in the kernel): questions are dropped and asked again later");
                }
                false
            }
            Err(flume::TrySendError::Disconnected(_)) => false,
        }
    }
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

    #[test]
    fn the_probe_answers_and_a_read_that_never_returns_stops_nobody() {
        let (probe, answers) = Probe::start(Reader::PROC).expect("start the probe");
        let me = nix::unistd::gettid().as_raw() as u32;
        assert!(probe.ask_gave_up(vec![me, u32::MAX]));
        let got = answers
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("an answer");
        assert_eq!(got, Answer::GaveUp(vec![]), "this thread lives");
        assert!(probe.ask_last_cpu(me));
        let got = answers
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("an answer");
        assert!(
            matches!(got, Answer::LastCpu { tid, cpu: Some(_) } if tid == me),
            "{got:?}"
        );

        // A read that sleeps for good (what a /proc read of a task waiting for this daemon
        // did): asking still returns at once, and questions past the bound are dropped.
        let (stuck, answers) = Probe::start(Reader {
            gave_up: |_| loop {
                std::thread::park();
            },
            last_cpu: |_| None,
        })
        .expect("start the probe");
        let started = std::time::Instant::now();
        let asked = (0..QUESTIONS + 3)
            .filter(|_| stuck.ask_gave_up(vec![me]))
            .count();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "asking waited for the read"
        );
        // One question is in the read, QUESTIONS wait behind it.
        assert!(
            (QUESTIONS..=QUESTIONS + 1).contains(&asked),
            "asked {asked} of {}",
            QUESTIONS + 3
        );
        assert!(answers.try_recv().is_err());
    }
}
