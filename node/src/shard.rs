//! A node's shard: which blocks it must hold and train on under the current
//! membership, which it still lacks, and a reader that streams its primary
//! blocks from the local store to the trainer.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use meshtrain_gossip::libp2p::PeerId;
use meshtrain_ledger::AuthorId;
use meshtrain_model::{BlockReader, Manifest, Records};
use tokio::sync::mpsc;
use tracing::warn;

use crate::blockstore::BlockStore;
use crate::placement::{Partition, Placement, Slice};
use crate::NodeError;

/// A block (or the manifest) still to fetch, and from whom.
#[derive(Debug)]
pub struct BlockWant {
    pub candidates: VecDeque<PeerId>,
    pub attempts: u32,
    pub in_flight: bool,
    /// When the request in flight went out.
    pub sent_at: Option<Instant>,
    pub retry_at: Option<Instant>,
    /// Times every candidate was asked in turn and none delivered: the
    /// wait before the next turn doubles with each (see
    /// `shell::fetching::turn_delay`).
    pub turns_failed: u32,
}

/// The train-split placement seen from one node.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    pub members: Vec<AuthorId>,
    pub placement: Placement,
    pub held: BTreeSet<String>,
    pub primary: Vec<Slice>,
}

impl ShardPlan {
    pub fn compute(
        manifest: &Manifest,
        me: AuthorId,
        others: &[AuthorId],
        replication: usize,
        partition: Partition,
        seed: u64,
    ) -> Self {
        let mut members: Vec<AuthorId> = others.to_vec();
        members.push(me);
        members.sort();
        members.dedup();
        let placement = Placement::compute(manifest, "train", &members, replication, partition, seed);
        let held = placement.held_by(&me).into_iter().collect();
        let primary = placement.primary_of(&me);
        Self {
            members,
            placement,
            held,
            primary,
        }
    }

    /// Every block this node must have locally: the train blocks it holds
    /// and all test blocks (each node evaluates on the whole test split).
    pub fn needed(&self, manifest: &Manifest) -> BTreeSet<String> {
        let mut out = self.held.clone();
        out.extend(manifest.blocks("test").iter().map(|b| b.hash.clone()));
        out
    }

    /// Records per class over the primary slices (a part of a block
    /// counts its share of the block's histogram).
    pub fn label_histogram(&self, manifest: &Manifest) -> Vec<u64> {
        let mut h = vec![0f64; manifest.schema.classes().unwrap_or(0)];
        for s in &self.primary {
            if let Some(b) = manifest.blocks("train").iter().find(|b| b.hash == s.hash) {
                let share = s.share(b.records);
                for (a, x) in h.iter_mut().zip(&b.label_histogram) {
                    *a += *x as f64 * share;
                }
            }
        }
        h.into_iter().map(|x| x.round() as u64).collect()
    }
}

/// Streams the primary slices from the local store. A block that is
/// missing or fails its hash is reported on `missing` (the node fetches it
/// again) and reads as empty for now, so training carries on with the
/// others.
pub struct StoreReader {
    store: BlockStore,
    slices: Vec<Slice>,
    record_size: usize,
    missing: mpsc::UnboundedSender<String>,
}

impl StoreReader {
    pub fn new(
        store: BlockStore,
        manifest: &Manifest,
        primary: &[Slice],
        missing: mpsc::UnboundedSender<String>,
    ) -> Self {
        let slices = primary.iter().filter(|s| s.records > 0).cloned().collect();
        Self {
            store,
            slices,
            record_size: manifest.schema.record_size(),
            missing,
        }
    }

    /// The slice's bytes within its block's (the block's hash was checked
    /// on read, and its length against the manifest when stored).
    fn cut(&self, slice: &Slice, block: Vec<u8>) -> Option<Vec<u8>> {
        let start = usize::try_from(slice.start).ok()?.checked_mul(self.record_size)?;
        let len = usize::try_from(slice.records).ok()?.checked_mul(self.record_size)?;
        let end = start.checked_add(len)?;
        if start == 0 && end == block.len() {
            return Some(block);
        }
        block.get(start..end).map(<[u8]>::to_vec)
    }
}

impl BlockReader for StoreReader {
    fn blocks(&self) -> usize {
        self.slices.len()
    }

    fn records_in(&self, block: usize) -> usize {
        usize::try_from(self.slices[block].records).unwrap_or(0)
    }

    fn read(&mut self, block: usize) -> meshtrain_model::Result<Vec<u8>> {
        let slice = &self.slices[block];
        let hash = &slice.hash;
        match self.store.block(hash) {
            Ok(Some(bytes)) => match self.cut(slice, bytes) {
                Some(bytes) => Ok(bytes),
                None => {
                    warn!(block = %&hash[..8], "a primary block is shorter than its manifest entry; fetching it again");
                    let _ = self.missing.send(hash.clone());
                    Ok(Vec::new())
                }
            },
            Ok(None) => {
                warn!(block = %&hash[..8], "a primary block is gone or corrupt; fetching it again");
                let _ = self.missing.send(hash.clone());
                Ok(Vec::new())
            }
            Err(e) => {
                warn!(block = %&hash[..8], error = %e, "cannot read a primary block");
                let _ = self.missing.send(hash.clone());
                Ok(Vec::new())
            }
        }
    }
}

/// The test split, read from the local store into memory.
pub fn test_set(store: &BlockStore, manifest: &Manifest) -> Result<Records, NodeError> {
    let mut records = Vec::new();
    for b in manifest.blocks("test") {
        let bytes = store
            .block(&b.hash)?
            .ok_or_else(|| NodeError::MissingTestBlock { hash: b.hash.clone() })?;
        manifest.verify_block(b, &bytes)?;
        records.extend_from_slice(&bytes);
    }
    Ok(Records::new(
        &format!("{}/test", manifest.name),
        manifest.schema.clone(),
        records,
    )?)
}

/// What the node fetched for its shard.
#[derive(Debug, Default, Clone)]
pub struct FetchStats {
    pub blocks: u64,
    pub bytes: u64,
    pub started: Option<Instant>,
    pub finished_ms: Option<u64>,
    /// Since when no member has been connected to fetch from.
    pub alone_since: Option<Instant>,
    /// Blocks fetched of those wanted (drawn only when stderr is a terminal).
    pub bar: Option<indicatif::ProgressBar>,
}

/// Orders candidates for a block: its holders first, then everyone else.
pub fn candidates(hash: &str, plan: Option<&ShardPlan>, members: &BTreeMap<AuthorId, PeerId>) -> VecDeque<PeerId> {
    let mut out = VecDeque::new();
    if let Some(holders) = plan.and_then(|p| p.placement.holders.get(hash)) {
        for a in holders {
            if let Some(p) = members.get(a) {
                out.push_back(*p);
            }
        }
    }
    for p in members.values() {
        if !out.contains(p) {
            out.push_back(*p);
        }
    }
    out
}
