//! The inbox on its own thread over the node's RocksDB ledger: the event
//! loop never waits on a signature check or an fsync.

use std::sync::Arc;

use meshtrain_ledger::Ledger;
use tokio::sync::mpsc;

use super::{Done, Inbox, InboxConfig, Job};
use crate::metrics::NodeMetrics;

/// The inbox's ends: jobs in, results out, and the thread to join at exit
/// (it holds the ledger, which must close before the process ends).
pub struct InboxHandle {
    pub jobs: std::sync::mpsc::Sender<Job>,
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
                    Job::Join { .. } | Job::Ban(_) => None,
                };
                let started = std::time::Instant::now();
                let results = inbox.handle(job);
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
        done: out_rx,
        thread,
    })
}
