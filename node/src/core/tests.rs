//! The core under test with its real inbox over an in-memory ledger, and
//! records signed by made-up peers: every outcome reason, gap release,
//! duplicates, closing on quorum and on deadline, and settling each gossip
//! message exactly once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use meshtrain_gossip::libp2p::gossipsub::MessageId;
use meshtrain_gossip::libp2p::PeerId;
use meshtrain_gossip::{FetchRequest, FetchResponse, GossipMessage};
use meshtrain_ledger::{
    AuthorId, AuthorKey, Batch, Head, JoinRecord, LedgerError, MemLedger, PayloadHash, RecordHash, RejectReason, RunId,
    RunMeta, Seq, SignedRecord, SignedVerdictBlock, Store, UpdateRecord, VerdictHead, WeightsHash, RECORD_VERSION,
};
use meshtrain_model::{codec, CodecSpec, StepStats};

use super::outcome::{IgnoreReason, Origin, Outcome};
use super::power::Rule;
use super::resume::resume;
use super::{members, Core, CoreConfig, Effect, Input, Timer, Trained};
use crate::inbox::{Inbox, InboxConfig};
use crate::reputation::ReputationConfig;
use crate::runspec::Admission;
use crate::sim::standin;

const PARAMS: usize = 8;
/// Keys `[1; 32]` ..= `[ROSTER; 32]` are admitted.
const ROSTER: u8 = 7;

/// An in-memory ledger on a disk that can fill: once `full`, every write
/// fails as RocksDB's does on a full disk (a local fault, not the data's).
struct Disk {
    ledger: MemLedger,
    full: AtomicBool,
}

impl Store for Disk {
    fn meta(&self) -> &RunMeta {
        self.ledger.meta()
    }
    fn head(&self, author: &AuthorId) -> Option<Head> {
        self.ledger.head(author)
    }
    fn heads(&self) -> Vec<(AuthorId, Head)> {
        self.ledger.heads()
    }
    fn record(&self, author: &AuthorId, seq: Seq) -> meshtrain_ledger::Result<Option<SignedRecord>> {
        self.ledger.record(author, seq)
    }
    fn records_from(&self, author: &AuthorId, from: Seq, limit: usize) -> meshtrain_ledger::Result<Vec<SignedRecord>> {
        self.ledger.records_from(author, from, limit)
    }
    fn has_payload(&self, hash: &PayloadHash) -> meshtrain_ledger::Result<bool> {
        self.ledger.has_payload(hash)
    }
    fn payload(&self, hash: &PayloadHash) -> meshtrain_ledger::Result<Option<Vec<u8>>> {
        self.ledger.payload(hash)
    }
    fn verdict_head(&self) -> Option<VerdictHead> {
        self.ledger.verdict_head()
    }
    fn verdict(&self, seq: u64) -> meshtrain_ledger::Result<Option<SignedVerdictBlock>> {
        self.ledger.verdict(seq)
    }
    fn joins(&self) -> meshtrain_ledger::Result<Vec<JoinRecord>> {
        self.ledger.joins()
    }
    fn has_proof_against(&self, author: &AuthorId) -> meshtrain_ledger::Result<bool> {
        self.ledger.has_proof_against(author)
    }
    fn write(&self, batch: Batch) -> meshtrain_ledger::Result<()> {
        if self.full.load(Ordering::Relaxed) {
            return Err(LedgerError::Corrupt {
                column: "records",
                key: "the next write".into(),
                detail: "No space left on device (os error 28)".into(),
            });
        }
        self.ledger.write(batch)
    }
    fn apply_retention(
        &self,
        retention: meshtrain_ledger::Retention,
        current_round: u64,
    ) -> meshtrain_ledger::Result<u64> {
        self.ledger.apply_retention(retention, current_round)
    }
}

/// One core (node A) with its inbox, and peers whose records we forge.
struct Harness {
    core: Core,
    inbox: Inbox<Disk>,
    /// What a restart builds a new core and inbox from.
    ledger: Arc<Disk>,
    cfg: CoreConfig,
    rounds: u64,
    run_id: RunId,
    genesis: RecordHash,
    anchor_hash: WeightsHash,
    outer_hash: WeightsHash,
    now: u64,
    /// Settle effects per gossip id.
    settled: HashMap<MessageId, Vec<Outcome>>,
    /// Everything but inbox jobs, in order.
    effects: Vec<Effect>,
    next_id: u64,
    /// The inbox's queue is full: peers' jobs come back as `InboxBusy`.
    busy: bool,
}

struct Peer {
    key: AuthorKey,
    peer: PeerId,
    head: Option<(Seq, RecordHash)>,
}

impl Peer {
    fn new(n: u8) -> Self {
        let key = AuthorKey::from_secret([n; 32]);
        let peer = members::peer_of(&key.author()).expect("peer id");
        Self { key, peer, head: None }
    }

    /// Signs this peer's next record for `round` over `payload`.
    fn record(&mut self, h: &Harness, round: u64, payload: &[u8]) -> SignedRecord {
        let (seq, prev) = match self.head {
            None => (Seq(0), h.genesis),
            Some((s, hash)) => (s.next(), hash),
        };
        let signed = UpdateRecord {
            version: RECORD_VERSION,
            run_id: h.run_id,
            author: self.key.author(),
            seq,
            prev,
            round,
            base_hash: h.anchor_hash,
            base_outer: h.outer_hash,
            made_from: WeightsHash([0; 32]),
            made_outer: WeightsHash([0; 32]),
            merged: Vec::new(),
            waited: Vec::new(),
            payload_hash: PayloadHash::of(payload),
            payload_len: payload.len() as u64,
            n_samples: 64,
            train_loss: 0.5,
        }
        .sign(&self.key);
        self.head = Some((seq, signed.hash()));
        signed
    }
}

fn delta(v: f32) -> Vec<u8> {
    codec::encode(CodecSpec::Dense, &[v; PARAMS])
}

impl Harness {
    fn new(wait_peers: usize) -> Self {
        Self::with_rounds(wait_peers, 20)
    }

