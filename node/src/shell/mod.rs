//! The shell around the core: the libp2p swarm, the RocksDB ledger (through
//! the inbox thread), the trainer thread, files and metrics. It turns what
//! happens into [`Input`]s for the [`Core`] and executes the [`Effect`]s it
//! returns; it decides nothing about the protocol.
//!
//! One `tokio::select!` over network events, the trainer's, the inbox's and
//! the workers' channels, and the next named timer. Heavy work (serving from
//! the ledger, aggregating, encoding and checking anchors, writing progress
//! files) runs on blocking tasks and reports back by message.

mod deny;
mod fetching;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use meshtrain_gossip::libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use meshtrain_gossip::libp2p::request_response::{self, InboundRequestId, OutboundRequestId, ResponseChannel};
use meshtrain_gossip::libp2p::swarm::SwarmEvent;
use meshtrain_gossip::libp2p::{Multiaddr, PeerId, Swarm};
use meshtrain_gossip::{
    build_swarm, byte_counts, run_topic, FetchRequest, FetchResponse, MeshBehaviour, MeshBehaviourEvent, MeshConfig,
};
use meshtrain_ledger::{AuthorId, Ledger, RunId, RunMeta, StoreOptions, WeightsHash};
use meshtrain_model::{DeltaEncoder, Evaluation, Network, TrainConfig};
use meshtrain_report::{ListenFile, NodeReport, Progress, RoundRecord, RoundTimes, TaskFigures};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::attack::Attack;
use crate::blockstore::BlockStore;
use crate::checkpoint::Checkpoint;
use crate::core::resume::{resume, SavedAnchor};
use crate::core::start::short;
use crate::core::sync::{check_fetched, check_offer, encode_anchor, Fetched, Offer};
use crate::core::{
    run_aggregation, Acceptance, AggregateDone, AnchorSnapshot, ChanId, Core, CoreConfig, Effect, Input, Millis,
    Origin, ReqId, RoundClosed, Timer,
};
use crate::identity::Identity;
use crate::inbox::thread::InboxHandle;
use crate::inbox::InboxConfig;
use crate::metrics::NodeMetrics;
use crate::replay::ModelShape;
use crate::reputation::ReputationConfig;
use crate::runspec::RunSpec;
use crate::trainer::{TrainerCmd, TrainerHandle, TrainerReply};
use crate::NodeError;

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

/// One of our outbound requests: the core's, or a block the data phase wants.
enum Outbound {
    Core(ReqId),
    Block(String),
}

/// What a blocking task hands back to the loop.
enum WorkerDone {
    Served {
        asker: Asker,
        response: FetchResponse,
    },
    AnchorEncoded {
        key: AnchorKey,
        response: FetchResponse,
    },
    Aggregated(Box<AggregateDone>),
    /// A worker the round cannot go on without panicked.
    Panicked {
        what: &'static str,
        message: String,
    },
    Checkpointed {
        round: u64,
        result: Result<(), NodeError>,
        took: Duration,
    },
    OfferChecked {
        peer: PeerId,
        result: Result<Box<Offer>, String>,
    },
    AnchorChecked {
        peer: PeerId,
        result: Result<Box<Fetched>, String>,
    },
}

/// Which anchor an encoded answer holds.
type AnchorKey = (u64, WeightsHash);

/// The anchors last encoded for peers (the newest few), those being
/// encoded, and who waits for which.
#[derive(Default)]
struct AnchorCache {
    encoded: std::collections::VecDeque<(AnchorKey, FetchResponse)>,
    encoding: HashSet<AnchorKey>,
    waiting: Vec<(AnchorKey, Asker)>,
}

/// Who asked for something, and where the answer goes.
struct Asker {
    peer: PeerId,
    id: InboundRequestId,
    channel: ResponseChannel<FetchResponse>,
}

/// Anchors kept encoded: the current one and the one before (peers a round
/// behind still ask for it).
const ANCHORS_ENCODED: usize = 2;

/// A checkpoint between the core's request and the file: the anchor it is
/// of, while the trainer snapshots its state, then the write in flight.
#[derive(Default)]
struct CheckpointState {
    due: Option<(u64, Arc<Vec<f32>>, Vec<f32>)>,
    writing: bool,
}

/// Timers of the shell itself (the core's are in `core_timers`).
const DENY_REFRESH: Duration = Duration::from_secs(1);

pub struct Node {
    core: Core,
    spec: RunSpec,
    run_id: RunId,
    me: AuthorId,
    genesis: WeightsHash,
    params: usize,
    ledger: Arc<Ledger>,
    swarm: Swarm<MeshBehaviour>,
    topic: IdentTopic,
    registry: Arc<std::sync::Mutex<Registry>>,
    metrics: NodeMetrics,
    p2p_metrics: libp2p::metrics::Metrics,
    metrics_addr: Option<std::net::SocketAddr>,
    deny: Option<deny::DenyList>,
    data_dir: PathBuf,
    /// The model's tensors, written beside the final anchor for export.
    layout: Vec<crate::export::Tensor>,
    attack: Option<Attack>,
    shard: String,
    inbox: InboxHandle,
    /// Started once the node holds its shard.
    trainer: Option<TrainerHandle>,
    /// What the trainer is built from, until then.
    pending_trainer: Option<(Network, TrainConfig, DeltaEncoder)>,
    /// Residual and Adam state to hand the trainer once it starts.
    restored: Option<Checkpoint>,
    data: fetching::DataPhase,
    outbound: HashMap<OutboundRequestId, Outbound>,
    /// Requests being answered, and who asked.
    channels: HashMap<ChanId, Asker>,
    /// Answers sent and not yet delivered: their peer, bytes and when
    /// they went out (the core holds the peer to a cap on these).
    unread: HashMap<InboundRequestId, (PeerId, u64, Instant)>,
    mesh_request_timeout: Duration,
    next_chan: u64,
    worker_tx: mpsc::UnboundedSender<WorkerDone>,
    worker_rx: mpsc::UnboundedReceiver<WorkerDone>,
    anchor_cache: AnchorCache,
    checkpoint: CheckpointState,
    core_timers: HashMap<Timer, Millis>,
    deny_at: Instant,
    /// Pings, and redials of peers whose connections closed.
    discovery: meshtrain_gossip::discovery::Discovery,
    history: Vec<RoundRecord>,
    started: Instant,
    /// When the core said the run is over (the loop may go on while
    /// re-replication finishes, see `still_replicating`).
    finished: Option<Instant>,
    /// How long a finished node may stay for others (`--drain-s`).
    drain_limit: Duration,
    fatal: Option<NodeError>,
    /// Bad answers to our fetches, per connected peer (see `fetch_fault`).
    fetch_faults: HashMap<PeerId, u32>,
    /// Requests being answered off the loop (at most [`MAX_SERVES`]).
    serving: usize,
}

