//! Mounting and unmounting: checks on the mountpoint and data dir, the mount(2) call that
//! makes the mount appear as `fuse.spoolfs`, and the data dir lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Exit codes of `spoolfs mount` (distinct so scripts can tell the cases apart).
pub mod exit {
    pub const FAILURE: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const NOT_A_DIRECTORY: i32 = 16;
    pub const ALREADY_MOUNTED: i32 = 17;
    pub const STALE_MOUNT: i32 = 18;
    pub const DATA_DIR_IN_USE: i32 = 19;
}

/// A failure with the exit code it maps to and one line for the operator.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Mount options understood by spoolfs (`-o`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub allow_other: bool,
    pub default_permissions: bool,
    pub ro: bool,
    pub sync: bool,
    pub dirsync: bool,
    pub noexec: bool,
    pub noatime: bool,
    pub suid: bool,
    pub dev: bool,
    /// `reserve=SIZE`: space kept free on the data dir's filesystem (bytes with an optional
    /// K/M/G/T suffix, or a percentage); operations that need space get ENOSPC below it.
    pub reserve: Option<spoolfs_runtime::Reserve>,
    /// `commit_timeout=SECONDS`: how long a request may wait for durability (close, fsync,
    /// `-o sync`) before it is answered EIO while the disk does not answer.
    pub commit_timeout: Option<std::time::Duration>,
    /// `writeback_cache`: the kernel keeps written data in its page cache and sends it in
    /// large writes at fsync, close or writeback (faster bulk writes). A full disk is then
    /// reported by `fsync()`/`close()` instead of `write()`.
    pub writeback_cache: bool,
}

impl Options {
    /// Defaults: the kernel checks permissions; as root, other users may use the mount (a
    /// mail server runs as its own user). setuid and device files are inert unless asked for.
    pub fn defaults(is_root: bool) -> Self {
        Options {
            allow_other: is_root,
            default_permissions: true,
            ..Options::default()
        }
    }

    /// Apply a comma list. Options mount(8) and fstab pass that mean nothing to a FUSE
    /// filesystem (`rw`, `auto`, `nofail`, `_netdev`, `x-*`, ...) are accepted and ignored.
    pub fn parse(&mut self, list: &str) -> Result<(), String> {
        for opt in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            match opt {
                "allow_other" => self.allow_other = true,
                "default_permissions" => self.default_permissions = true,
                "no_default_permissions" => self.default_permissions = false,
                "ro" => self.ro = true,
                "rw" => self.ro = false,
                "sync" => self.sync = true,
                "async" => self.sync = false,
                "dirsync" => self.dirsync = true,
                "writeback_cache" => self.writeback_cache = true,
                "no_writeback_cache" => self.writeback_cache = false,
                "noexec" => self.noexec = true,
                "exec" => self.noexec = false,
                "noatime" => self.noatime = true,
                "atime" | "relatime" => self.noatime = false,
                "suid" => self.suid = true,
                "nosuid" => self.suid = false,
                "dev" => self.dev = true,
                "nodev" => self.dev = false,
                "auto" | "noauto" | "user" | "nouser" | "users" | "nofail" | "_netdev"
                | "defaults" | "allow_root" => {}
                o if o.starts_with("x-") || o.starts_with("comment=") => {}
                o if o.starts_with("reserve=") => {
                    self.reserve = Some(o["reserve=".len()..].parse()?);
                }
                o if o.starts_with("commit_timeout=") => {
                    self.commit_timeout =
                        Some(parse_commit_timeout(&o["commit_timeout=".len()..])?);
                }
                "auto_unmount" => {
                    return Err(
                        "auto_unmount is refused: after a crash the mountpoint must stay \
                                dead (ENOTCONN) so the mail server defers instead of writing \
                                into the directory underneath"
                            .into(),
                    )
                }
                o => return Err(format!("unknown mount option {o:?}")),
            }
        }
        Ok(())
    }
}

