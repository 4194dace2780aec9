use std::path::PathBuf;

/// What can stop a node, in an operator's terms.
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

    #[error("dataset: {0}")]
    Data(String),

    #[error("ledger: {0}")]
    Ledger(#[from] meshtrain_ledger::LedgerError),

    #[error("model: {0}")]
    Model(#[from] meshtrain_model::ModelError),

    #[error("network: {0}")]
    Gossip(#[from] meshtrain_gossip::GossipError),

    #[error("trainer thread: {0}")]
    Trainer(String),

    #[error("listen on {addr}: {detail}")]
    Listen { addr: String, detail: String },
}
