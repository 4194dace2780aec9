//! The node's data phase and block maintenance: get the manifest, compute
//! the placement, fetch the blocks this node holds (and the test split) from
//! peers by hash, then start training on the primary blocks. Later, when
//! members come or go, re-plan and re-replicate in the background.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshtrain_gossip::libp2p::PeerId;
use meshtrain_gossip::FetchRequest;
use meshtrain_ledger::AuthorId;
use meshtrain_model::{BlockStream, Manifest};
use tracing::{info, warn};

use super::{Node, Phase, RequestFor};
use crate::shard::{candidates, test_set, BlockWant, ShardPlan, StoreReader};
use crate::trainer;
use crate::NodeError;

/// Block requests in flight at once.
const MAX_BLOCK_REQUESTS: usize = 8;
/// How long a node with blocks still missing waits for any member to appear.
const FETCH_ALONE_LIMIT: Duration = Duration::from_secs(30);
/// Blocks held in memory by the training stream.
const STREAM_WINDOW: usize = 4;

impl Node {
    fn member_peers(&self) -> BTreeMap<AuthorId, PeerId> {
        self.members.iter().map(|(p, a)| (*a, *p)).collect()
    }

    /// Gathering is over: make sure the shard is here, then train.
    pub(super) fn begin_data_phase(&mut self) {
        self.set_phase(Phase::Fetching);
        self.fetch.started = Some(Instant::now());
        match &self.manifest {
            Some(_) => self.replan(),
            None => {
                info!(dataset = %&self.spec.data.manifest[..8], "fetching the manifest from peers");
                let id = self.spec.data.manifest.clone();
                self.want_block(id);
            }
        }
    }

    fn want_block(&mut self, hash: String) {
        if self.block_wants.contains_key(&hash) {
            return;
        }
        let peers = self.member_peers();
        let candidates = candidates(&hash, self.plan.as_ref(), &peers);
        self.block_wants.insert(
            hash,
            BlockWant {
                candidates,
                attempts: 0,
                in_flight: false,
                retry_at: None,
            },
        );
    }

    pub(super) fn schedule_replan(&mut self) {
        if self.manifest.is_some() && self.phase != Phase::Gathering {
            self.replan_at = Some(Instant::now() + Duration::from_secs(1));
        }
    }

