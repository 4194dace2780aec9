//! A node killed mid-run does not stall the others: rounds close as soon as
//! the survivors' updates are in, never at the (long) deadline.

use std::time::{Duration, Instant};

use meshtrain_tests::{audit, progress_round, results, spawn_node, spec_founded, wait_all, wait_listen};

const ROUNDS: u64 = 12;

#[test]
fn survivors_finish_without_waiting_for_a_killed_peer() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (spec, store) = spec_founded(tmp.path(), 3, &["--rounds", &ROUNDS.to_string(), "--local-steps", "10"]);
    let args = ["--wait-peers", "2", "--drain-s", "20"];
    let seed_args = [&args[..], &["--data", store.to_str().expect("utf-8 path")]].concat();
    let mut nodes = vec![spawn_node(&tmp.path().join("node-0"), &spec, "0/3", None, &seed_args)];
    let info = wait_listen(&mut nodes[0], Duration::from_secs(120));
    for i in 1..3 {
        let dir = tmp.path().join(format!("node-{i}"));
        nodes.push(spawn_node(&dir, &spec, &format!("{i}/3"), Some(&info.addr), &args));
    }

    // Kill node 2 (SIGKILL, no goodbye) once the mesh is a few rounds in.
    let start = Instant::now();
    while progress_round(&nodes[0].dir) < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "mesh never reached round 3");
        std::thread::sleep(Duration::from_millis(20));
    }
    nodes[2].child.kill().expect("kill node 2");
    let mut victim = nodes.pop().expect("node 2");
    let _ = victim.child.wait();

    let statuses = wait_all(&mut nodes, Duration::from_secs(300));
    let max_wait_ms = 30_000;
    for (i, s) in statuses.iter().enumerate() {
        assert!(s.success(), "node {i} failed:\n{}", nodes[i].log_tail());
        let r = results(&nodes[i].dir);
        assert_eq!(r.rounds_completed, ROUNDS, "node {i} finished every round");
        for round in &r.history {
            assert!(
                round.wait_ms < max_wait_ms / 2,
                "node {i} waited {} ms in round {} (deadline {max_wait_ms} ms): it waited on the dead peer\n{}",
                round.wait_ms,
                round.round,
                nodes[i].log_tail()
            );
        }
        let (report, status) = audit(&nodes[i].dir);
        assert!(status.success() && report.ok, "node {i} audit: {:?}", report.problems);
    }
    // The survivors end on one model: the same anchor, so bit-identical
    // evaluations (a payload of the victim's that one of them got late is
    // settled by the anchor votes, not left as a difference).
    let a = results(&nodes[0].dir);
    let b = results(&nodes[1].dir);
    assert!(
        a.final_test_acc == b.final_test_acc && a.final_test_loss == b.final_test_loss,
        "node 0 ends at {:.4} (loss {:.5}), node 1 at {:.4} (loss {:.5})",
        a.final_test_acc,
        a.final_test_loss,
        b.final_test_acc,
        b.final_test_loss
    );
}
