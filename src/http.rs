//! The Prometheus endpoint: `/metrics` (OpenMetrics text), `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use tracing::{info, warn};

/// Whether the mount is live, not shutting down, and its storage has not failed (for /readyz).
#[derive(Default)]
pub struct Readiness {
    pub mounted: AtomicBool,
    pub stopping: AtomicBool,
    /// Set by the actor while a storage failure keeps the database closed.
    pub storage: Arc<spoolfs_runtime::StorageHealth>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.mounted.load(Ordering::Relaxed)
            && !self.stopping.load(Ordering::Relaxed)
            && !self.storage.is_failed()
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    readiness: Arc<Readiness>,
}

/// Serve until the runtime shuts down. A port already in use is reported, not fatal: the
/// mount matters more than its metrics, and several mounts on one machine need several ports.
pub fn spawn(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    registry: Arc<Registry>,
    readiness: Arc<Readiness>,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            registry,
            readiness,
        });
    runtime.spawn(async move {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                warn!(%addr, error = %e, "metrics endpoint disabled: cannot listen (use --metrics-addr)");
                return;
            }
        };
        info!(%addr, "metrics endpoint listening");
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "metrics endpoint stopped");
        }
    });
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.readiness.ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else if let Some(reason) = state.readiness.storage.reason() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: storage failed ({reason}); retrying, or mount again to recover\n"),
        )
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string())
    }
}

/// Values read at scrape time: the process (RSS, CPU, fds, start time), the database file
/// size, the data dir's free space, and the kernel's count of requests waiting on this
/// connection.
#[derive(Debug)]
pub struct ScrapeCollector {
    pub db_path: PathBuf,
    pub data_dir: PathBuf,
    /// `/sys/fs/fuse/connections/N/waiting` of this mount, once known.
    pub waiting_path: Option<PathBuf>,
    pub actor: spoolfs_runtime::WeakActorHandle,
}

fn encode_gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: f64,
) -> std::fmt::Result {
    let m = enc.encode_descriptor(name, help, unit, ConstGauge::new(v).metric_type())?;
    ConstGauge::new(v).encode(m)
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        encode_gauge(
            &mut enc,
            "spoolfs_actor_queue_depth",
            "Requests waiting in the actor's queue",
            None,
            self.actor.queue_depth() as f64,
        )?;
        if let Ok(meta) = std::fs::metadata(&self.db_path) {
            encode_gauge(
                &mut enc,
                "spoolfs_db_size",
                "Size of the database file",
                Some(&Unit::Bytes),
                meta.len() as f64,
            )?;
        }
        if let Ok(v) = nix::sys::statvfs::statvfs(&self.data_dir) {
            encode_gauge(
                &mut enc,
                "spoolfs_data_dir_available",
                "Free space on the data dir's filesystem for unprivileged users (operations \
                 that need space get ENOSPC below spoolfs_space_reserve_bytes)",
                Some(&Unit::Bytes),
                v.blocks_available().saturating_mul(v.fragment_size()) as f64,
            )?;
        }
        if let Some(path) = &self.waiting_path {
            if let Some(v) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse::<f64>().ok())
            {
                encode_gauge(
                    &mut enc,
                    "spoolfs_fuse_waiting_requests",
                    "Requests the kernel has queued for this mount and not yet seen answered (fusectl `waiting`)",
                    None,
                    v,
                )?;
            }
        }
        let Ok(me) = procfs::process::Process::myself() else {
            return Ok(());
        };
        let ticks = procfs::ticks_per_second() as f64;
        if let Ok(stat) = me.stat() {
            let cpu = (stat.utime + stat.stime) as f64 / ticks;
            let c = ConstCounter::new(cpu);
            let m = enc.encode_descriptor(
                "process_cpu",
                "User and system CPU time",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?;
            c.encode(m)?;
            let rss = stat.rss.saturating_mul(procfs::page_size()) as f64;
            encode_gauge(
                &mut enc,
                "process_resident_memory",
                "Resident memory",
                Some(&Unit::Bytes),
                rss,
            )?;
            encode_gauge(
                &mut enc,
                "process_virtual_memory",
                "Virtual memory",
                Some(&Unit::Bytes),
                stat.vsize as f64,
            )?;
            if let Ok(boot) = procfs::boot_time_secs() {
                let start = boot as f64 + stat.starttime as f64 / ticks;
                encode_gauge(
                    &mut enc,
                    "process_start_time",
                    "Start time since the epoch",
                    Some(&Unit::Seconds),
                    start,
                )?;
            }
        }
        if let Ok(n) = me.fd_count() {
            encode_gauge(
                &mut enc,
                "process_open_fds",
                "Open file descriptors",
                None,
                n as f64,
            )?;
        }
        if let Ok(limits) = me.limits() {
            if let procfs::process::LimitValue::Value(v) = limits.max_open_files.soft_limit {
                encode_gauge(
                    &mut enc,
                    "process_max_fds",
                    "Most file descriptors allowed",
                    None,
                    v as f64,
                )?;
            }
        }
        Ok(())
    }
}
