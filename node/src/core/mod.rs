//! The node's pure core: every decision a node makes (the round lifecycle,
//! message outcomes, membership, anchor sync, reputation) with no sockets,
//! files, threads or clocks of its own.
//!
//! [`Core::handle`] takes one [`Input`] and the time, and returns the
//! [`Effect`]s for whoever runs it to execute: the libp2p shell
//! ([`crate::shell`]) in a real node, the simulator ([`crate::sim`]) in
//! tests. Like rust-libp2p's `NetworkBehaviour`, it only asks; what it asks
//! for comes back as inputs (a stored record, a trained round, a fired
//! timer).
//!
//! One file per part of a round: [`start`] (gathering, data, sync at start),
//! [`train`] (our own update), [`receive`] (what peers send and ask),
//! [`close`] (waiting, aggregation, the verdict block), [`sync`] (taking
//! over an anchor the voting power decided), [`finish`] (settling the last
//! anchor, the final evaluation and draining). [`power`] and [`agreement`]
//! hold the admission and voting rules.

pub mod agreement;
mod close;
mod finish;
pub mod lateness;
pub mod members;
mod mischief;
pub mod outcome;
pub mod power;
mod receive;
pub mod resume;
pub mod rounds;
pub mod score;
pub mod start;
pub mod sync;
mod train;
pub mod wants;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use meshtrain_gossip::libp2p::gossipsub::MessageId;
use meshtrain_gossip::libp2p::PeerId;
use meshtrain_gossip::{FetchRequest, FetchResponse, GossipMessage};
use meshtrain_ledger::{
    AuthorId, AuthorKey, Head, PayloadHash, RecordHash, RunId, SignedRecord, SignedVerdictBlock, VerdictHash,
    WeightsHash,
};
use meshtrain_model::metrics::EarlyStopping;
use meshtrain_model::{EvalReport, Evaluation, OuterOptimizer, StepStats};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use close::{run_aggregation, AggregateDone, AggregateJob};
pub use outcome::{Acceptance, IgnoreReason, Origin, Outcome};
pub use resume::Resume;

use crate::attack::Attack;
use crate::inbox::{Done, Job};
use crate::reputation::{Reputation, ReputationConfig};
use crate::runspec::RunSpec;
use members::Members;
use rounds::{AdaptiveWait, RoundBook};
use sync::{AnchorFetch, AnchorSync, Fetched, Offer};
use wants::Wants;

/// Milliseconds on the clock of whoever drives the core (the process's
/// uptime in a node, simulated time in the simulator).
pub type Millis = u64;

/// Names one of our fetch requests (the shell maps libp2p's ids onto these).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReqId(pub u64);

/// Names a peer's request to us that awaits an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChanId(pub u64);

/// The core's named timers. Setting one again moves it; a timer that fires
/// after the core moved on is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Timer {
    /// Stop waiting for `wait_peers` and start anyway.
    Gather,
    /// The current round's deadline for stragglers.
    Deadline,
    /// The earliest retry of a payload fetch.
    PayloadRetry,
    /// Ask a random member for its chain heads.
    AntiEntropy,
    /// Decide a start sync, or ask again.
    Sync,
    /// An anchor fetch takes too long: ask the next voter.
    Fetch,
    /// Stop waiting for the final votes.
    Settle,
    /// A colluding attacker crafts its update.
    Collude,
    /// Whether draining is over.
    Drain,
    /// Membership settled after a change: re-plan the data placement.
    Replan,
    /// A `split` attacker answers the requests it held back.
    Held,
    /// A `late` attacker publishes the update it held back.
    Late,
}

/// What the core is told.
pub enum Input {
    /// The node is up: start gathering peers.
    Start,
    Connected(PeerId),
    /// The last connection to the peer closed.
    Disconnected(PeerId),
    /// A peer subscribed to the run's topic.
    Subscribed(PeerId),
    Unsubscribed(PeerId),
    /// A gossip message, to be settled exactly once.
    Gossip {
        id: MessageId,
        source: PeerId,
        data: Vec<u8>,
    },
    /// A peer asks us for something.
    Request {
        peer: PeerId,
        chan: ChanId,
        request: FetchRequest,
    },
    Response {
        req: ReqId,
        peer: PeerId,
        response: FetchResponse,
    },
    RequestFailed {
        req: ReqId,
        peer: PeerId,
    },
    /// What the inbox did with a job.
    Checked(Box<Done>),
    /// A peer's job the inbox's queue had no room for (see
    /// [`crate::inbox::thread::Backlog`]).
    InboxBusy(Box<crate::inbox::Job>),
    /// The trainer finished a round.
    Trained(Box<Trained>),
    /// The trainer encoded a colluding attacker's crafted delta.
    Crafted(Box<Trained>),
    /// The final evaluation.
    Evaluated {
        round: u64,
        report: Box<EvalReport>,
    },
    Aggregated(Box<AggregateDone>),
    /// The trainer scored a round's candidates (`Effect::Score`).
    Scored {
        round: u64,
        scores: Result<score::Scores, String>,
    },
    /// An anchor offer, decoded and checked off the event loop.
    OfferChecked {
        peer: PeerId,
        result: Result<Box<Offer>, String>,
    },
    /// A fetched anchor, checked off the event loop against the voted hashes.
    AnchorChecked {
        peer: PeerId,
        result: Result<Box<Fetched>, String>,
    },
    /// The manifest and this node's blocks are all here; the trainer runs.
    DataReady,
    /// An answer to `peer` went out carrying `bytes` (counted against its
    /// budget, and in flight until `Delivered`).
    Served {
        peer: PeerId,
        bytes: u64,
    },
    /// An answer was written out whole, or given up (its stream failed or
    /// timed out): its bytes are no longer held for `peer`.
    Delivered {
        peer: PeerId,
        bytes: u64,
    },
    Timer(Timer),
}

