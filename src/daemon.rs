//! Daemon lifecycle: start in the background and report readiness, run the FUSE session,
//! stop cleanly on SIGTERM/SIGINT or unmount.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fuser::{Config, Session, SessionACL};
use spoolfs_runtime::{pinning, Actor, ActorConfig};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use spoolfs_runtime::metrics::Metrics;
use spoolfs_runtime::{Invalidation, KernelNotifier, NotifyPool};

use crate::adapter::Adapter;
use crate::control;
use crate::http::{self, Readiness, ScrapeCollector};
use crate::mount::{self, exit, Failure, Options};
use crate::{ActorCpu, LogFormat, MountArgs};

/// Set in the environment of the background daemon started by `spoolfs mount`.
const CHILD_ENV: &str = "SPOOLFS_DAEMON_CHILD";
const READY_LINE: &str = "spoolfs-ready";

fn fail(message: impl Into<String>) -> Failure {
    Failure::new(exit::FAILURE, message)
}

fn init_logging(format: LogFormat, log_file: Option<&Path>) -> Result<(), Failure> {
    let filter = EnvFilter::try_from_env("SPOOLFS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match (log_file, format) {
        (Some(path), format) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| fail(format!("{}: cannot open log file: {e}", path.display())))?;
            let b = builder
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false);
            if format == LogFormat::Json {
                b.json().try_init()
            } else {
                b.try_init()
            }
        }
        (None, LogFormat::Json) => builder.json().with_writer(std::io::stderr).try_init(),
        // Colours only on a terminal: under systemd stderr goes to the journal.
        (None, LogFormat::Text) => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    result.map_err(|e| fail(format!("cannot set up logging: {e}")))
}

pub fn mount(args: MountArgs, log_format: LogFormat) -> Result<(), Failure> {
    let mut opts = Options::defaults(nix::unistd::geteuid().is_root());
    for list in &args.options {
        opts.parse(list).map_err(|m| Failure::new(exit::USAGE, m))?;
    }
    let mnt = mount::check_mountpoint(&args.mountpoint)?;
    mount::check_data_dir_outside(&args.data_dir, &mnt)?;
    let data_dir = mount::prepare_data_dir(&args.data_dir)?;
    let is_child = std::env::var_os(CHILD_ENV).is_some();
    if !args.foreground && !is_child {
        return spawn_background(&data_dir);
    }
    let log_file = is_child.then(|| data_dir.join("spoolfs.log"));
    init_logging(log_format, log_file.as_deref())?;
    run(&args, &opts, &data_dir, &mnt, is_child)
}

/// Start the daemon as a child in its own session and wait until it reports the mount live
/// (exit 0) or fails (its exit code, its message already on stderr).
fn spawn_background(data_dir: &Path) -> Result<(), Failure> {
    let exe = std::env::current_exe().map_err(|e| fail(format!("cannot find own binary: {e}")))?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| fail(format!("cannot start the daemon: {e}")))?;
    let ready = child.stdout.take().is_some_and(|out| {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .any(|l| l == READY_LINE)
    });
    if ready {
        return Ok(());
    }
    let status = child
        .wait()
        .map_err(|e| fail(format!("cannot wait for the daemon: {e}")))?;
    Err(Failure::new(
        status.code().filter(|c| *c != 0).unwrap_or(exit::FAILURE),
        format!(
            "the daemon did not come up (see above, and {}/spoolfs.log)",
            data_dir.display()
        ),
    ))
}

