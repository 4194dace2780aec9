//! Where a node starts: genesis, or after a restart what its ledger and its
//! last checkpoint hold. The same function serves a real restart and a
//! simulated one, so the simulator exercises the real recovery path.

use std::collections::HashMap;
use std::sync::Arc;

use meshtrain_ledger::{AuthorId, Head, SignedRecord, SignedVerdictBlock, Store, VerdictHash, WeightsHash};
use meshtrain_model::{codec, OuterConfig, OuterOptimizer};
use tracing::{info, warn};

use super::ChainPos;
use crate::replay::{replay_state, ModelShape};
use crate::{NodeError, RunSpec};

/// The anchor part of a checkpoint.
#[derive(Clone, Debug)]
pub struct SavedAnchor {
    /// The round these anchor weights start.
    pub round: u64,
    pub anchor: Vec<f32>,
    pub velocity: Vec<f32>,
}

/// Everything a core starts from.
pub struct Resume {
    pub round: u64,
    pub anchor: Vec<f32>,
    pub anchor_hash: WeightsHash,
    pub outer: OuterOptimizer,
    pub own_head: Option<Head>,
    /// Our newest record with its payload and delta: a restart publishes it
    /// again instead of signing a second record for its round.
    pub own_last: Option<(SignedRecord, Vec<u8>, Arc<Vec<f32>>)>,
    pub verdict_head: Option<(u64, VerdictHash)>,
    pub restarted: bool,
    /// The newest record held of every author.
    pub chains: HashMap<AuthorId, ChainPos>,
    /// Our last verdict block (it attests our anchor to peers that ask).
    pub attestation: Option<SignedVerdictBlock>,
    /// Our verdicts, round by round: in an open run, how voting power was
    /// earned (credited again in order, by the same rule).
    pub verdicts: Vec<(u64, Vec<meshtrain_ledger::VerdictEntry>)>,
    /// Every author's last records held (at most [`RECENT_RECORDS`] each):
    /// who came late to the last rounds is judged from them again.
    pub recent: Vec<SignedRecord>,
}

/// Records read back per author at a restart for the lateness judgement:
/// its window, the two rounds it lags, and a little more.
pub const RECENT_RECORDS: u64 = super::lateness::LATE_WINDOW as u64 + 4;

/// A fresh outer optimiser for `spec` over `shape`.
pub fn outer_for(spec: &RunSpec, shape: &ModelShape) -> OuterOptimizer {
    OuterOptimizer::new(
        OuterConfig {
            lr: spec.exchange.outer_lr,
            momentum: spec.exchange.outer_momentum,
            nesterov: spec.exchange.nesterov,
        },
        shape.genesis.len(),
        shape.buffers.clone(),
    )
}

/// Where `me` resumes from: the checkpoint if it matches the verdict chain,
/// else a replay of the ledger (payloads are kept), else genesis (peers
/// then supply the anchor).
pub fn resume<S: Store + ?Sized>(
    store: &S,
    me: AuthorId,
    saved: Option<&SavedAnchor>,
    spec: &RunSpec,
    shape: &ModelShape,
) -> Result<Resume, NodeError> {
    let params = shape.genesis.len();
    let mut outer = outer_for(spec, shape);
    let genesis_hash = WeightsHash::of_f32(&shape.genesis);
    let restarted = store.head(&me).is_some();
    let mut at = (0u64, shape.genesis.clone(), genesis_hash);
    if restarted || saved.is_some() {
        match (saved, store.verdict_head()) {
            (Some(cp), Some(h)) if WeightsHash::of_f32(&cp.anchor) == h.anchor && cp.round == h.round + 1 => {
                outer.set_velocity(cp.velocity.clone());
                at = (cp.round, cp.anchor.clone(), h.anchor);
            }
            (_, Some(h)) => match replay_state(store, shape) {
                Ok(state) if state.anchor_hash == h.anchor => {
                    outer.set_velocity(state.velocity);
                    at = (h.round + 1, state.anchor, h.anchor);
                }
                Ok(_) | Err(_) => {
                    warn!("cannot rebuild the anchor from the ledger; peers will supply it")
                }
            },
            _ => {}
        }
        info!(round = at.0, own_seq = ?store.head(&me).map(|h| h.seq.0), "restarting from the data dir");
    }
    let mut chains = HashMap::new();
    let mut recent = Vec::new();
    for (author, head) in store.heads() {
        let from = meshtrain_ledger::Seq(head.seq.0.saturating_sub(RECENT_RECORDS - 1));
        recent.extend(store.records_from(&author, from, RECENT_RECORDS as usize)?);
        if let Some(r) = store.record(&author, head.seq)? {
            chains.insert(
                author,
                ChainPos {
                    seq: head.seq.0,
                    round: r.record.round,
                },
            );
        }
    }
    let own_head = store.head(&me);
    let mut own_last = None;
    if let Some(signed) = own_head.map(|h| store.record(&me, h.seq)).transpose()?.flatten() {
        if let Some(payload) = store.payload(&signed.record.payload_hash)? {
            if let Ok(delta) = codec::decode(&payload, params) {
                own_last = Some((signed, payload, Arc::new(delta)));
            }
        }
    }
    let mut verdicts = Vec::new();
    let mut attestation = None;
    if let Some(head) = store.verdict_head() {
        for seq in 0..=head.seq {
            let Some(block) = store.verdict(seq)? else { continue };
            verdicts.push((block.block.round, block.block.entries.clone()));
            // It attests our anchor only if we resume on the anchor it names.
            attestation = (block.block.new_anchor == at.2 && block.block.round + 1 == at.0).then_some(block);
        }
    }
    Ok(Resume {
        round: at.0,
        anchor: at.1,
        anchor_hash: at.2,
        outer,
        own_head,
        own_last,
        verdict_head: store.verdict_head().map(|h| (h.seq, h.hash)),
        restarted,
        chains,
        attestation,
        verdicts,
        recent,
    })
}
