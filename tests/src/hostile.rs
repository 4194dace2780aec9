//! A hostile libp2p peer, for the hostile-peer test and soak: it joins one
//! node's topic and, until told to stop, floods records past a gap under
//! fresh keys (each with the largest inline payload), answers every records
//! request with other authors' records and every other request with more
//! heads than any run has members, never serves a payload it is asked for,
//! and storms the node with anchor, heads, records, final-vote and block
//! requests (for the dataset's real blocks, the biggest answers a node
//! gives), redialling whenever it is cut off.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use meshtrain_gossip::libp2p::request_response::{self, Message};
use meshtrain_gossip::libp2p::{identity, swarm::SwarmEvent, Multiaddr, PeerId};
use meshtrain_gossip::{
    build_swarm, run_topic, FetchRequest, FetchResponse, GossipMessage, HeadInfo, MeshBehaviourEvent, MeshConfig,
};
use meshtrain_ledger::{AuthorKey, PayloadHash, RecordHash, RunId, Seq, UpdateRecord, WeightsHash, RECORD_VERSION};

/// What the hostile peer did, and what it got.
#[derive(Clone, Debug, Default)]
pub struct Mischief {
    pub gap_records: u64,
    pub requests: u64,
    pub answers: u64,
    pub refused: u64,
    pub stalled: u64,
    pub lied: u64,
    /// What the node's answers carried (`FetchResponse::carried_bytes`).
    pub bytes_served: u64,
    /// How long the peer ran.
    pub secs: f64,
}

/// Where and how hard to attack.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: Multiaddr,
    pub node: PeerId,
    pub run_hex: String,
    /// Rounds the flood's records claim (2 up to this, past every gap).
    pub rounds: u64,
    /// Data blocks to ask for again and again (see [`block_hashes`]).
    pub blocks: Vec<[u8; 32]>,
}

/// What a node may send one peer per 10 s window in payloads and blocks
/// (`core/receive.rs`).
pub const BYTES_PER_WINDOW: u64 = 64 << 20;
/// What one window may overshoot that by: the answers already admitted when
/// the budget ran out (16 serves at once, 1 MiB blocks) and an anchor.
pub const OVERSHOOT: u64 = 18 << 20;
/// Anchors one peer may have per window: they have their own cap, outside
/// the byte budget (a syncing node must not read a budget as "not held").
pub const ANCHORS_PER_WINDOW: u64 = 40;

/// The most a node may serve one peer in `secs` seconds of a model of
/// `params` parameters: per started window, the byte budget, its overshoot
/// and 40 anchors (weights and velocity, f32, and their framing).
pub fn serving_bound(secs: f64, params: u64) -> u64 {
    let windows = (secs / 10.0).ceil() as u64 + 1;
    windows * (BYTES_PER_WINDOW + OVERSHOOT + ANCHORS_PER_WINDOW * anchor_bytes(params))
}

/// An anchor's bytes on the wire, at most.
pub fn anchor_bytes(params: u64) -> u64 {
    params * 8 + (64 << 10)
}

/// The block hashes a dataset store holds (its `blocks/HASH.blk` files).
pub fn block_hashes(store: &Path) -> Vec<[u8; 32]> {
    let Ok(dir) = std::fs::read_dir(store.join("blocks")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let name = e.ok()?.file_name().into_string().ok()?;
        let hex = name.strip_suffix(".blk")?;
        let bytes = hex::decode(hex).ok()?;
        bytes.try_into().ok()
    })
    .collect()
}

/// A fresh author key per `n`, the same for the same `n`.
pub fn fresh_key(n: u64) -> AuthorKey {
    let mut secret = [0x42; 32];
    secret[..8].copy_from_slice(&n.to_le_bytes());
    AuthorKey::from_secret(secret)
}

/// A validly signed record under `key` with a dangling `prev`.
pub fn signed(key: &AuthorKey, run_id: RunId, seq: u64, round: u64, payload: &[u8]) -> Vec<u8> {
    UpdateRecord {
        version: RECORD_VERSION,
        run_id,
        author: key.author(),
        seq: Seq(seq),
        prev: RecordHash([7; 32]),
        round,
        base_hash: WeightsHash([0; 32]),
        base_outer: WeightsHash([0; 32]),
        made_from: WeightsHash([0; 32]),
        made_outer: WeightsHash([0; 32]),
        merged: Vec::new(),
        waited: Vec::new(),
        payload_hash: PayloadHash::of(payload),
        payload_len: payload.len() as u64,
        n_samples: 64,
        train_loss: 0.1,
    }
    .sign(key)
    .to_bytes()
}

/// Runs the hostile peer on its own thread until `stop` is set.
pub fn spawn(target: Target, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Mischief> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(run(target, stop))
    })
}

