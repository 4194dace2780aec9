//! Prometheus metrics of a node (`node run --metrics ADDR` serves them at
//! `/metrics`), next to libp2p's own (`libp2p-metrics`) in one registry.
//!
//! The handles are cheap atomic clones: the event loop, the inbox thread and
//! the HTTP thread each hold their own and never wait on each other, except
//! for the registry lock while a scrape encodes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshtrain_report::{StageTime, STAGES};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// merged, clipped or rejected.
    pub outcome: String,
    /// The reject reason (empty unless rejected).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    /// accepted, ignored or invalid.
    pub outcome: String,
    /// Why it was ignored or invalid (empty when accepted).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// One of `meshtrain_report::STAGES`.
    pub stage: String,
}

type FGauge = Gauge<f64, AtomicU64>;

#[derive(Clone)]
pub struct NodeMetrics {
    pub round: Gauge,
    pub test_loss: FGauge,
    pub test_acc: FGauge,
    pub train_loss: FGauge,
    pub updates_received: Counter,
    /// Bad answers to this node's fetches (records not asked for, bytes
    /// that are not the payload, corrupt blocks).
    pub fetch_faults: Counter,
    pub updates: Family<OutcomeLabels, Counter>,
    pub messages: Family<MessageLabels, Counter>,
    pub bytes_in: Gauge,
    pub bytes_out: Gauge,
    pub peers: Gauge,
    pub ledger_records: Gauge,
    pub ledger_bytes: Gauge,
    /// Seconds per stage of a round; `train` is the whole local-step run.
    pub stage_seconds: Family<StageLabels, Histogram>,
    /// The same, summed for results.json (a histogram's sum and count are
    /// not readable back through prometheus-client).
    stage_totals: Arc<Mutex<BTreeMap<String, StageTime>>>,
    cpu_seconds: FGauge,
    rss_bytes: Gauge,
}

impl NodeMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            round: Gauge::default(),
            test_loss: FGauge::default(),
            test_acc: FGauge::default(),
            train_loss: FGauge::default(),
            updates_received: Counter::default(),
            fetch_faults: Counter::default(),
            updates: Family::default(),
            messages: Family::default(),
            bytes_in: Gauge::default(),
            bytes_out: Gauge::default(),
            peers: Gauge::default(),
            ledger_records: Gauge::default(),
            ledger_bytes: Gauge::default(),
            stage_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 20))),
            stage_totals: Arc::default(),
            cpu_seconds: FGauge::default(),
            rss_bytes: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("meshtrain");
        r.register("round", "The round this node is in", m.round.clone());
        r.register(
            "test_loss",
            "Test loss of the anchor at the last evaluation",
            m.test_loss.clone(),
        );
        r.register(
            "test_accuracy",
            "Test accuracy of the anchor at the last evaluation",
            m.test_acc.clone(),
        );
        r.register(
            "train_loss",
            "Mean training loss of the last local round",
            m.train_loss.clone(),
        );
        r.register(
            "updates_received",
            "Peer update records received",
            m.updates_received.clone(),
        );
        r.register(
            "fetch_faults",
            "Bad answers peers gave to this node's fetches",
            m.fetch_faults.clone(),
        );
        r.register("updates", "Peer updates by what became of them", m.updates.clone());
        r.register(
            "messages",
            "Messages from peers by outcome (accepted, ignored, invalid) and reason",
            m.messages.clone(),
        );
        r.register("bytes_in", "Bytes received on all connections", m.bytes_in.clone());
        r.register("bytes_out", "Bytes sent on all connections", m.bytes_out.clone());
        r.register("peers", "Connected members of the run", m.peers.clone());
        r.register(
            "ledger_records",
            "Update records in the ledger",
            m.ledger_records.clone(),
        );
        r.register("ledger_bytes", "Size of the ledger on disk", m.ledger_bytes.clone());
        r.register("stage_seconds", "Time per round stage", m.stage_seconds.clone());
        r.register(
            "process_cpu_seconds",
            "CPU time used by the process (user + system)",
            m.cpu_seconds.clone(),
        );
        r.register(
            "process_resident_bytes",
            "Resident set size of the process",
            m.rss_bytes.clone(),
        );
        m
    }

    pub fn stage(&self, stage: &str, took: Duration) {
        debug_assert!(STAGES.contains(&stage), "unknown stage {stage}");
        self.stage_seconds
            .get_or_create(&StageLabels {
                stage: stage.to_string(),
            })
            .observe(took.as_secs_f64());
        if let Ok(mut totals) = self.stage_totals.lock() {
            totals
                .entry(stage.to_string())
                .or_default()
                .add(took.as_secs_f64() * 1e3);
        }
    }

    /// Every stage's count, total and maximum so far.
    pub fn stage_totals(&self) -> BTreeMap<String, StageTime> {
        self.stage_totals.lock().map(|t| t.clone()).unwrap_or_default()
    }

    pub fn outcome(&self, outcome: &str, reason: &str) {
        self.updates
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn message(&self, outcome: &str, reason: &str) {
        self.messages
            .get_or_create(&MessageLabels {
                outcome: outcome.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Reads the process's CPU time and RSS (at scrape time).
    fn sample_process(&self) {
        // SAFETY: getrusage only writes the struct we hand it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            self.cpu_seconds.set(secs(usage.ru_utime) + secs(usage.ru_stime));
        }
        if let Some(rss) = resident_bytes() {
            self.rss_bytes.set(rss as i64);
        }
    }
}

/// Bytes of the files under DIR (the ledger's RocksDB files).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// VmRSS from /proc/self/status.
fn resident_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Serves `GET /metrics` on ADDR from its own thread until the process ends.
/// Returns the address actually bound (ADDR may ask for port 0).
pub fn serve(
    addr: SocketAddr,
    registry: Arc<Mutex<Registry>>,
    metrics: NodeMetrics,
    ledger_dir: PathBuf,
) -> std::io::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| std::io::Error::other("metrics server bound to a non-IP address"))?;
    info!(address = %bound, "serving metrics at /metrics");
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for request in server.incoming_requests() {
            let response = if request.url() == "/metrics" || request.url().starts_with("/metrics?") {
                metrics.sample_process();
                // Walking the ledger's files is a scrape's work, never the
                // event loop's.
                metrics.ledger_bytes.set(dir_bytes(&ledger_dir) as i64);
                let mut body = String::new();
                let encoded = match registry.lock() {
                    Ok(r) => encode(&mut body, &r).is_ok(),
                    Err(_) => false,
                };
                if encoded {
                    let header = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                    )
                    .ok();
                    let mut r = tiny_http::Response::from_string(body);
                    if let Some(h) = header {
                        r.add_header(h);
                    }
                    r
                } else {
                    tiny_http::Response::from_string("cannot encode the metrics\n").with_status_code(500)
                }
            } else {
                tiny_http::Response::from_string("not found: try /metrics\n").with_status_code(404)
            };
            if let Err(e) = request.respond(response) {
                warn!(error = %e, "metrics response failed");
            }
        }
    })?;
    Ok(bound)
}
