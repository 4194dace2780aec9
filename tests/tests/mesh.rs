//! Three real nodes on loopback train together for a few rounds while
//! intruders feed node 0 forged, garbage, wrong-run and oversized messages.
//! Afterwards: accuracy well above chance, clean audits, complete chains,
//! and every bad message rejected with its reason.

use std::time::Duration;

use futures::StreamExt;
use meshtrain_gossip::libp2p::{gossipsub, identity, swarm::SwarmEvent, Multiaddr};
use meshtrain_gossip::{build_swarm, run_topic, GossipMessage, MeshBehaviourEvent, MeshConfig};
use meshtrain_ledger::{AuthorKey, PayloadHash, RecordHash, RunId, Seq, UpdateRecord, WeightsHash, RECORD_VERSION};
use meshtrain_tests::{audit, meshtrain_bin, results, spawn_node, spec_founded, wait_all, wait_listen};

const ROUNDS: u64 = 8;

fn record(key: &AuthorKey, run_id: RunId) -> UpdateRecord {
    UpdateRecord {
        version: RECORD_VERSION,
        run_id,
        author: key.author(),
        seq: Seq(0),
        prev: RecordHash([0; 32]),
        round: 0,
        base_hash: WeightsHash([0; 32]),
        base_outer: WeightsHash([0; 32]),
        made_from: WeightsHash([0; 32]),
        made_outer: WeightsHash([0; 32]),
        merged: Vec::new(),
        waited: Vec::new(),
        payload_hash: PayloadHash::of(b"nothing"),
        payload_len: 7,
        n_samples: 64,
        train_loss: 0.1,
    }
}

/// Connects a fresh peer to `addr` and publishes `data` once on the run's
/// topic, retrying until the node's subscription is known.
async fn intrude(addr: &str, run_id_hex: &str, data: Vec<u8>, big: bool) {
    let key = identity::Keypair::generate_ed25519();
    let cfg = MeshConfig {
        max_gossip_bytes: if big { 512 * 1024 } else { 64 * 1024 },
        ..Default::default()
    };
    let topic = run_topic(run_id_hex);
    let mut registry = prometheus_client::registry::Registry::default();
    let mut swarm = build_swarm(key, &cfg, &topic, &mut registry).expect("intruder swarm");
    // Publishing without lingering in the mesh: unsubscribe so that the
    // nodes never wait for this peer's updates.
    swarm.behaviour_mut().gossipsub.unsubscribe(&topic);
    let addr: Multiaddr = addr.parse().expect("multiaddr");
    swarm.dial(addr).expect("dial");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut published = false;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    while tokio::time::Instant::now() < deadline {
        tokio::select! {
            ev = swarm.select_next_some() => {
                if let SwarmEvent::Behaviour(MeshBehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { .. })) = ev {}
            }
            _ = ticker.tick() => {
                if !published {
                    published = swarm.behaviour_mut().gossipsub.publish(topic.clone(), data.clone()).is_ok();
                } else {
                    // Give the message time to leave before the peer drops.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return;
                }
            }
        }
    }
    panic!("intruder could not publish within 30 s");
}