/// Requests answered at once, at most (ledger reads, block reads).
const MAX_SERVES: usize = 16;

/// Runs `f`, turning a panic into an error that names `what` and says why.
fn caught<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|panic| format!("{what} panicked: {}", panic_message(panic.as_ref())))
}

/// The text a panic was raised with.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// What one bad fetch answer costs a peer's gossipsub score: nine take it
/// below the graylist threshold (-80), as invalid gossip would.
const FETCH_FAULT_SCORE: f64 = 10.0;
/// Peers whose bad answers are remembered at most (peer ids are free).
const MAX_FAULTY_PEERS: usize = 4096;

impl Node {
    /// Loads identity, data, model and ledger, and starts the swarm and the
    /// inbox; the trainer starts once the shard is here.
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
        crate::model_file::ensure_module(
            &spec,
            &store,
            &identity.keypair,
            &opts.mesh,
            &opts.bootstrap,
            crate::model_file::FETCH_TIMEOUT,
        )
        .await?;
        let net = crate::model_file::network(&spec, &store, opts.device)?;
        info!(model = %spec.model.arch, params = net.param_count(), device = ?opts.device, "model built");
        let shape = ModelShape {
            genesis: net.genesis(spec.seed),
            buffers: net.layout().buffer_ranges(),
        };
        let params = shape.genesis.len();
        let layout = crate::export::layout_of(net.layout());
        let genesis_hash = WeightsHash::of_f32(&shape.genesis);

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
        // A checkpoint only saves a replay: one that cannot be read (torn
        // by a crash, damaged, of another run) is set aside, not fatal.
        let checkpoint = Checkpoint::load(&opts.data_dir, &run_id).unwrap_or_else(|e| {
            warn!(error = %e, "not using the checkpoint; rebuilding the anchor from the ledger");
            None
        });
        let saved = checkpoint.as_ref().map(|cp| SavedAnchor {
            round: cp.round,
            anchor: cp.anchor.clone(),
            velocity: cp.velocity.clone(),
        });
        let resumed = resume(&*ledger, me, saved.as_ref(), &spec, &shape)?;
        let next_seq = resumed.own_head.map_or(0, |h| h.seq.0 + 1);

        let cfg = TrainConfig {
            batch_size: spec.train.batch_size,
            lr: spec.train.lr,
            label_flip: opts.attack.is_some_and(|a| a.is_label_flip()),
            anomaly_class: spec.model.anomaly_class,
        };
        // Batch-norm statistics go exactly, outside the lossy code.
        let encoder = DeltaEncoder::new(spec.exchange.codec, params).with_exact_ranges(shape.buffers.clone());

        let admission = crate::core::power::Rule::of(&spec.admission).map_err(|detail| NodeError::RunSpec {
            path: "<run spec>".into(),
            detail,
        })?;
        let mut registry = Registry::default();
        let metrics = NodeMetrics::register(&mut registry);
        let inbox = crate::inbox::thread::spawn(
            ledger.clone(),
            InboxConfig {
                run_id,
                roster: admission.roster().cloned(),
                genesis: meta.genesis_link(),
                params,
                rounds: spec.rounds.count,
                retention: opts.retention,
            },
            Some(metrics.clone()),
        )?;

