//! Helpers shared by the mount integration tests: temporary data dir and mountpoint, the
//! `spoolfs` binary, a mount guard that never leaves a mount or a daemon behind, a seeded
//! PRNG, polling, and thin wrappers over the syscalls std does not expose.
//!
//! Every test that mounts starts with `let Some(t) = TestFs::new() else { return };`: when
//! not root it fails with a clear message, unless `SPOOLFS_SKIP_MOUNT_TESTS=1` is set, in
//! which case it prints that it was skipped and passes.

#![allow(dead_code)]

pub mod disk;

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spoolfs")
}

pub const SKIP_ENV: &str = "SPOOLFS_SKIP_MOUNT_TESTS";

/// True if the test may mount; false (after printing why) if it should be skipped. Panics
/// with an explanation when mounting is impossible and skipping was not asked for.
pub fn mount_tests_enabled() -> bool {
    let skip = std::env::var(SKIP_ENV).is_ok_and(|v| v == "1");
    let problem = if !nix::unistd::geteuid().is_root() {
        Some("these tests mount FUSE filesystems and must run as root".to_string())
    } else if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse is missing (modprobe fuse?)".to_string())
    } else {
        None
    };
    match problem {
        None => true,
        Some(p) if skip => {
            eprintln!("SKIPPED: {p} ({SKIP_ENV}=1 is set)");
            false
        }
        Some(p) => panic!("{p}; run as root, or set {SKIP_ENV}=1 to skip the mount tests"),
    }
}

// --- deterministic randomness ---------------------------------------------------------------

/// splitmix64: tiny, seeded, good enough for test data and schedules.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5EED_5EED_1234_5678)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// `n` bytes determined by `seed` alone (so a message can be regenerated to compare).
pub fn seeded_bytes(seed: u64, n: usize) -> Vec<u8> {
    Rng::new(seed).bytes(n)
}

/// FNV-1a 64: a checksum for messages recorded in memory.
pub fn checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The first differing offset of two byte strings, for readable assertion messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then_some(a.len().min(b.len())))
}

#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(at) = first_difference(actual, expected) {
        panic!(
            "{what}: content differs at byte {at} (actual len {}, expected len {})",
            actual.len(),
            expected.len()
        );
    }
}

// --- polling, processes, mounts -----------------------------------------------------------

/// Poll `f` every 10 ms until it holds; false after `timeout`.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is a live process. A zombie counts as dead: the daemon is started in the
/// background and reparented, and PID 1 in a container may never reap it.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // pid (comm) state ...; comm may hold spaces and parentheses: take the last ')'.
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
    }
}

pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    let _ = nix::sys::signal::kill(pid, sig);
}

/// One line of /proc/self/mountinfo, as far as the tests care.
#[derive(Debug, Clone)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    pub super_options: String,
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

