//! The three outcomes of an incoming message and their typed reasons
//! (Psyche's `ApplyMessageOutcome`): accepted, ignored (why), or invalid
//! (why, and the sender pays). [`super::Core::settle`] is the one place that
//! turns an outcome into gossipsub's acceptance, a counter and a log line.

use std::fmt;

use meshtrain_gossip::libp2p::gossipsub::MessageId;
use meshtrain_gossip::libp2p::PeerId;
use meshtrain_ledger::RejectReason;

/// Where a message came from, for gossipsub's verdict and for retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Gossiped: its verdict goes back to gossipsub exactly once.
    Gossip { id: MessageId, source: PeerId },
    /// An answer to one of our fetch requests.
    Fetched { from: PeerId },
    /// From this node itself: released from the gap buffer, or read back
    /// from the ledger after a restart.
    Local,
}

impl Origin {
    /// The peer that handed us the message, if another peer did.
    pub fn peer(&self) -> Option<PeerId> {
        match self {
            Origin::Gossip { source, .. } => Some(*source),
            Origin::Fetched { from } => Some(*from),
            Origin::Local => None,
        }
    }
}

/// Why a well-formed message changed nothing here (beyond a vote, for
/// [`IgnoreReason::VoteOnly`]). None of these blame the peer that
/// forwarded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IgnoreReason {
    /// Already held.
    Duplicate,
    /// Its author is banned here (and it carries no vote we count).
    BannedAuthor,
    /// Its author is banned here: not stored, its payload never fetched,
    /// but it is a valid record whose vote every node counts, so it is
    /// passed on (members that banned the author too get the vote).
    VoteOnly,
    /// An equivocation proof this node already holds.
    KnownProof,
    /// This node could not store it (a local disk fault, not the sender's).
    LocalFault,
    /// Its round lies outside what this node still aggregates.
    OutsideWindow,
    /// Not from or about an admitted member of the run.
    NotAMember,
    /// The inbox's queue was full: peers sent faster than it checks.
    Busy,
}

impl IgnoreReason {
    pub fn code(&self) -> &'static str {
        match self {
            IgnoreReason::Duplicate => "duplicate",
            IgnoreReason::BannedAuthor => "banned",
            IgnoreReason::VoteOnly => "vote-only",
            IgnoreReason::KnownProof => "known-proof",
            IgnoreReason::LocalFault => "local-fault",
            IgnoreReason::OutsideWindow => "outside-window",
            IgnoreReason::NotAMember => "not-a-member",
            IgnoreReason::Busy => "busy",
        }
    }
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// What became of one message; maps one-to-one onto gossipsub's
/// `MessageAcceptance` through [`Outcome::acceptance`].
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Accepted,
    Ignored(IgnoreReason),
    Invalid(RejectReason),
}

/// gossipsub's three answers, without depending on its enum here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acceptance {
    Accept,
    Ignore,
    Reject,
}

impl Outcome {
    /// Reject (which costs the forwarding peer score) only when the message
    /// alone shows the fault; state-dependent faults are handled through
    /// proofs and bans of the author instead.
    pub fn acceptance(&self) -> Acceptance {
        match self {
            Outcome::Accepted | Outcome::Ignored(IgnoreReason::VoteOnly) => Acceptance::Accept,
            Outcome::Ignored(_) => Acceptance::Ignore,
            Outcome::Invalid(reason) if reason.blames_the_forwarder() => Acceptance::Reject,
            Outcome::Invalid(_) => Acceptance::Ignore,
        }
    }

    /// `accepted`, `ignored` or `invalid`, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Ignored(_) => "ignored",
            Outcome::Invalid(_) => "invalid",
        }
    }

    /// The reason's stable code (empty when accepted).
    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Accepted => "",
            Outcome::Ignored(r) => r.code(),
            Outcome::Invalid(r) => r.code(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_faults_visible_in_the_message_reject_the_forwarder() {
        assert_eq!(Outcome::Accepted.acceptance(), Acceptance::Accept);
        assert_eq!(
            Outcome::Ignored(IgnoreReason::Duplicate).acceptance(),
            Acceptance::Ignore
        );
        assert_eq!(
            Outcome::Invalid(RejectReason::BadSignature).acceptance(),
            Acceptance::Reject
        );
        assert_eq!(
            Outcome::Invalid(RejectReason::Equivocation).acceptance(),
            Acceptance::Ignore
        );
        assert_eq!(Outcome::Invalid(RejectReason::Replay).acceptance(), Acceptance::Ignore);
        assert_eq!(Outcome::Ignored(IgnoreReason::LocalFault).reason(), "local-fault");
        // A banned author's vote is relayed: nodes that banned it count it too.
        assert_eq!(
            Outcome::Ignored(IgnoreReason::VoteOnly).acceptance(),
            Acceptance::Accept
        );
        assert_eq!(
            Outcome::Ignored(IgnoreReason::BannedAuthor).acceptance(),
            Acceptance::Ignore
        );
    }
}
