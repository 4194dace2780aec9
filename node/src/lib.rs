//! The meshtrain node: the `meshtrain` binary's library. It composes the
//! ledger, the model and the gossip layer into one process that trains,
//! exchanges signed deltas, judges what it receives and records it.
//!
//! It owns configuration ([`RunSpec`]), identity, the event loop ([`Node`]),
//! the training thread, the inbox (record checks and ledger writes), round
//! bookkeeping ([`round::RoundBook`]) and the CLI's commands.
//!
//! Main types:
//! - [`RunSpec`]: what a run's nodes agree on; its hash is the run id.
//! - [`Node`] / [`NodeOptions`]: one node's event loop.
//! - [`round::RoundBook`]: which deltas wait for which round, and when a
//!   round closes.
//! - [`inbox`]: the receive checks, cheapest first, and their three outcomes.

pub mod attack;
pub mod bench;
pub mod blockstore;
pub mod checkpoint;
pub mod config;
pub mod data;
mod error;
pub mod identity;
pub mod inbox;
pub mod metrics;
pub mod node;
pub mod placement;
pub mod replay;
pub mod reputation;
pub mod round;
pub mod runspec;
mod serve;
pub mod shard;
pub mod status;
mod trainer;

pub use error::NodeError;
pub use node::{Node, NodeOptions};
pub use runspec::RunSpec;