pub fn mounts() -> Vec<MountInfo> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            Some(MountInfo {
                mount_point: PathBuf::from(OsStr::from_bytes(&unescape(f.get(4)?))),
                fs_type: f.get(dash + 1)?.to_string(),
                source: String::from_utf8_lossy(&unescape(f.get(dash + 2)?)).into_owned(),
                super_options: f.get(dash + 3).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// The topmost mount at `path`, if any.
pub fn mount_at(path: &Path) -> Option<MountInfo> {
    mounts().into_iter().rev().find(|m| m.mount_point == path)
}

pub fn is_mounted(path: &Path) -> bool {
    mount_at(path).is_some()
}

/// Detach whatever is mounted at `path` (MNT_DETACH), repeating for stacked mounts.
pub fn detach_all(path: &Path) {
    for _ in 0..8 {
        if !is_mounted(path) {
            return;
        }
        if nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).is_err() {
            return;
        }
    }
}

/// The daemon PID recorded in a data dir's lock file.
pub fn lock_pid(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("spoolfs.lock"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Run `spoolfs ARGS...` to completion.
pub fn spoolfs<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(bin())
        .args(args)
        .env_remove("SPOOLFS_DAEMON_CHILD")
        .output()
        .expect("run spoolfs")
}

pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}, stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// --- test filesystem ----------------------------------------------------------------------

/// A fresh data dir and mountpoint under a temporary directory. On drop, anything still
/// mounted at the mountpoint is detached first, so removing the temporary directory never
/// walks into a mount.
pub struct TestFs {
    pub data: PathBuf,
    pub mnt: PathBuf,
    tmp: TempDir,
}

impl TestFs {
    /// `None` when mount tests are skipped (see `mount_tests_enabled`).
    pub fn new() -> Option<TestFs> {
        if !mount_tests_enabled() {
            return None;
        }
        let tmp = tempfile::Builder::new()
            .prefix("spoolfs-it-")
            .tempdir()
            .expect("create temp dir");
        let root = tmp.path().canonicalize().expect("canonicalize temp dir");
        let data = root.join("data");
        let mnt = root.join("mnt");
        std::fs::create_dir(&mnt).expect("create mountpoint");
        Some(TestFs { data, mnt, tmp })
    }

    /// The temporary directory holding `data` and `mnt` (for extra paths).
    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// `spoolfs mount [-o OPTS] DATA MNT` without asserting its outcome.
    pub fn try_mount(&self, opts: &[&str]) -> Output {
        spoolfs(self.mount_args(opts))
    }

    /// Arguments of `spoolfs mount` for this data dir and mountpoint. The metrics endpoint
    /// is off: parallel test daemons would all want the same default port.
    pub fn mount_args(&self, opts: &[&str]) -> Vec<std::ffi::OsString> {
        self.mount_args_with(opts, &[])
    }

    /// Like `mount_args`, with extra flags of `spoolfs mount` (e.g. `--memfd-budget N`).
    pub fn mount_args_with(&self, opts: &[&str], extra: &[&str]) -> Vec<std::ffi::OsString> {
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("mount"),
            OsStr::new("--metrics-addr"),
            OsStr::new("off"),
        ];
        args.extend(extra.iter().map(OsStr::new));
        for o in opts {
            args.push(OsStr::new("-o"));
            args.push(OsStr::new(o));
        }
        args.push(self.data.as_os_str());
        args.push(self.mnt.as_os_str());
        args.into_iter().map(OsStr::to_os_string).collect()
    }

    /// Mount in the background and return the guard; panics if it fails.
    pub fn mount(&self) -> MountGuard {
        self.mount_with(&[])
    }

    pub fn mount_with(&self, opts: &[&str]) -> MountGuard {
        self.mount_full(opts, &[])
    }

    /// Mount with `-o` options and extra flags; panics if it fails.
    pub fn mount_full(&self, opts: &[&str], extra: &[&str]) -> MountGuard {
        let out = spoolfs(self.mount_args_with(opts, extra));
        assert!(
            out.status.success(),
            "spoolfs mount failed: {}",
            describe(&out)
        );
        let pid = lock_pid(&self.data).expect("the lock file names the daemon");
        assert!(pid_alive(pid), "daemon {pid} is not running after mount");
        let info = mount_at(&self.mnt).expect("mounted after spoolfs mount returned");
        assert_eq!(info.fs_type, "fuse.spoolfs");
        MountGuard {
            mnt: self.mnt.clone(),
            data: self.data.clone(),
            pid,
            active: true,
        }
    }

    /// Run the offline checker `spoolfs fsck DATA_DIR` (the data dir must not be mounted)
    /// and assert it finds no problem.
    #[track_caller]
    pub fn assert_fsck_clean(&self, when: &str) {
        let out = spoolfs([OsStr::new("fsck"), self.data.as_os_str()]);
        assert!(
            out.status.success(),
            "{when}: spoolfs fsck found problems: {}",
            describe(&out)
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("spoolfs.log")).unwrap_or_default()
    }
}