/// What the trainer made of one round.
#[derive(Clone, Debug)]
pub struct Trained {
    pub round: u64,
    /// The anchor's test figures before training (if asked).
    pub eval: Option<Evaluation>,
    pub stats: StepStats,
    /// The encoded delta as it goes on the wire (empty for colluding
    /// attackers, whose `decoded` is then the raw delta).
    pub payload: Vec<u8>,
    /// What every receiver decodes from `payload`.
    pub decoded: Arc<Vec<f32>>,
    /// An equivocating attacker's second payload for the same seq.
    pub twin: Option<Vec<u8>>,
    pub train_ms: u64,
}

/// What the core asks for.
#[derive(Debug)]
pub enum Effect {
    Publish(GossipMessage),
    /// A message's outcome: gossipsub's acceptance (for gossip), a counter,
    /// a log line. Exactly one per gossip message.
    Settle {
        origin: Origin,
        outcome: Outcome,
        update: bool,
    },
    /// An update counted as merged, clipped or rejected (with its reason).
    Counted {
        outcome: &'static str,
        reason: &'static str,
    },
    Request {
        req: ReqId,
        peer: PeerId,
        request: FetchRequest,
    },
    /// Answer from the ledger or the block store (off the event loop).
    Serve {
        peer: PeerId,
        chan: ChanId,
        request: FetchRequest,
    },
    /// Answer with our anchor (encoded off the event loop, once per anchor).
    ServeAnchor {
        peer: PeerId,
        chan: ChanId,
        anchor: Box<AnchorSnapshot>,
    },
    Respond {
        chan: ChanId,
        response: FetchResponse,
    },
    /// Decode and check an anchor offer (off the event loop); the result
    /// comes back as [`Input::OfferChecked`].
    CheckOffer {
        peer: PeerId,
        response: FetchResponse,
    },
    /// Decode a fetched anchor and check it against `key` (off the event
    /// loop); the result comes back as [`Input::AnchorChecked`].
    CheckAnchor {
        peer: PeerId,
        starts: u64,
        key: agreement::AnchorKey,
        response: FetchResponse,
    },
    Inbox(Job),
    /// Train H steps from `anchor` (evaluating it first if asked).
    Train {
        round: u64,
        anchor: Arc<Vec<f32>>,
        evaluate: bool,
    },
    /// Encode a colluding attacker's crafted delta.
    Craft {
        round: u64,
        delta: Vec<f32>,
        like: Box<Trained>,
    },
    Evaluate {
        round: u64,
        anchor: Arc<Vec<f32>>,
    },
    Checkpoint {
        round: u64,
        anchor: Arc<Vec<f32>>,
        velocity: Vec<f32>,
    },
    Aggregate(Box<AggregateJob>),
    /// Score each delta, applied alone to `anchor`, on the scoring sample.
    Score {
        round: u64,
        anchor: Arc<Vec<f32>>,
        deltas: Vec<Arc<Vec<f32>>>,
    },
    /// Gathering is over: fetch the manifest and this node's blocks.
    BeginData {
        members: BTreeMap<AuthorId, PeerId>,
    },
    /// Membership changed: re-plan the placement.
    Replan {
        members: BTreeMap<AuthorId, PeerId>,
    },
    /// Refuse this author's peer (blacklist, disconnect).
    Ban {
        author: AuthorId,
        peer: Option<PeerId>,
    },
    SetTimer {
        timer: Timer,
        at: Millis,
    },
    /// A round closed (for the history, progress files and gauges).
    RoundClosed(Box<RoundClosed>),
    /// Nothing left to do: the node may exit.
    Finished,
    /// A peer answered one of our fetches with data that is wrong by the
    /// peer's own doing (not what was asked for, not the bytes the hash
    /// names): the shell lowers its score. An author's bad payload served
    /// faithfully by a relay is not this.
    FetchFault {
        peer: PeerId,
    },
    /// The node cannot go on.
    Fatal(CoreFault),
}

