//! The composed libp2p behaviour of a meshtrain node, and how it is built.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use libp2p::allow_block_list::{self, BlockedPeers};
use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::gossipsub::{
    self, IdentTopic, MessageAuthenticity, PeerScoreParams, PeerScoreThresholds, TopicScoreParams, ValidationMode,
};
use libp2p::swarm::{behaviour::toggle::Toggle, NetworkBehaviour};
use libp2p::{identify, identity, kad, mdns, noise, ping, request_response, tcp, yamux, PeerId, StreamProtocol, Swarm};
use prometheus_client::registry::Registry;

use crate::fetch::{FetchCodec, FETCH_PROTOCOL};
use crate::pending::PendingPerIp;
use crate::{GossipError, MeshConfig};

pub const IDENTIFY_PROTOCOL: &str = "/meshtrain/id/1";
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/meshtrain/kad/1");

/// The gossip topic of a run: `meshtrain/<run_id hex>/v1`.
pub fn run_topic(run_id_hex: &str) -> IdentTopic {
    IdentTopic::new(format!("meshtrain/{run_id_hex}/v1"))
}

/// Gossipsub for announcements, request-response for payloads and blocks,
/// identify and Kademlia for discovery, ping for liveness, mDNS optionally
/// on LANs.
#[derive(NetworkBehaviour)]
pub struct MeshBehaviour {
    /// Peers this node refuses to talk to (bans, operator deny-lists).
    pub blocked: allow_block_list::Behaviour<BlockedPeers>,
    /// How many connections peers may hold or open (see [`Limits`]).
    pub limits: connection_limits::Behaviour,
    /// How many handshakes one address may have in progress.
    pub pending_per_ip: PendingPerIp,
    pub gossipsub: gossipsub::Behaviour,
    pub fetch: request_response::Behaviour<FetchCodec>,
    pub identify: identify::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub ping: ping::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Connections at most: a stranger opening hundreds of them costs this node
/// a refused handshake each, not a file descriptor and a yamux session.
/// A mesh needs a few per member (one each way while both dial). A
/// handshake that does not finish within [`Limits::HANDSHAKE`] is dropped
/// (the swarm's connection timeout), and one address may have at most
/// [`Limits::PENDING_PER_IP`] in progress, so sockets that connect and then
/// say nothing cannot keep peers out.
pub struct Limits;

impl Limits {
    pub const PENDING: u32 = 128;
    /// Enough for every node of a local testnet dialling the bootstrap at
    /// once from 127.0.0.1.
    pub const PENDING_PER_IP: u32 = 32;
    pub const HANDSHAKE: Duration = Duration::from_secs(10);
    pub const ESTABLISHED: u32 = 512;
    pub const ESTABLISHED_INCOMING: u32 = 256;
    pub const PER_PEER: u32 = 4;

    fn of() -> ConnectionLimits {
        ConnectionLimits::default()
            .with_max_pending_incoming(Some(Self::PENDING))
            .with_max_pending_outgoing(Some(Self::PENDING))
            .with_max_established(Some(Self::ESTABLISHED))
            .with_max_established_incoming(Some(Self::ESTABLISHED_INCOMING))
            .with_max_established_per_peer(Some(Self::PER_PEER))
    }
}

/// Peer scoring for a low-rate topic: invalid messages cost dearly, while
/// quiet peers are not punished (a round may take minutes). Loopback is
/// exempt from IP colocation so that local testnets work.
fn score_params(topic: &IdentTopic) -> (PeerScoreParams, PeerScoreThresholds) {
    let mut params = PeerScoreParams {
        app_specific_weight: 1.0,
        ip_colocation_factor_whitelist: HashSet::from([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]),
        ..Default::default()
    };
    let topic_params = TopicScoreParams {
        topic_weight: 1.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_cap: 100.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: 0.9,
        ..Default::default()
    };
    params.topics.insert(topic.hash(), topic_params);
    let thresholds = PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 5.0,
    };
    (params, thresholds)
}

impl MeshBehaviour {
    /// `registry` gets gossipsub's own counters (messages published, sent
    /// with forwards, received, and their bytes), under `gossipsub_`.
    pub fn new(
        key: &identity::Keypair,
        cfg: &MeshConfig,
        topic: &IdentTopic,
        registry: &mut Registry,
    ) -> Result<Self, GossipError> {
        let peer_id = key.public().to_peer_id();
        let gs_config = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(cfg.heartbeat)
            .validation_mode(ValidationMode::Strict)
            .validate_messages()
            .max_transmit_size(cfg.max_gossip_bytes)
            // Message ids are content hashes, so a re-sent record is a duplicate.
            .message_id_fn(|m: &gossipsub::Message| {
                gossipsub::MessageId::from(blake3::hash(&m.data).as_bytes().to_vec())
            })
            .duplicate_cache_time(Duration::from_secs(600))
            .mesh_n_low(2)
            .mesh_n(4)
            .mesh_n_high(8)
            .mesh_outbound_min(1)
            .build()
            .map_err(|e| GossipError::Build(format!("gossipsub config: {e}")))?;
        let mut gossipsub = gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gs_config)
            .map_err(|e| GossipError::Build(format!("gossipsub: {e}")))?
            .with_metrics(
                registry.sub_registry_with_prefix("gossipsub"),
                gossipsub::MetricsConfig::default(),
            );
        let (params, thresholds) = score_params(topic);
        gossipsub
            .with_peer_score(params, thresholds)
            .map_err(|e| GossipError::Build(format!("peer score: {e}")))?;
        gossipsub
            .subscribe(topic)
            .map_err(|e| GossipError::Build(format!("subscribe: {e}")))?;

