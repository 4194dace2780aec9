//! Crash, restart and late join. A node killed with SIGKILL restarts from its
//! data dir: its chain continues where it stopped (every record it signed
//! before the kill is still there, on itself and on its peers) and it never
//! signs a second record at a seq it already used, so nobody holds an
//! equivocation proof against it. A node that joins mid-run adopts the
//! mesh's anchor. Both end on exactly the anchor of the nodes that stayed up.

use std::time::Duration;

use meshtrain_tests::{
    author_of, chain_of, ledger_compare, log_tail, results, spawn_node, spec_with_roster, wait_all_clean, wait_listen,
    wait_round,
};

const ROUNDS: u64 = 40;

#[test]
fn killed_node_resumes_its_chain_and_late_joiner_catches_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (spec, store) = spec_with_roster(tmp.path(), 4, &["--rounds", &ROUNDS.to_string(), "--local-steps", "50"]);
    let args = ["--wait-peers", "2", "--drain-s", "20", "--checkpoint-every", "3"];
    let seed_args = [&args[..], &["--data", store.to_str().expect("utf-8 path")]].concat();
    let mut nodes = vec![spawn_node(&tmp.path().join("node-0"), &spec, "0/4", None, &seed_args)];
    let boot = wait_listen(&mut nodes[0], Duration::from_secs(120)).addr;
    for i in 1..3 {
        let dir = tmp.path().join(format!("node-{i}"));
        nodes.push(spawn_node(&dir, &spec, &format!("{i}/4"), Some(&boot), &args));
    }
    let victim_dir = tmp.path().join("node-2");
    let victim_id = wait_listen(&mut nodes[2], Duration::from_secs(120)).peer_id;
    let victim_author = author_of(&victim_dir);

    // SIGKILL node 2 mid-run, in the middle of whatever it was doing.
    wait_round(&nodes[0].dir, 4);
    nodes[2].child.kill().expect("kill node 2");
    let _ = nodes[2].child.wait();
    let before = chain_of(&victim_dir, &victim_author);
    assert!(
        before.len() >= 3,
        "node 2 signed only {} records before the kill",
        before.len()
    );

    // Restart it from the same data dir, and add a fourth node mid-run.
    std::thread::sleep(Duration::from_secs(1));
    nodes[2] = spawn_node(&victim_dir, &spec, "2/4", Some(&boot), &args);
    let restarted_id = wait_listen(&mut nodes[2], Duration::from_secs(120)).peer_id;
    assert_eq!(restarted_id, victim_id, "the restarted node keeps its identity");
    wait_round(&nodes[0].dir, 8);
    nodes.push(spawn_node(&tmp.path().join("node-3"), &spec, "3/4", Some(&boot), &args));

    wait_all_clean(&mut nodes, Duration::from_secs(400));

    // No lost records and no reused seq: the pre-kill chain is a prefix of
    // the final one, on the victim and on a peer, and the chain grew.
    let after_self = chain_of(&victim_dir, &victim_author);
    let after_peer = chain_of(&nodes[0].dir, &victim_author);
    for (seq, hash) in &before {
        assert_eq!(
            after_self.get(seq),
            Some(hash),
            "node 2 lost or rewrote its record at seq {seq}"
        );
        assert_eq!(
            after_peer.get(seq),
            Some(hash),
            "node 0 lacks node 2's record at seq {seq}"
        );
    }
    assert!(
        after_self.len() > before.len() + 5,
        "node 2 did not continue its chain after the restart: {} records before, {} after\n{}",
        before.len(),
        after_self.len(),
        log_tail(&victim_dir)
    );
    let seqs: Vec<u64> = after_self.keys().copied().collect();
    assert_eq!(
        seqs,
        (0..seqs.len() as u64).collect::<Vec<_>>(),
        "node 2's chain has gaps"
    );
    // `ledger compare` also requires both to end on one anchor.
    for (a, b) in [(0, 1), (0, 2), (1, 2), (0, 3)] {
        let (ok, text) = ledger_compare(&nodes[a].dir, &nodes[b].dir);
        assert!(ok, "ledger compare node-{a} node-{b}:\n{text}");
    }

    let r2 = results(&victim_dir);
    assert!(r2.restarted, "node 2 reports its restart");
    let r3 = results(&nodes[3].dir);
    assert!(!r3.joined_at.is_empty(), "the late joiner adopted an anchor");
    assert!(
        r3.updates_published > 0,
        "the late joiner contributed:\n{}",
        nodes[3].log_tail()
    );
    let r0 = results(&nodes[0].dir);
    let curve = |r: &meshtrain_testnet::report::NodeReport| -> String {
        r.history
            .iter()
            .map(|h| format!("{}:{:.4}", h.round, h.test_acc))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // One model: the restarted node and the late joiner end on the anchor
    // the nodes that stayed up end on, so their evaluations are identical.
    let r1 = results(&nodes[1].dir);
    for (i, r) in [(1, &r1), (2, &r2), (3, &r3)] {
        assert!(
            r.final_test_acc == r0.final_test_acc && r.final_test_loss == r0.final_test_loss,
            "node {i} ends at {:.4} (loss {:.5}), node 0 at {:.4} (loss {:.5})\nnode 0: {}\nnode {i}: {}",
            r.final_test_acc,
            r.final_test_loss,
            r0.final_test_acc,
            r0.final_test_loss,
            curve(&r0),
            curve(r)
        );
    }
}
