//! One attacker with many identities (Sybils), scripted: every round each
//! identity signs a record with a poisoned payload and gossips it, and with
//! `hijack` every record claims a poisoned anchor as its base (a vote for
//! it) while the attacker offers that anchor, self-attested, to whoever
//! asks where the mesh is, claiming to be rounds ahead. An honest node must
//! never take that anchor, whatever the number of identities.

use std::collections::HashMap;
use std::sync::Arc;

use meshtrain_gossip::libp2p::PeerId;
use meshtrain_gossip::{FetchRequest, FetchResponse, GossipMessage};
use meshtrain_ledger::{
    AuthorKey, PayloadHash, RecordHash, RunId, Seq, UpdateRecord, VerdictBlock, VerdictHash, WeightsHash,
    RECORD_VERSION, VERDICT_VERSION,
};
use meshtrain_model::{codec, CodecSpec};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::SimConfig;
use crate::core::agreement::AnchorKey;
use crate::core::members;
use crate::replay::ModelShape;
use crate::runspec::RunSpec;

struct Identity {
    key: AuthorKey,
    head: Option<(Seq, RecordHash)>,
}

pub struct Sybils {
    host: AuthorKey,
    pub host_peer: PeerId,
    identities: Vec<Identity>,
    run_id: RunId,
    genesis_link: RecordHash,
    genesis_hash: WeightsHash,
    /// The anchor the hijack pushes, and what votes name it by.
    pub poisoned: Option<(Arc<Vec<f32>>, Vec<f32>, AnchorKey)>,
    payloads: HashMap<PayloadHash, Vec<u8>>,
    params: usize,
}

impl Sybils {
    pub fn new(cfg: &SimConfig, spec: &RunSpec, shape: &ModelShape, rng: &mut ChaCha8Rng) -> Self {
        let mut key = || {
            let mut k = [0u8; 32];
            rng.fill(&mut k[..]);
            AuthorKey::from_secret(k)
        };
        let host = key();
        let identities = (0..cfg.sybils.max(1))
            .map(|_| Identity { key: key(), head: None })
            .collect();
        let run_spec = spec.canonical_bytes();
        let run_id = RunId::of_spec(&run_spec);
        let genesis_hash = WeightsHash::of_f32(&shape.genesis);
        let meta = meshtrain_ledger::RunMeta {
            run_id,
            owner: host.author(),
            genesis_weights: genesis_hash,
            run_spec,
        };
        let poisoned = cfg.hijack.then(|| {
            let weights: Vec<f32> = shape.genesis.iter().map(|w| w + 50.0).collect();
            let velocity = vec![0.0f32; shape.genesis.len()];
            let key = (WeightsHash::of_f32(&weights), WeightsHash::of_f32(&velocity));
            (Arc::new(weights), velocity, key)
        });
        Self {
            host_peer: members::peer_of(&host.author()).expect("an ed25519 key is a peer id"),
            host,
            identities,
            run_id,
            genesis_link: meta.genesis_link(),
            genesis_hash,
            poisoned,
            payloads: HashMap::new(),
            params: shape.genesis.len(),
        }
    }

    /// What every identity gossips for `round`.
    pub fn round(&mut self, round: u64) -> Vec<GossipMessage> {
        let base = self
            .poisoned
            .as_ref()
            .map_or((self.genesis_hash, WeightsHash::of_f32(&[])), |p| p.2);
        let mut out = Vec::new();
        for (i, id) in self.identities.iter_mut().enumerate() {
            let delta = vec![5.0 + i as f32 * 1e-3 + round as f32 * 1e-6; self.params];
            let payload = codec::encode(CodecSpec::Dense, &delta);
            let (seq, prev) = match id.head {
                None => (Seq(0), self.genesis_link),
                Some((s, h)) => (s.next(), h),
            };
            let signed = UpdateRecord {
                version: RECORD_VERSION,
                run_id: self.run_id,
                author: id.key.author(),
                seq,
                prev,
                round,
                base_hash: base.0,
                base_outer: base.1,
                payload_hash: PayloadHash::of(&payload),
                payload_len: payload.len() as u64,
                n_samples: 64,
                train_loss: 0.1,
            }
            .sign(&id.key);
            id.head = Some((seq, signed.hash()));
            self.payloads.insert(PayloadHash::of(&payload), payload.clone());
            out.push(GossipMessage::Update {
                record: signed.to_bytes(),
                payload: Some(payload),
            });
        }
        out
    }

    /// Answers a request, the attacker's way: its poisoned anchor, attested
    /// by itself, claimed a few rounds ahead of `round`.
    pub fn answer(&self, request: &FetchRequest, round: u64) -> FetchResponse {
        match request {
            FetchRequest::Payload { hash } => match self.payloads.get(&PayloadHash(*hash)) {
                Some(p) => FetchResponse::Payload(p.clone()),
                None => FetchResponse::NotFound,
            },
            FetchRequest::Anchor { .. } => {
                let Some((weights, velocity, key)) = &self.poisoned else {
                    return FetchResponse::NotFound;
                };
                let starts = round + 3;
                let block = VerdictBlock {
                    version: VERDICT_VERSION,
                    run_id: self.run_id,
                    owner: self.host.author(),
                    seq: 0,
                    prev: VerdictHash::genesis(&self.run_id, &self.host.author()),
                    round: starts - 1,
                    base_anchor: self.genesis_hash,
                    new_anchor: key.0,
                    outer_state: key.1,
                    entries: Vec::new(),
                }
                .sign(&self.host);
                FetchResponse::Anchor {
                    round: starts,
                    weights: codec::encode(CodecSpec::Dense, weights),
                    outer: codec::encode(CodecSpec::Dense, velocity),
                    verdict: block.to_bytes(),
                }
            }
            _ => FetchResponse::NotFound,
        }
    }
}
