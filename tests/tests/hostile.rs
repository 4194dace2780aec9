//! A hostile peer against a real mesh: three honest nodes (the founders of
//! an open run) train on loopback
//! while a libp2p peer joins node 0's topic and, for the whole run, floods
//! records past a gap under fresh keys (each with the largest inline
//! payload), answers every records request with other authors' records,
//! never serves a payload it is asked for, storms node 0 with anchor, heads,
//! block and records requests, dials it again and again, and holds hundreds
//! of raw TCP connections open (a newcomer must still get in). The honest
//! nodes must finish every round
//! with a good model, keep their memory under a stated bound, and audit
//! clean.

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
use meshtrain_tests::{audit, log_tail, results, spawn_node, spec_new, wait_listen, NodeProc};

const ROUNDS: u64 = 4;
/// Peak resident memory an honest node may reach under the flood. Measured
/// on the CI machine: nodes the hostile peer does not reach peak near
/// 255 MiB, the node it attacks near 360 MiB; without per-peer request
/// budgets (anchors served to it as fast as it asked) 700 to 780 MiB.
const RSS_BOUND: u64 = 512 << 20;

/// What the hostile peer did.
#[derive(Debug, Default)]
struct Mischief {
    gap_records: u64,
    requests: u64,
    answers: u64,
    refused: u64,
    stalled: u64,
    lied: u64,
}

fn signed(key: &AuthorKey, run_id: RunId, seq: u64, round: u64, payload: &[u8]) -> Vec<u8> {
    UpdateRecord {
        version: RECORD_VERSION,
        run_id,
        author: key.author(),
        seq: Seq(seq),
        prev: RecordHash([7; 32]),
        round,
        base_hash: WeightsHash([0; 32]),
        base_outer: WeightsHash([0; 32]),
        payload_hash: PayloadHash::of(payload),
        payload_len: payload.len() as u64,
        n_samples: 64,
        train_loss: 0.1,
    }
    .sign(key)
    .to_bytes()
}

/// COUNT TCP connections to 127.0.0.1:PORT from 127.0.0.2 that never say
/// a word.
fn half_open(port: u16, count: usize) -> Vec<std::net::TcpStream> {
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

/// How long a fresh libp2p peer took to complete a connection to NODE at
/// ADDR (None: not within 5 s).
fn newcomer_connects(addr: Multiaddr, node: PeerId, run_hex: &str) -> Option<Duration> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut registry = prometheus_client::registry::Registry::default();
        let mut swarm = build_swarm(
            identity::Keypair::generate_ed25519(),
            &MeshConfig::default(),
            &run_topic(run_hex),
            &mut registry,
        )
        .expect("newcomer swarm");
        let started = Instant::now();
        swarm.dial(addr).expect("dial node 0");
        let wait = async {
            loop {
                if let SwarmEvent::ConnectionEstablished { peer_id, .. } = swarm.select_next_some().await {
                    if peer_id == node {
                        return started.elapsed();
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait).await.ok()
    })
}

fn fresh_key(n: u64) -> AuthorKey {
    let mut secret = [0x42; 32];
    secret[..8].copy_from_slice(&n.to_le_bytes());
    AuthorKey::from_secret(secret)
}

async fn hostile(addr: Multiaddr, node: PeerId, run_hex: String, stop: Arc<AtomicBool>) -> Mischief {
    let run_id: RunId = run_hex.parse().expect("run id");
    let topic = run_topic(&run_hex);
    let mut registry = prometheus_client::registry::Registry::default();
    let key = identity::Keypair::generate_ed25519();
    let mut swarm = build_swarm(key, &MeshConfig::default(), &topic, &mut registry).expect("hostile swarm");
    // One connection, then more to the same node than any peer may hold.
    for _ in 0..12 {
        let _ = swarm.dial(addr.clone());
    }
    let mut m = Mischief::default();
    let mut stalled = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut n = 0u64;
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
                            continue;
                        }
                        // Someone else's records, and too many of them.
                        FetchRequest::Records { .. } => FetchResponse::Records(
                            (0..300).map(|i| signed(&fresh_key(1 << 40 | i), run_id, i, 1, b"x")).collect(),
                        ),
                        // More heads than any run has members.
                        _ => FetchResponse::Heads(
                            (0..10_000u64)
                                .map(|i| HeadInfo {
                                    author: fresh_key(1 << 41 | i).author().0,
                                    seq: 1_000_000,
                                    hash: [0; 32],
                                })
                                .collect(),
                        ),
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
                    }
                }
                _ => {}
            },
            _ = tick.tick() => {
                n += 1;
                if !swarm.is_connected(&node) {
                    if n.is_multiple_of(50) {
                        let _ = swarm.dial(addr.clone());
                    }
                    continue;
                }
                // A record past a gap under a fresh key, far ahead, with the
                // largest payload gossip carries inline.
                let payload = vec![(n % 251) as u8; 40 * 1024];
                let record = signed(&fresh_key(n), run_id, 3, 2 + n % (ROUNDS - 2), &payload);
                let msg = GossipMessage::Update { record, payload: Some(payload) }.to_bytes();
                if swarm.behaviour_mut().gossipsub.publish(topic.clone(), msg).is_ok() {
                    m.gap_records += 1;
                }
                if n.is_multiple_of(4) {
                    let stranger = fresh_key(n).author().0;
                    for request in [
                        FetchRequest::Anchor { weights: None },
                        FetchRequest::Heads,
                        FetchRequest::Block { hash: [0xab; 32] },
                        FetchRequest::FinalVote,
                        FetchRequest::Records { author: stranger, from_seq: 0, max: u32::MAX },
                    ] {
                        swarm.behaviour_mut().fetch.send_request(&node, request);
                        m.requests += 1;
                    }
                }
            }
        }
    }
    drop(stalled);
    m
}

