//! The data phase and block maintenance: get the manifest, compute the
//! placement over the members the core names, fetch the blocks this node
//! holds (and the test split) from peers by hash, then start the trainer on
//! the primary blocks and tell the core. Later, when members come or go,
//! re-plan and re-replicate in the background.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshtrain_gossip::libp2p::PeerId;
use meshtrain_gossip::FetchRequest;
use meshtrain_model::{BlockStream, Manifest};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{MemberPeers, Node, Outbound};
use crate::blockstore::BlockStore;
use crate::core::Input;
use crate::shard::{candidates, test_set, BlockWant, FetchStats, ShardPlan, StoreReader};
use crate::trainer;
use crate::NodeError;

/// Block requests in flight at once, at most.
const MAX_BLOCK_REQUESTS: usize = 8;
/// And at first: the window grows by one per block that arrives.
const FIRST_BLOCK_WINDOW: usize = 2;
/// Timeouts closer together than this are one congestion event.
const SHRINK_GAP: Duration = Duration::from_secs(5);
/// A block that took longer than this (a third of the request timeout)
/// means the link is full: one request fewer.
const SLOW_BLOCK: Duration = Duration::from_secs(10);

/// How many block requests may be in flight: one more per block that
/// arrives quickly, one fewer per block that took long, half when
/// requests time out. Eight 1 MiB blocks take 34 s on a 2 Mbit/s link,
/// longer than the request timeout, so a fixed eight timed out together,
/// were sent again and wasted the link (5 blocks in 94 s); one or two at a
/// time arrive in a few seconds each.
#[derive(Clone, Debug)]
pub struct FetchWindow {
    size: usize,
    last_shrink: Option<Instant>,
}

impl Default for FetchWindow {
    fn default() -> Self {
        Self {
            size: FIRST_BLOCK_WINDOW,
            last_shrink: None,
        }
    }
}

impl FetchWindow {
    pub fn size(&self) -> usize {
        self.size
    }

    /// A block arrived `took` after it was asked for.
    pub fn arrived(&mut self, took: Duration) {
        self.size = if took > SLOW_BLOCK {
            (self.size - 1).max(1)
        } else {
            (self.size + 1).min(MAX_BLOCK_REQUESTS)
        };
    }

    /// A request timed out at `now`: halve, once per burst of timeouts
    /// (every request in flight times out at about the same moment).
    pub fn timed_out(&mut self, now: Instant) {
        if self.last_shrink.is_some_and(|t| now.duration_since(t) < SHRINK_GAP) {
            return;
        }
        self.size = (self.size / 2).max(1);
        self.last_shrink = Some(now);
    }
}

/// How long a node with blocks still missing waits for any member to appear.
const FETCH_ALONE_LIMIT: Duration = Duration::from_secs(30);
/// Blocks held in memory by the training stream.
const STREAM_WINDOW: usize = 4;
/// How often block fetching looks for work while blocks are missing.
const FETCH_TICK: Duration = Duration::from_millis(100);

/// What this node holds of the dataset, and what it still fetches.
pub struct DataPhase {
    pub store: BlockStore,
    pub manifest: Option<Manifest>,
    pub plan: Option<ShardPlan>,
    wants: BTreeMap<String, BlockWant>,
    pub fetch: FetchStats,
    pub window: FetchWindow,
    missing_tx: mpsc::UnboundedSender<String>,
    pub missing_rx: mpsc::UnboundedReceiver<String>,
    /// The members the core last named (never banned ones).
    members: MemberPeers,
    shard_seed: u64,
    /// Our next record's seq at start: mixed into the batch order so that a
    /// restarted node does not replay its earlier batches.
    next_seq: u64,
    /// The core has asked for the data (gathering is over).
    begun: bool,
    /// The trainer runs: the core has been told the data is ready.
    ready: bool,
    wake: Option<Instant>,
}

impl DataPhase {
    pub fn new(store: BlockStore, manifest: Option<Manifest>, shard_seed: u64, next_seq: u64) -> Self {
        let (missing_tx, missing_rx) = mpsc::unbounded_channel();
        Self {
            store,
            manifest,
            plan: None,
            wants: BTreeMap::new(),
            fetch: FetchStats::default(),
            window: FetchWindow::default(),
            missing_tx,
            missing_rx,
            members: BTreeMap::new(),
            shard_seed,
            next_seq,
            begun: false,
            ready: false,
            wake: None,
        }
    }

    pub fn next_wake(&self) -> Option<Instant> {
        self.wake
    }

    /// Blocks still wanted after the shard was ready: re-replication of
    /// what a member that left held.
    pub fn replicating(&self) -> usize {
        if self.ready {
            self.wants.len()
        } else {
            0
        }
    }

