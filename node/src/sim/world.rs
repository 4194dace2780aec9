//! The simulated world: every node's core with its real inbox over an
//! in-memory ledger, a stand-in trainer, and a network that delays,
//! reorders, drops and duplicates messages, partitions and heals, and
//! crashes and restarts nodes. One seeded random source drives it all, so
//! a seed replays exactly.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

use meshtrain_gossip::libp2p::gossipsub::MessageId;
use meshtrain_gossip::libp2p::PeerId;
use meshtrain_gossip::{FetchRequest, FetchResponse};
use meshtrain_ledger::{AuthorId, AuthorKey, MemLedger, Store, WeightsHash};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::standin::{self, StandIn};
use super::sybil::SimSybils;
use super::{SimAdmission, SimConfig};
use crate::attack::Attack;
use crate::core::resume::{resume, SavedAnchor};
use crate::core::sync::{check_fetched, check_offer, encode_anchor};
use crate::core::{members, run_aggregation, ChanId, Core, CoreConfig, Effect, Input, Millis, ReqId, Trained};
use crate::inbox::{Inbox, InboxConfig};
use crate::replay::ModelShape;
use crate::reputation::ReputationConfig;
use crate::runspec::{Admission, RunSpec};

/// How long a request to an unreachable peer takes to fail.
const REQUEST_TIMEOUT_MS: Millis = 1000;
/// Local work (the inbox, aggregation, an offer check) takes this long.
const LOCAL_MS: Millis = 1;

/// What a node keeps across a crash: its ledger and its checkpoint.
struct Durable {
    ledger: Arc<MemLedger>,
    checkpoint: Option<(SavedAnchor, Vec<f32>)>,
}

/// A running node's volatile state.
struct Live {
    core: Core,
    inbox: Inbox<MemLedger>,
    trainer: StandIn,
    /// Gossip ids gossipsub has seen (it hands each over once).
    seen: HashSet<MessageId>,
    /// Peers' requests waiting for our answer: channel -> (peer node, its request id).
    chans: HashMap<ChanId, (usize, u64, ReqId)>,
    next_chan: u64,
    /// Settle effects seen per gossip id (the exactly-once check).
    settled: HashMap<MessageId, u32>,
}

/// One round as a node closed it.
#[derive(Clone, Copy, Debug)]
pub struct Closed {
    pub base: WeightsHash,
    pub anchor: WeightsHash,
    pub at: Millis,
}

pub struct SimNode {
    pub index: usize,
    pub key: [u8; 32],
    pub author: AuthorId,
    pub peer: PeerId,
    pub attack: Option<Attack>,
    durable: Durable,
    live: Option<Live>,
    epoch: u64,
    /// Finished its run (evaluated and drained).
    pub finished: bool,
    pub started: bool,
    /// Per closed round, as the node reported it: the anchor it aggregated
    /// onto, the one it ended on, and when.
    pub closed: BTreeMap<u64, Closed>,
    pub fatal: Option<String>,
    /// Gossip messages this node settled more than once.
    pub double_settles: u64,
    /// The anchor the node evaluated at the end.
    pub final_anchor: Option<WeightsHash>,
    /// When it last started evaluating its final anchor: the run's result
    /// is in (what follows is draining, for members still behind).
    pub evaluated_at: Option<Millis>,
    /// Has trained a round (its shard is here: a restart does not fetch it again).
    trained_once: bool,
}

impl SimNode {
    pub fn ledger(&self) -> &Arc<MemLedger> {
        &self.durable.ledger
    }

    pub fn is_up(&self) -> bool {
        self.live.is_some()
    }

    pub fn honest(&self) -> bool {
        self.attack.is_none()
    }

    /// Gossip messages handed to the core and not settled.
    pub fn unsettled(&self) -> usize {
        self.live.as_ref().map_or(0, |l| l.core.unsettled())
    }

    pub fn anchor_hash(&self) -> Option<WeightsHash> {
        self.live.as_ref().map(|l| l.core.anchor_hash())
    }
}

