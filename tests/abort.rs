//! `spoolfs abort MOUNTPOINT`: cutting the kernel's FUSE connection (fusectl `abort`). The
//! daemon must notice, make its last commit and exit, releasing the data dir; the mountpoint
//! stays dead (ENOTCONN) until `umount --lazy`; a new mount has everything that was closed or
//! fsynced before the abort.

mod common;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;

fn abort_cmd(mnt: &Path) -> std::process::Output {
    spoolfs([OsStr::new("abort"), mnt.as_os_str()])
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Nobody holds the data dir lock any more (the daemon released it).
#[track_caller]
fn assert_lock_free(data: &Path) {
    let file = File::open(data.join("spoolfs.lock")).expect("open the lock file");
    assert!(
        Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok(),
        "the data dir lock is still held"
    );
}

#[track_caller]
fn assert_enotconn(p: &Path) {
    let e = errno_of(fs::metadata(p), "stat of the aborted mount");
    assert_eq!(e, libc::ENOTCONN, "stat of {} after abort", p.display());
}

/// The kernel's count of requests waiting for the daemon of the mount at `mnt` (fusectl),
/// found through the device number in mountinfo (no stat of the mountpoint).
fn fuse_waiting(mnt: &Path) -> Option<u64> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mnt = mnt.to_str()?;
    let dev = text.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&mnt)).then(|| f[2].to_string())
    })?;
    let (major, minor) = dev.split_once(':')?;
    let id = (major.parse::<u64>().ok()? << 20) | minor.parse::<u64>().ok()?;
    fs::read_to_string(format!("/sys/fs/fuse/connections/{id}/waiting"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Every thread of `pid` is stopped (state T).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            stat.rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
                .is_some_and(|state| state == "T")
        })
    })
}

