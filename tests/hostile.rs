//! Hostile and odd input against a real mount (issue "Reliability: hostile and odd input"):
//! a catalogue of bad inputs, each answered with the precise errno Linux gives, and the
//! daemon still up afterwards (its PID alive and a create/read working after every group).
//!
//! This complements tests/limits.rs (256-byte names for create/mkdir/symlink/stat and as
//! rename/link targets, EFBIG at 2^62 and at 16 TiB, the basic xattr limits on a regular
//! file, rename into a subtree, rmdir of a non-empty directory, hard links to directories,
//! paths through a file) and tests/orphans.rs (reading, writing and truncating an unlinked
//! open file); what those check is not repeated here.
//!
//! Each group collects all mismatches before failing, so one run shows the whole catalogue.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CString, OsStr};
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{symlink, DirEntryExt, FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::panic::Location;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The largest file spoolfs stores (Limits::file_size_max): 16 TiB.
const FILE_SIZE_MAX: i64 = 1 << 44;

// --- the catalogue ------------------------------------------------------------------------

fn errno_name(e: i32) -> String {
    format!("{:?}", nix::errno::Errno::from_raw(e))
}

/// Expectations of one test: every mismatch is recorded with its line, and `finish` fails
/// with the whole list.
struct Catalogue {
    test: &'static str,
    checked: usize,
    failures: Vec<String>,
}

impl Catalogue {
    fn new(test: &'static str) -> Self {
        Catalogue {
            test,
            checked: 0,
            failures: Vec::new(),
        }
    }

    fn fail(&mut self, at: &Location, msg: String) {
        self.failures.push(format!("line {}: {msg}", at.line()));
    }

    /// `r` must fail with `want`.
    #[track_caller]
    fn errno<T: Debug>(&mut self, what: &str, r: io::Result<T>, want: i32) {
        self.checked += 1;
        let at = Location::caller();
        match r {
            Ok(v) => self.fail(
                at,
                format!("{what}: expected {}, got Ok({v:?})", errno_name(want)),
            ),
            Err(e) if e.raw_os_error() == Some(want) => {}
            Err(e) => self.fail(
                at,
                format!(
                    "{what}: expected {}, got {}",
                    errno_name(want),
                    e.raw_os_error().map_or(e.to_string(), errno_name)
                ),
            ),
        }
    }

    /// `r` must succeed; its value, if it did.
    #[track_caller]
    fn ok<T>(&mut self, what: &str, r: io::Result<T>) -> Option<T> {
        self.checked += 1;
        let at = Location::caller();
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                let got = e.raw_os_error().map_or(e.to_string(), errno_name);
                self.fail(at, format!("{what}: expected success, got {got}"));
                None
            }
        }
    }

    /// `r` must succeed with exactly `want`.
    #[track_caller]
    fn eq<T: PartialEq + Debug>(&mut self, what: &str, r: io::Result<T>, want: T) {
        let at = Location::caller();
        if let Some(v) = self.ok(what, r) {
            if v != want {
                self.fail(at, format!("{what}: expected Ok({want:?}), got Ok({v:?})"));
            }
        }
    }

    #[track_caller]
    fn check(&mut self, what: &str, cond: bool, detail: impl FnOnce() -> String) {
        self.checked += 1;
        if !cond {
            let d = detail();
            self.fail(Location::caller(), format!("{what}: {d}"));
        }
    }

    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{}: {} of {} expectations failed:\n  {}",
            self.test,
            self.failures.len(),
            self.checked,
            self.failures.join("\n  ")
        );
        eprintln!("{}: {} expectations met", self.test, self.checked);
    }
}

/// After each group: the daemon's PID is alive and a plain create/read/unlink works.
#[track_caller]
fn still_up(t: &TestFs, m: &MountGuard, group: &str) {
    assert!(m.alive(), "after {group}: daemon {} died", m.pid);
    let p = t.path(&format!("sanity-{group}"));
    let data = format!("still alive after {group}");
    fs::write(&p, &data).unwrap_or_else(|e| panic!("after {group}: create: {e}"));
    let got = fs::read(&p).unwrap_or_else(|e| panic!("after {group}: read: {e}"));
    assert_eq!(got, data.as_bytes(), "after {group}: content read back");
    fs::remove_file(&p).unwrap_or_else(|e| panic!("after {group}: unlink: {e}"));
    m.assert_healthy();
}

/// `MountGuard::umount`, once no process holds anything under the mount. Another test
/// thread spawning a child copies this process's descriptors into it until the child's exec
/// closes them; on a loaded machine that takes long enough for the guard's own retry (which
/// only retries while no holder is visible) to give up.
/// The common end of a catalogue group: the daemon is still up and serving, every
/// expectation held, the mount comes down cleanly, and the state passes fsck.
fn end_group(t: &TestFs, m: MountGuard, c: Catalogue, group: &str, when: &str) {
    still_up(t, &m, group);
    c.finish();
    umount(m);
    t.assert_fsck_clean(when);
}

fn umount(m: MountGuard) {
    wait_until(Duration::from_secs(5), || {
        open_files_under(&m.mnt).is_empty()
    });
    m.umount();
}

// --- raw syscalls (byte names, signed offsets, flags std does not expose) ------------------

fn at(base: &Path, name: &[u8]) -> PathBuf {
    base.join(OsStr::from_bytes(name))
}

fn cbytes(b: &[u8]) -> CString {
    CString::new(b).expect("no NUL")
}

fn rc(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn rcs(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn open_raw(p: &Path, flags: i32, mode: u32) -> io::Result<File> {
    let c = cstr(p);
    // SAFETY: valid path; the returned descriptor is owned by the File.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn openat_raw(dir: RawFd, name: &[u8], flags: i32, mode: u32) -> io::Result<File> {
    let c = cbytes(name);
    // SAFETY: valid dirfd and name; the returned descriptor is owned by the File.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn open_dir(p: &Path) -> io::Result<File> {
    open_raw(p, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

fn mkdir(p: &Path) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid path.
    rc(unsafe { libc::mkdir(c.as_ptr(), 0o755) })
}

fn mkdirat(dir: RawFd, name: &[u8]) -> io::Result<()> {
    let c = cbytes(name);
    // SAFETY: valid dirfd and name.
    rc(unsafe { libc::mkdirat(dir, c.as_ptr(), 0o755) })
}

fn mknod(p: &Path, mode: u32, dev: u64) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid path.
    rc(unsafe { libc::mknod(c.as_ptr(), mode, dev) })
}

fn symlink_bytes(target: &[u8], p: &Path) -> io::Result<()> {
    let (a, b) = (cbytes(target), cstr(p));
    // SAFETY: valid strings.
    rc(unsafe { libc::symlink(a.as_ptr(), b.as_ptr()) })
}

fn linkat(odir: RawFd, old: &[u8], ndir: RawFd, new: &Path, flags: i32) -> io::Result<()> {
    let (a, b) = (cbytes(old), cstr(new));
    // SAFETY: valid dirfds and strings.
    rc(unsafe { libc::linkat(odir, a.as_ptr(), ndir, b.as_ptr(), flags) })
}

fn renameat(odir: RawFd, old: &[u8], ndir: RawFd, new: &[u8]) -> io::Result<()> {
    let (a, b) = (cbytes(old), cbytes(new));
    // SAFETY: valid dirfds and strings.
    rc(unsafe { libc::renameat(odir, a.as_ptr(), ndir, b.as_ptr()) })
}

fn truncate(p: &Path, len: i64) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid path.
    rc(unsafe { libc::truncate(c.as_ptr(), len) })
}

fn ftruncate(f: &File, len: i64) -> io::Result<()> {
    // SAFETY: plain syscall on an open fd.
    rc(unsafe { libc::ftruncate(f.as_raw_fd(), len) })
}

fn pread(f: &File, len: usize, off: i64) -> io::Result<usize> {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` has `len` writable bytes.
    rcs(unsafe { libc::pread(f.as_raw_fd(), buf.as_mut_ptr().cast(), len, off) })
}

fn pwrite(f: &File, data: &[u8], off: i64) -> io::Result<usize> {
    // SAFETY: `data` has `data.len()` readable bytes.
    rcs(unsafe { libc::pwrite(f.as_raw_fd(), data.as_ptr().cast(), data.len(), off) })
}

fn read_fd(f: &File, len: usize) -> io::Result<usize> {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` has `len` writable bytes.
    rcs(unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), len) })
}