/// What stops a node from inside the core.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoreFault {
    #[error("storing our own record failed: {0}")]
    OwnRecord(String),
    #[error("storing our verdict block failed: {0}")]
    VerdictBlock(String),
    #[error("the ledger cannot be kept: {0}")]
    Ledger(String),
    #[error(
        "cut off from the mesh: at round {round}, {waited_s} s past the deadline, only {heard} of {of} voting power heard from (deciding a round's anchor needs more than half)"
    )]
    Isolated {
        round: u64,
        waited_s: u64,
        heard: u64,
        of: u64,
    },
}

/// Our anchor as a peer may fetch it, with the verdict block that names it.
#[derive(Clone, Debug)]
pub struct AnchorSnapshot {
    pub round: u64,
    pub anchor_hash: WeightsHash,
    pub weights: Arc<Vec<f32>>,
    pub velocity: Arc<Vec<f32>>,
    pub attestation: Option<SignedVerdictBlock>,
}

/// One closed round, as the history and the progress files show it.
#[derive(Clone, Debug)]
pub struct RoundClosed {
    pub round: u64,
    pub eval: Option<Evaluation>,
    pub stats: StepStats,
    pub train_ms: u64,
    pub wait_ms: u64,
    /// Contributions merged or clipped, our own included.
    pub merged: u64,
    pub clipped: u64,
    pub rejected: u64,
    /// The anchor the round was aggregated onto (the decided one, after
    /// any repair) and the one it ended on.
    pub base_hash: WeightsHash,
    pub anchor_hash: WeightsHash,
    pub members: usize,
}

/// Everything fixed for a node's life.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub run_id: RunId,
    /// The `prev` of every author's first record.
    pub genesis_link: RecordHash,
    pub genesis_weights: WeightsHash,
    pub verdict_genesis: VerdictHash,
    pub params: usize,
    pub spec: RunSpec,
    pub wait_peers: usize,
    pub wait_peers_timeout: Millis,
    /// Longest time to linger after the last round.
    pub drain: Millis,
    pub eval_every: u64,
    pub checkpoint_every: u64,
    pub reputation: ReputationConfig,
    /// Largest payload accepted inline with its record.
    pub max_inline_payload: usize,
    /// Our own payloads up to this size are published inline.
    pub send_inline_payload: usize,
    pub attack: Option<Attack>,
    /// Seeds the core's own choices (which member to ask).
    pub seed: u64,
    /// Who is admitted, and how voting power is earned.
    pub admission: power::Rule,
}

/// Where a node is in its life. Each phase carries what only it needs.
enum Phase {
    /// Waiting for enough peers before round 0.
    Gathering,
    /// The shell fetches the manifest and this node's blocks.
    Fetching,
    /// Asking peers where the mesh is (a late join or a restart).
    Syncing,
    /// The trainer works on the current round.
    Training,
    /// A colluding attacker waits for the round's honest updates.
    Colluding(Box<Collusion>),
    /// Our record is being stored before it is published.
    Publishing(Box<OwnRound>),
    /// Our update is out; waiting for peers' updates or the deadline.
    Waiting(RoundNote),
    Aggregating(RoundNote),
    /// The last round is closed: collecting the final votes (and repairing
    /// onto the decided anchor) before the final evaluation.
    Settling {
        until: Millis,
    },
    /// Evaluating the final anchor.
    Finishing,
    /// Serving peers and completing chains before exiting.
    Draining,
    Done,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Gathering => "gathering",
            Phase::Fetching => "fetching",
            Phase::Syncing => "syncing",
            Phase::Training => "training",
            Phase::Colluding(_) => "colluding",
            Phase::Publishing(_) => "publishing",
            Phase::Waiting(_) => "waiting",
            Phase::Aggregating(_) => "aggregating",
            Phase::Settling { .. } => "settling",
            Phase::Finishing => "finishing",
            Phase::Draining => "draining",
            Phase::Done => "done",
        }
    }
}

/// What the history keeps of our own part of a round.
#[derive(Clone, Debug, Default)]
struct RoundNote {
    round: u64,
    eval: Option<Evaluation>,
    stats: StepStats,
    train_ms: u64,
}

/// Our own update between training and publication.
struct OwnRound {
    note: RoundNote,
    decoded: Arc<Vec<f32>>,
    /// An equivocating attacker's second record.
    twin: Option<(SignedRecord, Vec<u8>)>,
}

/// A colluding attacker's trained round, waiting for honest updates.
struct Collusion {
    trained: Box<Trained>,
    since: Millis,
    crafting: bool,
}

/// A decided anchor, kept whole.
#[derive(Clone, Debug)]
struct Settled {
    starts: u64,
    key: agreement::AnchorKey,
    weights: Arc<Vec<f32>>,
    velocity: Arc<Vec<f32>>,
    votes: Vec<meshtrain_ledger::Vote>,
}

