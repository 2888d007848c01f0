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

use std::time::{Duration, Instant};

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

/// Length of one window of counting callers.
const WINDOW: Duration = Duration::from_millis(10);

/// Quiet windows in a row (fewer callers than CPUs) before the actor pins itself again, so
/// that a workload with short gaps does not flip it back and forth.
const QUIET_WINDOWS: u32 = 3;

/// What the actor should do with its CPU affinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Pin,
    Unpin,
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

/// The actor's CPU placement: `Policy` plus the affinity calls.
pub struct Pinning {
    cpu: usize,
    /// The CPUs the daemon may use, to give back when unpinned.
    all: CpuSet,
    policy: Policy,
}

impl Pinning {
    /// Pinning to `cpu`, adaptive as above, or `None` when there is nothing to choose: no CPU
    /// asked for, or the daemon's CPU set cannot be read.
    pub fn new(cpu: Option<usize>) -> Option<Pinning> {
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
        })
    }

    /// Pin the calling thread (the actor, when it starts).
    pub fn start(&mut self) {
        if self.place(Placement::Pin) {
            info!(
                cpu = self.cpu,
                busy_at = self.policy.busy_at,
                "actor thread pinned (unpinned while this many callers are active)"
            );
        }
    }

    /// A request from `pid` arrived at `now`: move the actor if the policy says so.
    pub fn saw(&mut self, pid: u32, now: Instant) {
        if let Some(p) = self.policy.saw(pid, now) {
            self.place(p);
        }
    }

    /// Apply `p` to the calling thread; false if that failed (logged: it only costs speed,
    /// the thread keeps the CPUs it had).
    fn place(&mut self, p: Placement) -> bool {
        let set = match p {
            Placement::Unpin => Ok(self.all),
            Placement::Pin => {
                let mut one = CpuSet::new();
                one.set(self.cpu).map(|()| one)
            }
        };
        match set.and_then(|s| sched_setaffinity(Pid::from_raw(0), &s)) {
            Ok(()) => {
                debug!(cpu = self.cpu, placement = ?p, "actor thread placement");
                true
            }
            Err(e) => {
                warn!(cpu = self.cpu, placement = ?p, error = %e,
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
        for i in 0..100 {
            assert_eq!(p.saw(7, t0 + ms(i)), None);
            assert_eq!(
                p.saw(0, t0 + ms(i)),
                None,
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