/// Whole seconds, 1 to 3600: below a second a healthy but busy disk would fail requests; above
/// an hour a hung disk would hang the mail server as surely as no bound at all.
fn parse_commit_timeout(v: &str) -> Result<std::time::Duration, String> {
    match v.parse::<u64>() {
        Ok(s @ 1..=3600) => Ok(std::time::Duration::from_secs(s)),
        _ => Err(format!(
            "commit_timeout {v:?}: expected whole seconds from 1 to 3600 (default 30)"
        )),
    }
}

fn mountinfo_unescape(b: &[u8]) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as \ooo (octal). Paths are bytes:
    // nothing here assumes UTF-8.
    use std::os::unix::ffi::OsStringExt;
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = &b[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// A mount as listed in /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountEntry {
    /// Device number (major, minor) of the mounted filesystem.
    pub dev: (u32, u32),
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

pub fn mounts() -> std::io::Result<Vec<MountEntry>> {
    // Bytes, not a String: a mount path need not be UTF-8.
    let text = std::fs::read("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.split(|c| *c == b'\n') {
        // id parent major:minor root mount_point options [optional...] - fstype source super
        let fields: Vec<&[u8]> = line.split(|c| *c == b' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        if fields.len() < 5 || fields.len() < dash + 3 {
            continue;
        }
        let dev = std::str::from_utf8(fields[2])
            .ok()
            .and_then(|d| d.split_once(':'))
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .unwrap_or((0, 0));
        out.push(MountEntry {
            dev,
            mount_point: mountinfo_unescape(fields[4]),
            fs_type: String::from_utf8_lossy(fields[dash + 1]).into_owned(),
            source: mountinfo_unescape(fields[dash + 2])
                .to_string_lossy()
                .into_owned(),
        });
    }
    Ok(out)
}

pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts()
        .ok()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

/// The mountpoint must be an existing directory with nothing mounted on it.
pub fn check_mountpoint(mnt: &Path) -> Result<PathBuf, Failure> {
    match std::fs::metadata(mnt) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(Failure::new(
                exit::STALE_MOUNT,
                format!(
                    "{}: a previous spoolfs mount is dead (transport endpoint is not connected); \
                     clear it with `spoolfs umount --lazy {}` and mount again",
                    mnt.display(),
                    mnt.display()
                ),
            ))
        }
        Err(e) => {
            return Err(Failure::new(
                exit::NOT_A_DIRECTORY,
                format!("{}: cannot use as mountpoint: {e}", mnt.display()),
            ))
        }
        Ok(m) if !m.is_dir() => {
            return Err(Failure::new(
                exit::NOT_A_DIRECTORY,
                format!("{}: the mountpoint is not a directory", mnt.display()),
            ))
        }
        Ok(_) => {}
    }
    let abs = std::fs::canonicalize(mnt)
        .map_err(|e| Failure::new(exit::NOT_A_DIRECTORY, format!("{}: {e}", mnt.display())))?;
    if let Some(m) = mount_at(&abs) {
        return Err(Failure::new(
            exit::ALREADY_MOUNTED,
            format!(
                "{}: already mounted ({} from {}); unmount it first",
                abs.display(),
                m.fs_type,
                m.source
            ),
        ));
    }
    Ok(abs)
}

/// `path` absolute with symlinks resolved, also when its last components do not exist yet (a
/// data dir created at mount): the longest existing head is canonicalized, and the rest
/// (which cannot hold symlinks) is applied to it as written.
fn resolve(path: &Path) -> PathBuf {
    let Ok(abs) = std::path::absolute(path) else {
        return path.to_path_buf();
    };
    let parts: Vec<Component> = abs.components().collect();
    for split in (1..=parts.len()).rev() {
        let head: PathBuf = parts[..split].iter().collect();
        if let Ok(mut resolved) = std::fs::canonicalize(&head) {
            for part in &parts[split..] {
                match part {
                    Component::ParentDir => {
                        resolved.pop();
                    }
                    Component::Normal(name) => resolved.push(name),
                    _ => {}
                }
            }
            return resolved;
        }
    }
    abs
}

