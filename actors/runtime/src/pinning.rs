//! Where the actor thread runs: on its own CPU while few callers are active, anywhere once
//! there are as many callers as CPUs.
//!
//! Pinned to a CPU its callers do not use, the actor keeps requests and answers crossing
//! between two running CPUs instead of waking an idle one (on a VM an interrupt and a halt
//! exit, ~25 µs each on the 2-core test VM). That pays with one writer: enqueue 1,900-2,100
//! msg/s pinned against 1,250-1,750 unpinned. With more callers than free CPUs there is no
//! CPU to keep to itself: callers are queued behind each other on the actor's CPU, the actor
//! cannot move to a CPU that just went idle, and 8 writers fell to 2,000-2,200 msg/s
//! against 2,300-2,800 unpinned (same session, binaries alternating). So the actor counts the
//! distinct callers in short windows and lets go of its CPU while they are as many as the
//! daemon's CPUs, and takes it back after a few quieter windows.
//!
//! A caller can still land on the actor's CPU (the scheduler placed it there, or an operator
//! did): it then runs only when the polling actor yields, and every request waits behind it.
//! One writer pinned there enqueued 907-940 msg/s against 2,462-2,535 on the other CPU, and
//! unlink ran at 15,000-16,000/s against 31,000-57,000 (session 9). This is what made the
//! metadata benchmark bimodal from one run to the next. So while pinned, once per window the
//! actor looks at the CPU one of its callers last ran on, and moves to another CPU when that
//! caller shared its own for `SHARED_WINDOWS` windows in a row (only when the CPU was chosen
//! for it, `--actor-cpu last`, not named by the operator).
//!
//! The FUSE threads keep off the pinned actor's CPU too (`ActorPlacement`): one that the
//! scheduler put there spins for its answer (`handoff`) against the polling actor. With
//! the FUSE threads moved off it by hand, 15 of 16 metadata runs unlinked at 42,000-50,000/s;
//! left to the scheduler, 3 of 16 ran at 22,000-31,000/s (session 9).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use crate::callers;

/// Length of one window of counting callers.
const WINDOW: Duration = Duration::from_millis(10);

/// Quiet windows in a row (fewer callers than CPUs) before the actor pins itself again, so
/// that a workload with short gaps does not flip it back and forth.
const QUIET_WINDOWS: u32 = 3;

/// Windows in a row in which the caller looked at ran on the actor's CPU before the actor
/// moves (a caller that just migrated does not move it).
const SHARED_WINDOWS: u32 = 2;

/// What the actor should do with its CPU affinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Pin,
    Unpin,
    /// Stay pinned, but find out whether this caller (a thread id) runs on the actor's CPU.
    CheckCaller(u32),
}

/// The decision, without the system calls (tested on its own).
#[derive(Debug)]
pub struct Policy {
    /// Callers at which pinning stops paying: the number of CPUs the daemon may use.
    busy_at: usize,
    pinned: bool,
    window_start: Instant,
    /// Distinct callers (thread ids) seen in this window, up to `busy_at`.
    callers: Vec<u32>,
    quiet: u32,
}

impl Policy {
    /// Starts pinned (the actor pins itself when its thread starts).
    pub fn new(cpus: usize, now: Instant) -> Policy {
        Policy {
            busy_at: cpus.max(1),
            pinned: true,
            window_start: now,
            callers: Vec::new(),
            quiet: 0,
        }
    }

    /// A request from `pid` (0: the kernel itself, not counted) arrived at `now`.
    pub fn saw(&mut self, pid: u32, now: Instant) -> Option<Placement> {
        if pid != 0 && self.callers.len() < self.busy_at && !self.callers.contains(&pid) {
            self.callers.push(pid);
        }
        let busy = self.callers.len() >= self.busy_at;
        if busy && self.pinned {
            // Act at once: waiting for the window to end costs the busy workload.
            self.pinned = false;
            self.quiet = 0;
            return Some(Placement::Unpin);
        }
        if now.saturating_duration_since(self.window_start) < WINDOW {
            return None;
        }
        self.window_start = now;
        // One caller per window is looked at: one /proc read per window, however many.
        let first = self.callers.first().copied();
        self.callers.clear();
        if busy {
            self.quiet = 0;
            return None;
        }
        self.quiet += 1;
        if !self.pinned && self.quiet >= QUIET_WINDOWS {
            self.pinned = true;
            return Some(Placement::Pin);
        }
        if self.pinned {
            return first.map(Placement::CheckCaller);
        }
        None
    }
}

