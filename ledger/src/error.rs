use std::path::PathBuf;

use crate::{AuthorId, PayloadHash, RecordHash, RunId, Seq, VerdictHash};

/// Everything that can go wrong in the ledger, named in an auditor's terms.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },

    #[error("record of author {author} seq {seq} belongs to run {got}, not to this run {expected}")]
    WrongRun {
        author: AuthorId,
        seq: Seq,
        expected: RunId,
        got: RunId,
    },

    #[error("bad signature on {what} by {author} at seq {seq}")]
    BadSignature {
        what: &'static str,
        author: AuthorId,
        seq: Seq,
    },

    #[error("author {author} is not a valid ed25519 public key")]
    BadAuthorKey { author: AuthorId },

    #[error("chain of {author} broken at seq {seq}: prev is {got}, expected {expected_prev}")]
    ChainBroken {
        author: AuthorId,
        seq: Seq,
        expected_prev: RecordHash,
        got: RecordHash,
    },

    #[error("chain of {author} has a gap: expected seq {expected}, got {got}")]
    ChainGap { author: AuthorId, expected: Seq, got: Seq },

    #[error("author {author} equivocated at seq {seq}: {first} and {second}")]
    Equivocation {
        author: AuthorId,
        seq: Seq,
        first: RecordHash,
        second: RecordHash,
    },

    #[error("author {author} signed seq {seq} for round {round}, after a record for round {previous_round} ({previous}): one record per round, rounds increasing")]
    RoundReused {
        author: AuthorId,
        seq: Seq,
        round: u64,
        previous_round: u64,
        previous: RecordHash,
    },

    #[error("payload {expected} does not hash to its name (got {got})")]
    PayloadHashMismatch { expected: PayloadHash, got: PayloadHash },

    #[error("verdict chain broken at block {seq}: prev is {got}, expected {expected_prev}")]
    VerdictChainBroken {
        seq: u64,
        expected_prev: VerdictHash,
        got: VerdictHash,
    },

    #[error("invalid equivocation proof against {author}: {detail}")]
    BadProof { author: AuthorId, detail: String },

    #[error("{path} holds no meshtrain ledger ({detail})")]
    NotALedger { path: PathBuf, detail: String },

    #[error("ledger at {path} is format version {found}, written by an older meshtrain; this build reads format {supported} only (start the run afresh)")]
    OlderFormat { path: PathBuf, found: u32, supported: u32 },

    #[error("ledger at {path} is format version {found}; this build reads up to {supported}")]
    NewerFormat { path: PathBuf, found: u32, supported: u32 },

    #[error("ledger at {path} belongs to run {found}, not to run {expected}")]
    OtherRun {
        path: PathBuf,
        expected: RunId,
        found: RunId,
    },

    #[error("corrupt ledger value in column `{column}` at key {key}: {detail}")]
    Corrupt {
        column: &'static str,
        key: String,
        detail: String,
    },

    #[error("the ledger's files at {path} fail their checksums: {detail}")]
    Checksum { path: PathBuf, detail: String },

    #[error("rocksdb at {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
}

pub type Result<T, E = LedgerError> = std::result::Result<T, E>;
