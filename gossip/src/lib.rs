//! The network layer of meshtrain: the libp2p behaviour (gossipsub,
//! request-response, identify, Kademlia, ping and optional mDNS), the versioned wire
//! envelope with its size limits, peer scoring, and libp2p's byte counters.
//!
//! It carries bytes. It knows nothing of tensors, signatures or the ledger:
//! records, proofs and payloads are opaque here and interpreted by the node.
//!
//! Main types:
//! - [`MeshBehaviour`] and [`build_swarm`];
//! - [`GossipMessage`], [`FetchRequest`] and [`FetchResponse`] (the wire);
//! - [`MeshConfig`] (limits and timings);
//! - [`ByteCounts`] read from libp2p-metrics;
//! - [`discovery::Discovery`], the policy that grows a mesh from one bootstrap
//!   peer and keeps it connected (pings, redials).

mod bandwidth;
mod behaviour;
mod config;
pub mod discovery;
mod error;
mod fetch;
mod pending;
pub mod wire;

pub use bandwidth::{byte_counts, ByteCounts, GossipCounts};
pub use behaviour::{build_swarm, ed25519_of, peer_id_of, run_topic, Limits, MeshBehaviour, MeshBehaviourEvent};
pub use config::MeshConfig;
pub use error::GossipError;
pub use fetch::{FetchCodec, FETCH_PROTOCOL};
pub use pending::{PendingPerIp, TooManyPending};
pub use wire::{FetchRequest, FetchResponse, GossipMessage, HeadInfo};

pub use libp2p;
