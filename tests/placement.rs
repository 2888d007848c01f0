//! Where the daemon's threads run (see `actors/runtime/src/pinning.rs`): the actor pinned to
//! a CPU of its own while few callers are active, moving off it when a caller keeps running
//! there, and the FUSE threads keeping off it; and callers killed in the middle of their
//! requests while the daemon looks at their `/proc` entries.

mod common;

use std::path::Path;
use std::time::Duration;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

use common::*;

/// A `Cpus_allowed_list` value ("0-1", "3", "0,2-3") as CPU numbers.
fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let lo: usize = lo.parse().expect("a CPU number");
        let hi: usize = hi.parse().expect("a CPU number");
        cpus.extend(lo..=hi);
    }
    cpus
}

/// Each thread of process `pid`: its name and the CPUs it may run on.
fn threads(pid: u32) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(parse_cpu_list)
            .unwrap_or_default();
        out.push((comm.trim().to_string(), allowed));
    }
    out
}

fn actor_cpus(pid: u32) -> Vec<usize> {
    let all = threads(pid);
    match all.iter().find(|(name, _)| name == "spoolfs-actor") {
        Some((_, cpus)) => cpus.clone(),
        None => panic!("daemon {pid} has no actor thread: {all:?}"),
    }
}

/// The CPU the actor has pinned itself to. The mount can be live before the actor thread
/// first ran (named and pinned) on a busy machine, so this waits for it.
fn pinned_actor_cpu(pid: u32) -> usize {
    let pinned = || {
        threads(pid)
            .into_iter()
            .find(|(name, cpus)| name == "spoolfs-actor" && cpus.len() == 1)
            .map(|(_, cpus)| cpus[0])
    };
    wait_until(Duration::from_secs(10), || pinned().is_some());
    pinned().unwrap_or_else(|| panic!("the actor did not pin itself: {:?}", threads(pid)))
}

/// The CPUs this process may use; at least two (the actor is never pinned on one).
fn two_or_more_cpus() -> Vec<usize> {
    let own = sched_getaffinity(Pid::from_raw(0)).expect("read this process's CPUs");
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| own.is_set(c).unwrap_or(false))
        .collect();
    assert!(cpus.len() >= 2, "this test needs two CPUs; it has {cpus:?}");
    cpus
}

/// Lookups of names that do not exist, from the calling thread.
fn lookups(mnt: &Path, next: &mut u64, n: u64) {
    for _ in 0..n {
        *next += 1;
        let _ = std::fs::symlink_metadata(mnt.join(format!("missing-{next}")));
    }
}

#[test]
fn the_actor_moves_off_a_cpu_its_caller_runs_on_and_fuse_threads_keep_off_the_actors() {
    let Some(t) = TestFs::new() else { return };
    two_or_more_cpus();
    let m = t.mount();
    // Pinned to one CPU: the last one, or another if a caller (`spoolfs mount` checking the
    // mount) already ran there.
    let first = vec![pinned_actor_cpu(m.pid)];

    // One caller, pinned to the actor's CPU, as the scheduler sometimes places one.
    let mnt = t.mnt.clone();
    let pid = m.pid;
    let before = first.clone();
    let (moved, fuse_kept_off, now) = std::thread::spawn(move || {
        let mut one = CpuSet::new();
        one.set(first[0]).expect("a CPU number");
        sched_setaffinity(Pid::from_raw(0), &one).expect("pin the caller");
        let mut next = 0;
        let moved = wait_until(Duration::from_secs(20), || {
            lookups(&mnt, &mut next, 200);
            actor_cpus(pid) != first
        });
        let now = actor_cpus(pid);
        // FUSE threads place themselves at their next request after the actor moved.
        let fuse_kept_off = wait_until(Duration::from_secs(20), || {
            lookups(&mnt, &mut next, 200);
            threads(pid)
                .iter()
                .filter(|(name, _)| name.starts_with("fuser"))
                .all(|(_, allowed)| now.len() == 1 && !allowed.contains(&now[0]))
        });
        (moved, fuse_kept_off, now)
    })
    .join()
    .expect("the caller thread");

    assert!(
        moved,
        "the actor stayed on CPU {before:?} while its only caller ran there"
    );
    assert_eq!(now.len(), 1, "the actor moved to one other CPU: {now:?}");
    assert!(
        fuse_kept_off,
        "FUSE threads may still run on the actor's CPU {now:?}: {:?}",
        threads(pid)
    );
    // The mount still answers.
    std::fs::write(t.path("after-the-move"), b"x").expect("write after the move");
    assert_eq!(
        std::fs::read(t.path("after-the-move")).expect("read back"),
        b"x"
    );
    m.umount();
}

