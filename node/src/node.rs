//! The node: one `tokio::select!` over network events, the trainer's and the
//! inbox's channels, aggregation results and a timer.
//!
//! Handlers return quickly: training runs on its own thread, record checks
//! and ledger writes on the inbox thread, aggregation and fetch answers on
//! blocking tasks, each reporting back by message.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use meshtrain_gossip::libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use meshtrain_gossip::libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use meshtrain_gossip::libp2p::swarm::SwarmEvent;
use meshtrain_gossip::libp2p::{Multiaddr, PeerId, Swarm};
use meshtrain_gossip::{
    build_swarm, byte_counts, ed25519_of, peer_id_of, run_topic, FetchRequest, FetchResponse, GossipMessage,
    MeshBehaviour, MeshBehaviourEvent, MeshConfig,
};
use meshtrain_ledger::{
    AuthorId, AuthorKey, Head, Ledger, PayloadHash, RejectReason, RunId, RunMeta, Seq, StoreOptions, UpdateRecord,
    Verdict, VerdictBlock, VerdictEntry, VerdictHash, WeightsHash, RECORD_VERSION, VERDICT_VERSION,
};
use meshtrain_model::metrics::EarlyStopping;
use meshtrain_model::{
    aggregate::aggregate as aggregate_deltas, codec, AggInput, AggVerdict, AggregatorSpec, DeltaEncoder, EvalReport,
    Evaluation, Manifest, Network, OuterConfig, OuterOptimizer, StepStats, TrainConfig,
};
use meshtrain_testnet::report::{NodeReport, RoundRecord};
use prometheus_client::registry::Registry;

use crate::metrics::NodeMetrics;
use libp2p::metrics::Recorder;
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::attack::Attack;
use crate::blockstore::BlockStore;
use crate::checkpoint::Checkpoint;
use crate::identity::Identity;
use crate::inbox::{self, Done, InboxConfig, Job, Origin, Outcome, RecordDone};
use crate::reputation::{Reputation, ReputationConfig};
use crate::round::{AdaptiveWait, Close, Contribution, RoundBook, RoundInputs};
use crate::runspec::RunSpec;
use crate::shard::{BlockWant, FetchStats, ShardPlan};
use crate::trainer::{TrainerCmd, TrainerHandle, TrainerReply};

mod deny;
mod fetching;
mod sync;
use crate::NodeError;
use sync::{AnchorSync, Offer, SyncOutcome, SyncReason};

/// Where a node finds its run, data and peers.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub data_dir: PathBuf,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub spec: RunSpec,
    /// Shard `.0` of `.1`.
    pub shard: (usize, usize),
    /// The block store (default: DIR/blocks). A node that lacks the
    /// manifest or its blocks fetches them from peers.
    pub data: Option<PathBuf>,
    /// Connected peers to wait for before the first round.
    pub wait_peers: usize,
    pub wait_peers_timeout: Duration,
    pub threads: usize,
    /// Where the model trains: `auto` (CUDA when available), `cpu`, `cuda`.
    pub device: meshtrain_model::Device,
    pub attack: Option<Attack>,
    /// Longest time to linger after the last round, serving peers and
    /// completing chains.
    pub drain: Duration,
    pub sync_writes: bool,
    /// Evaluate on the test set every this many rounds (and always at the end).
    pub eval_every: u64,
    /// Write a checkpoint every this many rounds (0: never).
    pub checkpoint_every: u64,
    /// When authors are banned.
    pub reputation: ReputationConfig,
    /// How long payloads are kept in the ledger.
    pub retention: meshtrain_ledger::Retention,
    pub mesh: MeshConfig,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    pub metrics: Option<std::net::SocketAddr>,
    /// Peer ids to refuse, one per line, re-read when the file changes.
    pub deny_peers: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for enough peers before round 0.
    Gathering,
    /// Fetching the manifest and this node's blocks from peers.
    Fetching,
    /// Asking peers where the mesh is (a late join or a restart).
    Syncing,
    /// The trainer works on the current round.
    Training,
    /// A colluding attacker waits for the round's honest updates.
    Colluding,
    /// Our record is being stored before it is published.
    Publishing,
    /// Our update is out; waiting for peers' updates or the deadline.
    Waiting,
    Aggregating,
    /// Evaluating the final anchor.
    Finishing,
    /// Serving peers and completing chains before exiting.
    Draining,
}

/// A payload we still need, and where we may find it.
struct Want {
    author: AuthorId,
    round: u64,
    candidates: VecDeque<PeerId>,
    attempts: u32,
    in_flight: bool,
    retry_at: Option<Instant>,
}

enum RequestFor {
    Payload(PayloadHash),
    Records,
    Heads,
    /// A data block or the manifest, by hex hash.
    Block(String),
    Anchor,
}

struct AggregateDone {
    round: u64,
    anchor: Vec<f32>,
    outer: OuterOptimizer,
    entries: Vec<VerdictEntry>,
    wait: Duration,
}

/// A colluding attacker's trained round, waiting for honest updates.
struct Collusion {
    round: u64,
    raw: Arc<Vec<f32>>,
    eval: Option<Evaluation>,
    stats: StepStats,
    train_ms: u64,
    since: Instant,
    seen: usize,
    seen_changed: Instant,
}

/// Our own update between training and publication.
struct OwnRound {
    round: u64,
    eval: Option<Evaluation>,
    stats: StepStats,
    decoded: Arc<Vec<f32>>,
    train_ms: u64,
}

#[derive(Default)]
struct Counters {
    received: u64,
    merged: u64,
    clipped: u64,
    rejected: u64,
    published: u64,
    payload_bytes: u64,
    rejected_by_reason: BTreeMap<String, u64>,
    rejected_by_author: BTreeMap<String, u64>,
    clipped_by_author: BTreeMap<String, u64>,
    merged_by_author: BTreeMap<String, u64>,
}

pub struct Node {
    spec: RunSpec,
    run_id: RunId,
    me: AuthorId,
    key: AuthorKey,
    ledger: Arc<Ledger>,
    swarm: Swarm<MeshBehaviour>,
    topic: IdentTopic,
    registry: Arc<std::sync::Mutex<Registry>>,
    metrics: NodeMetrics,
    p2p_metrics: libp2p::metrics::Metrics,
    metrics_addr: Option<std::net::SocketAddr>,
    deny: Option<deny::DenyList>,
    mesh: MeshConfig,
    data_dir: PathBuf,
    attack: Option<Attack>,
    shard: String,
    wait_peers: usize,
    wait_peers_timeout: Duration,
    drain: Duration,
    eval_every: u64,
    inbox: inbox::InboxHandle,
    /// Started once the node holds its shard.
    trainer: Option<TrainerHandle>,
    /// What the trainer is built from, until then.
    pending_trainer: Option<(Network, TrainConfig, DeltaEncoder)>,
    shard_seed: u64,
    store: BlockStore,
    manifest: Option<Manifest>,
    plan: Option<ShardPlan>,
    block_wants: BTreeMap<String, BlockWant>,
    fetch: FetchStats,
    missing_tx: mpsc::UnboundedSender<String>,
    missing_rx: mpsc::UnboundedReceiver<String>,
    /// Membership changed: re-plan the shard at this time (debounced).
    replan_at: Option<Instant>,
    sync: Option<AnchorSync>,
    /// The verdict block naming our current anchor (ours, or the one we
    /// joined on): what we show peers who ask for the anchor.
    attestation: Option<meshtrain_ledger::SignedVerdictBlock>,
    /// An anchor to take over at the next round boundary.
    pending_adoption: Option<(Offer, Vec<meshtrain_ledger::SignedVerdictBlock>)>,
    /// When we last looked whether the mesh has left our round behind.
    behind_checked: Option<Instant>,
    /// Rounds at which this node adopted the mesh's anchor.
    joins: Vec<u64>,
    checkpoint_every: u64,
    /// Residual and Adam state to hand the trainer once it starts.
    restored: Option<Checkpoint>,
    restarted: bool,
    serve_tx: mpsc::UnboundedSender<(ResponseChannel<FetchResponse>, FetchResponse)>,
    serve_rx: mpsc::UnboundedReceiver<(ResponseChannel<FetchResponse>, FetchResponse)>,
    agg_tx: mpsc::UnboundedSender<AggregateDone>,
    agg_rx: mpsc::UnboundedReceiver<AggregateDone>,
    book: RoundBook,
    anchor: Arc<Vec<f32>>,
    anchor_hash: WeightsHash,
    outer: Option<OuterOptimizer>,
    own_head: Option<Head>,
    verdict_head: Option<(u64, VerdictHash)>,
    phase: Phase,
    phase_since: Instant,
    members: HashMap<PeerId, AuthorId>,
    /// Every peer that ever joined the run (banned ones included): the start
    /// barrier counts these, or a peer banned while gathering would stall it.
    joined: HashSet<PeerId>,
    connected: HashSet<PeerId>,
    banned: HashSet<AuthorId>,
    wanted: HashMap<PayloadHash, Want>,
    requests: HashMap<OutboundRequestId, RequestFor>,
    own: Option<OwnRound>,
    reputation: Reputation,
    /// Attack state (testnets only).
    collusion: Option<Collusion>,
    attack_encoder: Option<DeltaEncoder>,
    first_payload: Option<Vec<u8>>,
    equivocation: Option<(meshtrain_ledger::SignedRecord, Vec<u8>)>,
    last_eval: Option<(u64, Option<Evaluation>, StepStats, u64)>,
    final_eval: Option<EvalReport>,
    /// Early stopping on the held-out loss (the spec's patience).
    early: Option<EarlyStopping>,
    /// The round after the last one: the spec's count, or earlier once
    /// early stopping fires.
    end_round: u64,
    counters: Counters,
    history: Vec<RoundRecord>,
    recorded_rejections: HashSet<meshtrain_ledger::RecordHash>,
    started: Instant,
    last_served: Instant,
    listen_written: bool,
}