/// The data dir must not be the mountpoint or under it (`mnt`, canonical): the mount would
/// hide it from the operator, and every path the daemon opens or stats in it would go through
/// its own mount and wait for the daemon itself (a deadlock: `statvfs` of the data dir is
/// enough).
pub fn check_data_dir_outside(data_dir: &Path, mnt: &Path) -> Result<(), Failure> {
    let data = resolve(data_dir);
    if !data.starts_with(mnt) {
        return Ok(());
    }
    Err(Failure::new(
        exit::USAGE,
        format!(
            "{}: the data dir is inside the mountpoint {}: the mount would hide it, and the \
             daemon would wait on its own mount for every file it opens there; put it outside \
             the mountpoint (e.g. /var/lib/spoolfs)",
            data.display(),
            mnt.display()
        ),
    ))
}

/// The data dir lock: an flock on `DATA_DIR/spoolfs.lock` holding the owner's PID, kept for
/// the daemon's life so two daemons never share one database.
pub struct DataDirLock {
    _lock: Flock<File>,
}

pub const LOCK_FILE: &str = "spoolfs.lock";

pub fn prepare_data_dir(dir: &Path) -> Result<PathBuf, Failure> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                Failure::new(
                    exit::FAILURE,
                    format!("{}: cannot create data dir: {e}", dir.display()),
                )
            })?;
    }
    let abs = std::fs::canonicalize(dir)
        .map_err(|e| Failure::new(exit::FAILURE, format!("{}: {e}", dir.display())))?;
    if !abs.is_dir() {
        return Err(Failure::new(
            exit::NOT_A_DIRECTORY,
            format!("{}: the data dir is not a directory", abs.display()),
        ));
    }
    Ok(abs)
}

pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, Failure> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Failure::new(exit::FAILURE, format!("{}: {e}", path.display())))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, _)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            let holder = if pid.is_empty() {
                "another process".to_string()
            } else {
                format!("process {pid}")
            };
            return Err(Failure::new(
                exit::DATA_DIR_IN_USE,
                format!(
                    "{}: data dir is in use by {holder} (another spoolfs daemon); stop it or \
                     use another data dir",
                    dir.display()
                ),
            ));
        }
    };
    let write_pid = |f: &mut File| -> std::io::Result<()> {
        f.set_len(0)?;
        f.rewind()?;
        writeln!(f, "{}", std::process::id())?;
        f.sync_all()
    };
    write_pid(&mut lock)
        .map_err(|e| Failure::new(exit::FAILURE, format!("{}: {e}", path.display())))?;
    Ok(DataDirLock { _lock: lock })
}

/// The PID written in a data dir's lock file, if a live process holds the lock.
pub fn lock_holder(dir: &Path) -> Option<u32> {
    let file = File::open(dir.join(LOCK_FILE)).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => None,
        Err((mut file, _)) => {
            let mut pid = String::new();
            file.read_to_string(&mut pid).ok()?;
            pid.trim().parse().ok()
        }
    }
}

/// Open /dev/fuse and mount it at `mnt` as `fuse.spoolfs`, sourced from `data_dir`.
pub fn mount_fuse(data_dir: &Path, mnt: &Path, opts: &Options) -> Result<OwnedFd, Failure> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map_err(|e| {
            Failure::new(
                exit::FAILURE,
                format!("/dev/fuse: {e} (is the fuse module loaded? try `modprobe fuse`)"),
            )
        })?;
    let root_mode = std::fs::metadata(mnt).map(|m| m.mode()).unwrap_or(0o40755) & libc::S_IFMT;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={}",
        dev.as_raw_fd(),
        root_mode,
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    if opts.default_permissions {
        data.push_str(",default_permissions");
    }
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = MsFlags::empty();
    flags.set(MsFlags::MS_NOSUID, !opts.suid);
    flags.set(MsFlags::MS_NODEV, !opts.dev);
    flags.set(MsFlags::MS_RDONLY, opts.ro);
    flags.set(MsFlags::MS_SYNCHRONOUS, opts.sync);
    flags.set(MsFlags::MS_DIRSYNC, opts.dirsync);
    flags.set(MsFlags::MS_NOEXEC, opts.noexec);
    flags.set(MsFlags::MS_NOATIME, opts.noatime);
    let source = data_dir.to_string_lossy().into_owned();
    mount(
        Some(source.as_str()),
        mnt,
        Some("fuse.spoolfs"),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| {
        Failure::new(
            exit::FAILURE,
            format!(
                "{}: mount failed: {e} (spoolfs must run as root to mount)",
                mnt.display()
            ),
        )
    })?;
    Ok(dev.into())
}

