//! Disk full. The data dir lives on a small tmpfs and the mount keeps a 16 MiB reserve
//! (`-o reserve=16M`). Operations that need space are answered ENOSPC before they change
//! anything, operations that free space keep working, the daemon stays up, closed files stay
//! intact, and once there is space again (files deleted through the mount, or space freed next
//! to the database) writes succeed again; `spoolfs fsck` is clean afterwards. The last test
//! takes the reserve away from outside, so that redb itself hits ENOSPC: the daemon then
//! stops serving (EIO, `/readyz` 503, `spoolfs status` failed) without losing anything that
//! was durable, and a new mount recovers.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::disk::*;
use common::*;

const RESERVE: &str = "reserve=16M";
const MIB: u64 = 1 << 20;

/// The tests of this file run one at a time. A test thread that starts a command (`spoolfs`,
/// `mount`) forks, which copies every open descriptor of the process into the child until its
/// exec closes them, and the kernel sends a FLUSH for each of those closes: another test's file
/// with staged content would be persisted at a moment that test does not control (say, while
/// it is filling the disk on purpose).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_file(p: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = File::create(p)?;
    f.write_all(data)?;
    close_checked(f)
}

#[track_caller]
fn assert_enospc<T: std::fmt::Debug>(r: io::Result<T>, what: &str) {
    assert_eq!(errno_of(r, what), libc::ENOSPC, "{what}");
}

/// Every (name, content seed, size) must read back with its content.
#[track_caller]
fn verify(t: &TestFs, files: &[(String, u64, usize)], when: &str) {
    for (name, seed, size) in files {
        let got = read_all(&t.path(name)).unwrap_or_else(|e| panic!("{when}: read {name}: {e}"));
        assert_bytes_eq(
            &got,
            &seeded_bytes(*seed, *size),
            &format!("{when}: {name}"),
        );
    }
}

/// Write files of each size in turn until the mount refuses one with ENOSPC (the smaller
/// sizes close the gap the larger ones leave). Returns the files that were closed.
fn fill_through_mount(t: &TestFs, dir: &str, sizes: &[usize]) -> Vec<(String, u64, usize)> {
    let mut closed = Vec::new();
    let mut seed = 0u64;
    for &size in sizes {
        loop {
            seed += 1;
            assert!(seed < 100_000, "the mount never ran out of space");
            let name = format!("{dir}/msg-{seed}");
            match write_file(&t.path(&name), &seeded_bytes(seed, size)) {
                Ok(()) => closed.push((name, seed, size)),
                Err(e) => {
                    assert_eq!(
                        e.raw_os_error(),
                        Some(libc::ENOSPC),
                        "writing {name} ({size} bytes) failed with {e}, expected ENOSPC"
                    );
                    // What a mail server does with a message it could not write.
                    match fs::remove_file(t.path(&name)) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => panic!("remove {name} after ENOSPC: {e}"),
                    }
                    break;
                }
            }
        }
    }
    closed
}