enum Event {
    /// An input for a node's core (from the network or its own workers).
    Input {
        node: usize,
        epoch: Option<u64>,
        input: Box<Input>,
    },
    /// A peer's request reaches `node`.
    Request {
        node: usize,
        from: usize,
        /// The asker's incarnation: its answer goes to that one only (a
        /// restarted node counts its request ids from 0 again, and an
        /// answer to its previous life's request would match a new one).
        from_epoch: u64,
        req: ReqId,
        request: FetchRequest,
    },
    Timer {
        node: usize,
        epoch: u64,
        timer: crate::core::Timer,
    },
    Crash(usize),
    Restart(usize),
    Start(usize),
    Partition(Vec<BTreeSet<usize>>),
    Heal,
    /// The Sybils gossip their records for a round.
    SybilRound(u64),
}

/// Stands for the Sybils' host in links and blocks.
const HOST: usize = usize::MAX;

pub struct World {
    pub cfg: SimConfig,
    pub seed: u64,
    pub spec: RunSpec,
    pub shape: ModelShape,
    pub nodes: Vec<SimNode>,
    rng: ChaCha8Rng,
    now: Millis,
    queue: BinaryHeap<Reverse<(Millis, u64)>>,
    events: HashMap<u64, Event>,
    next_event: u64,
    /// Groups of a partition in force (empty: none).
    groups: Vec<BTreeSet<usize>>,
    /// (a, b): a refuses b (a banned b's author).
    blocked: HashSet<(usize, usize)>,
    /// When faults stop.
    pub quiet_at: Millis,
    /// One attacker's many identities, when the scenario has them.
    pub sybils: Option<SimSybils>,
    /// Anchors that attacking nodes' own hijacks pushed (`anchor-hijack:K`).
    pub poisoned: HashSet<WeightsHash>,
    pub crashes: u64,
    pub partitions: u64,
}

impl World {
    pub fn new(cfg: SimConfig, seed: u64) -> Self {
        let shape = standin::shape(cfg.params, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let total = cfg.nodes + cfg.byzantine;
        let keys: Vec<[u8; 32]> = (0..total)
            .map(|_| {
                let mut key = [0u8; 32];
                rng.fill(&mut key[..]);
                key
            })
            .collect();
        let admission = match cfg.admission {
            SimAdmission::Permissioned => Admission::Permissioned {
                members: keys
                    .iter()
                    .map(|k| AuthorKey::from_secret(*k).author().to_string())
                    .collect(),
            },
            // The nodes that start the run found it; late joiners (and the
            // Sybils) earn their votes.
            SimAdmission::Open { earn_rounds, founded } => Admission::Open {
                earn_rounds,
                founders: keys
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| founded && (*i < cfg.nodes - cfg.late_join.min(cfg.nodes) || *i >= cfg.nodes))
                    .map(|(_, k)| AuthorKey::from_secret(*k).author().to_string())
                    .collect(),
            },
        };
        let mut spec = standin::sim_spec(cfg.rounds, cfg.codec, cfg.aggregator, seed, admission);
        spec.exchange.score = cfg.score;
        let mut nodes = Vec::with_capacity(total);
        for (index, key) in keys.into_iter().enumerate() {
            let author = AuthorKey::from_secret(key).author();
            let peer = members::peer_of(&author).expect("an ed25519 key is always a peer id");
            let ledger = Arc::new(
                MemLedger::new(standin::meta(&spec, author, &shape)).expect("a simulated run's meta is consistent"),
            );
            let attack = (index >= cfg.nodes).then_some(cfg.attack).flatten();
            nodes.push(SimNode {
                index,
                key,
                author,
                peer,
                attack,
                durable: Durable {
                    ledger,
                    checkpoint: None,
                },
                live: None,
                epoch: 0,
                finished: false,
                started: false,
                closed: BTreeMap::new(),
                fatal: None,
                double_settles: 0,
                final_anchor: None,
                evaluated_at: None,
                trained_once: false,
            });
        }
        let sybils = (cfg.sybils > 0).then(|| SimSybils::new(&cfg, &spec, &shape, &mut rng));
        let mut world = Self {
            sybils,
            poisoned: HashSet::new(),
            quiet_at: 0,
            cfg,
            seed,
            spec,
            shape,
            nodes,
            rng,
            now: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_event: 0,
            groups: Vec::new(),
            blocked: HashSet::new(),
            crashes: 0,
            partitions: 0,
        };
        world.schedule_faults();
        let late = world.cfg.late_join.min(total.saturating_sub(1));
        for i in 0..total {
            let at = if i >= total - late && late > 0 {
                world.round_ms() * world.cfg.rounds / 3
            } else {
                world.rng.random_range(0..50)
            };
            world.at(at, Event::Start(i));
        }
        if world.sybils.is_some() {
            for r in 0..world.cfg.rounds {
                let at = 60 + r * world.round_ms();
                world.at(at, Event::SybilRound(r));
            }
        }
        world
    }

