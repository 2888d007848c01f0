//! Storage I/O errors through a running daemon. The data dir is an ext4 filesystem on a loop
//! device; after files are made durable, the filesystem is shut down (FS_IOC_SHUTDOWN, the
//! xfstests "godown": every later read, write and fsync on it fails with EIO, as after a disk
//! failure, and what was not yet in its journal is lost as in a power cut).
//!
//! Why this fault: device-mapper's `error`/`flakey` targets and nbd (qemu-nbd with blkdebug)
//! need kernel modules that CI containers (this one included: no /dev/mapper/control, no nbd
//! module, no modprobe) do not have, while loop devices and ext4 are always there. The fault
//! is a real one, reached through the kernel by the daemon's own syscalls, so no test knob is
//! compiled into the daemon; a fault-injecting redb backend would test less (not the real file
//! backend, nor the kernel's answer).
//!
//! Expected: the request that hits the error gets EIO; the daemon stays up and answers every
//! later request with EIO (redb cannot go on after an I/O error; see `health`); the error is
//! counted in `spoolfs_storage_errors_total`, `spoolfs_storage_failed` is 1, `/readyz` fails,
//! `spoolfs status` says why, and the log names the data dir and what to do. After unmounting,
//! remounting the ext4 (journal replay) and mounting spoolfs again, everything that was closed
//! or fsynced before the fault is intact and `spoolfs fsck` is clean.

mod common;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use common::disk::*;
use common::*;

fn write_file(p: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = File::create(p)?;
    f.write_all(data)?;
    close_checked(f)
}

/// (name, seed, size) of every file that was made durable.
type Files = Vec<(String, u64, usize)>;

#[track_caller]
fn verify(t: &TestFs, files: &Files, when: &str) {
    for (name, seed, size) in files {
        let got = read_all(&t.path(name)).unwrap_or_else(|e| panic!("{when}: read {name}: {e}"));
        assert_bytes_eq(
            &got,
            &seeded_bytes(*seed, *size),
            &format!("{when}: {name}"),
        );
    }
}

#[test]
fn a_failing_disk_gives_eio_keeps_the_daemon_up_and_loses_nothing_durable() {
    let Some(t) = TestFs::new() else { return };
    let mut disk = ScratchFs::ext4(&t.data, &t.root().join("disk.img"), 128);
    let port = free_port();
    let log = t.root().join("daemon.log");
    let m = mount_foreground(&t, &[], port, &log);
    let daemon_log = || fs::read_to_string(&log).unwrap_or_default();

    // Durable before the fault: closed files (FLUSH is durable), a rename and a directory
    // made durable by fsync of the directory, an xattr followed by an fsync.
    fs::create_dir(t.path("queue")).expect("mkdir queue");
    let mut files: Files = Vec::new();
    for seed in 1..=30u64 {
        let name = format!("queue/msg-{seed}");
        let size = (seed as usize * 37_123) % (300 << 10);
        write_file(&t.path(&name), &seeded_bytes(seed, size)).expect("write");
        files.push((name, seed, size));
    }
    fs::rename(t.path("queue/msg-1"), t.path("queue/renamed")).expect("rename");
    files[0].0 = "queue/renamed".into();
    fsync_dir(&t.path("queue")).expect("fsync queue");
    setxattr(&t.path("queue/msg-2"), b"user.state", b"queued", 0).expect("setxattr");
    File::open(t.path("queue/msg-2"))
        .and_then(|f| f.sync_all())
        .expect("fsync msg-2");

    disk.shut_down();

    // The next request that reaches the disk fails with EIO (creating the file may still
    // succeed in redb's memory; its close, which must be durable, cannot).
    let e = errno_of(
        write_file(&t.path("queue/after"), &seeded_bytes(99, 10_000)),
        "write a file after the disk failed",
    );
    assert_eq!(e, libc::EIO, "write after the disk failed");
    // From now on everything is EIO, reads included; the daemon is up.
    assert_eq!(
        errno_of(fs::metadata(t.path("queue/msg-3")), "stat after the fault"),
        libc::EIO
    );
    assert_eq!(
        errno_of(fs::read_dir(t.path("queue")), "readdir after the fault"),
        libc::EIO
    );
    assert!(m.alive(), "the daemon died: {}", daemon_log());
    std::thread::sleep(Duration::from_millis(1500)); // idle commits would retry here: they do not
    assert!(m.alive(), "the daemon died: {}", daemon_log());

    let (_, metrics) = http_get(port, "/metrics").expect("scrape /metrics");
    let errors = sample(&metrics, "spoolfs_storage_errors_total").unwrap_or(0.0);
    assert!(errors >= 1.0, "storage error not counted:\n{metrics}");
    assert!(
        errors <= 3.0,
        "storage errors counted per refused request or retry ({errors}):\n{metrics}"
    );
    assert_eq!(sample(&metrics, "spoolfs_storage_failed"), Some(1.0));
    assert!(
        sum_samples(&metrics, "spoolfs_request_errors_total", &["errno=\"EIO\""]) >= 3.0,
        "EIO answers not counted:\n{metrics}"
    );
    let (status, body) = http_get(port, "/readyz").expect("readyz");
    assert_eq!(status, 503, "readyz after the fault: {body}");
    assert!(body.contains("storage failed"), "readyz: {body}");
    assert_eq!(http_get(port, "/healthz").map(|r| r.0), Some(200));
    let out = spoolfs([OsStr::new("status"), t.mnt.as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "status: {}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("state: failed: storage I/O error") && text.contains("Input/output error"),
        "status: {}",
        describe(&out)
    );
    let text = daemon_log();
    let line = text
        .lines()
        .find(|l| l.contains("storage I/O error") && l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no storage error line in the log:\n{text}"));
    eprintln!("the daemon logged: {line}");
    assert!(
        line.contains(&t.data.display().to_string())
            && line.contains("Input/output error")
            && line.contains("check the disk"),
        "the storage error line lacks the data dir, the error or the hint: {line}"
    );
    assert_eq!(
        text.matches("storage I/O error").count(),
        1,
        "the failure is logged more than once:\n{text}"
    );
    assert!(!text.contains("panicked"), "the daemon panicked:\n{text}");

    // Unmount (the daemon's last commit fails, it exits anyway), bring the disk back with its
    // journal, and check that nothing durable was lost.
    m.umount();
    disk.remount();
    t.assert_fsck_clean("after the disk failure");
    let m = t.mount();
    verify(&t, &files, "after the disk failure");
    assert_eq!(
        getxattr(&t.path("queue/msg-2"), b"user.state").expect("getxattr"),
        b"queued"
    );
    assert_eq!(
        errno_of(fs::metadata(t.path("queue/msg-1")), "the renamed-away name"),
        libc::ENOENT
    );
    write_file(&t.path("queue/after"), b"works again").expect("write after recovery");
    m.umount();
    t.assert_fsck_clean("after recovery");
    drop(disk);
}
