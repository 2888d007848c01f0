//! `-o writeback_cache`: the kernel keeps written data in its page cache and sends it to the
//! daemon in large writes at fsync, close or writeback time. What must still hold:
//! - partly written pages come out right. The kernel fills the rest of such a page by
//!   reading through the handle it writes back with, even one the user opened write-only;
//! - `close()` returning still means the data is durable (it survives a remount);
//! - a full disk is reported, at `fsync()` or `close()` instead of `write()`, and the mount
//!   keeps working once there is room again.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::disk::*;
use common::*;

const WRITEBACK: &str = "writeback_cache";

/// One test at a time: the disk-full test fills a tmpfs on purpose, and a fork by another test
/// thread would carry open descriptors (and their FLUSHes) into the moment it does.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn partial_pages_written_through_write_only_handles_read_back_after_a_remount() {
    let _serial = serial();
    let Some(t) = TestFs::new() else { return };
    let m = t.mount_with(&[WRITEBACK]);
    let mut rng = Rng::new(7);
    let mut model = seeded_bytes(1, 3 * 4096 + 1000);
    fs::write(t.path("msg"), &model).expect("write msg");
    for round in 0..8 {
        // Drop the file's pages from the kernel's cache, so that each partial write below
        // makes the kernel read the rest of its page through the write-only handle.
        drop_cached_pages(&t.path("msg"));
        let f = OpenOptions::new()
            .write(true)
            .open(t.path("msg"))
            .expect("open write-only");
        for _ in 0..5 {
            let len = usize::try_from(rng.range(1, 700)).expect("small");
            let at = usize::try_from(rng.range(0, 4 * 4096)).expect("small");
            let data = rng.bytes(len);
            f.write_all_at(&data, u64::try_from(at).expect("small"))
                .unwrap_or_else(|e| panic!("round {round}: pwrite {len} at {at}: {e}"));
            if model.len() < at + len {
                model.resize(at + len, 0);
            }
            model[at..at + len].copy_from_slice(&data);
        }
        close_checked(f).unwrap_or_else(|e| panic!("round {round}: close: {e}"));
        let got = read_all(&t.path("msg")).expect("read msg");
        assert_bytes_eq(&got, &model, &format!("round {round}, same mount"));
    }
    m.umount();
    t.assert_fsck_clean("after the writes");

    // What close() returned for is on disk, not only in the old mount's page cache.
    let m = t.mount_with(&[WRITEBACK]);
    let got = read_all(&t.path("msg")).expect("read msg after remount");
    assert_bytes_eq(&got, &model, "after a remount");
    m.umount();
}