#[test]
fn three_nodes_train_audit_and_reject_bad_input() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (spec, store) = spec_founded(
        tmp.path(),
        3,
        &["--model", "mlp", "--rounds", &ROUNDS.to_string(), "--local-steps", "20"],
    );
    let store = store.to_str().expect("utf-8 path");
    let mut nodes = vec![spawn_node(
        &tmp.path().join("node-0"),
        &spec,
        "0/3",
        None,
        &["--wait-peers", "2", "--drain-s", "20", "--data", store],
    )];
    let info = wait_listen(&mut nodes[0], Duration::from_secs(120));
    for i in 1..3 {
        // Node 2 keeps payloads for two rounds only: its replay must fail.
        let mut args = vec!["--wait-peers", "2", "--drain-s", "20"];
        if i == 2 {
            args.extend(["--keep-payload-rounds", "2"]);
        }
        nodes.push(spawn_node(
            &tmp.path().join(format!("node-{i}")),
            &spec,
            &format!("{i}/3"),
            Some(&info.addr),
            &args,
        ));
    }

    // Four intruders, one bad message each (a rejected peer is graylisted,
    // so each needs its own identity).
    let run_id: RunId = info.run_id.parse().expect("run id");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let forger = AuthorKey::from_secret([7; 32]);
    let mut forged = record(&forger, run_id).sign(&forger);
    forged.signature.0[10] ^= 0x55;
    let wrong_run = record(&forger, RunId([9; 32])).sign(&forger);
    let messages = vec![
        (
            GossipMessage::Update {
                record: forged.to_bytes(),
                payload: None,
            }
            .to_bytes(),
            false,
        ),
        (vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3], false),
        (
            GossipMessage::Update {
                record: wrong_run.to_bytes(),
                payload: None,
            }
            .to_bytes(),
            false,
        ),
        (
            GossipMessage::Update {
                record: vec![0; 100_000],
                payload: None,
            }
            .to_bytes(),
            true,
        ),
    ];
    rt.block_on(async {
        for (data, big) in messages {
            intrude(&info.addr, &info.run_id, data, big).await;
        }
    });

    let statuses = wait_all(&mut nodes, Duration::from_secs(600));
    for (i, s) in statuses.iter().enumerate() {
        assert!(s.success(), "node {i} failed ({s}):\n{}", nodes[i].log_tail());
    }

    let reports: Vec<_> = nodes.iter().map(|n| results(&n.dir)).collect();
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.rounds_completed, ROUNDS, "node {i} rounds");
        assert!(
            r.final_test_acc > 0.6,
            "node {i} accuracy {} is not well above chance",
            r.final_test_acc
        );
        assert!(
            r.bytes_sent > 0 && r.bytes_received > 0,
            "libp2p byte counters are live"
        );
        // gossipsub's own counters: every record published was sent at
        // least once, and the others' records came in.
        assert!(
            r.gossip_published >= ROUNDS && r.gossip_sent >= r.gossip_published && r.gossip_sent_bytes > 0,
            "node {i} gossip counters: published {}, sent {} ({} B)",
            r.gossip_published,
            r.gossip_sent,
            r.gossip_sent_bytes
        );
        assert!(
            r.gossip_received >= ROUNDS,
            "node {i} received {} gossip messages",
            r.gossip_received
        );
    }
    let r0 = &reports[0];
    for reason in ["bad-signature", "malformed", "wrong-run"] {
        assert!(
            r0.rejected_by_reason.get(reason).copied().unwrap_or(0) >= 1,
            "node 0 did not reject a {reason} message: {:?}",
            r0.rejected_by_reason
        );
    }

    // Clean audits, and every ledger holds all three chains in full.
    let authors: Vec<&str> = reports.iter().map(|r| r.author.as_str()).collect();
    for (i, n) in nodes.iter().enumerate() {
        let (report, status) = audit(&n.dir);
        assert!(status.success() && report.ok, "node {i} audit: {:?}", report.problems);
        assert_eq!(report.verdict_blocks, ROUNDS, "node {i} verdict chain");
        for a in &authors {
            assert_eq!(
                report.chain_lengths.get(*a).copied(),
                Some(ROUNDS),
                "node {i} chain of {a}"
            );
        }
    }
    let dirs: Vec<_> = nodes.iter().map(|n| n.dir.clone()).collect();
    check_auditor_commands(&dirs);
}

fn ledger_cmd(args: &[&std::path::Path], sub: &str, json: bool) -> (serde_json::Value, std::process::ExitStatus) {
    let mut cmd = std::process::Command::new(meshtrain_bin());
    cmd.args(["ledger", sub]).args(args);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("run meshtrain ledger");
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (v, out.status)
}

/// Replay, compare and export, as an auditor runs them after a testnet.
fn check_auditor_commands(dirs: &[std::path::PathBuf]) {
    for (i, dir) in dirs.iter().enumerate().take(2) {
        let (v, status) = ledger_cmd(&[dir], "replay", true);
        assert!(status.success() && v["ok"] == true, "node {i} replay: {v}");
        assert_eq!(v["blocks"], ROUNDS);
    }
    let (v, status) = ledger_cmd(&[&dirs[2]], "replay", true);
    assert!(
        !status.success() && v["ok"] == false,
        "pruned payloads must fail the replay: {v}"
    );
    assert!(v["problem"].as_str().unwrap_or("").contains("not retained"), "{v}");

    let (v, status) = ledger_cmd(&[&dirs[0], &dirs[1]], "compare", false);
    assert!(
        status.success() && v["ok"] == true && v["shared_authors"] == 3,
        "compare: {v}"
    );

    let out = std::process::Command::new(meshtrain_bin())
        .args(["ledger", "export"])
        .arg(&dirs[0])
        .output()
        .expect("export");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let kinds: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line")["type"].to_string())
        .collect();
    assert_eq!(kinds.iter().filter(|k| k.contains("record")).count() as u64, 3 * ROUNDS);
    assert_eq!(kinds.iter().filter(|k| k.contains("verdict")).count() as u64, ROUNDS);
}