fn run(
    args: &MountArgs,
    opts: &Options,
    data_dir: &Path,
    mnt: &Path,
    is_child: bool,
) -> Result<(), Failure> {
    if is_child {
        // Detach from the terminal's session so a hangup does not kill the mount.
        let _ = nix::unistd::setsid();
    }
    let _lock = mount::lock_data_dir(data_dir)?;
    // A thread inherits the CPU set of the thread that starts it, and tokio starts its
    // blocking threads (durable commits) from the caller of `spawn_blocking`: the pinned actor.
    // Left alone, every commit would run on the actor's CPU and, once woken by its fdatasync,
    // keep that CPU (writing redb) while the actor waited to answer the callers (measured: the
    // answer to an fsync came ~60 µs after the log was synced). So each tokio thread takes
    // back the daemon's own set.
    let daemon_cpus = pinning::daemon_cpus().ok().map(|(set, _)| set);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("spoolfs-tokio")
        .on_thread_start(move || {
            if let Some(cpus) = &daemon_cpus {
                pinning::run_on(cpus);
            }
        })
        .enable_all()
        .build()
        .map_err(|e| fail(format!("cannot start the tokio runtime: {e}")))?;
    let mut config = ActorConfig::new(data_dir.to_path_buf());
    config.sync = opts.sync;
    config.dirsync = opts.dirsync;
    config.memfd_budget = args.memfd_budget;
    config.poll = std::time::Duration::from_micros(args.poll_us);
    config.cpu = actor_cpu(args.actor_cpu);
    config.cpu_movable = matches!(args.actor_cpu, ActorCpu::Last);
    config.root_uid = nix::unistd::getuid().as_raw();
    config.root_gid = nix::unistd::getgid().as_raw();
    config.reserve = opts.reserve.unwrap_or_default();
    if let Some(t) = opts.commit_timeout {
        config.commit_timeout = t;
    }
    let storage_health = config.health.clone();
    // The notify pool's queue exists before the actor (which queues to it); its threads start
    // once the session can send notifications.
    let (invalidations, pool_queue) = NotifyPool::channel(4096);
    config.invalidations = Some(invalidations);
    // spoolfs_* metrics live in a prefixed sub-registry; process_* metrics at the root.
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(registry.sub_registry_with_prefix("spoolfs")));
    let placement = config.placement.clone();
    let (actor, actor_thread) = Actor::start(config, runtime.handle().clone(), metrics.clone())
        .map_err(|e| fail(format!("{e}")))?;
    let readiness = Arc::new(Readiness {
        storage: storage_health,
        ..Readiness::default()
    });
    let weak_actor = actor.downgrade();
    control::spawn(
        &runtime,
        data_dir,
        control::Daemon {
            actor: actor.downgrade(),
            readiness: readiness.clone(),
            started: Instant::now(),
            mountpoint: mnt.to_path_buf(),
            metrics_addr: args.metrics_addr.clone(),
        },
    );

    // Take over SIGTERM/SIGINT before the mount appears: a stop that arrives while mounting
    // must still end in a clean unmount, not a dead mountpoint.
    spawn_signal_handler(&runtime, mnt.to_path_buf(), readiness.clone());
    let fd = mount::mount_fuse(data_dir, mnt, opts)?;
    let mut session_config = Config::default();
    session_config.n_threads = Some(args.fuse_threads.max(1));
    session_config.clone_fd = args.fuse_threads > 1;
    session_config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let acl = session_config.acl;
    let session = match Session::from_fd(
        Adapter::new(
            actor,
            (args.metrics_addr != "off").then(|| metrics.clone()),
            std::time::Duration::from_micros(args.handoff_us),
            opts.writeback_cache,
            placement,
        ),
        fd,
        acl,
        session_config,
    ) {
        Ok(s) => s,
        Err(e) => {
            let _ = mount::unmount(mnt, true);
            return Err(fail(format!(
                "{}: FUSE handshake failed: {e}",
                mnt.display()
            )));
        }
    };
    info!(data_dir = %data_dir.display(), mountpoint = %mnt.display(), pid = std::process::id(), "mounted");
    // Kernel invalidations are sent from their own threads, never from the actor or a FUSE
    // thread (a notify call from the request path can deadlock the kernel).
    if let Err(e) = NotifyPool::start(
        Arc::new(FuseNotifier(session.notifier())),
        1,
        pool_queue,
        metrics.clone(),
    ) {
        warn!(error = %e, "cannot start the notify pool; kernel caches are never invalidated");
    }
    readiness.mounted.store(true, Ordering::Relaxed);
    metrics.mounted.set(1);
    registry.register_collector(Box::new(ScrapeCollector {
        db_path: data_dir.join(spoolfs_store::DB_FILE),
        data_dir: data_dir.to_path_buf(),
        waiting_path: fusectl_waiting_path(mnt),
        actor: weak_actor,
    }));
    if let Some(addr) = metrics_addr(&args.metrics_addr)? {
        http::spawn(&runtime, addr, Arc::new(registry), readiness.clone());
    }
    if is_child {
        announce_ready();
    }
    // systemd Type=notify: ready only now that the mount is live.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    if let Err(e) = session.run() {
        error!(error = %e, "FUSE session ended with an error");
    }
    // Unmounting takes the mount out of the table before the session ends; still listed
    // means the connection was cut under it (`spoolfs abort`, fusectl).
    let source = data_dir.to_string_lossy();
    if mount::mount_at(mnt).is_some_and(|m| m.fs_type == "fuse.spoolfs" && m.source == source) {
        warn!(
            mountpoint = %mnt.display(),
            "FUSE connection aborted (not unmounted): the mountpoint stays dead \
             (ENOTCONN) until `spoolfs umount --lazy`"
        );
    }
    readiness.stopping.store(true, Ordering::Relaxed);
    metrics.mounted.set(0);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // The session (and with it every sender to the actor) is gone: the actor commits and stops.
    if actor_thread.join().is_err() {
        error!("the actor thread panicked");
        return Err(fail("the actor thread panicked"));
    }
    runtime.shutdown_timeout(Duration::from_secs(5));
    info!(mountpoint = %mnt.display(), "unmounted; exiting");
    Ok(())
}

