//! Concurrent writers: many threads on different files, O_APPEND writers on one file, and
//! concurrent creation in one directory. Final content checked, also after a restart.

mod common;

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Barrier};

use common::*;

/// Each thread writes its own file: sequential writes of random sizes, then overwrites at
/// random offsets, all mirrored in memory.
fn own_file_writer(mnt: &Path, thread: u64, barrier: &Barrier) -> Vec<u8> {
    let mut rng = Rng::new(0xA11CE + thread);
    let p = mnt.join(format!("own-{thread}"));
    let mut f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&p)
        .expect("create");
    let mut expected = Vec::new();
    barrier.wait();
    for _ in 0..100 {
        let n = rng.range(1, 40_000) as usize;
        let data = rng.bytes(n);
        f.write_all(&data).expect("write");
        expected.extend_from_slice(&data);
    }
    for _ in 0..50 {
        let n = rng.range(1, 20_000) as usize;
        let off = rng.range(0, expected.len() as u64) as usize;
        let data = rng.bytes(n);
        f.write_all_at(&data, off as u64).expect("pwrite");
        let end = off + n;
        if end > expected.len() {
            expected.resize(end, 0);
        }
        expected[off..end].copy_from_slice(&data);
        if rng.range(0, 9) == 0 {
            f.sync_data().expect("fdatasync");
        }
    }
    close_checked(f).expect("close");
    expected
}

#[test]
fn concurrent_writers_to_different_files() {
    writers_to_different_files(&[]);
}

/// The same with staging buffers far smaller than the files: writes keep evicting each
/// other's memfds into the database.
#[test]
fn concurrent_writers_with_a_tiny_memfd_budget() {
    writers_to_different_files(&["--memfd-budget", "262144"]);
}

fn writers_to_different_files(extra: &[&str]) {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount_full(&[], extra);
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads as u64)
        .map(|i| {
            let (mnt, barrier) = (t.mnt.clone(), barrier.clone());
            std::thread::spawn(move || own_file_writer(&mnt, i, &barrier))
        })
        .collect();
    let expected: Vec<Vec<u8>> = handles
        .into_iter()
        .map(|h| h.join().expect("writer"))
        .collect();
    let check = |when: &str| {
        for (i, e) in expected.iter().enumerate() {
            let got = read_all(&t.path(&format!("own-{i}"))).expect("read");
            assert_bytes_eq(&got, e, &format!("{when}: own-{i}"));
        }
    };
    check("before restart");
    m.assert_healthy();
    m.umount();
    let m = t.mount_full(&[], extra);
    check("after restart");
    m.umount();
}

const RECORD: usize = 128;

fn record(thread: usize, seq: usize) -> Vec<u8> {
    let mut r = format!("thread={thread:02} seq={seq:06} ").into_bytes();
    let fill = b'a' + (thread as u8 % 26);
    r.resize(RECORD - 1, fill);
    r.push(b'\n');
    r
}

#[test]
fn concurrent_appends_to_one_file() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let threads = 6;
    let per_thread = 400;
    let p = t.path("appended");
    fs::write(&p, b"").expect("create");
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|th| {
            let (p, barrier) = (p.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut f = OpenOptions::new()
                    .append(true)
                    .open(&p)
                    .expect("open O_APPEND");
                barrier.wait();
                for seq in 0..per_thread {
                    // One write(2) per record: O_APPEND makes each land whole at the end.
                    let n = f.write(&record(th, seq)).expect("append");
                    assert_eq!(n, RECORD, "short append");
                    if seq % 100 == 99 {
                        f.sync_all().expect("fsync");
                    }
                }
                close_checked(f).expect("close");
            })
        })
        .collect();
    for h in handles {
        h.join().expect("appender");
    }
    let check = |when: &str| {
        let got = read_all(&p).expect("read");
        assert_eq!(
            got.len(),
            threads * per_thread * RECORD,
            "{when}: appended size"
        );
        let mut next_seq: HashMap<usize, usize> = HashMap::new();
        for (i, rec) in got.chunks(RECORD).enumerate() {
            let text = std::str::from_utf8(&rec[..25]).unwrap_or("<not utf-8>");
            let th: usize = text
                .get(7..9)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{when}: record {i} is garbled: {text:?}"));
            let seq = next_seq.entry(th).or_insert(0);
            assert_eq!(
                rec,
                &record(th, *seq)[..],
                "{when}: record {i} is not thread {th}'s record {seq} (torn or reordered append)"
            );
            *seq += 1;
        }
        for th in 0..threads {
            assert_eq!(
                next_seq.get(&th),
                Some(&per_thread),
                "{when}: records of thread {th}"
            );
        }
    };
    check("before restart");
    m.umount();
    let m = t.mount();
    check("after restart");
    m.umount();
}