/// Resident memory of a process now, in bytes (Linux).
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

#[test]
fn a_hostile_peer_cannot_stall_bloat_or_corrupt_an_honest_mesh() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // An open run (the hostile peer's fresh keys are admitted, its requests
    // served) founded by the three honest nodes, whose votes decide every
    // round's anchor from round 0.
    let dirs: Vec<_> = (0..3).map(|i| tmp.path().join(format!("node-{i}"))).collect();
    let founders = meshtrain_tests::roster(tmp.path(), &dirs);
    let (spec, store) = spec_new(
        tmp.path(),
        &[
            "--model",
            "mlp",
            "--rounds",
            &ROUNDS.to_string(),
            "--local-steps",
            "20",
            "--admission",
            "open",
            "--founders",
            founders.to_str().expect("utf-8 path"),
        ],
    );
    let store = store.to_str().expect("utf-8 path");
    let mut nodes: Vec<NodeProc> = vec![spawn_node(
        &tmp.path().join("node-0"),
        &spec,
        "0/3",
        None,
        &["--wait-peers", "2", "--drain-s", "10", "--data", store],
    )];
    let info = wait_listen(&mut nodes[0], Duration::from_secs(120));
    for i in 1..3 {
        nodes.push(spawn_node(
            &tmp.path().join(format!("node-{i}")),
            &spec,
            &format!("{i}/3"),
            Some(&info.addr),
            &["--wait-peers", "2", "--drain-s", "10"],
        ));
    }
    let addr: Multiaddr = info.addr.parse().expect("multiaddr");
    let node: PeerId = info.peer_id.parse().expect("peer id");
    let run_hex = info.run_id.clone();
    let port: u16 = info
        .addr
        .split("/tcp/")
        .nth(1)
        .and_then(|t| t.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("tcp port in the listen address");
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(hostile(addr, node, run_hex, stop))
        })
    };
    // Once the mesh trains: hundreds of connections from one address
    // (127.0.0.2, not the honest nodes' 127.0.0.1) that never finish a
    // handshake, held until the end. A newcomer must still get in.
    meshtrain_tests::wait_round(&nodes[0].dir, 1);
    let idle = half_open(port, 300);
    let held = idle.len();
    assert!(held >= 200, "only {held} half-open connections opened");
    let newcomer = newcomer_connects(info.addr.parse().expect("multiaddr"), node, &info.run_id);
    assert!(
        newcomer.is_some(),
        "a new peer could not connect to node 0 within 5 s while {held} half-open connections were held"
    );

    // Wait for the honest nodes, sampling their memory.
    let started = Instant::now();
    let mut peak = [0u64; 3];
    let mut exited = [None, None, None];
    while exited.iter().any(Option::is_none) {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the mesh did not finish within 600 s under the hostile peer:\n{}",
            log_tail(&nodes[0].dir)
        );
        for (i, n) in nodes.iter_mut().enumerate() {
            if exited[i].is_some() {
                continue;
            }
            if let Some(r) = rss(n.child.id()) {
                peak[i] = peak[i].max(r);
            }
            if let Ok(Some(s)) = n.child.try_wait() {
                exited[i] = Some(s);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let mischief = attacker.join().expect("hostile peer thread");
    drop(idle);
    eprintln!(
        "hostile peer: {mischief:?}; honest peak RSS {:?} MiB; run {:.1} s; a newcomer connected in {:?} past {held} half-open connections",
        peak.map(|p| p >> 20),
        started.elapsed().as_secs_f64(),
        newcomer.unwrap_or_default(),
    );
    assert!(mischief.gap_records > 500, "the flood ran: {mischief:?}");
    assert!(mischief.requests > 200, "the storm ran: {mischief:?}");
    assert!(
        mischief.refused > 0,
        "node 0 never held the storm to its budget: {mischief:?}"
    );

    for (i, n) in nodes.iter().enumerate() {
        let s = exited[i].expect("exited");
        assert!(s.success(), "node {i} failed ({s}):\n{}", log_tail(&n.dir));
        let r = results(&n.dir);
        eprintln!(
            "node {i}: closed {} rounds, joined at {:?}, repaired at {:?}, refused {:?}",
            r.rounds_completed, r.joined_at, r.repaired_at, r.rejected_by_reason
        );
        // A node the flood left two rounds behind adopts the anchor the
        // others decided (the agreement's catch-up), so it may close fewer
        // rounds itself; it must still end on the same model (below).
        assert!(
            r.rounds_completed > 0,
            "node {i} closed no round (joined at {:?}):\n{}",
            r.joined_at,
            log_tail(&n.dir)
        );
        assert!(
            r.final_test_acc > 0.6,
            "node {i} accuracy {} is not well above chance",
            r.final_test_acc
        );
        assert!(
            peak[i] < RSS_BOUND,
            "node {i} peaked at {} MiB, over the {} MiB bound",
            peak[i] >> 20,
            RSS_BOUND >> 20
        );
        let (report, status) = audit(&n.dir);
        assert!(status.success() && report.ok, "node {i} audit: {:?}", report.problems);
    }
    // One model: every ledger ends on node 0's anchor, no chain diverges.
    for n in &nodes[1..] {
        let (same, text) = meshtrain_tests::ledger_compare(&nodes[0].dir, &n.dir);
        assert!(same, "{} and node-0 differ:\n{text}", n.dir.display());
    }
    let log0 = std::fs::read_to_string(nodes[0].dir.join("node.log")).unwrap_or_default();
    assert!(
        log0.contains("not asked for") || log0.contains("more chain heads"),
        "node 0 never caught the lying answers:\n{}",
        log_tail(&nodes[0].dir)
    );
}
