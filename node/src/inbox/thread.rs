//! The inbox on its own thread over the node's RocksDB ledger: the event
//! loop never waits on a signature check or an fsync.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use meshtrain_gossip::libp2p::PeerId;

use meshtrain_ledger::Ledger;
use tokio::sync::mpsc;

use super::{Done, Inbox, InboxConfig, Job};
use crate::metrics::NodeMetrics;

/// Gossip jobs waiting in the queue at most, and their bytes, in all and
/// from any one forwarding peer: past either, the event loop settles the
/// message as ignored (gossipsub neither relays it nor blames the sender)
/// instead of queueing without bound, and one flooding peer cannot crowd
/// out the records and votes of the others. Answers to our own requests
/// (payloads, records) and the node's own jobs are bounded by what we ask
/// and always queue.
pub const BACKLOG_JOBS: usize = 1024;
pub const BACKLOG_BYTES: usize = 64 << 20;
pub const BACKLOG_JOBS_PER_PEER: usize = 128;
pub const BACKLOG_BYTES_PER_PEER: usize = 8 << 20;

/// What gossip jobs occupy in the queue, in all and per forwarding peer;
/// the event loop adds, the inbox thread takes away once a job is done.
#[derive(Debug, Default)]
pub struct Backlog {
    queued: Mutex<Queued>,
}

#[derive(Debug, Default)]
struct Queued {
    jobs: usize,
    bytes: usize,
    by_peer: HashMap<PeerId, (usize, usize)>,
}

impl Backlog {
    /// Counts a job forwarded by `peer` in, unless the queue (or that
    /// peer's share of it) is full.
    pub fn admit(&self, peer: PeerId, bytes: usize) -> bool {
        let Ok(mut q) = self.queued.lock() else {
            return false;
        };
        let mine = q.by_peer.get(&peer).copied().unwrap_or((0, 0));
        if q.jobs >= BACKLOG_JOBS
            || q.bytes.saturating_add(bytes) > BACKLOG_BYTES
            || mine.0 >= BACKLOG_JOBS_PER_PEER
            || mine.1.saturating_add(bytes) > BACKLOG_BYTES_PER_PEER
        {
            return false;
        }
        q.jobs += 1;
        q.bytes += bytes;
        q.by_peer.insert(peer, (mine.0 + 1, mine.1 + bytes));
        true
    }

    fn done(&self, peer: PeerId, bytes: usize) {
        let Ok(mut q) = self.queued.lock() else {
            return;
        };
        q.jobs = q.jobs.saturating_sub(1);
        q.bytes = q.bytes.saturating_sub(bytes);
        if let Some(mine) = q.by_peer.get_mut(&peer) {
            *mine = (mine.0.saturating_sub(1), mine.1.saturating_sub(bytes));
            if mine.0 == 0 {
                q.by_peer.remove(&peer);
            }
        }
    }
}

/// The inbox's ends: jobs in, results out, and the thread to join at exit
/// (it holds the ledger, which must close before the process ends).
pub struct InboxHandle {
    pub jobs: std::sync::mpsc::Sender<Job>,
    /// Gossip jobs in `jobs`; see [`Backlog`].
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
                let gossiped = job.gossiped();
                let results = inbox.handle(job);
                if let Some((peer, bytes)) = gossiped {
                    counted.done(peer, bytes);
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