    /// Computes the placement over the current members and queues what is
    /// missing. Called at the start and after membership changes.
    pub(super) fn replan(&mut self) {
        let Some(manifest) = self.manifest.clone() else { return };
        let others: Vec<AuthorId> = self
            .members
            .values()
            .filter(|a| !self.banned.contains(a))
            .copied()
            .collect();
        let plan = ShardPlan::compute(
            &manifest,
            self.me,
            &others,
            self.spec.data.replication,
            self.spec.partition(),
            self.spec.seed,
        );
        let changed_primary = self.plan.as_ref().map(|p| p.primary != plan.primary);
        let needed = plan.needed(&manifest);
        self.plan = Some(plan);
        // Reading each needed block checks its hash: a corrupted local copy
        // is removed here and fetched again.
        let missing: Vec<String> = needed
            .into_iter()
            .filter(|h| !matches!(self.store.block(h), Ok(Some(_))))
            .collect();
        if !missing.is_empty() {
            info!(
                blocks = missing.len(),
                members = others.len() + 1,
                "fetching blocks for this node's shard"
            );
            match &self.fetch.bar {
                Some(bar) => bar.inc_length(missing.len() as u64),
                None => {
                    let bar = indicatif::ProgressBar::new(missing.len() as u64).with_style(
                        indicatif::ProgressStyle::with_template(
                            "{spinner} fetching blocks {pos}/{len} {wide_bar} {per_sec}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    self.fetch.bar = Some(bar);
                }
            }
        }
        for h in missing {
            self.want_block(h);
        }
        if changed_primary == Some(true) && self.trainer.is_some() {
            info!(
                round = self.round(),
                "membership changed: this node's primary blocks changed"
            );
            if let Err(e) = self.swap_training_source() {
                warn!(error = %e, "cannot switch the training shard");
            }
        }
        if self.phase == Phase::Fetching && self.block_wants.is_empty() {
            if let Err(e) = self.data_ready() {
                warn!(error = %e, "cannot start training");
            }
        }
    }

    /// Sends out block requests and retries; finishes the data phase when
    /// nothing is missing.
    pub(super) fn fetch_tick(&mut self, now: Instant) -> Result<(), NodeError> {
        let in_flight = self.block_wants.values().filter(|w| w.in_flight).count();
        let ready: Vec<String> = self
            .block_wants
            .iter()
            .filter(|(_, w)| !w.in_flight && w.retry_at.is_none_or(|t| now >= t))
            .map(|(h, _)| h.clone())
            .take(MAX_BLOCK_REQUESTS.saturating_sub(in_flight))
            .collect();
        let peers = self.member_peers();
        if self.phase == Phase::Fetching && !self.block_wants.is_empty() {
            let alone = *self.fetch.alone_since.get_or_insert(now);
            if !peers.is_empty() {
                self.fetch.alone_since = None;
            } else if now.duration_since(alone) > FETCH_ALONE_LIMIT {
                // Nobody to fetch from (the mesh may have finished): fail
                // clearly rather than wait forever.
                return Err(NodeError::Data(format!(
                    "{} blocks of this node's data are missing and no member has been reachable for {} s to fetch them from",
                    self.block_wants.len(),
                    FETCH_ALONE_LIMIT.as_secs()
                )));
            }
        }
        for hash in ready {
            let plan = self.plan.as_ref();
            let Some(w) = self.block_wants.get_mut(&hash) else {
                continue;
            };
            if w.candidates.is_empty() {
                w.candidates = candidates(&hash, plan, &peers);
            }
            let Some(peer) = w.candidates.pop_front() else {
                w.retry_at = Some(now + Duration::from_secs(1));
                continue;
            };
            let Ok(raw) = hex::decode(&hash) else { continue };
            let Ok(raw) = <[u8; 32]>::try_from(raw) else { continue };
            w.attempts += 1;
            w.in_flight = true;
            let id = self
                .swarm
                .behaviour_mut()
                .fetch
                .send_request(&peer, FetchRequest::Block { hash: raw });
            self.requests.insert(id, RequestFor::Block(hash));
        }
        if self.phase == Phase::Fetching && self.block_wants.is_empty() && self.manifest.is_some() {
            self.data_ready()?;
        }
        Ok(())
    }

    pub(super) fn block_attempt_failed(&mut self, hash: &str) {
        if let Some(w) = self.block_wants.get_mut(hash) {
            w.in_flight = false;
            if w.candidates.is_empty() {
                // Everyone was asked: wait a little, peers may still be
                // fetching it themselves.
                w.retry_at = Some(Instant::now() + Duration::from_millis(500));
            }
        }
    }

    pub(super) fn on_block(&mut self, hash: String, peer: PeerId, bytes: Vec<u8>) {
        if hash == self.spec.data.manifest && self.manifest.is_none() {
            match Manifest::from_bytes(&bytes, "peer manifest") {
                Ok(m) if m.id() == hash => {
                    if let Err(e) = self.store.put_manifest(&m) {
                        warn!(error = %e, "cannot store the manifest");
                    }
                    info!(dataset = %m.name, blocks = m.splits.values().map(Vec::len).sum::<usize>(), "got the manifest");
                    self.block_wants.remove(&hash);
                    self.manifest = Some(m);
                    self.replan();
                }
                _ => {
                    warn!(peer = %super::short_peer(&peer), "peer sent a manifest that does not match the run's dataset id");
                    self.block_attempt_failed(&hash);
                }
            }
            return;
        }
        match self.store.put_block(&hash, &bytes) {
            Ok(()) => {
                self.block_wants.remove(&hash);
                self.fetch.blocks += 1;
                self.fetch.bytes += bytes.len() as u64;
                let left = self.block_wants.len();
                if let Some(bar) = &self.fetch.bar {
                    bar.inc(1);
                    if left == 0 {
                        bar.finish_and_clear();
                    }
                }
                if left == 0 {
                    self.fetch.bar = None;
                }
                if left % 10 == 0 || left < 3 {
                    info!(blocks_fetched = self.fetch.blocks, left, "fetching blocks");
                }
            }
            Err(e) => {
                warn!(peer = %super::short_peer(&peer), error = %e, "peer sent a bad block");
                self.block_attempt_failed(&hash);
            }
        }
    }

    /// A local block turned out missing or corrupt: fetch it again.
    pub(super) fn refetch(&mut self, hash: String) {
        self.want_block(hash);
    }

    fn training_source(&self) -> Result<Box<dyn meshtrain_model::RecordSource>, NodeError> {
        let manifest = self
            .manifest
            .as_ref()
            .ok_or_else(|| NodeError::Data("no manifest".into()))?;
        let plan = self
            .plan
            .as_ref()
            .ok_or_else(|| NodeError::Data("no placement".into()))?;
        let reader = StoreReader::new(self.store.clone(), manifest, &plan.primary, self.missing_tx.clone());
        // Mix in the next seq: a restarted node must not replay the batches
        // (and so the payload bytes) of its previous life.
        let next_seq = self.own_head.map_or(0, |h| h.seq.0 + 1);
        let seed = self.shard_seed ^ next_seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Ok(Box::new(BlockStream::new(
            manifest.schema.clone(),
            reader,
            STREAM_WINDOW,
            seed,
        )?))
    }

    fn swap_training_source(&mut self) -> Result<(), NodeError> {
        let source = self.training_source()?;
        self.trainer_cmd(crate::trainer::TrainerCmd::SetSource(source))
    }

    /// Everything is here: start the trainer on the primary blocks.
    fn data_ready(&mut self) -> Result<(), NodeError> {
        let Some((net, cfg, encoder)) = self.pending_trainer.take() else {
            return Ok(());
        };
        let manifest = self
            .manifest
            .clone()
            .ok_or_else(|| NodeError::Data("no manifest".into()))?;
        let plan = self
            .plan
            .clone()
            .ok_or_else(|| NodeError::Data("no placement".into()))?;
        let test = test_set(&self.store, &manifest)?;
        let source = self.training_source()?;
        self.fetch.finished_ms = self.fetch.started.map(|t| t.elapsed().as_millis() as u64);
        info!(
            primary_blocks = plan.primary.len(),
            held_blocks = plan.held.len(),
            records = source.len(),
            fetched_blocks = self.fetch.blocks,
            fetched_bytes = self.fetch.bytes,
            ms = self.fetch.finished_ms.unwrap_or(0),
            "shard ready; starting round 0"
        );
        self.trainer = Some(trainer::spawn(net, source, test, cfg, encoder, self.attack)?);
        if let Some(cp) = self.restored.take() {
            self.trainer_cmd(crate::trainer::TrainerCmd::Restore {
                residual: cp.residual,
                adam: cp.adam,
            })?;
        }
        // Where is the mesh? A late joiner or a restarted node adopts the
        // current anchor before its first round.
        if self.members.is_empty() {
            return self.next_round_or_finish();
        }
        self.set_phase(Phase::Syncing);
        self.start_sync(super::sync::SyncReason::Start, None, None);
        if self.sync.is_none() {
            return self.next_round_or_finish();
        }
        Ok(())
    }
}