/// Tell the waiting parent the mount is live, then let go of the pipe.
fn announce_ready() {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{READY_LINE}");
    let _ = out.flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
    let _ = std::io::stdout().as_raw_fd();
}

/// SIGTERM/SIGINT: unmount (lazily if busy); the session then ends and the actor commits.
fn spawn_signal_handler(
    runtime: &tokio::runtime::Runtime,
    mnt: std::path::PathBuf,
    readiness: Arc<Readiness>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    // Registered here, synchronously: from now on the signals no longer kill the process.
    let _guard = runtime.enter();
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop with `spoolfs umount`");
        return;
    };
    runtime.spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: unmounting"),
            _ = int.recv() => info!("SIGINT: unmounting"),
        }
        readiness.stopping.store(true, Ordering::Relaxed);
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        // A signal during mounting: wait until the mount is there to take it down.
        while !readiness.mounted.load(Ordering::Relaxed) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        match mount::unmount(&mnt, false) {
            Ok(()) => {}
            Err(nix::errno::Errno::EBUSY) => {
                warn!(mountpoint = %mnt.display(), "mount busy: detaching lazily");
                if let Err(e) = mount::unmount(&mnt, true) {
                    error!(error = %e, "lazy unmount failed");
                }
            }
            Err(e) => error!(error = %e, "unmount failed"),
        }
    });
}