fn write_fd(f: &File, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` has `data.len()` readable bytes.
    rcs(unsafe { libc::write(f.as_raw_fd(), data.as_ptr().cast(), data.len()) })
}

fn fstatat(dir: RawFd, name: &[u8], flags: i32) -> io::Result<libc::stat> {
    let c = cbytes(name);
    // SAFETY: an all-zero stat is a valid value for the kernel to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid dirfd, name and stat buffer.
    rc(unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

fn fstat(f: &File) -> io::Result<libc::stat> {
    fstatat(f.as_raw_fd(), b"", libc::AT_EMPTY_PATH)
}

fn xattr_name(name: &[u8]) -> CString {
    CString::new(name).expect("xattr name without NUL")
}

fn lsetxattr(p: &Path, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
    let (c, n) = (cstr(p), xattr_name(name));
    // SAFETY: valid strings and a buffer of the given length.
    rc(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

fn lgetxattr(p: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let (c, n) = (cstr(p), xattr_name(name));
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: `buf` has `buf.len()` writable bytes.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(rcs(r)?);
    Ok(buf)
}

fn removexattr(p: &Path, name: &[u8]) -> io::Result<()> {
    let (c, n) = (cstr(p), xattr_name(name));
    // SAFETY: valid strings.
    rc(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) })
}

fn lremovexattr(p: &Path, name: &[u8]) -> io::Result<()> {
    let (c, n) = (cstr(p), xattr_name(name));
    // SAFETY: valid strings.
    rc(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) })
}

fn fsetxattr(f: &File, name: &[u8], value: &[u8]) -> io::Result<()> {
    let n = xattr_name(name);
    // SAFETY: valid fd, name and buffer.
    rc(unsafe {
        libc::fsetxattr(
            f.as_raw_fd(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

fn fgetxattr(f: &File, name: &[u8]) -> io::Result<Vec<u8>> {
    let n = xattr_name(name);
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: `buf` has `buf.len()` writable bytes.
    let r = unsafe {
        libc::fgetxattr(
            f.as_raw_fd(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    buf.truncate(rcs(r)?);
    Ok(buf)
}

/// One getdents64 call into a buffer of `bufsize` bytes: the names it returned (none at the
/// end of the directory).
fn getdents(dir: &File, bufsize: usize) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; bufsize];
    // SAFETY: `buf` has `bufsize` writable bytes.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            dir.as_raw_fd(),
            buf.as_mut_ptr(),
            bufsize,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut names = Vec::new();
    let mut pos = 0usize;
    while pos < n as usize {
        // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
        let reclen = u16::from_ne_bytes([buf[pos + 16], buf[pos + 17]]) as usize;
        let name = &buf[pos + 19..pos + reclen];
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        names.push(name[..end].to_vec());
        pos += reclen;
    }
    Ok(names)
}

/// Every name in a directory through getdents64 with a small buffer (many READDIR requests,
/// each continuing from the previous offset), `.` and `..` left out.
fn list_getdents(dir: &Path, bufsize: usize) -> io::Result<Vec<Vec<u8>>> {
    let d = open_dir(dir)?;
    let mut all = Vec::new();
    loop {
        let names = getdents(&d, bufsize)?;
        if names.is_empty() {
            break;
        }
        all.extend(names.into_iter().filter(|n| n != b"." && n != b".."));
    }
    Ok(all)
}

/// The per-mount options (field 6 of /proc/self/mountinfo) of the topmost mount at `mnt`.
fn mount_options(mnt: &Path) -> Option<String> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let want = mnt.as_os_str().as_bytes();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            (f.get(4)?.as_bytes() == want).then(|| f.get(5).map(|s| s.to_string()))?
        })
        .next_back()
}

// --- tests --------------------------------------------------------------------------------

#[test]
fn data_dir_is_private_and_mounts_are_nosuid_nodev() {
    let Some(t) = TestFs::new() else { return };
    assert!(
        !t.data.exists(),
        "the data dir does not exist before the mount"
    );
    let m = t.mount();
    let mut c = Catalogue::new("data_dir_is_private_and_mounts_are_nosuid_nodev");
    let mode = fs::metadata(&t.data).expect("stat data dir").mode() & 0o7777;
    c.check("mode of the created data dir", mode == 0o700, || {
        format!("expected 0700, got {mode:04o}")
    });
    let opts = mount_options(&t.mnt).expect("the mount is in mountinfo");
    let opts: BTreeSet<&str> = opts.split(',').collect();
    for want in ["nosuid", "nodev"] {
        c.check("default mount flags", opts.contains(want), || {
            format!("{want} missing from {opts:?}")
        });
    }
    let info = mount_at(&t.mnt).expect("mounted");
    c.check(
        "source is the data dir",
        info.source == t.data.to_string_lossy(),
        || format!("source {:?}", info.source),
    );
    // nodev: a device node can be created but not opened.
    c.ok(
        "mknod /dev/null twin",
        mknod(&t.path("null"), libc::S_IFCHR | 0o666, libc::makedev(1, 3)),
    );
    c.errno(
        "open a device node on a nodev mount",
        File::open(t.path("null")),
        libc::EACCES,
    );
    still_up(&t, &m, "mount-flags");
    c.finish();
    umount(m);
    let mode = fs::metadata(&t.data).expect("stat data dir").mode() & 0o7777;
    assert_eq!(mode, 0o700, "data dir mode after unmount");
}

#[test]
fn overlong_names_give_enametoolong_everywhere() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut c = Catalogue::new("overlong_names_give_enametoolong_everywhere");
    fs::create_dir(t.path("dir")).expect("mkdir");
    fs::write(t.path("file"), b"file").expect("create");
    symlink("file", t.path("sym")).expect("symlink");
    let ok = "k".repeat(255);
    fs::write(t.path(&ok), b"255").expect("a 255-byte name");

    // 256 and 1000 bytes reach the daemon (the kernel passes FUSE names up to 1024 bytes),
    // 4000 bytes the kernel refuses itself; the caller must see the same errno either way.
    for len in [256usize, 1000, 4000] {
        let long = "n".repeat(len);
        let lp = t.path(&long);
        assert!(
            lp.as_os_str().len() < libc::PATH_MAX as usize - 10,
            "the test must exceed NAME_MAX, not PATH_MAX"
        );
        let w = |op: &str| format!("{op} ({len}-byte name)");
        let e = libc::ENAMETOOLONG;
        c.errno(
            &w("open O_CREAT"),
            open_raw(&lp, libc::O_CREAT | libc::O_WRONLY, 0o644),
            e,
        );
        c.errno(
            &w("open O_CREAT|O_EXCL"),
            open_raw(&lp, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o644),
            e,
        );
        c.errno(&w("open"), File::open(&lp), e);
        c.errno(&w("mkdir"), mkdir(&lp), e);
        c.errno(&w("mknod fifo"), mknod(&lp, libc::S_IFIFO | 0o644, 0), e);
        c.errno(&w("mknod file"), mknod(&lp, libc::S_IFREG | 0o644, 0), e);
        c.errno(&w("symlink name"), symlink("file", &lp), e);
        c.errno(&w("link source"), fs::hard_link(&lp, t.path("x")), e);
        c.errno(&w("link target"), fs::hard_link(t.path("file"), &lp), e);
        c.errno(&w("rename source"), fs::rename(&lp, t.path("x")), e);
        c.errno(&w("rename target"), fs::rename(t.path("file"), &lp), e);
        c.errno(&w("rename dir target"), fs::rename(t.path("dir"), &lp), e);
        c.errno(
            &w("rename NOREPLACE target"),
            renameat2(&t.path("file"), &lp, libc::RENAME_NOREPLACE),
            e,
        );
        c.errno(
            &w("rename EXCHANGE target"),
            renameat2(&t.path("file"), &lp, libc::RENAME_EXCHANGE),
            e,
        );
        c.errno(
            &w("rename into dir"),
            fs::rename(t.path("file"), t.path("dir").join(&long)),
            e,
        );
        c.errno(&w("unlink"), fs::remove_file(&lp), e);
        c.errno(&w("rmdir"), fs::remove_dir(&lp), e);
        c.errno(&w("stat"), fs::metadata(&lp), e);
        c.errno(&w("lstat"), fs::symlink_metadata(&lp), e);
        c.errno(&w("readlink"), fs::read_link(&lp), e);
        c.errno(
            &w("chmod"),
            fs::set_permissions(&lp, fs::Permissions::from_mode(0o600)),
            e,
        );
        c.errno(&w("truncate"), truncate(&lp, 0), e);
        c.errno(&w("utimensat"), utimens(&lp, (1, 0), (1, 0), false), e);
        c.errno(
            &w("setxattr on the path"),
            setxattr(&lp, b"user.a", b"v", 0),
            e,
        );
        c.errno(&w("getxattr on the path"), getxattr(&lp, b"user.a"), e);
        c.errno(&w("listxattr on the path"), listxattr(&lp), e);
        c.errno(
            &w("removexattr on the path"),
            removexattr(&lp, b"user.a"),
            e,
        );
        c.errno(&w("opendir"), fs::read_dir(&lp), e);
        c.errno(&w("as a middle component"), File::open(lp.join("x")), e);
        c.errno(
            &w("in a subdirectory"),
            File::create(t.path("dir").join(&long)),
            e,
        );
        // xattr names: the limit there is 255 bytes too, but the errno is ERANGE.
        let xname = format!("user.{long}");
        c.errno(
            &w("setxattr name"),
            setxattr(&t.path("file"), xname.as_bytes(), b"v", 0),
            libc::ERANGE,
        );
        c.errno(
            &w("getxattr name"),
            getxattr(&t.path("file"), xname.as_bytes()),
            libc::ERANGE,
        );
        c.errno(
            &w("removexattr name"),
            removexattr(&t.path("file"), xname.as_bytes()),
            libc::ERANGE,
        );
    }
    // Nothing was created or changed by the refused calls.
    let mut names: Vec<String> = fs::read_dir(&t.mnt)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want = vec!["dir".to_string(), "file".into(), "sym".into(), ok.clone()];
    want.sort();
    c.check("root listing unchanged", names == want, || {
        format!("got {names:?}")
    });
    c.check(
        "dir still empty",
        fs::read_dir(t.path("dir"))
            .expect("ls dir")
            .next()
            .is_none(),
        || "dir has entries".into(),
    );
    c.eq("file unchanged", fs::read(t.path("file")), b"file".to_vec());
    c.eq(
        "the 255-byte name works",
        fs::read(t.path(&ok)),
        b"255".to_vec(),
    );
    c.ok(
        "rename onto a 255-byte name",
        fs::rename(t.path("file"), t.path(&"m".repeat(255))),
    );
    still_up(&t, &m, "long-names");
    c.finish();
    umount(m);
}

/// Names that are not UTF-8 (or are odd UTF-8): Linux names are bytes, so all must work
/// and come back from readdir byte for byte, also after a restart.
#[test]
fn names_are_bytes_not_utf8() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut c = Catalogue::new("names_are_bytes_not_utf8");
    let names: Vec<Vec<u8>> = vec![
        b"\xff".to_vec(),
        b"\xfe\xff".to_vec(),
        b"\x80abc".to_vec(),
        b"bad\xc3\x28".to_vec(),      // broken 2-byte sequence
        b"\xc0\xaf".to_vec(),         // overlong '/'
        b"\xed\xa0\x80".to_vec(),     // UTF-16 surrogate
        b"\xf4\x90\x80\x80".to_vec(), // past U+10FFFF
        b"caf\xc3\xa9".to_vec(),      // NFC é
        b"cafe\xcc\x81".to_vec(),     // NFD é: a different name
        b"CAFE".to_vec(),
        b"cafe".to_vec(),
        b"\x01\x02\x1b[31m".to_vec(),
        b"new\nline".to_vec(),
        b"tab\there".to_vec(),
        b" ".to_vec(),
        b"...".to_vec(),
        b"-rf".to_vec(),
        b"back\\slash".to_vec(),
        b"\x7f".to_vec(),
        vec![0xff; 255],
        [b"\xe2\x82\xac".repeat(85)].concat(), // 255 bytes of 3-byte characters
    ];
    let dir = t.path("bytes");
    fs::create_dir(&dir).expect("mkdir");
    for n in &names {
        let p = at(&dir, n);
        let mut f = match c.ok(&format!("create {n:?}"), File::create(&p)) {
            Some(f) => f,
            None => continue,
        };
        c.ok("write", f.write_all(n));
        drop(f);
        c.eq(&format!("read {n:?}"), fs::read(&p), n.clone());
    }
    c.errno(
        "256 bytes of 0xff",
        File::create(at(&dir, &[0xff; 256])),
        libc::ENAMETOOLONG,
    );
    // Every other operation with such names.
    let sub = at(&t.mnt, b"sub\xff\xfe");
    c.ok("mkdir", fs::create_dir(&sub));
    c.ok("create inside", fs::write(at(&sub, b"\x80"), b"inner"));
    c.ok(
        "symlink with a non-UTF-8 name and target",
        symlink_bytes(b"../bytes/\xff", &at(&sub, b"ln\xc0")),
    );
    c.eq(
        "readlink",
        fs::read_link(at(&sub, b"ln\xc0")).map(|p| p.into_os_string().into_vec()),
        b"../bytes/\xff".to_vec(),
    );
    c.eq(
        "read through that symlink",
        fs::read(at(&sub, b"ln\xc0")),
        b"\xff".to_vec(),
    );
    c.ok(
        "hard link",
        fs::hard_link(at(&dir, b"\xfe\xff"), at(&sub, b"hl\xfe")),
    );
    c.ok(
        "rename between non-UTF-8 names",
        fs::rename(at(&dir, b"\xc0\xaf"), at(&sub, b"moved\xed\xa0\x80")),
    );
    c.ok(
        "user xattr with a non-UTF-8 name and binary value",
        setxattr(&sub, b"user.\xff", b"\x00\xff\x00", 0),
    );
    c.eq(
        "getxattr",
        getxattr(&sub, b"user.\xff"),
        b"\x00\xff\x00".to_vec(),
    );
    c.eq("listxattr", listxattr(&sub), vec![b"user.\xff".to_vec()]);
    c.ok(
        "unicode and bad bytes in one xattr name",
        setxattr(&sub, b"trusted.caf\xc3\xa9\xc3\x28", b"v", 0),
    );

    let mut want_dir: Vec<Vec<u8>> = names
        .iter()
        .filter(|n| n.as_slice() != b"\xc0\xaf")
        .cloned()
        .collect();
    want_dir.sort();
    let mut want_sub: Vec<Vec<u8>> = vec![
        b"\x80".to_vec(),
        b"ln\xc0".to_vec(),
        b"hl\xfe".to_vec(),
        b"moved\xed\xa0\x80".to_vec(),
    ];
    want_sub.sort();
    let listing = |p: &Path| -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = fs::read_dir(p)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().into_vec())
            .collect();
        v.sort();
        v
    };
    c.check("readdir of bytes/", listing(&dir) == want_dir, || {
        format!("got {:?}", listing(&dir))
    });
    c.check("readdir of sub", listing(&sub) == want_sub, || {
        format!("got {:?}", listing(&sub))
    });
    c.eq(
        "hard link count",
        fs::metadata(at(&sub, b"hl\xfe")).map(|m| m.nlink()),
        2,
    );
    still_up(&t, &m, "bytes");
    umount(m);

    // The same bytes after a restart.
    let m = t.mount();
    c.check(
        "readdir of bytes/ after restart",
        listing(&dir) == want_dir,
        || format!("got {:?}", listing(&dir)),
    );
    c.check(
        "readdir of sub after restart",
        listing(&sub) == want_sub,
        || format!("got {:?}", listing(&sub)),
    );
    for n in names.iter().filter(|n| n.as_slice() != b"\xc0\xaf") {
        c.eq(
            &format!("read {n:?} after restart"),
            fs::read(at(&dir, n)),
            n.clone(),
        );
    }
    c.eq(
        "moved file after restart",
        fs::read(at(&sub, b"moved\xed\xa0\x80")),
        b"\xc0\xaf".to_vec(),
    );
    c.eq(
        "xattr after restart",
        getxattr(&sub, b"user.\xff"),
        b"\x00\xff\x00".to_vec(),
    );
    // And they can all be removed again.
    c.ok("rm -r", fs::remove_dir_all(&dir));
    c.ok("rm -r", fs::remove_dir_all(&sub));
    end_group(&t, m, c, "bytes-restart", "after non-UTF-8 names");
}

#[test]
fn offsets_and_sizes_near_2_pow_63() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut c = Catalogue::new("offsets_and_sizes_near_2_pow_63");
    let p = t.path("f");
    let f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&p)
        .expect("create");
    f.write_all_at(b"head", 0).expect("write");
    let max = i64::MAX;

    // pread: past EOF is 0 bytes however far; a negative offset or one whose end wraps is
    // EINVAL (rw_verify_area).
    for off in [5, 1 << 40, FILE_SIZE_MAX, 1 << 62, max - 4096, max - 1] {
        c.eq(&format!("pread at {off}"), pread(&f, 1, off), 0);
    }
    c.eq("pread of 0 bytes at 2^63-1", pread(&f, 0, max), 0);
    c.eq(
        "pread of 4096 bytes at 2^63-4096",
        pread(&f, 4096, max - 4096),
        0,
    );
    c.errno("pread 1 byte at 2^63-1", pread(&f, 1, max), libc::EINVAL);
    c.errno(
        "pread 2 bytes at 2^63-2",
        pread(&f, 2, max - 1),
        libc::EINVAL,
    );
    c.errno("pread at -1", pread(&f, 1, -1), libc::EINVAL);
    c.errno("pread at i64::MIN", pread(&f, 1, i64::MIN), libc::EINVAL);

    // pwrite: past the file size limit EFBIG, a wrapping end EINVAL, negative EINVAL, and
    // an empty write anywhere valid is a no-op.
    c.errno("pwrite at 2^63-2", pwrite(&f, b"x", max - 1), libc::EFBIG);
    c.errno(
        "pwrite at 2^63-4096",
        pwrite(&f, &[1; 4096], max - 4096),
        libc::EFBIG,
    );
    // A write that crosses the limit is cut short at it (as generic_write_check_limits does
    // on local filesystems); only a write starting at the limit is EFBIG.
    c.eq(
        "pwrite straddling 16 TiB is a short write",
        pwrite(&f, b"xy", FILE_SIZE_MAX - 1),
        1,
    );
    c.eq(
        "size after the short write",
        f.metadata().map(|m| m.len()),
        FILE_SIZE_MAX as u64,
    );
    c.errno(
        "pwrite at 16 TiB after it",
        pwrite(&f, b"y", FILE_SIZE_MAX),
        libc::EFBIG,
    );
    c.ok("ftruncate back to 4", ftruncate(&f, 4));
    c.errno(
        "pwrite 1 byte at 2^63-1",
        pwrite(&f, b"x", max),
        libc::EINVAL,
    );
    c.errno(
        "pwrite 2 bytes at 2^63-2",
        pwrite(&f, b"xy", max - 1),
        libc::EINVAL,
    );
    c.errno("pwrite at -1", pwrite(&f, b"x", -1), libc::EINVAL);
    c.errno(
        "pwrite at i64::MIN",
        pwrite(&f, b"x", i64::MIN),
        libc::EINVAL,
    );
    c.eq("pwrite of 0 bytes at 2^62", pwrite(&f, b"", 1 << 62), 0);
    c.eq("pwrite of 0 bytes at 2^63-1", pwrite(&f, b"", max), 0);
    c.eq(
        "size after refused writes",
        f.metadata().map(|m| m.len()),
        4,
    );

    // ftruncate / truncate.
    c.errno("ftruncate -1", ftruncate(&f, -1), libc::EINVAL);
    c.errno("ftruncate i64::MIN", ftruncate(&f, i64::MIN), libc::EINVAL);
    c.errno("truncate -1", truncate(&p, -1), libc::EINVAL);
    c.errno("truncate 2^63-1", truncate(&p, max), libc::EFBIG);
    c.errno(
        "truncate 16 TiB + 1",
        truncate(&p, FILE_SIZE_MAX + 1),
        libc::EFBIG,
    );
    c.errno("ftruncate 2^62", ftruncate(&f, 1 << 62), libc::EFBIG);
    let ro = File::open(&p).expect("open read-only");
    c.errno(
        "ftruncate of a read-only fd",
        ftruncate(&ro, 0),
        libc::EINVAL,
    );
    c.errno("truncate a directory", truncate(&t.mnt, 0), libc::EISDIR);
    c.eq(
        "size after refused truncates",
        f.metadata().map(|m| m.len()),
        4,
    );

    // fallocate.
    use libc::{FALLOC_FL_KEEP_SIZE as KEEP, FALLOC_FL_PUNCH_HOLE as PUNCH};
    c.errno(
        "fallocate offset -1",
        fallocate(&f, 0, -1, 10),
        libc::EINVAL,
    );
    c.errno("fallocate length 0", fallocate(&f, 0, 0, 0), libc::EINVAL);
    c.errno("fallocate length -1", fallocate(&f, 0, 0, -1), libc::EINVAL);
    c.errno(
        "fallocate length i64::MIN",
        fallocate(&f, 0, 0, i64::MIN),
        libc::EINVAL,
    );
    c.errno(
        "fallocate 1 byte at 2^63-1",
        fallocate(&f, 0, max, 1),
        libc::EFBIG,
    );
    c.errno(
        "fallocate 2^63-1 bytes at 1",
        fallocate(&f, 0, 1, max),
        libc::EFBIG,
    );
    c.errno(
        "fallocate straddling 16 TiB",
        fallocate(&f, 0, FILE_SIZE_MAX - 1, 2),
        libc::EFBIG,
    );
    c.errno(
        "punch hole at 2^62",
        fallocate(&f, PUNCH | KEEP, 1 << 62, 4096),
        libc::EFBIG,
    );
    c.errno(
        "punch hole with a negative offset",
        fallocate(&f, PUNCH | KEEP, -4096, 4096),
        libc::EINVAL,
    );
    c.errno(
        "unknown fallocate mode bit",
        fallocate(&f, 0x4000_0000, 0, 10),
        libc::EOPNOTSUPP,
    );
    c.errno(
        "fallocate on a read-only fd",
        fallocate(&ro, 0, 0, 10),
        libc::EBADF,
    );
    c.ok(
        "punch hole just below 16 TiB, far past EOF",
        fallocate(&f, PUNCH | KEEP, FILE_SIZE_MAX - 4096, 4096),
    );
    c.ok(
        "KEEP_SIZE just below 16 TiB",
        fallocate(&f, KEEP, FILE_SIZE_MAX - 4096, 4096),
    );
    c.eq("size after fallocate", f.metadata().map(|m| m.len()), 4);

    // lseek: SEEK_SET/CUR/END are the kernel's (any offset up to 2^63-1 is fine, a
    // negative result EINVAL); SEEK_DATA/HOLE past EOF or before 0 are ENXIO.
    c.eq("SEEK_SET 2^63-1", lseek(&f, max, libc::SEEK_SET), max);
    c.eq("SEEK_CUR 0 at 2^63-1", lseek(&f, 0, libc::SEEK_CUR), max);
    c.errno(
        "SEEK_CUR +1 at 2^63-1",
        lseek(&f, 1, libc::SEEK_CUR),
        libc::EINVAL,
    );
    c.errno("read 1 byte at 2^63-1", read_fd(&f, 1), libc::EINVAL);
    c.errno("write 1 byte at 2^63-1", write_fd(&f, b"x"), libc::EINVAL);
    c.eq("SEEK_SET 2^62", lseek(&f, 1 << 62, libc::SEEK_SET), 1 << 62);
    c.eq("read at 2^62", read_fd(&f, 100), 0);
    c.errno("write at 2^62", write_fd(&f, b"x"), libc::EFBIG);
    c.errno("SEEK_SET -1", lseek(&f, -1, libc::SEEK_SET), libc::EINVAL);
    c.errno(
        "SEEK_SET i64::MIN",
        lseek(&f, i64::MIN, libc::SEEK_SET),
        libc::EINVAL,
    );
    c.errno(
        "SEEK_END +2^63-1",
        lseek(&f, max, libc::SEEK_END),
        libc::EINVAL,
    );
    c.errno(
        "SEEK_END -5 (size 4)",
        lseek(&f, -5, libc::SEEK_END),
        libc::EINVAL,
    );
    c.eq("SEEK_END -4", lseek(&f, -4, libc::SEEK_END), 0);
    c.eq("SEEK_END 2^63-5", lseek(&f, max - 4, libc::SEEK_END), max);
    c.errno(
        "SEEK_DATA at 2^63-1",
        lseek(&f, max, libc::SEEK_DATA),
        libc::ENXIO,
    );
    c.errno(
        "SEEK_HOLE at 2^63-1",
        lseek(&f, max, libc::SEEK_HOLE),
        libc::ENXIO,
    );
    c.errno(
        "SEEK_DATA at 2^62",
        lseek(&f, 1 << 62, libc::SEEK_DATA),
        libc::ENXIO,
    );
    c.errno(
        "SEEK_DATA at -1",
        lseek(&f, -1, libc::SEEK_DATA),
        libc::ENXIO,
    );
    c.errno(
        "SEEK_HOLE at -1",
        lseek(&f, -1, libc::SEEK_HOLE),
        libc::ENXIO,
    );
    c.errno(
        "SEEK_HOLE at i64::MIN",
        lseek(&f, i64::MIN, libc::SEEK_HOLE),
        libc::ENXIO,
    );
    c.errno("whence 5", lseek(&f, 0, 5), libc::EINVAL);
    c.errno("whence -1", lseek(&f, 0, -1), libc::EINVAL);
    c.eq("SEEK_DATA at 0", lseek(&f, 0, libc::SEEK_DATA), 0);
    c.eq("SEEK_HOLE at 0", lseek(&f, 0, libc::SEEK_HOLE), 4);

    // O_APPEND on a file already at the size limit.
    c.ok("ftruncate to exactly 16 TiB", ftruncate(&f, FILE_SIZE_MAX));
    let app = OpenOptions::new()
        .append(true)
        .open(&p)
        .expect("open O_APPEND");
    c.errno("append at 16 TiB", write_fd(&app, b"x"), libc::EFBIG);
    c.eq(
        "pread at 16 TiB - 1 of the sparse tail",
        pread(&f, 10, FILE_SIZE_MAX - 1),
        1,
    );
    drop(app);
    c.ok("ftruncate back", ftruncate(&f, 4));

    // Nothing changed: size and content.
    c.eq("final size", f.metadata().map(|m| m.len()), 4);
    let mut head = [0u8; 8];
    c.eq("final content", f.read_at(&mut head, 0), 4);
    c.check("content bytes", &head[..4] == b"head", || {
        format!("{head:?}")
    });
    drop(ro);
    c.ok("close", close_checked(f));
    still_up(&t, &m, "offsets");

    // Timestamps at the ends of the 64-bit range round-trip, also through a restart.
    let times: [(&str, i64, i64); 4] = [
        ("t-max", max, 0),
        ("t-min-plus-1", i64::MIN + 1, 999_999_999),
        ("t-minus-half", -1, 500_000_000),
        ("t-min", i64::MIN, 0),
    ];
    for (name, secs, nsec) in times {
        fs::write(t.path(name), b"").expect("create");
        c.ok(
            &format!("utimensat {name}"),
            utimens(&t.path(name), (secs, nsec), (secs, nsec), false),
        );
    }
    c.errno(
        "utimensat with tv_nsec = 10^9",
        utimens(&p, (0, 1_000_000_000), (0, 0), false),
        libc::EINVAL,
    );
    c.errno(
        "utimensat with tv_nsec = -1",
        utimens(&p, (0, -1), (0, 0), false),
        libc::EINVAL,
    );
    let check_times = |c: &mut Catalogue, when: &str| {
        for (name, secs, nsec) in times {
            let got = fs::metadata(t.path(name)).map(|m| (m.mtime(), m.mtime_nsec(), m.atime()));
            let fine = match &got {
                Ok(g) if *g == (secs, nsec, secs) => true,
                // spoolfs stores i64::MIN as i64::MIN + 1 (src/adapter.rs: request_timestamp
                // saturates the 2^63 s before the epoch to i64::MAX before negating it).
                Ok(g) if secs == i64::MIN => *g == (i64::MIN + 1, 0, i64::MIN + 1),
                _ => false,
            };
            c.check(&format!("{when}: times of {name}"), fine, || {
                format!("expected ({secs}, {nsec}), got {got:?}")
            });
        }
    };
    check_times(&mut c, "live");
    still_up(&t, &m, "timestamps");
    umount(m);
    t.assert_fsck_clean("after huge offsets");
    let m = t.mount();
    check_times(&mut c, "after restart");
    c.finish();
    umount(m);
}

/// A minimal valid POSIX ACL xattr value (user::rw-, group::r--, other::r--): the kernel
/// parses ACLs before the filesystem sees them.
fn minimal_acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec(); // POSIX_ACL_XATTR_VERSION
    for (tag, perm) in [(0x01u16, 6u16), (0x04, 4), (0x20, 4)] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    v
}

#[test]
fn xattr_namespaces_limits_and_node_kinds() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut c = Catalogue::new("xattr_namespaces_limits_and_node_kinds");
    let file = t.path("file");
    let dir = t.path("dir");
    fs::write(&file, b"x").expect("create");
    fs::create_dir(&dir).expect("mkdir");
    symlink("file", t.path("sym")).expect("symlink");
    mkfifo(&t.path("fifo"), 0o644).expect("mkfifo");
    mknod(&t.path("sock"), libc::S_IFSOCK | 0o644, 0).expect("mknod socket");
    mknod(&t.path("chr"), libc::S_IFCHR | 0o644, libc::makedev(1, 3)).expect("mknod chr");

    // The limits on a directory and in every supported namespace: 255-byte names and
    // 64 KiB values are the most.
    for (what, p) in [("dir", &dir), ("file", &file)] {
        for ns in ["user.", "trusted.", "security."] {
            if what == "file" && ns == "user." {
                continue; // tests/limits.rs
            }
            let name255 = format!("{ns}{}", "n".repeat(255 - ns.len()));
            let name256 = format!("{ns}{}", "n".repeat(256 - ns.len()));
            let w = |s: &str| format!("{what}: {ns} {s}");
            c.ok(
                &w("255-byte name"),
                setxattr(p, name255.as_bytes(), b"v", 0),
            );
            c.errno(
                &w("256-byte name"),
                setxattr(p, name256.as_bytes(), b"v", 0),
                libc::ERANGE,
            );
            let vname = format!("{ns}value");
            c.ok(
                &w("64 KiB value"),
                setxattr(p, vname.as_bytes(), &vec![0xa5; 65536], 0),
            );
            c.errno(
                &w("64 KiB + 1 value"),
                setxattr(p, vname.as_bytes(), &vec![0x5a; 65537], 0),
                libc::E2BIG,
            );
            c.eq(
                &w("the 64 KiB value is intact"),
                lgetxattr(p, vname.as_bytes()),
                vec![0xa5; 65536],
            );
        }
    }
    // Empty names and bad flags (the kernel's checks).
    c.errno("empty name", setxattr(&file, b"", b"v", 0), libc::ERANGE);
    c.errno("get empty name", getxattr(&file, b""), libc::ERANGE);
    c.errno("remove empty name", removexattr(&file, b""), libc::ERANGE);
    c.errno("flags 4", setxattr(&file, b"user.f", b"v", 4), libc::EINVAL);

    // Namespaces spoolfs does not store.
    for name in [
        &b"user"[..],
        b"User.x",
        b"USER.x",
        b"os2.x",
        b"xfs.x",
        b"system.foo",
        b"system.nfs4_acl",
        b"system.richacl",
        b".user.x",
        b"\xffuser.x",
    ] {
        let n = String::from_utf8_lossy(name);
        c.errno(
            &format!("set {n}"),
            setxattr(&file, name, b"v", 0),
            libc::EOPNOTSUPP,
        );
        c.errno(&format!("get {n}"), getxattr(&file, name), libc::EOPNOTSUPP);
        c.errno(
            &format!("remove {n}"),
            removexattr(&file, name),
            libc::EOPNOTSUPP,
        );
    }
    // POSIX ACLs: not supported (a valid ACL, so the kernel passes it on).
    let acl = minimal_acl();
    for (what, p, name) in [
        (
            "access ACL on a file",
            &file,
            &b"system.posix_acl_access"[..],
        ),
        ("access ACL on a dir", &dir, b"system.posix_acl_access"),
        ("default ACL on a dir", &dir, b"system.posix_acl_default"),
    ] {
        c.errno(
            &format!("set {what}"),
            setxattr(p, name, &acl, 0),
            libc::EOPNOTSUPP,
        );
        c.errno(&format!("get {what}"), getxattr(p, name), libc::EOPNOTSUPP);
        c.errno(
            &format!("remove {what}"),
            removexattr(p, name),
            libc::EOPNOTSUPP,
        );
    }
    // A malformed ACL never reaches the daemon: EINVAL from the ACL parser on older
    // kernels, EOPNOTSUPP on newer ones (6.18 answers it without a FUSE request).
    let r = setxattr(&file, b"system.posix_acl_access", b"garbage", 0);
    c.check(
        "set a garbage access ACL",
        matches!(
            r.as_ref().map_err(|e| e.raw_os_error()),
            Err(Some(libc::EINVAL | libc::EOPNOTSUPP))
        ),
        || format!("expected EINVAL or EOPNOTSUPP, got {r:?}"),
    );

    // user.* only on regular files and directories: EPERM to write, ENODATA to read
    // (xattr_permission); trusted.* works on every kind.
    for node in ["sym", "fifo", "sock", "chr"] {
        let p = t.path(node);
        c.errno(
            &format!("user xattr on {node}"),
            lsetxattr(&p, b"user.x", b"v", 0),
            libc::EPERM,
        );
        c.errno(
            &format!("user xattr on {node}, XATTR_CREATE"),
            lsetxattr(&p, b"user.x", b"v", libc::XATTR_CREATE),
            libc::EPERM,
        );
        c.errno(
            &format!("get user xattr on {node}"),
            lgetxattr(&p, b"user.x"),
            libc::ENODATA,
        );
        c.errno(
            &format!("remove user xattr on {node}"),
            lremovexattr(&p, b"user.x"),
            libc::EPERM,
        );
        c.ok(
            &format!("trusted xattr on {node}"),
            lsetxattr(&p, b"trusted.x", b"tv", 0),
        );
        c.eq(
            &format!("get trusted xattr on {node}"),
            lgetxattr(&p, b"trusted.x"),
            b"tv".to_vec(),
        );
    }
    // setxattr (not lsetxattr) on the symlink reaches the file behind it.
    c.ok(
        "user xattr through a symlink",
        setxattr(&t.path("sym"), b"user.through", b"v", 0),
    );
    c.eq(
        "seen on the file",
        getxattr(&file, b"user.through"),
        b"v".to_vec(),
    );
    c.errno(
        "not on the link",
        lgetxattr(&t.path("sym"), b"user.through"),
        libc::ENODATA,
    );
    // More names than one listxattr can return (the kernel caps the list at 64 KiB): the
    // size probe says 64 KiB, the listing E2BIG, and every name still works on its own.
    let many = t.path("many");
    fs::write(&many, b"").expect("create");
    let names: Vec<Vec<u8>> = (0..300)
        .map(|i| format!("user.{i:03}{}", "n".repeat(247)).into_bytes())
        .collect();
    for n in &names {
        setxattr(&many, n, b"v", 0).expect("setxattr");
    }
    c.errno(
        "listxattr of 76,500 bytes of names",
        listxattr(&many),
        libc::E2BIG,
    );
    c.eq(
        "get the last of them",
        getxattr(&many, &names[299]),
        b"v".to_vec(),
    );
    c.ok("remove one", removexattr(&many, &names[0]));
    end_group(&t, m, c, "xattrs", "after xattrs");
}

/// An xattr name that is only a namespace prefix ("user.") names nothing: every Linux
/// filesystem with xattr handlers (ext4, xfs, btrfs, tmpfs) answers EINVAL
/// (xattr_resolve_name), for set, get and remove alike.
#[test]
fn xattr_names_that_are_only_a_prefix_are_einval() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut c = Catalogue::new("xattr_names_that_are_only_a_prefix_are_einval");
    let file = t.path("file");
    fs::write(&file, b"x").expect("create");
    for name in [&b"user."[..], b"trusted.", b"security."] {
        let n = String::from_utf8_lossy(name);
        c.errno(
            &format!("set {n}"),
            setxattr(&file, name, b"v", 0),
            libc::EINVAL,
        );
        c.errno(&format!("get {n}"), getxattr(&file, name), libc::EINVAL);
        c.errno(
            &format!("remove {n}"),
            removexattr(&file, name),
            libc::EINVAL,
        );
    }
    c.eq("nothing was stored", listxattr(&file), Vec::new());
    still_up(&t, &m, "xattr-prefix");
    c.finish();
    umount(m);
}

#[test]
fn namespace_traps_dots_loops_and_file_parents() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut c = Catalogue::new("namespace_traps_dots_loops_and_file_parents");
    fs::create_dir_all(t.path("a/b/c/d")).expect("mkdir -p");
    fs::write(t.path("f"), b"f").expect("create");

    // "." and "..": rmdir "." EINVAL, rmdir ".." ENOTEMPTY, rename of either EBUSY.
    c.errno("rmdir a/.", fs::remove_dir(t.path("a/.")), libc::EINVAL);
    c.errno(
        "rmdir a/b/c/d/.",
        fs::remove_dir(t.path("a/b/c/d/.")),
        libc::EINVAL,
    );
    c.errno("rmdir mnt/.", fs::remove_dir(t.path(".")), libc::EINVAL);
    c.errno(
        "rmdir a/..",
        fs::remove_dir(t.path("a/..")),
        libc::ENOTEMPTY,
    );
    c.errno(
        "rmdir a/b/c/d/..",
        fs::remove_dir(t.path("a/b/c/d/..")),
        libc::ENOTEMPTY,
    );
    c.errno(
        "rename a/. away",
        fs::rename(t.path("a/."), t.path("z")),
        libc::EBUSY,
    );
    c.errno(
        "rename a/.. away",
        fs::rename(t.path("a/.."), t.path("z")),
        libc::EBUSY,
    );
    c.errno(
        "rename onto a/.",
        fs::rename(t.path("f"), t.path("a/.")),
        libc::EBUSY,
    );
    c.errno("mkdir a/.", fs::create_dir(t.path("a/.")), libc::EEXIST);
    c.errno("mkdir a/..", fs::create_dir(t.path("a/..")), libc::EEXIST);
    c.errno("unlink a/.", fs::remove_file(t.path("a/.")), libc::EISDIR);
    c.errno(
        "link onto a/.",
        fs::hard_link(t.path("f"), t.path("a/.")),
        libc::EEXIST,
    );
    c.errno(
        "link of a/. (a directory)",
        fs::hard_link(t.path("a/."), t.path("alink")),
        libc::EPERM,
    );
    let a = open_dir(&t.path("a")).expect("open a");
    c.errno(
        "linkat AT_EMPTY_PATH of a directory fd",
        linkat(
            a.as_raw_fd(),
            b"",
            libc::AT_FDCWD,
            &t.path("alink"),
            libc::AT_EMPTY_PATH,
        ),
        libc::EPERM,
    );
    // Into its own subtree, with the other rename flavours and from deeper down.
    c.errno(
        "rename NOREPLACE a into a/b/c/d",
        renameat2(&t.path("a"), &t.path("a/b/c/d/a"), libc::RENAME_NOREPLACE),
        libc::EINVAL,
    );
    c.errno(
        "rename a/b into a/b/c/d/e",
        fs::rename(t.path("a/b"), t.path("a/b/c/d/e")),
        libc::EINVAL,
    );
    c.errno(
        "rename a/b onto its descendant a/b/c/d (empty)",
        fs::rename(t.path("a/b"), t.path("a/b/c/d")),
        libc::EINVAL,
    );
    c.errno(
        "rename a/b/c/d onto its ancestor a/b",
        fs::rename(t.path("a/b/c/d"), t.path("a/b")),
        libc::ENOTEMPTY,
    );
    c.errno(
        "rename via fds into the subtree",
        renameat(
            a.as_raw_fd(),
            b"b",
            open_dir(&t.path("a/b/c")).expect("open").as_raw_fd(),
            b"x",
        ),
        libc::EINVAL,
    );
    // rmdir of directories that only hold odd entries.
    for what in ["a dotfile", "a symlink", "a fifo", "an empty dir"] {
        let d = t.path(&format!("holder-{}", what.replace(' ', "-")));
        fs::create_dir(&d).expect("mkdir");
        match what {
            "a dotfile" => fs::write(d.join(".hidden"), b""),
            "a symlink" => symlink("/nonexistent", d.join("s")),
            "a fifo" => mkfifo(&d.join("p"), 0o644),
            _ => fs::create_dir(d.join("e")),
        }
        .expect("make entry");
        c.errno(
            &format!("rmdir a directory holding only {what}"),
            fs::remove_dir(&d),
            libc::ENOTEMPTY,
        );
        fs::create_dir_all(t.path("empty")).expect("mkdir");
        c.errno(
            &format!("rename an empty dir over a directory holding only {what}"),
            fs::rename(t.path("empty"), &d),
            libc::ENOTEMPTY,
        );
        c.ok("rm -r", fs::remove_dir_all(&d));
    }
    fs::remove_dir(t.path("empty")).ok();

    // A regular file used as a directory: ENOTDIR for every kind of operation.
    let e = libc::ENOTDIR;
    c.errno(
        "open f/x O_CREAT",
        open_raw(&t.path("f/x"), libc::O_CREAT | libc::O_WRONLY, 0o644),
        e,
    );
    c.errno("mkdir f/x", fs::create_dir(t.path("f/x")), e);
    c.errno("mknod f/x", mkfifo(&t.path("f/x"), 0o644), e);
    c.errno("symlink f/x", symlink("t", t.path("f/x")), e);
    c.errno("link to f/x", fs::hard_link(t.path("f"), t.path("f/x")), e);
    c.errno("rename to f/x", fs::rename(t.path("a"), t.path("f/x")), e);
    c.errno("rename from f/x", fs::rename(t.path("f/x"), t.path("y")), e);
    c.errno("unlink f/x", fs::remove_file(t.path("f/x")), e);
    c.errno("stat f/x/y/z", fs::metadata(t.path("f/x/y/z")), e);
    c.errno("open f/ (trailing slash)", File::open(t.path("f/")), e);
    c.errno("stat f/.", fs::metadata(t.path("f/.")), e);
    c.errno("stat f/..", fs::metadata(t.path("f/..")), e);
    c.errno("opendir f", fs::read_dir(t.path("f")), e);
    c.errno("open f O_DIRECTORY", open_dir(&t.path("f")), e);
    c.errno("rmdir f", fs::remove_dir(t.path("f")), e);
    c.errno(
        "rename f/ (trailing slash)",
        fs::rename(t.path("f/"), t.path("g")),
        e,
    );
    c.errno(
        "open O_CREAT with a trailing slash",
        open_raw(&t.path("newfile/"), libc::O_CREAT | libc::O_WRONLY, 0o644),
        libc::EISDIR,
    );
    c.errno(
        "openat relative to a file fd",
        {
            let f = File::open(t.path("f")).expect("open");
            openat_raw(f.as_raw_fd(), b"x", libc::O_RDONLY, 0)
        },
        e,
    );

    // Symlink loops and chains: ELOOP when followed, fine when not.
    symlink("loop1", t.path("loop1")).expect("self loop");
    symlink("loop3", t.path("loop2")).expect("symlink");
    symlink("loop2", t.path("loop3")).expect("symlink");
    symlink("a/../loopdir", t.path("loopdir")).expect("symlink");
    let e = libc::ELOOP;
    for l in ["loop1", "loop2", "loopdir"] {
        c.errno(&format!("open {l}"), File::open(t.path(l)), e);
        c.errno(
            &format!("open {l} O_CREAT"),
            open_raw(&t.path(l), libc::O_CREAT | libc::O_WRONLY, 0o644),
            e,
        );
        c.errno(&format!("stat {l}"), fs::metadata(t.path(l)), e);
        c.errno(&format!("open {l}/x"), File::open(t.path(l).join("x")), e);
        c.errno(
            &format!("mkdir {l}/x"),
            fs::create_dir(t.path(l).join("x")),
            e,
        );
        c.errno(&format!("opendir {l}"), fs::read_dir(t.path(l)), e);
        c.errno(
            &format!("chmod {l}"),
            fs::set_permissions(t.path(l), fs::Permissions::from_mode(0o600)),
            e,
        );
        c.errno(
            &format!("setxattr {l}"),
            setxattr(&t.path(l), b"user.x", b"v", 0),
            e,
        );
        c.ok(&format!("lstat {l}"), fs::symlink_metadata(t.path(l)));
        c.ok(&format!("readlink {l}"), fs::read_link(t.path(l)));
    }
    c.errno(
        "link following a loop",
        linkat(
            libc::AT_FDCWD,
            t.path("loop1").as_os_str().as_bytes(),
            libc::AT_FDCWD,
            &t.path("ln"),
            libc::AT_SYMLINK_FOLLOW,
        ),
        e,
    );
    c.errno(
        "O_NOFOLLOW on a symlink",
        open_raw(&t.path("loop1"), libc::O_RDONLY | libc::O_NOFOLLOW, 0),
        e,
    );
    // Following 40 links is fine (MAXSYMLINKS), 41 is ELOOP: chainN is N + 1 links deep.
    symlink("f", t.path("chain0")).expect("symlink");
    for i in 1..=40 {
        symlink(format!("chain{}", i - 1), t.path(&format!("chain{i}"))).expect("symlink");
    }
    c.eq(
        "a chain of 40 symlinks",
        fs::read(t.path("chain39")),
        b"f".to_vec(),
    );
    c.errno("a chain of 41 symlinks", fs::read(t.path("chain40")), e);
    // Removing a loop is fine.
    c.ok("unlink loop1", fs::remove_file(t.path("loop1")));
    c.ok(
        "rename loop2",
        fs::rename(t.path("loop2"), t.path("loop2b")),
    );
    c.errno(
        "loop3 -> loop2 dangles once loop2 is renamed",
        File::open(t.path("loop3")),
        libc::ENOENT,
    );
    c.errno(
        "loop2b -> loop3 -> loop2",
        File::open(t.path("loop2b")),
        libc::ENOENT,
    );
    c.errno(
        "rmdir of a symlink to a dir",
        {
            symlink("a", t.path("adir")).expect("symlink");
            fs::remove_dir(t.path("adir"))
        },
        libc::ENOTDIR,
    );
    c.check("a survived", t.path("a/b/c/d").is_dir(), || {
        "a/b/c/d gone".into()
    });
    drop(a);
    end_group(&t, m, c, "namespace", "after namespace traps");
}

#[test]
fn unlinked_open_files_and_directories() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut c = Catalogue::new("unlinked_open_files_and_directories");
    let p = t.path("doomed");
    let f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&p)
        .expect("create");
    f.write_all_at(b"before", 0).expect("write");
    fsetxattr(&f, b"user.k", b"v1").expect("fsetxattr");
    let ino = f.metadata().expect("fstat").ino();
    fs::remove_file(&p).expect("unlink while open");

    let st = c.ok("fstat", fstat(&f));
    c.check("nlink 0", st.is_some_and(|s| s.st_nlink == 0), || {
        format!("{:?}", st.map(|s| s.st_nlink))
    });
    c.ok("pwrite", f.write_all_at(b"after!", 6));
    c.ok("fsync", f.sync_all());
    c.ok("fdatasync", f.sync_data());
    let mut buf = [0u8; 12];
    c.ok("pread", f.read_exact_at(&mut buf, 0));
    c.check("content", &buf == b"beforeafter!", || format!("{buf:?}"));
    c.ok("ftruncate", ftruncate(&f, 6));
    c.ok(
        "fchmod",
        f.set_permissions(fs::Permissions::from_mode(0o4751)),
    );
    c.eq(
        "mode after fchmod",
        f.metadata().map(|m| m.mode() & 0o7777),
        0o4751,
    );
    c.ok(
        "fchown",
        std::os::unix::fs::fchown(&f, Some(12345), Some(54321)),
    );
    c.eq(
        "owner after fchown",
        f.metadata().map(|m| (m.uid(), m.gid())),
        (12345, 54321),
    );
    c.ok(
        "futimens",
        f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000)),
    );
    c.eq(
        "mtime after futimens",
        f.metadata().map(|m| m.mtime()),
        1_000_000,
    );
    c.eq("fgetxattr", fgetxattr(&f, b"user.k"), b"v1".to_vec());
    c.ok("fsetxattr", fsetxattr(&f, b"user.k", b"v2"));
    c.eq(
        "fgetxattr after set",
        fgetxattr(&f, b"user.k"),
        b"v2".to_vec(),
    );
    c.ok("fallocate", fallocate(&f, 0, 0, 100));
    c.eq("size after fallocate", f.metadata().map(|m| m.len()), 100);
    let mut want = b"before".to_vec();
    want.resize(100, 0);
    let mut got = vec![0xeeu8; 100];
    c.ok("pread after fallocate", f.read_exact_at(&mut got, 0));
    c.check("truncated, then zero-extended", got == want, || {
        format!("{got:?}")
    });
    // Linking it back into the namespace: Linux refuses an inode with no links (ENOENT),
    // through /proc/self/fd with AT_SYMLINK_FOLLOW and with AT_EMPTY_PATH.
    let proc_path = format!("/proc/self/fd/{}", f.as_raw_fd());
    c.errno(
        "linkat /proc/self/fd/N AT_SYMLINK_FOLLOW",
        linkat(
            libc::AT_FDCWD,
            proc_path.as_bytes(),
            libc::AT_FDCWD,
            &t.path("revived"),
            libc::AT_SYMLINK_FOLLOW,
        ),
        libc::ENOENT,
    );
    c.errno(
        "linkat AT_EMPTY_PATH",
        linkat(
            f.as_raw_fd(),
            b"",
            libc::AT_FDCWD,
            &t.path("revived"),
            libc::AT_EMPTY_PATH,
        ),
        libc::ENOENT,
    );
    c.errno(
        "the name did not appear",
        fs::metadata(t.path("revived")),
        libc::ENOENT,
    );
    // A linked file can be linked through /proc (the contrast).
    let g = File::create(t.path("linked")).expect("create");
    let gp = format!("/proc/self/fd/{}", g.as_raw_fd());
    c.ok(
        "linkat of a linked file via /proc",
        linkat(
            libc::AT_FDCWD,
            gp.as_bytes(),
            libc::AT_FDCWD,
            &t.path("linked2"),
            libc::AT_SYMLINK_FOLLOW,
        ),
    );
    c.eq("nlink", g.metadata().map(|m| m.nlink()), 2);
    drop(g);
    // A new file never reuses the orphan's inode while it is open.
    let n = File::create(t.path("new")).expect("create");
    c.check(
        "fresh inode",
        n.metadata().map(|m| m.ino()).ok() != Some(ino),
        || "inode reused".into(),
    );
    drop(n);
    c.ok("close the orphan", close_checked(f));

    // An unlinked directory still open: fstat nlink 0, listing it is ENOENT (the directory
    // is dead), creating in it ENOENT.
    fs::create_dir(t.path("gone")).expect("mkdir");
    let d = open_dir(&t.path("gone")).expect("open dir");
    fs::remove_dir(t.path("gone")).expect("rmdir while open");
    let st = c.ok("fstat of the removed dir", fstat(&d));
    c.check("nlink 0", st.is_some_and(|s| s.st_nlink == 0), || {
        format!("{:?}", st.map(|s| s.st_nlink))
    });
    c.errno("getdents", getdents(&d, 4096), libc::ENOENT);
    c.errno(
        "openat O_CREAT inside",
        openat_raw(d.as_raw_fd(), b"x", libc::O_CREAT | libc::O_WRONLY, 0o644),
        libc::ENOENT,
    );
    c.errno("mkdirat inside", mkdirat(d.as_raw_fd(), b"x"), libc::ENOENT);
    c.ok(
        "fchmod of the removed dir",
        d.set_permissions(fs::Permissions::from_mode(0o700)),
    );
    drop(d);
    end_group(&t, m, c, "orphans", "after orphans");
    let m = t.mount();
    let mut names: Vec<String> = fs::read_dir(&t.mnt)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["linked", "linked2", "new"], "after restart");
    umount(m);
}

/// Errors a racing thread may see from a namespace operation: the name is gone or taken,
/// or the tree changed shape under it. Anything else (EIO above all) is a bug.
const RACE_ERRNOS: [i32; 7] = [
    libc::ENOENT,
    libc::EEXIST,
    libc::ENOTEMPTY,
    libc::EISDIR,
    libc::ENOTDIR,
    libc::EINVAL,
    libc::EPERM,
];

#[test]
fn racing_renames_and_unlinks_of_the_same_names() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let root = t.path("race");
    for d in ["A", "B", "C"] {
        fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    let threads = 6u64;
    let deadline = Instant::now() + Duration::from_secs(4);
    let barrier = Arc::new(Barrier::new(threads as usize));
    let stats: Arc<Mutex<BTreeMap<(String, String), u64>>> = Arc::default();
    let unexpected: Arc<Mutex<Vec<String>>> = Arc::default();
    let handles: Vec<_> = (0..threads)
        .map(|th| {
            let (root, barrier) = (root.clone(), barrier.clone());
            let (stats, unexpected) = (stats.clone(), unexpected.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(0x4ACE_0000 + th);
                let pick = |rng: &mut Rng| -> PathBuf {
                    let mut p = root.join(["A", "B", "C"][rng.range(0, 2) as usize]);
                    for _ in 0..rng.range(1, 2) {
                        p = p.join(format!("n{}", rng.range(0, 5)));
                    }
                    p
                };
                barrier.wait();
                let mut seq = 0u64;
                while seq < 3000 && Instant::now() < deadline {
                    seq += 1;
                    let (a, b) = (pick(&mut rng), pick(&mut rng));
                    let op = rng.range(0, 9);
                    let (name, r): (&str, io::Result<()>) = match op {
                        0 => ("create", {
                            let tag = format!("t{th}-{seq}");
                            OpenOptions::new()
                                .write(true)
                                .create_new(true)
                                .open(&a)
                                .and_then(|mut f| f.write_all(tag.as_bytes()))
                        }),
                        1 => ("rename", fs::rename(&a, &b)),
                        2 => (
                            "rename-noreplace",
                            renameat2(&a, &b, libc::RENAME_NOREPLACE),
                        ),
                        3 => ("rename-exchange", renameat2(&a, &b, libc::RENAME_EXCHANGE)),
                        4 => ("unlink", fs::remove_file(&a)),
                        5 => ("mkdir", fs::create_dir(&a)),
                        6 => ("rmdir", fs::remove_dir(&a)),
                        7 => ("link", fs::hard_link(&a, &b)),
                        _ => ("read", {
                            let mut v = Vec::new();
                            File::open(&a)
                                .and_then(|mut f| f.read_to_end(&mut v))
                                .and_then(|_| {
                                    // Content is always one whole tag "t<thread>-<seq>".
                                    let s = String::from_utf8_lossy(&v);
                                    let okay = s.is_empty()
                                        || (s.starts_with('t')
                                            && s[1..].split_once('-').is_some_and(|(x, y)| {
                                                x.parse::<u64>().is_ok() && y.parse::<u64>().is_ok()
                                            }));
                                    if okay {
                                        Ok(())
                                    } else {
                                        Err(io::Error::other(format!("torn content {s:?}")))
                                    }
                                })
                        }),
                    };
                    let outcome = match &r {
                        Ok(()) => "ok".to_string(),
                        Err(e) => match e.raw_os_error() {
                            Some(n) => errno_name(n),
                            None => e.to_string(),
                        },
                    };
                    if let Err(e) = &r {
                        let fine = e.raw_os_error().is_some_and(|n| RACE_ERRNOS.contains(&n));
                        if !fine {
                            unexpected
                                .lock()
                                .unwrap()
                                .push(format!("{name} {a:?} {b:?}: {e}"));
                        }
                    }
                    *stats
                        .lock()
                        .unwrap()
                        .entry((name.to_string(), outcome))
                        .or_insert(0) += 1;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("racer panicked");
    }
    let stats = stats.lock().unwrap().clone();
    eprintln!("racing renames/unlinks: {stats:?}");
    let unexpected = unexpected.lock().unwrap().clone();
    assert!(
        unexpected.is_empty(),
        "unexpected errors while racing: {unexpected:#?}"
    );
    for op in ["create", "rename", "unlink", "mkdir", "rmdir", "link"] {
        assert!(
            stats
                .get(&(op.to_string(), "ok".to_string()))
                .is_some_and(|n| *n > 0),
            "{op} never succeeded: the race exercised nothing"
        );
    }
    still_up(&t, &m, "race");
    let before = tree_consistency(&root);
    umount(m);
    t.assert_fsck_clean("after racing renames and unlinks");
    let m = t.mount();
    let after = tree_consistency(&root);
    assert_eq!(before, after, "the tree after a restart");
    still_up(&t, &m, "race-restart");
    umount(m);
}

/// Walk `root` checking what every tree must satisfy: each directory's `..` is its parent,
/// its link count is 2 + subdirectories, each file's link count is the number of names it
/// has (nothing here is open). Returns path -> (kind, nlink, size), for comparison.
fn tree_consistency(root: &Path) -> BTreeMap<PathBuf, (String, u64, u64)> {
    let mut out = BTreeMap::new();
    let mut names_of: HashMap<u64, (u64, Vec<PathBuf>)> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let meta = fs::symlink_metadata(&dir).expect("lstat dir");
        let dotdot = fs::symlink_metadata(dir.join("..")).expect("lstat ..");
        let parent = fs::symlink_metadata(dir.parent().expect("parent")).expect("lstat parent");
        assert_eq!(dotdot.ino(), parent.ino(), "{dir:?}/.. is not its parent");
        let mut subdirs = 0;
        let mut seen = BTreeSet::new();
        for e in fs::read_dir(&dir).expect("ls") {
            let e = e.expect("entry");
            assert!(
                seen.insert(e.file_name()),
                "{dir:?}: {:?} listed twice",
                e.file_name()
            );
            let p = e.path();
            let m = fs::symlink_metadata(&p).expect("lstat entry");
            assert_eq!(
                e.ino(),
                m.ino(),
                "{p:?}: readdir and lstat disagree on the inode"
            );
            if m.is_dir() {
                subdirs += 1;
                stack.push(p.clone());
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    ("dir".into(), 0, 0),
                );
            } else {
                let size = m.len();
                let entry = names_of.entry(m.ino()).or_insert((m.nlink(), Vec::new()));
                entry.1.push(p.clone());
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    ("file".into(), m.nlink(), size),
                );
            }
        }
        assert_eq!(
            meta.nlink(),
            2 + subdirs,
            "{dir:?}: nlink vs {subdirs} subdirectories"
        );
    }
    for (ino, (nlink, names)) in names_of {
        assert_eq!(
            nlink,
            names.len() as u64,
            "inode {ino}: nlink vs names {names:?}"
        );
    }
    out
}

#[test]
fn exclusive_create_races_have_exactly_one_winner() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut c = Catalogue::new("exclusive_create_races_have_exactly_one_winner");
    let threads = 8usize;
    let rounds = 36usize;
    let dir = t.path("excl");
    fs::create_dir(&dir).expect("mkdir");
    for th in 0..threads {
        fs::write(dir.join(format!("src-{th}")), format!("{th}")).expect("link source");
        for r in (5..rounds).step_by(6) {
            fs::write(dir.join(format!("mv-{th}-{r}")), format!("{th}")).expect("rename source");
        }
    }
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|th| {
            let (dir, barrier) = (dir.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut results = Vec::new();
                for r in 0..rounds {
                    let target = dir.join(format!("r{r}"));
                    barrier.wait();
                    let res = match r % 6 {
                        0 => OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&target)
                            .and_then(|mut f| f.write_all(format!("{th}").as_bytes())),
                        1 => fs::create_dir(&target),
                        2 => symlink(format!("{th}"), &target),
                        3 => fs::hard_link(dir.join(format!("src-{th}")), &target),
                        4 => mkfifo(&target, 0o644),
                        _ => renameat2(
                            &dir.join(format!("mv-{th}-{r}")),
                            &target,
                            libc::RENAME_NOREPLACE,
                        ),
                    };
                    results.push(res.map_err(|e| e.raw_os_error().unwrap_or(-1)));
                }
                results
            })
        })
        .collect();
    let results: Vec<Vec<Result<(), i32>>> = handles
        .into_iter()
        .map(|h| h.join().expect("racer"))
        .collect();
    for r in 0..rounds {
        let winners: Vec<usize> = (0..threads).filter(|th| results[*th][r].is_ok()).collect();
        let losers: Vec<(usize, i32)> = (0..threads)
            .filter_map(|th| results[th][r].err().map(|e| (th, e)))
            .collect();
        let kind = [
            "O_EXCL create",
            "mkdir",
            "symlink",
            "link",
            "mkfifo",
            "rename NOREPLACE",
        ][r % 6];
        c.check(
            &format!("round {r} ({kind}): one winner"),
            winners.len() == 1,
            || format!("winners {winners:?}"),
        );
        c.check(
            &format!("round {r} ({kind}): losers get EEXIST"),
            losers.iter().all(|(_, e)| *e == libc::EEXIST),
            || {
                format!(
                    "{:?}",
                    losers
                        .iter()
                        .map(|(t, e)| (t, errno_name(*e)))
                        .collect::<Vec<_>>()
                )
            },
        );
        let Some(&w) = winners.first() else { continue };
        let target = dir.join(format!("r{r}"));
        let meta = fs::symlink_metadata(&target);
        let ok = match r % 6 {
            0 => fs::read(&target).ok() == Some(format!("{w}").into_bytes()),
            1 => meta.is_ok_and(|m| m.is_dir()),
            2 => fs::read_link(&target).ok() == Some(PathBuf::from(format!("{w}"))),
            3 => {
                meta.ok().map(|m| m.ino())
                    == fs::metadata(dir.join(format!("src-{w}")))
                        .ok()
                        .map(|m| m.ino())
            }
            4 => meta.is_ok_and(|m| m.file_type().is_fifo()),
            _ => {
                fs::read(&target).ok() == Some(format!("{w}").into_bytes())
                    && (0..threads).all(|th| dir.join(format!("mv-{th}-{r}")).exists() == (th != w))
            }
        };
        c.check(
            &format!("round {r} ({kind}): the winner's object is there"),
            ok,
            || format!("winner {w}"),
        );
    }
    end_group(&t, m, c, "excl", "after O_EXCL races");
}

#[test]
fn readdir_of_a_directory_being_deleted() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut c = Catalogue::new("readdir_of_a_directory_being_deleted");

    // Deterministic: part of a listing, then everything removed; the next getdents on the
    // open descriptor is ENOENT (the directory is dead), never stale or garbage entries.
    let victim = t.path("victim");
    fs::create_dir(&victim).expect("mkdir");
    let names: BTreeSet<Vec<u8>> = (0..600)
        .map(|i| format!("entry-{i:04}").into_bytes())
        .collect();
    for n in &names {
        mknod(&at(&victim, n), libc::S_IFREG | 0o644, 0).expect("mknod");
    }
    let d = open_dir(&victim).expect("opendir");
    let first = c
        .ok("first getdents", getdents(&d, 1024))
        .unwrap_or_default();
    c.check(
        "first batch is partial",
        !first.is_empty() && first.len() < 100,
        || format!("{} names", first.len()),
    );
    for n in &names {
        fs::remove_file(at(&victim, n)).expect("unlink");
    }
    // Still listable while empty but present: the snapshot or nothing, no errors.
    let mut rest: Vec<Vec<u8>> = Vec::new();
    loop {
        match getdents(&d, 1024) {
            Ok(v) if v.is_empty() => break,
            Ok(v) => rest.extend(v),
            Err(e) => {
                c.ok::<()>("getdents of an emptied directory", Err(e));
                break;
            }
        }
    }
    let mut all: Vec<Vec<u8>> = first
        .iter()
        .chain(&rest)
        .filter(|n| n != &b"." && n != &b"..")
        .cloned()
        .collect();
    let total = all.len();
    all.sort();
    all.dedup();
    c.check(
        "no duplicates across the listing",
        all.len() == total,
        || format!("{total} vs {}", all.len()),
    );
    c.check(
        "only names that existed",
        all.iter().all(|n| names.contains(n)),
        || "unknown names".into(),
    );
    c.ok("rmdir", fs::remove_dir(&victim));
    c.ok("rewind", lseek(&d, 0, libc::SEEK_SET));
    c.errno("getdents after rmdir", getdents(&d, 4096), libc::ENOENT);
    drop(d);
    // A far seek on a live directory: end of listing, no error.
    let live = open_dir(&t.mnt).expect("open root");
    c.eq(
        "seek a directory to 2^62",
        lseek(&live, 1 << 62, libc::SEEK_SET),
        1 << 62,
    );
    c.eq("getdents there", getdents(&live, 4096).map(|v| v.len()), 0);
    c.errno(
        "seek a directory to -1",
        lseek(&live, -1, libc::SEEK_SET),
        libc::EINVAL,
    );
    drop(live);
    still_up(&t, &m, "readdir-dead");

    // Racing: listers re-read a directory while it is emptied and removed. Each listing
    // has no duplicates and only names that existed; the only error is ENOENT.
    let victim = t.path("victim2");
    fs::create_dir(&victim).expect("mkdir");
    let names: Arc<BTreeSet<Vec<u8>>> =
        Arc::new((0..1500).map(|i| format!("e{i:05}").into_bytes()).collect());
    for n in names.iter() {
        mknod(&at(&victim, n), libc::S_IFREG | 0o644, 0).expect("mknod");
    }
    let done = Arc::new(AtomicBool::new(false));
    let listers: Vec<_> = (0..2)
        .map(|i| {
            let (victim, names, done) = (victim.clone(), names.clone(), done.clone());
            std::thread::spawn(move || -> Result<usize, String> {
                let mut listings = 0;
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    let r = list_getdents(&victim, if i == 0 { 512 } else { 32 * 1024 });
                    match r {
                        Ok(v) => {
                            let set: BTreeSet<_> = v.iter().cloned().collect();
                            if set.len() != v.len() {
                                return Err(format!("listing {listings}: duplicates"));
                            }
                            if let Some(bad) = set.iter().find(|n| !names.contains(*n)) {
                                return Err(format!("listing {listings}: unknown name {bad:?}"));
                            }
                        }
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                            if done.load(Ordering::SeqCst) {
                                return Ok(listings);
                            }
                        }
                        Err(e) => return Err(format!("listing {listings}: {e}")),
                    }
                    listings += 1;
                }
                Err("the directory never went away".into())
            })
        })
        .collect();
    let mut rng = Rng::new(0xDE1E7E);
    let mut order: Vec<&Vec<u8>> = names.iter().collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.range(0, i as u64) as usize);
    }
    for n in order {
        fs::remove_file(at(&victim, n)).expect("unlink");
    }
    fs::remove_dir(&victim).expect("rmdir");
    done.store(true, Ordering::SeqCst);
    for l in listers {
        match l.join().expect("lister panicked") {
            Ok(n) => c.check("listings happened", n > 0, || "none".into()),
            Err(e) => c.check("lister", false, || e),
        }
    }
    end_group(
        &t,
        m,
        c,
        "readdir-race",
        "after deleting listed directories",
    );
}

#[test]
fn deep_directory_nesting() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut c = Catalogue::new("deep_directory_nesting");
    // 200 levels by path.
    let mut p = t.path("deep");
    fs::create_dir(&p).expect("mkdir");
    let top_ino = fs::metadata(&p).expect("stat").ino();
    for _ in 0..200 {
        p = p.join("d");
        fs::create_dir(&p).expect("mkdir at depth");
    }
    let bottom200 = p.clone();
    c.ok(
        "write at depth 200",
        fs::write(p.join("leaf"), b"deep leaf"),
    );
    c.eq(
        "read at depth 200",
        fs::read(p.join("leaf")),
        b"deep leaf".to_vec(),
    );
    c.errno(
        "move the top into the bottom",
        fs::rename(t.path("deep"), p.join("x")),
        libc::EINVAL,
    );
    c.errno(
        "rmdir of the non-empty top",
        fs::remove_dir(t.path("deep")),
        libc::ENOTEMPTY,
    );
    // From there on 800 more levels through descriptors (the path is past PATH_MAX).
    let mut cur = open_dir(&p).expect("open bottom");
    let mut inos = vec![fs::metadata(&p).expect("stat").ino()];
    for _ in 0..800 {
        mkdirat(cur.as_raw_fd(), b"dd").expect("mkdirat");
        cur = openat_raw(
            cur.as_raw_fd(),
            b"dd",
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .expect("openat");
        inos.push(fstat(&cur).expect("fstat").st_ino);
    }
    let leaf = openat_raw(
        cur.as_raw_fd(),
        b"leaf",
        libc::O_CREAT | libc::O_RDWR,
        0o644,
    )
    .expect("create at depth 1000");
    c.ok("write at depth 1000", leaf.write_all_at(b"deeper", 0));
    c.ok("fsync at depth 1000", leaf.sync_all());
    drop(leaf);
    // Walk back up with "..": each step lands on the previous level.
    let mut up =
        openat_raw(cur.as_raw_fd(), b".", libc::O_RDONLY | libc::O_DIRECTORY, 0).expect("open .");
    for (i, want) in inos.iter().rev().skip(1).enumerate() {
        up = openat_raw(up.as_raw_fd(), b"..", libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .expect("open ..");
        let got = fstat(&up).expect("fstat").st_ino;
        if got != *want {
            c.check(&format!(".. at {} levels up", i + 1), false, || {
                format!("ino {got} != {want}")
            });
            break;
        }
    }
    c.errno(
        "a path longer than PATH_MAX",
        fs::metadata(bottom200.join("dd/".repeat(2048))),
        libc::ENAMETOOLONG,
    );
    c.errno(
        "move the top under level 1000",
        renameat(
            libc::AT_FDCWD,
            t.path("deep").as_os_str().as_bytes(),
            cur.as_raw_fd(),
            b"x",
        ),
        libc::EINVAL,
    );
    c.errno(
        "move level 201 under level 1000",
        renameat(
            open_dir(&bottom200).expect("open").as_raw_fd(),
            b"dd",
            cur.as_raw_fd(),
            b"x",
        ),
        libc::EINVAL,
    );
    // Moving the bottom level to the top is fine and cheap.
    c.ok(
        "move level 1000 to the root",
        openat_raw(
            cur.as_raw_fd(),
            b"..",
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .and_then(|parent| {
            let root = open_dir(&t.mnt)?;
            renameat(parent.as_raw_fd(), b"dd", root.as_raw_fd(), b"bottom")
        }),
    );
    c.eq(
        "the moved leaf",
        fs::read(t.path("bottom/leaf")),
        b"deeper".to_vec(),
    );
    c.eq(
        "its .. is the root now",
        fs::metadata(t.path("bottom/..")).map(|m| m.ino()),
        fs::metadata(&t.mnt).expect("stat").ino(),
    );
    c.check(
        "top unchanged",
        fs::metadata(t.path("deep")).is_ok_and(|m| m.ino() == top_ino),
        || "".into(),
    );
    drop(cur);
    drop(up);
    still_up(&t, &m, "deep");
    umount(m);
    t.assert_fsck_clean("after deep nesting");
    let m = t.mount();
    c.eq(
        "depth 200 after restart",
        fs::read(bottom200.join("leaf")),
        b"deep leaf".to_vec(),
    );
    c.ok("rm -r of 1000 levels", fs::remove_dir_all(t.path("deep")));
    c.ok("rm -r", fs::remove_dir_all(t.path("bottom")));
    end_group(&t, m, c, "deep-removed", "after removing deep trees");
}

/// Names of varied length and shape, so pages of the listing break in odd places.
fn big_name(i: usize) -> Vec<u8> {
    let pad = Rng::new(i as u64).range(0, 40) as usize;
    let mut v = format!("m{i:05}-").into_bytes();
    v.extend_from_slice(&vec![b'x'; pad]);
    if i % 7 == 6 {
        v.push(0xff);
    }
    v
}

#[test]
fn directory_with_20000_entries_lists_each_exactly_once() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut c = Catalogue::new("directory_with_20000_entries_lists_each_exactly_once");
    let dir = t.path("big");
    fs::create_dir(&dir).expect("mkdir");
    let n = 20_000usize;
    let threads = 4usize;
    let handles: Vec<_> = (0..threads)
        .map(|th| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                for i in (th..n).step_by(threads) {
                    mknod(&at(&dir, &big_name(i)), libc::S_IFREG | 0o644, 0).expect("mknod");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("creator");
    }
    let want: BTreeSet<Vec<u8>> = (0..n).map(big_name).collect();
    let check = |c: &mut Catalogue, when: &str| {
        for (how, listing) in [
            (
                "std read_dir",
                fs::read_dir(&dir).map(|it| {
                    it.map(|e| e.expect("entry").file_name().into_vec())
                        .collect::<Vec<_>>()
                }),
            ),
            ("getdents64 with 1 KiB", list_getdents(&dir, 1024)),
            ("getdents64 with 64 KiB", list_getdents(&dir, 64 * 1024)),
        ] {
            let Some(listing) = c.ok(&format!("{when}: {how}"), listing) else {
                continue;
            };
            let mut counts: HashMap<&Vec<u8>, usize> = HashMap::new();
            for e in &listing {
                *counts.entry(e).or_insert(0) += 1;
            }
            let dups: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
            c.check(
                &format!("{when}: {how}: no duplicates"),
                dups.is_empty(),
                || format!("{dups:?}"),
            );
            let got: BTreeSet<Vec<u8>> = listing.into_iter().collect();
            let missing: Vec<_> = want.difference(&got).take(5).collect();
            let extra: Vec<_> = got.difference(&want).take(5).collect();
            c.check(
                &format!("{when}: {how}: every entry"),
                missing.is_empty() && extra.is_empty(),
                || format!("{} listed; missing {missing:?}; extra {extra:?}", got.len()),
            );
        }
        c.eq(
            &format!("{when}: nlink of the directory"),
            fs::metadata(&dir).map(|m| m.nlink()),
            2,
        );
    };
    check(&mut c, "live");
    still_up(&t, &m, "big-dir");
    umount(m);
    t.assert_fsck_clean("after 20000 entries");
    let m = t.mount();
    check(&mut c, "after restart");
    still_up(&t, &m, "big-dir-restart");
    c.finish();
    umount(m);
}