    /// Wants `hash` (a block or the manifest) from peers.
    pub fn want_block(&mut self, hash: String) {
        if self.wants.contains_key(&hash) {
            return;
        }
        let candidates = candidates(&hash, self.plan.as_ref(), &self.members);
        self.wants.insert(
            hash,
            BlockWant {
                candidates,
                attempts: 0,
                in_flight: false,
                sent_at: None,
                retry_at: None,
                turns_failed: 0,
            },
        );
        self.wake = Some(Instant::now());
    }

    pub fn block_attempt_failed(&mut self, hash: &str) {
        if let Some(w) = self.wants.get_mut(hash) {
            w.in_flight = false;
            if w.candidates.is_empty() {
                // Everyone was asked: wait, peers may still be fetching it
                // themselves, or be refusing us over their serving budget.
                w.turns_failed = w.turns_failed.saturating_add(1);
                w.retry_at = Some(Instant::now() + turn_delay(w.turns_failed));
            }
            self.wake = Some(Instant::now());
        }
    }

    pub fn label_histogram(&self) -> Vec<u64> {
        match (&self.plan, &self.manifest) {
            (Some(p), Some(m)) => p.label_histogram(m),
            _ => Vec::new(),
        }
    }

    fn training_source(&self) -> Result<Box<dyn meshtrain_model::RecordSource>, NodeError> {
        let manifest = self.manifest.as_ref().ok_or(NodeError::NoManifest)?;
        let plan = self.plan.as_ref().ok_or(NodeError::NoManifest)?;
        if plan.primary.iter().all(|s| s.records == 0) {
            return Err(NodeError::NothingToTrain {
                members: plan.members.len(),
                records: manifest.records("train"),
            });
        }
        let reader = StoreReader::new(self.store.clone(), manifest, &plan.primary, self.missing_tx.clone());
        let seed = self.shard_seed ^ self.next_seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Ok(Box::new(BlockStream::new(
            manifest.schema.clone(),
            reader,
            STREAM_WINDOW,
            seed,
        )?))
    }
}

impl Node {
    /// Gathering is over: make sure the shard is here, then train.
    pub(super) fn begin_data_phase(&mut self, members: MemberPeers) {
        self.data.members = members;
        self.data.begun = true;
        self.data.fetch.started = Some(Instant::now());
        if self.data.manifest.is_some() {
            self.plan_blocks();
        } else {
            info!(dataset = %&self.spec.data.manifest[..8], "fetching the manifest from peers");
            let id = self.spec.data.manifest.clone();
            self.data.want_block(id);
        }
    }

    /// The run is over (since `finished`) but blocks are still being
    /// re-replicated: a member that died mid-run left its blocks one copy
    /// short, and the dataset outlives the run, so the node stays until its
    /// share is whole again, while anyone is connected to fetch from and
    /// someone may still hold what is missing, for another drain limit at
    /// most. (The re-plan after a departure is debounced by a second; in a
    /// short run it fired as the last round closed and the node left with
    /// a third of its new share missing.)
    pub(super) fn still_replicating(&mut self, finished: Instant) -> bool {
        let missing = self.data.replicating();
        if missing == 0 {
            return false;
        }
        let alone = self.swarm.connected_peers().next().is_none();
        // Every candidate asked twice over and none had it: the holders are
        // gone (two survivors that lack the same block would otherwise keep
        // each other here to the limit).
        let nobody = self.data.wants.values().all(|w| w.turns_failed >= 2);
        if alone || nobody || finished.elapsed() > self.drain_limit {
            warn!(
                blocks = missing,
                alone, nobody, "leaving before the blocks of a member that left were re-replicated"
            );
            return false;
        }
        true
    }

    /// Membership changed: re-plan the placement.
    pub(super) fn replan(&mut self, members: MemberPeers) {
        self.data.members = members;
        if self.data.begun && self.data.manifest.is_some() {
            self.plan_blocks();
        }
    }

