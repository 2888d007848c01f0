//! Crash consistency: SIGKILL the daemon while concurrent writers enqueue mail, remount the
//! same data dir, and check that every acknowledged message is there byte for byte.
//!
//! A message is acknowledged the way a mail server acknowledges one:
//! - spool mode: create in tmp/, write, fsync, close, rename into queue/, fsync queue/;
//! - close mode: create, write, close (no fsync) — close() must be durable too.

mod common;

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// tmp/ + write + fsync + close + rename into queue/ + fsync queue/.
    Spool,
    /// write + close into closed/, nothing else.
    CloseOnly,
}

#[derive(Clone, Debug)]
struct Message {
    name: String,
    seed: u64,
    len: usize,
    sum: u64,
}

impl Message {
    fn content(&self) -> Vec<u8> {
        seeded_bytes(self.seed, self.len)
    }
}

#[derive(Default)]
struct Ledger {
    /// Acknowledged (the last step of the protocol returned success).
    acked: Mutex<Vec<Message>>,
    /// Every message whose content was fully written, acknowledged or not (by name).
    attempted: Mutex<HashMap<String, Message>>,
    acked_count: AtomicUsize,
}

const WRITE_SIZE: usize = 4096;

/// Write one message; Err as soon as any step fails (the daemon is being killed).
fn enqueue(mnt: &Path, mode: Mode, msg: &Message, ledger: &Ledger) -> std::io::Result<()> {
    let data = msg.content();
    let (first, dir) = match mode {
        Mode::Spool => (mnt.join("tmp").join(&msg.name), mnt.join("queue")),
        Mode::CloseOnly => (mnt.join("closed").join(&msg.name), mnt.join("closed")),
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&first)?;
    for piece in data.chunks(WRITE_SIZE) {
        f.write_all(piece)?;
    }
    ledger
        .attempted
        .lock()
        .expect("ledger")
        .insert(msg.name.clone(), msg.clone());
    if mode == Mode::Spool {
        f.sync_all()?;
    }
    close_checked(f)?;
    if mode == Mode::Spool {
        fs::rename(&first, dir.join(&msg.name))?;
        fsync_dir(&dir)?;
    }
    ledger.acked.lock().expect("ledger").push(msg.clone());
    ledger.acked_count.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

fn writer(
    mnt: PathBuf,
    mode: Mode,
    round: u64,
    thread: u64,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng::new(round << 16 | thread);
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let len = rng.range(1, 64 * 1024) as usize;
        let seed = rng.next_u64();
        let data = seeded_bytes(seed, len);
        let msg = Message {
            name: format!("r{round}-t{thread}-{i:05}"),
            seed,
            len,
            sum: checksum(&data),
        };
        if enqueue(&mnt, mode, &msg, &ledger).is_err() {
            return;
        }
        i += 1;
    }
}

/// Every acknowledged message intact; every message in queue/ (spool mode) one that was
/// fully written and intact, never a torn one.
fn verify(mnt: &Path, mode: Mode, ledger: &Ledger, round: u64) {
    let dir = mnt.join(match mode {
        Mode::Spool => "queue",
        Mode::CloseOnly => "closed",
    });
    let acked = ledger.acked.lock().expect("ledger");
    let mut lost = Vec::new();
    for m in acked.iter() {
        match read_all(&dir.join(&m.name)) {
            Err(e) => lost.push(format!("{}: {e}", m.name)),
            Ok(got) => {
                if got.len() != m.len || checksum(&got) != m.sum {
                    let at = first_difference(&got, &m.content());
                    lost.push(format!(
                        "{}: corrupt (len {} expected {}, first difference at {at:?})",
                        m.name,
                        got.len(),
                        m.len
                    ));
                }
            }
        }
    }
    assert!(
        lost.is_empty(),
        "round {round} ({mode:?}): {} of {} acknowledged messages lost or damaged after kill -9: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(20)]
    );
    if mode == Mode::Spool {
        let attempted = ledger.attempted.lock().expect("ledger");
        for e in fs::read_dir(&dir).expect("list queue/") {
            let name = e.expect("entry").file_name().to_string_lossy().into_owned();
            let m = attempted
                .get(&name)
                .unwrap_or_else(|| panic!("round {round}: unknown file queue/{name}"));
            let got = read_all(&dir.join(&name)).expect("read queued message");
            assert!(
                got.len() == m.len && checksum(&got) == m.sum,
                "round {round}: queue/{name} is torn (len {} expected {}): it was renamed \
                 into queue/ only after its fsync",
                got.len(),
                m.len
            );
        }
    }
}

