//! The wire envelope: what travels on the gossip topic and over the fetch
//! protocol. Records, proofs and payloads are opaque bytes here; the node
//! hands them to the ledger and the codec to interpret.
//!
//! Every decode runs under a hard size limit, checks the version, and
//! rejects trailing bytes.

use bincode::config::{self, Config};
use bincode::{Decode, Encode};

use crate::GossipError;

/// The envelope version this build speaks.
pub const WIRE_VERSION: u16 = 4;

/// Gossiped on `meshtrain/<run_id>/v1`.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub enum GossipMessage {
    /// A signed update record, with its payload when that is small.
    Update { record: Vec<u8>, payload: Option<Vec<u8>> },
    /// Proof that an author signed two conflicting records.
    Equivocation { proof: Vec<u8> },
    /// A node's signed verdict block. For the run's last round it is the
    /// node's vote for the final anchor (earlier rounds are voted by the
    /// next round's records); in open runs every round's block also goes
    /// out, so that every node credits keys by the same verdicts.
    Vote { block: Vec<u8> },
}

/// One author's chain head, as a peer knows it.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct HeadInfo {
    pub author: [u8; 32],
    pub seq: u64,
    pub hash: [u8; 32],
}

/// Asked of one peer over `/meshtrain/fetch/1`.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum FetchRequest {
    /// An encoded delta, by content hash.
    Payload { hash: [u8; 32] },
    /// Up to `max` consecutive records of `author` from `from_seq`.
    Records { author: [u8; 32], from_seq: u64, max: u32 },
    /// Every chain head the peer holds (anti-entropy).
    Heads,
    /// Anchor weights and their outer state: those hashing to `weights`
    /// (None: the peer's current ones), for nodes that join late, catch up
    /// or repair.
    Anchor { weights: Option<[u8; 32]> },
    /// The peer's signed verdict block for the run's last round, its vote
    /// for the final anchor (for a node that missed the gossiped one).
    FinalVote,
    /// A data block, by content hash.
    Block { hash: [u8; 32] },
    /// The vote for the final anchor of `author` that the peer holds (its
    /// own or one it received), for a node that cannot reach that author
    /// (one it banned still counts its vote).
    FinalVoteOf { author: [u8; 32] },
    /// The peer's own signed verdict block for `round`, the one it
    /// gossiped (open runs: the credits it gave), for a node that missed it.
    RoundVerdict { round: u64 },
}

#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub enum FetchResponse {
    Payload(Vec<u8>),
    Records(Vec<Vec<u8>>),
    Heads(Vec<HeadInfo>),
    /// The round the anchor starts, its weights and outer optimiser state
    /// (encoded by the node), and the peer's signed verdict block that names
    /// both hashes (empty for genesis).
    Anchor {
        round: u64,
        weights: Vec<u8>,
        outer: Vec<u8>,
        verdict: Vec<u8>,
    },
    Block(Vec<u8>),
    /// A signed verdict block (answer to `FinalVote`, `FinalVoteOf` and `RoundVerdict`).
    Vote(Vec<u8>),
    /// Answer to `FinalVote` from a member that finished the run without a
    /// final vote of its own (it took over the decided final anchor):
    /// nothing more will come from it, and its chain ends at `head_seq`
    /// (none: it signed no record).
    Finished {
        head_seq: Option<u64>,
    },
    NotFound,
    /// The peer will not answer (busy, banned requester, ...).
    Refused(String),
}

#[derive(Encode, Decode)]
struct Envelope<T> {
    version: u16,
    body: T,
}

fn cfg<const LIMIT: usize>() -> impl Config {
    config::standard().with_limit::<LIMIT>()
}

fn encode_env<T: Encode>(body: T) -> Vec<u8> {
    // Plain data into a Vec has no failure mode.
    bincode::encode_to_vec(
        Envelope {
            version: WIRE_VERSION,
            body,
        },
        config::standard(),
    )
    .expect("encoding plain data into a Vec cannot fail")
}