    fn with_rounds(wait_peers: usize, rounds: u64) -> Self {
        // A roster of node A (key 1) and the peers the tests forge (2..=6).
        let members = (1..=ROSTER)
            .map(|n| AuthorKey::from_secret([n; 32]).author().to_string())
            .collect();
        let admission = Admission::Permissioned { members };
        let spec = standin::sim_spec(
            rounds,
            CodecSpec::Dense,
            meshtrain_model::AggregatorSpec::Mean,
            7,
            admission,
        );
        let shape = standin::shape(PARAMS, 7);
        let key = AuthorKey::from_secret([1; 32]);
        let meta = standin::meta(&spec, key.author(), &shape);
        let ledger = Arc::new(Disk {
            ledger: MemLedger::new(meta.clone()).expect("meta"),
            full: AtomicBool::new(false),
        });
        let resumed = resume(&*ledger, key.author(), None, &spec, &shape).expect("resume");
        assert!(!resumed.restarted);
        let cfg = CoreConfig {
            run_id: meta.run_id,
            genesis_link: meta.genesis_link(),
            genesis_weights: meta.genesis_weights,
            verdict_genesis: meta.verdict_genesis(),
            params: PARAMS,
            spec: spec.clone(),
            wait_peers,
            wait_peers_timeout: 10_000,
            drain: 1000,
            eval_every: 1,
            checkpoint_every: 0,
            reputation: ReputationConfig::default(),
            max_inline_payload: 48 * 1024,
            send_inline_payload: 48 * 1024,
            attack: None,
            seed: 7,
            admission: Rule::of(&spec.admission).expect("roster"),
        };
        let core = Core::new(cfg.clone(), key, resumed);
        let core_outer = core.anchor_key().1;
        let inbox = Self::inbox(&ledger, &cfg, rounds);
        Self {
            core,
            inbox,
            ledger,
            cfg,
            rounds,
            run_id: meta.run_id,
            genesis: meta.genesis_link(),
            anchor_hash: meta.genesis_weights,
            outer_hash: core_outer,
            now: 0,
            settled: HashMap::new(),
            effects: Vec::new(),
            next_id: 0,
            busy: false,
        }
    }

    fn inbox(ledger: &Arc<Disk>, cfg: &CoreConfig, rounds: u64) -> Inbox<Disk> {
        Inbox::new(
            ledger.clone(),
            InboxConfig {
                run_id: cfg.run_id,
                roster: cfg.spec.admission.roster().expect("roster"),
                genesis: cfg.genesis_link,
                params: PARAMS,
                rounds,
                retention: meshtrain_ledger::Retention::KEEP_ALL,
            },
        )
    }

    /// The node crashes and starts again from its ledger at `round` (as
    /// its checkpoint would say), with a new core and inbox.
    fn restart(&mut self, round: u64) {
        let key = AuthorKey::from_secret([1; 32]);
        let shape = standin::shape(PARAMS, 7);
        let mut resumed = resume(&*self.ledger, key.author(), None, &self.cfg.spec, &shape).expect("resume");
        resumed.round = round;
        resumed.restarted = true;
        self.core = Core::new(self.cfg.clone(), key, resumed);
        self.inbox = Self::inbox(&self.ledger, &self.cfg, self.rounds);
    }

    /// Feeds an input and runs the inbox jobs it causes to the end.
    fn input(&mut self, input: Input) {
        let effects = self.core.handle(input, self.now);
        self.run(effects);
    }

    /// Calls into the core directly, then runs what it emitted.
    fn poke(&mut self, f: impl FnOnce(&mut Core)) {
        f(&mut self.core);
        let effects = std::mem::take(&mut self.core.out);
        self.run(effects);
    }

    fn run(&mut self, first: Vec<Effect>) {
        let mut queue: Vec<Input> = Vec::new();
        let mut pending = Some(first);
        loop {
            let effects = match pending.take() {
                Some(e) => e,
                None => match queue.pop() {
                    Some(input) => self.core.handle(input, self.now),
                    None => return,
                },
            };
            for e in effects {
                match e {
                    Effect::Inbox(job) if self.busy && job.gossiped().is_some() => {
                        queue.insert(0, Input::InboxBusy(Box::new(job)));
                    }
                    Effect::Inbox(job) => {
                        for done in self.inbox.handle(job) {
                            queue.insert(0, Input::Checked(Box::new(done)));
                        }
                    }
                    Effect::CheckOffer { peer, response } => {
                        let result =
                            super::sync::check_offer(&self.run_id, &self.anchor_hash, PARAMS, response).map(Box::new);
                        queue.insert(0, Input::OfferChecked { peer, result });
                    }
                    Effect::Settle {
                        origin,
                        outcome,
                        update,
                    } => {
                        if let Origin::Gossip { id, .. } = &origin {
                            self.settled.entry(id.clone()).or_default().push(outcome.clone());
                        }
                        self.effects.push(Effect::Settle {
                            origin,
                            outcome,
                            update,
                        });
                    }
                    other => self.effects.push(other),
                }
            }
        }
    }

    fn gossip(&mut self, from: &Peer, record: &SignedRecord, payload: Option<Vec<u8>>) -> MessageId {
        let data = GossipMessage::Update {
            record: record.to_bytes(),
            payload,
        }
        .to_bytes();
        self.raw_gossip(from, data)
    }

    fn raw_gossip(&mut self, from: &Peer, data: Vec<u8>) -> MessageId {
        self.next_id += 1;
        let id = MessageId::new(&self.next_id.to_le_bytes());
        self.input(Input::Gossip {
            id: id.clone(),
            source: from.peer,
            data,
        });
        id
    }

    fn outcome(&self, id: &MessageId) -> Outcome {
        let all = self.settled.get(id).cloned().unwrap_or_default();
        assert_eq!(all.len(), 1, "message settled {} times: {all:?}", all.len());
        all[0].clone()
    }

    fn join(&mut self, p: &Peer) {
        self.input(Input::Connected(p.peer));
        self.input(Input::Subscribed(p.peer));
    }

    /// Starts, runs the data phase and answers the anchor sync as peers at
    /// round 0 would (with genesis); the core then trains round 0.
    fn start_training(&mut self) {
        self.input(Input::Start);
        self.data_ready();
    }

    /// The shard is here: answers the anchor sync as peers at round 0
    /// would; returns the effects after the answer (round 0 trains).
    fn data_ready(&mut self) -> Vec<Effect> {
        self.input(Input::DataReady);
        let asks = self.anchor_asks();
        let genesis = standin::shape(PARAMS, 7).genesis;
        for (req, peer) in asks {
            self.input(Input::Response {
                req,
                peer,
                response: FetchResponse::Anchor {
                    round: 0,
                    weights: codec::encode(CodecSpec::Dense, &genesis),
                    outer: codec::encode(CodecSpec::Dense, &[]),
                    verdict: Vec::new(),
                },
            });
        }
        let after = self.take();
        assert!(
            after.iter().any(|e| matches!(e, Effect::Train { round: 0, .. })),
            "round 0 starts after the sync"
        );
        after
    }

