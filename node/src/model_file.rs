//! A run's model: one of the built-in ones, or a user's TorchScript module.
//!
//! The module file is content-addressed like a data block: `spec new` puts
//! it into the block store whose data the spec names, the run spec commits
//! to its hash, and a node that lacks it fetches it from its bootstrap peers
//! by that hash (the same `Block` request) before it builds its model, since
//! genesis is the file's own weights.

use std::time::{Duration, Instant};

use meshtrain_gossip::libp2p::futures::StreamExt;
use meshtrain_gossip::libp2p::request_response::{Event, Message};
use meshtrain_gossip::libp2p::swarm::SwarmEvent;
use meshtrain_gossip::libp2p::{identity::Keypair, Multiaddr, PeerId};
use meshtrain_gossip::{build_swarm, run_topic, FetchRequest, FetchResponse, MeshBehaviourEvent, MeshConfig};
use meshtrain_model::blocks::block_hash;
use meshtrain_model::{Device, Network};
use tracing::{info, warn};

use crate::blockstore::BlockStore;
use crate::runspec::ScriptSpec;
use crate::{NodeError, RunSpec};

/// What `--model` names: a built-in model, or `torchscript:FILE`.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelChoice {
    Builtin(meshtrain_model::Arch),
    Script(std::path::PathBuf),
}

impl ModelChoice {
    pub fn arch(&self) -> meshtrain_model::Arch {
        match self {
            ModelChoice::Builtin(a) => *a,
            ModelChoice::Script(_) => meshtrain_model::Arch::Script,
        }
    }
}

impl std::str::FromStr for ModelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("torchscript") {
            Some(":") | Some("") => Err("`torchscript` needs its file: --model torchscript:FILE".into()),
            Some(rest) if rest.starts_with(':') => Ok(ModelChoice::Script(rest[1..].into())),
            _ => s.parse().map(ModelChoice::Builtin).map_err(|e| e.to_string()),
        }
    }
}

impl std::fmt::Display for ModelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelChoice::Builtin(a) => write!(f, "{a}"),
            ModelChoice::Script(p) => write!(f, "torchscript:{}", p.display()),
        }
    }
}

/// The task a TorchScript module is trained for when the spec names none:
/// classes for images, the next byte for text.
pub fn default_task(schema: &meshtrain_model::Schema) -> &'static str {
    match schema {
        meshtrain_model::Schema::Text { .. } => "next-token",
        _ => "classify",
    }
}

/// Builds the spec's model. A TorchScript module must be in `store`.
pub fn network(spec: &RunSpec, store: &BlockStore, device: Device) -> Result<Network, NodeError> {
    let Some(script) = &spec.model.script else {
        return Ok(Network::new(spec.model.arch, &spec.data.schema, device)?);
    };
    let path = store
        .block_file(&script.file)?
        .ok_or_else(|| NodeError::ModelFileMissing {
            hash: script.file.clone(),
            store: store.dir().to_path_buf(),
        })?;
    Ok(Network::script(&path, &script.task, &spec.data.schema, device)?)
}

/// Puts a module file into `store` and names it for a run spec.
pub fn store_module(store: &BlockStore, bytes: &[u8], task: &str) -> Result<ScriptSpec, NodeError> {
    let hash = block_hash(bytes);
    store.put_block(&hash, bytes)?;
    Ok(ScriptSpec {
        file: hash,
        bytes: bytes.len() as u64,
        task: task.to_string(),
    })
}

/// How long a node waits for a peer to send the run's module file.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(300);

/// Makes sure the spec's module file is in `store`, fetching it from the
/// bootstrap peers if not: a short-lived swarm with the node's own key
/// (members are served, strangers in a permissioned run are not) asks each
/// connected peer in turn, checks the bytes against the hash and stores
/// them. A node with no bootstrap peers must have the file already.
pub async fn ensure_module(
    spec: &RunSpec,
    store: &BlockStore,
    key: &Keypair,
    mesh: &MeshConfig,
    bootstrap: &[Multiaddr],
    timeout: Duration,
) -> Result<(), NodeError> {
    let Some(script) = &spec.model.script else {
        return Ok(());
    };
    if store.block_file(&script.file)?.is_some() {
        return Ok(());
    }
    let unreachable = |waited: Duration| NodeError::ModelFileUnreachable {
        hash: script.file.clone(),
        waited_s: waited.as_secs(),
    };
    if bootstrap.is_empty() {
        // Nobody to ask: the file must be in the store this node was given.
        return Err(NodeError::ModelFileMissing {
            hash: script.file.clone(),
            store: store.dir().to_path_buf(),
        });
    }
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&script.file, &mut hash).map_err(|_| unreachable(Duration::ZERO))?;
    info!(module = %&script.file[..8], bytes = script.bytes, "fetching the run's TorchScript module from peers");
    let topic = run_topic(&spec.run_id().to_string());
    let mut registry = Default::default();
    let mut swarm = build_swarm(key.clone(), mesh, &topic, &mut registry)?;
    let start = Instant::now();
    let mut connected: Vec<PeerId> = Vec::new();
    let mut asking: Option<PeerId> = None;
    let mut next = 0usize;
    let mut redial = tokio::time::interval(Duration::from_secs(2));
    loop {
        if start.elapsed() > timeout {
            return Err(unreachable(start.elapsed()));
        }
        if asking.is_none() && !connected.is_empty() {
            let peer = connected[next % connected.len()];
            next += 1;
            swarm
                .behaviour_mut()
                .fetch
                .send_request(&peer, FetchRequest::Block { hash });
            asking = Some(peer);
        }
        tokio::select! {
            _ = redial.tick() => {
                if connected.is_empty() {
                    for addr in bootstrap {
                        let _ = swarm.dial(addr.clone());
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if !connected.contains(&peer_id) => connected.push(peer_id),
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                    connected.retain(|p| *p != peer_id);
                    if asking == Some(peer_id) {
                        asking = None;
                    }
                }
                SwarmEvent::Behaviour(MeshBehaviourEvent::Fetch(Event::Message {
                    peer,
                    message: Message::Response { response, .. },
                    ..
                })) => {
                    asking = None;
                    match response {
                        FetchResponse::Block(bytes) if block_hash(&bytes) == script.file && bytes.len() as u64 == script.bytes => {
                            store.put_block(&script.file, &bytes)?;
                            info!(module = %&script.file[..8], took_ms = start.elapsed().as_millis() as u64, "got the TorchScript module");
                            return Ok(());
                        }
                        FetchResponse::Block(_) => warn!(%peer, "a peer sent a module file that does not match the run's hash"),
                        _ => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                }
                SwarmEvent::Behaviour(MeshBehaviourEvent::Fetch(Event::OutboundFailure { .. })) => {
                    asking = None;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                _ => {}
            }
        }
    }
}