        let topic = run_topic(&run_id.to_string());
        let mut swarm = build_swarm(identity.keypair.clone(), &opts.mesh, &topic, &mut registry)?;
        let p2p_metrics = libp2p::metrics::Metrics::new(&mut registry);
        let registry = Arc::new(std::sync::Mutex::new(registry));
        let metrics_addr = match opts.metrics {
            Some(addr) => Some(
                crate::metrics::serve(addr, registry.clone(), metrics.clone(), ledger.path().to_path_buf()).map_err(
                    |e| NodeError::Listen {
                        addr: format!("metrics {addr}"),
                        detail: e.to_string(),
                    },
                )?,
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
        if let Some(a) = opts.attack {
            warn!(attack = %a, "THIS NODE IS AN ATTACKER (testnet/test mode): it will send poisoned updates");
        }
        let core = Core::new(
            CoreConfig {
                run_id,
                genesis_link: meta.genesis_link(),
                genesis_weights: genesis_hash,
                verdict_genesis: meta.verdict_genesis(),
                params,
                spec: spec.clone(),
                wait_peers: opts.wait_peers,
                wait_peers_timeout: opts.wait_peers_timeout.as_millis() as Millis,
                drain: opts.drain.as_millis() as Millis,
                eval_every: opts.eval_every.max(1),
                checkpoint_every: opts.checkpoint_every,
                reputation: opts.reputation,
                max_inline_payload: opts.mesh.max_inline_payload,
                send_inline_payload: opts.mesh.send_inline_payload,
                attack: opts.attack,
                seed: spec.seed,
                admission,
            },
            identity.author,
            resumed,
        );
        let (worker_tx, worker_rx) = mpsc::unbounded_channel();
        Ok(Self {
            core,
            data: fetching::DataPhase::new(store, manifest, spec.seed ^ ((index as u64 + 1) << 32), next_seq),
            spec,
            run_id,
            me,
            genesis: genesis_hash,
            params,
            ledger,
            swarm,
            topic,
            registry,
            metrics,
            p2p_metrics,
            metrics_addr,
            deny: opts.deny_peers.clone().map(deny::DenyList::new),
            data_dir: opts.data_dir,
            layout,
            attack: opts.attack,
            shard: format!("{index}/{count}"),
            inbox,
            trainer: None,
            pending_trainer: Some((net, cfg, encoder)),
            restored: checkpoint,
            outbound: HashMap::new(),
            channels: HashMap::new(),
            unread: HashMap::new(),
            mesh_request_timeout: opts.mesh.request_timeout,
            next_chan: 0,
            worker_tx,
            worker_rx,
            anchor_cache: AnchorCache::default(),
            checkpoint: CheckpointState::default(),
            core_timers: HashMap::new(),
            deny_at: Instant::now(),
            discovery: Default::default(),
            history: Vec::new(),
            started: Instant::now(),
            finished: None,
            drain_limit: opts.drain,
            fatal: None,
            fetch_faults: HashMap::new(),
            serving: 0,
        })
    }

    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// Runs the node until its last round is done and drained, or until
    /// `shutdown` resolves. Writes `DIR/results.json` either way.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<NodeReport, NodeError> {
        let span = info_span!("node", id = %short(&self.peer_id()));
        async move {
            info!(run = %self.run_id.short(), shard = %self.shard, params = self.params, "node started");
            tokio::pin!(shutdown);
            self.feed(Input::Start);
            let outcome = loop {
                if let Some(at) = self.finished {
                    if !self.still_replicating(at) {
                        break Ok(());
                    }
                }
                if let Some(e) = self.fatal.take() {
                    break Err(e);
                }
                let wake = tokio::time::Instant::from_std(self.next_wake());
                tokio::select! {
                    event = self.swarm.select_next_some() => self.on_swarm(event),
                    reply = next_reply(&mut self.trainer) => match reply {
                        Some(reply) => self.on_trainer(reply),
                        None => break Err(NodeError::ThreadDied { name: "trainer" }),
                    },
                    done = self.inbox.done.recv() => match done {
                        Some(done) => self.feed(Input::Checked(Box::new(done))),
                        None => break Err(NodeError::ThreadDied { name: "inbox" }),
                    },
                    Some(hash) = self.data.missing_rx.recv() => self.data.want_block(hash),
                    Some(done) = self.worker_rx.recv() => self.on_worker(done),
                    _ = tokio::time::sleep_until(wake) => self.on_wake(),
                    _ = &mut shutdown => {
                        info!("shutdown requested");
                        break Ok(());
                    }
                }
            };
            let report = self.report();
            let written = write_json(&self.data_dir.join("results.json"), &report);
            let trainer_panic = self.trainer.take().and_then(TrainerHandle::stop);
            let outcome = match (outcome, trainer_panic) {
                (Err(NodeError::ThreadDied { name: "trainer" }), Some(message)) => Err(NodeError::WorkerPanicked {
                    what: "trainer",
                    message,
                }),
                (outcome, _) => outcome,
            };
            // The inbox thread holds the ledger: let it finish its queue and
            // close RocksDB before the process exits.
            drop(self.inbox.jobs);
            let outcome = match (outcome, self.inbox.thread.join()) {
                (Err(NodeError::ThreadDied { name: "inbox" }), Err(panic)) => Err(NodeError::WorkerPanicked {
                    what: "inbox",
                    message: panic_message(panic.as_ref()),
                }),
                (outcome, _) => outcome,
            };
            outcome?;
            written?;
            Ok(report)
        }
        .instrument(span)
        .await
    }

    fn now_ms(&self) -> Millis {
        self.started.elapsed().as_millis() as Millis
    }

    /// Hands one input to the core and executes what it asks for.
    fn feed(&mut self, input: Input) {
        let effects = self.core.handle(input, self.now_ms());
        for effect in effects {
            self.execute(effect);
        }
    }

    fn next_wake(&self) -> Instant {
        let mut wake = self.deny_at;
        if let Some(at) = self.core_timers.values().min() {
            wake = wake.min(self.started + Duration::from_millis(*at));
        }
        if let Some(at) = self.data.next_wake() {
            wake = wake.min(at);
        }
        if let Some(at) = self.discovery.next_wake() {
            wake = wake.min(at);
        }
        wake
    }