    /// Whether `peer`'s request is served (not refused).
    fn serves(&mut self, peer: PeerId, chan: u64, request: FetchRequest) -> bool {
        self.input(Input::Request {
            peer,
            chan: super::ChanId(chan),
            request,
        });
        self.take().iter().any(|e| matches!(e, Effect::Serve { .. }))
    }

    /// A node training round 0 beside two peers (keys 2 and 3), waiting
    /// for nobody.
    fn training_with_two_peers() -> (Self, Peer, Peer) {
        let mut h = Harness::new(0);
        let (b, c) = (Peer::new(2), Peer::new(3));
        h.join(&b);
        h.join(&c);
        h.start_training();
        (h, b, c)
    }

    /// What the core answers `peer`'s request right away, if anything.
    fn answer(&mut self, peer: PeerId, chan: u64, request: FetchRequest) -> Option<FetchResponse> {
        self.input(Input::Request {
            peer,
            chan: super::ChanId(chan),
            request,
        });
        self.take().into_iter().find_map(|e| match e {
            Effect::Respond { response, .. } => Some(response),
            _ => None,
        })
    }

    /// The start sync's anchor requests among the effects so far.
    fn anchor_asks(&mut self) -> Vec<(super::ReqId, PeerId)> {
        self.take()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Request {
                    req,
                    peer,
                    request: FetchRequest::Anchor { weights: None },
                } => Some((req, peer)),
                _ => None,
            })
            .collect()
    }

    /// Our own round: trained, stored, published.
    fn train_own(&mut self, round: u64) {
        let payload = delta(0.5);
        let decoded = Arc::new(codec::decode(&payload, PARAMS).expect("decodes"));
        self.input(Input::Trained(Box::new(Trained {
            round,
            eval: None,
            stats: StepStats::default(),
            payload,
            decoded,
            twin: None,
            train_ms: 1,
        })));
    }

    fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    fn aggregated(effects: &[Effect]) -> bool {
        effects.iter().any(|e| matches!(e, Effect::Aggregate(_)))
    }
}

#[test]
fn garbage_and_forged_messages_are_invalid_and_blame_the_forwarder() {
    let mut h = Harness::new(0);
    let b = Peer::new(2);
    h.join(&b);
    let id = h.raw_gossip(&b, vec![0xff; 40]);
    assert_eq!(h.outcome(&id), Outcome::Invalid(RejectReason::Malformed));

    let mut forger = Peer::new(3);
    let mut r = forger.record(&h, 0, &delta(0.1));
    r.signature.0[3] ^= 1;
    let id = h.gossip(&b, &r, Some(delta(0.1)));
    assert_eq!(h.outcome(&id), Outcome::Invalid(RejectReason::BadSignature));
    assert_eq!(h.outcome(&id).acceptance(), super::Acceptance::Reject);

    let mut other = Peer::new(4);
    let mut wrong = other.record(&h, 0, &delta(0.1)).record;
    wrong.run_id = RunId([9; 32]);
    let wrong = wrong.sign(&other.key);
    let id = h.gossip(&b, &wrong, None);
    assert_eq!(h.outcome(&id), Outcome::Invalid(RejectReason::WrongRun));

    let mut late = Peer::new(5);
    let beyond = late.record(&h, 99, &delta(0.1));
    let id = h.gossip(&b, &beyond, None);
    assert_eq!(
        h.outcome(&id),
        Outcome::Invalid(RejectReason::Malformed),
        "a round past the run's end"
    );
}

#[test]
fn bad_payloads_are_the_authors_fault() {
    let mut h = Harness::new(0);
    let mut b = Peer::new(2);
    h.join(&b);
    h.start_training();
    let mut cases: Vec<(Vec<u8>, RejectReason)> = vec![
        (vec![1, 2, 3], RejectReason::PayloadMalformed),
        (
            codec::encode(CodecSpec::Dense, &[0.1; PARAMS + 1]),
            RejectReason::WrongShape,
        ),
        (codec::encode(CodecSpec::Dense, &[0.0; PARAMS]), RejectReason::FreeRider),
        (
            {
                let mut v = vec![0.1f32; PARAMS];
                v[2] = f32::NAN;
                codec::encode(CodecSpec::Dense, &v)
            },
            RejectReason::NonFinite,
        ),
    ];
    // One offence each from fresh authors (two would ban an author).
    for (n, (payload, reason)) in cases.drain(..2).enumerate() {
        let mut a = Peer::new(5 + n as u8);
        let r = a.record(&h, 0, &payload);
        let id = h.gossip(&b, &r, Some(payload));
        assert_eq!(h.outcome(&id), Outcome::Invalid(reason));
    }
    for (round, (payload, reason)) in cases.into_iter().enumerate() {
        let r = b.record(&h, round as u64, &payload);
        let id = h.gossip(&b, &r, Some(payload));
        assert_eq!(h.outcome(&id), Outcome::Invalid(reason));
    }
    // Two protocol offences: B is banned, and its next record is ignored.
    assert!(h.core.banned().contains(&b.key.author()));
    let r = b.record(&h, 3, &delta(0.2));
    let id = h.gossip(&b, &r, Some(delta(0.2)));
    assert_eq!(h.outcome(&id), Outcome::Ignored(IgnoreReason::VoteOnly));
}

#[test]
fn duplicates_are_ignored_and_a_duplicate_carrying_the_missing_payload_settles_once() {
    let mut h = Harness::new(0);
    let mut b = Peer::new(2);
    h.join(&b);
    h.start_training();
    let payload = delta(0.3);
    let r = b.record(&h, 0, &payload);
    // The record first arrives without its payload (too big to inline, say).
    let first = h.gossip(&b, &r, None);
    assert_eq!(h.outcome(&first), Outcome::Accepted);
    let asked = h.take().iter().any(|e| {
        matches!(
            e,
            Effect::Request {
                request: FetchRequest::Payload { .. },
                ..
            }
        )
    });
    assert!(asked, "the payload is fetched by hash");
    // The same record again, now with the payload: settled under its own id.
    let second = h.gossip(&b, &r, Some(payload));
    assert_eq!(h.outcome(&second), Outcome::Accepted);
    // And once more: a plain duplicate.
    let third = h.gossip(&b, &r, None);
    assert_eq!(h.outcome(&third), Outcome::Ignored(IgnoreReason::Duplicate));
    assert_eq!(h.core.unsettled(), 0);
}