#[test]
fn abort_stops_the_daemon_cleanly_and_keeps_durable_data() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    fs::create_dir(t.path("input")).expect("mkdir");
    let mut closed = Vec::new();
    for i in 0..20u64 {
        let name = format!("input/msg-{i}");
        let data = seeded_bytes(i, 1000 + (i as usize) * 3000);
        fs::write(t.path(&name), &data).expect("write closed file");
        closed.push((name, data));
    }
    fs::rename(t.path("input/msg-0"), t.path("input/renamed")).expect("rename");
    closed[0].0 = "input/renamed".into();
    // fsynced and still open at the abort
    let synced = seeded_bytes(100, 200_000);
    let mut f_synced = File::create(t.path("synced")).expect("create synced");
    f_synced.write_all(&synced).expect("write synced");
    f_synced.sync_all().expect("fsync");
    // written, neither closed nor fsynced: may or may not survive, but must not break anything
    let mut f_pending = File::create(t.path("pending")).expect("create pending");
    f_pending
        .write_all(&seeded_bytes(101, 50_000))
        .expect("write pending");

    let out = abort_cmd(&t.mnt);
    assert!(out.status.success(), "spoolfs abort: {}", describe(&out));
    // abort returns once the daemon has released the data dir
    assert!(
        wait_until(Duration::from_secs(5), || !m.alive()),
        "daemon {} still running after abort",
        m.pid
    );
    assert_lock_free(&t.data);
    let log = t.log();
    assert!(
        log.contains("FUSE connection aborted"),
        "the daemon did not log the abort:\n{log}"
    );
    assert!(
        log.contains("actor stopped") && log.contains("exiting"),
        "the daemon did not stop cleanly:\n{log}"
    );
    // A request the daemon was still answering when the connection went has no one to
    // answer to (fuser logs the failed reply): expected, nothing else is.
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("panicked"))
        .filter(|l| !l.contains("Failed to send FUSE reply"))
        .collect();
    assert!(errors.is_empty(), "errors in the daemon log:\n{log}");

    // The mount is dead, not gone: the mail server must defer, not write underneath.
    assert!(is_mounted(&t.mnt), "abort must not unmount");
    assert_enotconn(&t.mnt);
    assert_enotconn(&t.path("input/msg-1"));
    assert!(
        f_pending
            .write_all(b"more")
            .and_then(|()| f_pending.sync_all())
            .is_err(),
        "a write on the aborted connection succeeded"
    );
    drop(f_pending);
    drop(f_synced);
    // `spoolfs status` sees a dead mount
    let out = spoolfs([OsStr::new("status"), t.mnt.as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "status: {}", describe(&out));
    // Aborting again (nothing left to stop) is harmless.
    let out = abort_cmd(&t.mnt);
    assert!(out.status.success(), "second abort: {}", describe(&out));

    m.detach();
    let m = t.mount();
    for (name, data) in &closed {
        let got = fs::read(t.path(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
        assert_bytes_eq(&got, data, name);
    }
    assert!(!t.path("input/msg-0").exists(), "rename before abort lost");
    assert_bytes_eq(
        &fs::read(t.path("synced")).expect("read synced"),
        &synced,
        "synced",
    );
    // the new mount works normally
    fs::write(t.path("after"), b"after abort").expect("write after remount");
    m.assert_healthy();
    m.umount();
    t.assert_fsck_clean("after abort and remount");
}

/// The point of abort: a daemon that does not answer (here SIGSTOPped). Callers blocked on
/// the mount are released at once; the daemon exits once it runs again.
#[test]
fn abort_releases_callers_of_a_hung_daemon() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let data = seeded_bytes(7, 100_000);
    fs::write(t.path("file"), &data).expect("write");

    // Let the kernel's background RELEASE of that file be answered first.
    std::thread::sleep(Duration::from_millis(200));

    signal(m.pid, Signal::SIGSTOP);
    // kill() does not wait for the stop: wait until every thread of the daemon is stopped,
    // so that it cannot answer the reader's requests any more.
    let stopped = wait_until(Duration::from_secs(10), || all_threads_stopped(m.pid));
    let before = fuse_waiting(&t.mnt).unwrap_or(0);
    if !stopped {
        signal(m.pid, Signal::SIGCONT);
        panic!("daemon {} did not stop on SIGSTOP", m.pid);
    }
    let mut reader = Command::new("cat")
        .arg(t.path("file"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cat");
    let hung = wait_until(Duration::from_secs(10), || {
        fuse_waiting(&t.mnt).is_some_and(|n| n > before)
    });
    if !hung {
        signal(m.pid, Signal::SIGCONT);
        let _ = reader.kill();
        panic!("the reader's request never reached the stopped daemon");
    }

    let mut abort = Command::new(bin())
        .arg("abort")
        .arg(&t.mnt)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start spoolfs abort");
    // The blocked caller fails at once, although the daemon is still stopped.
    let released = wait_until(Duration::from_secs(10), || {
        matches!(reader.try_wait(), Ok(Some(_)))
    });
    let still_waiting = matches!(abort.try_wait(), Ok(None));
    signal(m.pid, Signal::SIGCONT);
    if !released {
        let _ = reader.kill();
    }
    let reader = reader.wait_with_output().expect("wait for cat");
    assert!(released, "the blocked reader was not released by abort");
    assert!(
        !reader.status.success(),
        "cat of the aborted mount succeeded"
    );
    let msg = stderr(&reader);
    assert!(
        msg.contains("connection abort") || msg.contains("not connected"),
        "cat: {msg}"
    );
    assert!(
        still_waiting,
        "spoolfs abort returned while the daemon was stopped"
    );

    let out = abort.wait_with_output().expect("wait for spoolfs abort");
    assert!(out.status.success(), "spoolfs abort: {}", describe(&out));
    assert!(!m.alive(), "daemon {} still running after abort", m.pid);
    assert_lock_free(&t.data);
    assert_enotconn(&t.mnt);

    m.detach();
    let m = t.mount();
    assert_bytes_eq(&fs::read(t.path("file")).expect("read"), &data, "file");
    m.umount();
    t.assert_fsck_clean("after aborting a hung daemon");
}

/// In the foreground (as under systemd) the daemon's own exit status is visible: 0.
#[test]
fn aborted_foreground_daemon_exits_0() {
    let Some(t) = TestFs::new() else { return };
    let daemon = Command::new(bin())
        .args(t.mount_args_with(&[], &["-f"]))
        .env_remove("SPOOLFS_DAEMON_CHILD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start spoolfs mount -f");
    // Mounted and answering (the stat waits for the FUSE handshake).
    assert!(
        wait_until(Duration::from_secs(10), || {
            is_mounted(&t.mnt) && fs::metadata(&t.mnt).is_ok()
        }),
        "the foreground daemon did not come up"
    );
    assert_eq!(lock_pid(&t.data), Some(daemon.id()));
    fs::write(t.path("f"), b"kept").expect("write");

    let out = abort_cmd(&t.mnt);
    assert!(out.status.success(), "spoolfs abort: {}", describe(&out));
    let daemon = daemon.wait_with_output().expect("wait for the daemon");
    let log = stderr(&daemon);
    assert_eq!(daemon.status.code(), Some(0), "daemon exit, log:\n{log}");
    assert!(log.contains("FUSE connection aborted"), "log:\n{log}");
    assert_lock_free(&t.data);
    assert_enotconn(&t.mnt);

    let out = spoolfs([
        OsStr::new("umount"),
        OsStr::new("--lazy"),
        t.mnt.as_os_str(),
    ]);
    assert!(out.status.success(), "umount --lazy: {}", describe(&out));
    let m = t.mount();
    assert_eq!(fs::read(t.path("f")).expect("read"), b"kept");
    m.umount();
}

#[test]
fn abort_refuses_what_is_not_a_spoolfs_mount() {
    let Some(t) = TestFs::new() else { return };
    let out = abort_cmd(&t.mnt);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr(&out).contains("not mounted"), "{}", describe(&out));

    let out = abort_cmd(Path::new("/proc"));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).contains("not a spoolfs mount"),
        "{}",
        describe(&out)
    );
}