impl Drop for TestFs {
    fn drop(&mut self) {
        detach_all(&self.mnt);
        if let Some(pid) = lock_pid(&self.data) {
            if pid_alive(pid) && !wait_until(Duration::from_secs(5), || !pid_alive(pid)) {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// A live mount. Drop (also while unwinding from a panic) detaches it lazily and makes sure
/// the daemon is gone, killing it if it does not stop on its own.
pub struct MountGuard {
    pub mnt: PathBuf,
    pub data: PathBuf,
    pub pid: u32,
    active: bool,
}

impl MountGuard {
    pub fn alive(&self) -> bool {
        pid_alive(self.pid)
    }

    /// Assert the daemon still runs and still answers.
    #[track_caller]
    pub fn assert_healthy(&self) {
        assert!(self.alive(), "daemon {} died", self.pid);
        std::fs::metadata(&self.mnt).expect("stat of the mount root");
        nix::sys::statvfs::statvfs(&self.mnt).expect("statfs of the mount");
        std::fs::read_dir(&self.mnt)
            .expect("list the mount root")
            .for_each(|e| {
                e.expect("readdir entry");
            });
    }

    /// Clean unmount with `spoolfs umount`; asserts it succeeds and the daemon exits.
    pub fn umount(mut self) {
        // A "busy" with no process holding anything under the mount is transient: another
        // test thread forking a child copies this process's descriptors into it until the
        // child's exec closes them. Retry that briefly; a real holder fails at once.
        let mut out = spoolfs([OsStr::new("umount"), self.mnt.as_os_str()]);
        for _ in 0..100 {
            let busy = String::from_utf8_lossy(&out.stderr).contains("busy");
            if out.status.success() || !busy || !open_files_under(&self.mnt).is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            out = spoolfs([OsStr::new("umount"), self.mnt.as_os_str()]);
        }
        assert!(
            out.status.success(),
            "spoolfs umount failed: {}; open files under the mount: {:?}",
            describe(&out),
            open_files_under(&self.mnt)
        );
        assert!(!is_mounted(&self.mnt), "still mounted after spoolfs umount");
        assert!(
            wait_until(Duration::from_secs(10), || !pid_alive(self.pid)),
            "daemon {} still running after umount",
            self.pid
        );
        self.active = false;
    }

    /// SIGKILL the daemon and wait until it is gone; the mount stays (dead, ENOTCONN) until
    /// `detach` or drop.
    pub fn kill9(&self) {
        signal(self.pid, nix::sys::signal::Signal::SIGKILL);
        assert!(
            wait_until(Duration::from_secs(10), || !pid_alive(self.pid)),
            "daemon {} survived SIGKILL",
            self.pid
        );
    }

    /// Lazily unmount (the way to clear a dead mount) and forget the mount.
    pub fn detach(mut self) {
        let out = spoolfs([
            OsStr::new("umount"),
            OsStr::new("--lazy"),
            self.mnt.as_os_str(),
        ]);
        assert!(
            out.status.success(),
            "spoolfs umount --lazy failed: {}",
            describe(&out)
        );
        assert!(!is_mounted(&self.mnt), "still mounted after umount --lazy");
        self.active = false;
        self.reap();
    }

    fn reap(&self) {
        if pid_alive(self.pid) && !wait_until(Duration::from_secs(5), || !pid_alive(self.pid)) {
            signal(self.pid, nix::sys::signal::Signal::SIGKILL);
            wait_until(Duration::from_secs(5), || !pid_alive(self.pid));
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        if mount_at(&self.mnt).is_some_and(|m| m.fs_type == "fuse.spoolfs") {
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        }
        self.reap();
    }
}

/// Processes with a descriptor or cwd under `dir`, as "pid (comm): path" (diagnostics).
pub fn open_files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        let mut links: Vec<PathBuf> = std::fs::read_dir(p.path().join("fd"))
            .map(|fds| {
                fds.flatten()
                    .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                    .collect()
            })
            .unwrap_or_default();
        links.extend(std::fs::read_link(p.path().join("cwd")).ok());
        for l in links.into_iter().filter(|l| l.starts_with(dir)) {
            out.push(format!("{pid} ({}): {}", comm.trim(), l.display()));
        }
    }
    out
}

// --- syscalls -----------------------------------------------------------------------------

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The errno of a failed io::Result (panics, naming `what`, if it succeeded).
#[track_caller]
pub fn errno_of<T: std::fmt::Debug>(r: io::Result<T>, what: &str) -> i32 {
    match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: not an OS error: {e}")),
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn setxattr(p: &Path, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
    let name = CString::new(name).expect("xattr name without NUL");
    let path = cstr(p);
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    check(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// getxattr with an explicit buffer size: `size == 0` is the length probe.
pub fn getxattr_sized(p: &Path, name: &[u8], size: usize) -> io::Result<(usize, Vec<u8>)> {
    let name = CString::new(name).expect("xattr name without NUL");
    let path = cstr(p);
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: `ptr` is null with size 0, or points to `size` writable bytes.
    let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), ptr, size) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    buf.truncate(n.min(size));
    Ok((n, buf))
}

pub fn getxattr(p: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let (len, _) = getxattr_sized(p, name, 0)?;
    let (n, v) = getxattr_sized(p, name, len.max(1))?;
    assert_eq!(n, len, "xattr length changed between probe and read");
    Ok(v)
}

/// Names from listxattr, sorted.
pub fn listxattr(p: &Path) -> io::Result<Vec<Vec<u8>>> {
    let path = cstr(p);
    // SAFETY: null buffer with size 0 is the length probe.
    let len = unsafe { libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; len as usize];
    // SAFETY: `buf` has `buf.len()` writable bytes.
    let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    let mut names: Vec<Vec<u8>> = buf
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    names.sort();
    Ok(names)
}

pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (a, b) = (cstr(from), cstr(to));
    // SAFETY: valid NUL-terminated paths.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
}

pub fn fallocate(f: &File, mode: i32, offset: i64, len: i64) -> io::Result<()> {
    // SAFETY: plain syscall on an open fd.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, offset, len) })
}

pub fn lseek(f: &File, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on an open fd.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Close a file and report the error close(2) returns (std's drop ignores it).
pub fn close_checked(f: File) -> io::Result<()> {
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: we own `fd` (just taken out of the File) and close it exactly once.
    check(unsafe { libc::close(fd) })
}

/// fsync a directory (opened read-only, as mail servers do).
pub fn fsync_dir(p: &Path) -> io::Result<()> {
    let d = File::open(p)?;
    d.sync_all()?;
    close_checked(d)
}

/// Set atime and mtime with nanoseconds (no follow of a final symlink if `nofollow`).
pub fn utimens(p: &Path, atime: (i64, i64), mtime: (i64, i64), nofollow: bool) -> io::Result<()> {
    let path = cstr(p);
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: valid path and two timespecs.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), ts.as_ptr(), flags) })
}

pub fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
}

pub fn mkfifo(p: &Path, mode: u32) -> io::Result<()> {
    let path = cstr(p);
    // SAFETY: valid path.
    check(unsafe { libc::mkfifo(path.as_ptr(), mode) })
}

/// Read a whole file.
pub fn read_all(p: &Path) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    File::open(p)?.read_to_end(&mut v)?;
    Ok(v)
}