/// The anchor we made by aggregating, what from and with which updates:
/// our next record says so (see `UpdateRecord::merged`).
#[derive(Clone, Debug)]
struct Made {
    /// The round aggregated: only the record of the round after says so.
    round: u64,
    anchor: WeightsHash,
    from: agreement::AnchorKey,
    merged: Vec<meshtrain_ledger::RecordTag>,
    /// Which of them our close waited past its quorum for (bits, as in
    /// `UpdateRecord::waited`).
    waited: Vec<u8>,
}

/// The last round we closed: every update it had, whatever its base, with
/// its prior weight, kept for a rebuild of that round (see
/// `close::rebuild_if_split`).
#[derive(Clone, Debug)]
struct LastClose {
    inputs: Vec<(rounds::Contribution, f32)>,
}

/// How many of our last closes are kept for rebuilds: the round before
/// the one closing, and one more for a node that went back while others
/// rebuilt (it rebuilds that round too before it goes back).
const CLOSES_KEPT: usize = 3;
/// After this many rounds given up in a row, going back takes the latest
/// anchor the votes decided, not one rebuilt since (see `revert_target`).
const GIVEN_UP_BEFORE_VOTES_ONLY: u32 = 2;
/// A member that asked us for a block this recently is still fetching its
/// shard (its blocks come one after another; then it trains a round).
const FETCHING_MS: Millis = 3_000;

/// How many updates that came too late to merge are kept for rebuilds (a
/// few rounds' worth of a large mesh; each holds a full delta).
const STALE_KEPT: usize = 32;

/// Our last verdict blocks kept to answer `RoundVerdict` requests.
const GOSSIPED_BLOCKS_KEPT: usize = 8;

/// Most members asked for a round's verdict block they did not gossip to
/// us (see `Core::ask_missing_credits`).
const MAX_CREDIT_ASKS: usize = 16;

/// The latest decided anchor and its votes.
#[derive(Clone, Debug)]
struct Decision {
    starts: u64,
    key: agreement::AnchorKey,
    votes: Vec<meshtrain_ledger::Vote>,
}

/// What we are waiting for from one of our requests.
#[derive(Clone, Copy, Debug)]
enum RequestFor {
    Payload(PayloadHash),
    /// Records of `author` from seq `from` on: anything else in the answer
    /// is dropped and blamed on the sender.
    Records {
        author: AuthorId,
        from: meshtrain_ledger::Seq,
    },
    Heads,
    Anchor,
    FinalVote(AuthorId),
    /// A member's verdict block of a round (see `Core::ask_missing_credits`).
    RoundVerdict,
}

/// A peer's requests in one budget window (see `Core::within_budget`).
#[derive(Clone, Copy, Debug)]
struct Asked {
    since: Millis,
    requests: u32,
    anchors: u32,
    /// What the answers sent in this window carried.
    bytes: u64,
}

/// The newest record of an author that this node holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainPos {
    pub seq: u64,
    pub round: u64,
}

/// What this node did with what it received, for its report.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub received: u64,
    pub merged: u64,
    pub clipped: u64,
    pub rejected: u64,
    pub published: u64,
    pub payload_bytes: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub rejected_by_author: BTreeMap<String, u64>,
    pub clipped_by_author: BTreeMap<String, u64>,
    pub merged_by_author: BTreeMap<String, u64>,
    /// Updates of keys without a vote, judged but not merged (open runs).
    pub probation_by_author: BTreeMap<String, u64>,
    /// What our answers to peers' requests carried, and the requests
    /// refused because their peer was over its budget.
    pub served_bytes: u64,
    pub refused_over_budget: u64,
}

