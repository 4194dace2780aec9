/// What can go wrong in the gossip layer.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },

    #[error("{what} of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },

    #[error("wire version {found} is not supported (this build speaks {supported})")]
    Version { found: u16, supported: u16 },

    #[error("building the swarm: {0}")]
    Build(String),

    #[error("bad multiaddr `{addr}`: {detail}")]
    Multiaddr { addr: String, detail: String },
}