fn decode_env<T: Decode<()>, const LIMIT: usize>(bytes: &[u8], what: &'static str) -> Result<T, GossipError> {
    if bytes.len() > LIMIT {
        return Err(GossipError::TooLarge {
            what,
            size: bytes.len(),
            limit: LIMIT,
        });
    }
    // Peek at the version first so that a newer peer gets a clear error.
    let (version, _): (u16, usize) =
        bincode::decode_from_slice(bytes, cfg::<LIMIT>()).map_err(|e| GossipError::Malformed {
            what,
            detail: e.to_string(),
        })?;
    if version != WIRE_VERSION {
        return Err(GossipError::Version {
            found: version,
            supported: WIRE_VERSION,
        });
    }
    let (env, used): (Envelope<T>, usize) =
        bincode::decode_from_slice(bytes, cfg::<LIMIT>()).map_err(|e| GossipError::Malformed {
            what,
            detail: e.to_string(),
        })?;
    if used != bytes.len() {
        return Err(GossipError::Malformed {
            what,
            detail: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(env.body)
}

/// Ceiling on any gossip message, whatever the node's configuration.
pub const GOSSIP_HARD_LIMIT: usize = 1 << 20;
/// Ceiling on any request.
pub const REQUEST_HARD_LIMIT: usize = 64 * 1024;
/// Ceiling on any response.
pub const RESPONSE_HARD_LIMIT: usize = 256 << 20;

impl GossipMessage {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_env(self)
    }
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, GossipError> {
        decode_env::<_, GOSSIP_HARD_LIMIT>(bytes, "gossip message")
    }
}

impl FetchRequest {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_env(self)
    }
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, GossipError> {
        decode_env::<_, REQUEST_HARD_LIMIT>(bytes, "fetch request")
    }
}

impl FetchResponse {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_env(self)
    }
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, GossipError> {
        decode_env::<_, RESPONSE_HARD_LIMIT>(bytes, "fetch response")
    }

    /// The bytes this answer carries (its data, not the framing): what a
    /// serving node counts against the asker's budget.
    pub fn carried_bytes(&self) -> u64 {
        let n = match self {
            FetchResponse::Payload(b) | FetchResponse::Block(b) | FetchResponse::Vote(b) => b.len(),
            FetchResponse::Records(rs) => rs.iter().map(Vec::len).sum(),
            FetchResponse::Heads(hs) => hs.len() * std::mem::size_of::<HeadInfo>(),
            FetchResponse::Anchor {
                weights,
                outer,
                verdict,
                ..
            } => weights.len() + outer.len() + verdict.len(),
            FetchResponse::NotFound => 0,
            FetchResponse::Finished { .. } => std::mem::size_of::<u64>(),
            FetchResponse::Refused(why) => why.len(),
        };
        n as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let m = GossipMessage::Update {
            record: vec![1, 2, 3],
            payload: Some(vec![4; 100]),
        };
        assert_eq!(GossipMessage::from_bytes(&m.to_bytes()).unwrap(), m);
        let r = FetchRequest::Records {
            author: [7; 32],
            from_seq: 3,
            max: 10,
        };
        assert_eq!(FetchRequest::from_bytes(&r.to_bytes()).unwrap(), r);
        let s = FetchResponse::Heads(vec![HeadInfo {
            author: [1; 32],
            seq: 9,
            hash: [2; 32],
        }]);
        assert_eq!(FetchResponse::from_bytes(&s.to_bytes()).unwrap(), s);
        for s in [
            FetchResponse::Finished { head_seq: Some(41) },
            FetchResponse::Finished { head_seq: None },
        ] {
            assert_eq!(FetchResponse::from_bytes(&s.to_bytes()).unwrap(), s);
        }
    }

    #[test]
    fn garbage_trailing_and_versions_are_refused() {
        assert!(GossipMessage::from_bytes(&[]).is_err());
        assert!(GossipMessage::from_bytes(&[0xff; 64]).is_err());
        let mut b = FetchRequest::Heads.to_bytes();
        b.push(0);
        assert!(FetchRequest::from_bytes(&b).is_err());
        let newer = bincode::encode_to_vec(
            Envelope {
                version: 9,
                body: FetchRequest::Heads,
            },
            config::standard(),
        )
        .unwrap();
        assert!(matches!(
            FetchRequest::from_bytes(&newer),
            Err(GossipError::Version { found: 9, .. })
        ));
    }

    #[test]
    fn a_huge_claimed_length_does_not_allocate() {
        // version 1, variant Update, then a vec length claiming ~2^62 bytes
        let mut b = vec![1u8, 0, 0xff];
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(GossipMessage::from_bytes(&b).is_err());
    }
}