pub struct Core {
    cfg: CoreConfig,
    key: AuthorKey,
    me: AuthorId,
    phase: Phase,
    book: RoundBook,
    anchor: Arc<Vec<f32>>,
    anchor_hash: WeightsHash,
    /// Taken while a round aggregates.
    outer: Option<OuterOptimizer>,
    /// The outer state as of the current anchor, shared with peers that ask.
    velocity: Arc<Vec<f32>>,
    outer_hash: WeightsHash,
    /// Our last anchors, by the round they start, for peers that fetch them.
    snapshots: std::collections::VecDeque<AnchorSnapshot>,
    /// The anchor each recent round closed on: an update is merged only if
    /// it was trained from its round's.
    bases: BTreeMap<u64, WeightsHash>,
    /// A round given up (gone back to the last decided anchor): it merges
    /// nothing.
    abandoned: Option<u64>,
    /// Rounds given up in a row, up to the last close.
    given_up_in_a_row: u32,
    /// When each member last asked us for a block (it is fetching its
    /// shard), noted in our first round only: one entry per member.
    block_asks: HashMap<AuthorId, Millis>,
    /// The anchor we made at our last close (while we are still on it).
    made: Option<Made>,
    /// A rebuild waiting for updates being fetched: the round whose base
    /// it rebuilds, and since when.
    rebuild_wait: Option<(u64, Millis)>,
    /// The last round we rebuilt from the votes, until a later decision:
    /// its result has no votes of its own, so going back to it later takes
    /// the rebuild again (see `revert_if_split`).
    rebuilt_target: Option<Box<close::Rebuilt>>,
    /// Updates that came too late to merge here, or of rounds we skipped,
    /// newest last (at most [`STALE_KEPT`]): a rebuild may need them.
    stale_kept: std::collections::VecDeque<rounds::Contribution>,
    /// The round our last close closed and the updates it waited past its
    /// quorum for, until its verdict block is made.
    waited: Option<(u64, std::collections::BTreeSet<RecordHash>)>,
    /// Which members came late to the rounds judged (see `lateness`).
    lateness: lateness::Lateness,
    /// The round that last took the set of members judged habitually late
    /// (once a round: see `Core::late_members`; the set is the round
    /// book's).
    late_taken_at: Option<u64>,
    /// Our last closes (at most [`CLOSES_KEPT`]), oldest first.
    closes: std::collections::VecDeque<LastClose>,
    /// The anchor the round in training started from.
    trained_from: Option<agreement::AnchorKey>,
    power: power::Power,
    votes: agreement::Votes,
    /// The round a close last asked for the votes it lacks, and when.
    votes_asked: Option<(u64, Millis)>,
    /// A decided anchor being fetched, and one fetched, waiting to be used.
    fetch: Option<AnchorFetch>,
    fetched: Option<Box<Fetched>>,
    /// A round's aggregation, waiting for the loss scores of its updates.
    scoring: Option<Box<AggregateJob>>,
    /// How long payload fetches took lately (an average): slow requests
    /// are hedged against it.
    payload_fetch_ms: Option<f64>,
    /// A decided anchor no voter could serve (not asked for again).
    unavailable: Option<(u64, agreement::AnchorKey)>,
    /// The last anchor half the voting power decided that we held, with
    /// its votes.
    settled: Option<Settled>,
    /// The latest anchor the votes decided, held or not: where a mesh split
    /// into many goes back to.
    decided: Option<Decision>,
    /// Open runs: every voter's verdicts of the rounds not yet credited, by
    /// round (see [`agreement::agreed_credits`]).
    credit_notes: BTreeMap<u64, BTreeMap<AuthorId, agreement::CreditNote>>,
    /// The last round whose credits were given.
    credited_through: Option<u64>,
    /// Our verdict blocks of the last rounds as gossiped (at most
    /// [`GOSSIPED_BLOCKS_KEPT`]), for members that missed one.
    gossiped_blocks: std::collections::VecDeque<(u64, Vec<u8>)>,
    /// Owners whose blocks of a round credit apart (see `note_credits`),
    /// until that round is credited.
    credit_conflicts: BTreeSet<(u64, AuthorId)>,
    /// A round is being closed (guards against closing it twice).
    closing: bool,
    own_head: Option<Head>,
    /// Our newest record and its payload and delta, when a restart may need
    /// to publish it again.
    own_last: Option<(SignedRecord, Vec<u8>, Arc<Vec<f32>>)>,
    verdict_head: Option<(u64, VerdictHash)>,
    /// The verdict block naming our current anchor (ours, or the one we
    /// joined on): what we show peers who ask for the anchor.
    attestation: Option<SignedVerdictBlock>,
    members: Members,
    chains: HashMap<AuthorId, ChainPos>,
    reputation: Reputation,
    wants: Wants,
    requests: HashMap<ReqId, RequestFor>,
    next_req: u64,
    sync: Option<AnchorSync>,
    /// Where this node took an anchor over, and why.
    joins: Vec<(u64, meshtrain_ledger::JoinKind)>,
    /// The round held records were last turned back into contributions for.
    rebuilt_for: Option<u64>,
    restarted: bool,
    /// Rejections already weighed by reputation, by the round of the
    /// rejected record (pruned as rounds pass: see `forget_old`).
    recorded_rejections: BTreeMap<u64, HashSet<RecordHash>>,
    /// Verified updates set aside as too far ahead of our round, by author:
    /// the earliest such round. Their records are in the ledger; the inbox
    /// rebuilds them once their round is near (see `offer`).
    skipped_ahead: HashMap<AuthorId, u64>,
    /// Authors whose records we are fetching, and when we asked: one
    /// request at a time each, however many gaps and heads name them,
    /// unless the last has gone unanswered for
    /// [`receive::RECORDS_PATIENCE_MS`] (a peer that holds a request open
    /// does not hold up the author's repair).
    records_asked: HashMap<AuthorId, (ReqId, Millis)>,
    /// Gossip messages not settled yet.
    unsettled: HashSet<MessageId>,
    early: Option<EarlyStopping>,
    /// An attacking node's Sybils and held-back answers (never an honest one).
    mischief: Option<mischief::Mischief>,
    /// The round after the last one: the spec's count, or earlier once
    /// early stopping fires.
    end_round: u64,
    counters: Counters,
    final_eval: Option<EvalReport>,
    /// Final evaluations asked for and not yet reported.
    evals_pending: u32,
    armed: HashMap<Timer, Millis>,
    rng: ChaCha8Rng,
    phase_since: Millis,
    last_served: Millis,
    /// When the latest final vote for another anchor than ours came in.
    odd_final_vote_at: Millis,
    /// Members that said they finished without a final vote (they took
    /// over the final anchor), with the seq their chain ends at.
    finished_unvoted: HashMap<AuthorId, Option<u64>>,
    /// What each peer asked of us in its current budget window.
    asked: HashMap<PeerId, Asked>,
    /// Bytes of answers sent and not yet delivered, per peer and in all:
    /// a peer that reads slowly makes us hold them.
    in_flight: HashMap<PeerId, u64>,
    in_flight_total: u64,
    now: Millis,
    out: Vec<Effect>,
}

