//! An open run: three honest founders and a founding member that runs
//! `anchor-hijack:8` (eight keys of its own vote, every round, for a
//! poisoned anchor that it offers to whoever asks). No honest node may
//! train from, end on or join that anchor, nothing the Sybils sign may be
//! merged, and the honest nodes end on one anchor.

use std::time::Duration;

use meshtrain_ledger::{audit::closed_rounds, Ledger};
use meshtrain_tests::{ledger_compare, results, roster, spawn_node, spec_new, wait_all, wait_listen};

const ROUNDS: u64 = 8;

#[test]
fn sybils_voting_for_a_poisoned_anchor_move_no_honest_node() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n = 4;
    let dirs: Vec<_> = (0..n).map(|i| tmp.path().join(format!("node-{i}"))).collect();
    let founders = roster(tmp.path(), &dirs);
    let founders = founders.to_str().expect("utf-8 path");
    let (spec, store) = spec_new(
        tmp.path(),
        &[
            "--rounds",
            &ROUNDS.to_string(),
            "--local-steps",
            "10",
            "--admission",
            "open",
            "--founders",
            founders,
        ],
    );
    let mut nodes = Vec::new();
    let mut boot = None;
    for (i, dir) in dirs.iter().enumerate() {
        let mut args = vec![
            "--wait-peers".to_string(),
            (n - 1).to_string(),
            "--drain-s".into(),
            "20".into(),
        ];
        if i == n - 1 {
            args.extend(["--attack".to_string(), "anchor-hijack:8".to_string()]);
        }
        if i == 0 {
            args.extend(["--data".to_string(), store.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nodes.push(spawn_node(dir, &spec, &format!("{i}/{n}"), boot.as_deref(), &args));
        if i == 0 {
            boot = Some(wait_listen(&mut nodes[0], Duration::from_secs(120)).addr);
        }
    }
    let statuses = wait_all(&mut nodes, Duration::from_secs(600));
    let attacker = results(&dirs[n - 1]);
    let poisoned = attacker.poisoned_anchor.clone().expect("the hijacker names its anchor");
    assert_eq!(attacker.sybil_authors.len(), 8);
    assert!(
        attacker.sybil_records >= 8,
        "the Sybils signed {} records",
        attacker.sybil_records
    );

    for i in 0..n - 1 {
        assert!(
            statuses[i].success(),
            "honest node {i} failed:\n{}",
            meshtrain_tests::log_tail(&dirs[i])
        );
        let r = results(&dirs[i]);
        assert_eq!(r.rounds_completed, ROUNDS, "honest node {i} kept training");
        for s in &attacker.sybil_authors {
            assert_eq!(r.merged_by_author.get(s), None, "node {i} merged a Sybil's update");
            assert_eq!(r.clipped_by_author.get(s), None, "node {i} merged a Sybil's update");
        }
        assert!(
            r.rejected_by_reason.get("off-base").copied().unwrap_or(0) > 0,
            "node {i} saw no off-base Sybil record: {:?}",
            r.rejected_by_reason
        );
        let ledger = Ledger::open_read_only(&dirs[i].join("ledger")).expect("open the ledger");
        for (round, c) in closed_rounds(&ledger).expect("closed rounds") {
            assert!(
                c.base.to_string() != poisoned && c.anchor.to_string() != poisoned,
                "node {i} trained from or closed round {round} on the poisoned anchor"
            );
        }
        for j in ledger.joins().expect("joins") {
            assert_ne!(j.anchor.to_string(), poisoned, "node {i} joined the poisoned anchor");
        }
    }
    for i in 1..n - 1 {
        let (same, text) = ledger_compare(&dirs[0], &dirs[i]);
        assert!(same, "nodes 0 and {i} differ:\n{text}");
        assert_eq!(
            results(&dirs[0]).final_test_loss,
            results(&dirs[i]).final_test_loss,
            "nodes 0 and {i} ended on different models"
        );
    }
}