/// fuser logs this when the kernel no longer waits for a reply. It happens when an
/// asynchronous RELEASE/RELEASEDIR (sent after close() has returned) is answered after
/// `umount` has already torn the connection down: benign, and not what we look for here.
const BENIGN_RELEASE_RACE: &str = "Failed to send FUSE reply: No such file or directory";

fn no_errors_logged(t: &TestFs) {
    let log = t.log();
    let lines: Vec<&str> = log.lines().collect();
    // Each error with the lines around it, for context.
    let errors: Vec<String> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains(" ERROR ") && !l.contains(BENIGN_RELEASE_RACE))
        .map(|(i, _)| lines[i.saturating_sub(4)..(i + 4).min(lines.len())].join("\n"))
        .collect();
    assert!(
        errors.is_empty(),
        "the daemon logged errors:\n{}",
        errors.join("\n---\n")
    );
}

fn crash_rounds(mode: Mode, rounds: u64, threads: u64, base_seed: u64, extra: &[&str]) {
    crash_rounds_with(mode, rounds, threads, base_seed, &[], extra);
}

/// `crash_rounds` with `-o` mount options.
fn crash_rounds_with(
    mode: Mode,
    rounds: u64,
    threads: u64,
    base_seed: u64,
    opts: &[&str],
    extra: &[&str],
) {
    let Some(t) = TestFs::new() else { return };
    let ledger = Arc::new(Ledger::default());
    {
        let m = t.mount_full(opts, extra);
        for d in ["tmp", "queue", "closed"] {
            fs::create_dir(t.path(d)).expect("mkdir");
        }
        fsync_dir(&t.mnt).expect("fsync root");
        m.umount();
    }
    let mut schedule = Rng::new(base_seed);
    for round in 0..rounds {
        let m = t.mount_full(opts, extra);
        let acked_before = ledger.acked_count.load(Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..threads)
            .map(|th| {
                let (mnt, ledger, stop) = (t.mnt.clone(), ledger.clone(), stop.clone());
                std::thread::spawn(move || writer(mnt, mode, base_seed + round, th, ledger, stop))
            })
            .collect();
        // Let some messages through, then kill at a seeded moment.
        let some = wait_until(Duration::from_secs(10), || {
            ledger.acked_count.load(Ordering::SeqCst) > acked_before
        });
        let delay = Duration::from_millis(schedule.range(0, 300));
        std::thread::sleep(delay);
        m.kill9();
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            w.join().expect("writer thread");
        }
        assert!(
            some,
            "round {round}: no message was acknowledged within 10 s"
        );
        let acked_round = ledger.acked_count.load(Ordering::SeqCst) - acked_before;
        // The mount is dead: anything on it fails with ENOTCONN until it is cleared.
        let err = fs::metadata(&t.mnt).expect_err("stat of a dead mount");
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ENOTCONN),
            "dead mount: {err}"
        );
        m.detach();
        t.assert_fsck_clean(&format!("round {round} after kill -9"));

        let started = Instant::now();
        let m = t.mount_full(opts, extra);
        verify(&t.mnt, mode, &ledger, round);
        eprintln!(
            "round {round} ({mode:?}): killed after {delay:?}, {acked_round} acknowledged this round, \
             {} in total verified in {:?}",
            ledger.acked_count.load(Ordering::SeqCst),
            started.elapsed()
        );
        // Leftovers of interrupted enqueues can be cleaned up like on any filesystem.
        for e in fs::read_dir(t.path("tmp")).expect("list tmp/") {
            fs::remove_file(e.expect("entry").path()).expect("remove leftover");
        }
        m.assert_healthy();
        m.umount();
    }
    // A clean restart at the end keeps everything too.
    let m = t.mount_full(opts, extra);
    verify(&t.mnt, mode, &ledger, rounds);
    no_errors_logged(&t);
    m.umount();
}