    /// Fires every timer that is due.
    fn on_wake(&mut self) {
        let now = Instant::now();
        if now >= self.deny_at {
            self.deny_at = now + DENY_REFRESH;
            self.refresh_deny_list();
            self.forget_unread(now);
            // Peers are found through Kademlia from one bootstrap address;
            // a node whose first lookup ran before the others had joined
            // found them only at the periodic lookup, 30 s later (seen in a
            // 4-node testnet: two nodes met 31 s after starting). While
            // short of the peers it waits for, it looks again each second.
            if self.core.short_of_peers() {
                let _ = self.swarm.behaviour_mut().kad.bootstrap();
            }
        }
        if self.discovery.next_wake().is_some_and(|t| now >= t) {
            let (core, deny) = (&self.core, &self.deny);
            self.discovery
                .on_wake(&mut self.swarm, |p| may_dial(core, deny, p), now);
        }
        if self.data.next_wake().is_some_and(|t| now >= t) {
            if let Err(e) = self.fetch_tick(now) {
                self.fatal = Some(e);
                return;
            }
        }
        let now_ms = self.now_ms();
        let mut due: Vec<(Millis, Timer)> = self
            .core_timers
            .iter()
            .filter(|(_, at)| **at <= now_ms)
            .map(|(t, at)| (*at, *t))
            .collect();
        due.sort();
        for (_, timer) in due {
            self.core_timers.remove(&timer);
            self.feed(Input::Timer(timer));
        }
    }

    // ---- effects --------------------------------------------------------