impl Node {
    /// Loads identity, data, model and ledger, and starts the swarm, the
    /// trainer and the inbox.
    pub async fn start(opts: NodeOptions) -> Result<Self, NodeError> {
        std::fs::create_dir_all(&opts.data_dir).map_err(|source| NodeError::Io {
            path: opts.data_dir.clone(),
            source,
        })?;
        let identity = Identity::load_or_create(&opts.data_dir)?;
        let me = identity.author.author();
        let spec = opts.spec.clone();
        let run_id = spec.run_id();
        let (index, count) = opts.shard;

        let store = BlockStore::open(&opts.data.clone().unwrap_or_else(|| opts.data_dir.join("blocks")))?;
        let manifest = store.manifest(&spec.data.manifest)?;
        meshtrain_model::set_threads(opts.threads);
        let net = Network::new(spec.model.arch, &spec.data.schema, opts.device)?;
        info!(model = %spec.model.arch, params = net.param_count(), device = ?opts.device, "model built");
        let genesis = net.layout().genesis(spec.seed);
        let buffers = net.layout().buffer_ranges();
        let params = genesis.len();
        let genesis_hash = WeightsHash::of_f32(&genesis);

        let meta = RunMeta {
            run_id,
            owner: me,
            genesis_weights: genesis_hash,
            run_spec: spec.canonical_bytes(),
        };
        let ledger = Arc::new(Ledger::open_or_create(
            &opts.data_dir.join("ledger"),
            &meta,
            StoreOptions {
                sync_writes: opts.sync_writes,
            },
        )?);
        // A restart: the ledger holds our chain (its seq continues) and
        // perhaps a checkpoint; peers tell us where the mesh is now.
        let restarted = ledger.head(&me).is_some();
        let checkpoint = Checkpoint::load(&opts.data_dir, &run_id)?;

        let cfg = TrainConfig {
            batch_size: spec.train.batch_size,
            lr: spec.train.lr,
            label_flip: opts.attack.is_some_and(|a| a.is_label_flip()),
            anomaly_class: spec.model.anomaly_class,
        };
        // Batch-norm statistics go exactly, outside the lossy code.
        let encoder = DeltaEncoder::new(spec.exchange.codec, params).with_exact_ranges(buffers.clone());

        let mut registry = Registry::default();
        let metrics = NodeMetrics::register(&mut registry);
        let inbox = inbox::spawn(
            ledger.clone(),
            InboxConfig {
                metrics: Some(metrics.clone()),
                run_id,
                genesis: meta.genesis_link(),
                params,
                rounds: spec.rounds.count,
                retention: opts.retention,
            },
        )?;

        let topic = run_topic(&run_id.to_string());
        let mut swarm = build_swarm(identity.keypair.clone(), &opts.mesh, &topic, &mut registry)?;
        let p2p_metrics = libp2p::metrics::Metrics::new(&mut registry);
        let registry = Arc::new(std::sync::Mutex::new(registry));
        let metrics_addr = match opts.metrics {
            Some(addr) => Some(
                crate::metrics::serve(addr, registry.clone(), metrics.clone()).map_err(|e| NodeError::Listen {
                    addr: format!("metrics {addr}"),
                    detail: e.to_string(),
                })?,
            ),
            None => None,
        };
        for addr in &opts.listen {
            swarm.listen_on(addr.clone()).map_err(|e| NodeError::Listen {
                addr: addr.to_string(),
                detail: e.to_string(),
            })?;
        }
        for addr in &opts.bootstrap {
            if let Some(peer) = peer_of_addr(addr) {
                swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            }
            if let Err(e) = swarm.dial(addr.clone()) {
                warn!(%addr, error = %e, "cannot dial bootstrap peer");
            }
        }

        let outer = OuterOptimizer::new(
            OuterConfig {
                lr: spec.exchange.outer_lr,
                momentum: spec.exchange.outer_momentum,
                nesterov: spec.exchange.nesterov,
            },
            params,
            buffers.clone(),
        );
        let attack_buffers = buffers;
        let wait = AdaptiveWait::new(
            Duration::from_millis(spec.rounds.min_wait_ms),
            Duration::from_millis(spec.rounds.max_wait_ms),
        );
        let (serve_tx, serve_rx) = mpsc::unbounded_channel();
        let (missing_tx, missing_rx) = mpsc::unbounded_channel();
        let (agg_tx, agg_rx) = mpsc::unbounded_channel();
        if let Some(a) = opts.attack {
            warn!(attack = %a, "THIS NODE IS AN ATTACKER (testnet/test mode): it will send poisoned updates");
        }
        let verdict_head = ledger.verdict_head().map(|h| (h.seq, h.hash));
        let spec_codec = spec.exchange.codec;
        let spec_seed = spec.seed;
        // Resume from the checkpoint if it matches the verdict chain;
        // otherwise from a replay of the ledger (payloads are kept).
        let mut outer = outer;
        let mut resume = (0u64, genesis.clone(), genesis_hash);
        if restarted || checkpoint.is_some() {
            let head = ledger.verdict_head();
            match (&checkpoint, head) {
                (Some(cp), Some(h)) if cp.anchor_hash() == h.anchor && cp.round == h.round + 1 => {
                    outer.set_velocity(cp.velocity.clone());
                    resume = (cp.round, cp.anchor.clone(), h.anchor);
                }
                (_, Some(h)) => match crate::replay::replay_state(&ledger) {
                    Ok(state) if state.anchor_hash == h.anchor => {
                        outer.set_velocity(state.velocity);
                        resume = (h.round + 1, state.anchor, h.anchor);
                    }
                    Ok(_) | Err(_) => warn!("cannot rebuild the anchor from the ledger; peers will supply it"),
                },
                _ => {}
            }
            info!(round = resume.0, own_seq = ?ledger.head(&me).map(|h| h.seq.0), "restarting from the data dir");
        }
        Ok(Self {
            book: RoundBook::new(resume.0, spec.exchange.staleness, spec.exchange.staleness_decay, wait),
            spec,
            run_id,
            me,
            key: identity.author,
            own_head: ledger.head(&me),
            verdict_head,
            ledger,
            swarm,
            topic,
            registry,
            metrics,
            p2p_metrics,
            metrics_addr,
            deny: opts.deny_peers.clone().map(|file| deny::DenyList {
                file,
                modified: None,
                peers: HashSet::new(),
            }),
            mesh: opts.mesh,
            data_dir: opts.data_dir,
            attack: opts.attack,
            shard: format!("{index}/{count}"),
            wait_peers: opts.wait_peers,
            wait_peers_timeout: opts.wait_peers_timeout,
            drain: opts.drain,
            eval_every: opts.eval_every.max(1),
            inbox,
            trainer: None,
            pending_trainer: Some((net, cfg, encoder)),
            shard_seed: spec_seed ^ ((index as u64 + 1) << 32),
            store,
            manifest,
            plan: None,
            block_wants: BTreeMap::new(),
            fetch: FetchStats::default(),
            missing_tx,
            missing_rx,
            replan_at: None,
            sync: None,
            attestation: None,
            pending_adoption: None,
            behind_checked: None,
            joins: Vec::new(),
            checkpoint_every: opts.checkpoint_every,
            restored: checkpoint,
            restarted,
            serve_tx,
            serve_rx,
            agg_tx,
            agg_rx,
            anchor: Arc::new(resume.1),
            anchor_hash: resume.2,
            outer: Some(outer),
            phase: Phase::Gathering,
            phase_since: Instant::now(),
            members: HashMap::new(),
            joined: HashSet::new(),
            connected: HashSet::new(),
            banned: HashSet::new(),
            wanted: HashMap::new(),
            requests: HashMap::new(),
            own: None,
            reputation: Reputation::new(opts.reputation),
            collusion: None,
            attack_encoder: opts
                .attack
                .filter(|a| a.colludes())
                .map(|_| DeltaEncoder::new(spec_codec, params).with_exact_ranges(attack_buffers)),
            first_payload: None,
            equivocation: None,
            last_eval: None,
            final_eval: None,
            early: opts.spec.rounds.patience.map(EarlyStopping::new),
            end_round: opts.spec.rounds.count,
            counters: Counters::default(),
            history: Vec::new(),
            recorded_rejections: HashSet::new(),
            started: Instant::now(),
            last_served: Instant::now(),
            listen_written: false,
        })
    }

    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// Runs the node until its last round is done and drained, or until
    /// `shutdown` resolves. Writes `DIR/results.json` either way.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<NodeReport, NodeError> {
        let span = info_span!("node", id = %short_peer(&self.peer_id()));
        async move {
            info!(run = %self.run_id.short(), shard = %self.shard, params = self.anchor.len(), "node started");
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut entropy = tokio::time::interval(Duration::from_secs(2));
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    event = self.swarm.select_next_some() => self.on_swarm(event),
                    Some(reply) = next_reply(&mut self.trainer) => self.on_trainer(reply)?,
                    Some(hash) = self.missing_rx.recv() => self.refetch(hash),
                    Some(done) = self.inbox.done.recv() => self.on_inbox(done)?,
                    Some((channel, response)) = self.serve_rx.recv() => {
                        let _ = self.swarm.behaviour_mut().fetch.send_response(channel, response);
                    }
                    Some(done) = self.agg_rx.recv() => self.on_aggregated(done)?,
                    _ = tick.tick() => {
                        if self.on_tick()? {
                            break;
                        }
                    }
                    _ = entropy.tick() => self.anti_entropy(),
                    _ = &mut shutdown => {
                        info!("shutdown requested");
                        break;
                    }
                }
            }
            let report = self.report();
            write_json(&self.data_dir.join("results.json"), &report)?;
            if let Some(t) = self.trainer.take() {
                t.stop();
            }
            // The inbox thread holds the ledger: let it finish its queue and
            // close RocksDB before the process exits.
            drop(self.inbox.jobs);
            let _ = self.inbox.thread.join();
            Ok(report)
        }
        .instrument(span)
        .await
    }

    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        self.phase_since = Instant::now();
    }

    fn round(&self) -> u64 {
        self.book.current()
    }

    // ---- network --------------------------------------------------------

    /// Gauges that are cheaper to read once a round than to keep current.
    fn update_gauges(&self, bytes: meshtrain_gossip::ByteCounts) {
        self.metrics.round.set(self.round() as i64);
        self.metrics.bytes_in.set(bytes.inbound as i64);
        self.metrics.bytes_out.set(bytes.outbound as i64);
        self.metrics.peers.set(self.members.len() as i64);
        self.metrics.ledger_records.set(self.ledger.record_count() as i64);
        self.metrics.ledger_bytes.set(dir_bytes(self.ledger.path()) as i64);
    }

    fn byte_counts(&self) -> meshtrain_gossip::ByteCounts {
        match self.registry.lock() {
            Ok(r) => byte_counts(&r),
            Err(_) => meshtrain_gossip::ByteCounts::default(),
        }
    }

    fn on_swarm(&mut self, event: SwarmEvent<MeshBehaviourEvent>) {
        self.p2p_metrics.record(&event);
        match &event {
            SwarmEvent::Behaviour(MeshBehaviourEvent::Gossipsub(ev)) => self.p2p_metrics.record(ev),
            SwarmEvent::Behaviour(MeshBehaviourEvent::Identify(ev)) => self.p2p_metrics.record(ev),
            SwarmEvent::Behaviour(MeshBehaviourEvent::Kad(ev)) => self.p2p_metrics.record(ev),
            _ => {}
        }
        let banned = &self.banned;
        meshtrain_gossip::discovery::on_event(&mut self.swarm, &event, |p| {
            !ed25519_of(p).is_some_and(|a| banned.contains(&AuthorId(a)))
        });
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.write_listen_addrs();
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                self.connected.insert(peer_id);
                if let Some(author) = ed25519_of(&peer_id).map(AuthorId) {
                    if self.banned.contains(&author) {
                        let _ = self.swarm.disconnect_peer_id(peer_id);
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                if num_established == 0 {
                    self.connected.remove(&peer_id);
                    if let Some(author) = self.members.remove(&peer_id) {
                        info!(peer = %short_peer(&peer_id), round = self.round(), "peer left");
                        self.book.forget(&author);
                        self.schedule_replan();
                    }
                }
            }
            SwarmEvent::Behaviour(MeshBehaviourEvent::Gossipsub(ev)) => self.on_gossip(ev),
            SwarmEvent::Behaviour(MeshBehaviourEvent::Fetch(ev)) => self.on_fetch(ev),
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id.map(|p| short_peer(&p)), %error, "dial failed");
            }
            _ => {}
        }
    }

    fn is_banned_peer(&self, peer: &PeerId) -> bool {
        ed25519_of(peer).is_some_and(|a| self.banned.contains(&AuthorId(a)))
    }

    fn write_listen_addrs(&mut self) {
        let peer = self.peer_id();
        let addrs: Vec<String> = self.swarm.listeners().map(|a| format!("{a}/p2p/{peer}")).collect();
        if addrs.is_empty() {
            return;
        }
        let body = serde_json::json!({
            "peer_id": peer.to_string(),
            "author": self.me.to_string(),
            "metrics": self.metrics_addr.map(|a| format!("http://{a}/metrics")),
            "run_id": self.run_id.to_string(),
            "addrs": addrs,
        });
        if let Err(e) = write_json(&self.data_dir.join("listen.json"), &body) {
            warn!(error = %e, "cannot write listen.json");
        }
        self.listen_written = true;
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let origin = Origin::Gossip {
                    message_id,
                    source: propagation_source,
                };
                match GossipMessage::from_bytes(&message.data) {
                    Ok(GossipMessage::Update { record, payload }) => {
                        self.counters.received += 1;
                        self.metrics.updates_received.inc();
                        if payload.as_ref().is_some_and(|p| p.len() > self.mesh.max_inline_payload) {
                            self.count_rejection("oversized-inline", None);
                            self.report_validation(&origin, &Outcome::Invalid(RejectReason::Malformed));
                            return;
                        }
                        self.send_job(Job::Record {
                            bytes: record,
                            payload,
                            origin,
                        });
                    }
                    Ok(GossipMessage::Equivocation { proof }) => self.send_job(Job::Proof { bytes: proof, origin }),
                    Err(e) => {
                        warn!(peer = %short_peer(&propagation_source), error = %e, round = self.round(), "rejected garbage gossip");
                        self.count_rejection("malformed", None);
                        self.report_validation(&origin, &Outcome::Invalid(RejectReason::Malformed));
                    }
                }
            }
            gossipsub::Event::Subscribed { peer_id, topic } if topic == self.topic.hash() => {
                if let Some(author) = ed25519_of(&peer_id).map(AuthorId) {
                    self.joined.insert(peer_id);
                    if !self.banned.contains(&author) && self.members.insert(peer_id, author).is_none() {
                        info!(peer = %short_peer(&peer_id), members = self.members.len(), "peer joined the run");
                        self.schedule_replan();
                    }
                }
            }
            gossipsub::Event::Unsubscribed { peer_id, topic } if topic == self.topic.hash() => {
                self.members.remove(&peer_id);
            }
            _ => {}
        }
    }

    /// Maps an outcome onto gossipsub's acceptance for gossiped messages.
    /// Reject (which penalises the forwarding peer) only when the message
    /// alone shows the fault; state-dependent faults are handled through
    /// proofs and bans of the author instead.
    fn report_validation(&mut self, origin: &Origin, outcome: &Outcome) {
        if let Origin::Gossip { message_id, source } = origin {
            let acceptance = match outcome {
                Outcome::Accepted => MessageAcceptance::Accept,
                Outcome::Ignored(_) => MessageAcceptance::Ignore,
                Outcome::Invalid(reason) if reason.blames_the_forwarder() => MessageAcceptance::Reject,
                Outcome::Invalid(_) => MessageAcceptance::Ignore,
            };
            self.swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(message_id, source, acceptance);
        }
    }

    fn on_fetch(&mut self, event: request_response::Event<FetchRequest, FetchResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    if request == FetchRequest::Anchor && !self.is_banned_peer(&peer) {
                        let response = self.anchor_response();
                        let _ = self.swarm.behaviour_mut().fetch.send_response(channel, response);
                        return;
                    }
                    if self.is_banned_peer(&peer) {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .fetch
                            .send_response(channel, FetchResponse::Refused("banned".into()));
                        return;
                    }
                    self.last_served = Instant::now();
                    let ledger = self.ledger.clone();
                    let store = self.store.clone();
                    let tx = self.serve_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let response = match &request {
                            FetchRequest::Block { hash } => match store.serve(&hex::encode(hash)) {
                                Ok(Some(bytes)) => FetchResponse::Block(bytes),
                                Ok(None) => FetchResponse::NotFound,
                                Err(e) => FetchResponse::Refused(e.to_string()),
                            },
                            _ => crate::serve::answer(&ledger, &request),
                        };
                        let _ = tx.send((channel, response));
                    });
                }
                request_response::Message::Response { request_id, response } => {
                    self.on_response(peer, request_id, response);
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                peer,
                error,
                ..
            } => {
                debug!(peer = %short_peer(&peer), %error, "fetch failed");
                match self.requests.remove(&request_id) {
                    Some(RequestFor::Payload(hash)) => self.payload_attempt_failed(hash),
                    Some(RequestFor::Block(hash)) => self.block_attempt_failed(&hash),
                    Some(RequestFor::Anchor) => self.anchor_request_failed(peer),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn on_response(&mut self, peer: PeerId, id: OutboundRequestId, response: FetchResponse) {
        match (self.requests.remove(&id), response) {
            (Some(RequestFor::Payload(hash)), FetchResponse::Payload(bytes)) => {
                self.send_job(Job::Payload {
                    hash,
                    bytes,
                    from: peer,
                });
            }
            (Some(RequestFor::Payload(hash)), _) => self.payload_attempt_failed(hash),
            (Some(RequestFor::Block(hash)), FetchResponse::Block(bytes)) => self.on_block(hash, peer, bytes),
            (Some(RequestFor::Block(hash)), _) => self.block_attempt_failed(&hash),
            (Some(RequestFor::Anchor), response) => self.on_anchor_response(peer, response),
            (Some(RequestFor::Records), FetchResponse::Records(records)) => {
                for bytes in records {
                    self.send_job(Job::Record {
                        bytes,
                        payload: None,
                        origin: Origin::Fetched { from: peer },
                    });
                }
            }
            (Some(RequestFor::Heads), FetchResponse::Heads(heads)) => {
                for h in heads {
                    let author = AuthorId(h.author);
                    if author == self.me || self.banned.contains(&author) {
                        continue;
                    }
                    let ours = self.ledger.head(&author).map(|h| h.seq.0 + 1).unwrap_or(0);
                    if h.seq + 1 > ours {
                        self.request_records(peer, author, Seq(ours));
                    }
                }
            }
            _ => {}
        }
    }

    fn request_records(&mut self, peer: PeerId, author: AuthorId, from: Seq) {
        let id = self.swarm.behaviour_mut().fetch.send_request(
            &peer,
            FetchRequest::Records {
                author: author.0,
                from_seq: from.0,
                max: crate::serve::MAX_RECORDS_PER_RESPONSE,
            },
        );
        self.requests.insert(id, RequestFor::Records);
    }

    /// Asks a random member for its chain heads, to fill what gossip missed.
    fn anti_entropy(&mut self) {
        if self.members.is_empty() {
            return;
        }
        let peers: Vec<PeerId> = self.members.keys().copied().collect();
        let peer = peers[rand::random_range(0..peers.len())];
        let id = self
            .swarm
            .behaviour_mut()
            .fetch
            .send_request(&peer, FetchRequest::Heads);
        self.requests.insert(id, RequestFor::Heads);
    }

    /// Whether the node takes part in rounds yet (before, updates of the
    /// mesh are history to it: no payloads to fetch, no verdicts to give).
    fn in_rounds(&self) -> bool {
        !matches!(self.phase, Phase::Gathering | Phase::Fetching | Phase::Syncing)
    }

    /// Whether an update for `round` may still matter to this node: not
    /// behind the staleness window, and (before the node trains, when its
    /// round is only a guess) not far ahead of where it starts.
    fn round_matters(&self, round: u64) -> bool {
        round + self.spec.exchange.staleness >= self.round() && (self.in_rounds() || round <= self.round() + 1)
    }

    fn want_payload(&mut self, hash: PayloadHash, author: AuthorId, round: u64, first: Option<PeerId>) {
        if self.wanted.contains_key(&hash) || !self.round_matters(round) {
            return;
        }
        let mut candidates = VecDeque::new();
        if let Some(p) = first {
            candidates.push_back(p);
        }
        if let Ok(p) = peer_id_of(&author.0) {
            if !candidates.contains(&p) {
                candidates.push_back(p);
            }
        }
        for p in self.members.keys() {
            if !candidates.contains(p) {
                candidates.push_back(*p);
            }
        }
        self.wanted.insert(
            hash,
            Want {
                author,
                round,
                candidates,
                attempts: 0,
                in_flight: false,
                retry_at: None,
            },
        );
        self.next_payload_attempt(hash);
    }

    fn next_payload_attempt(&mut self, hash: PayloadHash) {
        let Some(want) = self.wanted.get_mut(&hash) else { return };
        let max_attempts = (want.candidates.len() as u32).max(1) * 3;
        if want.attempts >= max_attempts {
            let w = self.wanted.remove(&hash);
            if let Some(w) = w {
                warn!(author = %w.author.short(), round = w.round, "no peer could supply a payload");
                self.book.unannounce(w.round, &w.author);
                if let Ok(Some(rec)) = self
                    .ledger
                    .head(&w.author)
                    .map_or(Ok(None), |h| self.ledger.record(&w.author, h.seq))
                {
                    if rec.record.payload_hash == hash {
                        self.book.reject(VerdictEntry {
                            author: w.author,
                            seq: rec.record.seq,
                            record_hash: rec.hash(),
                            round: w.round,
                            verdict: Verdict::Rejected {
                                reason: RejectReason::PayloadUnavailable,
                            },
                        });
                    }
                }
            }
            return;
        }
        let Some(peer) = want.candidates.pop_front() else {
            return;
        };
        want.candidates.push_back(peer);
        want.attempts += 1;
        want.in_flight = true;
        want.retry_at = None;
        let id = self
            .swarm
            .behaviour_mut()
            .fetch
            .send_request(&peer, FetchRequest::Payload { hash: hash.0 });
        self.requests.insert(id, RequestFor::Payload(hash));
    }

    fn payload_attempt_failed(&mut self, hash: PayloadHash) {
        if let Some(w) = self.wanted.get_mut(&hash) {
            w.in_flight = false;
            // Back off a little: the peer may not have fetched it yet either.
            w.retry_at = Some(Instant::now() + Duration::from_millis(300));
        }
    }

    // ---- inbox ----------------------------------------------------------

    fn send_job(&mut self, job: Job) {
        if self.inbox.jobs.send(job).is_err() {
            warn!("the inbox thread is gone");
        }
    }

    fn count_rejection(&mut self, reason: &str, author: Option<&AuthorId>) {
        self.counters.rejected += 1;
        self.metrics.outcome("rejected", reason);
        *self.counters.rejected_by_reason.entry(reason.to_string()).or_default() += 1;
        if let Some(a) = author {
            *self.counters.rejected_by_author.entry(a.to_string()).or_default() += 1;
        }
    }

    fn on_inbox(&mut self, done: Done) -> Result<(), NodeError> {
        match done {
            Done::Record(done) => self.on_record(*done),
            Done::Payload { hash, from, result } => match result {
                Ok(done) => {
                    self.wanted.remove(&hash);
                    self.on_record(*done);
                }
                Err(inbox::PayloadFault::NotThePayload) => {
                    warn!(peer = %short_peer(&from), payload = %hash.short(), "peer served bytes that are not the payload");
                    self.payload_attempt_failed(hash);
                }
                Err(_) => {
                    if let Some(w) = self.wanted.remove(&hash) {
                        self.book.unannounce(w.round, &w.author);
                    }
                }
            },
            Done::OwnStored { signed, payload } => self.publish_own(signed, payload),
            Done::OwnFailed(e) => return Err(NodeError::Trainer(format!("storing own record: {e}"))),
            Done::VerdictStored { round } => debug!(round, "verdict block stored"),
            Done::VerdictFailed(e) => return Err(NodeError::Trainer(format!("storing verdict block: {e}"))),
            Done::Proof { origin, outcome, proof } => {
                self.report_validation(&origin, &outcome);
                if let Some(p) = proof {
                    self.ban(p.author(), "equivocation proof");
                }
            }
        }
        Ok(())
    }

    fn on_record(&mut self, done: RecordDone) {
        self.report_validation(&done.origin, &done.outcome);
        let source = match &done.origin {
            Origin::Gossip { source, .. } => Some(*source),
            Origin::Fetched { from } => Some(*from),
            Origin::Buffered => None,
        };
        if let Outcome::Invalid(reason) = &done.outcome {
            warn!(
                round = self.round(),
                author = ?done.author.map(|a| a.short()),
                seq = ?done.seq.map(|s| s.0),
                from = ?source.map(|p| short_peer(&p)),
                %reason,
                "rejected update"
            );
            if reason != &RejectReason::PayloadHashMismatch {
                self.count_rejection(reason.code(), done.author.as_ref());
            }
        }
        if let Outcome::Ignored("banned author") = done.outcome {
            self.count_rejection("banned", done.author.as_ref());
        }
        if let Some(entry) = done.rejection {
            self.book.unannounce(entry.round, &entry.author);
            if self.recorded_rejections.insert(entry.record_hash) {
                if let Some(ban) = self.reputation.observe(entry.author, &entry.verdict) {
                    self.ban(entry.author, &ban.to_string());
                }
                self.book.reject(entry);
            }
        }
        if let Some(proof) = done.proof {
            let author = proof.author();
            let msg = GossipMessage::Equivocation {
                proof: proof.to_bytes(),
            };
            let _ = self
                .swarm
                .behaviour_mut()
                .gossipsub
                .publish(self.topic.clone(), msg.to_bytes());
            self.ban(author, "equivocation");
        }
        if let (Some(author), Some(from)) = (done.author, done.gap_from) {
            if let Some(peer) = source {
                self.request_records(peer, author, from);
            }
        }
        if done.need_payload {
            if let (Some(hash), Some(author), Some(round)) = (done.payload_hash, done.author, done.round) {
                if self.round_matters(round) && !self.banned.contains(&author) {
                    self.book.announce(round, author);
                }
                self.want_payload(hash, author, round, source);
            }
        }
        if let Some(c) = done.contribution {
            self.offer(c);
        }
    }

    fn offer(&mut self, c: Contribution) {
        if self.banned.contains(&c.author) {
            return;
        }
        debug!(round = self.round(), author = %c.author.short(), for_round = c.round, "update verified");
        let (author, seq, hash, round) = (c.author, c.seq, c.record_hash, c.round);
        if self.book.offer(c) == crate::round::Offer::Stale {
            self.count_rejection("stale", Some(&author));
            debug!(author = %author.short(), seq = seq.0, record = %hash.short(), round, "stale update");
        }
    }

    fn ban(&mut self, author: AuthorId, why: &str) {
        if author == self.me || !self.banned.insert(author) {
            return;
        }
        self.book.forget(&author);
        self.book.unannounce(self.round(), &author);
        warn!(author = %author.short(), round = self.round(), why, "banning author");
        self.send_job(Job::Ban(author));
        if let Ok(peer) = peer_id_of(&author.0) {
            let gs = &mut self.swarm.behaviour_mut().gossipsub;
            gs.blacklist_peer(&peer);
            gs.set_application_score(&peer, -1000.0);
            self.members.remove(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
            self.schedule_replan();
        }
    }

    // ---- rounds ---------------------------------------------------------

    fn trainer_cmd(&self, cmd: TrainerCmd) -> Result<(), NodeError> {
        self.trainer
            .as_ref()
            .ok_or_else(|| NodeError::Trainer("the trainer has not started".into()))?
            .cmd
            .send(cmd)
            .map_err(|_| NodeError::Trainer("the trainer thread is gone".into()))
    }

    fn start_round(&mut self) -> Result<(), NodeError> {
        let round = self.round();
        if self.republish_own(round) {
            return Ok(());
        }
        self.trainer_cmd(TrainerCmd::Round {
            round,
            anchor: self.anchor.clone(),
            steps: self.spec.train.local_steps,
            evaluate: round % self.eval_every == 0,
        })?;
        self.set_phase(Phase::Training);
        Ok(())
    }

    fn on_trainer(&mut self, reply: TrainerReply) -> Result<(), NodeError> {
        match reply {
            TrainerReply::RoundDone {
                round,
                eval,
                eval_ms,
                stats,
                payload,
                decoded,
                train_ms,
                encode_ms,
            } => {
                self.metrics.stage("train", Duration::from_millis(train_ms));
                self.metrics.stage("encode", Duration::from_millis(encode_ms));
                self.metrics.train_loss.set(f64::from(stats.mean_loss));
                if let Some(e) = eval {
                    self.metrics.test_acc.set(f64::from(e.accuracy));
                    self.metrics.test_loss.set(f64::from(e.loss));
                    info!(
                        round,
                        test_acc = format_args!("{:.4}", e.accuracy),
                        test_loss = format_args!("{:.4}", e.loss),
                        eval_ms,
                        "evaluated the anchor"
                    );
                    if let Some(early) = self.early.as_mut() {
                        if early.observe(round, e.loss) && self.end_round > round + 1 {
                            // This round still closes, so peers waiting on
                            // our record for it get one.
                            self.end_round = round + 1;
                            info!(
                                round,
                                best_round = early.best_round,
                                best_loss = early.best_loss,
                                patience = early.patience,
                                "early stopping: the held-out loss stopped improving"
                            );
                        }
                    }
                }
                info!(
                    round,
                    train_loss = format_args!("{:.4}", stats.mean_loss),
                    train_ms,
                    encode_ms,
                    payload_bytes = payload.len(),
                    "trained"
                );
                if self.attack.is_some_and(|a| a.colludes()) {
                    let now = Instant::now();
                    self.collusion = Some(Collusion {
                        round,
                        raw: decoded,
                        eval,
                        stats,
                        train_ms,
                        since: now,
                        seen: 0,
                        seen_changed: now,
                    });
                    self.set_phase(Phase::Colluding);
                    return Ok(());
                }
                self.sign_and_store(round, payload, decoded, eval, stats, train_ms);
            }
            TrainerReply::Evaluated { round, report } => {
                let eval = report.summary;
                self.metrics.test_acc.set(f64::from(eval.accuracy));
                self.metrics.test_loss.set(f64::from(eval.loss));
                info!(
                    round,
                    test_acc = format_args!("{:.4}", eval.accuracy),
                    test_loss = format_args!("{:.4}", eval.loss),
                    perplexity = eval.perplexity,
                    roc_auc = eval.roc_auc,
                    macro_f1 = eval.macro_f1,
                    "final evaluation"
                );
                self.final_eval = Some(report);
                self.set_phase(Phase::Draining);
            }
            TrainerReply::Checkpointed { round, result } => match result {
                Ok(()) => debug!(round, "checkpoint written"),
                Err(e) => warn!(round, error = %e, "checkpoint failed"),
            },
            TrainerReply::Failed(e) => return Err(NodeError::Trainer(e)),
        }
        Ok(())
    }

    /// Signs our update for `round`, stores it (synced) and, once stored,
    /// publishes it (see `publish_own`).
    fn sign_and_store(
        &mut self,
        round: u64,
        payload: Vec<u8>,
        decoded: Arc<Vec<f32>>,
        eval: Option<Evaluation>,
        stats: StepStats,
        train_ms: u64,
    ) {
        let payload = match self.attack {
            Some(a) => a.corrupt_payload(round, payload, self.anchor.len(), self.first_payload.as_ref()),
            None => payload,
        };
        if self.first_payload.is_none() {
            self.first_payload = Some(payload.clone());
        }
        let (seq, prev) = match self.own_head {
            None => (Seq(0), self.ledger.meta().genesis_link()),
            Some(h) => (h.seq.next(), h.hash),
        };
        let signed = UpdateRecord {
            version: RECORD_VERSION,
            run_id: self.run_id,
            author: self.me,
            seq,
            prev,
            round,
            base_hash: self.anchor_hash,
            payload_hash: PayloadHash::of(&payload),
            payload_len: payload.len() as u64,
            n_samples: stats.samples,
            train_loss: stats.mean_loss,
        }
        .sign(&self.key);
        self.own_head = Some(Head {
            seq,
            hash: signed.hash(),
        });
        if self.attack == Some(Attack::Equivocate) {
            // A second, different record at the same seq, for other peers.
            let negated: Vec<f32> = decoded.iter().map(|v| -v).collect();
            let other = codec::encode(self.spec.exchange.codec, &negated);
            let mut twin = signed.record.clone();
            twin.payload_hash = PayloadHash::of(&other);
            twin.payload_len = other.len() as u64;
            self.equivocation = Some((twin.sign(&self.key), other));
        }
        self.own = Some(OwnRound {
            round,
            eval,
            stats,
            decoded,
            train_ms,
        });
        self.counters.payload_bytes += payload.len() as u64;
        self.set_phase(Phase::Publishing);
        self.send_job(Job::Own { signed, payload });
    }

    /// A colluding attacker crafts its update once the honest updates of the
    /// round stop arriving (or after a few seconds).
    fn try_collude(&mut self, now: Instant) {
        let Some(c) = self.collusion.as_mut() else { return };
        let seen = self.book.for_round(c.round).filter(|x| x.author != self.me).count();
        if seen != c.seen {
            c.seen = seen;
            c.seen_changed = now;
        }
        let settled = seen > 0 && now.duration_since(c.seen_changed) > Duration::from_millis(500);
        if !settled && now.duration_since(c.since) < Duration::from_secs(5) {
            return;
        }
        let Some(c) = self.collusion.take() else { return };
        let Some(attack) = self.attack else { return };
        let honest: Vec<&[f32]> = self
            .book
            .for_round(c.round)
            .filter(|x| x.author != self.me)
            .map(|x| x.delta.as_slice())
            .collect();
        let crafted = attack.collude(&honest, &c.raw);
        info!(round = c.round, honest = honest.len(), %attack, "crafted a colluding update");
        let Some(encoder) = self.attack_encoder.as_mut() else {
            return;
        };
        match encoder.encode(&crafted) {
            Ok(e) => self.sign_and_store(c.round, e.bytes, Arc::new(e.decoded), c.eval, c.stats, c.train_ms),
            Err(e) => warn!(error = %e, "cannot encode the crafted update"),
        }
    }

    /// After a restart our record for ROUND may already be signed (the
    /// node died between publishing and closing the round). Training again
    /// would contribute twice; publish the stored record again and wait.
    fn republish_own(&mut self, round: u64) -> bool {
        let Some(head) = self.ledger.head(&self.me) else {
            return false;
        };
        let Ok(Some(signed)) = self.ledger.record(&self.me, head.seq) else {
            return false;
        };
        if signed.record.round != round {
            return false;
        }
        let Ok(Some(payload)) = self.ledger.payload(&signed.record.payload_hash) else {
            return false;
        };
        let Ok(decoded) = meshtrain_model::codec::decode(&payload, self.anchor.len()) else {
            return false;
        };
        info!(
            round,
            seq = head.seq.0,
            "our update for this round was signed before the restart; publishing it again"
        );
        self.own = Some(OwnRound {
            round,
            eval: None,
            stats: StepStats::default(),
            decoded: Arc::new(decoded),
            train_ms: 0,
        });
        self.publish_own(signed, payload);
        true
    }

    fn publish_own(&mut self, signed: meshtrain_ledger::SignedRecord, payload: Vec<u8>) {
        let Some(own) = self.own.take() else { return };
        let inline = (payload.len() <= self.mesh.max_inline_payload).then(|| payload.clone());
        let msg = GossipMessage::Update {
            record: signed.to_bytes(),
            payload: inline,
        };
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), msg.to_bytes())
        {
            debug!(round = own.round, error = %e, "publish failed (no peers yet?)");
        }
        if let Some((twin, twin_payload)) = self.equivocation.take() {
            let inline = (twin_payload.len() <= self.mesh.max_inline_payload).then_some(twin_payload);
            let msg = GossipMessage::Update {
                record: twin.to_bytes(),
                payload: inline,
            };
            let _ = self
                .swarm
                .behaviour_mut()
                .gossipsub
                .publish(self.topic.clone(), msg.to_bytes());
        }
        self.counters.published += 1;
        self.last_eval = Some((own.round, own.eval, own.stats, own.train_ms));
        self.book.offer(Contribution {
            author: self.me,
            seq: signed.record.seq,
            record_hash: signed.hash(),
            round: own.round,
            n_samples: signed.record.n_samples,
            base: signed.record.base_hash,
            delta: own.decoded,
        });
        self.book.own_ready(Instant::now());
        self.set_phase(Phase::Waiting);
    }

    fn connected_authors(&self) -> HashSet<AuthorId> {
        self.members
            .values()
            .filter(|a| !self.banned.contains(a))
            .copied()
            .collect()
    }

    /// Returns true when the node is done.
    fn on_tick(&mut self) -> Result<bool, NodeError> {
        let now = Instant::now();
        self.refresh_deny_list();
        self.check_behind(now);
        let retry: Vec<PayloadHash> = self
            .wanted
            .iter()
            .filter(|(_, w)| !w.in_flight && w.retry_at.is_some_and(|t| now >= t))
            .map(|(h, _)| *h)
            .collect();
        for hash in retry {
            self.next_payload_attempt(hash);
        }
        if self.replan_at.is_some_and(|t| now >= t) {
            self.replan_at = None;
            self.replan();
        }
        if self.phase != Phase::Fetching && !self.block_wants.is_empty() {
            // Re-replication and repairs go on in the background.
            self.fetch_tick(now)?;
        }
        if self.sync.is_some() {
            match self.sync_outcome(now) {
                SyncOutcome::Pending => {}
                SyncOutcome::Adopt(offer, attestations) => {
                    // The anchor is in use only while aggregating; a
                    // majority already a round ahead is taken at our close.
                    let now_ok = self.phase == Phase::Syncing
                        || (self.phase != Phase::Aggregating && offer.round == self.round());
                    // Waiting on a round the mesh has left behind: jump.
                    let jump = self.phase == Phase::Waiting && offer.round > self.round();
                    if now_ok {
                        self.adopt(*offer, attestations);
                    } else if jump {
                        self.adopt(*offer, attestations);
                        self.set_phase(Phase::Syncing);
                    } else {
                        self.pending_adoption = Some((*offer, attestations));
                    }
                }
                SyncOutcome::Nothing => {}
            }
            if self.sync.is_none() && self.phase == Phase::Syncing {
                info!(round = self.round(), "starting to train");
                // Records of this round that came in before we took part
                // need their payloads now.
                self.fetch_held_payloads();
                self.next_round_or_finish()?;
            }
        }
        match self.phase {
            Phase::Colluding => self.try_collude(now),
            Phase::Gathering => {
                let enough = self.joined.len() >= self.wait_peers;
                let waited = now.duration_since(self.phase_since);
                if enough || waited >= self.wait_peers_timeout {
                    if !enough {
                        warn!(
                            members = self.members.len(),
                            wanted = self.wait_peers,
                            "starting without all peers"
                        );
                    }
                    self.begin_data_phase();
                }
            }
            Phase::Fetching => self.fetch_tick(now)?,
            Phase::Waiting => {
                let expected = self.book.expected(&self.connected_authors());
                if let Some(how) = self.book.should_close(now, &expected) {
                    if how == Close::Deadline {
                        let have: HashSet<AuthorId> = self.book.for_round(self.round()).map(|c| c.author).collect();
                        let missing: Vec<String> = expected.difference(&have).map(|a| a.short()).collect();
                        info!(round = self.round(), ?missing, "round deadline passed");
                    }
                    let inputs = self.book.close(now, how);
                    self.check_minority(&inputs);
                    self.aggregate(inputs, now);
                }
            }
            Phase::Draining => {
                let elapsed = now.duration_since(self.phase_since);
                let complete = self.chains_complete();
                let quiet = now.duration_since(self.last_served) > Duration::from_millis(1500);
                if (complete && quiet && elapsed > Duration::from_millis(500)) || elapsed > self.drain {
                    if !complete {
                        warn!("leaving with incomplete chains (drain timeout)");
                    }
                    return Ok(true);
                }
            }
            _ => {}
        }
        Ok(false)
    }

    /// Whether we hold every connected member's record for the last round
    /// (a member that left cannot add to its chain any more).
    fn chains_complete(&self) -> bool {
        let last = self.end_round.saturating_sub(1);
        let authors: HashSet<AuthorId> = self.members.values().copied().collect();
        authors
            .iter()
            .filter(|a| !self.banned.contains(a))
            .all(|a| self.head_round(a).is_some_and(|r| r >= last))
    }

    /// The round of AUTHOR's newest record in our ledger.
    fn head_round(&self, author: &AuthorId) -> Option<u64> {
        let head = self.ledger.head(author)?;
        Some(self.ledger.record(author, head.seq).ok()??.record.round)
    }

    /// Waiting on a round while two or more members already sign records
    /// two rounds further on (a restart into a mesh that moved on): ask for
    /// the mesh's anchor instead of waiting out the deadline.
    fn check_behind(&mut self, now: Instant) {
        if self.phase != Phase::Waiting
            || self.sync.is_some()
            || now.duration_since(self.phase_since) < Duration::from_secs(2)
        {
            return;
        }
        if self
            .behind_checked
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.behind_checked = Some(now);
        let round = self.round();
        let ahead = self
            .members
            .values()
            .filter(|a| !self.banned.contains(a))
            .filter(|a| self.head_round(a).is_some_and(|r| r >= round + 2))
            .count();
        if ahead >= 2 {
            info!(
                round,
                ahead, "members are rounds ahead of us; asking for the mesh's anchor"
            );
            self.start_sync(SyncReason::Start, None, None);
        }
    }

    /// After a partition heals, the halves' updates are built on different
    /// anchors. Every node sees the same groups; the smaller group (ties:
    /// the larger anchor hash) takes the larger one's anchor over.
    fn check_minority(&mut self, inputs: &RoundInputs) {
        let mut groups: BTreeMap<WeightsHash, Vec<AuthorId>> = BTreeMap::new();
        for (c, _) in inputs.inputs.iter().filter(|(c, _)| c.round == inputs.round) {
            groups.entry(c.base).or_default().push(c.author);
        }
        if groups.len() < 2 {
            return;
        }
        let mine = groups.get(&self.anchor_hash).map_or(0, Vec::len);
        let Some((best, authors)) = groups
            .iter()
            .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))
        else {
            return;
        };
        let we_lose =
            *best != self.anchor_hash && (authors.len() > mine || (authors.len() == mine && *best < self.anchor_hash));
        // A node that just took an anchor over gives the mesh a few rounds
        // to settle before it second-guesses it.
        let settled = self.joins.last().is_none_or(|j| inputs.round >= j + MINORITY_SYNC_GAP);
        if we_lose && settled && authors.len() >= 2 && self.sync.is_none() {
            warn!(
                round = inputs.round,
                ours = mine,
                theirs = authors.len(),
                "our anchor is the minority's; syncing to the majority"
            );
            let among = authors.clone();
            self.start_sync(SyncReason::Minority, Some(&among), None);
        }
    }

    fn aggregate(&mut self, inputs: RoundInputs, now: Instant) {
        let Some(outer) = self.outer.take() else { return };
        self.set_phase(Phase::Aggregating);
        let anchor = self.anchor.clone();
        let spec = self.spec.exchange.aggregator;
        let me = self.me;
        let tx = self.agg_tx.clone();
        let wait = now.duration_since(self.phase_since);
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let done = run_aggregation(spec, &anchor, inputs, outer, me, wait);
            metrics.stage("aggregate", started.elapsed());
            let _ = tx.send(done);
        });
    }

    fn on_aggregated(&mut self, done: AggregateDone) -> Result<(), NodeError> {
        let base = self.anchor_hash;
        let new_hash = WeightsHash::of_f32(&done.anchor);
        let (mut merged, mut clipped, mut rejected) = (0u64, 0u64, 0u64);
        let mut bans = Vec::new();
        for e in &done.entries {
            if e.author == self.me {
                continue;
            }
            let from_aggregator =
                !matches!(&e.verdict, Verdict::Rejected { reason } if !matches!(reason, RejectReason::Outlier(_)));
            if from_aggregator {
                if let Some(ban) = self.reputation.observe(e.author, &e.verdict) {
                    bans.push((e.author, ban));
                }
            }
            let who = e.author.to_string();
            match &e.verdict {
                Verdict::Merged { .. } => {
                    merged += 1;
                    self.metrics.outcome("merged", "");
                    *self.counters.merged_by_author.entry(who).or_default() += 1;
                }
                Verdict::Clipped { .. } => {
                    clipped += 1;
                    self.metrics.outcome("clipped", "");
                    *self.counters.clipped_by_author.entry(who).or_default() += 1;
                }
                Verdict::Rejected { reason } => {
                    rejected += 1;
                    if matches!(reason, RejectReason::Outlier(_)) {
                        self.count_rejection(reason.code(), Some(&e.author));
                    }
                }
            }
        }
        self.counters.merged += merged;
        self.counters.clipped += clipped;
        for (author, ban) in bans {
            self.ban(author, &ban.to_string());
        }
        let (seq, prev) = match self.verdict_head {
            None => (0, self.ledger.meta().verdict_genesis()),
            Some((s, h)) => (s + 1, h),
        };
        let block = VerdictBlock {
            version: VERDICT_VERSION,
            run_id: self.run_id,
            owner: self.me,
            seq,
            prev,
            round: done.round,
            base_anchor: base,
            new_anchor: new_hash,
            outer_state: WeightsHash::of_f32(done.outer.velocity()),
            entries: done.entries,
        }
        .sign(&self.key);
        self.verdict_head = Some((seq, block.block.hash()));
        self.attestation = Some(block.clone());
        self.send_job(Job::Verdict(Box::new(block)));
        self.anchor = Arc::new(done.anchor);
        self.anchor_hash = new_hash;
        self.outer = Some(done.outer);

        let bytes = self.byte_counts();
        if let Some((round, eval, stats, train_ms)) = self.last_eval.take() {
            self.history.push(RoundRecord {
                round,
                test_loss: eval.map_or(f32::NAN, |e| e.loss),
                test_acc: eval.map_or(f32::NAN, |e| e.accuracy),
                train_loss: stats.mean_loss,
                merged: merged + 1,
                rejected,
                bytes_sent: bytes.outbound,
                bytes_received: bytes.inbound,
                at_ms: self.started.elapsed().as_millis() as u64,
                train_ms,
                wait_ms: done.wait.as_millis() as u64,
            });
        }
        self.update_gauges(bytes);
        let progress = serde_json::json!({
            "round": done.round,
            "rounds": self.spec.rounds.count,
            "test_acc": self.history.iter().rev().map(|r| r.test_acc).find(|a| a.is_finite()),
            "members": self.members.len(),
        });
        if let Err(e) = write_json(&self.data_dir.join("progress.json"), &progress) {
            debug!(error = %e, "cannot write progress.json");
        }
        // What a live dashboard shows: the report so far.
        if let Err(e) = write_json(&self.data_dir.join("live.json"), &self.report_with(bytes)) {
            debug!(error = %e, "cannot write live.json");
        }
        info!(
            round = done.round,
            merged = merged + 1,
            clipped,
            rejected,
            wait_ms = done.wait.as_millis() as u64,
            bytes_out = bytes.outbound,
            bytes_in = bytes.inbound,
            "round closed"
        );
        if let Some((offer, attestations)) = self.pending_adoption.take() {
            if offer.round >= self.round() {
                self.adopt(offer, attestations);
            }
        }
        if self.checkpoint_every > 0 && self.round() % self.checkpoint_every == 0 {
            let velocity = self.outer.as_ref().map(|o| o.velocity().to_vec()).unwrap_or_default();
            self.trainer_cmd(TrainerCmd::Checkpoint {
                dir: self.data_dir.clone(),
                run_id: self.run_id,
                round: self.round(),
                anchor: self.anchor.clone(),
                velocity,
            })?;
        }
        self.next_round_or_finish()
    }

    /// Trains the next round, or evaluates the final anchor when the run's
    /// rounds are done (also right after joining a mesh that is finishing).
    fn next_round_or_finish(&mut self) -> Result<(), NodeError> {
        if self.round() >= self.end_round {
            self.trainer_cmd(TrainerCmd::Evaluate {
                round: self.round(),
                anchor: self.anchor.clone(),
            })?;
            self.set_phase(Phase::Finishing);
            Ok(())
        } else {
            self.start_round()
        }
    }

    fn report(&self) -> NodeReport {
        self.report_with(self.byte_counts())
    }

    /// The report, with byte counts already read (reading them encodes the
    /// whole metrics registry).
    fn report_with(&self, bytes: meshtrain_gossip::ByteCounts) -> NodeReport {
        // Without a final evaluation (stopped early), the last one made.
        let last = self.history.iter().rev().find(|r| r.test_acc.is_finite());
        let eval = self.final_eval.as_ref().map_or_else(
            || Evaluation {
                loss: last.map_or(f32::NAN, |r| r.test_loss),
                accuracy: last.map_or(0.0, |r| r.test_acc),
                ..Default::default()
            },
            |r| r.summary,
        );
        NodeReport {
            peer_id: self.peer_id().to_string(),
            author: self.me.to_string(),
            honest: self.attack.is_none(),
            attack: self.attack.map(|a| a.to_string()),
            shard: self.shard.clone(),
            param_count: self.anchor.len() as u64,
            rounds_completed: self.history.len() as u64,
            final_test_acc: eval.accuracy,
            final_test_loss: eval.loss,
            final_task: meshtrain_testnet::report::TaskFigures {
                perplexity: eval.perplexity,
                roc_auc: eval.roc_auc,
                macro_f1: eval.macro_f1,
            },
            final_eval: self.final_eval.as_ref().and_then(|r| serde_json::to_value(r).ok()),
            stopped_early_at: (self.end_round < self.spec.rounds.count).then_some(self.end_round),
            best_round: self.early.as_ref().and_then(|e| e.best_round),
            bytes_sent: bytes.outbound,
            bytes_received: bytes.inbound,
            updates_published: self.counters.published,
            payload_bytes_mean: if self.counters.published == 0 {
                0.0
            } else {
                self.counters.payload_bytes as f64 / self.counters.published as f64
            },
            updates_received: self.counters.received,
            updates_merged: self.counters.merged,
            updates_clipped: self.counters.clipped,
            updates_rejected: self.counters.rejected,
            rejected_by_reason: self.counters.rejected_by_reason.clone(),
            rejected_by_author: self.counters.rejected_by_author.clone(),
            clipped_by_author: self.counters.clipped_by_author.clone(),
            merged_by_author: self.counters.merged_by_author.clone(),
            banned: self.banned.iter().map(|a| a.to_string()).collect(),
            peers_seen: self.ledger.heads().iter().map(|(a, _)| a.to_string()).collect(),
            label_histogram: match (&self.plan, &self.manifest) {
                (Some(p), Some(m)) => p.label_histogram(m),
                _ => Vec::new(),
            },
            primary_blocks: self.plan.as_ref().map_or(0, |p| p.primary.len() as u64),
            held_blocks: self.plan.as_ref().map_or(0, |p| p.held.len() as u64),
            blocks_fetched: self.fetch.blocks,
            bytes_fetched: self.fetch.bytes,
            data_fetch_ms: self.fetch.finished_ms,
            restarted: self.restarted,
            joined_at: self.joins.clone(),
            wall_s: self.started.elapsed().as_secs_f64(),
            history: self.history.clone(),
        }
    }
}

