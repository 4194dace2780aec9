//! The block layer across real nodes: a node starts with a corrupted copy of
//! a block and fetches a good one; nodes pull their shards from peers; when a
//! member dies, the survivors re-replicate the blocks it held.

use std::time::{Duration, Instant};

use meshtrain_tests::{results, spawn_node, spec_founded, wait_all, wait_listen};

const ROUNDS: u64 = 14;

fn progress_round(dir: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("progress.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["round"].as_u64()
}

#[test]
fn shards_are_fetched_repaired_and_re_replicated() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (spec, store) = spec_founded(tmp.path(), 4, &["--rounds", &ROUNDS.to_string(), "--replication", "3"]);
    let manifest_dir = store.join("manifests");
    let train_blocks: usize = {
        let m = std::fs::read_dir(&manifest_dir)
            .expect("manifests")
            .next()
            .expect("one")
            .expect("entry")
            .path();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(m).expect("manifest")).expect("json");
        v["splits"]["train"].as_array().expect("train").len()
    };

    // Node 1 starts with every block, one of them corrupted on disk.
    let n1_blocks = tmp.path().join("node-1").join("blocks");
    std::fs::create_dir_all(n1_blocks.join("blocks")).expect("dir");
    let mut victim = None;
    for e in std::fs::read_dir(store.join("blocks")).expect("blocks") {
        let p = e.expect("entry").path();
        let dest = n1_blocks.join("blocks").join(p.file_name().expect("name"));
        let mut bytes = std::fs::read(&p).expect("read");
        if victim.is_none() {
            bytes[100] ^= 0xff;
            victim = Some(dest.clone());
        }
        std::fs::write(&dest, bytes).expect("write");
    }
    let victim = victim.expect("a block to corrupt");

    let store_arg = store.to_str().expect("utf-8");
    let args = ["--wait-peers", "3", "--drain-s", "20"];
    let mut nodes = vec![spawn_node(
        &tmp.path().join("node-0"),
        &spec,
        "0/4",
        None,
        &[&args[..], &["--data", store_arg]].concat(),
    )];
    let boot = wait_listen(&mut nodes[0], Duration::from_secs(120)).addr;
    for i in 1..4 {
        nodes.push(spawn_node(
            &tmp.path().join(format!("node-{i}")),
            &spec,
            &format!("{i}/4"),
            Some(&boot),
            &args,
        ));
    }

    // Kill node 3 two rounds before the end: its blocks must be
    // re-replicated all the same. The survivors re-plan a second after a
    // member leaves, by when the last round (about 0.1 s each here) has
    // closed; a node that left once its rounds were done held 33 of 45
    // blocks (1 run in 3 with the kill at round 4 of 14, whose re-plan
    // raced the last round's close).
    let kill_at = ROUNDS - 2;
    let start = Instant::now();
    while progress_round(&nodes[0].dir).unwrap_or(0) < kill_at {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "mesh never reached round {kill_at}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nodes[3].child.kill().expect("kill node 3");
    let mut dead = nodes.pop().expect("node 3");
    let _ = dead.child.wait();

    let statuses = wait_all(&mut nodes, Duration::from_secs(600));
    for (i, s) in statuses.iter().enumerate() {
        assert!(s.success(), "node {i} failed:\n{}", nodes[i].log_tail());
    }
    let reports: Vec<_> = nodes.iter().map(|n| results(&n.dir)).collect();
    assert_eq!(reports[0].blocks_fetched, 0, "the seed fetches nothing");
    assert!(
        reports[2].blocks_fetched > 0 && reports[2].data_fetch_ms.is_some(),
        "node 2 pulled its shard from peers"
    );
    for (i, r) in reports.iter().enumerate() {
        // Seen once in a full suite run (13 of 14 at node 2, not again in
        // 9 runs, 6 of them three at a time): the round lines say which
        // round it did not close and why.
        assert_eq!(
            r.rounds_completed,
            ROUNDS,
            "node {i}; its round log:\n{}",
            round_lines(&nodes[i].log)
        );
        // Three survivors with replication 3: each now holds every block.
        assert_eq!(
            r.held_blocks as usize, train_blocks,
            "node {i} holds {} of {train_blocks} blocks",
            r.held_blocks
        );
        assert!(r.final_test_acc > 0.6, "node {i} accuracy {}", r.final_test_acc);
    }
    // Node 1 noticed its corrupted block and replaced it with a good copy.
    let log = std::fs::read_to_string(nodes[1].dir.join("node.log")).expect("log");
    assert!(
        log.contains("corrupted block on disk"),
        "node 1 did not notice the corrupted block"
    );
    let name = victim.file_stem().and_then(|n| n.to_str()).expect("hash");
    let repaired = std::fs::read(&victim).expect("the block is back");
    assert_eq!(meshtrain_model::blocks::block_hash(&repaired), name);
}

/// The lines of a node's log about starting, closing, skipping or taking
/// over rounds.
fn round_lines(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| format!("cannot read {}: {e}", log.display()));
    let keys = [
        "round closed",
        "ahead",
        "taking over",
        "going back",
        "starting to train",
        "deadline",
    ];
    text.lines()
        .filter(|l| keys.iter().any(|k| l.contains(k)))
        .collect::<Vec<_>>()
        .join("\n")
}