/// Unmount; `lazy` detaches even while the mount is busy.
pub fn unmount(mnt: &Path, lazy: bool) -> nix::Result<()> {
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    umount2(mnt, flags)
}

#[cfg(test)]
mod tests {
    use super::mountinfo_unescape;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn a_data_dir_inside_the_mountpoint_is_refused_however_it_is_spelled() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(tmp.path()).expect("canonical tempdir");
        let mnt = root.join("spool");
        std::fs::create_dir(&mnt).expect("mkdir spool");
        std::os::unix::fs::symlink(&mnt, root.join("link")).expect("symlink");
        let refused = |data: std::path::PathBuf| {
            super::check_data_dir_outside(&data, &mnt)
                .map_err(|f| (f.code, f.message))
                .err()
        };
        for inside in [
            mnt.clone(),
            mnt.join("data"),
            mnt.join("new/deeper"),
            root.join("link/data"),
            root.join("other/../spool/data"),
            root.join("missing/../spool/./data"),
        ] {
            let got = refused(inside.clone());
            assert!(
                got.as_ref()
                    .is_some_and(|(code, m)| *code == super::exit::USAGE
                        && m.contains("inside the mountpoint")),
                "{}: {got:?}",
                inside.display()
            );
        }
        for outside in [
            root.join("data"),
            root.join("spool-data"),
            root.join("spool/../data"),
            root.clone(),
        ] {
            assert_eq!(refused(outside.clone()), None, "{}", outside.display());
        }
    }

    #[test]
    fn commit_timeout_is_a_mount_option() -> Result<(), String> {
        let mut o = super::Options::default();
        assert_eq!(o.commit_timeout, None);
        o.parse("commit_timeout=5")?;
        assert_eq!(o.commit_timeout, Some(std::time::Duration::from_secs(5)));
        for bad in ["0", "3601", "1.5", "-1", "", "30s"] {
            let e = o.parse(&format!("commit_timeout={bad}"));
            assert!(
                e.as_ref().is_err_and(|e| e.contains("commit_timeout")),
                "{bad}: {e:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn reserve_is_a_mount_option() -> Result<(), String> {
        use spoolfs_runtime::Reserve;
        let mut o = super::Options::defaults(true);
        assert_eq!(o.reserve, None);
        o.parse("rw,reserve=512M,nofail")?;
        assert_eq!(o.reserve, Some(Reserve::Bytes(512 << 20)));
        o.parse("reserve=2%")?;
        assert_eq!(o.reserve, Some(Reserve::Basis(200)));
        let e = o.parse("reserve=lots");
        assert!(
            e.as_ref().is_err_and(|e| e.contains("reserve \"lots\"")),
            "{e:?}"
        );
        Ok(())
    }

    #[test]
    fn writeback_cache_is_off_unless_asked_for() -> Result<(), String> {
        let mut o = super::Options::defaults(true);
        assert!(!o.writeback_cache);
        o.parse("rw,writeback_cache")?;
        assert!(o.writeback_cache);
        o.parse("no_writeback_cache")?;
        assert!(!o.writeback_cache);
        Ok(())
    }

    #[test]
    fn mountinfo_paths_are_unescaped_as_bytes() {
        let p = mountinfo_unescape(b"/a\\040b/\\134/\xff\\9");
        assert_eq!(p.as_os_str().as_bytes(), b"/a b/\\/\xff\\9");
    }
}
