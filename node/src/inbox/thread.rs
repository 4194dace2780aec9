//! The inbox on its own thread over the node's RocksDB ledger: the event
//! loop never waits on a signature check or an fsync.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use meshtrain_ledger::Ledger;
use tokio::sync::mpsc;

use super::{Done, Inbox, InboxConfig, Job};
use crate::metrics::NodeMetrics;

/// Jobs from peers waiting in the queue at most, and their bytes: past
/// either, the event loop refuses more (gossip is settled as ignored,
/// fetched data dropped, payloads asked again later) instead of queueing
/// without bound. The node's own jobs always queue.
pub const BACKLOG_JOBS: usize = 1024;
pub const BACKLOG_BYTES: usize = 64 << 20;

/// What peers' jobs occupy in the queue; the event loop adds, the inbox
/// thread takes away once a job is done.
#[derive(Debug, Default)]
pub struct Backlog {
    jobs: AtomicUsize,
    bytes: AtomicUsize,
}

impl Backlog {
    /// Counts a peer's job in, unless the queue is full.
    pub fn admit(&self, bytes: usize) -> bool {
        // One thread adds: no other admit races between the load and the add.
        if self.jobs.load(Ordering::Acquire) >= BACKLOG_JOBS
            || self.bytes.load(Ordering::Acquire).saturating_add(bytes) > BACKLOG_BYTES
        {
            return false;
        }
        self.jobs.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        true
    }

    fn done(&self, bytes: usize) {
        self.jobs.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Peers' jobs queued, and their bytes.
    pub fn len(&self) -> (usize, usize) {
        (self.jobs.load(Ordering::Acquire), self.bytes.load(Ordering::Acquire))
    }
}

/// The inbox's ends: jobs in, results out, and the thread to join at exit
/// (it holds the ledger, which must close before the process ends).
pub struct InboxHandle {
    pub jobs: std::sync::mpsc::Sender<Job>,
    /// Peers' jobs in `jobs`; see [`Backlog`].
    pub backlog: Arc<Backlog>,
    pub done: mpsc::UnboundedReceiver<Done>,
    pub thread: std::thread::JoinHandle<()>,
}

pub fn spawn(
    ledger: Arc<Ledger>,
    cfg: InboxConfig,
    metrics: Option<NodeMetrics>,
) -> Result<InboxHandle, crate::NodeError> {
    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let mut inbox = Inbox::new(ledger, cfg);
    let backlog = Arc::new(Backlog::default());
    let counted = backlog.clone();
    let thread = std::thread::Builder::new()
        .name("inbox".into())
        .spawn(move || {
            while let Ok(job) = job_rx.recv() {
                // Checking what peers sent (storing it included) is
                // `verify`; signing and storing our own record, and storing
                // our verdict block, are stages of their own.
                let stage = match job {
                    Job::Record { .. }
                    | Job::Payload { .. }
                    | Job::Proof { .. }
                    | Job::Rebuild { .. }
                    | Job::Vote { .. } => Some("verify"),
                    Job::Own { .. } => Some("sign_store"),
                    Job::Verdict(_) => Some("verdict_store"),
                    Job::Join { .. } | Job::Ban(_) | Job::Prune { .. } => None,
                };
                let started = std::time::Instant::now();
                let from_peer = job.from_peer_bytes();
                let results = inbox.handle(job);
                if let Some(bytes) = from_peer {
                    counted.done(bytes);
                }
                if let (Some(stage), Some(m)) = (stage, metrics.as_ref()) {
                    m.stage(stage, started.elapsed());
                }
                for done in results {
                    if out_tx.send(done).is_err() {
                        return;
                    }
                }
            }
        })
        .map_err(|source| crate::NodeError::Thread { name: "inbox", source })?;
    Ok(InboxHandle {
        jobs: job_tx,
        backlog,
        done: out_rx,
        thread,
    })
}
