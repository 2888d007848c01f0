//! Real filesystems under a data dir, for the disk-full and storage-error tests: a small tmpfs,
//! or ext4 on a loop device (which can be shut down, so every later I/O fails with EIO, the
//! way a filesystem behaves after its disk failed). Also scraping the daemon's HTTP endpoint.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::describe;

/// A filesystem mounted at `path` for the length of a test; detached on drop (also while a
/// failing test unwinds), after which a loop device is released by the kernel (autoclear).
pub struct ScratchFs {
    pub path: PathBuf,
    image: Option<PathBuf>,
    mounted: bool,
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(out.status.success(), "{what}: {}", describe(&out));
}

impl ScratchFs {
    /// A tmpfs of `size` (mount(8) syntax, e.g. `96m`) at `path` (created if missing).
    pub fn tmpfs(path: &Path, size: &str) -> ScratchFs {
        std::fs::create_dir_all(path).expect("create the tmpfs mountpoint");
        run(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(path),
            "mount tmpfs",
        );
        ScratchFs {
            path: path.to_path_buf(),
            image: None,
            mounted: true,
        }
    }

    /// A fresh ext4 of `mib` MiB in the sparse file `image`, loop-mounted at `path`.
    pub fn ext4(path: &Path, image: &Path, mib: u64) -> ScratchFs {
        std::fs::create_dir_all(path).expect("create the ext4 mountpoint");
        let f = std::fs::File::create(image).expect("create the image");
        f.set_len(mib << 20).expect("size the image");
        drop(f);
        run(
            Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image),
            "mkfs.ext4",
        );
        let mut fs = ScratchFs {
            path: path.to_path_buf(),
            image: Some(image.to_path_buf()),
            mounted: false,
        };
        fs.mount_image();
        fs
    }

    fn mount_image(&mut self) {
        let image = self.image.as_ref().expect("an image-backed filesystem");
        run(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(image)
                .arg(&self.path),
            "mount -o loop",
        );
        self.mounted = true;
    }

    /// Unmount and mount the image again (ext4 replays its journal: what was durable before
    /// a shutdown is back, nothing else).
    pub fn remount(&mut self) {
        run(Command::new("umount").arg(&self.path), "umount ext4");
        self.mounted = false;
        self.mount_image();
    }

    /// FS_IOC_SHUTDOWN with FS_SHUTDOWN_FLAGS_NOLOGFLUSH: the filesystem stops as if its disk
    /// had died (the journal is not flushed: only what was fsynced survives), and every later
    /// read, write and fsync on it fails with EIO. This is how xfstests simulates a failed
    /// disk ("godown"); ext4 and XFS support it.
    pub fn shut_down(&self) {
        const FS_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D; // _IOR('X', 125, __u32)
        const FS_SHUTDOWN_FLAGS_NOLOGFLUSH: u32 = 2;
        let dir = std::fs::File::open(&self.path).expect("open the filesystem's root");
        let flags = FS_SHUTDOWN_FLAGS_NOLOGFLUSH;
        // SAFETY: the ioctl reads one u32 from the pointer, which outlives the call.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_SHUTDOWN, &flags) };
        assert_eq!(
            rc,
            0,
            "FS_IOC_SHUTDOWN on {}: {}",
            self.path.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// A frozen filesystem (FIFREEZE, what `fsfreeze -f` does): every write and fsync on it
/// blocks until it is thawed, as on a disk that stopped answering; reads of what is cached
/// and statfs still work. Thawed on drop, so a failing test never leaves it frozen.
pub struct Frozen<'a>(&'a ScratchFs);

impl ScratchFs {
    pub fn freeze(&self) -> Frozen<'_> {
        const FIFREEZE: libc::c_ulong = 0xC004_5877; // _IOWR('X', 119, int)
        self.freeze_ioctl(FIFREEZE, "FIFREEZE");
        Frozen(self)
    }

    fn freeze_ioctl(&self, request: libc::c_ulong, what: &str) {
        let dir = std::fs::File::open(&self.path).expect("open the filesystem's root");
        // SAFETY: FIFREEZE and FITHAW take no argument (the kernel ignores the pointer).
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request, 0) };
        assert_eq!(
            rc,
            0,
            "{what} on {}: {}",
            self.path.display(),
            std::io::Error::last_os_error()
        );
    }
}

impl Frozen<'_> {
    pub fn thaw(self) {}
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        const FITHAW: libc::c_ulong = 0xC004_5878; // _IOWR('X', 120, int)
        self.0.freeze_ioctl(FITHAW, "FITHAW");
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Bytes an unprivileged user may still write on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> u64 {
    let v = nix::sys::statvfs::statvfs(path).expect("statvfs");
    v.blocks_available() * v.fragment_size()
}