/// Aggregates one round (on a blocking thread) and steps the anchor.
/// Bytes of the files under DIR (the ledger's RocksDB files).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn run_aggregation(
    spec: AggregatorSpec,
    anchor: &[f32],
    inputs: RoundInputs,
    mut outer: OuterOptimizer,
    me: AuthorId,
    wait: Duration,
) -> AggregateDone {
    let agg_inputs: Vec<AggInput<'_>> = inputs
        .inputs
        .iter()
        .map(|(c, w)| AggInput {
            delta: c.delta.as_slice(),
            weight: *w,
        })
        .collect();
    let own = inputs
        .inputs
        .iter()
        .position(|(c, _)| c.author == me && c.round == inputs.round);
    let result = aggregate_deltas(spec, &agg_inputs, own);
    let mut new_anchor = anchor.to_vec();
    if !result.update.is_empty() {
        outer.step(&mut new_anchor, &result.update);
    }
    let mut entries: Vec<VerdictEntry> = inputs
        .inputs
        .iter()
        .zip(&result.verdicts)
        .map(|((c, _), v)| VerdictEntry {
            author: c.author,
            seq: c.seq,
            record_hash: c.record_hash,
            round: c.round,
            verdict: match v {
                AggVerdict::Merged { weight } => Verdict::Merged { weight: *weight },
                AggVerdict::Clipped { factor, weight } => Verdict::Clipped {
                    factor: *factor,
                    weight: *weight,
                },
                AggVerdict::Rejected { reason } => Verdict::Rejected {
                    reason: RejectReason::Outlier(reason.clone()),
                },
            },
        })
        .collect();
    entries.extend(inputs.rejections);
    AggregateDone {
        round: inputs.round,
        anchor: new_anchor,
        outer,
        entries,
        wait,
    }
}

/// Rounds between a join and the next minority sync.
const MINORITY_SYNC_GAP: u64 = 3;

/// The trainer's next reply, or never while it has not started.
async fn next_reply(trainer: &mut Option<TrainerHandle>) -> Option<TrainerReply> {
    match trainer {
        Some(t) => t.replies.recv().await,
        None => std::future::pending().await,
    }
}

fn peer_of_addr(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        meshtrain_gossip::libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

pub fn short_peer(peer: &PeerId) -> String {
    let s = peer.to_string();
    s[s.len().saturating_sub(8)..].to_string()
}

pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), NodeError> {
    let io = |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value).map_err(|e| io(e.into()))?;
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
