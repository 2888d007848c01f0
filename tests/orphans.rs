//! Unlinked-but-open files (orphans): they keep working until the last close, and after a
//! crash the daemon reclaims them at startup.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Duration;

use common::*;

/// The content chunk size, so the sizes below sit on chunk boundaries.
const CHUNK: usize = spoolfs_core::CHUNK_SIZE as usize;

#[test]
fn unlinked_open_file_keeps_working_until_closed() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut rng = Rng::new(0x0E4A);
    let p = t.path("doomed");
    let mut expected = rng.bytes(3 * CHUNK + 11);
    fs::write(&p, &expected).expect("write");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("open");
    // A second, read-only descriptor and a hard link that outlives the unlink.
    let r = File::open(&p).expect("open read-only");
    fs::hard_link(&p, t.path("survivor")).expect("link");
    fs::remove_file(t.path("survivor")).expect("unlink the extra link");
    let ino = f.metadata().expect("fstat").ino();
    fs::remove_file(&p).expect("unlink while open");

    assert_eq!(
        errno_of(fs::metadata(&p), "stat of the unlinked name"),
        libc::ENOENT
    );
    assert!(
        fs::read_dir(&t.mnt).expect("ls").next().is_none(),
        "the root must be empty"
    );
    let meta = f.metadata().expect("fstat of the orphan");
    assert_eq!(meta.nlink(), 0, "nlink of an unlinked open file");
    assert_eq!(meta.ino(), ino);
    assert_eq!(meta.len(), expected.len() as u64);

    // Keep reading and writing through both descriptors.
    let mut got = Vec::new();
    f.read_to_end(&mut got).expect("read orphan");
    assert_bytes_eq(&got, &expected, "orphan content after unlink");
    let patch = rng.bytes(CHUNK + 3);
    f.write_all_at(&patch, (CHUNK - 1) as u64)
        .expect("pwrite orphan");
    expected[CHUNK - 1..2 * CHUNK + 2].copy_from_slice(&patch);
    let tail = rng.bytes(5000);
    f.seek(SeekFrom::End(0)).expect("seek");
    f.write_all(&tail).expect("append to orphan");
    expected.extend_from_slice(&tail);
    f.sync_all().expect("fsync orphan");
    let mut got = vec![0u8; expected.len()];
    r.read_exact_at(&mut got, 0)
        .expect("read through the other descriptor");
    assert_bytes_eq(
        &got,
        &expected,
        "orphan seen through the read-only descriptor",
    );
    f.set_len(CHUNK as u64 + 7).expect("ftruncate orphan");
    expected.truncate(CHUNK + 7);
    assert_eq!(r.metadata().expect("fstat").len(), expected.len() as u64);
    let mut got = vec![0u8; expected.len()];
    r.read_exact_at(&mut got, 0).expect("read after truncate");
    assert_bytes_eq(&got, &expected, "orphan after ftruncate");
    close_checked(f).expect("close writer");
    let mut got = vec![0u8; expected.len()];
    r.read_exact_at(&mut got, 0)
        .expect("read after the writer closed");
    assert_bytes_eq(&got, &expected, "orphan after the writer's close");
    close_checked(r).expect("close reader");

    // The namespace is unaffected and a new file works (and gets a new inode).
    fs::write(t.path("after"), b"fine").expect("create after the orphan is gone");
    assert_eq!(fs::read(t.path("after")).expect("read"), b"fine");
    m.assert_healthy();
    m.umount();

    let m = t.mount();
    let names: Vec<_> = fs::read_dir(&t.mnt)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        names,
        ["after"],
        "only the linked file survives the restart"
    );
    assert_eq!(fs::read(t.path("after")).expect("read"), b"fine");
    m.umount();
}

#[test]
fn kill9_with_unlinked_open_files_reclaims_them_on_restart() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut rng = Rng::new(0xDEAD);
    fs::create_dir(t.path("d")).expect("mkdir");
    let keep = rng.bytes(2 * CHUNK + 1);
    fs::write(t.path("d/keep"), &keep).expect("write keep");

    let mut open = Vec::new();
    for i in 0..3 {
        let p = t.path(&format!("d/orphan{i}"));
        let mut f = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&p)
            .expect("create");
        f.write_all(&rng.bytes(CHUNK * (i + 1) + 5)).expect("write");
        fs::remove_file(&p).expect("unlink while open");
        // fsync: the unlink (and with it the orphan record) is durable before the kill.
        f.sync_all().expect("fsync");
        f.write_all(&rng.bytes(1000)).expect("write after unlink");
        open.push(f);
    }
    // An orphaned directory too: removed while a process has it open.
    fs::create_dir(t.path("gone_dir")).expect("mkdir");
    let dir_handle = File::open(t.path("gone_dir")).expect("open dir");
    fs::remove_dir(t.path("gone_dir")).expect("rmdir while open");
    fsync_dir(&t.path("d")).expect("fsync dir");

    m.kill9();
    // The descriptors are still open while the dead mount is cleared.
    m.detach();
    for f in open {
        let _ = close_checked(f); // the daemon is gone: the error is expected
    }
    drop(dir_handle);

    let m = t.mount();
    assert!(
        wait_until(Duration::from_secs(5), || t
            .log()
            .contains("reclaimed orphaned inodes")),
        "the log does not report reclaimed orphans:\n{}",
        t.log()
    );
    m.assert_healthy();
    let names: Vec<_> = fs::read_dir(t.path("d"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["keep"]);
    assert_bytes_eq(&fs::read(t.path("d/keep")).expect("read"), &keep, "d/keep");
    assert_eq!(
        errno_of(fs::metadata(t.path("gone_dir")), "stat"),
        libc::ENOENT
    );
    // The filesystem is fully usable.
    fs::write(t.path("d/new"), b"after restart").expect("create");
    fs::remove_file(t.path("d/keep")).expect("unlink");
    fs::remove_file(t.path("d/new")).expect("unlink");
    fs::remove_dir(t.path("d")).expect("rmdir");
    m.umount();

    // Reclaimed once: a clean restart finds nothing left to reclaim.
    let before = t.log().matches("reclaimed orphaned inodes").count();
    let m = t.mount();
    assert!(
        fs::read_dir(&t.mnt).expect("ls").next().is_none(),
        "root must be empty"
    );
    m.umount();
    assert_eq!(
        t.log().matches("reclaimed orphaned inodes").count(),
        before,
        "orphans were reclaimed a second time"
    );
}