impl Core {
    pub fn new(cfg: CoreConfig, key: AuthorKey, resume: Resume) -> Self {
        let me = key.author();
        let spec = &cfg.spec;
        let wait = AdaptiveWait::new(spec.rounds.min_wait_ms, spec.rounds.max_wait_ms);
        let book = RoundBook::new(
            resume.round,
            spec.exchange.staleness,
            spec.exchange.staleness_decay,
            wait,
        );
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ u64::from_le_bytes(me.0[..8].try_into().unwrap_or([0; 8])));
        let velocity = Arc::new(resume.outer.velocity().to_vec());
        let outer_hash = WeightsHash::of_f32(&velocity);
        let mischief = mischief::Mischief::new(&cfg, &key, &resume.anchor);
        let mut power = power::Power::new(cfg.admission.clone()).with_me(me);
        for (round, entries) in &resume.verdicts {
            power.credit_round(*round, entries);
        }
        let judged_late = lateness::Lateness::from_records(resume.recent, &power, resume.round.saturating_sub(1));
        let mut core = Self {
            early: spec.rounds.patience.map(EarlyStopping::new),
            mischief,
            end_round: spec.rounds.count,
            reputation: Reputation::new(cfg.reputation),
            key,
            me,
            phase: Phase::Gathering,
            book,
            anchor: Arc::new(resume.anchor),
            anchor_hash: resume.anchor_hash,
            outer: Some(resume.outer),
            velocity,
            outer_hash,
            snapshots: std::collections::VecDeque::new(),
            bases: BTreeMap::new(),
            trained_from: None,
            abandoned: None,
            given_up_in_a_row: 0,
            block_asks: HashMap::new(),
            made: None,
            closes: std::collections::VecDeque::new(),
            stale_kept: std::collections::VecDeque::new(),
            waited: None,
            lateness: judged_late,
            late_taken_at: None,
            rebuild_wait: None,
            rebuilt_target: None,
            power,
            votes: agreement::Votes::default(),
            votes_asked: None,
            fetch: None,
            fetched: None,
            scoring: None,
            payload_fetch_ms: None,
            unavailable: None,
            settled: None,
            decided: None,
            credit_notes: BTreeMap::new(),
            credited_through: None,
            gossiped_blocks: std::collections::VecDeque::new(),
            credit_conflicts: BTreeSet::new(),
            closing: false,
            own_head: resume.own_head,
            own_last: resume.own_last,
            verdict_head: resume.verdict_head,
            attestation: resume.attestation,
            members: Members::default(),
            chains: resume.chains,
            wants: Wants::default(),
            requests: HashMap::new(),
            next_req: 0,
            sync: None,
            joins: Vec::new(),
            rebuilt_for: None,
            restarted: resume.restarted,
            recorded_rejections: BTreeMap::new(),
            skipped_ahead: HashMap::new(),
            records_asked: HashMap::new(),
            unsettled: HashSet::new(),
            counters: Counters::default(),
            final_eval: None,
            evals_pending: 0,
            armed: HashMap::new(),
            rng,
            phase_since: 0,
            last_served: 0,
            odd_final_vote_at: 0,
            finished_unvoted: HashMap::new(),
            asked: HashMap::new(),
            in_flight: HashMap::new(),
            in_flight_total: 0,
            now: 0,
            out: Vec::new(),
            cfg,
        };
        core.remember_snapshot();
        if core.round() == 0 && core.anchor_hash == core.cfg.genesis_weights {
            // Genesis needs no vote: every node derives it from the seed.
            core.settled = Some(Settled {
                starts: 0,
                key: core.anchor_key(),
                weights: core.anchor.clone(),
                velocity: core.velocity.clone(),
                votes: Vec::new(),
            });
        }
        core
    }

    /// Handles one input at time `now`; returns what to do about it.
    pub fn handle(&mut self, input: Input, now: Millis) -> Vec<Effect> {
        self.now = self.now.max(now);
        match input {
            Input::Start => self.on_start(),
            Input::Connected(peer) => self.on_connected(peer),
            Input::Disconnected(peer) => self.on_disconnected(peer),
            Input::Subscribed(peer) => self.on_subscribed(peer),
            Input::Unsubscribed(peer) => self.members.unsubscribe(&peer),
            Input::Gossip { id, source, data } => self.on_gossip(id, source, &data),
            Input::Request { peer, chan, request } => self.on_request(peer, chan, request),
            Input::Response { req, peer, response } => self.on_response(req, peer, response),
            Input::RequestFailed { req, peer } => self.on_request_failed(req, peer),
            Input::Checked(done) => self.on_checked(*done),
            Input::InboxBusy(job) => self.on_inbox_busy(*job),
            Input::Trained(t) => self.on_trained(t),
            Input::Crafted(t) => self.on_crafted(*t),
            Input::Evaluated { round, report } => self.on_evaluated(round, *report),
            Input::Aggregated(done) => self.on_aggregated(*done),
            Input::Scored { round, scores } => self.on_scored(round, scores),
            Input::OfferChecked { peer, result } => self.on_offer_checked(peer, result),
            Input::AnchorChecked { peer, result } => self.on_anchor_checked(peer, result),
            Input::DataReady => self.on_data_ready(),
            Input::Served { peer, bytes } => self.on_served(peer, bytes),
            Input::Delivered { peer, bytes } => self.on_delivered(peer, bytes),
            Input::Timer(timer) => {
                if self.armed.get(&timer).is_some_and(|at| *at <= self.now) {
                    self.armed.remove(&timer);
                    self.on_timer(timer);
                }
            }
        }
        std::mem::take(&mut self.out)
    }

    fn on_timer(&mut self, timer: Timer) {
        match timer {
            Timer::Gather => self.on_gather_timeout(),
            Timer::Deadline => self.maybe_close(),
            Timer::PayloadRetry => self.retry_payloads(),
            Timer::AntiEntropy => self.anti_entropy(),
            Timer::Sync => self.sync_tick(),
            Timer::Fetch => self.fetch_tick(),
            Timer::Settle => self.settle_timer(),
            Timer::Collude => self.try_collude(),
            Timer::Drain => self.drain_tick(),
            Timer::Held => self.release_held(),
            Timer::Late => self.release_late(),
            // Armed only while the run went on (a departure mid-run), so
            // it fires even when the run ended within its debounce: the
            // blocks of a member that died must be re-replicated still.
            Timer::Replan => {
                let members = self.voters_by_author();
                self.emit(Effect::Replan { members });
            }
        }
    }

    // ---- small helpers --------------------------------------------------

    fn emit(&mut self, effect: Effect) {
        self.out.push(effect);
    }

    fn arm(&mut self, timer: Timer, at: Millis) {
        self.armed.insert(timer, at);
        self.emit(Effect::SetTimer { timer, at });
    }

    fn set_phase(&mut self, phase: Phase) {
        tracing::trace!(
            round = self.round(),
            from = self.phase.name(),
            to = phase.name(),
            "phase"
        );
        self.phase = phase;
        self.phase_since = self.now;
    }

    fn request(&mut self, peer: PeerId, request: FetchRequest, what: RequestFor) -> ReqId {
        let req = ReqId(self.next_req);
        self.next_req += 1;
        self.requests.insert(req, what);
        self.emit(Effect::Request { req, peer, request });
        req
    }

    pub fn round(&self) -> u64 {
        self.book.current()
    }

    pub fn me(&self) -> AuthorId {
        self.me
    }

    pub fn anchor_hash(&self) -> WeightsHash {
        self.anchor_hash
    }

    pub fn anchor(&self) -> &Arc<Vec<f32>> {
        &self.anchor
    }

    pub fn phase_name(&self) -> &'static str {
        self.phase.name()
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Whether `peer`'s author is banned here (its connections are refused).
    pub fn is_banned_peer(&self, peer: &PeerId) -> bool {
        self.members.is_banned_peer(peer)
    }

    /// Whether a lost connection to `peer` is worth redialling: it joined
    /// the run and is not banned. Strangers who connected and left are
    /// not (they would fill the redial table).
    pub fn worth_redialling(&self, peer: &PeerId) -> bool {
        self.members.has_joined(peer) && !self.members.is_banned_peer(peer)
    }

    /// Gossip messages handed in and not settled yet.
    pub fn unsettled(&self) -> usize {
        self.unsettled.len()
    }

    /// Whether the node takes part in rounds yet (before, updates of the
    /// mesh are history to it: no payloads to fetch, no verdicts to give).
    fn in_rounds(&self) -> bool {
        !matches!(self.phase, Phase::Gathering | Phase::Fetching | Phase::Syncing)
    }

    /// Members that count, by author (a stable order for every choice):
    /// not banned, and with voting power (in an open run where nobody has
    /// earned any yet, every member).
    fn voters_by_author(&self) -> BTreeMap<AuthorId, PeerId> {
        let anyone = self.power.total() == 0;
        self.members
            .by_author()
            .into_iter()
            .filter(|(a, _)| !self.members.is_banned(a) && self.power.admitted(a))
            .filter(|(a, _)| anyone || self.power.of(a) > 0)
            .collect()
    }

    fn connected_authors(&self) -> HashSet<AuthorId> {
        self.voters_by_author().into_keys().collect()
    }

    /// The round of AUTHOR's newest record that we hold.
    fn head_round(&self, author: &AuthorId) -> Option<u64> {
        self.chains.get(author).map(|c| c.round)
    }

    fn count_rejection(&mut self, reason: &'static str, author: Option<&AuthorId>) {
        self.counters.rejected += 1;
        *self.counters.rejected_by_reason.entry(reason.to_string()).or_default() += 1;
        if let Some(a) = author {
            *self.counters.rejected_by_author.entry(a.to_string()).or_default() += 1;
        }
        self.emit(Effect::Counted {
            outcome: "rejected",
            reason,
        });
    }

    /// The one place a message's outcome is reported: to gossipsub (for
    /// gossip), to the metrics and the log (by the shell).
    fn settle(&mut self, origin: &Origin, outcome: &Outcome, update: bool) {
        if let Origin::Gossip { id, .. } = origin {
            if !self.unsettled.remove(id) {
                // Already settled (or never handed in): never report twice.
                tracing::error!(?id, "a gossip message was settled twice; ignoring the second outcome");
                return;
            }
        }
        self.emit(Effect::Settle {
            origin: origin.clone(),
            outcome: outcome.clone(),
            update,
        });
    }

    /// Schedules a re-plan of the data placement (debounced). Not once the
    /// last round is closed: members leaving at the end would have every
    /// draining node fetch their blocks from the others, which then never
    /// fall quiet and drain to the limit.
    fn schedule_replan(&mut self) {
        if !matches!(self.phase, Phase::Gathering) && !self.run_over() {
            self.arm(Timer::Replan, self.now + 1000);
        }
    }

    /// The last round is closed: settling, evaluating, draining or done.
    fn run_over(&self) -> bool {
        matches!(
            self.phase,
            Phase::Settling { .. } | Phase::Finishing | Phase::Draining | Phase::Done
        )
    }

    fn ban(&mut self, author: AuthorId, why: &str) {
        if author == self.me || !self.members.ban(author) {
            return;
        }
        self.book.forget(&author);
        self.skipped_ahead.remove(&author);
        self.book.unannounce(self.round(), &author);
        self.wants.drop_author(&author);
        tracing::warn!(author = %author.short(), round = self.round(), why, "banning author");
        self.emit(Effect::Inbox(Job::Ban(author)));
        self.emit(Effect::Ban {
            author,
            peer: members::peer_of(&author),
        });
        self.schedule_replan();
        // One fewer author to wait for.
        self.maybe_close();
    }

    /// What this node did, for its report.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn banned(&self) -> Vec<AuthorId> {
        let mut b: Vec<AuthorId> = self.members.banned().copied().collect();
        b.sort();
        b
    }

    /// Rounds at which this node took the mesh's anchor over at start or
    /// when left behind.
    pub fn joins(&self) -> Vec<u64> {
        use meshtrain_ledger::JoinKind;
        self.join_rounds(|k| matches!(k, JoinKind::Start | JoinKind::Behind))
    }

    /// Rounds whose anchor this node repaired onto the decided one, or gave
    /// up for the last decided one.
    pub fn repairs(&self) -> Vec<u64> {
        use meshtrain_ledger::JoinKind;
        self.join_rounds(|k| matches!(k, JoinKind::Repair | JoinKind::Revert))
    }

    fn join_rounds(&self, kind: impl Fn(&meshtrain_ledger::JoinKind) -> bool) -> Vec<u64> {
        self.joins.iter().filter(|(_, k)| kind(k)).map(|(r, _)| *r).collect()
    }

    pub fn restarted(&self) -> bool {
        self.restarted
    }

    pub fn final_eval(&self) -> Option<&EvalReport> {
        self.final_eval.as_ref()
    }

    /// The round the run ended at when early stopping fired.
    pub fn stopped_early_at(&self) -> Option<u64> {
        (self.end_round < self.cfg.spec.rounds.count).then_some(self.end_round)
    }

    pub fn best_round(&self) -> Option<u64> {
        self.early.as_ref().and_then(|e| e.best_round)
    }

    /// Authors whose chains we hold.
    pub fn authors_seen(&self) -> Vec<AuthorId> {
        let mut a: Vec<AuthorId> = self.chains.keys().copied().collect();
        a.sort();
        a
    }
}

#[cfg(test)]
mod tests;
