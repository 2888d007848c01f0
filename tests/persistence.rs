//! Restart persistence: everything written before a clean unmount is there, byte for byte and
//! attribute for attribute (inode numbers included), after mounting the data dir again.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

/// The content chunk size, so the sizes below sit on chunk boundaries.
const CHUNK: usize = spoolfs_core::CHUNK_SIZE as usize;

/// What can be observed of one path, compared before and after the restart.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    rdev: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    atime: (i64, i64),
    /// Checksum and length of a regular file's content.
    content: Option<(u64, usize)>,
    link_target: Option<PathBuf>,
    /// Every xattr (name, value), for files and directories.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Sorted entry names of a directory.
    entries: Option<Vec<String>>,
}

fn observe(p: &Path) -> Observed {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let ft = m.file_type();
    let content = ft.is_file().then(|| {
        let data = read_all(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        (checksum(&data), data.len())
    });
    let link_target = ft.is_symlink().then(|| fs::read_link(p).expect("readlink"));
    let xattrs = if ft.is_file() || ft.is_dir() {
        listxattr(p)
            .expect("listxattr")
            .into_iter()
            .map(|n| {
                let v = getxattr(p, &n).expect("getxattr of a listed name");
                (n, v)
            })
            .collect()
    } else {
        Vec::new()
    };
    let entries = ft.is_dir().then(|| {
        let mut names: Vec<String> = fs::read_dir(p)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    });
    Observed {
        ino: m.ino(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        nlink: m.nlink(),
        rdev: m.rdev(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        atime: (m.atime(), m.atime_nsec()),
        content,
        link_target,
        xattrs,
        entries,
    }
}

/// Every path under `root` (relative) with what can be observed of it, the root included.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Observed> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Observed>) {
        let p = root.join(rel);
        let o = observe(&p);
        let is_dir = o.entries.is_some();
        out.insert(rel.to_path_buf(), o);
        if is_dir {
            for e in fs::read_dir(&p).expect("read_dir") {
                let name = e.expect("entry").file_name();
                walk(root, &rel.join(name), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

/// The expected content of every regular file we created, by relative path.
type Expected = BTreeMap<&'static str, Vec<u8>>;

fn write_file(mnt: &Path, rel: &str, data: &[u8], rng: &mut Rng) {
    let mut f = File::create(mnt.join(rel)).expect("create");
    // Writes of varying sizes, so writes straddle chunk boundaries in different ways.
    let mut at = 0;
    while at < data.len() {
        let n = (rng.range(1, 100_000) as usize).min(data.len() - at);
        f.write_all(&data[at..at + n]).expect("write");
        at += n;
    }
    close_checked(f).expect("close");
}

fn populate(mnt: &Path) -> Expected {
    let mut rng = Rng::new(0xF11E5);
    let mut expected = Expected::new();

    fs::create_dir_all(mnt.join("a/b/c")).expect("mkdir -p");
    fs::create_dir(mnt.join("empty")).expect("mkdir");
    fs::create_dir(mnt.join("many")).expect("mkdir");

    // Sizes around the chunk boundary and spanning several chunks.
    let sizes: [(&'static str, usize); 12] = [
        ("f_0", 0),
        ("f_1", 1),
        ("f_4095", 4095),
        ("f_4096", 4096),
        ("f_chunk_m1", CHUNK - 1),
        ("f_chunk", CHUNK),
        ("f_chunk_p1", CHUNK + 1),
        ("a/f_2chunk_p7", 2 * CHUNK + 7),
        ("a/b/f_200000", 200_000),
        ("a/b/c/f_1mib_p3", (1 << 20) + 3),
        ("a/b/c/f_3mib", 3 << 20),
        ("f_5chunks", 5 * CHUNK),
    ];
    for (rel, n) in sizes {
        let data = rng.bytes(n);
        write_file(mnt, rel, &data, &mut rng);
        expected.insert(rel, data);
    }

    // One 4 MiB write(2): the kernel splits it into requests of its max_write.
    {
        let rel = "f_one_big_write";
        let data = rng.bytes((4 << 20) + 5);
        let mut f = File::create(mnt.join(rel)).expect("create");
        f.write_all(&data).expect("write");
        close_checked(f).expect("close");
        expected.insert(rel, data);
    }

    // Overwrite in the middle of an existing multi-chunk file, across a chunk boundary.
    {
        let rel = "a/b/f_200000";
        let patch = rng.bytes(5000);
        let f = OpenOptions::new()
            .write(true)
            .open(mnt.join(rel))
            .expect("open");
        f.write_all_at(&patch, (CHUNK - 2000) as u64)
            .expect("pwrite");
        close_checked(f).expect("close");
        let e = expected.get_mut(rel).expect("known file");
        e[CHUNK - 2000..CHUNK + 3000].copy_from_slice(&patch);
    }

    // Sparse files: data islands separated by holes, a hole at the end, and all hole.
    {
        let rel = "sparse";
        let size = 10 << 20;
        let mut e = vec![0u8; size];
        let f = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(mnt.join(rel))
            .expect("create sparse");
        for (off, len) in [
            (0usize, 10usize),
            (CHUNK - 5, 10),
            (5 << 20, 100),
            (7 << 20, CHUNK + 1),
        ] {
            let d = rng.bytes(len);
            f.write_all_at(&d, off as u64).expect("pwrite");
            e[off..off + len].copy_from_slice(&d);
        }
        f.set_len(size as u64).expect("extend");
        close_checked(f).expect("close");
        expected.insert(rel, e);

        let f = File::create(mnt.join("all_hole")).expect("create");
        f.set_len(3 * CHUNK as u64 + 17).expect("set_len");
        close_checked(f).expect("close");
        expected.insert("all_hole", vec![0u8; 3 * CHUNK + 17]);

        // Shrunk then grown again: the cut-off bytes must read back as zeros.
        let rel = "shrunk";
        let mut d = rng.bytes(3 * CHUNK);
        let f = File::create(mnt.join(rel)).expect("create");
        f.write_all_at(&d, 0).expect("write");
        f.set_len(CHUNK as u64 + 100).expect("shrink");
        f.set_len(3 * CHUNK as u64).expect("grow");
        close_checked(f).expect("close");
        d[CHUNK + 100..].fill(0);
        expected.insert(rel, d);
    }

    // Rewritten with O_TRUNC by a shorter content (the old tail must not come back).
    {
        let rel = "rewritten";
        write_file(mnt, rel, &rng.bytes(2 * CHUNK + 9), &mut rng);
        let d = rng.bytes(CHUNK / 2);
        write_file(mnt, rel, &d, &mut rng);
        expected.insert(rel, d);
    }

    // Written through a shared writable mapping, then msync + close.
    {
        let rel = "mmapped";
        let len = 2 * CHUNK + 300;
        let mut d = rng.bytes(len);
        let f = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(mnt.join(rel))
            .expect("create");
        f.write_all_at(&d, 0).expect("write");
        let patch = rng.bytes(9000);
        let at = CHUNK - 4000;
        mmap_write(&f, len, at, &patch);
        d[at..at + patch.len()].copy_from_slice(&patch);
        close_checked(f).expect("close");
        expected.insert(rel, d);
    }

    // Many entries (more than one readdir page).
    for i in 0..300 {
        fs::write(mnt.join(format!("many/entry-{i:04}")), format!("{i}\n")).expect("write");
    }

    // Symlinks: relative, absolute, dangling, and the longest target allowed.
    symlink("f_chunk", mnt.join("link_rel")).expect("symlink");
    symlink("/etc/hostname", mnt.join("a/link_abs")).expect("symlink");
    symlink("does/not/exist", mnt.join("link_dangling")).expect("symlink");
    symlink("x".repeat(4095), mnt.join("link_long")).expect("symlink 4095-byte target");

    // Hard links across directories.
    let data = rng.bytes(CHUNK + 123);
    write_file(mnt, "hl_orig", &data, &mut rng);
    fs::hard_link(mnt.join("hl_orig"), mnt.join("a/hl_second")).expect("link");
    fs::hard_link(mnt.join("hl_orig"), mnt.join("a/b/hl_third")).expect("link");
    expected.insert("hl_orig", data.clone());
    expected.insert("a/hl_second", data.clone());
    expected.insert("a/b/hl_third", data);

    // A FIFO.
    mkfifo(&mnt.join("fifo"), 0o640).expect("mkfifo");

    // xattrs on files and directories, including an empty and a 64 KiB value.
    setxattr(
        &mnt.join("f_1"),
        b"user.mail.flags",
        b"\\Seen \\Answered",
        0,
    )
    .expect("setxattr");
    setxattr(&mnt.join("f_1"), b"user.empty", b"", 0).expect("setxattr empty");
    setxattr(&mnt.join("f_1"), b"trusted.big", &rng.bytes(65536), 0).expect("setxattr 64 KiB");
    setxattr(&mnt.join("a"), b"user.dir", b"directory xattr", 0).expect("setxattr dir");
    setxattr(&mnt.join("hl_orig"), b"security.label", b"s0", 0).expect("setxattr security");
    setxattr(&mnt.join("f_1"), b"user.removed", b"gone", 0).expect("setxattr");
    assert_eq!(
        unsafe_removexattr(&mnt.join("f_1"), b"user.removed"),
        0,
        "removexattr: {}",
        std::io::Error::last_os_error()
    );

    // chmod, chown, utimes (with nanoseconds, and before the epoch).
    fs::set_permissions(mnt.join("f_4095"), fs::Permissions::from_mode(0o640)).expect("chmod");
    fs::set_permissions(mnt.join("f_chunk"), fs::Permissions::from_mode(0o4751)).expect("chmod");
    fs::set_permissions(mnt.join("a/b"), fs::Permissions::from_mode(0o1777)).expect("chmod");
    fs::set_permissions(mnt.join("empty"), fs::Permissions::from_mode(0o2750)).expect("chmod");
    lchown(&mnt.join("f_4096"), 1234, 5678).expect("chown");
    lchown(&mnt.join("a/b/c"), 4321, 8765).expect("chown dir");
    lchown(&mnt.join("link_rel"), 42, 43).expect("lchown symlink");
    utimens(
        &mnt.join("f_chunk_p1"),
        (1_000_000_000, 1),
        (1_234_567_890, 123_456_789),
        false,
    )
    .expect("utimens");
    utimens(
        &mnt.join("f_0"),
        (-1, 0),
        (-86_400 * 365, 999_999_999),
        false,
    )
    .expect("utimens pre-epoch");
    utimens(
        &mnt.join("a/b/c"),
        (2_000_000_000, 5),
        (2_000_000_001, 6),
        false,
    )
    .expect("utimens dir");
    utimens(&mnt.join("link_dangling"), (7, 7), (8, 8), true).expect("utimens symlink");

    expected
}

/// Copy `data` into the file at `at` through a shared mapping of its first `len` bytes.
fn mmap_write(f: &File, len: usize, at: usize, data: &[u8]) {
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh shared mapping of `len` bytes of an open file of at least that size;
    // only bytes inside it are written, and it is unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let bytes = std::slice::from_raw_parts_mut(p.cast::<u8>(), len);
        bytes[at..at + data.len()].copy_from_slice(data);
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0, "msync");
        assert_eq!(libc::munmap(p, len), 0, "munmap");
    }
}

fn unsafe_removexattr(p: &Path, name: &[u8]) -> i32 {
    let path = cstr(p);
    let name = std::ffi::CString::new(name).expect("name");
    // SAFETY: valid NUL-terminated strings.
    unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }
}

fn verify_expected(mnt: &Path, expected: &Expected, when: &str) {
    for (rel, data) in expected {
        let got = read_all(&mnt.join(rel)).unwrap_or_else(|e| panic!("{when}: read {rel}: {e}"));
        assert_bytes_eq(&got, data, &format!("{when}: {rel}"));
        // Also read in odd-sized pieces (different request offsets than a sequential read).
        let mut f = File::open(mnt.join(rel)).expect("open");
        let mut buf = vec![0u8; 12_345];
        let mut at = 0;
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            assert_bytes_eq(
                &buf[..n],
                &data[at..at + n],
                &format!("{when}: {rel} @ {at}"),
            );
            at += n;
        }
        assert_eq!(at, data.len(), "{when}: {rel}: short read");
    }
    let ino = |r: &str| fs::metadata(mnt.join(r)).expect("stat").ino();
    assert_eq!(
        ino("hl_orig"),
        ino("a/hl_second"),
        "{when}: hard links share the inode"
    );
    assert_eq!(
        ino("hl_orig"),
        ino("a/b/hl_third"),
        "{when}: hard links share the inode"
    );
    assert_eq!(fs::metadata(mnt.join("hl_orig")).expect("stat").nlink(), 3);
    assert_eq!(
        fs::read_link(mnt.join("link_rel")).expect("readlink"),
        Path::new("f_chunk")
    );
    assert_eq!(
        fs::read_link(mnt.join("link_long"))
            .expect("readlink")
            .as_os_str()
            .len(),
        4095
    );
    assert_eq!(
        getxattr(&mnt.join("f_1"), b"user.mail.flags").expect("getxattr"),
        b"\\Seen \\Answered"
    );
    assert_eq!(
        errno_of(getxattr(&mnt.join("f_1"), b"user.removed"), "removed xattr"),
        libc::ENODATA
    );
    let m = fs::metadata(mnt.join("f_chunk_p1")).expect("stat");
    assert_eq!(
        (m.mtime(), m.mtime_nsec()),
        (1_234_567_890, 123_456_789),
        "{when}: mtime"
    );
    assert_eq!(
        (m.atime(), m.atime_nsec()),
        (1_000_000_000, 1),
        "{when}: atime"
    );
    let m = fs::metadata(mnt.join("f_0")).expect("stat");
    assert_eq!(
        (m.mtime(), m.mtime_nsec()),
        (-86_400 * 365, 999_999_999),
        "{when}: pre-epoch mtime"
    );
    let m = fs::metadata(mnt.join("f_4096")).expect("stat");
    assert_eq!((m.uid(), m.gid()), (1234, 5678), "{when}: chown");
    assert_eq!(
        fs::metadata(mnt.join("f_chunk")).expect("stat").mode() & 0o7777,
        0o4751
    );
    assert_eq!(
        fs::metadata(mnt.join("a/b")).expect("stat").mode() & 0o7777,
        0o1777
    );
    let m = fs::symlink_metadata(mnt.join("fifo")).expect("stat fifo");
    assert!(
        std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()),
        "{when}: fifo kind"
    );
    assert_eq!(
        fs::read_dir(mnt.join("many")).expect("read_dir").count(),
        300,
        "{when}"
    );
    assert_eq!(
        fs::read_to_string(mnt.join("many/entry-0299")).expect("read"),
        "299\n"
    );
}

#[test]
fn everything_survives_a_clean_restart() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let expected = populate(&t.mnt);
    verify_expected(&t.mnt, &expected, "before restart");
    let before = snapshot(&t.mnt);
    m.umount();

    // Twice: the second restart checks that a restart itself changed nothing.
    for round in 1..=2 {
        let m = t.mount();
        let after = snapshot(&t.mnt);
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>(),
            "restart {round}: the set of paths changed"
        );
        for (path, b) in &before {
            let a = &after[path];
            assert_eq!(
                a,
                b,
                "restart {round}: {} changed across the restart",
                path.display()
            );
        }
        verify_expected(&t.mnt, &expected, &format!("after restart {round}"));
        m.assert_healthy();
        m.umount();
    }
}

