//! Before round 0: gathering peers, the data phase (run by the shell), and
//! where the mesh is when this node arrives late or restarts. Also the
//! membership events, which matter in every phase.

pub use meshtrain_gossip::discovery::short;
use meshtrain_gossip::libp2p::PeerId;
use meshtrain_gossip::FetchRequest;
use rand::Rng;
use tracing::{info, warn};

use super::{members, Core, Effect, Phase, RequestFor, Timer};
use crate::inbox::Job;

/// Pause between anti-entropy asks.
const ANTI_ENTROPY_MS: u64 = 2000;

impl Core {
    pub(super) fn on_start(&mut self) {
        self.set_phase(Phase::Gathering);
        self.arm(Timer::AntiEntropy, self.now + ANTI_ENTROPY_MS);
        if self.members.joined() >= self.cfg.wait_peers {
            self.begin_data();
        } else {
            self.arm(Timer::Gather, self.now + self.cfg.wait_peers_timeout);
        }
    }

    pub(super) fn on_connected(&mut self, peer: PeerId) {
        let author = members::author_of(&peer);
        if author.is_none_or(|a| !self.power.admitted(&a)) {
            // Not on the run's roster: refused at the door.
            warn!(peer = %short(&peer), "refusing a connection from a peer that is not a member of this run");
            if let Some(author) = author {
                self.emit(Effect::Ban {
                    author,
                    peer: Some(peer),
                });
            }
            return;
        }
        self.members.connect(peer);
        if self.members.is_banned_peer(&peer) {
            if let Some(author) = author {
                self.emit(Effect::Ban {
                    author,
                    peer: Some(peer),
                });
            }
        }
    }

    pub(super) fn on_disconnected(&mut self, peer: PeerId) {
        if let Some(author) = self.members.disconnect(&peer) {
            info!(peer = %short(&peer), round = self.round(), "peer left");
            self.book.forget(&author);
            self.schedule_replan();
            // A member we waited for is gone.
            self.maybe_close();
        }
    }

    pub(super) fn on_subscribed(&mut self, peer: PeerId) {
        if members::author_of(&peer).is_none_or(|a| !self.power.admitted(&a)) {
            return;
        }
        if self.members.subscribe(peer).is_some() {
            info!(peer = %short(&peer), members = self.members.len(), "peer joined the run");
            self.schedule_replan();
        }
        if matches!(self.phase, Phase::Gathering) && self.members.joined() >= self.cfg.wait_peers {
            self.begin_data();
        }
    }

    /// Still gathering and short of the peers it waits for: the shell
    /// looks for more.
    pub fn short_of_peers(&self) -> bool {
        matches!(self.phase, Phase::Gathering) && self.members.joined() < self.cfg.wait_peers
    }

    pub(super) fn on_gather_timeout(&mut self) {
        if matches!(self.phase, Phase::Gathering) {
            warn!(
                members = self.members.len(),
                wanted = self.cfg.wait_peers,
                "starting without all peers"
            );
            self.begin_data();
        }
    }

    /// Gathering is over: the shell makes sure the shard is here.
    fn begin_data(&mut self) {
        self.set_phase(Phase::Fetching);
        let members = self.voters_by_author();
        self.emit(Effect::BeginData { members });
    }

    /// The shard is here and the trainer runs. A late joiner or a restarted
    /// node first asks where the mesh is.
    pub(super) fn on_data_ready(&mut self) {
        if !matches!(self.phase, Phase::Fetching) {
            return;
        }
        if self.members.is_empty() {
            self.begin_rounds();
            return;
        }
        self.set_phase(Phase::Syncing);
        self.start_sync();
        if self.sync.is_none() {
            self.begin_rounds();
        }
    }

    /// Takes part in rounds from the current one on. Records of it that
    /// came in before (or were held before a restart) count again, and
    /// those of the rounds a rebuild of the last one may take are kept for
    /// it (as updates of rounds before we joined: never merged twice). A
    /// restarted node otherwise rebuilt without the updates it had merged
    /// itself and went back instead (sign-flip seed 1312).
    pub(super) fn begin_rounds(&mut self) {
        self.rebuild_from_join();
        self.next_round_or_finish();
        // Votes that came in while we synced may show the mesh far ahead.
        self.check_ahead();
    }

    /// Rebuilds from the rounds before the one we joined at (just set by
    /// `RoundBook::restart_at` or a restart) that a rebuild may take: one
    /// bound for every caller, so a second job never hands updates of a
    /// round already closed back to the book (they would merge again).
    pub(super) fn rebuild_from_join(&mut self) {
        let staleness = self.cfg.spec.exchange.staleness;
        self.rebuild(self.book.joined_at().saturating_sub(staleness + 1));
    }

    /// Asks the inbox to turn held records of `round` and later back into
    /// contributions or wanted payloads (once per round).
    fn rebuild(&mut self, round: u64) {
        if self.rebuilt_for != Some(round) {
            self.rebuilt_for = Some(round);
            self.emit(Effect::Inbox(Job::Rebuild { round, authors: None }));
        }
    }

    /// Asks a random member for its chain heads, to fill what gossip missed.
    pub(super) fn anti_entropy(&mut self) {
        self.arm(Timer::AntiEntropy, self.now + ANTI_ENTROPY_MS);
        let peers = self.members.peers();
        if peers.is_empty() {
            return;
        }
        let peer = peers[self.rng.random_range(0..peers.len())];
        self.request(peer, FetchRequest::Heads, RequestFor::Heads);
    }
}
