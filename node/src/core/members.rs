//! Who is in the run, as this node sees it: connected peers, peers
//! subscribed to the run's topic (members), everyone that ever joined (the
//! start barrier counts those), and banned authors.

use std::collections::{BTreeMap, HashMap, HashSet};

use meshtrain_gossip::libp2p::PeerId;
use meshtrain_gossip::{ed25519_of, peer_id_of};
use meshtrain_ledger::AuthorId;

#[derive(Debug, Default)]
pub struct Members {
    connected: HashSet<PeerId>,
    /// Peers subscribed to the run's topic, with their author key.
    members: HashMap<PeerId, AuthorId>,
    /// Every peer that ever joined (banned ones included): a peer banned
    /// while gathering must not stall the start barrier.
    joined: HashSet<PeerId>,
    banned: HashSet<AuthorId>,
}

/// The author key behind a peer id (ed25519 peer ids embed it).
pub fn author_of(peer: &PeerId) -> Option<AuthorId> {
    ed25519_of(peer).map(AuthorId)
}

/// The peer id of an author key.
pub fn peer_of(author: &AuthorId) -> Option<PeerId> {
    peer_id_of(&author.0).ok()
}

impl Members {
    pub fn connect(&mut self, peer: PeerId) {
        self.connected.insert(peer);
    }

    /// The last connection to `peer` closed: returns its author if it was a
    /// member.
    pub fn disconnect(&mut self, peer: &PeerId) -> Option<AuthorId> {
        self.connected.remove(peer);
        self.members.remove(peer)
    }

    /// `peer` subscribed to the run's topic: returns its author when it is a
    /// new member (not banned, not already one).
    pub fn subscribe(&mut self, peer: PeerId) -> Option<AuthorId> {
        let author = author_of(&peer)?;
        self.joined.insert(peer);
        if self.banned.contains(&author) {
            return None;
        }
        self.members.insert(peer, author).is_none().then_some(author)
    }

    pub fn unsubscribe(&mut self, peer: &PeerId) {
        self.members.remove(peer);
    }

    /// Bans `author`; returns false if it already was.
    pub fn ban(&mut self, author: AuthorId) -> bool {
        if !self.banned.insert(author) {
            return false;
        }
        if let Some(peer) = peer_of(&author) {
            self.members.remove(&peer);
        }
        true
    }

    pub fn is_banned(&self, author: &AuthorId) -> bool {
        self.banned.contains(author)
    }

    pub fn is_banned_peer(&self, peer: &PeerId) -> bool {
        author_of(peer).is_some_and(|a| self.banned.contains(&a))
    }

    pub fn banned(&self) -> impl Iterator<Item = &AuthorId> {
        self.banned.iter()
    }

    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.connected.contains(peer)
    }

    /// Members' count (banned ones are never members).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether `peer` ever joined the run's topic.
    pub fn has_joined(&self, peer: &PeerId) -> bool {
        self.joined.contains(peer)
    }

    pub fn joined(&self) -> usize {
        self.joined.len()
    }

    /// Members by author, sorted (a stable order for every choice made from it).
    pub fn by_author(&self) -> BTreeMap<AuthorId, PeerId> {
        self.members.iter().map(|(p, a)| (*a, *p)).collect()
    }

    pub fn authors(&self) -> HashSet<AuthorId> {
        self.members.values().copied().collect()
    }

    pub fn peers(&self) -> Vec<PeerId> {
        let mut peers: Vec<PeerId> = self.members.keys().copied().collect();
        peers.sort();
        peers
    }

    pub fn author_of_member(&self, peer: &PeerId) -> Option<AuthorId> {
        self.members.get(peer).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtrain_ledger::AuthorKey;

    fn peer(n: u8) -> (PeerId, AuthorId) {
        let a = AuthorKey::from_secret([n; 32]).author();
        (peer_of(&a).expect("ed25519 key"), a)
    }

    #[test]
    fn join_leave_and_ban() {
        let mut m = Members::default();
        let (p1, a1) = peer(1);
        let (p2, a2) = peer(2);
        m.connect(p1);
        assert_eq!(m.subscribe(p1), Some(a1));
        assert_eq!(m.subscribe(p1), None, "already a member");
        assert!(m.ban(a2));
        assert!(!m.ban(a2));
        assert_eq!(m.subscribe(p2), None, "banned authors never become members");
        assert_eq!(m.joined(), 2, "the barrier counts the banned peer too");
        assert!(m.is_banned_peer(&p2));
        assert_eq!(m.disconnect(&p1), Some(a1));
        assert!(m.is_empty());
    }
}