#[test]
fn a_gap_is_filled_and_released_in_order() {
    let mut h = Harness::new(0);
    let mut b = Peer::new(2);
    h.join(&b);
    h.start_training();
    let r0 = b.record(&h, 0, &delta(0.1));
    let r1 = b.record(&h, 1, &delta(0.2));
    let id1 = h.gossip(&b, &r1, Some(delta(0.2)));
    assert_eq!(h.outcome(&id1), Outcome::Accepted, "held in the gap buffer");
    let asks: Vec<_> = h
        .take()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Request {
                request: FetchRequest::Records { from_seq, .. },
                ..
            } => Some(from_seq),
            _ => None,
        })
        .collect();
    assert_eq!(asks, vec![0], "the missing records are asked for");
    let id0 = h.gossip(&b, &r0, Some(delta(0.1)));
    assert_eq!(h.outcome(&id0), Outcome::Accepted);
    let head = h.inbox.store().clone();
    assert_eq!(
        meshtrain_ledger::Store::head(&*head, &b.key.author()).map(|x| x.seq),
        Some(Seq(1))
    );
}

#[test]
fn equivocation_is_proven_gossiped_and_banned() {
    let mut h = Harness::new(0);
    let mut b = Peer::new(2);
    h.join(&b);
    h.start_training();
    let r0 = b.record(&h, 0, &delta(0.1));
    let mut twin = r0.record.clone();
    twin.payload_hash = PayloadHash::of(&delta(0.9));
    let twin = twin.sign(&b.key);
    let id = h.gossip(&b, &r0, Some(delta(0.1)));
    assert_eq!(h.outcome(&id), Outcome::Accepted);
    let id = h.gossip(&b, &twin, Some(delta(0.9)));
    assert_eq!(h.outcome(&id), Outcome::Invalid(RejectReason::Equivocation));
    assert_eq!(
        h.outcome(&id).acceptance(),
        super::Acceptance::Ignore,
        "a relay may have seen the other half first"
    );
    let effects = h.take();
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::Publish(GossipMessage::Equivocation { .. }))));
    assert!(effects.iter().any(|e| matches!(e, Effect::Ban { .. })));
    // Gossiping the proof to us again is known.
    let proof = meshtrain_ledger::EquivocationProof::new(r0, twin);
    let id = h.raw_gossip(
        &b,
        GossipMessage::Equivocation {
            proof: proof.to_bytes(),
        }
        .to_bytes(),
    );
    assert_eq!(h.outcome(&id), Outcome::Ignored(IgnoreReason::KnownProof));
}

#[test]
fn replayed_payloads_are_refused() {
    let mut h = Harness::new(0);
    let mut b = Peer::new(2);
    let mut c = Peer::new(3);
    h.join(&b);
    h.join(&c);
    h.start_training();
    let payload = delta(0.4);
    let rb = b.record(&h, 0, &payload);
    let id = h.gossip(&b, &rb, Some(payload.clone()));
    assert_eq!(h.outcome(&id), Outcome::Accepted);
    let rc = c.record(&h, 0, &payload);
    let id = h.gossip(&c, &rc, Some(payload));
    assert_eq!(h.outcome(&id), Outcome::Invalid(RejectReason::Replay));
}

#[test]
fn a_full_disk_stops_the_node_at_the_first_record_it_cannot_keep() {
    let mut h = Harness::new(0);
    let mut b = Peer::new(2);
    let mut c = Peer::new(3);
    h.join(&b);
    h.join(&c);
    h.start_training();
    let payload = delta(0.2);
    let rb = b.record(&h, 0, &payload);
    let id = h.gossip(&b, &rb, Some(payload));
    assert_eq!(h.outcome(&id), Outcome::Accepted);
    assert!(!h.take().iter().any(|e| matches!(e, Effect::Fatal(_))));

    h.inbox.store().full.store(true, Ordering::Relaxed);
    let payload = delta(0.3);
    let rc = c.record(&h, 0, &payload);
    let id = h.gossip(&c, &rc, Some(payload));
    // Not the sender's fault: nobody is blamed, and the node stops naming
    // the write it could not make.
    assert_eq!(h.outcome(&id), Outcome::Ignored(IgnoreReason::LocalFault));
    let fatal: Vec<String> = h
        .take()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Fatal(f) => Some(f.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(fatal.len(), 1, "one fatal fault: {fatal:?}");
    assert!(
        fatal[0].contains("ledger") && fatal[0].contains("No space left on device"),
        "{}",
        fatal[0]
    );
}

fn asks_for_a_payload(effects: &[Effect]) -> bool {
    effects.iter().any(|e| {
        matches!(
            e,
            Effect::Request {
                request: FetchRequest::Payload { .. },
                ..
            }
        )
    })
}

#[test]
fn a_node_still_fetching_its_shard_leaves_payloads_until_it_trains() {
    let mut h = Harness::new(1);
    let mut b = Peer::new(2);
    h.join(&b);
    h.input(Input::Start);
    assert!(
        h.take().iter().any(|e| matches!(e, Effect::BeginData { .. })),
        "the data phase begins"
    );
    // B's round-0 record comes by hash while our blocks are still coming.
    let r = b.record(&h, 0, &delta(0.2));
    let id = h.gossip(&b, &r, None);
    assert_eq!(h.outcome(&id), Outcome::Accepted);
    assert!(
        !asks_for_a_payload(&h.take()),
        "no payload fetch competes with the shard"
    );
    // Once the shard is here and round 0 starts, the held record's payload
    // is wanted.
    assert!(asks_for_a_payload(&h.data_ready()), "wanted once rounds begin");
}

#[test]
fn a_round_closes_the_moment_the_last_expected_update_arrives() {
    let mut h = Harness::new(1);
    let mut b = Peer::new(2);
    h.join(&b);
    h.start_training();
    h.train_own(0);
    assert!(!Harness::aggregated(&h.take()), "B's update is still expected");
    let r = b.record(&h, 0, &delta(0.2));
    h.gossip(&b, &r, Some(delta(0.2)));
    assert!(Harness::aggregated(&h.take()), "closed on quorum, without a timer");
}

#[test]
fn a_round_closes_at_its_deadline_without_a_silent_member() {
    let mut h = Harness::new(1);
    let b = Peer::new(2);
    h.join(&b);
    h.start_training();
    h.train_own(0);
    let effects = h.take();
    let deadline = effects
        .iter()
        .find_map(|e| match e {
            Effect::SetTimer {
                timer: Timer::Deadline,
                at,
            } => Some(*at),
            _ => None,
        })
        .expect("the deadline is armed");
    assert!(!Harness::aggregated(&effects));
    // A timer that fires early (a stale one) changes nothing.
    h.input(Input::Timer(Timer::Deadline));
    assert!(!Harness::aggregated(&h.take()));
    h.now = deadline;
    h.input(Input::Timer(Timer::Deadline));
    assert!(Harness::aggregated(&h.take()));
}

/// A node in training with peer 2 banned (two malformed updates in a row).
fn with_a_banned_peer() -> (Harness, Peer) {
    let mut h = Harness::new(0);
    let mut b = Peer::new(2);
    h.join(&b);
    h.start_training();
    for round in 0..2 {
        let r = b.record(&h, round, &[7, 7]);
        h.gossip(&b, &r, Some(vec![7, 7]));
    }
    assert!(h.core.is_banned_peer(&b.peer));
    h.take();
    (h, b)
}

#[test]
fn banned_peers_are_refused_service() {
    let (mut h, b) = with_a_banned_peer();
    h.input(Input::Request {
        peer: b.peer,
        chan: super::ChanId(1),
        request: FetchRequest::Heads,
    });
    let refused = h.take().into_iter().any(|e| {
        matches!(
            e,
            Effect::Respond {
                response: FetchResponse::Refused(_),
                ..
            }
        )
    });
    assert!(refused);
}

/// A ban stops merging an author's updates, not counting its votes: a
/// banned member's later record is neither stored nor its payload wanted,
/// but its vote counts, as at every node that banned it later or not at
/// all (they would otherwise count different votes for one round).
#[test]
fn a_banned_author_s_records_are_not_kept_but_its_votes_count() {
    let (mut h, mut b) = with_a_banned_peer();
    let r2 = b.record(&h, 2, &delta(0.1));
    let id = h.gossip(&b, &r2, None);
    // Passed on (relayed), not stored.
    assert_eq!(h.outcome(&id), Outcome::Ignored(IgnoreReason::VoteOnly));
    assert!(
        !asks_for_a_payload(&h.take()),
        "a banned author's payload is not wanted"
    );
    assert_eq!(
        h.inbox.store().head(&b.key.author()).map(|hd| hd.seq),
        Some(Seq(1)),
        "not stored"
    );
    assert!(h.core.votes.voters(2).contains(&b.key.author()), "but its vote counts");
    // A forged one does not.
    let mut forged = r2.clone();
    forged.record.round = 3;
    let id = h.gossip(&b, &forged, None);
    assert_eq!(h.outcome(&id), Outcome::Ignored(IgnoreReason::BannedAuthor));
    assert!(h.core.votes.voters(3).is_empty());
    h.take();
    // A second record for round 2 (never checked against a chain here) is
    // proof of equivocation: gossiped, and the voter counts nowhere.
    let twin = b.record(&h, 2, &delta(0.2));
    h.gossip(&b, &twin, None);
    let effects = h.take();
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::Publish(GossipMessage::Equivocation { .. }))));
    assert!(!h.core.votes.voters(2).contains(&b.key.author()));
}

