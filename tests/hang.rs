//! A hung disk under a running daemon. The data dir is an ext4 filesystem on a loop device,
//! frozen with FIFREEZE (`fsfreeze -f`): every write and fsync on it blocks until it is
//! thawed, the way a disk or a SAN path that stopped answering behaves. The daemon's commit
//! blocks in its log write; nothing the kernel sends may hang with it.
//!
//! Expected, with `-o commit_timeout=2`:
//! - requests that need no durability (stat, readdir, reads of closed files, new files and
//!   their writes) are answered while the disk hangs;
//! - a close or fsync, which must be durable, is answered EIO once it waited the timeout, and
//!   the wait is counted in `spoolfs_storage_errors_total`;
//! - a caller SIGKILLed inside fsync goes away at once, with `-o commit_timeout=3600` (the
//!   daemon sees the pending SIGKILL and answers EINTR: fuser cannot pass the kernel's
//!   INTERRUPT on, so without that the kernel would wait for the commit); its close at exit
//!   (a FLUSH from an exiting task) is answered the same way;
//! - once the disk is thawed, the stuck commit completes, closes are durable again, and what
//!   was written during the hang (answered EIO, but kept pending) is committed too: nothing
//!   is lost, `spoolfs fsck` is clean and every file reads back after a remount.
//!
//! The waits below are hang guards (a request not answered at all fails the test), not
//! timing assertions.

mod common;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::disk::*;
use common::*;

const TIMEOUT_S: u64 = 2;
/// How long past the commit timeout any request may take before the test calls it hung.
const HANG_GUARD: Duration = Duration::from_secs(30);

fn write_file(p: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = File::create(p)?;
    f.write_all(data)?;
    close_checked(f)
}

/// Run `f` on a thread and return its result, or fail the test if it does not return within
/// `limit` (the thread stays blocked in its request; the guards thaw and unmount on unwind,
/// which releases it).
#[track_caller]
fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what}: no answer within {limit:?} (hung)"))
}

fn storage_errors(port: u16) -> f64 {
    let (_, metrics) = http_get(port, "/metrics").expect("scrape /metrics");
    sample(&metrics, "spoolfs_storage_errors_total").unwrap_or(0.0)
}

/// The tests of this file run one at a time: a test forking a child (python3, mount) copies
/// every open descriptor into it until its exec closes them, and each of those closes is a
/// FLUSH, which would wait on the other test's frozen disk.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// spoolfs in the foreground on an ext4 loop filesystem (which the test freezes), with
/// `-o commit_timeout=SECONDS`, metrics on a free port and its log outside the data dir.
fn mount_on_ext4(t: &TestFs, timeout_s: u64) -> (ScratchFs, MountGuard, u16, PathBuf) {
    let disk = ScratchFs::ext4(&t.data, &t.root().join("disk.img"), 128);
    let port = free_port();
    let log = t.root().join("daemon.log");
    let timeout_opt = format!("commit_timeout={timeout_s}");
    let m = mount_foreground(t, &[&timeout_opt], port, &log);
    (disk, m, port, log)
}