/// A file still open for writing when the daemon is stopped with `spoolfs umount --lazy`:
/// the last close comes after the detach; the data written before must be kept.
#[test]
fn data_written_by_an_open_file_survives_lazy_umount() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let data = Rng::new(77).bytes(3 * CHUNK + 5);
    let mut f = File::create(t.path("open_at_umount")).expect("create");
    f.write_all(&data[..2 * CHUNK]).expect("write");
    let started = std::time::Instant::now();
    let out = spoolfs([
        std::ffi::OsStr::new("umount"),
        std::ffi::OsStr::new("--lazy"),
        t.mnt.as_os_str(),
    ]);
    assert!(out.status.success(), "umount --lazy: {}", describe(&out));
    // The daemon cannot stop while the file is open: `umount --lazy` must not wait for it.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "umount --lazy of a busy mount took {:?}",
        started.elapsed()
    );
    assert!(
        m.alive(),
        "the daemon must keep serving the open file of the detached mount"
    );
    assert!(!is_mounted(&t.mnt));
    // The detached mount still works for the open file.
    f.write_all(&data[2 * CHUNK..]).expect("write after detach");
    close_checked(f).expect("close after detach");
    assert!(
        wait_until(std::time::Duration::from_secs(10), || !m.alive()),
        "daemon did not exit after the last file on the detached mount was closed"
    );
    drop(m);
    let m = t.mount();
    assert_bytes_eq(
        &read_all(&t.path("open_at_umount")).expect("read"),
        &data,
        "open_at_umount",
    );
    m.umount();
}