    /// A typical round's length in this world (for placing faults).
    fn round_ms(&self) -> Millis {
        self.cfg.train_ms + 60
    }

    fn schedule_faults(&mut self) {
        let span = self.round_ms() * self.cfg.rounds;
        self.quiet_at = span * 6 / 10;
        let total = self.nodes.len();
        if self.cfg.crashes && total > 2 {
            let n = self.rng.random_range(1..=2);
            for _ in 0..n {
                let node = self.rng.random_range(0..self.cfg.nodes);
                let at = self.rng.random_range(span / 10..self.quiet_at.max(span / 10 + 1));
                let down = self.rng.random_range(100..4 * self.round_ms());
                self.at(at, Event::Crash(node));
                self.at((at + down).min(self.quiet_at), Event::Restart(node));
            }
        }
        if self.cfg.partitions && total > 2 {
            let at = self.rng.random_range(span / 10..self.quiet_at / 2 + span / 10 + 1);
            let len = self.rng.random_range(2 * self.round_ms()..6 * self.round_ms());
            let mut order: Vec<usize> = (0..total).collect();
            for i in (1..order.len()).rev() {
                let j = self.rng.random_range(0..=i);
                order.swap(i, j);
            }
            let cut = self.rng.random_range(1..total);
            let groups = vec![
                order[..cut].iter().copied().collect(),
                order[cut..].iter().copied().collect(),
            ];
            self.at(at, Event::Partition(groups));
            self.at((at + len).min(self.quiet_at), Event::Heal);
        }
    }

    fn faulty(&self) -> bool {
        self.now < self.quiet_at
    }

    fn at(&mut self, at: Millis, event: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.events.insert(id, event);
        self.queue.push(Reverse((at, id)));
    }

    /// Runs until every honest node finished or the time limit.
    pub fn run(&mut self, limit: Millis) {
        while let Some(Reverse((at, id))) = self.queue.pop() {
            if at > limit {
                break;
            }
            self.now = self.now.max(at);
            let Some(event) = self.events.remove(&id) else {
                continue;
            };
            self.step(event);
            if self
                .nodes
                .iter()
                .filter(|n| n.honest())
                .all(|n| n.finished || n.fatal.is_some())
            {
                self.flush_local();
                break;
            }
        }
    }

    /// The run is over: hands the nodes the results of the inbox jobs still
    /// under way (a message handed in just before the last node finished is
    /// settled then, as a real inbox thread would), and nothing else.
    fn flush_local(&mut self) {
        let until = self.now + LOCAL_MS;
        while let Some(Reverse((at, id))) = self.queue.pop() {
            if at > until {
                break;
            }
            let Some(event) = self.events.remove(&id) else {
                continue;
            };
            if matches!(&event, Event::Input { input, .. } if matches!(**input, Input::Checked(_))) {
                self.now = self.now.max(at);
                self.step(event);
            }
        }
    }

    pub fn now(&self) -> Millis {
        self.now
    }