async fn run(t: Target, stop: Arc<AtomicBool>) -> Mischief {
    let started = Instant::now();
    let run_id: RunId = t.run_hex.parse().expect("run id");
    let topic = run_topic(&t.run_hex);
    let mut registry = prometheus_client::registry::Registry::default();
    let key = identity::Keypair::generate_ed25519();
    let mut swarm = build_swarm(key, &MeshConfig::default(), &topic, &mut registry).expect("hostile swarm");
    // One connection, then more to the same node than any peer may hold.
    for _ in 0..12 {
        let _ = swarm.dial(t.addr.clone());
    }
    let mut m = Mischief::default();
    let mut stalled = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut n = 0u64;
    let rounds = t.rounds.max(3);
    // The lies, made once (signing 300 records and deriving 10,000 keys
    // per answer would slow the peer down to well below full rate).
    // Someone else's records, and too many of them.
    let records_lie = FetchResponse::Records(
        (0..300)
            .map(|i| signed(&fresh_key(1 << 40 | i), run_id, i, 1, b"x"))
            .collect(),
    );
    // More heads than any run has members.
    let heads_lie = FetchResponse::Heads(
        (0..10_000u64)
            .map(|i| HeadInfo {
                author: fresh_key(1 << 41 | i).author().0,
                seq: 1_000_000,
                hash: [0; 32],
            })
            .collect(),
    );
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::Behaviour(MeshBehaviourEvent::Fetch(request_response::Event::Message {
                    message: Message::Request { request, channel, .. },
                    ..
                })) => {
                    let lie = match request {
                        // Announced (it came by hash), never served.
                        FetchRequest::Payload { .. } => {
                            stalled.push(channel);
                            m.stalled += 1;
                            // Held, not forever: the node gives up on it anyway.
                            if stalled.len() > 4096 {
                                stalled.drain(..2048);
                            }
                            continue;
                        }
                        FetchRequest::Records { .. } => records_lie.clone(),
                        _ => heads_lie.clone(),
                    };
                    m.lied += 1;
                    let _ = swarm.behaviour_mut().fetch.send_response(channel, lie);
                }
                SwarmEvent::Behaviour(MeshBehaviourEvent::Fetch(request_response::Event::Message {
                    message: Message::Response { response, .. },
                    ..
                })) => {
                    if matches!(response, FetchResponse::Refused(_)) {
                        m.refused += 1;
                    } else {
                        m.answers += 1;
                        m.bytes_served += response.carried_bytes();
                    }
                }
                _ => {}
            },
            _ = tick.tick() => {
                n += 1;
                if !swarm.is_connected(&t.node) {
                    if n.is_multiple_of(50) {
                        let _ = swarm.dial(t.addr.clone());
                    }
                    continue;
                }
                // A record past a gap under a fresh key, ahead of the mesh,
                // with the largest payload gossip carries inline.
                let payload = vec![(n % 251) as u8; 40 * 1024];
                let record = signed(&fresh_key(n), run_id, 3, 2 + n % (rounds - 2), &payload);
                let msg = GossipMessage::Update { record, payload: Some(payload) }.to_bytes();
                if swarm.behaviour_mut().gossipsub.publish(topic.clone(), msg).is_ok() {
                    m.gap_records += 1;
                }
                if n.is_multiple_of(4) {
                    let stranger = fresh_key(n).author().0;
                    let mut requests = vec![
                        FetchRequest::Anchor { weights: None },
                        FetchRequest::Heads,
                        FetchRequest::Block { hash: [0xab; 32] },
                        FetchRequest::FinalVote,
                        FetchRequest::Records { author: stranger, from_seq: 0, max: u32::MAX },
                    ];
                    // The dataset's real blocks, a few each tick.
                    if !t.blocks.is_empty() {
                        for k in 0..4 {
                            let i = (n as usize / 4 * 4 + k) % t.blocks.len();
                            requests.push(FetchRequest::Block { hash: t.blocks[i] });
                        }
                    }
                    for request in requests {
                        swarm.behaviour_mut().fetch.send_request(&t.node, request);
                        m.requests += 1;
                    }
                }
            }
        }
    }
    drop(stalled);
    m.secs = started.elapsed().as_secs_f64();
    m
}

/// COUNT TCP connections to 127.0.0.1:PORT from 127.0.0.2 that never say
/// a word.
pub fn half_open(port: u16, count: usize) -> Vec<std::net::TcpStream> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..count {
            let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
                continue;
            };
            if socket.bind(([127, 0, 0, 2], 0).into()).is_err() {
                continue;
            }
            if let Ok(stream) = socket.connect(([127, 0, 0, 1], port).into()).await {
                if let Ok(s) = stream.into_std() {
                    held.push(s);
                }
            }
        }
        held
    })
}

/// Resident memory of a process now, in bytes (Linux).
pub fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}
