//! How a node finds the rest of the mesh from one bootstrap address, and
//! keeps it: peers' identify reports feed Kademlia, every peer Kademlia
//! learns of is dialled, a connection that stops answering pings is closed,
//! and a peer whose last connection closed is dialled again with backoff.
//! Shared by the node and the discovery benchmark, so that the benchmark
//! measures the node's own policy.
//!
//! Why pings: a link that goes dark (a cut cable, a partition) drops
//! packets without a reset, and TCP keeps the connection "established"
//! while it retransmits with a doubling timeout. After two minutes of that
//! the next retransmission may be a minute away, so a healed link carried
//! nothing for 37 s in the netns test, and the two sides of a healed cut
//! went on closing rounds without each other.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::swarm::SwarmEvent;
use libp2p::{identify, kad, ping, PeerId, Swarm};
use tracing::info;

use crate::{MeshBehaviour, MeshBehaviourEvent};

/// Most connections a node opens on its own.
pub const MAX_DIALLED: usize = 64;

/// The first redial comes this long after a peer's last connection closed;
/// each failed one doubles the wait up to [`Redial::MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_secs(1);

/// Peers whose last connection closed, and when to dial each again. Pure:
/// the caller says what happened and when, and asks what is due.
#[derive(Debug, Default)]
pub struct Redial {
    peers: HashMap<PeerId, Backoff>,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    /// When the peer was last connected (or first scheduled).
    lost: Instant,
    next: Instant,
    wait: Duration,
}

impl Redial {
    /// The longest wait between two dials of one peer: a healed link is
    /// used again within this (plus a dial) of healing.
    pub const MAX_WAIT: Duration = Duration::from_secs(4);
    /// A peer unreachable this long is given up (it left); Kademlia's
    /// periodic bootstrap finds it again if it comes back.
    pub const GIVE_UP: Duration = Duration::from_secs(600);
    /// Most peers tracked at once, so that a stream of strangers who
    /// connect and leave cannot grow the table without bound.
    pub const MAX_PEERS: usize = 4 * MAX_DIALLED;

    /// The last connection to `peer` closed at `now`: dial it again soon.
    pub fn lost(&mut self, peer: PeerId, now: Instant) {
        if self.peers.len() >= Self::MAX_PEERS && !self.peers.contains_key(&peer) {
            return;
        }
        self.peers.insert(
            peer,
            Backoff {
                lost: now,
                next: now + FIRST_WAIT,
                wait: FIRST_WAIT,
            },
        );
    }

    /// `peer` is connected again (or must not be dialled: banned).
    pub fn forget(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// Peers due for a dial at `now`; each is rescheduled with a doubled
    /// wait, and peers lost longer than [`Self::GIVE_UP`] are dropped.
    pub fn due(&mut self, now: Instant) -> Vec<PeerId> {
        self.peers
            .retain(|_, b| now.saturating_duration_since(b.lost) < Self::GIVE_UP);
        let mut due = Vec::new();
        for (peer, b) in &mut self.peers {
            if b.next <= now {
                b.wait = (b.wait * 2).min(Self::MAX_WAIT);
                b.next = now + b.wait;
                due.push(*peer);
            }
        }
        due.sort();
        due
    }

    /// When the next dial is due, if any peer is waiting.
    pub fn next_wake(&self) -> Option<Instant> {
        self.peers.values().map(|b| b.next).min()
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

/// The discovery and liveness policy of one swarm.
#[derive(Debug, Default)]
pub struct Discovery {
    pub redial: Redial,
}

impl Discovery {
    /// Acts on the discovery part of EVENT. `may_dial` vetoes peers (banned
    /// ones, say); `redial` says whose lost connection is worth dialling
    /// again (members of the run, not strangers who came and went).
    pub fn on_event(
        &mut self,
        swarm: &mut Swarm<MeshBehaviour>,
        event: &SwarmEvent<MeshBehaviourEvent>,
        may_dial: impl Fn(&PeerId) -> bool,
        redial: impl Fn(&PeerId) -> bool,
        now: Instant,
    ) {
        match event {
            SwarmEvent::Behaviour(MeshBehaviourEvent::Identify(identify::Event::Received {
                peer_id, info, ..
            })) => {
                for addr in &info.listen_addrs {
                    swarm.behaviour_mut().kad.add_address(peer_id, addr.clone());
                }
            }
            SwarmEvent::Behaviour(MeshBehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. }))
                if !swarm.is_connected(peer) && may_dial(peer) && swarm.connected_peers().count() < MAX_DIALLED =>
            {
                let _ = swarm.dial(*peer);
            }
            // A peer that does not speak ping is not dead; one that stops
            // answering is, whatever TCP believes.
            SwarmEvent::Behaviour(MeshBehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(failure),
            })) if !matches!(failure, ping::Failure::Unsupported) => {
                info!(peer = %short(peer), %failure, "a connection stopped answering pings; closing it");
                swarm.close_connection(*connection);
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => self.redial.forget(peer_id),
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } if may_dial(peer_id) && redial(peer_id) => self.redial.lost(*peer_id, now),
            _ => {}
        }
    }

    /// Dials the peers whose redial is due at `now`.
    pub fn on_wake(&mut self, swarm: &mut Swarm<MeshBehaviour>, may_dial: impl Fn(&PeerId) -> bool, now: Instant) {
        for peer in self.redial.due(now) {
            if swarm.is_connected(&peer) || !may_dial(&peer) {
                self.redial.forget(&peer);
                continue;
            }
            if swarm.connected_peers().count() < MAX_DIALLED {
                let _ = swarm.dial(peer);
            }
        }
    }

    pub fn next_wake(&self) -> Option<Instant> {
        self.redial.next_wake()
    }
}

/// The last 8 characters of a peer id, for logs.
pub fn short(peer: &PeerId) -> String {
    let s = peer.to_base58();
    s[s.len().saturating_sub(8)..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_peer_is_redialled_with_a_doubling_wait_up_to_the_cap() {
        let t0 = Instant::now();
        let p = PeerId::random();
        let mut r = Redial::default();
        r.lost(p, t0);
        assert!(r.due(t0).is_empty(), "not at once");
        assert_eq!(r.next_wake(), Some(t0 + FIRST_WAIT));
        let mut at = t0 + FIRST_WAIT;
        let mut gaps = Vec::new();
        for _ in 0..5 {
            assert_eq!(r.due(at), vec![p]);
            let next = r.next_wake().expect("still waiting");
            gaps.push((next - at).as_secs());
            at = next;
        }
        assert_eq!(gaps, [2, 4, 4, 4, 4]);
    }

    #[test]
    fn a_reconnected_peer_is_not_dialled_and_a_long_gone_one_is_given_up() {
        let t0 = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut r = Redial::default();
        r.lost(a, t0);
        r.lost(b, t0);
        r.forget(&a);
        assert_eq!(r.due(t0 + FIRST_WAIT), vec![b]);
        assert!(r.due(t0 + Redial::GIVE_UP).is_empty());
        assert!(r.is_empty());
    }

    #[test]
    fn the_table_is_bounded() {
        let t0 = Instant::now();
        let mut r = Redial::default();
        for _ in 0..Redial::MAX_PEERS + 10 {
            r.lost(PeerId::random(), t0);
        }
        assert_eq!(r.len(), Redial::MAX_PEERS);
    }
}
