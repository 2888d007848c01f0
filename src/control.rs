//! The control socket (`DATA_DIR/spoolfs.sock`): `spoolfs status` asks the running daemon
//! through it. One connection, one text report, closed.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spoolfs_runtime::{Caller, Msg, Op, Reply, StatusReport, WeakActorHandle};
use tokio::io::AsyncWriteExt;
use tracing::warn;

use crate::http::Readiness;

pub const SOCKET_FILE: &str = "spoolfs.sock";

pub struct Daemon {
    pub actor: WeakActorHandle,
    pub readiness: Arc<Readiness>,
    pub started: Instant,
    pub mountpoint: PathBuf,
    pub metrics_addr: String,
}

pub fn spawn(runtime: &tokio::runtime::Runtime, data_dir: &Path, daemon: Daemon) {
    let path = data_dir.join(SOCKET_FILE);
    let _ = std::fs::remove_file(&path);
    let daemon = Arc::new(daemon);
    runtime.spawn(async move {
        let listener = match tokio::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "control socket disabled: `spoolfs status` will not work");
                return;
            }
        };
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let daemon = daemon.clone();
            tokio::spawn(async move {
                let text = report(&daemon).await;
                let _ = stream.write_all(text.as_bytes()).await;
            });
        }
    });
}

async fn ask_actor(daemon: &Daemon) -> Option<(StatusReport, usize)> {
    let actor = daemon.actor.upgrade()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let msg = Msg {
        caller: Caller {
            unique: 0,
            uid: 0,
            gid: 0,
            pid: std::process::id(),
        },
        op: Op::Status,
        later: None,
        reply: Box::new(move |r| {
            let _ = tx.send(r);
        }),
        queued: Instant::now(),
    };
    let queue_depth = actor.queue_depth();
    // Waiting for room in a full queue counts against the same 5 s as the answer.
    let asked = async {
        actor.send_async(msg).await;
        rx.await
    };
    match tokio::time::timeout(Duration::from_secs(5), asked).await {
        Ok(Ok(Ok(Reply::Status(s)))) => Some((s, queue_depth)),
        _ => None,
    }
}

async fn report(daemon: &Daemon) -> String {
    let status = ask_actor(daemon).await;
    let ready = daemon.readiness.ready() && status.is_some();
    let uptime = daemon.started.elapsed().as_secs_f64();
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(&v);
        out.push('\n');
    };
    let state = match daemon.readiness.storage.reason() {
        Some(reason) => format!(
            "failed: storage I/O error ({reason}); every request is answered EIO until the \
             database can be reopened (retried every 500 ms) or the data dir is mounted again"
        ),
        None if ready => "ready".into(),
        None => "not ready".into(),
    };
    line("state", state);
    line("mountpoint", daemon.mountpoint.display().to_string());
    line("pid", std::process::id().to_string());
    line("version", env!("CARGO_PKG_VERSION").into());
    line("uptime_seconds", format!("{uptime:.0}"));
    line("metrics", daemon.metrics_addr.clone());
    if let Some((s, queue_depth)) = status {
        let rate = if uptime > 0.0 {
            s.requests as f64 / uptime
        } else {
            0.0
        };
        line(
            "requests",
            format!("{} ({rate:.1}/s since start)", s.requests),
        );
        line(
            "commits",
            format!("{} ({} durable)", s.commits, s.durable_commits),
        );
        line("queue_depth", queue_depth.to_string());
        line("open_handles", s.open_handles.to_string());
        line("kernel_known_inodes", s.known_inodes.to_string());
        line(
            "memfd_bytes",
            format!("{} ({} dirty chunks)", s.memfd_bytes, s.memfd_dirty_chunks),
        );
        line("db_bytes", s.db_bytes.to_string());
    }
    out
}

/// Read a running daemon's report. `None`: no daemon answers on the socket.
pub fn query(data_dir: &Path) -> Option<String> {
    let mut stream = UnixStream::connect(data_dir.join(SOCKET_FILE)).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}
