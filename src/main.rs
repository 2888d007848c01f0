//! The `spoolfs` command: mount (and run the daemon), umount.

mod adapter;
mod daemon;
mod mount;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::mount::{exit, Failure};

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
    /// Number of threads reading FUSE requests.
    #[arg(long, default_value_t = 2)]
    fuse_threads: usize,
    /// Where the database lives (created 0700 if missing).
    data_dir: PathBuf,
    mountpoint: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Mount(args) => daemon::mount(args, cli.log_format),
        Command::Umount { lazy, mountpoint } => daemon::umount(&mountpoint, lazy),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("spoolfs: {f}");
            ExitCode::from(u8::try_from(f.code).unwrap_or(1))
        }
    }
}

#[allow(dead_code)]
fn usage(message: &str) -> Failure {
    Failure::new(exit::USAGE, message)
}