    fn execute(&mut self, effect: Effect) {
        match effect {
            Effect::Publish(msg) => {
                let started = Instant::now();
                let published = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.topic.clone(), msg.to_bytes());
                self.metrics.stage("publish", started.elapsed());
                if let Err(e) = published {
                    debug!(round = self.core.round(), error = %e, "publish failed (no peers yet?)");
                }
            }
            Effect::Settle {
                origin,
                outcome,
                update,
            } => {
                self.metrics.message(outcome.kind(), outcome.reason());
                if let Origin::Gossip { id, source } = &origin {
                    if update {
                        self.metrics.updates_received.inc();
                    }
                    let acceptance = match outcome.acceptance() {
                        Acceptance::Accept => MessageAcceptance::Accept,
                        Acceptance::Ignore => MessageAcceptance::Ignore,
                        Acceptance::Reject => MessageAcceptance::Reject,
                    };
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(id, source, acceptance);
                }

                debug!(round = self.core.round(), from = ?origin.peer().map(|p| short(&p)), outcome = outcome.kind(), reason = outcome.reason(), "message settled");
            }
            Effect::Counted { outcome, reason } => self.metrics.outcome(outcome, reason),
            Effect::Request { req, peer, request } => {
                let id = self.swarm.behaviour_mut().fetch.send_request(&peer, request);
                self.outbound.insert(id, Outbound::Core(req));
            }
            Effect::Serve { chan, request, .. } => self.serve(chan, request),
            Effect::ServeAnchor { chan, anchor, .. } => self.serve_anchor(chan, *anchor),
            Effect::Respond { chan, response } => {
                if let Some(asker) = self.channels.remove(&chan) {
                    self.respond(asker, response);
                }
            }
            Effect::CheckAnchor {
                peer,
                starts,
                key,
                response,
            } => {
                let (params, tx) = (self.params, self.worker_tx.clone());
                tokio::task::spawn_blocking(move || {
                    let result = caught("anchor check", || check_fetched(starts, key, params, response))
                        .and_then(|r| r)
                        .map(Box::new);
                    let _ = tx.send(WorkerDone::AnchorChecked { peer, result });
                });
            }
            Effect::CheckOffer { peer, response } => {
                let (run_id, genesis, params, tx) = (self.run_id, self.genesis, self.params, self.worker_tx.clone());
                tokio::task::spawn_blocking(move || {
                    let result = caught("offer check", || check_offer(&run_id, &genesis, params, response))
                        .and_then(|r| r)
                        .map(Box::new);
                    let _ = tx.send(WorkerDone::OfferChecked { peer, result });
                });
            }
            Effect::Inbox(job) => {
                if let Some((peer, bytes)) = job.gossiped() {
                    if !self.inbox.backlog.admit(peer, bytes) {
                        self.feed(Input::InboxBusy(Box::new(job)));
                        return;
                    }
                }
                if self.inbox.jobs.send(job).is_err() {
                    self.fatal = Some(NodeError::ThreadDied { name: "inbox" });
                }
            }
            Effect::Train {
                round,
                anchor,
                evaluate,
            } => self.trainer_cmd(TrainerCmd::Round {
                round,
                anchor,
                steps: self.spec.train.local_steps,
                evaluate,
            }),
            Effect::Craft { delta, like, .. } => self.trainer_cmd(TrainerCmd::Craft { delta, like }),
            Effect::Evaluate { round, anchor } => {
                // Only the run's end evaluates outside a round: what it
                // evaluates is the model the node ended on (settling again
                // on a later decision writes it again).
                if let Err(e) = crate::export::save_final(&self.data_dir, &self.run_id, round, &anchor, &self.layout) {
                    warn!(round, error = %e, "cannot write the final anchor");
                }
                self.trainer_cmd(TrainerCmd::Evaluate { round, anchor })
            }
            Effect::Checkpoint {
                round,
                anchor,
                velocity,
            } => {
                // One write at a time; a checkpoint due while the last is
                // still being written is skipped (the next one supersedes
                // it anyway).
                if self.checkpoint.writing {
                    debug!(round, "skipping a checkpoint: the last one is still being written");
                } else {
                    self.checkpoint.due = Some((round, anchor, velocity));
                    self.trainer_cmd(TrainerCmd::Snapshot { round });
                }
            }
            Effect::Score { round, anchor, deltas } => self.trainer_cmd(TrainerCmd::Score { round, anchor, deltas }),
            Effect::Aggregate(job) => {
                let tx = self.worker_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = tx.send(match caught("aggregation", || run_aggregation(*job)) {
                        Ok(done) => WorkerDone::Aggregated(Box::new(done)),
                        Err(message) => WorkerDone::Panicked {
                            what: "aggregation",
                            message,
                        },
                    });
                });
            }
            Effect::BeginData { members } => self.begin_data_phase(members),
            Effect::Replan { members } => self.replan(members),
            Effect::Ban { peer, .. } => {
                if let Some(peer) = peer {
                    let gs = &mut self.swarm.behaviour_mut().gossipsub;
                    gs.blacklist_peer(&peer);
                    gs.set_application_score(&peer, -1000.0);
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
            Effect::SetTimer { timer, at } => {
                self.core_timers.insert(timer, at);
            }
            Effect::RoundClosed(closed) => self.on_round_closed(*closed),
            Effect::Finished => {
                self.finished = Some(Instant::now());
                let missing = self.data.replicating();
                if missing > 0 {
                    info!(blocks = missing, "re-replicating blocks before leaving");
                }
            }
            Effect::FetchFault { peer } => self.fetch_fault(peer),
            Effect::Fatal(fault) => self.fatal = Some(NodeError::Core(fault)),
        }
    }

    /// A peer answered one of our fetches with bad data (records it was
    /// not asked for, bytes that are not the payload, a corrupt block): its
    /// score drops as it would for invalid gossip.
    fn fetch_fault(&mut self, peer: PeerId) {
        if self.fetch_faults.len() >= MAX_FAULTY_PEERS && !self.fetch_faults.contains_key(&peer) {
            // Forget the peer with the fewest faults: a crowd of fresh ids
            // cannot push out the ones that lied most.
            if let Some(least) = self.fetch_faults.iter().min_by_key(|(_, n)| **n).map(|(p, _)| *p) {
                self.fetch_faults.remove(&least);
            }
        }
        let faults = self.fetch_faults.entry(peer).or_default();
        *faults = faults.saturating_add(1);
        let score = -f64::from(*faults) * FETCH_FAULT_SCORE;
        self.metrics.fetch_faults.inc();
        self.swarm.behaviour_mut().gossipsub.set_application_score(&peer, score);
        debug!(peer = %short(&peer), faults = *faults, "bad fetch answer");
    }

    fn trainer_cmd(&mut self, cmd: TrainerCmd) {
        let sent = match self.trainer.as_ref() {
            Some(t) => t.cmd.send(cmd).is_ok(),
            None => false,
        };
        if !sent {
            self.fatal = Some(NodeError::ThreadDied { name: "trainer" });
        }
    }

    /// Sends an answer and counts what it carries against the asker's
    /// budget.
    fn respond(&mut self, asker: Asker, response: FetchResponse) {
        let bytes = response.carried_bytes();
        let Asker { peer, id, channel } = asker;
        if self
            .swarm
            .behaviour_mut()
            .fetch
            .send_response(channel, response)
            .is_ok()
        {
            self.unread.insert(id, (peer, bytes, Instant::now()));
            self.feed(Input::Served { peer, bytes });
        }
    }

    /// An answer was written out, or its stream failed.
    fn answer_done(&mut self, id: InboundRequestId) {
        if let Some((peer, bytes, _)) = self.unread.remove(&id) {
            self.feed(Input::Delivered { peer, bytes });
        }
    }

    /// libp2p reports every answer's end (its streams time out), so this
    /// only guards against one it never reports: a peer's cap must not
    /// stay taken.
    fn forget_unread(&mut self, now: Instant) {
        let limit = 2 * self.mesh_request_timeout;
        let old: Vec<InboundRequestId> = self
            .unread
            .iter()
            .filter(|(_, (_, _, at))| now.duration_since(*at) > limit)
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            self.answer_done(id);
        }
    }

    /// Answers a peer from the ledger or the block store, off the loop.
    fn serve(&mut self, chan: ChanId, request: FetchRequest) {
        let Some(asker) = self.channels.remove(&chan) else {
            return;
        };
        if self.serving >= MAX_SERVES {
            // Reads and block copies would pile up on the blocking pool;
            // the asker tries another peer or comes back.
            let busy = FetchResponse::Refused("busy; try again".into());
            self.respond(asker, busy);
            return;
        }
        self.serving += 1;
        let ledger = self.ledger.clone();
        let store = self.data.store.clone();
        let tx = self.worker_tx.clone();
        tokio::task::spawn_blocking(move || {
            // Always answered, so the serve slot is given back even if a
            // read panics.
            let response = caught("serving", || match &request {
                FetchRequest::Block { hash } => match store.serve(&hex::encode(hash)) {
                    Ok(Some(bytes)) => FetchResponse::Block(bytes),
                    Ok(None) => FetchResponse::NotFound,
                    Err(e) => FetchResponse::Refused(e.to_string()),
                },
                _ => crate::serve::answer(&*ledger, &request),
            })
            .unwrap_or_else(FetchResponse::Refused);
            let _ = tx.send(WorkerDone::Served { asker, response });
        });
    }

    /// Answers with our anchor, encoded once per anchor however many ask.
    fn serve_anchor(&mut self, chan: ChanId, anchor: AnchorSnapshot) {
        let Some(asker) = self.channels.remove(&chan) else {
            return;
        };
        let key = (anchor.round, anchor.anchor_hash);
        if let Some((_, response)) = self.anchor_cache.encoded.iter().find(|(k, _)| *k == key) {
            let response = response.clone();
            self.respond(asker, response);
            return;
        }
        self.anchor_cache.waiting.push((key, asker));
        if !self.anchor_cache.encoding.insert(key) {
            return;
        }
        let tx = self.worker_tx.clone();
        tokio::task::spawn_blocking(move || {
            let response =
                caught("encoding the anchor", || encode_anchor(&anchor)).unwrap_or_else(FetchResponse::Refused);
            let _ = tx.send(WorkerDone::AnchorEncoded { key, response });
        });
    }

    fn on_worker(&mut self, done: WorkerDone) {
        match done {
            WorkerDone::Served { asker, response } => {
                self.serving = self.serving.saturating_sub(1);
                self.respond(asker, response);
            }
            WorkerDone::AnchorEncoded { key, response } => {
                self.anchor_cache.encoding.remove(&key);
                let (these, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.anchor_cache.waiting)
                    .into_iter()
                    .partition(|(k, _)| *k == key);
                self.anchor_cache.waiting = others;
                for (_, asker) in these {
                    self.respond(asker, response.clone());
                }
                let cache = &mut self.anchor_cache.encoded;
                cache.retain(|(k, _)| *k != key);
                cache.push_front((key, response));
                cache.truncate(ANCHORS_ENCODED);
            }
            WorkerDone::Checkpointed { round, result, took } => {
                self.checkpoint.writing = false;
                self.metrics.stage("checkpoint_write", took);
                match result {
                    Ok(()) => debug!(round, "checkpoint written"),
                    // The disk is full: the ledger's next write fails too,
                    // and RocksDB may take rounds to notice (its log has
                    // room set aside); stop now, naming the file.
                    Err(e) if e.is_disk_full() => self.fatal = Some(e),
                    Err(e) => warn!(round, error = %e, "checkpoint failed"),
                }
            }
            WorkerDone::Aggregated(done) => {
                self.metrics.stage("aggregate", done.took.aggregate);
                self.metrics.stage("outer_step", done.took.outer_step);
                self.feed(Input::Aggregated(done));
            }
            WorkerDone::Panicked { what, message } => {
                self.fatal = Some(NodeError::WorkerPanicked { what, message });
            }
            WorkerDone::OfferChecked { peer, result } => self.feed(Input::OfferChecked { peer, result }),
            WorkerDone::AnchorChecked { peer, result } => self.feed(Input::AnchorChecked { peer, result }),
        }
    }

    fn on_trainer(&mut self, reply: TrainerReply) {
        match reply {
            TrainerReply::RoundDone {
                trained,
                eval,
                load,
                train,
                encode,
            } => {
                self.metrics.stage("load", load);
                self.metrics.stage("train", train);
                self.metrics.stage("encode", encode);
                if let Some(took) = eval {
                    self.metrics.stage("evaluate", took);
                }
                self.metrics.train_loss.set(f64::from(trained.stats.mean_loss));
                if let Some(e) = trained.eval {
                    self.metrics.test_acc.set(f64::from(e.accuracy));
                    self.metrics.test_loss.set(f64::from(e.loss));
                    info!(
                        round = trained.round,
                        test_acc = format_args!("{:.4}", e.accuracy),
                        test_loss = format_args!("{:.4}", e.loss),
                        eval_ms = eval.map_or(0, |d| d.as_millis() as u64),
                        "evaluated the anchor"
                    );
                }
                info!(
                    round = trained.round,
                    train_loss = format_args!("{:.4}", trained.stats.mean_loss),
                    train_ms = trained.train_ms,
                    encode_ms = encode.as_millis() as u64,
                    payload_bytes = trained.payload.len(),
                    "trained"
                );
                self.feed(Input::Trained(trained));
            }
            TrainerReply::Crafted(trained) => self.feed(Input::Crafted(trained)),
            TrainerReply::Evaluated { round, report, took } => {
                self.metrics.stage("evaluate", took);
                self.metrics.test_acc.set(f64::from(report.summary.accuracy));
                self.metrics.test_loss.set(f64::from(report.summary.loss));
                self.feed(Input::Evaluated {
                    round,
                    report: Box::new(report),
                });
            }
            TrainerReply::Scored { round, scores, took } => {
                self.metrics.stage("score", took);
                self.feed(Input::Scored { round, scores });
            }
            TrainerReply::Snapshot { round, state, took } => {
                self.metrics.stage("checkpoint", took);
                let Some((due, anchor, velocity)) = self.checkpoint.due.take().filter(|d| d.0 == round) else {
                    return;
                };
                let (residual, adam) = match state {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(round, error = %e, "checkpoint failed: cannot read the optimiser state");
                        return;
                    }
                };
                let checkpoint = crate::checkpoint::Checkpoint {
                    run_id: self.run_id,
                    round: due,
                    anchor: anchor.to_vec(),
                    velocity,
                    residual,
                    adam,
                };
                self.checkpoint.writing = true;
                let (dir, tx) = (self.data_dir.clone(), self.worker_tx.clone());
                tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    let result = checkpoint.save(&dir);
                    let _ = tx.send(WorkerDone::Checkpointed {
                        round: due,
                        result,
                        took: started.elapsed(),
                    });
                });
            }
            TrainerReply::Failed(e) => self.fatal = Some(NodeError::Training(e)),
        }
    }

    fn on_round_closed(&mut self, closed: RoundClosed) {
        self.metrics.stage("wait", Duration::from_millis(closed.wait_ms));
        let bytes = self.byte_counts();
        self.history.push(RoundRecord {
            round: closed.round,
            test_loss: closed.eval.map_or(f32::NAN, |e| e.loss),
            test_acc: closed.eval.map_or(f32::NAN, |e| e.accuracy),
            train_loss: closed.stats.mean_loss,
            merged: closed.merged,
            rejected: closed.rejected,
            bytes_sent: bytes.outbound,
            bytes_received: bytes.inbound,
            at_ms: self.started.elapsed().as_millis() as u64,
            train_ms: closed.train_ms,
            wait_ms: closed.wait_ms,
        });
        self.metrics.round.set(self.core.round() as i64);
        self.metrics.bytes_in.set(bytes.inbound as i64);
        self.metrics.bytes_out.set(bytes.outbound as i64);
        self.metrics.peers.set(closed.members as i64);
        self.metrics.ledger_records.set(self.ledger.record_count() as i64);
        let progress = Progress {
            round: closed.round,
            rounds: self.spec.rounds.count,
            test_acc: self.history.iter().rev().map(|r| r.test_acc).find(|a| a.is_finite()),
            members: closed.members,
        };
        // What a live dashboard shows: the report so far.
        let live = self.report_with(bytes);
        let dir = self.data_dir.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = write_json(&dir.join("progress.json"), &progress) {
                debug!(error = %e, "cannot write progress.json");
            }
            if let Err(e) = write_json(&dir.join("live.json"), &live) {
                debug!(error = %e, "cannot write live.json");
            }
        });
    }

    // ---- network --------------------------------------------------------

    fn byte_counts(&self) -> meshtrain_gossip::ByteCounts {
        match self.registry.lock() {
            Ok(r) => byte_counts(&r),
            Err(_) => meshtrain_gossip::ByteCounts::default(),
        }
    }

    fn on_swarm(&mut self, event: SwarmEvent<MeshBehaviourEvent>) {
        use libp2p::metrics::Recorder;
        self.p2p_metrics.record(&event);
        match &event {
            SwarmEvent::Behaviour(MeshBehaviourEvent::Gossipsub(ev)) => self.p2p_metrics.record(ev),
            SwarmEvent::Behaviour(MeshBehaviourEvent::Identify(ev)) => self.p2p_metrics.record(ev),
            SwarmEvent::Behaviour(MeshBehaviourEvent::Kad(ev)) => self.p2p_metrics.record(ev),
            _ => {}
        }
        let (core, deny) = (&self.core, &self.deny);
        self.discovery.on_event(
            &mut self.swarm,
            &event,
            |p| may_dial(core, deny, p),
            |p| core.worth_redialling(p),
            Instant::now(),
        );
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.write_listen_addrs();
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                // Bad answers are not forgiven by reconnecting: gossipsub
                // may have dropped the peer's stats, so they are set again.
                if let Some(faults) = self.fetch_faults.get(&peer_id) {
                    let score = -f64::from(*faults) * FETCH_FAULT_SCORE;
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .set_application_score(&peer_id, score);
                }
                self.feed(Input::Connected(peer_id))
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => self.feed(Input::Disconnected(peer_id)),
            SwarmEvent::Behaviour(MeshBehaviourEvent::Gossipsub(ev)) => match ev {
                gossipsub::Event::Message {
                    propagation_source,
                    message_id,
                    message,
                } => self.feed(Input::Gossip {
                    id: message_id,
                    source: propagation_source,
                    data: message.data,
                }),
                gossipsub::Event::Subscribed { peer_id, topic } if topic == self.topic.hash() => {
                    self.feed(Input::Subscribed(peer_id))
                }
                gossipsub::Event::Unsubscribed { peer_id, topic } if topic == self.topic.hash() => {
                    self.feed(Input::Unsubscribed(peer_id))
                }
                _ => {}
            },
            SwarmEvent::Behaviour(MeshBehaviourEvent::Fetch(ev)) => self.on_fetch(ev),
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id.map(|p| short(&p)), %error, "dial failed");
            }
            _ => {}
        }
    }

    fn on_fetch(&mut self, event: request_response::Event<FetchRequest, FetchResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request,
                    channel,
                    request_id,
                } => {
                    let chan = ChanId(self.next_chan);
                    self.next_chan += 1;
                    self.channels.insert(
                        chan,
                        Asker {
                            peer,
                            id: request_id,
                            channel,
                        },
                    );
                    self.feed(Input::Request { peer, chan, request });
                }
                request_response::Message::Response { request_id, response } => match self.outbound.remove(&request_id)
                {
                    Some(Outbound::Core(req)) => self.feed(Input::Response { req, peer, response }),
                    Some(Outbound::Block(hash)) => match response {
                        FetchResponse::Block(bytes) => self.on_block(hash, peer, bytes),
                        _ => self.data.block_attempt_failed(&hash),
                    },
                    None => {}
                },
            },
            request_response::Event::OutboundFailure {
                request_id,
                peer,
                error,
                ..
            } => {
                debug!(peer = %short(&peer), %error, "fetch failed");
                match self.outbound.remove(&request_id) {
                    Some(Outbound::Core(req)) => self.feed(Input::RequestFailed { req, peer }),
                    Some(Outbound::Block(hash)) => {
                        if matches!(error, request_response::OutboundFailure::Timeout) {
                            self.data.window.timed_out(Instant::now());
                            info!(peer = %short(&peer), window = self.data.window.size(), "a block request timed out: fewer in flight");
                        }
                        self.data.block_attempt_failed(&hash);
                    }
                    None => {}
                }
            }
            request_response::Event::ResponseSent { request_id, .. }
            | request_response::Event::InboundFailure { request_id, .. } => self.answer_done(request_id),
        }
    }

    fn write_listen_addrs(&mut self) {
        let peer = self.peer_id();
        let addrs: Vec<String> = self.swarm.listeners().map(|a| format!("{a}/p2p/{peer}")).collect();
        if addrs.is_empty() {
            return;
        }
        let body = ListenFile {
            peer_id: peer.to_string(),
            author: self.me.to_string(),
            metrics: self.metrics_addr.map(|a| format!("http://{a}/metrics")),
            run_id: self.run_id.to_string(),
            addrs,
        };
        if let Err(e) = write_json(&self.data_dir.join("listen.json"), &body) {
            warn!(error = %e, "cannot write listen.json");
        }
    }

    // ---- report ---------------------------------------------------------

    fn report(&self) -> NodeReport {
        self.report_with(self.byte_counts())
    }

    /// The report, with byte counts already read (reading them encodes the
    /// whole metrics registry).
    fn report_with(&self, bytes: meshtrain_gossip::ByteCounts) -> NodeReport {
        // Without a final evaluation (stopped early), the last one made.
        let last = self.history.iter().rev().find(|r| r.test_acc.is_finite());
        let final_eval = self.core.final_eval();
        let eval = final_eval.map_or_else(
            || Evaluation {
                loss: last.map_or(f32::NAN, |r| r.test_loss),
                accuracy: last.map_or(0.0, |r| r.test_acc),
                ..Default::default()
            },
            |r| r.summary,
        );
        let c = self.core.counters();
        NodeReport {
            peer_id: self.peer_id().to_string(),
            author: self.me.to_string(),
            honest: self.attack.is_none(),
            attack: self.attack.map(|a| a.to_string()),
            shard: self.shard.clone(),
            param_count: self.params as u64,
            rounds_completed: self.history.len() as u64,
            final_test_acc: eval.accuracy,
            final_test_loss: eval.loss,
            final_task: TaskFigures {
                perplexity: eval.perplexity,
                roc_auc: eval.roc_auc,
                macro_f1: eval.macro_f1,
            },
            final_eval: final_eval.and_then(|r| serde_json::to_value(r).ok()),
            stopped_early_at: self.core.stopped_early_at(),
            best_round: self.core.best_round(),
            bytes_sent: bytes.outbound,
            bytes_received: bytes.inbound,
            gossip_published: bytes.gossip.published,
            gossip_sent: bytes.gossip.sent,
            gossip_sent_bytes: bytes.gossip.sent_bytes,
            gossip_received: bytes.gossip.received,
            gossip_duplicates: bytes.gossip.duplicates,
            updates_published: c.published,
            payload_bytes_mean: if c.published == 0 {
                0.0
            } else {
                c.payload_bytes as f64 / c.published as f64
            },
            updates_received: c.received,
            updates_merged: c.merged,
            updates_clipped: c.clipped,
            updates_rejected: c.rejected,
            rejected_by_reason: c.rejected_by_reason.clone(),
            rejected_by_author: c.rejected_by_author.clone(),
            clipped_by_author: c.clipped_by_author.clone(),
            merged_by_author: c.merged_by_author.clone(),
            probation_by_author: c.probation_by_author.clone(),
            served_bytes: c.served_bytes,
            refused_over_budget: c.refused_over_budget,
            banned: self.core.banned().iter().map(|a| a.to_string()).collect(),
            peers_seen: self.core.authors_seen().iter().map(|a| a.to_string()).collect(),
            label_histogram: self.data.label_histogram(),
            primary_blocks: self.data.plan.as_ref().map_or(0, |p| p.primary.len() as u64),
            held_blocks: self.data.plan.as_ref().map_or(0, |p| p.held.len() as u64),
            blocks_fetched: self.data.fetch.blocks,
            bytes_fetched: self.data.fetch.bytes,
            data_fetch_ms: self.data.fetch.finished_ms,
            restarted: self.core.restarted(),
            joined_at: self.core.joins().to_vec(),
            repaired_at: self.core.repairs(),
            sybil_authors: self.core.sybil_authors().iter().map(|a| a.to_string()).collect(),
            sybil_records: self.core.sybil_records(),
            poisoned_anchor: self.core.poisoned_anchor().map(|h| h.to_string()),
            wall_s: self.started.elapsed().as_secs_f64(),
            stages: self.round_times(),
            history: self.history.clone(),
        }
    }

    /// Where the rounds' time went, so far.
    fn round_times(&self) -> RoundTimes {
        let mut t = RoundTimes {
            stages: self.metrics.stage_totals(),
            ..Default::default()
        };
        let closed: Vec<u64> = self.history.iter().map(|r| r.at_ms).collect();
        t.finish(&closed);
        t
    }
}