/// The CPUs this process may run on (read before the actor pins itself, this is the
/// daemon's set), with its members in order.
pub fn daemon_cpus() -> nix::Result<(CpuSet, Vec<usize>)> {
    let set = sched_getaffinity(Pid::from_raw(0))?;
    let members = (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    Ok((set, members))
}

/// Put the calling thread back on `cpus` (a thread inherits the set of the thread that
/// starts it, and the actor starts tokio's blocking threads). A failure only costs speed: the
/// thread keeps the set it inherited.
pub fn run_on(cpus: &CpuSet) {
    let _ = sched_setaffinity(Pid::from_raw(0), cpus);
}

/// The CPU to move to when a caller runs on `cpu`: the next of the daemon's CPUs (in order,
/// wrapping around), or `None` if it has no other.
pub fn other_cpu(members: &[usize], cpu: usize) -> Option<usize> {
    let at = members.iter().position(|&c| c == cpu);
    let next = at.map_or(0, |i| i + 1);
    (0..members.len())
        .map(|k| members[(next + k) % members.len()])
        .find(|&c| c != cpu)
}

/// The pinned actor's CPU, published for the FUSE threads, which keep off it.
#[derive(Debug)]
pub struct ActorPlacement {
    /// The actor's CPU while it is pinned; `NOT_PINNED` otherwise.
    cpu: AtomicUsize,
    /// The CPUs the daemon may use (`None`: unknown, and nobody moves).
    all: Option<CpuSet>,
}

const NOT_PINNED: usize = usize::MAX;

thread_local! {
    /// The actor CPU this thread last placed itself for (`NOT_PINNED - 1`: not yet placed).
    static KEPT_OFF: Cell<usize> = const { Cell::new(NOT_PINNED - 1) };
}

impl Default for ActorPlacement {
    fn default() -> Self {
        ActorPlacement {
            cpu: AtomicUsize::new(NOT_PINNED),
            all: daemon_cpus().ok().map(|(set, _)| set),
        }
    }
}

impl ActorPlacement {
    fn publish(&self, cpu: Option<usize>) {
        self.cpu.store(cpu.unwrap_or(NOT_PINNED), Ordering::Relaxed);
    }

    /// Called by a FUSE thread before it hands a request to the actor: run anywhere but on
    /// the pinned actor's CPU (one atomic load; a system call only when the actor moved).
    pub fn keep_off(&self) {
        let cpu = self.cpu.load(Ordering::Relaxed);
        if KEPT_OFF.get() == cpu {
            return;
        }
        KEPT_OFF.set(cpu);
        let Some(mut set) = self.all else {
            return;
        };
        if cpu != NOT_PINNED && set.unset(cpu).is_err() {
            return;
        }
        if (0..CpuSet::count()).any(|c| set.is_set(c).unwrap_or(false)) {
            run_on(&set);
        }
    }
}

/// The actor's CPU placement: `Policy` plus the affinity calls.
pub struct Pinning {
    cpu: usize,
    /// The CPUs the daemon may use, to give back when unpinned.
    all: CpuSet,
    /// The same, in order (where to move to).
    members: Vec<usize>,
    /// The actor may leave `cpu` for another when a caller runs there (`cpu` was chosen for
    /// it, not named by the operator).
    movable: bool,
    /// Windows in a row in which the caller looked at ran on `cpu`.
    shared: u32,
    policy: Policy,
    published: Arc<ActorPlacement>,
    /// Reads where a caller last ran (never on the actor thread: see `callers`).
    probe: callers::Probe,
}

impl Pinning {
    /// Pinning to `cpu`, adaptive as above, or `None` when there is nothing to choose: no CPU
    /// asked for, or the daemon's CPU set cannot be read.
    pub fn new(
        cpu: Option<usize>,
        movable: bool,
        published: Arc<ActorPlacement>,
        probe: callers::Probe,
    ) -> Option<Pinning> {
        let cpu = cpu?;
        let (all, members) = daemon_cpus()
            .map_err(
                |e| warn!(error = %e, "cannot read the daemon's CPU set; the actor runs unpinned"),
            )
            .ok()?;
        Some(Pinning {
            cpu,
            all,
            policy: Policy::new(members.len(), Instant::now()),
            members,
            movable,
            shared: 0,
            published,
            probe,
        })
    }

    /// Pin the calling thread (the actor, when it starts).
    pub fn start(&mut self) {
        if self.place(true) {
            info!(
                cpu = self.cpu,
                busy_at = self.policy.busy_at,
                "actor thread pinned (unpinned while this many callers are active)"
            );
        }
    }

    /// A request from `pid` arrived at `now`: move the actor if the policy says so.
    pub fn saw(&mut self, pid: u32, now: Instant) {
        match self.policy.saw(pid, now) {
            Some(Placement::CheckCaller(pid)) => self.check_caller(pid),
            Some(Placement::Pin) => {
                self.place(true);
            }
            Some(Placement::Unpin) => {
                self.place(false);
            }
            None => {}
        }
    }

    /// Ask where caller `pid` last ran (answered in `caller_ran_on`).
    fn check_caller(&mut self, pid: u32) {
        if self.movable {
            self.probe.ask_last_cpu(pid);
        }
    }

    /// The probe's answer to `check_caller`: move to another CPU if the caller keeps running
    /// on the actor's (see the module doc).
    pub fn caller_ran_on(&mut self, tid: u32, cpu: Option<usize>) {
        if !self.policy.pinned || cpu != Some(self.cpu) {
            self.shared = 0;
            return;
        }
        self.shared += 1;
        if self.shared < SHARED_WINDOWS {
            return;
        }
        self.shared = 0;
        let Some(to) = other_cpu(&self.members, self.cpu) else {
            return;
        };
        let from = std::mem::replace(&mut self.cpu, to);
        if self.place(true) {
            debug!(
                from,
                to,
                caller = tid,
                "a caller runs on the actor's CPU: the actor moved"
            );
        } else {
            self.cpu = from;
        }
    }

    /// Pin the calling thread to `cpu`, or give it all the daemon's CPUs; false if that
    /// failed (logged: it only costs speed, the thread keeps the CPUs it had).
    fn place(&mut self, pin: bool) -> bool {
        let set = if pin {
            let mut one = CpuSet::new();
            one.set(self.cpu).map(|()| one)
        } else {
            Ok(self.all)
        };
        match set.and_then(|s| sched_setaffinity(Pid::from_raw(0), &s)) {
            Ok(()) => {
                debug!(cpu = self.cpu, pin, "actor thread placement");
                self.published.publish(pin.then_some(self.cpu));
                true
            }
            Err(e) => {
                warn!(cpu = self.cpu, pin, error = %e,
                    "cannot change the actor thread's CPUs");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_caller_keeps_the_actor_pinned() {
        let t0 = Instant::now();
        let mut p = Policy::new(2, t0);
        let moves = |got: Option<Placement>| matches!(got, Some(Placement::Pin | Placement::Unpin));
        for i in 0..100 {
            assert!(!moves(p.saw(7, t0 + ms(i))));
            assert!(
                !moves(p.saw(0, t0 + ms(i))),
                "the kernel's requests do not count"
            );
        }
    }

    #[test]
    fn as_many_callers_as_cpus_unpin_at_once_and_quiet_windows_pin_again() {
        let t0 = Instant::now();
        let mut p = Policy::new(2, t0);
        assert_eq!(p.saw(7, t0), None);
        assert_eq!(p.saw(8, t0 + ms(1)), Some(Placement::Unpin));
        // Still busy for two more windows: nothing changes.
        for i in 2..30 {
            let pid = 7 + (i as u32 % 2);
            assert_eq!(p.saw(pid, t0 + ms(i)), None);
        }
        // One caller from now on: pinned again after QUIET_WINDOWS windows, not before.
        let mut pinned_at = None;
        for i in 30..100 {
            if p.saw(7, t0 + ms(i)) == Some(Placement::Pin) {
                pinned_at = Some(i);
                break;
            }
        }
        let at = pinned_at.expect("pinned again");
        assert!(
            at >= 30 + WINDOW.as_millis() as u64 * u64::from(QUIET_WINDOWS - 1),
            "pinned again after {at} ms"
        );
        // And busy again unpins again.
        assert_eq!(p.saw(8, t0 + ms(at + 1)), None);
        assert_eq!(p.saw(9, t0 + ms(at + 2)), Some(Placement::Unpin));
    }

    #[test]
    fn a_pinned_actor_looks_at_one_caller_per_window_and_an_unpinned_one_at_none() {
        let t0 = Instant::now();
        let mut p = Policy::new(4, t0);
        assert_eq!(p.saw(7, t0), None);
        assert_eq!(p.saw(8, t0 + ms(1)), None);
        // The window ends with the next request: the first caller of the window is looked at.
        assert_eq!(p.saw(8, t0 + ms(11)), Some(Placement::CheckCaller(7)));
        assert_eq!(p.saw(8, t0 + ms(12)), None, "once per window");
        assert_eq!(p.saw(8, t0 + ms(22)), Some(Placement::CheckCaller(8)));
        // Only the kernel asked (pid 0): nobody to look at.
        assert_eq!(p.saw(0, t0 + ms(23)), None);
        assert_eq!(p.saw(0, t0 + ms(33)), None);
        // Busy (as many callers as CPUs): unpinned, and nothing is looked at.
        for (i, pid) in [1, 2, 3, 4].into_iter().enumerate() {
            let got = p.saw(pid, t0 + ms(40 + i as u64));
            assert_eq!(got, (pid == 4).then_some(Placement::Unpin));
        }
        assert_eq!(p.saw(1, t0 + ms(51)), None);
    }

    #[test]
    fn the_actor_moves_to_the_next_cpu_and_nowhere_without_another() {
        assert_eq!(other_cpu(&[0, 1], 1), Some(0));
        assert_eq!(other_cpu(&[0, 1], 0), Some(1));
        assert_eq!(other_cpu(&[2, 5, 7], 5), Some(7));
        assert_eq!(other_cpu(&[2, 5, 7], 7), Some(2));
        assert_eq!(other_cpu(&[3], 3), None);
        // A named CPU outside the daemon's set: the first of the set.
        assert_eq!(other_cpu(&[0, 1], 9), Some(0));
        assert_eq!(other_cpu(&[], 0), None);
    }

    /// The affinity system calls on this thread: `keep_off` leaves the actor's CPU out, and
    /// gives every CPU back once the actor is unpinned; `last_cpu` sees where a thread runs.
    #[test]
    fn keep_off_and_last_cpu_on_a_real_thread() {
        let (set, members) = daemon_cpus().expect("this process's CPUs");
        std::thread::spawn(move || {
            let tid = nix::unistd::gettid().as_raw() as u32;
            let placement = ActorPlacement::default();
            let allowed = || {
                let now = sched_getaffinity(Pid::from_raw(0)).expect("read affinity");
                members
                    .iter()
                    .copied()
                    .filter(|&c| now.is_set(c).unwrap_or(false))
                    .collect::<Vec<_>>()
            };
            if let [first, .., last] = members[..] {
                placement.publish(Some(last));
                placement.keep_off();
                assert!(
                    !allowed().contains(&last),
                    "kept off CPU {last}: {:?}",
                    allowed()
                );
                assert_eq!(callers::last_cpu(tid).map(|c| c != last), Some(true));
                placement.publish(Some(first));
                placement.keep_off();
                assert!(!allowed().contains(&first));
                assert!(allowed().contains(&last));
            }
            placement.publish(None);
            placement.keep_off();
            assert_eq!(
                allowed(),
                members,
                "every CPU again once the actor is unpinned"
            );
            run_on(&set);
        })
        .join()
        .expect("the test thread");
    }

    #[test]
    fn a_short_gap_in_a_busy_workload_does_not_pin() {
        let t0 = Instant::now();
        let mut p = Policy::new(2, t0);
        assert_eq!(p.saw(1, t0), None);
        assert_eq!(p.saw(2, t0), Some(Placement::Unpin));
        let mut now = t0;
        for round in 0..20u64 {
            // A window with one caller, then a busy one: never three quiet windows in a row.
            now = t0 + ms(20 * round + 11);
            assert_eq!(p.saw(1, now), None);
            assert_eq!(p.saw(1, now + ms(11)), None);
            assert_eq!(p.saw(2, now + ms(12)), None);
        }
        assert!(now > t0);
    }
}