pub fn umount(mountpoint: &Path, lazy: bool) -> Result<(), Failure> {
    // Lexical, no stat(): a wedged mount must not hang the command meant to clear it.
    let abs = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let entry = mount::mount_at(&abs);
    if entry.is_none() {
        return Err(fail(format!("{}: not mounted", abs.display())));
    }
    // --lazy tries a plain unmount first and detaches only if that finds the mount busy.
    // A busy detached mount keeps its daemon serving the open files, so it cannot release
    // the data dir until they are closed: waiting for it then would only stall (30 s, and
    // report success anyway). A mount that was not busy is waited for as usual, so a mount
    // right after `umount --lazy` finds the data dir free.
    let mut detached_busy = false;
    let result = match mount::unmount(&abs, false) {
        Err(nix::errno::Errno::EBUSY) if lazy => {
            detached_busy = true;
            mount::unmount(&abs, true)
        }
        r => r,
    };
    match result {
        Ok(()) => {}
        Err(nix::errno::Errno::EBUSY) => {
            return Err(fail(format!(
                "{}: busy (a process has files open there); retry, or use --lazy to detach now",
                abs.display()
            )))
        }
        Err(e) => return Err(fail(format!("{}: unmount failed: {e}", abs.display()))),
    }
    // Wait for the daemon to write its last commit and release the data dir, so that a mount
    // right after this returns finds it free.
    if let Some(e) = entry.filter(|e| e.fs_type == "fuse.spoolfs" && !detached_busy) {
        let data_dir = Path::new(&e.source);
        let deadline = Instant::now() + Duration::from_secs(30);
        while mount::lock_holder(data_dir).is_some() {
            if Instant::now() > deadline {
                if lazy {
                    return Ok(());
                }
                return Err(fail(format!(
                    "{}: unmounted, but the daemon still holds {} after 30 s",
                    abs.display(),
                    data_dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// `spoolfs abort`: cut the kernel's FUSE connection of the mount (fusectl's `abort` knob),
/// as a last resort for a mount that hangs. Every waiting and future request fails with
/// ENOTCONN; the daemon sees the connection gone, makes its final commit and exits. The
/// mountpoint stays dead until `spoolfs umount --lazy`; data closed or fsynced before is kept.
pub fn abort(mountpoint: &Path) -> Result<(), Failure> {
    // Lexical, no stat(): aborting is for mounts that may hang.
    let abs = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let Some(entry) = mount::mount_at(&abs) else {
        return Err(fail(format!("{}: not mounted", abs.display())));
    };
    if entry.fs_type != "fuse.spoolfs" {
        return Err(fail(format!(
            "{}: not a spoolfs mount ({} from {})",
            abs.display(),
            entry.fs_type,
            entry.source
        )));
    }
    let Some(knob) = fusectl_file(entry.dev, "abort") else {
        return Err(fail(format!(
            "{}: no fusectl connection for device {}:{} under {FUSECTL} (is fusectl mountable?)",
            abs.display(),
            entry.dev.0,
            entry.dev.1
        )));
    };
    let data_dir = Path::new(&entry.source);
    let was_running = mount::lock_holder(data_dir).is_some();
    std::fs::write(&knob, b"1").map_err(|e| {
        fail(format!(
            "{}: cannot write {}: {e}",
            abs.display(),
            knob.display()
        ))
    })?;
    // Wait for the daemon to notice, make its last commit and release the data dir.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(pid) = mount::lock_holder(data_dir) {
        if Instant::now() > deadline {
            return Err(fail(format!(
                "{}: connection aborted, but daemon {pid} still holds {} after 30 s",
                abs.display(),
                data_dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "{}: connection aborted, {}; the mountpoint stays dead (ENOTCONN) until \
         `spoolfs umount --lazy {}`",
        abs.display(),
        if was_running {
            "daemon committed and exited"
        } else {
            "no daemon was running"
        },
        abs.display()
    );
    Ok(())
}

/// `spoolfs status`: LSB exit codes (0 running and ready, 1 dead, 3 not running).
pub fn status(mountpoint: &Path) -> Result<(), Failure> {
    // Lexical, no stat(): a wedged mount must not hang the command meant to clear it.
    let abs = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let Some(entry) = mount::mount_at(&abs).filter(|e| e.fs_type == "fuse.spoolfs") else {
        return Err(Failure::new(
            3,
            format!("{}: no spoolfs mounted here", abs.display()),
        ));
    };
    let data_dir = Path::new(&entry.source);
    match control::query(data_dir) {
        Some(text) => {
            print!("{text}");
            if text.starts_with("state: ready") {
                Ok(())
            } else {
                Err(Failure::new(
                    1,
                    format!("{}: daemon is not ready", abs.display()),
                ))
            }
        }
        None if mount::lock_holder(data_dir).is_some() => Err(Failure::new(
            1,
            format!(
                "{}: the daemon holds {} but does not answer",
                abs.display(),
                data_dir.display()
            ),
        )),
        None => Err(Failure::new(
            1,
            format!(
                "{}: dead mount (daemon gone); clear it with `spoolfs umount --lazy {}`",
                abs.display(),
                abs.display()
            ),
        )),
    }
}

/// `--metrics-addr`: an address, or `off`.
fn metrics_addr(arg: &str) -> Result<Option<std::net::SocketAddr>, Failure> {
    if arg == "off" {
        return Ok(None);
    }
    arg.parse().map(Some).map_err(|e| {
        Failure::new(
            exit::USAGE,
            format!("--metrics-addr {arg:?}: {e} (expected HOST:PORT or off)"),
        )
    })
}

const FUSECTL: &str = "/sys/fs/fuse/connections";

/// The fusectl file with the kernel's count of waiting requests for the mount at `mnt`.
fn fusectl_waiting_path(mnt: &Path) -> Option<std::path::PathBuf> {
    fusectl_file(mount::mount_at(mnt)?.dev, "waiting")
}

/// The file `name` (`waiting`, `abort`, ...) of the fusectl connection directory of the FUSE
/// mount with device number `dev` (from mountinfo). The directory is named after the
/// device number; fusectl is mounted if it is not yet.
fn fusectl_file(dev: (u32, u32), name: &str) -> Option<std::path::PathBuf> {
    // The device comes from mountinfo: a stat() of the mountpoint would wait for the daemon
    // (not serving requests yet at startup, or wedged when it is to be aborted).
    let (major, minor) = dev;
    // The kernel's internal dev_t: major in the high 12 bits, minor in the low 20.
    let id = (u64::from(major) << 20) | u64::from(minor);
    let path = Path::new(FUSECTL).join(id.to_string()).join(name);
    if !path.exists() {
        let _ = nix::mount::mount(
            Some("fusectl"),
            FUSECTL,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    path.exists().then_some(path)
}

/// `spoolfs fsck`: offline check of every invariant of the database.
pub fn fsck(data_dir: &Path, repair: bool) -> Result<(), Failure> {
    use std::io::IsTerminal;
    const OPERATIONAL: i32 = 8;
    let db_path = data_dir.join(spoolfs_store::DB_FILE);
    if !db_path.exists() {
        return Err(Failure::new(
            OPERATIONAL,
            format!("{}: no spoolfs database here", db_path.display()),
        ));
    }
    let abs = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    if let Some(pid) = mount::lock_holder(data_dir) {
        let mounted_at = mount::mounts()
            .ok()
            .and_then(|ms| ms.into_iter().find(|m| Path::new(&m.source) == abs))
            .map(|m| format!(" (mounted at {})", m.mount_point.display()))
            .unwrap_or_default();
        return Err(Failure::new(
            OPERATIONAL,
            format!(
                "{}: in use by spoolfs process {pid}{mounted_at}; unmount it first",
                data_dir.display()
            ),
        ));
    }
    // Hold the lock ourselves so no daemon starts while we check (and maybe repair).
    let _lock = mount::lock_data_dir(data_dir).map_err(|f| Failure::new(OPERATIONAL, f.message))?;
    let db = spoolfs_store::open_database(&db_path)
        .map_err(|e| Failure::new(OPERATIONAL, e.to_string()))?;
    // Recovery first, as a mount does (like e2fsck replaying the journal): the write-ahead
    // log may hold the last operations of a daemon that did not stop cleanly.
    let (wal, replayed) = spoolfs_store::Wal::open(&db, data_dir).map_err(|e| {
        Failure::new(
            OPERATIONAL,
            format!("{}: replay the write-ahead log: {e}", data_dir.display()),
        )
    })?;
    if replayed > 0 {
        println!(
            "{}: replayed {replayed} write-ahead log entries",
            data_dir.display()
        );
    }
    if let Some(from) = wal.upgraded_from() {
        println!(
            "{}: upgraded the database from schema version {from} to {}",
            data_dir.display(),
            spoolfs_store::SCHEMA_VERSION
        );
    }
    let tty = std::io::stderr().is_terminal();
    let mut progress = |phase: &str, done: u64, total: u64| {
        if tty && total > 0 {
            eprint!("\r{phase}: {done}/{total}   ");
        }
    };
    let report = spoolfs_store::fsck::check(&db, repair, &mut progress)
        .map_err(|e| Failure::new(OPERATIONAL, format!("{}: {e}", db_path.display())))?;
    if tty {
        eprintln!();
    }
    for p in &report.problems {
        println!("{p}");
    }
    println!(
        "{}: {} inodes, {} entries, {} chunks, {} orphans awaiting reclaim, {} problems{}",
        data_dir.display(),
        report.inodes,
        report.dentries,
        report.chunks,
        report.pending_orphans,
        report.problems.len(),
        if repair {
            format!(", {} repairs", report.repaired)
        } else {
            String::new()
        }
    );
    match (report.problems.is_empty(), repair) {
        (true, _) => Ok(()),
        (false, true) => Err(Failure::new(1, "problems found and repaired")),
        (false, false) => Err(Failure::new(
            4,
            "problems found (run with --repair to fix them)",
        )),
    }
}

/// Sends invalidations through fuser's notifier (used only from the notify pool's threads).
struct FuseNotifier(fuser::Notifier);

impl KernelNotifier for FuseNotifier {
    fn notify(&self, inv: &Invalidation) -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        match inv {
            Invalidation::Entry { parent, name } => self
                .0
                .inval_entry(fuser::INodeNo(parent.0), std::ffi::OsStr::from_bytes(name)),
            Invalidation::Delete {
                parent,
                child,
                name,
            } => self.0.delete(
                fuser::INodeNo(parent.0),
                fuser::INodeNo(child.0),
                std::ffi::OsStr::from_bytes(name),
            ),
            Invalidation::Inode { ino } => self.0.inval_inode(fuser::INodeNo(ino.0), 0, 0),
            // A negative offset: attributes only, no pages.
            Invalidation::Attributes { ino } => self.0.inval_inode(fuser::INodeNo(ino.0), -1, 0),
        }
    }
}

/// The CPU to pin the actor to. `last` picks the last CPU this process may run on, and only
/// when it may run on two or more: pinned to the only CPU, the actor would gain nothing.
fn actor_cpu(choice: ActorCpu) -> Option<usize> {
    match choice {
        ActorCpu::None => None,
        ActorCpu::Cpu(n) => Some(n),
        ActorCpu::Last => last_of_several(pinning::daemon_cpus().ok()?.1.into_iter()),
    }
}

fn last_of_several(cpus: impl Iterator<Item = usize>) -> Option<usize> {
    let cpus: Vec<usize> = cpus.collect();
    if cpus.len() >= 2 {
        cpus.last().copied()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::last_of_several;

    #[test]
    fn the_actor_is_pinned_only_when_there_is_another_cpu() {
        assert_eq!(last_of_several([0, 1].into_iter()), Some(1));
        assert_eq!(last_of_several([2, 5, 7].into_iter()), Some(7));
        assert_eq!(last_of_several([3].into_iter()), None);
        assert_eq!(last_of_several(std::iter::empty()), None);
    }
}
