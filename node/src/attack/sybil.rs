//! One attacker with many identities (Sybils). Every round each identity
//! signs a record with a poisoned payload and gossips it; with the hijack,
//! every record claims a poisoned anchor as its base (a vote for it) while
//! the attacker offers that anchor, attested by itself, to whoever asks
//! where the mesh is, claiming to be rounds ahead. Run by a real attacking
//! node (`sybil:K`, `anchor-hijack:K`) and by the simulator's scripted
//! attacker alike: an honest node must never take that anchor, whatever
//! the number of identities.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use meshtrain_gossip::{FetchResponse, GossipMessage};
use meshtrain_ledger::{
    AuthorId, AuthorKey, PayloadHash, RecordHash, RunId, Seq, UpdateRecord, VerdictBlock, VerdictHash, WeightsHash,
    RECORD_VERSION, VERDICT_VERSION,
};
use meshtrain_model::{codec, CodecSpec};

use crate::core::agreement::AnchorKey;

/// Payloads are kept (to be fetched) for this many rounds.
const KEEP_ROUNDS: u64 = 4;

/// How far ahead of the asker's round the hijacked anchor claims to start.
const CLAIM_AHEAD: u64 = 3;

struct Identity {
    key: AuthorKey,
    head: Option<(Seq, RecordHash)>,
}

/// The anchor a hijack pushes, and what votes name it by.
pub struct Poisoned {
    pub weights: Arc<Vec<f32>>,
    pub velocity: Vec<f32>,
    pub key: AnchorKey,
}

impl Poisoned {
    /// Weights far from any honest anchor (a model that no longer works).
    pub fn from(anchor: &[f32]) -> Self {
        let weights: Vec<f32> = anchor.iter().map(|w| w + 50.0).collect();
        let velocity = vec![0.0f32; anchor.len()];
        let key = (WeightsHash::of_f32(&weights), WeightsHash::of_f32(&velocity));
        Self {
            weights: Arc::new(weights),
            velocity,
            key,
        }
    }
}

pub struct Sybils {
    /// Signs the self-attestation of the poisoned anchor.
    host: AuthorKey,
    identities: Vec<Identity>,
    run_id: RunId,
    genesis_link: RecordHash,
    codec: CodecSpec,
    pub poisoned: Option<Poisoned>,
    payloads: BTreeMap<u64, HashMap<PayloadHash, Vec<u8>>>,
    published: u64,
}

impl Sybils {
    pub fn new(
        host: AuthorKey,
        identities: Vec<AuthorKey>,
        run_id: RunId,
        genesis_link: RecordHash,
        codec: CodecSpec,
        poisoned: Option<Poisoned>,
    ) -> Self {
        Self {
            host,
            identities: identities.into_iter().map(|key| Identity { key, head: None }).collect(),
            run_id,
            genesis_link,
            codec,
            poisoned,
            payloads: BTreeMap::new(),
            published: 0,
        }
    }

    /// A real attacker's host key and `count` identities, derived from its
    /// own key so that a restart signs on along the same chains' keys.
    pub fn derive_keys(key: &AuthorKey, count: usize) -> (AuthorKey, Vec<AuthorKey>) {
        let derive = |i: u64| {
            let mut material = key.secret().to_vec();
            material.extend_from_slice(&i.to_le_bytes());
            AuthorKey::from_secret(blake3::derive_key("meshtrain 2026 sybil identity", &material))
        };
        let host = derive(u64::MAX);
        (host, (0..count as u64).map(derive).collect())
    }

    pub fn authors(&self) -> Vec<AuthorId> {
        self.identities.iter().map(|i| i.key.author()).collect()
    }

    /// Records signed so far, over all identities.
    pub fn published(&self) -> u64 {
        self.published
    }