#[test]
fn filling_the_mount_gives_enospc_and_deleting_files_makes_room_again() {
    let _serial = serial();
    let Some(t) = TestFs::new() else { return };
    let _disk = ScratchFs::tmpfs(&t.data, "96m");
    let port = free_port();
    let m = mount_with_metrics(&t, &[RESERVE], port);
    fs::create_dir(t.path("input")).expect("mkdir input");
    fs::write(t.path("input/keep"), b"an existing file").expect("write keep");

    let started = Instant::now();
    let mut closed = fill_through_mount(&t, "input", &[512 << 10, 32 << 10, 2048, 0]);
    let big = closed.iter().filter(|f| f.2 == 512 << 10).count();
    eprintln!(
        "filled: {} files ({big} of 512 KiB) in {:?}; {} bytes free on the tmpfs",
        closed.len(),
        started.elapsed(),
        free_bytes(&t.data)
    );
    // 96 MiB less the 16 MiB reserve, each content byte stored twice (redb pages): ~78.
    assert!(
        big >= 50,
        "only {big} files of 512 KiB fitted before ENOSPC"
    );
    // The reserve is still there: the database never hit the full disk.
    assert!(
        free_bytes(&t.data) >= 15 * MIB,
        "the reserve was eaten: {} bytes free",
        free_bytes(&t.data)
    );

    // Everything that needs space is refused, precisely.
    let p = |s: &str| t.path(s);
    assert_enospc(File::create(p("input/new")), "create");
    assert_enospc(fs::create_dir(p("input/dir")), "mkdir");
    assert_enospc(
        std::os::unix::fs::symlink("target", p("input/link")),
        "symlink",
    );
    assert_enospc(fs::hard_link(p("input/keep"), p("input/hard")), "link");
    assert_enospc(mkfifo(&p("input/fifo"), 0o644), "mknod");
    assert_enospc(
        setxattr(&p("input/keep"), b"user.note", &[7u8; 1000], 0),
        "setxattr",
    );
    let mut f = OpenOptions::new()
        .append(true)
        .open(p("input/keep"))
        .expect("open an existing file for appending");
    assert_enospc(f.write_all(&[1u8; 65536]), "write");
    close_checked(f).expect("close after a refused write (nothing staged)");
    for name in ["new", "dir", "link", "hard", "fifo"] {
        assert_eq!(
            errno_of(fs::symlink_metadata(p(&format!("input/{name}"))), name),
            libc::ENOENT,
            "a refused operation left {name} behind"
        );
    }
    // Reading, listing, renaming, metadata changes still work; statfs shows no space.
    m.assert_healthy();
    verify(&t, &closed, "while full");
    assert_eq!(
        read_all(&p("input/keep")).expect("read keep"),
        b"an existing file"
    );
    fs::rename(p("input/keep"), p("input/kept")).expect("rename while full");
    fs::set_permissions(
        p("input/kept"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod while full");
    assert!(
        free_bytes(&t.mnt) < MIB,
        "statfs of the mount shows {} bytes available although writes are refused",
        free_bytes(&t.mnt)
    );
    let (_, metrics) = http_get(port, "/metrics").expect("scrape");
    assert!(
        errors_answered(port, "ENOSPC") >= 8.0,
        "ENOSPC answers not counted:\n{metrics}"
    );
    assert_eq!(sample(&metrics, "spoolfs_storage_errors_total"), Some(0.0));
    assert_eq!(sample(&metrics, "spoolfs_storage_failed"), Some(0.0));
    assert_eq!(
        sample(&metrics, "spoolfs_space_reserve_bytes"),
        Some((16 * MIB) as f64)
    );
    let available = sample(&metrics, "spoolfs_data_dir_available_bytes").unwrap_or(0.0);
    assert!(
        (15.0 * MIB as f64..18.0 * MIB as f64).contains(&available),
        "spoolfs_data_dir_available_bytes {available}"
    );
    assert!(
        t.log().contains("nearly full"),
        "no warning about the full disk in the log:\n{}",
        t.log()
    );

    // Delete every other message: the database file keeps its size (the tmpfs stays as
    // full), but the room inside it is found and writes are admitted again.
    let mut kept = Vec::new();
    for (i, f) in closed.drain(..).enumerate() {
        if i % 2 == 0 {
            fs::remove_file(t.path(&f.0)).expect("unlink while full");
        } else {
            kept.push(f);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = Vec::new();
    let mut refusals = 0;
    for seed in 1_000_000..1_000_010u64 {
        let name = format!("input/again-{seed}");
        loop {
            match write_file(&t.path(&name), &seeded_bytes(seed, 512 << 10)) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && again.is_empty() => {
                    // The room is found by a scan that starts once the deletions are durable.
                    refusals += 1;
                    let _ = fs::remove_file(t.path(&name));
                    assert!(
                        Instant::now() < deadline,
                        "writes still refused 10 s after deleting half of the files"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("write {name} after deleting files: {e}"),
            }
        }
        again.push((name, seed, 512 << 10));
    }
    eprintln!("writes admitted again after {refusals} refusals");
    fs::create_dir(p("input/dir")).expect("mkdir once there is room");
    m.assert_healthy();
    verify(&t, &kept, "after deletions");
    verify(&t, &again, "after deletions");
    assert!(
        t.log().contains("space is available again"),
        "no recovery line in the log:\n{}",
        t.log()
    );

    m.umount();
    t.assert_fsck_clean("after the disk-full round");
    let m = t.mount_full(&[RESERVE], &[]);
    verify(&t, &kept, "after remount");
    verify(&t, &again, "after remount");
    m.umount();
    t.assert_fsck_clean("after remount");
}

#[test]
fn space_taken_from_outside_is_refused_and_given_back() {
    let _serial = serial();
    let Some(t) = TestFs::new() else { return };
    let _disk = ScratchFs::tmpfs(&t.data, "96m");
    let m = t.mount_full(&[RESERVE], &[]);
    let mut files = Vec::new();
    for seed in 1..=10u64 {
        let name = format!("msg-{seed}");
        write_file(&t.path(&name), &seeded_bytes(seed, 256 << 10)).expect("write");
        files.push((name, seed, 256 << 10));
    }
    // A message being written while the disk fills up: 8 MiB staged, not yet closed (more
    // than the database file can have room for inside: it holds ~6 MB).
    let staged = seeded_bytes(77, 8 << 20);
    let mut open = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o644)
        .open(t.path("in-flight"))
        .expect("create in-flight");
    open.write_all(&staged).expect("write in-flight");

    // Something else on the data dir's filesystem eats all but 6 MiB (under half the reserve).
    let filler = t.data.join("filler");
    fill(&filler, 6 * MIB);
    std::thread::sleep(Duration::from_millis(250)); // the daemon reads free space every 100 ms

    assert_enospc(File::create(t.path("new")), "create");
    assert_enospc(fs::create_dir(t.path("dir")), "mkdir");
    assert_enospc(open.write_all(&[1u8; 4096]), "write to the open file");
    // Its staged content cannot be persisted now: fsync says so, and keeps it staged.
    assert_enospc(open.sync_all(), "fsync of staged content");
    // Reading and deleting work.
    verify(&t, &files, "while the filler is there");
    let gone = files.remove(0);
    fs::remove_file(t.path(&gone.0)).expect("unlink while full");
    fs::rename(t.path("msg-2"), t.path("msg-2b")).expect("rename while full");
    files[0].0 = "msg-2b".into();
    m.assert_healthy();

    fs::remove_file(&filler).expect("remove the filler");
    std::thread::sleep(Duration::from_millis(250));
    open.sync_all().expect("fsync once there is space again");
    let more = seeded_bytes(78, 64 << 10);
    open.write_all(&more)
        .expect("write once there is space again");
    close_checked(open).expect("close once there is space again");
    write_file(&t.path("new"), b"new mail").expect("create once there is space again");
    let mut expected = staged.clone();
    expected.extend_from_slice(&more);
    assert_bytes_eq(
        &read_all(&t.path("in-flight")).expect("read in-flight"),
        &expected,
        "the file written across the full disk",
    );
    verify(&t, &files, "after the filler is gone");
    m.umount();
    t.assert_fsck_clean("after the filler round");
}

#[test]
fn a_disk_full_under_the_database_fails_until_space_is_back_then_recovers_in_place() {
    let _serial = serial();
    let Some(t) = TestFs::new() else { return };
    let _disk = ScratchFs::tmpfs(&t.data, "64m");
    let port = free_port();
    let m = mount_with_metrics(&t, &[RESERVE], port);
    let mut files = Vec::new();
    for seed in 1..=5u64 {
        let name = format!("msg-{seed}");
        write_file(&t.path(&name), &seeded_bytes(seed, 256 << 10)).expect("write");
        files.push((name, seed, 256 << 10));
    }
    // 8 MiB staged in a file still open, then all of the filesystem taken but 256 KiB (room
    // for the daemon's log, which lives in the data dir; none for the 16 MiB of pages).
    let mut big = File::create(t.path("big")).expect("create big");
    big.write_all(&seeded_bytes(99, 8 << 20))
        .expect("write big");
    let filler = t.data.join("filler");
    fill(&filler, 256 << 10);
    std::thread::sleep(Duration::from_millis(250));

    // close: the flush is refused (ENOSPC); the release that follows must persist the content
    // anyway, and redb runs out of space doing so.
    assert_enospc(close_checked(big), "close of the staged file");
    let probe = File::open(t.path("msg-1")).expect("open msg-1");
    let e = errno_of(probe.sync_all(), "fsync after redb ran out of space");
    assert!(
        e == libc::ENOSPC || e == libc::EIO,
        "fsync after redb ran out of space: errno {e}"
    );
    drop(probe);
    assert!(
        wait_until(Duration::from_secs(10), || fs::metadata(t.path("msg-1"))
            .is_err_and(|e| e.raw_os_error() == Some(libc::EIO))),
        "the daemon did not go into its failed state:\n{}",
        t.log()
    );
    assert!(m.alive(), "the daemon died");
    let (status, body) = http_get(port, "/readyz").expect("readyz");
    assert_eq!(status, 503, "readyz: {body}");
    assert!(body.contains("storage failed"), "readyz: {body}");
    let (_, metrics) = http_get(port, "/metrics").expect("scrape");
    assert_eq!(sample(&metrics, "spoolfs_storage_failed"), Some(1.0));
    assert!(sample(&metrics, "spoolfs_storage_errors_total").is_some_and(|n| n >= 1.0));
    let out = spoolfs([std::ffi::OsStr::new("status"), t.mnt.as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "status: {}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("state: failed: storage I/O error"),
        "status: {}",
        describe(&out)
    );
    let log = t.log();
    assert!(
        log.contains("storage I/O error") && log.contains("No space left on device"),
        "no storage error line naming ENOSPC in the log:\n{log}"
    );
    assert!(
        log.contains("free space on it"),
        "no hint in the log:\n{log}"
    );

    // Space comes back: the daemon reopens the database, replays its log and commits what
    // was pending, without a remount.
    fs::remove_file(&filler).expect("remove the filler");
    assert!(
        wait_until(Duration::from_secs(10), || {
            http_get(port, "/readyz").is_some_and(|(status, _)| status == 200)
        }),
        "the daemon did not recover once space was back:\n{}",
        t.log()
    );
    verify(&t, &files, "after recovering in place");
    write_file(&t.path("recovered"), b"no remount needed").expect("write after recovery");
    let (_, mut metrics) = http_get(port, "/metrics").expect("scrape");
    assert_eq!(sample(&metrics, "spoolfs_storage_failed"), Some(0.0));
    // The probe was closed while the database was closed: its release was applied after the
    // reopen, not dropped (no handle leaks). The kernel sends a release after close() has
    // returned, so the last file's may still be on its way: wait for it, a leak never ends.
    let released = wait_until(Duration::from_secs(10), || {
        metrics = http_get(port, "/metrics").map_or_else(String::new, |(_, m)| m);
        sample(&metrics, "spoolfs_open_handles") == Some(0.0)
    });
    assert!(
        released,
        "a handle released during the failure leaked:\n{metrics}"
    );
    assert!(
        t.log().contains("storage recovered"),
        "no recovery line in the log:\n{}",
        t.log()
    );
    m.umount();
    t.assert_fsck_clean("after redb ran out of space");
    let m = t.mount_full(&[RESERVE], &[]);
    verify(&t, &files, "after remount");
    assert_eq!(
        fs::read(t.path("recovered")).expect("read recovered"),
        b"no remount needed"
    );
    write_file(&t.path("after"), b"works again").expect("write after remount");
    m.umount();
    t.assert_fsck_clean("after remount");
}

/// Eight writers at once, each writing 4 MiB messages, until the disk is full. A flush moves
/// megabytes from the memfds into the pending changes, which the next commits write; the
/// guard must count them until then. (It did not: the free space it read after a flush did
/// not show them yet, it admitted more against it, and redb ran into ENOSPC in 3 runs of 4.)
#[test]
fn concurrent_writers_filling_the_disk_get_enospc_and_never_reach_the_database() {
    let _serial = serial();
    let Some(t) = TestFs::new() else { return };
    let _disk = ScratchFs::tmpfs(&t.data, "64m");
    let port = free_port();
    let m = mount_with_metrics(&t, &[RESERVE], port);
    let outcomes = std::thread::scope(|s| {
        let writers: Vec<_> = (0..8u64)
            .map(|w| {
                let t = &t;
                s.spawn(move || {
                    let mut closed = Vec::new();
                    for k in 0..6u64 {
                        let seed = 100 + w * 10 + k;
                        let name = format!("w{w}-{k}");
                        match write_file(&t.path(&name), &seeded_bytes(seed, 4 << 20)) {
                            Ok(()) => closed.push((name, seed, 4 << 20)),
                            Err(e) => assert_eq!(
                                e.raw_os_error(),
                                Some(libc::ENOSPC),
                                "writer {w}, message {k}: {e}"
                            ),
                        }
                    }
                    closed
                })
            })
            .collect();
        writers
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect::<Vec<_>>()
    });
    let closed: Vec<_> = outcomes.into_iter().flatten().collect();
    eprintln!(
        "{} of 48 messages of 4 MiB closed; {} bytes free on the tmpfs",
        closed.len(),
        free_bytes(&t.data)
    );
    assert!(closed.len() < 48, "192 MiB fitted into 48 MiB of room");
    let (_, metrics) = http_get(port, "/metrics").expect("scrape");
    assert_eq!(
        sample(&metrics, "spoolfs_storage_failed"),
        Some(0.0),
        "the database hit the full disk:\n{}",
        t.log()
    );
    // Growth stops at the reserve, and what was admitted is charged at twice its size, so
    // persisting it may dip into the reserve by no more than redb's rounding.
    assert!(
        free_bytes(&t.data) >= 14 * MIB,
        "the reserve was eaten: {} bytes free",
        free_bytes(&t.data)
    );
    m.assert_healthy();
    verify(&t, &closed, "while full");
    m.umount();
    t.assert_fsck_clean("after concurrent writers filled the disk");
}