#[test]
fn a_node_that_banned_an_author_passes_its_votes_on() {
    let (mut h, mut b) = with_a_banned_peer();
    let r2 = b.record(&h, 2, &delta(0.1));
    h.gossip(&b, &r2, None);
    h.take();
    // Another member, which banned the author too (or never got its
    // record), asks us for the author's chain: our ledger has only what
    // came before the ban, so the record comes from the votes we hold.
    let c = Peer::new(3);
    h.join(&c);
    h.take();
    h.input(Input::Request {
        peer: c.peer,
        chan: super::ChanId(7),
        request: FetchRequest::Records {
            author: b.key.author().0,
            from_seq: r2.record.seq.0,
            max: 16,
        },
    });
    let served: Vec<Vec<Vec<u8>>> = h
        .take()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Respond {
                response: FetchResponse::Records(records),
                ..
            } => Some(records),
            _ => None,
        })
        .collect();
    assert_eq!(served, vec![vec![r2.to_bytes()]], "the banned author's vote is served");
    // A final vote we do not hold is not found (and not refused).
    h.input(Input::Request {
        peer: c.peer,
        chan: super::ChanId(8),
        request: FetchRequest::FinalVoteOf {
            author: b.key.author().0,
        },
    });
    assert!(h.take().iter().any(|e| matches!(
        e,
        Effect::Respond {
            response: FetchResponse::NotFound,
            ..
        }
    )));
}

#[test]
fn a_peer_served_its_byte_budget_is_refused_until_the_window_ends() {
    let mut h = Harness::new(0);
    let b = Peer::new(2);
    h.join(&b);
    h.start_training();
    h.take();
    let budget = h.core.byte_budget();
    let block_request = FetchRequest::Block { hash: [1; 32] };
    // Blocks of 4 MiB, each sent as soon as it is asked for, and read.
    let block = 4 << 20;
    let mut served = 0;
    let mut chan = 0;
    while h.serves(b.peer, chan, block_request.clone()) {
        chan += 1;
        served += block;
        h.input(Input::Served {
            peer: b.peer,
            bytes: block,
        });
        h.input(Input::Delivered {
            peer: b.peer,
            bytes: block,
        });
        assert!(
            served <= budget + block,
            "served {served} bytes, past the budget of {budget}"
        );
    }
    assert!(served >= budget, "refused after {served} of {budget} bytes");
    // Another peer is not held to it.
    let c = Peer::new(3);
    h.join(&c);
    h.take();
    assert!(h.serves(c.peer, 9999, block_request.clone()), "another peer is served");
    // The next window serves the first peer again.
    h.now += 10_000;
    assert!(
        h.serves(b.peer, chan + 1, block_request),
        "a new window serves the peer again"
    );
}

#[test]
fn a_peer_that_leaves_its_answers_unread_is_refused_until_it_reads_them() {
    let mut h = Harness::new(0);
    let b = Peer::new(2);
    h.join(&b);
    h.start_training();
    h.take();
    let block_request = FetchRequest::Block { hash: [1; 32] };
    // 4 MiB answers, sent and never delivered: a few, then no more, well
    // inside the window's byte budget.
    let block = 4 << 20;
    let mut sent = 0;
    while h.serves(b.peer, sent, block_request.clone()) {
        h.input(Input::Served {
            peer: b.peer,
            bytes: block,
        });
        sent += 1;
        assert!(sent <= 16, "{sent} answers held unread for one peer");
    }
    assert!(sent * block >= 16 << 20, "refused after {sent} answers");
    assert!(
        sent * block < h.core.byte_budget(),
        "the window budget is not what stopped it"
    );
    // Once two are read, it is served again.
    for _ in 0..2 {
        h.input(Input::Delivered {
            peer: b.peer,
            bytes: block,
        });
    }
    assert!(
        h.serves(b.peer, 100, block_request),
        "served again once its answers were read"
    );
}

