use std::path::PathBuf;

/// What can stop a node (or one of its commands), in an operator's terms.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("run spec {path}: {detail}")]
    RunSpec { path: PathBuf, detail: String },

    #[error("identity {path}: {detail}")]
    Identity { path: PathBuf, detail: String },

    #[error("bad --shard `{0}`: expected I/N with 0 <= I < N")]
    Shard(String),

    #[error("importing: {0}")]
    Import(String),

    #[error("dataset in {dir}: {detail}")]
    Dataset { dir: PathBuf, detail: String },

    #[error("block {hash}: the bytes do not hash to this name")]
    BlockCorrupt { hash: String },

    #[error("{path}: the manifest does not hash to its id")]
    ManifestCorrupt { path: PathBuf },

    #[error("test block {hash} is missing from the local store")]
    MissingTestBlock { hash: String },

    #[error("the run's manifest is not here yet")]
    NoManifest,

    #[error("the run's TorchScript module {hash} is not in the local store and no peer sent it within {waited_s} s")]
    ModelFileUnreachable { hash: String, waited_s: u64 },

    #[error("the run's TorchScript module {hash} is not in the block store {store} (name the store that holds it: the data store its spec was written with, or a node's DIR/blocks)")]
    ModelFileMissing { hash: String, store: PathBuf },

    #[error("this node has nothing to train on: the placement over {members} members gave it no records of the {records} in the training split")]
    NothingToTrain { members: usize, records: u64 },

    #[error("{missing} blocks of this node's data are missing and no member has been reachable for {waited_s} s to fetch them from")]
    DataUnreachable { missing: usize, waited_s: u64 },

    #[error("checkpoint {path}: {detail}")]
    Checkpoint { path: PathBuf, detail: String },

    #[error("replay: {0}")]
    Replay(String),

    #[error("benchmark: {0}")]
    Bench(String),

    #[error("ledger: {0}")]
    Ledger(#[from] meshtrain_ledger::LedgerError),

    #[error("model: {0}")]
    Model(#[from] meshtrain_model::ModelError),

    #[error("network: {0}")]
    Gossip(#[from] meshtrain_gossip::GossipError),

    #[error("training failed: {0}")]
    Training(String),

    #[error("cannot start the {name} thread: {source}")]
    Thread {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("the {name} thread stopped unexpectedly (it panicked or was killed); the node shuts down")]
    ThreadDied { name: &'static str },

    #[error("the {what} worker failed ({message}); the node shuts down")]
    WorkerPanicked { what: &'static str, message: String },

    #[error("{0}")]
    Core(#[from] crate::core::CoreFault),

    #[error("listen on {addr}: {detail}")]
    Listen { addr: String, detail: String },
}

impl NodeError {
    /// A write that failed because the disk is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, NodeError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull)
    }
}