#[test]
fn concurrent_creates_renames_and_unlinks_in_one_directory() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    fs::create_dir(t.path("shared")).expect("mkdir");
    fs::create_dir(t.path("done")).expect("mkdir");
    let threads = 6;
    let per_thread = 150;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|th| {
            let (mnt, barrier) = (t.mnt.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..per_thread {
                    let name = format!("t{th}-{i:04}");
                    let p = mnt.join("shared").join(&name);
                    fs::write(&p, name.as_bytes()).expect("create");
                    match i % 3 {
                        0 => fs::rename(&p, mnt.join("done").join(&name)).expect("rename"),
                        1 => fs::remove_file(&p).expect("unlink"),
                        _ => {}
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker");
    }
    let check = |when: &str| {
        for (dir, keep) in [("shared", 2), ("done", 0)] {
            let mut names: Vec<String> = fs::read_dir(t.path(dir))
                .expect("ls")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            let mut want: Vec<String> = (0..threads)
                .flat_map(|th| {
                    (0..per_thread)
                        .filter(|i| i % 3 == keep)
                        .map(move |i| format!("t{th}-{i:04}"))
                })
                .collect();
            want.sort();
            assert_eq!(names, want, "{when}: entries of {dir}/");
            for n in &names {
                assert_eq!(
                    fs::read(t.path(&format!("{dir}/{n}"))).expect("read"),
                    n.as_bytes()
                );
            }
        }
    };
    check("before restart");
    m.umount();
    let m = t.mount();
    check("after restart");
    m.umount();
}

/// readdir while other threads create and remove entries: every entry present for the whole
/// listing is returned exactly once (POSIX leaves the changing ones unspecified).
#[test]
fn readdir_during_concurrent_changes_returns_stable_entries_once() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let dir = t.path("busy");
    fs::create_dir(&dir).expect("mkdir");
    let stable: Vec<String> = (0..700).map(|i| format!("stable-{i:04}")).collect();
    for n in &stable {
        fs::write(dir.join(n), b"").expect("create");
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churners: Vec<_> = (0..2)
        .map(|th| {
            let (dir, stop) = (dir.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(0x4EAD + th);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    // Names that sort before, between and after the stable ones.
                    let p = match rng.range(0, 2) {
                        0 => dir.join(format!("a-{th}-{}", rng.range(0, 50))),
                        1 => dir.join(format!("stable-{:04}x{th}", rng.range(0, 700))),
                        _ => dir.join(format!("z-{th}-{}", rng.range(0, 50))),
                    };
                    if rng.range(0, 1) == 0 {
                        let _ = fs::write(&p, b"");
                    } else {
                        let _ = fs::remove_file(&p);
                    }
                }
            })
        })
        .collect();
    for round in 0..30 {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for e in fs::read_dir(&dir).expect("ls") {
            let name = e.expect("entry").file_name().to_string_lossy().into_owned();
            *seen.entry(name).or_insert(0) += 1;
        }
        for n in &stable {
            assert_eq!(
                seen.get(n),
                Some(&1),
                "listing {round}: {n} not returned exactly once"
            );
        }
        if let Some((n, c)) = seen.iter().find(|(_, c)| **c > 1) {
            panic!("listing {round}: {n} returned {c} times");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in churners {
        c.join().expect("churner");
    }
    m.assert_healthy();
    m.umount();
}