/// Grow the file `filler` until at most `leave` bytes are free on its filesystem (or it is
/// full, if `leave` is 0). Returns the bytes written.
pub fn fill(filler: &Path, leave: u64) -> u64 {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(filler)
        .expect("create the filler");
    let block = vec![0xA5u8; 1 << 20];
    let mut written = 0u64;
    loop {
        let free = free_bytes(filler.parent().expect("filler has a parent"));
        if free <= leave {
            break;
        }
        let n = (free - leave).min(block.len() as u64) as usize;
        match f.write(&block[..n]) {
            Ok(0) => break,
            Ok(k) => written += k as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("fill {}: {e}", filler.display()),
        }
    }
    // tmpfs and ext4 count the pages once written; nothing to sync for the count.
    written
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for `--metrics-addr`).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// `GET path` on `127.0.0.1:port`: (status, body), or `None` if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// The value of the sample `series` (name with labels exactly as exposed, e.g.
/// `spoolfs_request_errors_total{op="write",errno="ENOSPC"}`) in an OpenMetrics body.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Sum of every sample of `name` whose labels contain each of `labels` (e.g. `errno="EIO"`).
pub fn sum_samples(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `spoolfs_request_errors_total` summed over operations for one errno name (`"EIO"`).
pub fn errors_answered(port: u16, errno: &str) -> f64 {
    let (_, metrics) = http_get(port, "/metrics").expect("scrape /metrics");
    sum_samples(
        &metrics,
        "spoolfs_request_errors_total",
        &[&format!("errno=\"{errno}\"")],
    )
}

/// Wait (up to 10 s) until `spoolfs_open_handles` is 0: every handle was released.
pub fn handles_released(port: u16) -> bool {
    super::wait_until(Duration::from_secs(10), || {
        http_get(port, "/metrics").and_then(|(_, body)| sample(&body, "spoolfs_open_handles"))
            == Some(0.0)
    })
}

/// Like `TestFs::mount_full`, with the metrics endpoint on `127.0.0.1:port` instead of off;
/// returns once `/metrics` answers.
pub fn mount_with_metrics(t: &super::TestFs, opts: &[&str], port: u16) -> super::MountGuard {
    use std::ffi::OsString;
    let addr = format!("127.0.0.1:{port}");
    let mut args: Vec<OsString> = vec!["mount".into(), "--metrics-addr".into(), addr.into()];
    for o in opts {
        args.push("-o".into());
        args.push(o.into());
    }
    args.push(t.data.clone().into());
    args.push(t.mnt.clone().into());
    let out = super::spoolfs(args);
    assert!(
        out.status.success(),
        "spoolfs mount failed: {}",
        describe(&out)
    );
    let pid = super::lock_pid(&t.data).expect("the lock file names the daemon");
    let guard = super::MountGuard {
        mnt: t.mnt.clone(),
        data: t.data.clone(),
        pid,
        active: true,
    };
    assert!(
        super::wait_until(Duration::from_secs(10), || http_get(port, "/metrics")
            .is_some_and(|(status, _)| status == 200)),
        "the metrics endpoint on port {port} does not answer (port taken?): {}",
        t.log()
    );
    guard
}

/// Run the daemon in the foreground (`spoolfs mount -f`, as systemd does) with its log going
/// to `log` instead of into the data dir: needed when the data dir's disk is made to fail,
/// since a log file on it would fail with it. Metrics on `127.0.0.1:port`; returns once the
/// mount is live and `/metrics` answers.
pub fn mount_foreground(
    t: &super::TestFs,
    opts: &[&str],
    port: u16,
    log: &Path,
) -> super::MountGuard {
    let stderr = std::fs::File::create(log).expect("create the daemon log");
    let mut cmd = Command::new(super::bin());
    cmd.args([
        "mount",
        "-f",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    for o in opts {
        cmd.args(["-o", o]);
    }
    let child = cmd
        .arg(&t.data)
        .arg(&t.mnt)
        .env_remove("SPOOLFS_DAEMON_CHILD")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start spoolfs mount -f");
    let guard = super::MountGuard {
        mnt: t.mnt.clone(),
        data: t.data.clone(),
        pid: child.id(),
        active: true,
    };
    // Reap it when it exits (the guard waits for the pid to go away).
    let mut child = child;
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    let live = super::wait_until(Duration::from_secs(10), || {
        super::mount_at(&t.mnt).is_some_and(|m| m.fs_type == "fuse.spoolfs")
            && http_get(port, "/readyz").is_some_and(|(status, _)| status == 200)
    });
    assert!(
        live,
        "spoolfs mount -f did not come up: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    guard
}