/// `posix_fadvise(DONTNEED)`: the kernel drops the file's clean cached pages.
fn drop_cached_pages(p: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let f = File::open(p).expect("open for fadvise");
    // SAFETY: a valid descriptor, owned by `f` for the duration of the call.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

#[test]
fn a_full_disk_is_reported_by_fsync_or_close_and_the_mount_recovers() {
    let _serial = serial();
    let Some(t) = TestFs::new() else { return };
    let _disk = ScratchFs::tmpfs(&t.data, "64m");
    let m = t.mount_with(&[WRITEBACK, "reserve=16M"]);
    let kept = seeded_bytes(3, 100_000);
    fs::write(t.path("kept"), &kept).expect("write kept");

    // 64 MiB less the reserve cannot hold 80 MiB. The writes land in the page cache; the
    // refusal comes when the kernel hands the data over, and fsync reports it.
    let big = seeded_bytes(4, 80 << 20);
    let mut f = File::create(t.path("big")).expect("create big");
    let wrote = f.write_all(&big);
    let synced = f.sync_all();
    let closed = close_checked(f);
    let refused = [&wrote, &synced, &closed]
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| e.raw_os_error())
        .collect::<Vec<_>>();
    eprintln!("80 MiB into 48 MiB: write {wrote:?}, fsync {synced:?}, close {closed:?}");
    assert!(
        !refused.is_empty(),
        "80 MiB went into 48 MiB of room without an error"
    );
    assert!(
        refused.iter().all(|e| *e == Some(libc::ENOSPC)),
        "expected ENOSPC, got write {wrote:?}, fsync {synced:?}, close {closed:?}"
    );
    assert!(
        synced.is_err() || wrote.is_err(),
        "fsync returned success for data that did not fit (close said {closed:?})"
    );

    // Without an fsync, close() is the one that reports it (if the create itself is not
    // refused already).
    let (wrote, closed) = match File::create(t.path("big2")) {
        Ok(mut f) => (f.write_all(&big), close_checked(f)),
        Err(e) => (Err(e), Ok(())),
    };
    eprintln!("80 MiB more without fsync: write {wrote:?}, close {closed:?}");
    assert!(
        wrote.is_err() || closed.is_err(),
        "close returned success for data that did not fit"
    );
    for r in [wrote, closed] {
        if let Err(e) = r {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        }
    }

    // What a mail server does with a message it could not write: delete it. Then there is
    // room again, and what was durable before is intact.
    fs::remove_file(t.path("big")).expect("unlink big");
    match fs::remove_file(t.path("big2")) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        r => r.expect("unlink big2"),
    }
    let small = seeded_bytes(5, 1 << 20);
    let write_small = || -> io::Result<()> {
        let mut f = File::create(t.path("after"))?;
        f.write_all(&small)?;
        f.sync_all()?;
        close_checked(f)
    };
    // The room is found by a scan that starts once the deletions are durable.
    let mut refused = 0;
    let admitted = wait_until(Duration::from_secs(10), || match write_small() {
        Ok(()) => true,
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "write after: {e}");
            refused += 1;
            let _ = fs::remove_file(t.path("after"));
            false
        }
    });
    assert!(
        admitted,
        "writes still refused 10 s after the big files were deleted ({refused} tries)"
    );
    m.assert_healthy();
    m.umount();
    t.assert_fsck_clean("after the disk was full");

    let m = t.mount_with(&[WRITEBACK, "reserve=16M"]);
    assert_bytes_eq(
        &read_all(&t.path("kept")).expect("read kept"),
        &kept,
        "kept",
    );
    assert_bytes_eq(
        &read_all(&t.path("after")).expect("read after"),
        &small,
        "after",
    );
    m.umount();
}

/// The option really turns the cache on (it is a FUSE feature, not a kernel mount flag, so
/// `/proc/mounts` does not show it): small writes reach the daemon only at fsync, gathered
/// into fewer, larger ones. And a user still cannot read through a write-only descriptor,
/// although the daemon opened it read-write for the kernel.
#[test]
fn writes_wait_in_the_page_cache_until_fsync() -> io::Result<()> {
    let _serial = serial();
    let Some(t) = TestFs::new() else {
        return Ok(());
    };
    let port = free_port();
    let m = mount_with_metrics(&t, &[WRITEBACK], port);
    let writes = || {
        let body = http_get(port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        sample(&body, "spoolfs_requests_total{op=\"write\"}").unwrap_or(0.0)
    };
    let mut f = File::create(t.path("f"))?;
    let before = writes();
    for _ in 0..64 {
        f.write_all(&[b'x'; 4096])?;
    }
    let buffered = writes() - before;
    f.sync_all()?;
    let after_fsync = writes() - before;
    close_checked(f)?;
    assert!(
        buffered < 64.0 && (1.0..64.0).contains(&after_fsync),
        "64 writes of 4 KiB reached the daemon as {buffered} before fsync and {after_fsync} \
         after: the writeback cache is not on"
    );
    let err = errno_of(
        OpenOptions::new()
            .write(true)
            .open(t.path("f"))
            .and_then(|mut f| {
                let mut b = [0u8; 1];
                std::io::Read::read(&mut f, &mut b)
            }),
        "read on a write-only descriptor",
    );
    assert_eq!(err, libc::EBADF);
    m.umount();
    Ok(())
}