    fn step(&mut self, event: Event) {
        match event {
            Event::Input { node, epoch, input } => {
                if epoch.is_some_and(|e| e != self.nodes[node].epoch) {
                    return;
                }
                self.feed(node, *input);
            }
            Event::Request {
                node,
                from,
                from_epoch,
                req,
                request,
            } => self.on_request(node, (from, from_epoch), req, request),
            Event::Timer { node, epoch, timer } => {
                if self.nodes[node].epoch == epoch {
                    self.feed(node, Input::Timer(timer));
                }
            }
            Event::Start(node) => {
                if !self.nodes[node].started {
                    self.start(node, false);
                }
            }
            Event::Crash(node) => {
                tracing::info!(node, t = self.now, "sim: crash");
                self.crash(node)
            }
            Event::Restart(node) => {
                if !self.nodes[node].is_up() && !self.nodes[node].finished {
                    tracing::info!(node, t = self.now, "sim: restart");
                    self.start(node, true);
                }
            }
            Event::Partition(groups) => {
                tracing::info!(?groups, t = self.now, "sim: partition");
                self.partitions += 1;
                let old: Vec<(usize, usize)> = self.links();
                self.groups = groups;
                for (a, b) in old {
                    if !self.linked(a, b) {
                        self.disconnect(a, b);
                    }
                }
            }
            Event::SybilRound(r) => self.sybil_round(r),
            Event::Heal => {
                tracing::info!(t = self.now, "sim: heal");
                let before: HashSet<(usize, usize)> = self.links().into_iter().collect();
                self.groups.clear();
                for (a, b) in self.links() {
                    if !before.contains(&(a, b)) {
                        self.connect(a, b);
                    }
                }
            }
        }
    }

