//! The `spoolfs` command: mount (and run the daemon), umount.

mod adapter;
mod control;
mod daemon;
mod handoff;
mod http;
mod mount;

/// jemalloc instead of glibc's malloc: the daemon's live heap stays flat under a mixed load
/// (about 95 MiB, heaptrack over a 4-minute soak), but with glibc's per-thread arenas the
/// RSS grew without bound (10 MiB/min in the 10-minute soak: 64 KiB to 1 MiB buffers
/// allocated on FUSE threads and freed on the actor fragment the arenas, and glibc returns
/// only the top of each heap to the kernel).  jemalloc returns unused pages after a decay.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "spoolfs",
    version,
    about = "A durable FUSE filesystem for mail spools"
)]
struct Cli {
    /// Log format of the daemon's access log and messages (level: SPOOLFS_LOG, e.g. `debug`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mount DATA_DIR at MOUNTPOINT; returns once the mount is live.
    Mount(MountArgs),
    /// Unmount a spoolfs mount and wait for its daemon to finish its last commit.
    Umount {
        /// Detach even if the mount is busy (also clears a dead mount).
        #[arg(short, long)]
        lazy: bool,
        mountpoint: PathBuf,
    },
    /// Cut the kernel's FUSE connection of a hanging spoolfs mount (fusectl abort): requests
    /// fail with ENOTCONN, the daemon commits and exits, the mount stays dead until
    /// `umount --lazy`.
    Abort { mountpoint: PathBuf },
    /// Ask the daemon serving MOUNTPOINT how it is. Exit 0 ready, 1 dead mount, 3 not running.
    Status { mountpoint: PathBuf },
    /// Check a data dir offline (not while mounted). fsck(8) exit codes: 0 clean,
    /// 1 problems repaired, 4 problems left, 8 operational error.
    Fsck {
        /// Fix what has one safe answer (link counts, dangling records, orphans).
        #[arg(long)]
        repair: bool,
        data_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct MountArgs {
    /// Stay in the foreground (for systemd and tests).
    #[arg(short, long)]
    foreground: bool,
    /// Comma list of mount options: allow_other, default_permissions, ro, sync, dirsync, ...
    #[arg(short = 'o', value_name = "OPTS")]
    options: Vec<String>,
    /// Most bytes of file content staged in memory (memfd) at once.
    #[arg(long, default_value_t = 1 << 30)]
    memfd_budget: u64,
    /// Prometheus endpoint (`/metrics`, `/healthz`, `/readyz`), or `off`.
    #[arg(long, default_value = "127.0.0.1:9567")]
    metrics_addr: String,
    /// Number of threads reading FUSE requests.
    #[arg(long, default_value_t = 2)]
    fuse_threads: usize,
    /// Microseconds the actor polls for the next request before it sleeps (0: sleep at
    /// once). Waking a sleeping thread costs more than a request on a VM; see the README.
    #[arg(long, default_value_t = 50, value_parser = micros_up_to_a_second())]
    poll_us: u64,
    /// CPU to pin the actor thread to while its callers are fewer than the daemon's CPUs: a
    /// number, `last` (the last CPU this process may use, if it may use two or more; the
    /// actor moves to another when a caller keeps running on it) or `none`.
    #[arg(long, default_value = "last", value_parser = parse_actor_cpu)]
    actor_cpu: ActorCpu,
    /// Microseconds a FUSE thread waits for the actor's answer to write the reply itself, on
    /// its own CPU (0: the actor writes every reply). See `handoff.rs`.
    #[arg(long, default_value_t = 50, value_parser = micros_up_to_a_second())]
    handoff_us: u64,
    /// Where the database lives (created 0700 if missing).
    data_dir: PathBuf,
    mountpoint: PathBuf,
}

/// `--poll-us` and `--handoff-us`: a busy wait longer than a second makes no sense, and the
/// bound keeps `Instant::now() + wait` far from overflowing.
fn micros_up_to_a_second() -> clap::builder::RangedU64ValueParser {
    clap::builder::RangedU64ValueParser::new().range(0..=1_000_000)
}

/// `--actor-cpu`: where the actor thread runs (see `ActorConfig::cpu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActorCpu {
    None,
    Last,
    Cpu(usize),
}

fn parse_actor_cpu(s: &str) -> Result<ActorCpu, String> {
    match s {
        "none" => Ok(ActorCpu::None),
        "last" => Ok(ActorCpu::Last),
        n => n
            .parse()
            .map(ActorCpu::Cpu)
            .map_err(|_| format!("`{n}` is not a CPU number, `last` or `none`")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(helper_args(std::env::args_os().collect()));
    let result = match cli.command {
        Command::Mount(args) => daemon::mount(args, cli.log_format),
        Command::Umount { lazy, mountpoint } => daemon::umount(&mountpoint, lazy),
        Command::Status { mountpoint } => daemon::status(&mountpoint),
        Command::Abort { mountpoint } => daemon::abort(&mountpoint),
        Command::Fsck { repair, data_dir } => daemon::fsck(&data_dir, repair),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("spoolfs: {f}");
            ExitCode::from(u8::try_from(f.code).unwrap_or(1))
        }
    }
}

/// Mount-helper calling conventions, turned into `spoolfs mount -o OPTS SOURCE TARGET`:
/// mount(8) runs `mount.fuse.spoolfs SOURCE TARGET -o OPTS` (the binary installed under that
/// name), and mount.fuse3 runs `spoolfs SOURCE TARGET -o OPTS`.
fn helper_args(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let Some(argv0) = args.first().cloned() else {
        return args;
    };
    let invoked_as = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let first = args.get(1).map(|a| a.to_string_lossy().into_owned());
    let is_subcommand = matches!(
        first.as_deref(),
        Some(
            "mount"
                | "umount"
                | "status"
                | "fsck"
                | "abort"
                | "help"
                | "--help"
                | "-h"
                | "--version"
                | "-V"
        )
    );
    let looks_like_paths = args.len() >= 3 && first.as_deref().is_some_and(|f| !f.starts_with('-'));
    if !(invoked_as.starts_with("mount.") || (!is_subcommand && looks_like_paths)) {
        return args;
    }
    let mut out = vec![argv0, "mount".into()];
    let mut positional = Vec::new();
    let mut rest = args.into_iter().skip(1);
    while let Some(a) = rest.next() {
        match a.to_str() {
            Some("-o") => {
                if let Some(opts) = rest.next() {
                    out.push("-o".into());
                    out.push(opts);
                }
            }
            // mount(8) flags: -n (no mtab), -s (sloppy), -v (verbose) change nothing here.
            Some("-n" | "-s" | "-v") => {}
            _ => positional.push(a),
        }
    }
    out.extend(positional);
    out
}

#[cfg(test)]
mod tests {
    use super::{helper_args, parse_actor_cpu, ActorCpu, Cli};
    use clap::Parser;

    #[test]
    fn busy_waits_are_bounded_to_a_second() {
        let mount = |flag: &str, v: &str| {
            Cli::try_parse_from(["spoolfs", "mount", flag, v, "/data", "/mnt"]).map(|_| ())
        };
        for flag in ["--poll-us", "--handoff-us"] {
            assert!(mount(flag, "0").is_ok(), "{flag} 0");
            assert!(mount(flag, "1000000").is_ok(), "{flag} one second");
            assert!(mount(flag, "1000001").is_err(), "{flag} past a second");
            assert!(
                mount(flag, "18446744073709551615").is_err(),
                "{flag} u64::MAX"
            );
        }
    }

    #[test]
    fn actor_cpu_values() {
        assert_eq!(parse_actor_cpu("none"), Ok(ActorCpu::None));
        assert_eq!(parse_actor_cpu("last"), Ok(ActorCpu::Last));
        assert_eq!(parse_actor_cpu("3"), Ok(ActorCpu::Cpu(3)));
        assert!(parse_actor_cpu("-1").is_err());
        assert!(parse_actor_cpu("first").is_err());
    }

    fn args(v: &[&str]) -> Vec<std::ffi::OsString> {
        v.iter().map(Into::into).collect()
    }

    #[test]
    fn mount_helper_conventions_become_mount_commands() {
        assert_eq!(
            helper_args(args(&[
                "/sbin/mount.fuse.spoolfs",
                "/data",
                "/mnt",
                "-o",
                "rw,nofail"
            ])),
            args(&[
                "/sbin/mount.fuse.spoolfs",
                "mount",
                "-o",
                "rw,nofail",
                "/data",
                "/mnt"
            ])
        );
        assert_eq!(
            helper_args(args(&["spoolfs", "/data", "/mnt", "-o", "dev,suid"])),
            args(&["spoolfs", "mount", "-o", "dev,suid", "/data", "/mnt"])
        );
        assert_eq!(
            helper_args(args(&["spoolfs", "umount", "/mnt"])),
            args(&["spoolfs", "umount", "/mnt"])
        );
    }
}