    /// What every identity gossips for `round`: identity `i` sends
    /// `delta(i)`, trained (it claims) from `base`, or from the poisoned
    /// anchor in a hijack. Payloads above `max_inline` go out by hash.
    pub fn round(
        &mut self,
        round: u64,
        base: AnchorKey,
        max_inline: usize,
        delta: impl Fn(usize) -> Vec<f32>,
    ) -> Vec<GossipMessage> {
        let base = self.poisoned.as_ref().map_or(base, |p| p.key);
        let mut out = Vec::new();
        let mut kept = HashMap::new();
        for (i, id) in self.identities.iter_mut().enumerate() {
            let payload = codec::encode(self.codec, &delta(i));
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
                made_from: WeightsHash([0; 32]),
                made_outer: WeightsHash([0; 32]),
                merged: Vec::new(),
                waited: Vec::new(),
                payload_hash: PayloadHash::of(&payload),
                payload_len: payload.len() as u64,
                n_samples: 64,
                train_loss: 0.1,
            }
            .sign(&id.key);
            id.head = Some((seq, signed.hash()));
            self.published += 1;
            kept.insert(PayloadHash::of(&payload), payload.clone());
            out.push(GossipMessage::Update {
                record: signed.to_bytes(),
                payload: (payload.len() <= max_inline).then_some(payload),
            });
        }
        self.payloads.insert(round, kept);
        while self.payloads.len() as u64 > KEEP_ROUNDS {
            self.payloads.pop_first();
        }
        out
    }

    pub fn payload(&self, hash: &PayloadHash) -> Option<&Vec<u8>> {
        self.payloads.values().find_map(|m| m.get(hash))
    }

    /// The hijack's answer to "where is the mesh?": the poisoned anchor,
    /// attested by the attacker itself (a verdict block that turns `from`
    /// into it), claimed a few rounds ahead of `round`. `None` without a
    /// hijack, or when asked for other weights.
    pub fn anchor_offer(&self, round: u64, from: WeightsHash, asked: Option<WeightsHash>) -> Option<FetchResponse> {
        let p = self.poisoned.as_ref()?;
        if asked.is_some_and(|w| w != p.key.0) {
            return None;
        }
        let starts = round + CLAIM_AHEAD;
        let block = VerdictBlock {
            version: VERDICT_VERSION,
            run_id: self.run_id,
            owner: self.host.author(),
            seq: 0,
            prev: VerdictHash::genesis(&self.run_id, &self.host.author()),
            round: starts - 1,
            base_anchor: from,
            base_outer: WeightsHash([0; 32]),
            new_anchor: p.key.0,
            outer_state: p.key.1,
            entries: Vec::new(),
        }
        .sign(&self.host);
        Some(FetchResponse::Anchor {
            round: starts,
            weights: codec::encode(CodecSpec::Dense, &p.weights),
            outer: codec::encode(CodecSpec::Dense, &p.velocity),
            verdict: block.to_bytes(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sybils(poisoned: bool) -> Sybils {
        let (host, ids) = Sybils::derive_keys(&AuthorKey::from_secret([7; 32]), 3);
        let run_id = RunId([1; 32]);
        let link = RecordHash([2; 32]);
        Sybils::new(
            host,
            ids,
            run_id,
            link,
            CodecSpec::Dense,
            poisoned.then(|| Poisoned::from(&[0.0; 4])),
        )
    }

    #[test]
    fn identities_are_distinct_and_stable() {
        let key = AuthorKey::from_secret([7; 32]);
        let (h1, a) = Sybils::derive_keys(&key, 3);
        let (h2, b) = Sybils::derive_keys(&key, 3);
        assert_eq!(h1.author(), h2.author());
        let a: Vec<_> = a.iter().map(|k| k.author()).collect();
        let b: Vec<_> = b.iter().map(|k| k.author()).collect();
        assert_eq!(a, b);
        let mut all = a.clone();
        all.push(h1.author());
        all.push(key.author());
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 5);
    }

    #[test]
    fn records_chain_per_identity_and_payloads_stay_servable_for_a_few_rounds() {
        let mut s = sybils(false);
        let base = (WeightsHash([3; 32]), WeightsHash([4; 32]));
        let mut first = Vec::new();
        for round in 0..6 {
            let msgs = s.round(round, base, usize::MAX, |i| vec![(i as u64 * 10 + round) as f32; 4]);
            assert_eq!(msgs.len(), 3);
            for m in &msgs {
                let GossipMessage::Update { record, payload } = m else {
                    panic!("an update")
                };
                let r = meshtrain_ledger::SignedRecord::from_bytes(record).unwrap();
                assert!(r.verify_signature().is_ok());
                assert_eq!(r.record.seq, Seq(round));
                assert_eq!(r.record.base_hash, base.0);
                if round == 0 {
                    first.push(r.record.payload_hash);
                }
                assert!(payload.is_some());
            }
        }
        assert_eq!(s.published(), 18);
        assert!(first.iter().all(|h| s.payload(h).is_none()), "old payloads are dropped");
    }

    #[test]
    fn a_hijack_votes_for_and_offers_the_poisoned_anchor() {
        let mut s = sybils(true);
        let poisoned = s.poisoned.as_ref().unwrap().key;
        let msgs = s.round(0, (WeightsHash([3; 32]), WeightsHash([4; 32])), 0, |_| vec![1.0; 4]);
        for m in &msgs {
            let GossipMessage::Update { record, payload } = m else {
                panic!("an update")
            };
            let r = meshtrain_ledger::SignedRecord::from_bytes(record).unwrap();
            assert_eq!((r.record.base_hash, r.record.base_outer), poisoned);
            assert!(payload.is_none(), "above the inline limit");
        }
        let Some(FetchResponse::Anchor { round, .. }) = s.anchor_offer(5, WeightsHash([3; 32]), None) else {
            panic!("an anchor offer")
        };
        assert_eq!(round, 5 + CLAIM_AHEAD);
        assert!(s
            .anchor_offer(5, WeightsHash([3; 32]), Some(WeightsHash([9; 32])))
            .is_none());
        assert!(sybils(false).anchor_offer(5, WeightsHash([3; 32]), None).is_none());
    }
}