    /// Pairs of up nodes that can talk now.
    fn links(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if a != b && self.linked(a, b) {
                    out.push((a, b));
                }
            }
        }
        out
    }

    fn linked(&self, a: usize, b: usize) -> bool {
        let na = &self.nodes[a];
        let nb = &self.nodes[b];
        na.is_up()
            && nb.is_up()
            && !na.finished
            && !nb.finished
            && !self.blocked.contains(&(a, b))
            && !self.blocked.contains(&(b, a))
            && (self.groups.is_empty() || self.groups.iter().any(|g| g.contains(&a) && g.contains(&b)))
    }

    /// `a` learns that `b` connected and joined the run's topic.
    fn connect(&mut self, a: usize, b: usize) {
        let pb = self.nodes[b].peer;
        self.deliver(a, Input::Connected(pb), 1);
        self.deliver(a, Input::Subscribed(pb), 2);
    }

    fn disconnect(&mut self, a: usize, b: usize) {
        let pb = self.nodes[b].peer;
        self.deliver(a, Input::Disconnected(pb), 1);
    }

    fn deliver(&mut self, node: usize, input: Input, delay: Millis) {
        let epoch = self.nodes[node].epoch;
        self.deliver_to(node, epoch, input, delay);
    }

    /// Delivers to one incarnation of `node` (dropped if it restarted since).
    fn deliver_to(&mut self, node: usize, epoch: u64, input: Input, delay: Millis) {
        let epoch = Some(epoch);
        self.at(
            self.now + delay,
            Event::Input {
                node,
                epoch,
                input: Box::new(input),
            },
        );
    }

    fn start(&mut self, index: usize, restart: bool) {
        let cfg = &self.cfg;
        let node = &self.nodes[index];
        let spec = self.spec.clone();
        let saved = node.durable.checkpoint.as_ref().map(|(s, _)| s.clone());
        let resumed = match resume(&*node.durable.ledger, node.author, saved.as_ref(), &spec, &self.shape) {
            Ok(r) => r,
            Err(e) => {
                self.nodes[index].fatal = Some(format!("resume: {e}"));
                return;
            }
        };
        let meta = node.durable.ledger.meta().clone();
        let admission = match crate::core::power::Rule::of(&spec.admission) {
            Ok(a) => a,
            Err(e) => {
                self.nodes[index].fatal = Some(format!("admission: {e}"));
                return;
            }
        };
        let node = &self.nodes[index];
        let core_cfg = CoreConfig {
            run_id: meta.run_id,
            genesis_link: meta.genesis_link(),
            genesis_weights: meta.genesis_weights,
            verdict_genesis: meta.verdict_genesis(),
            params: cfg.params,
            spec: spec.clone(),
            wait_peers: if restart { 0 } else { cfg.nodes.min(3).saturating_sub(1) },
            wait_peers_timeout: 2000,
            drain: 3000,
            eval_every: 5,
            checkpoint_every: cfg.checkpoint_every,
            reputation: ReputationConfig::default(),
            max_inline_payload: 48 * 1024,
            send_inline_payload: meshtrain_gossip::MeshConfig::default().send_inline_payload,
            attack: node.attack,
            seed: self.seed,
            admission: admission.clone(),
        };
        let core = Core::new(core_cfg, AuthorKey::from_secret(node.key), resumed);
        self.poisoned.extend(core.poisoned_anchor());
        let inbox = Inbox::new(
            node.durable.ledger.clone(),
            InboxConfig {
                run_id: meta.run_id,
                roster: admission.roster().cloned(),
                genesis: meta.genesis_link(),
                params: cfg.params,
                rounds: cfg.rounds,
                retention: meshtrain_ledger::Retention::KEEP_ALL,
            },
        );
        let mut trainer = StandIn::new(&spec, cfg.params, self.seed, index, node.attack);
        if let Some((_, residual)) = &node.durable.checkpoint {
            let _ = trainer.encoder.set_residual(residual.clone());
        }
        let node = &mut self.nodes[index];
        node.epoch += 1;
        node.started = true;
        node.live = Some(Live {
            core,
            inbox,
            trainer,
            seen: HashSet::new(),
            chans: HashMap::new(),
            next_chan: 0,
            settled: HashMap::new(),
        });
        for other in 0..self.nodes.len() {
            if other != index && self.linked(index, other) {
                self.connect(index, other);
                self.connect(other, index);
            }
        }
        if let Some(host) = self.sybils.as_ref().map(|s| s.host_peer) {
            if !self.blocked.contains(&(index, HOST)) {
                self.deliver(index, Input::Connected(host), 1);
                self.deliver(index, Input::Subscribed(host), 2);
            }
        }
        self.deliver(index, Input::Start, 0);
    }

    fn crash(&mut self, index: usize) {
        if !self.nodes[index].is_up() || self.nodes[index].finished {
            return;
        }
        self.crashes += 1;
        let peers: Vec<usize> = (0..self.nodes.len())
            .filter(|&o| o != index && self.linked(index, o))
            .collect();
        self.nodes[index].live = None;
        self.nodes[index].epoch += 1;
        for o in peers {
            self.disconnect(o, index);
        }
    }

    fn feed(&mut self, index: usize, input: Input) {
        let now = self.now;
        let Some(live) = self.nodes[index].live.as_mut() else {
            return;
        };
        if let Input::Gossip { id, .. } = &input {
            if !live.seen.insert(id.clone()) {
                return;
            }
        }
        let span = tracing::info_span!("node", id = index, t = now);
        let effects = span.in_scope(|| live.core.handle(input, now));
        for effect in effects {
            self.execute(index, effect);
        }
    }

    fn link_delay(&mut self) -> Millis {
        if self.faulty() {
            self.rng.random_range(self.cfg.delay_ms.0..=self.cfg.delay_ms.1)
        } else {
            self.rng.random_range(1..=5)
        }
    }

    fn dropped(&mut self) -> bool {
        self.faulty() && self.rng.random_bool(self.cfg.drop)
    }

    fn execute(&mut self, index: usize, effect: Effect) {
        let epoch = self.nodes[index].epoch;
        match effect {
            Effect::Publish(msg) => {
                let data = msg.to_bytes();
                let id = MessageId::new(blake3::hash(&data).as_bytes());
                let source = self.nodes[index].peer;
                for to in 0..self.nodes.len() {
                    if to == index || !self.linked(index, to) || self.dropped() {
                        continue;
                    }
                    let d = self.link_delay();
                    self.deliver(
                        to,
                        Input::Gossip {
                            id: id.clone(),
                            source,
                            data: data.clone(),
                        },
                        d,
                    );
                    if self.faulty() && self.rng.random_bool(self.cfg.dup) {
                        // The same bytes by another path under another id
                        // (gossipsub drops same-id copies itself).
                        let mut other = id.0.clone();
                        other.push(0xd0);
                        let d = self.link_delay() * 3;
                        self.deliver(
                            to,
                            Input::Gossip {
                                id: MessageId::new(&other),
                                source,
                                data: data.clone(),
                            },
                            d,
                        );
                    }
                }
            }
            Effect::Settle { origin, .. } => {
                if let crate::core::Origin::Gossip { id, .. } = origin {
                    if let Some(live) = self.nodes[index].live.as_mut() {
                        let n = live.settled.entry(id).or_default();
                        *n += 1;
                        if *n > 1 {
                            self.nodes[index].double_settles += 1;
                        }
                    }
                }
            }
            Effect::Counted { .. } => {}
            Effect::Request { req, peer, request } => {
                if self.sybils.as_ref().is_some_and(|s| s.host_peer == peer) {
                    return self.ask_host(index, req, peer, &request);
                }
                let Some(to) = self.nodes.iter().position(|n| n.peer == peer) else {
                    self.deliver(index, Input::RequestFailed { req, peer }, REQUEST_TIMEOUT_MS);
                    return;
                };
                if !self.linked(index, to) || self.dropped() {
                    self.deliver(index, Input::RequestFailed { req, peer }, REQUEST_TIMEOUT_MS);
                    return;
                }
                let d = self.link_delay();
                self.at(
                    self.now + d,
                    Event::Request {
                        node: to,
                        from: index,
                        from_epoch: epoch,
                        req,
                        request,
                    },
                );
            }
            Effect::Serve { chan, request, .. } => {
                let response = crate::serve::answer(&*self.nodes[index].durable.ledger, &request);
                self.respond(index, chan, response);
            }
            Effect::ServeAnchor { chan, anchor, .. } => {
                let response = encode_anchor(&anchor);
                self.respond(index, chan, response);
            }
            Effect::Respond { chan, response } => self.respond(index, chan, response),
            Effect::CheckAnchor {
                peer,
                starts,
                key,
                response,
            } => {
                let result = check_fetched(starts, key, self.cfg.params, response).map(Box::new);
                self.at(
                    self.now + LOCAL_MS,
                    Event::Input {
                        node: index,
                        epoch: Some(epoch),
                        input: Box::new(Input::AnchorChecked { peer, result }),
                    },
                );
            }
            Effect::CheckOffer { peer, response } => {
                let meta = self.nodes[index].durable.ledger.meta().clone();
                let result = check_offer(&meta.run_id, &meta.genesis_weights, self.cfg.params, response).map(Box::new);
                self.at(
                    self.now + LOCAL_MS,
                    Event::Input {
                        node: index,
                        epoch: Some(epoch),
                        input: Box::new(Input::OfferChecked { peer, result }),
                    },
                );
            }
            Effect::Inbox(job) => {
                let Some(live) = self.nodes[index].live.as_mut() else {
                    return;
                };
                for done in live.inbox.handle(job) {
                    self.at(
                        self.now + LOCAL_MS,
                        Event::Input {
                            node: index,
                            epoch: Some(epoch),
                            input: Box::new(Input::Checked(Box::new(done))),
                        },
                    );
                }
            }
            Effect::Train {
                round,
                anchor,
                evaluate,
            } => {
                let eval = evaluate.then(|| standin::evaluate(&anchor, self.cfg.params, self.seed, round).summary);
                let mut jitter = self.rng.random_range(0..=self.cfg.train_ms / 3);
                if index > 0 && !self.nodes[index].trained_once {
                    jitter += self.cfg.slow_first_ms;
                }
                self.nodes[index].trained_once = true;
                let Some(live) = self.nodes[index].live.as_mut() else {
                    return;
                };
                match live.trainer.train(round, &anchor) {
                    Ok((update, stats)) => {
                        let trained = Trained {
                            round,
                            eval,
                            stats,
                            payload: update.payload,
                            decoded: Arc::new(update.decoded),
                            twin: update.twin,
                            train_ms: self.cfg.train_ms,
                        };
                        self.at(
                            self.now + self.cfg.train_ms + jitter,
                            Event::Input {
                                node: index,
                                epoch: Some(epoch),
                                input: Box::new(Input::Trained(Box::new(trained))),
                            },
                        );
                    }
                    Err(e) => self.nodes[index].fatal = Some(format!("stand-in training: {e}")),
                }
            }
            Effect::Craft { delta, like, .. } => {
                let Some(live) = self.nodes[index].live.as_mut() else {
                    return;
                };
                match live.trainer.encoder.encode(&delta) {
                    Ok(e) => {
                        let t = Trained {
                            payload: e.bytes,
                            decoded: Arc::new(e.decoded),
                            ..*like
                        };
                        self.at(
                            self.now + LOCAL_MS,
                            Event::Input {
                                node: index,
                                epoch: Some(epoch),
                                input: Box::new(Input::Crafted(Box::new(t))),
                            },
                        );
                    }
                    Err(e) => self.nodes[index].fatal = Some(format!("crafting: {e}")),
                }
            }
            Effect::Evaluate { round, anchor } => {
                let report = standin::evaluate(&anchor, self.cfg.params, self.seed, round);
                self.nodes[index].final_anchor = Some(WeightsHash::of_f32(&anchor));
                self.nodes[index].evaluated_at = Some(self.now);
                self.at(
                    self.now + LOCAL_MS,
                    Event::Input {
                        node: index,
                        epoch: Some(epoch),
                        input: Box::new(Input::Evaluated {
                            round,
                            report: Box::new(report),
                        }),
                    },
                );
            }
            Effect::Checkpoint {
                round,
                anchor,
                velocity,
            } => {
                let residual = self.nodes[index]
                    .live
                    .as_ref()
                    .map(|l| l.trainer.encoder.residual().to_vec())
                    .unwrap_or_default();
                self.nodes[index].durable.checkpoint = Some((
                    SavedAnchor {
                        round,
                        anchor: anchor.to_vec(),
                        velocity,
                    },
                    residual,
                ));
            }
            Effect::Score { round, anchor, deltas } => {
                // The stand-in's held-out loss, leaving each update out.
                let loss = |w: &[f32]| standin::evaluate(w, self.cfg.params, self.seed, round).summary.loss;
                let sum = crate::core::score::sum_of(&deltas, anchor.len());
                let mut w = vec![0f32; anchor.len()];
                crate::core::score::moved(&anchor, &sum, &deltas, None, &mut w);
                let with_all = loss(&w);
                let without = (0..deltas.len())
                    .map(|i| {
                        crate::core::score::moved(&anchor, &sum, &deltas, Some(i), &mut w);
                        loss(&w)
                    })
                    .collect();
                self.at(
                    self.now + LOCAL_MS,
                    Event::Input {
                        node: index,
                        epoch: Some(epoch),
                        input: Box::new(Input::Scored {
                            round,
                            scores: Ok(crate::core::score::Scores { with_all, without }),
                        }),
                    },
                );
            }
            Effect::Aggregate(job) => {
                let done = run_aggregation(*job);
                self.at(
                    self.now + LOCAL_MS,
                    Event::Input {
                        node: index,
                        epoch: Some(epoch),
                        input: Box::new(Input::Aggregated(Box::new(done))),
                    },
                );
            }
            Effect::BeginData { .. } => self.at(
                self.now + 5,
                Event::Input {
                    node: index,
                    epoch: Some(epoch),
                    input: Box::new(Input::DataReady),
                },
            ),
            Effect::Replan { .. } => {}
            Effect::Ban { peer, .. } => {
                if peer.is_some() && peer == self.sybils.as_ref().map(|s| s.host_peer) {
                    self.blocked.insert((index, HOST));
                    return;
                }
                if let Some(to) = peer.and_then(|p| self.nodes.iter().position(|n| n.peer == p)) {
                    let was = self.linked(index, to);
                    self.blocked.insert((index, to));
                    if was {
                        self.disconnect(index, to);
                        self.disconnect(to, index);
                    }
                }
            }
            Effect::SetTimer { timer, at } => {
                self.at(
                    at.max(self.now),
                    Event::Timer {
                        node: index,
                        epoch,
                        timer,
                    },
                );
            }
            Effect::RoundClosed(c) => {
                let at = self.now;
                self.nodes[index].closed.insert(
                    c.round,
                    Closed {
                        base: c.base_hash,
                        anchor: c.anchor_hash,
                        at,
                    },
                );
            }
            Effect::FetchFault { .. } => {}
            Effect::Finished => {
                let peers: Vec<usize> = (0..self.nodes.len())
                    .filter(|&o| o != index && self.linked(index, o))
                    .collect();
                self.nodes[index].finished = true;
                for o in peers {
                    self.disconnect(o, index);
                }
            }
            Effect::Fatal(f) => self.nodes[index].fatal = Some(f.to_string()),
        }
    }

    /// The Sybils gossip this round's records to every node that has not
    /// refused them.
    fn sybil_round(&mut self, round: u64) {
        let Some(sybils) = self.sybils.as_mut() else { return };
        let source = sybils.host_peer;
        let msgs = sybils.round(round);
        for msg in msgs {
            let data = msg.to_bytes();
            let id = MessageId::new(blake3::hash(&data).as_bytes());
            for to in 0..self.nodes.len() {
                if !self.host_linked(to) {
                    continue;
                }
                let d = self.link_delay();
                self.deliver(
                    to,
                    Input::Gossip {
                        id: id.clone(),
                        source,
                        data: data.clone(),
                    },
                    d,
                );
            }
        }
    }

    fn host_linked(&self, node: usize) -> bool {
        let n = &self.nodes[node];
        n.is_up() && !n.finished && !self.blocked.contains(&(node, HOST))
    }

    /// A node asks the Sybils' host something.
    fn ask_host(&mut self, index: usize, req: ReqId, peer: PeerId, request: &FetchRequest) {
        if !self.host_linked(index) {
            self.deliver(index, Input::RequestFailed { req, peer }, REQUEST_TIMEOUT_MS);
            return;
        }
        let round = self
            .nodes
            .iter()
            .filter_map(|n| n.closed.keys().next_back())
            .max()
            .copied()
            .unwrap_or(0);
        let response = self
            .sybils
            .as_ref()
            .map_or(FetchResponse::NotFound, |s| s.answer(request, round));
        let d = self.link_delay();
        self.deliver(index, Input::Response { req, peer, response }, d);
    }

    fn on_request(&mut self, node: usize, (from, from_epoch): (usize, u64), req: ReqId, request: FetchRequest) {
        let peer = self.nodes[from].peer;
        if !self.linked(node, from) {
            self.deliver_to(
                from,
                from_epoch,
                Input::RequestFailed {
                    req,
                    peer: self.nodes[node].peer,
                },
                REQUEST_TIMEOUT_MS,
            );
            return;
        }
        let Some(live) = self.nodes[node].live.as_mut() else {
            return;
        };
        let chan = ChanId(live.next_chan);
        live.next_chan += 1;
        live.chans.insert(chan, (from, from_epoch, req));
        self.feed(node, Input::Request { peer, chan, request });
    }

    fn respond(&mut self, node: usize, chan: ChanId, response: FetchResponse) {
        let Some((to, to_epoch, req)) = self.nodes[node].live.as_mut().and_then(|l| l.chans.remove(&chan)) else {
            return;
        };
        let peer = self.nodes[node].peer;
        if !self.linked(node, to) || self.dropped() {
            self.deliver_to(to, to_epoch, Input::RequestFailed { req, peer }, REQUEST_TIMEOUT_MS);
            return;
        }
        let (asker, bytes) = (self.nodes[to].peer, response.carried_bytes());
        self.deliver(node, Input::Served { peer: asker, bytes }, 0);
        let d = self.link_delay();
        self.deliver(node, Input::Delivered { peer: asker, bytes }, d);
        self.deliver_to(to, to_epoch, Input::Response { req, peer, response }, d);
    }
}