#[test]
fn keys_that_never_read_hold_up_blocks_but_not_the_rounds_payloads() {
    let mut h = Harness::new(0);
    let peers: Vec<Peer> = (2..8).map(Peer::new).collect();
    for p in &peers {
        h.join(p);
    }
    h.start_training();
    h.take();
    let block = FetchRequest::Block { hash: [1; 32] };
    // Five keys take blocks and never read them: 160 MiB unread.
    let mut chan = 0;
    for p in &peers[..5] {
        for _ in 0..8 {
            chan += 1;
            if h.serves(p.peer, chan, block.clone()) {
                h.input(Input::Served {
                    peer: p.peer,
                    bytes: 4 << 20,
                });
            }
        }
    }
    let other = &peers[5];
    assert!(!h.serves(other.peer, 1000, block.clone()), "blocks wait for room");
    assert!(
        h.serves(other.peer, 1001, FetchRequest::Payload { hash: [2; 32] }),
        "a payload is served whatever others leave unread"
    );
    assert!(
        h.serves(peers[0].peer, 1002, FetchRequest::Heads),
        "small answers are never held up"
    );
}

#[test]
fn updates_far_ahead_are_set_aside_and_taken_up_when_their_round_is_next() {
    let mut h = Harness::new(1);
    let mut b = Peer::new(2);
    let author = b.key.author();
    h.join(&b);
    h.start_training();
    let near = b.record(&h, 1, &delta(0.1));
    h.gossip(&b, &near, Some(delta(0.1)));
    assert!(h.core.book.has(1, &author), "the next round's update is held");
    // Inline, four rounds ahead: stored in the ledger, no delta held.
    let far = b.record(&h, 5, &delta(0.2));
    let id = h.gossip(&b, &far, Some(delta(0.2)));
    assert_eq!(h.outcome(&id), Outcome::Accepted);
    assert!(!h.core.book.has(5, &author), "no delta held four rounds ahead");
    // By hash, five rounds ahead: its payload is not fetched yet.
    let farther = b.record(&h, 6, &delta(0.3));
    h.take();
    h.gossip(&b, &farther, None);
    assert!(!asks_for_a_payload(&h.take()), "no fetch for a round that far ahead");
    // At round 4, round 5 is the next: its update comes back from the ledger;
    // round 6 is still set aside.
    h.poke(|c| {
        let _ = c.book.restart_at(4);
        c.tidy_for(4);
    });
    assert!(h.core.book.has(5, &author), "taken up from the ledger");
    assert!(!asks_for_a_payload(&h.take()));
    assert_eq!(h.core.skipped_ahead.get(&author), Some(&6));
    h.poke(|c| {
        let _ = c.book.restart_at(5);
        c.tidy_for(5);
    });
    assert!(asks_for_a_payload(&h.take()), "round 6's payload is wanted at round 5");
    assert!(h.core.skipped_ahead.is_empty());
}

#[test]
fn an_update_of_a_round_skipped_is_kept_for_a_rebuild_once() {
    let mut h = Harness::new(1);
    let mut b = Peer::new(2);
    h.join(&b);
    h.start_training();
    // Skipped ahead to round 2 (half the power was there): round 1 is one
    // this node never closes, but the others may merge its updates late at
    // their round-2 close, which a rebuild of ours would have to redo.
    h.poke(|c| {
        let _ = c.book.restart_at(2);
        c.tidy_for(2);
    });
    let r0 = b.record(&h, 0, &delta(0.1));
    h.gossip(&b, &r0, Some(delta(0.1)));
    let r1 = b.record(&h, 1, &delta(0.2));
    h.gossip(&b, &r1, Some(delta(0.2)));
    assert!(!h.core.book.has(1, &b.key.author()), "not merged here");
    let kept: Vec<RecordHash> = h.core.stale_kept.iter().map(|c| c.record_hash).collect();
    assert!(kept.contains(&r1.hash()), "kept for a rebuild: {kept:?}");
    let before = h.core.stale_kept.len();
    h.poke(|c| c.keep_stale(c.stale_kept.iter().cloned().collect::<Vec<_>>()));
    assert_eq!(h.core.stale_kept.len(), before, "kept once");
}

#[test]
fn a_restarted_node_keeps_the_last_round_s_updates_for_a_rebuild() {
    let mut h = Harness::new(1);
    let mut b = Peer::new(2);
    h.join(&b);
    h.start_training();
    let r0 = b.record(&h, 0, &delta(0.1));
    h.gossip(&b, &r0, Some(delta(0.1)));
    let r1 = b.record(&h, 1, &delta(0.2));
    h.gossip(&b, &r1, Some(delta(0.2)));
    // Crashed once round 0 closed: back at round 1 from its ledger. If the
    // others cannot agree on round 0's anchor, every node rebuilds it from
    // the updates the majority merged, b's among them (sign-flip seed 1312:
    // without them a restarted node went back to the anchor before).
    h.restart(1);
    h.join(&b);
    h.poke(|c| c.begin_rounds());
    let author = b.key.author();
    assert!(h.core.book.has(1, &author), "round 1's update counts again");
    assert!(!h.core.book.has(0, &author), "round 0's is not merged again");
    let kept: Vec<RecordHash> = h.core.stale_kept.iter().map(|c| c.record_hash).collect();
    assert!(kept.contains(&r0.hash()), "kept for a rebuild of round 0: {kept:?}");
    assert!(
        h.core.votes.record_tagged(0, &r0.hash().tag()).is_some(),
        "its record found again: a rebuild knows where to fetch what it lacks"
    );
}