/// The trainer's next reply, or never while it has not started.
async fn next_reply(trainer: &mut Option<TrainerHandle>) -> Option<TrainerReply> {
    match trainer {
        Some(t) => t.replies.recv().await,
        None => std::future::pending().await,
    }
}

/// Whether we may dial `peer`: not banned by the core, not on the
/// operator's deny-list.
fn may_dial(core: &Core, deny: &Option<deny::DenyList>, peer: &PeerId) -> bool {
    !core.is_banned_peer(peer) && !deny.as_ref().is_some_and(|d| d.peers.contains(peer))
}

fn peer_of_addr(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        meshtrain_gossip::libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

/// Writes JSON atomically (a temp file, then a rename).
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), NodeError> {
    let io = |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value).map_err(|e| io(e.into()))?;
    // A full disk leaves the old file (or none), and no temporary behind.
    let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// The plan's members as a map for the data phase.
pub(crate) type MemberPeers = BTreeMap<AuthorId, PeerId>;

#[cfg(test)]
mod tests {
    #[test]
    fn a_panicking_worker_becomes_an_error_naming_it() {
        let err = super::caught("aggregation", || -> u32 { panic!("bad shape {}", 3) }).unwrap_err();
        assert_eq!(err, "aggregation panicked: bad shape 3");
        assert_eq!(super::caught("aggregation", || 7), Ok(7));
    }
}
