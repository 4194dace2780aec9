//! The simulator's scripted Sybil attacker (see `attack::sybil`): a host
//! outside the mesh whose identities gossip poisoned records every round
//! and, with `hijack`, vote for and offer a poisoned anchor.

use meshtrain_gossip::libp2p::PeerId;
use meshtrain_gossip::{FetchRequest, FetchResponse, GossipMessage};
use meshtrain_ledger::{AuthorKey, PayloadHash, RunId, WeightsHash};
use meshtrain_model::CodecSpec;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::SimConfig;
use crate::attack::sybil::{Poisoned, Sybils};
use crate::core::members;
use crate::replay::ModelShape;
use crate::runspec::RunSpec;

pub struct SimSybils {
    pub host_peer: PeerId,
    pub inner: Sybils,
    genesis_hash: WeightsHash,
    params: usize,
}

impl SimSybils {
    pub fn new(cfg: &SimConfig, spec: &RunSpec, shape: &ModelShape, rng: &mut ChaCha8Rng) -> Self {
        let mut key = || {
            let mut k = [0u8; 32];
            rng.fill(&mut k[..]);
            AuthorKey::from_secret(k)
        };
        let host = key();
        let identities: Vec<AuthorKey> = (0..cfg.sybils.max(1)).map(|_| key()).collect();
        let run_spec = spec.canonical_bytes();
        let run_id = RunId::of_spec(&run_spec);
        let genesis_hash = WeightsHash::of_f32(&shape.genesis);
        let meta = meshtrain_ledger::RunMeta {
            run_id,
            owner: host.author(),
            genesis_weights: genesis_hash,
            run_spec,
        };
        let poisoned = cfg.hijack.then(|| Poisoned::from(&shape.genesis));
        Self {
            host_peer: members::peer_of(&host.author()).expect("an ed25519 key is a peer id"),
            inner: Sybils::new(
                host,
                identities,
                run_id,
                meta.genesis_link(),
                CodecSpec::Dense,
                poisoned,
            ),
            genesis_hash,
            params: shape.genesis.len(),
        }
    }

    /// What every identity gossips for `round` (inline, claiming the
    /// genesis as base unless hijacking).
    pub fn round(&mut self, round: u64) -> Vec<GossipMessage> {
        let base = (self.genesis_hash, WeightsHash::of_f32(&[]));
        let params = self.params;
        self.inner.round(round, base, usize::MAX, |i| {
            vec![5.0 + i as f32 * 1e-3 + round as f32 * 1e-6; params]
        })
    }

    /// Answers a request, the attacker's way: its payloads, and its
    /// poisoned anchor claimed a few rounds ahead of `round`.
    pub fn answer(&self, request: &FetchRequest, round: u64) -> FetchResponse {
        match request {
            FetchRequest::Payload { hash } => match self.inner.payload(&PayloadHash(*hash)) {
                Some(p) => FetchResponse::Payload(p.clone()),
                None => FetchResponse::NotFound,
            },
            FetchRequest::Anchor { .. } => self
                .inner
                .anchor_offer(round, self.genesis_hash, None)
                .unwrap_or(FetchResponse::NotFound),
            _ => FetchResponse::NotFound,
        }
    }
}