#[test]
fn records_held_out_of_order_are_capped_across_authors_and_expire() {
    use crate::inbox::Job;
    let mut h = Harness::with_rounds(0, 100);
    let mut peers: Vec<Peer> = (2..=ROSTER).map(Peer::new).collect();
    for p in &peers {
        h.join(p);
    }
    h.start_training();
    // Every peer skips its seq 0 and sends 64 later records, each with the
    // largest inline payload: 18 MiB if all were held.
    let big = vec![0x11u8; 48 * 1024];
    for p in peers.iter_mut() {
        let _never_sent = p.record(&h, 0, &delta(0.1));
        for round in 1..=64 {
            let r = p.record(&h, round, &big);
            let id = h.gossip(p, &r, Some(big.clone()));
            assert_eq!(h.outcome(&id), Outcome::Accepted);
        }
    }
    let (held, _, _) = h.inbox.held();
    assert!(held > 0, "some are held");
    assert!(
        held * big.len() <= 16 << 20,
        "{held} records of 48 KiB held out of order, past the 16 MiB cap"
    );
    // They expire after eight rounds without their gap filled.
    h.inbox.handle(Job::Prune { round: 8, keep_from: 0 });
    assert_eq!(h.inbox.held().0, held, "still held at round 8");
    h.inbox.handle(Job::Prune { round: 9, keep_from: 0 });
    assert_eq!(h.inbox.held().0, 0, "expired after eight rounds");
}

#[test]
fn records_waiting_for_payloads_are_forgotten_once_their_round_is_past() {
    use crate::inbox::Job;
    let mut h = Harness::new(0);
    let mut b = Peer::new(2);
    h.join(&b);
    h.start_training();
    let r = b.record(&h, 0, &delta(0.1));
    h.gossip(&b, &r, None);
    assert_eq!(h.inbox.held().1, 1, "waits for its payload");
    h.inbox.handle(Job::Prune { round: 1, keep_from: 0 });
    assert_eq!(h.inbox.held().1, 1, "still mergeable while in the window");
    h.inbox.handle(Job::Prune { round: 2, keep_from: 1 });
    assert_eq!(h.inbox.held(), (0, 0, 1), "no longer awaited; its hash still named");
    h.inbox.handle(Job::Prune {
        round: 300,
        keep_from: 300,
    });
    assert_eq!(h.inbox.held().2, 0, "named for 256 rounds only");
}

#[test]
fn a_full_inbox_queue_ignores_gossip_without_blame_but_takes_the_payloads_we_asked_for() {
    let mut h = Harness::new(1);
    let mut b = Peer::new(2);
    h.join(&b);
    h.start_training();
    let r = b.record(&h, 0, &delta(0.1));
    h.busy = true;
    let id = h.gossip(&b, &r, None);
    assert_eq!(
        h.outcome(&id),
        Outcome::Ignored(IgnoreReason::Busy),
        "settled once, blaming nobody"
    );
    assert!(!h.core.book.has(0, &b.key.author()));
    // Room again: the same record, by hash, is taken and its payload asked for.
    h.busy = false;
    let id = h.gossip(&b, &r, None);
    assert_eq!(h.outcome(&id), Outcome::Accepted);
    assert!(asks_for_a_payload(&h.take()));
    // The payload is an answer to our own request: it is checked even while
    // gossip is being turned away.
    h.busy = true;
    let req = h
        .core
        .requests
        .iter()
        .find_map(|(req, what)| matches!(what, super::RequestFor::Payload(_)).then_some(*req))
        .expect("a payload request in flight");
    h.input(Input::Response {
        req,
        peer: b.peer,
        response: FetchResponse::Payload(delta(0.1)),
    });
    assert!(h.core.book.has(0, &b.key.author()), "the payload we asked for is taken");
}

#[test]
fn fetched_records_not_asked_for_are_dropped_and_blamed_and_one_ask_per_author_is_out() {
    let mut h = Harness::new(0);
    let mut b = Peer::new(2);
    let mut c = Peer::new(3);
    h.join(&b);
    h.join(&c);
    h.start_training();
    let b0 = b.record(&h, 0, &delta(0.1));
    let b1 = b.record(&h, 1, &delta(0.2));
    let b2 = b.record(&h, 2, &delta(0.3));
    h.take();
    // Two records past a gap: one request for B's records, not two.
    h.gossip(&b, &b1, Some(delta(0.2)));
    h.gossip(&b, &b2, Some(delta(0.3)));
    let asks: Vec<super::ReqId> = h
        .take()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Request {
                req,
                request: FetchRequest::Records { from_seq: 0, .. },
                ..
            } => Some(req),
            _ => None,
        })
        .collect();
    assert_eq!(asks.len(), 1, "one request per author at a time");
    // B answers with C's record too, which it was not asked for.
    let c0 = c.record(&h, 0, &delta(0.4));
    h.input(Input::Response {
        req: asks[0],
        peer: b.peer,
        response: FetchResponse::Records(vec![c0.to_bytes(), b0.to_bytes()]),
    });
    let store = h.inbox.store().clone();
    let head = |a| meshtrain_ledger::Store::head(&*store, &a).map(|x| x.seq);
    assert_eq!(head(b.key.author()), Some(Seq(2)), "B's chain filled and released");
    assert_eq!(head(c.key.author()), None, "C's record not taken from B's answer");
    let blamed = h.take().into_iter().any(|e| {
        matches!(
            e,
            Effect::Settle {
                origin: Origin::Fetched { from },
                outcome: Outcome::Invalid(_),
                ..
            } if from == b.peer
        )
    });
    assert!(blamed, "the sender pays for the stray record");
}

#[test]
fn a_records_request_held_open_does_not_hold_up_the_authors_repair() {
    let mut h = Harness::new(0);
    let mut b = Peer::new(2);
    h.join(&b);
    h.start_training();
    let _b0 = b.record(&h, 0, &delta(0.1));
    let b1 = b.record(&h, 1, &delta(0.2));
    let b2 = b.record(&h, 2, &delta(0.3));
    h.take();
    let asks = |h: &mut Harness| {
        h.take()
            .into_iter()
            .filter(|e| {
                matches!(
                    e,
                    Effect::Request {
                        request: FetchRequest::Records { from_seq: 0, .. },
                        ..
                    }
                )
            })
            .count()
    };
    h.gossip(&b, &b1, Some(delta(0.2)));
    assert_eq!(asks(&mut h), 1, "the gap is asked for");
    // The peer asked never answers. Within the patience nobody is asked again;
    // past it the next record that names the gap asks again.
    h.now += super::receive::RECORDS_PATIENCE_MS - 1;
    h.gossip(&b, &b2, Some(delta(0.3)));
    assert_eq!(asks(&mut h), 0, "still waiting for the first answer");
    h.now += 1;
    h.gossip(&b, &b2, Some(delta(0.3)));
    assert_eq!(asks(&mut h), 1, "asked again once the first went unanswered too long");
}

