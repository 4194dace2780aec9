//! The update ledger of meshtrain: signed update records, per-author hash
//! chains, a node's own signed verdict chain, equivocation proofs, and the
//! RocksDB store that keeps them crash-safe.
//!
//! The ledger knows nothing of tensors or sockets: payloads are opaque bytes
//! named by their hash, and records arrive as bytes from whoever calls it.
//!
//! Main types:
//! - [`SignedRecord`] / [`UpdateRecord`]: one author's claim for one round.
//! - [`VerifiedRecord`]: a record with a valid signature that extends its
//!   author's chain; only [`chain::place`] and [`VerifiedRecord::extend`] make one.
//! - [`SignedVerdictBlock`]: what a node did with a round's updates.
//! - [`Ledger`]: the RocksDB store; every event is one atomic [`Event`].
//! - [`Store`]: what node logic reads and writes, over [`Ledger`] or the
//!   in-memory [`MemLedger`] of the simulator, one atomic [`Batch`] at a time.
//! - [`audit::audit`]: streams a ledger and checks everything in it.

pub mod audit;
pub mod chain;
mod error;
mod id;
mod join;
mod key;
mod mem;
mod meta;
mod ops;
mod proof;
mod record;
mod store;
mod verdict;
mod wire;

pub use chain::{Head, Placement, VerifiedRecord};
pub use error::{LedgerError, Result};
pub use id::{AuthorId, PayloadHash, RecordHash, RecordTag, RunId, Seq, SignatureBytes, VerdictHash, WeightsHash};
pub use join::{JoinKind, JoinRecord, Vote};
pub use key::{memoize_signature_checks, AuthorKey};
pub use mem::MemLedger;
pub use meta::{RunMeta, FORMAT_VERSION};
pub use ops::{check_append, check_payload, check_verdict, Batch, Op, Store};
pub use proof::{EquivocationProof, ProofKind};
pub use record::{SignedRecord, UpdateRecord, MAX_MERGED, RECORD_VERSION};
pub use store::{Event, Ledger, Retention, StoreOptions};
pub use verdict::{
    round_given_up, RejectReason, SignedVerdictBlock, Verdict, VerdictBlock, VerdictEntry, VerdictHead, VERDICT_VERSION,
};
pub use wire::MAX_VALUE_BYTES;