#[test]
fn an_actor_cpu_named_by_the_operator_is_kept() {
    let Some(t) = TestFs::new() else { return };
    let cpus = two_or_more_cpus();
    let named = cpus[0].to_string();
    let m = t.mount_full(&[], &["--actor-cpu", &named]);
    assert_eq!(pinned_actor_cpu(m.pid), cpus[0]);
    let mnt = t.mnt.clone();
    let pid = m.pid;
    let stayed = std::thread::spawn(move || {
        let mut one = CpuSet::new();
        one.set(cpus[0]).expect("a CPU number");
        sched_setaffinity(Pid::from_raw(0), &one).expect("pin the caller");
        let mut next = 0;
        // Long enough for many windows of 10 ms.
        for _ in 0..20 {
            lookups(&mnt, &mut next, 200);
            std::thread::sleep(Duration::from_millis(15));
            if actor_cpus(pid) != vec![cpus[0]] {
                return false;
            }
        }
        true
    })
    .join()
    .expect("the caller thread");
    assert!(stayed, "the actor left the CPU the operator named");
    m.umount();
}

/// The daemon reads its callers' `/proc` entries (where they run; whether they were killed
/// while they wait for a commit). Such a read once slept in the kernel for good, on the
/// actor thread, for a caller killed in the middle of a write that only the actor could
/// answer. Writers killed at seeded random moments in their writes and fsyncs must go away,
/// and the mount keep answering, every time.
#[test]
fn writers_killed_in_the_middle_of_their_writes_leave_the_mount_answering() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let writer = "import os, sys, threading\n\
                  def w(i):\n\
                  \x20   fd = os.open(f'{sys.argv[1]}/f{i}', os.O_CREAT | os.O_WRONLY, 0o600)\n\
                  \x20   while True:\n\
                  \x20       os.write(fd, b'x' * (128 << 10))\n\
                  \x20       if i % 2: os.fsync(fd)\n\
                  ts = [threading.Thread(target=w, args=(i,)) for i in range(4)]\n\
                  [t.start() for t in ts]\n\
                  print('writing', flush=True)\n\
                  [t.join() for t in ts]\n";
    let mut rng = Rng::new(0x6B11);
    for round in 0..20 {
        let mut child = std::process::Command::new("python3")
            .args(["-c", writer])
            .arg(&t.mnt)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("the writer's output")),
            &mut line,
        )
        .expect("read the writer's output");
        assert_eq!(
            line.trim(),
            "writing",
            "round {round}: the writer did not start"
        );
        std::thread::sleep(Duration::from_millis(rng.range(1, 150)));
        child.kill().expect("SIGKILL the writer");
        let gone = wait_until(Duration::from_secs(30), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        assert!(gone, "round {round}: a killed writer did not go away");
        // A hang guard, not a timing assertion: a stat on another thread must be answered.
        let (tx, rx) = std::sync::mpsc::channel();
        let root = t.mnt.clone();
        std::thread::spawn(move || {
            let _ = tx.send(std::fs::metadata(root).is_ok());
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30)),
            Ok(true),
            "round {round}: the mount does not answer after a killed writer"
        );
    }
    m.assert_healthy();
    m.umount();
    t.assert_fsck_clean("after killed writers");
}