#[test]
fn an_unattested_anchor_offer_counts_for_nothing_and_costs_its_sender_nothing() {
    let mut h = Harness::new(1);
    let b = Peer::new(2);
    let c = Peer::new(3);
    h.join(&b);
    h.join(&c);
    h.input(Input::Start);
    h.input(Input::DataReady);
    let asks = h.anchor_asks();
    assert_eq!(asks.len(), 2, "both members asked");
    let genesis = standin::shape(PARAMS, 7).genesis;
    for (req, peer) in asks {
        // B took its anchor over from others and holds no block for it (an
        // honest answer); C's answer is garbage.
        let verdict = if peer == b.peer { Vec::new() } else { vec![1, 2, 3] };
        h.input(Input::Response {
            req,
            peer,
            response: FetchResponse::Anchor {
                round: 5,
                weights: codec::encode(CodecSpec::Dense, &genesis),
                outer: codec::encode(CodecSpec::Dense, &[]),
                verdict,
            },
        });
    }
    let faults: Vec<PeerId> = h
        .take()
        .into_iter()
        .filter_map(|e| match e {
            Effect::FetchFault { peer } => Some(peer),
            _ => None,
        })
        .collect();
    assert_eq!(faults, vec![c.peer], "only the malformed offer is blamed");
}

#[test]
fn when_the_set_aside_list_is_full_the_farthest_round_gives_way() {
    let mut h = Harness::new(1);
    let full = super::receive::MAX_SET_ASIDE;
    let author = |i: usize| {
        let mut a = [0u8; 32];
        a[..8].copy_from_slice(&(i as u64).to_le_bytes());
        a[31] = 0xee;
        meshtrain_ledger::AuthorId(a)
    };
    h.poke(|c| {
        for i in 0..full {
            c.set_aside(author(i), 1_000_000 + i as u64);
        }
        let near = meshtrain_ledger::AuthorId([9; 32]);
        c.set_aside(near, 3);
        assert_eq!(c.skipped_ahead.len(), full, "still bounded");
        assert_eq!(c.skipped_ahead.get(&near), Some(&3), "the nearer update is noted");
        assert!(
            !c.skipped_ahead.contains_key(&author(full - 1)),
            "the farthest gave way"
        );
        let farther = meshtrain_ledger::AuthorId([8; 32]);
        c.set_aside(farther, 2_000_000);
        assert!(
            !c.skipped_ahead.contains_key(&farther),
            "nothing gives way to a farther one"
        );
    });
}

/// Open runs: a member's verdict block of a round that gossip lost here is
/// asked for (only those missing), and a node serves the one it gossiped.
#[test]
fn a_verdict_block_gossip_lost_is_asked_for_and_served() {
    let (mut h, b, c) = Harness::training_with_two_peers();
    // B's block of round 2 came; C's did not: only C is asked, once.
    let key = (h.anchor_hash, h.outer_hash);
    h.poke(|core| {
        core.credit_notes
            .entry(2)
            .or_default()
            .insert(b.key.author(), (key, Default::default()));
    });
    h.take();
    h.poke(|core| core.ask_missing_credits(2));
    let asked: Vec<PeerId> = h
        .take()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Request {
                peer,
                request: FetchRequest::RoundVerdict { round: 2 },
                ..
            } => Some(peer),
            _ => None,
        })
        .collect();
    assert_eq!(asked, vec![c.peer]);
    // The other side: the block it gossiped for that round, or nothing.
    h.poke(|core| core.gossiped_blocks.push_back((2, vec![7, 7, 7])));
    let ask = |round| FetchRequest::RoundVerdict { round };
    assert_eq!(h.answer(b.peer, 1, ask(2)), Some(FetchResponse::Vote(vec![7, 7, 7])));
    assert_eq!(h.answer(b.peer, 2, ask(1)), Some(FetchResponse::NotFound));
    // C shows two blocks of round 1 that credit apart: neither counts,
    // whichever came first, and neither counts again.
    let (cc, other) = (c.key.author(), (WeightsHash([9; 32]), h.outer_hash));
    h.poke(|core| {
        assert!(core.note_credits(cc, 1, key, &[]));
        assert!(
            core.note_credits(cc, 1, key, &[]),
            "the same block again is no conflict"
        );
        assert!(core.credit_notes[&1].contains_key(&cc));
        assert!(core.note_credits(cc, 1, other, &[]));
        assert!(
            !core.credit_notes[&1].contains_key(&cc),
            "two blocks apart: neither counts"
        );
        assert!(core.note_credits(cc, 1, key, &[]));
        assert!(!core.credit_notes[&1].contains_key(&cc), "nor the first one again");
    });
}

/// A member that skipped to the end (took the decided final anchor over)
/// has no final vote and no record for the last rounds: it says it
/// finished, and members draining stop waiting for its vote and its chain
/// (they waited their whole drain limit, 30 s, for an attacker `late`
/// every round that skipped to the end).
#[test]
fn a_member_that_took_the_final_anchor_over_says_it_finished() {
    let (mut h, b, c) = Harness::training_with_two_peers();
    let ask = |h: &mut Harness, chan: u64| h.answer(b.peer, chan, FetchRequest::FinalVote);
    assert_eq!(ask(&mut h, 1), Some(FetchResponse::NotFound), "still training");
    h.poke(|c| {
        c.attestation = None;
        c.set_phase(super::Phase::Draining);
    });
    assert_eq!(ask(&mut h, 2), Some(FetchResponse::Finished { head_seq: None }));
    // The drainer's side: only the member itself can say it finished.
    let (bb, cb) = (b.key.author(), c.key.author());
    h.poke(|c| {
        c.requests.insert(super::ReqId(900), super::RequestFor::FinalVote(bb));
        c.requests.insert(super::ReqId(901), super::RequestFor::FinalVote(bb));
        c.requests.insert(super::ReqId(902), super::RequestFor::FinalVote(cb));
    });
    let finished = FetchResponse::Finished { head_seq: Some(4) };
    for (req, peer) in [(900, c.peer), (902, c.peer)] {
        h.input(Input::Response {
            req: super::ReqId(req),
            peer,
            response: finished.clone(),
        });
    }
    assert_eq!(h.core.finished_unvoted.get(&bb), None, "C cannot speak for B");
    assert_eq!(h.core.finished_unvoted.get(&cb), Some(&Some(4)));
    h.input(Input::Response {
        req: super::ReqId(901),
        peer: b.peer,
        response: finished,
    });
    assert_eq!(h.core.finished_unvoted.get(&bb), Some(&Some(4)));
    // Neither is asked for a final vote again.
    h.take();
    h.poke(|c| c.ask_final_votes());
    assert!(!h.take().iter().any(|e| matches!(
        e,
        Effect::Request {
            request: FetchRequest::FinalVote,
            ..
        }
    )));
}