        let fetch = request_response::Behaviour::with_codec(
            FetchCodec {
                max_request: cfg.max_request_bytes,
                max_response: cfg.max_response_bytes,
            },
            [(FETCH_PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(cfg.request_timeout)
                .with_max_concurrent_streams(256),
        );
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public()).with_push_listen_addr_updates(true),
        );
        let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
        kad_cfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(30)));
        let mut kad = kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_cfg);
        kad.set_mode(Some(kad::Mode::Server));
        let mdns = if cfg.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                    .map_err(|e| GossipError::Build(format!("mdns: {e}")))?,
            )
        } else {
            None
        };
        Ok(Self {
            blocked: Default::default(),
            limits: connection_limits::Behaviour::new(Limits::of()),
            pending_per_ip: PendingPerIp::new(Limits::PENDING_PER_IP),
            gossipsub,
            fetch,
            identify,
            kad,
            ping: ping::Behaviour::new(
                ping::Config::new()
                    .with_interval(cfg.ping_interval)
                    .with_timeout(cfg.ping_timeout),
            ),
            mdns: mdns.into(),
        })
    }
}

/// Builds a swarm over TCP with noise and yamux, counting bytes per
/// direction into `registry` (libp2p-metrics' bandwidth counters).
pub fn build_swarm(
    key: identity::Keypair,
    cfg: &MeshConfig,
    topic: &IdentTopic,
    registry: &mut Registry,
) -> Result<Swarm<MeshBehaviour>, GossipError> {
    let idle = cfg.idle_timeout;
    let Some(psk) = cfg.psk else {
        let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| GossipError::Build(format!("tcp transport: {e}")))?
            .with_bandwidth_metrics(registry)
            .with_behaviour(|key| {
                MeshBehaviour::new(key, cfg, topic, &mut *registry)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            })
            .map_err(|e| GossipError::Build(format!("behaviour: {e}")))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .with_connection_timeout(Limits::HANDSHAKE)
            .build();
        return Ok(swarm);
    };
    // A private network: every TCP stream first proves it holds the key
    // (pnet), then authenticates (noise) and multiplexes (yamux) as usual.
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            use libp2p::Transport as _;
            let noise = noise::Config::new(key)?;
            Ok(tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                .and_then(move |socket, _| libp2p::pnet::PnetConfig::new(psk).handshake(socket))
                .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default()))
        })
        .map_err(|e| GossipError::Build(format!("private tcp transport: {e}")))?
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key| {
            MeshBehaviour::new(key, cfg, topic, &mut *registry)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| GossipError::Build(format!("behaviour: {e}")))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .with_connection_timeout(Limits::HANDSHAKE)
        .build();
    Ok(swarm)
}

/// The peer id of an ed25519 public key given as raw bytes.
pub fn peer_id_of(public_key: &[u8; 32]) -> Result<PeerId, GossipError> {
    let pk = identity::ed25519::PublicKey::try_from_bytes(public_key).map_err(|e| GossipError::Malformed {
        what: "ed25519 public key",
        detail: e.to_string(),
    })?;
    Ok(identity::PublicKey::from(pk).to_peer_id())
}

/// The raw ed25519 public key behind a peer id, when it embeds one.
pub fn ed25519_of(peer: &PeerId) -> Option<[u8; 32]> {
    let mh = peer.as_ref();
    // Identity-multihash peer ids carry the protobuf-encoded public key.
    if mh.code() != 0 {
        return None;
    }
    let pk = identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    pk.try_into_ed25519().ok().map(|k| k.to_bytes())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;
    use tokio::io::AsyncReadExt;

    use super::*;

    /// A socket that connects and never says a word is dropped at the
    /// handshake deadline, with or without a private network key.
    #[tokio::test]
    async fn a_silent_connection_is_dropped_at_the_handshake_deadline() {
        for psk in [None, Some(libp2p::pnet::PreSharedKey::new([7; 32]))] {
            let cfg = MeshConfig {
                psk,
                ..MeshConfig::default()
            };
            let mut registry = Registry::default();
            let mut swarm = build_swarm(
                identity::Keypair::generate_ed25519(),
                &cfg,
                &run_topic("ab"),
                &mut registry,
            )
            .expect("swarm");
            swarm
                .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
                .expect("listen");
            let addr = loop {
                if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                    break address;
                }
            };
            let port = addr
                .iter()
                .find_map(|p| match p {
                    libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
                    _ => None,
                })
                .expect("tcp port");
            let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            let started = Instant::now();
            let closed = async {
                let mut buf = [0u8; 256];
                // Whatever the node says first (a multistream header), then
                // the end of the stream once it gives up on us.
                while let Ok(n) = silent.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let drive = async {
                loop {
                    swarm.select_next_some().await;
                }
            };
            tokio::select! {
                () = closed => {}
                () = drive => {}
                () = tokio::time::sleep(Limits::HANDSHAKE * 2) => panic!("a silent socket was held over {:?} (psk: {})", Limits::HANDSHAKE * 2, psk.is_some()),
            }
            let held = started.elapsed();
            assert!(
                held >= Limits::HANDSHAKE - Duration::from_millis(500),
                "dropped after {held:?}, before the deadline"
            );
        }
    }
}
