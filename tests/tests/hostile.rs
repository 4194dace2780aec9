//! A hostile peer against a real mesh: four honest nodes (the founders of
//! an open run) train on loopback while the peer of
//! `meshtrain_tests::hostile` joins node 0's topic and, for the whole run,
//! floods records past a gap under fresh keys, lies in every answer, never
//! serves a payload it is asked for, storms node 0 with anchor, heads,
//! records and block requests (the dataset's real blocks among them), dials
//! it again and again, and holds hundreds of raw TCP connections open (a
//! newcomer must still get in). The honest nodes must finish every round
//! with a good model, keep their memory under a stated bound, audit clean,
//! and serve the peer no more than its byte budget.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use meshtrain_gossip::libp2p::{identity, swarm::SwarmEvent, Multiaddr, PeerId};
use meshtrain_gossip::{build_swarm, run_topic, MeshConfig};
use meshtrain_tests::hostile::{self, half_open, rss, Target};
use meshtrain_tests::{audit, results, spawn_node, spec_new, wait_listen, NodeProc};

const ROUNDS: u64 = 4;
const NODES: usize = 4;
/// Peak resident memory an honest node may reach under the flood. Measured
/// on the CI machine: nodes the hostile peer does not reach peak near
/// 255 MiB, the node it attacks near 360 MiB; without per-peer request
/// budgets (anchors served to it as fast as it asked) 700 to 780 MiB.
const RSS_BOUND: u64 = 512 << 20;

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

#[test]
fn a_hostile_peer_cannot_stall_bloat_or_corrupt_an_honest_mesh() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let wait = (NODES - 1).to_string();
    // An open run (the hostile peer's fresh keys are admitted, its requests
    // served) founded by the four honest nodes, whose votes decide every
    // round's anchor from round 0.
    let dirs: Vec<_> = (0..NODES).map(|i| tmp.path().join(format!("node-{i}"))).collect();
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
    let store_dir = store.clone();
    let store = store.to_str().expect("utf-8 path");
    let mut nodes: Vec<NodeProc> = vec![spawn_node(
        &tmp.path().join("node-0"),
        &spec,
        &format!("0/{NODES}"),
        None,
        &["--wait-peers", &wait, "--drain-s", "10", "--data", store],
    )];
    let info = wait_listen(&mut nodes[0], Duration::from_secs(120));
    for i in 1..NODES {
        nodes.push(spawn_node(
            &tmp.path().join(format!("node-{i}")),
            &spec,
            &format!("{i}/{NODES}"),
            Some(&info.addr),
            &["--wait-peers", &wait, "--drain-s", "10"],
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
    let target = Target {
        addr,
        node,
        run_hex,
        rounds: ROUNDS,
        blocks: hostile::block_hashes(&store_dir),
    };
    assert!(!target.blocks.is_empty(), "no blocks in {}", store_dir.display());
    let attacker = hostile::spawn(target, stop.clone());
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
    let mut peak = [0u64; NODES];
    let mut exited = [None; NODES];
    while exited.iter().any(Option::is_none) {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the mesh did not finish within 600 s under the hostile peer:\n{}",
            nodes[0].log_tail()
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
    // Asked for 50 MiB of blocks a second and 12 anchors, it got its byte
    // budget of blocks and its 40 anchors per window, and no more.
    assert!(
        mischief.bytes_served >= hostile::BYTES_PER_WINDOW / 2,
        "the block storm was never served: {mischief:?}"
    );
    let bound = hostile::serving_bound(mischief.secs, results(&nodes[0].dir).param_count);
    assert!(
        mischief.bytes_served <= bound,
        "node 0 served the hostile peer {} MiB in {:.0} s, over its budget of {} MiB: {mischief:?}",
        mischief.bytes_served >> 20,
        mischief.secs,
        bound >> 20
    );

    for (i, n) in nodes.iter().enumerate() {
        let s = exited[i].expect("exited");
        assert!(s.success(), "node {i} failed ({s}):\n{}", n.log_tail());
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
            n.log_tail()
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
        nodes[0].log_tail()
    );
}