/// Rounds of a crash test: `SPOOLFS_CRASH_ROUNDS` overrides the default (for soak runs).
fn rounds(default: u64) -> u64 {
    std::env::var("SPOOLFS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn kill9_during_spool_enqueues_loses_no_acknowledged_message() {
    crash_rounds(Mode::Spool, rounds(10), 4, 0xC0FFEE, &[]);
}

#[test]
fn kill9_after_close_without_fsync_loses_no_closed_file() {
    crash_rounds(Mode::CloseOnly, rounds(6), 4, 0xD15EA5E, &[]);
}

/// Staging buffers smaller than what the writers hold open: writes evict memfds into
/// non-durable commits all the time; acknowledged messages must still all be there.
#[test]
fn kill9_with_a_tiny_memfd_budget_loses_no_acknowledged_message() {
    crash_rounds(
        Mode::Spool,
        rounds(4),
        6,
        0xB0D6E7,
        &["--memfd-budget", "131072"],
    );
    crash_rounds(
        Mode::CloseOnly,
        rounds(3),
        6,
        0xB0D6E8,
        &["--memfd-budget", "131072"],
    );
}

/// With the writeback cache the kernel holds written data in its page cache until fsync or
/// close hands it over: what those acknowledged must still all be there after kill -9.
#[test]
fn kill9_with_the_writeback_cache_loses_no_acknowledged_message() {
    let wb = &["writeback_cache"];
    crash_rounds_with(Mode::Spool, rounds(4), 4, 0x3B4C, wb, &[]);
    crash_rounds_with(Mode::CloseOnly, rounds(3), 4, 0x3B4D, wb, &[]);
}

/// Atomic replacement (write tmp, fsync, rename over, fsync dir), the way a mail server
/// updates an index or a state file: after kill -9 the file holds one complete version,
/// at least the last acknowledged one.
#[test]
fn kill9_during_atomic_replaces_keeps_a_complete_recent_version() {
    let Some(t) = TestFs::new() else { return };
    let threads = 3u64;
    {
        let m = t.mount();
        fs::create_dir(t.path("state")).expect("mkdir");
        fsync_dir(&t.mnt).expect("fsync root");
        m.umount();
    }
    let content = |th: u64, version: u64| {
        let len = (Rng::new(th << 32 | version).range(1, 3 * 64 * 1024)) as usize;
        let mut v = format!("thread {th} version {version}\n").into_bytes();
        v.extend(seeded_bytes(th << 32 | version, len));
        v
    };
    let mut schedule = Rng::new(0xA70);
    let mut last_acked = vec![0u64; threads as usize];
    for round in 0..rounds(6) {
        let m = t.mount();
        let acked: Arc<Vec<AtomicUsize>> =
            Arc::new((0..threads).map(|_| AtomicUsize::new(0)).collect());
        let workers: Vec<_> = (0..threads)
            .map(|th| {
                let (mnt, acked) = (t.mnt.clone(), acked.clone());
                let start = last_acked[th as usize] + 1;
                std::thread::spawn(move || {
                    let dir = mnt.join("state");
                    for version in start.. {
                        let tmp = dir.join(format!(".tmp-{th}-{version}"));
                        let r = (|| -> std::io::Result<()> {
                            let mut f =
                                OpenOptions::new().write(true).create_new(true).open(&tmp)?;
                            f.write_all(&content(th, version))?;
                            f.sync_all()?;
                            close_checked(f)?;
                            fs::rename(&tmp, dir.join(format!("current-{th}")))?;
                            fsync_dir(&dir)
                        })();
                        if r.is_err() {
                            return;
                        }
                        acked[th as usize].store(version as usize, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        let progressed = wait_until(Duration::from_secs(10), || {
            (0..threads as usize).all(|i| acked[i].load(Ordering::SeqCst) as u64 > last_acked[i])
        });
        std::thread::sleep(Duration::from_millis(schedule.range(0, 250)));
        m.kill9();
        for w in workers {
            w.join().expect("writer");
        }
        assert!(
            progressed,
            "round {round}: a writer made no progress within 10 s"
        );
        m.detach();
        let m = t.mount();
        for th in 0..threads {
            let acked_version = acked[th as usize].load(Ordering::SeqCst) as u64;
            let got = read_all(&t.path(&format!("state/current-{th}"))).expect("read current");
            let header = String::from_utf8_lossy(&got[..got.len().min(40)]).into_owned();
            let version: u64 = header
                .strip_prefix(&format!("thread {th} version "))
                .and_then(|r| r.split('\n').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("round {round}: current-{th} is garbled: {header:?}"));
            assert!(
                version >= acked_version,
                "round {round}: current-{th} went back to version {version}, {acked_version} was acknowledged"
            );
            assert_bytes_eq(
                &got,
                &content(th, version),
                &format!("round {round}: current-{th} v{version}"),
            );
            last_acked[th as usize] = version;
        }
        // Interrupted replacements leave temporary files; remove them.
        for e in fs::read_dir(t.path("state")).expect("ls") {
            let p = e.expect("entry").path();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"))
            {
                fs::remove_file(p).expect("remove tmp");
            }
        }
        m.umount();
    }
    no_errors_logged(&t);
}

// --- namespace churn without fsync: the state after kill -9 must be consistent -------------

const BLOCK: usize = 4096;
const BLOCK_MAGIC: u64 = 0x5350_4F4F_4C42_4C4B; // "SPOOLBLK"

/// A self-checking 4 KiB block: magic, seed, then bytes derived from the seed.
fn block(seed: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK);
    b.extend_from_slice(&BLOCK_MAGIC.to_le_bytes());
    b.extend_from_slice(&seed.to_le_bytes());
    b.extend(seeded_bytes(seed, BLOCK - 16));
    b
}

/// Each aligned block is all zeros (a hole) or one complete block as some write wrote it.
fn block_ok(b: &[u8]) -> bool {
    if b.iter().all(|x| *x == 0) {
        return true;
    }
    if b.len() != BLOCK || b[..8] != BLOCK_MAGIC.to_le_bytes() {
        return false;
    }
    let seed = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    b[16..] == seeded_bytes(seed, BLOCK - 16)[..]
}

/// One random namespace or content operation on a small shared set of names; errors
/// (ENOENT, EEXIST, ENOTEMPTY, EINVAL, ...) are part of the game and ignored.
fn churn_op(mnt: &Path, rng: &mut Rng) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let dir = |rng: &mut Rng| -> PathBuf {
        match rng.range(0, 5) {
            0 => mnt.to_path_buf(),
            n @ 1..=3 => mnt.join(format!("d{n}")),
            n => mnt.join(format!("d1/e{n}")),
        }
    };
    let file = |rng: &mut Rng| -> PathBuf { dir(rng).join(format!("f{}", rng.range(0, 7))) };
    match rng.range(0, 15) {
        0..=3 => {
            // Write 1-16 blocks at a block-aligned offset (creating the file if needed).
            let p = file(rng);
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)?;
            let at = rng.range(0, 40) as usize * BLOCK;
            let mut data = Vec::new();
            for _ in 0..rng.range(1, 16) {
                data.extend(block(rng.next_u64()));
            }
            f.write_all_at(&data, at as u64)?;
            if rng.range(0, 4) == 0 {
                f.sync_all()?;
            }
            close_checked(f)
        }
        4 => {
            let f = OpenOptions::new().write(true).open(file(rng))?;
            f.set_len(rng.range(0, 30) * BLOCK as u64)?;
            close_checked(f)
        }
        5 | 6 => fs::rename(file(rng), file(rng)),
        7 => fs::hard_link(file(rng), file(rng)),
        8 | 9 => fs::remove_file(file(rng)),
        10 => fs::create_dir(dir(rng)),
        11 => fs::remove_dir(dir(rng)),
        12 => fs::rename(dir(rng), dir(rng)),
        13 => std::os::unix::fs::symlink(format!("target-{}", rng.range(0, 99)), file(rng)),
        _ => {
            let n = rng.range(0, 300) as usize;
            setxattr(&file(rng), b"user.x", &rng.bytes(n), 0)
        }
    }
}

/// Walk the tree and check its invariants; returns the number of entries seen.
fn fsck(mnt: &Path, round: u64) -> usize {
    use std::os::unix::fs::{DirEntryExt, MetadataExt};
    let mut links: HashMap<u64, (u64, u64, PathBuf)> = HashMap::new(); // ino -> (found, nlink, path)
    let mut entries = 0;
    let mut stack = vec![mnt.to_path_buf()];
    while let Some(d) = stack.pop() {
        let dm =
            fs::metadata(&d).unwrap_or_else(|e| panic!("round {round}: stat {}: {e}", d.display()));
        let mut subdirs = 0;
        for e in
            fs::read_dir(&d).unwrap_or_else(|e| panic!("round {round}: ls {}: {e}", d.display()))
        {
            let e = e.expect("entry");
            let p = e.path();
            entries += 1;
            let m = fs::symlink_metadata(&p).unwrap_or_else(|err| {
                panic!("round {round}: dangling entry {}: {err}", p.display())
            });
            assert_eq!(
                e.ino(),
                m.ino(),
                "round {round}: readdir and stat disagree on {}",
                p.display()
            );
            let ft = m.file_type();
            if ft.is_dir() {
                subdirs += 1;
                let dotdot = fs::metadata(p.join("..")).expect("stat ..");
                assert_eq!(
                    dotdot.ino(),
                    dm.ino(),
                    "round {round}: `..` of {}",
                    p.display()
                );
                stack.push(p);
            } else {
                let slot = links.entry(m.ino()).or_insert((0, m.nlink(), p.clone()));
                slot.0 += 1;
                if ft.is_file() {
                    let data = read_all(&p)
                        .unwrap_or_else(|err| panic!("round {round}: read {}: {err}", p.display()));
                    assert_eq!(
                        data.len() as u64,
                        m.len(),
                        "round {round}: size of {}",
                        p.display()
                    );
                    for (i, b) in data.chunks(BLOCK).enumerate() {
                        assert!(
                            block_ok(b),
                            "round {round}: {} block {i} is torn or garbage",
                            p.display()
                        );
                    }
                    listxattr(&p).unwrap_or_else(|err| {
                        panic!("round {round}: listxattr {}: {err}", p.display())
                    });
                } else if ft.is_symlink() {
                    let target = fs::read_link(&p).expect("readlink");
                    assert_eq!(
                        target.as_os_str().len() as u64,
                        m.len(),
                        "round {round}: symlink size"
                    );
                }
            }
        }
        assert_eq!(
            dm.nlink(),
            2 + subdirs,
            "round {round}: nlink of directory {}",
            d.display()
        );
    }
    for (ino, (found, nlink, p)) in links {
        assert_eq!(
            found,
            nlink,
            "round {round}: inode {ino} ({}) has nlink {nlink} but {found} entries",
            p.display()
        );
    }
    entries
}

#[test]
fn kill9_during_namespace_churn_leaves_a_consistent_tree() {
    let Some(t) = TestFs::new() else { return };
    let mut schedule = Rng::new(0xF5C);
    for round in 0..rounds(8) {
        let m = t.mount();
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..4u64)
            .map(|th| {
                let (mnt, stop, ops) = (t.mnt.clone(), stop.clone(), ops.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng::new(0xC4u64 << 32 | round << 8 | th);
                    while !stop.load(Ordering::SeqCst) {
                        match churn_op(&mnt, &mut rng) {
                            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return,
                            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => return,
                            _ => {}
                        }
                        ops.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        let target = schedule.range(50, 1500) as usize;
        let progressed = wait_until(Duration::from_secs(20), || {
            ops.load(Ordering::SeqCst) >= target
        });
        m.kill9();
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            w.join().expect("churn thread");
        }
        assert!(
            progressed,
            "round {round}: only {} operations in 20 s",
            ops.load(Ordering::SeqCst)
        );
        m.detach();
        t.assert_fsck_clean(&format!("round {round} after kill -9"));
        let m = t.mount();
        let n = fsck(&t.mnt, round);
        eprintln!("round {round}: killed after {target} operations; {n} entries consistent");
        m.assert_healthy();
        m.umount();
    }
    // Everything left can be removed, leaving an empty root.
    let m = t.mount();
    fsck(&t.mnt, u64::MAX);
    for e in fs::read_dir(&t.mnt).expect("ls") {
        let p = e.expect("entry").path();
        if fs::symlink_metadata(&p).expect("lstat").is_dir() {
            fs::remove_dir_all(&p).expect("rm -r");
        } else {
            fs::remove_file(&p).expect("rm");
        }
    }
    assert!(fs::read_dir(&t.mnt).expect("ls").next().is_none());
    assert_eq!(
        std::os::unix::fs::MetadataExt::nlink(&fs::metadata(&t.mnt).expect("stat")),
        2
    );
    m.umount();
    no_errors_logged(&t);
}

/// The actor bounds how long a completed operation may stay non-durable when nobody asks
/// for durability (MAX_UNDURABLE, 1 s). Changes without any fsync/close, then an idle
/// pause well past that bound, then kill -9: the changes must have been made durable.
#[test]
fn kill9_after_an_idle_pause_keeps_changes_nobody_synced() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    fs::create_dir(t.path("dir")).expect("mkdir");
    fs::create_dir(t.path("dir/sub")).expect("mkdir");
    std::os::unix::fs::symlink("sub", t.path("dir/link")).expect("symlink");
    fs::rename(t.path("dir/sub"), t.path("dir/moved")).expect("rename");
    setxattr(&t.path("dir"), b"user.k", b"v", 0).expect("setxattr");
    // Idle, well past the 1 s bound.
    std::thread::sleep(Duration::from_millis(2500));
    m.kill9();
    m.detach();
    let m = t.mount();
    assert!(
        t.path("dir/moved").is_dir(),
        "mkdir + rename lost after an idle pause"
    );
    assert!(!t.path("dir/sub").exists());
    assert_eq!(
        fs::read_link(t.path("dir/link")).expect("symlink lost after an idle pause"),
        Path::new("sub")
    );
    assert_eq!(
        getxattr(&t.path("dir"), b"user.k").expect("xattr lost"),
        b"v"
    );
    m.umount();
}
