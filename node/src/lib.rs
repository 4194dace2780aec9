//! The meshtrain node: the `meshtrain` binary's library. It composes the
//! ledger, the model and the gossip layer into one process that trains,
//! exchanges signed deltas, judges what it receives and records it.
//!
//! It owns configuration ([`RunSpec`]), identity, the pure protocol core,
//! the shell that runs it over libp2p and RocksDB, the training thread, the
//! inbox (record checks and ledger writes), the deterministic simulator and
//! the CLI's commands. It knows nothing of the testnet (only the binary's
//! front end drives one).
//!
//! Main types:
//! - [`RunSpec`]: what a run's nodes agree on; its hash is the run id.
//! - [`core::Core`]: every decision of a node, `handle(input, now) ->
//!   effects`, with no I/O of its own.
//! - [`Node`] / [`NodeOptions`]: the shell, one node's event loop.
//! - [`inbox::Inbox`]: the receive checks, cheapest first, and their three
//!   outcomes, over any [`meshtrain_ledger::Store`].
//! - [`sim::Sim`]: many cores in one process under a seeded fault schedule.

pub mod attack;
pub mod bench;
pub mod blockstore;
pub mod checkpoint;
pub mod config;
pub mod core;
pub mod data;
mod error;
pub mod export;
pub mod identity;
pub mod inbox;
pub mod metrics;
pub mod model_file;
pub mod placement;
pub mod replay;
pub mod reputation;
pub mod runspec;
mod serve;
pub mod shard;
mod shell;
pub mod sim;

pub mod status;
mod trainer;

pub use error::NodeError;
pub use runspec::RunSpec;
pub use shell::{write_json, Node, NodeOptions};

/// The cores this process may run on (1 when that cannot be read).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