/// A large file reaches the disk while it is still being written (write-behind): with no
/// fsync and no close, the database grows by most of it, reads through a second descriptor
/// see every byte meanwhile, and after the close and a restart it is all there.
#[test]
fn a_large_file_reaches_the_disk_before_its_close() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let db = t.data.join(spoolfs_store::DB_FILE);
    let db_len = || fs::metadata(&db).map(|md| md.len()).unwrap_or(0);
    let before = db_len();
    let size = 56usize << 20;
    let data = Rng::new(0x3B1D).bytes(size);
    let mut f = File::create(t.path("big")).expect("create");
    for block in data.chunks(128 << 10) {
        f.write_all(block).expect("write");
    }
    // Three write-behind steps of 16 MiB, committed in the background; without write-behind
    // all of it would wait in the memfd for the close (the budget is 1 GiB).
    let behind = before + (32 << 20);
    assert!(
        wait_until(std::time::Duration::from_secs(30), || db_len() >= behind),
        "the database grew from {before} to {} bytes while 56 MiB were written and not \
         yet synced: the content is not written behind",
        db_len()
    );
    assert_bytes_eq(
        &read_all(&t.path("big")).expect("read"),
        &data,
        "big while open",
    );
    close_checked(f).expect("close");
    m.umount();
    let m = t.mount();
    assert_bytes_eq(
        &read_all(&t.path("big")).expect("read"),
        &data,
        "big after restart",
    );
    m.umount();
    t.assert_fsck_clean("after the large write");
}