    /// Computes the placement over the current members and queues what is
    /// missing.
    fn plan_blocks(&mut self) {
        let Some(manifest) = self.data.manifest.clone() else {
            return;
        };
        let others: Vec<_> = self.data.members.keys().copied().collect();
        let plan = ShardPlan::compute(
            &manifest,
            self.me,
            &others,
            self.spec.data.replication,
            self.spec.partition(),
            self.spec.seed,
        );
        let changed_primary = self.data.plan.as_ref().map(|p| p.primary != plan.primary);
        let needed = plan.needed(&manifest);
        self.data.plan = Some(plan);
        // Reading each needed block checks its hash: a corrupted local copy
        // is removed here and fetched again.
        let missing: Vec<String> = needed
            .into_iter()
            .filter(|h| !matches!(self.data.store.block(h), Ok(Some(_))))
            .collect();
        if !missing.is_empty() {
            info!(
                blocks = missing.len(),
                members = others.len() + 1,
                "fetching blocks for this node's shard"
            );
            match &self.data.fetch.bar {
                Some(bar) => bar.inc_length(missing.len() as u64),
                None => {
                    let bar = indicatif::ProgressBar::new(missing.len() as u64).with_style(
                        indicatif::ProgressStyle::with_template(
                            "{spinner} fetching blocks {pos}/{len} {wide_bar} {per_sec}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    self.data.fetch.bar = Some(bar);
                }
            }
        }
        for h in missing {
            self.data.want_block(h);
        }
        if changed_primary == Some(true) && self.trainer.is_some() {
            info!(
                round = self.core.round(),
                "membership changed: this node's primary blocks changed"
            );
            match self.data.training_source() {
                Ok(source) => {
                    let prior = self.label_prior();
                    self.trainer_cmd(crate::trainer::TrainerCmd::SetSource { source, prior })
                }
                Err(e) => warn!(error = %e, "cannot switch the training shard"),
            }
        }
        if !self.data.ready && self.data.wants.is_empty() {
            if let Err(e) = self.data_ready() {
                self.fatal = Some(e);
            }
        }
    }

    /// Sends out block requests and retries; finishes the data phase when
    /// nothing is missing.
    pub(super) fn fetch_tick(&mut self, now: Instant) -> Result<(), NodeError> {
        self.data.wake = None;
        if self.data.wants.is_empty() {
            return Ok(());
        }
        let in_flight = self.data.wants.values().filter(|w| w.in_flight).count();
        let ready: Vec<String> = self
            .data
            .wants
            .iter()
            .filter(|(_, w)| !w.in_flight && w.retry_at.is_none_or(|t| now >= t))
            .map(|(h, _)| h.clone())
            .take(self.data.window.size().saturating_sub(in_flight))
            .collect();
        if !self.data.ready {
            let alone = *self.data.fetch.alone_since.get_or_insert(now);
            if !self.data.members.is_empty() {
                self.data.fetch.alone_since = None;
            } else if now.duration_since(alone) > FETCH_ALONE_LIMIT {
                // Nobody to fetch from (the mesh may have finished): fail
                // clearly rather than wait forever.
                return Err(NodeError::DataUnreachable {
                    missing: self.data.wants.len(),
                    waited_s: FETCH_ALONE_LIMIT.as_secs(),
                });
            }
        }
        for hash in ready {
            let plan = self.data.plan.as_ref();
            let members = &self.data.members;
            let Some(w) = self.data.wants.get_mut(&hash) else {
                continue;
            };
            if w.candidates.is_empty() {
                w.candidates = candidates(&hash, plan, members);
            }
            let Some(peer) = w.candidates.pop_front() else {
                w.retry_at = Some(now + Duration::from_secs(1));
                continue;
            };
            let Ok(raw) = hex::decode(&hash) else {
                continue;
            };
            let Ok(raw) = <[u8; 32]>::try_from(raw) else {
                continue;
            };
            w.attempts += 1;
            w.in_flight = true;
            w.sent_at = Some(now);
            let id = self
                .swarm
                .behaviour_mut()
                .fetch
                .send_request(&peer, FetchRequest::Block { hash: raw });
            self.outbound.insert(id, Outbound::Block(hash));
        }
        if !self.data.wants.is_empty() {
            self.data.wake = Some(now + FETCH_TICK);
        }
        Ok(())
    }

    pub(super) fn on_block(&mut self, hash: String, peer: PeerId, bytes: Vec<u8>) {
        if hash == self.spec.data.manifest && self.data.manifest.is_none() {
            match Manifest::from_bytes(&bytes, "peer manifest") {
                Ok(m) if m.id() == hash => {
                    if let Err(e) = self.data.store.put_manifest(&m) {
                        warn!(error = %e, "cannot store the manifest");
                    }
                    info!(dataset = %m.name, blocks = m.splits.values().map(Vec::len).sum::<usize>(), "got the manifest");
                    self.data.wants.remove(&hash);
                    self.data.manifest = Some(m);
                    self.plan_blocks();
                }
                _ => {
                    warn!(peer = %crate::core::start::short(&peer), "peer sent a manifest that does not match the run's dataset id");
                    self.fetch_fault(peer);
                    self.data.block_attempt_failed(&hash);
                }
            }
            return;
        }
        match self.data.store.put_block(&hash, &bytes) {
            Ok(()) => {
                let took = self
                    .data
                    .wants
                    .remove(&hash)
                    .and_then(|w| w.sent_at)
                    .map(|t| t.elapsed())
                    .unwrap_or_default();
                self.data.window.arrived(took);
                self.data.fetch.blocks += 1;
                self.data.fetch.bytes += bytes.len() as u64;
                let left = self.data.wants.len();
                if let Some(bar) = &self.data.fetch.bar {
                    bar.inc(1);
                    if left == 0 {
                        bar.finish_and_clear();
                    }
                }
                if left == 0 {
                    self.data.fetch.bar = None;
                }
                if left.is_multiple_of(10) || left < 3 {
                    info!(blocks_fetched = self.data.fetch.blocks, left, "fetching blocks");
                }
                if left == 0 && !self.data.ready && self.data.manifest.is_some() {
                    if let Err(e) = self.data_ready() {
                        self.fatal = Some(e);
                    }
                }
            }
            Err(NodeError::BlockCorrupt { .. }) => {
                warn!(peer = %crate::core::start::short(&peer), block = %&hash[..hash.len().min(8)], "peer sent a block that does not match its hash");
                self.fetch_fault(peer);
                self.data.block_attempt_failed(&hash);
            }
            Err(e) => {
                // Our disk, not the peer: asking others would fail alike.
                self.fatal = Some(e);
            }
        }
    }

    /// The label counts of our primary blocks, when the run trains with
    /// logit adjustment (`train.label_prior`).
    fn label_prior(&self) -> Option<Vec<u64>> {
        self.spec.train.label_prior.then(|| self.data.label_histogram())
    }

    /// Everything is here: start the trainer on the primary blocks.
    fn data_ready(&mut self) -> Result<(), NodeError> {
        let Some((net, cfg, encoder)) = self.pending_trainer.take() else {
            return Ok(());
        };
        let manifest = self.data.manifest.clone().ok_or(NodeError::NoManifest)?;
        let plan = self.data.plan.clone().ok_or(NodeError::NoManifest)?;
        let test = test_set(&self.data.store, &manifest)?;
        let source = self.data.training_source()?;
        self.data.fetch.finished_ms = self.data.fetch.started.map(|t| t.elapsed().as_millis() as u64);
        info!(
            primary_blocks = plan.primary.len(),
            held_blocks = plan.held.len(),
            records = source.len(),
            fetched_blocks = self.data.fetch.blocks,
            fetched_bytes = self.data.fetch.bytes,
            ms = self.data.fetch.finished_ms.unwrap_or(0),
            "shard ready"
        );
        // The loss-scoring sample: drawn evenly from the held-out split,
        // alike on every node.
        let score = self.spec.exchange.score.map(|s| test.spread(s.records));
        self.trainer = Some(trainer::spawn(
            net,
            source,
            test,
            score,
            cfg,
            encoder,
            self.attack,
            self.label_prior(),
        )?);
        if let Some(cp) = self.restored.take() {
            self.trainer_cmd(crate::trainer::TrainerCmd::Restore {
                residual: cp.residual,
                adam: cp.adam,
            });
        }
        self.data.ready = true;
        self.feed(Input::DataReady);
        Ok(())
    }
}

/// The wait before asking every candidate again after `turns` turns in
/// which none delivered: 0.5 s, doubling to at most 4 s, so a block nobody
/// serves yet is not asked for twice a second for the whole run.
pub fn turn_delay(turns: u32) -> Duration {
    Duration::from_millis(500) * (1 << turns.saturating_sub(1).min(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_nobody_delivers_is_asked_for_less_often_each_turn() {
        let waits: Vec<u64> = (1..=6).map(|t| turn_delay(t).as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(turn_delay(u32::MAX), Duration::from_secs(4));
    }

    #[test]
    fn the_fetch_window_grows_per_quick_block_and_shrinks_on_slow_ones_and_timeouts() {
        let quick = Duration::from_millis(300);
        let mut w = FetchWindow::default();
        assert_eq!(w.size(), FIRST_BLOCK_WINDOW);
        for _ in 0..20 {
            w.arrived(quick);
        }
        assert_eq!(w.size(), MAX_BLOCK_REQUESTS);
        w.arrived(SLOW_BLOCK + Duration::from_secs(1));
        assert_eq!(w.size(), MAX_BLOCK_REQUESTS - 1, "a slow block: one fewer");
        w.arrived(quick);
        let t0 = Instant::now();
        // Eight requests time out together: one halving, not three.
        for i in 0..8 {
            w.timed_out(t0 + Duration::from_millis(i * 10));
        }
        assert_eq!(w.size(), MAX_BLOCK_REQUESTS / 2);
        w.timed_out(t0 + SHRINK_GAP + Duration::from_secs(1));
        w.timed_out(t0 + 3 * SHRINK_GAP);
        w.timed_out(t0 + 5 * SHRINK_GAP);
        assert_eq!(w.size(), 1, "never below one");
        w.arrived(SLOW_BLOCK * 2);
        assert_eq!(w.size(), 1, "never below one");
        w.arrived(quick);
        assert_eq!(w.size(), 2);
    }
}