#[test]
fn a_hung_disk_bounds_every_wait_and_loses_nothing() {
    let _serial = serial();
    let Some(t) = TestFs::new() else { return };
    let (disk, m, port, log) = mount_on_ext4(&t, TIMEOUT_S);
    let daemon_log = || fs::read_to_string(&log).unwrap_or_default();

    // Durable before the hang.
    fs::create_dir(t.path("queue")).expect("mkdir queue");
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for seed in 1..=20u64 {
        let name = format!("queue/msg-{seed}");
        let data = seeded_bytes(seed, (seed as usize * 7_919) % (100 << 10));
        write_file(&t.path(&name), &data).expect("write before the hang");
        files.push((name, data));
    }
    fsync_dir(&t.path("queue")).expect("fsync queue");
    let errors_before = storage_errors(port);

    let frozen = disk.freeze();
    let waited = HANG_GUARD + Duration::from_secs(TIMEOUT_S);

    // Requests that need no durability are answered while the disk hangs.
    let (p, expect) = (t.path(&files[3].0), files[3].1.clone());
    let got = bounded(
        "read a closed file during the hang",
        HANG_GUARD,
        move || read_all(&p),
    );
    assert_bytes_eq(
        &got.expect("read during the hang"),
        &expect,
        "read during the hang",
    );
    let q = t.path("queue");
    let listed = bounded("readdir during the hang", HANG_GUARD, move || {
        fs::read_dir(q).map(|d| d.count())
    });
    assert_eq!(listed.expect("readdir during the hang"), files.len());

    // A close must be durable: EIO after the timeout, not a hang, not a silent success.
    let during = seeded_bytes(1000, 50_000);
    let (p, data) = (t.path("queue/during"), during.clone());
    let start = Instant::now();
    let closed = bounded("close during the hang", waited, move || {
        write_file(&p, &data)
    });
    assert_eq!(
        errno_of(closed, "close during the hang"),
        libc::EIO,
        "a close that could not be made durable"
    );
    eprintln!(
        "close during the hang answered EIO after {:?}",
        start.elapsed()
    );
    assert!(
        storage_errors(port) > errors_before,
        "the expired wait is not counted in spoolfs_storage_errors_total"
    );
    let text = daemon_log();
    assert!(
        text.contains("did not finish in time") && text.contains(&t.data.display().to_string()),
        "no log line names the stuck commit and the data dir:\n{text}"
    );

    assert!(
        m.alive(),
        "the daemon died during the hang: {}",
        daemon_log()
    );

    // The disk answers again: the stuck commit completes and closes are durable again.
    frozen.thaw();
    let after = seeded_bytes(2000, 30_000);
    let (p, data) = (t.path("queue/after"), after.clone());
    bounded("close after the thaw", waited, move || {
        write_file(&p, &data)
    })
    .expect("a close after the disk answers again");
    // What was written during the hang was kept pending and is committed now.
    files.push(("queue/during".into(), during));
    files.push(("queue/after".into(), after));

    let (_, metrics) = http_get(port, "/metrics").expect("scrape /metrics");
    assert_eq!(sample(&metrics, "spoolfs_storage_failed"), Some(0.0));
    assert_eq!(
        http_get(port, "/readyz").map(|r| r.0),
        Some(200),
        "readyz after the thaw"
    );
    assert!(handles_released(port), "handles leaked after the hang");
    let text = daemon_log();
    assert!(!text.contains("panicked"), "the daemon panicked:\n{text}");

    m.umount();
    t.assert_fsck_clean("after the hang");
    let m = t.mount();
    for (name, data) in &files {
        let got = read_all(&t.path(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
        assert_bytes_eq(&got, data, name);
    }
    m.umount();
    drop(disk);
}

#[test]
fn a_caller_killed_while_it_waits_for_a_hung_disk_goes_away() {
    let _serial = serial();
    let Some(t) = TestFs::new() else { return };
    let (disk, m, port, log) = mount_on_ext4(&t, 3600);
    let daemon_log = || fs::read_to_string(&log).unwrap_or_default();
    fs::create_dir(t.path("queue")).expect("mkdir queue");
    let frozen = disk.freeze();

    // Inside fsync (a commit that cannot finish for an hour): killed, it must go away, and
    // so must its close at exit.
    let script = "import os, sys\n\
                  fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o600)\n\
                  os.write(fd, b'x' * 4096)\n\
                  print('fsync', flush=True)\n\
                  os.fsync(fd)\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .arg(t.path("queue/killed"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python3");
    let mut line = String::new();
    io::BufRead::read_line(
        &mut io::BufReader::new(child.stdout.take().expect("child stdout")),
        &mut line,
    )
    .expect("read the child's output");
    assert_eq!(line.trim(), "fsync", "the child did not reach its fsync");
    std::thread::sleep(Duration::from_millis(300)); // let it enter the request
    child.kill().expect("SIGKILL the child");
    let status = bounded("a caller SIGKILLed inside fsync", HANG_GUARD, move || {
        child.wait()
    });
    assert!(status.is_ok(), "wait for the killed child: {status:?}");
    assert!(errors_answered(port, "EINTR") >= 1.0, "no EINTR answered");
    assert!(
        daemon_log().contains("answered EINTR"),
        "no log line for the abandoned wait:\n{}",
        daemon_log()
    );

    // The disk answers again: the commit completes, the handle was released, nothing leaked.
    frozen.thaw();
    let p = t.path("queue/after");
    bounded("close after the thaw", HANG_GUARD, move || {
        write_file(&p, b"after the thaw")
    })
    .expect("a close after the disk answers again");
    assert!(handles_released(port), "the killed caller's handle leaked");
    assert!(m.alive(), "the daemon died: {}", daemon_log());
    m.umount();
    t.assert_fsck_clean("after the killed caller");
    let m = t.mount();
    let killed = fs::metadata(t.path("queue/killed")).expect("the killed child's file");
    assert!(killed.len() <= 4096, "the killed child's file: {killed:?}");
    m.umount();
    drop(disk);
}
