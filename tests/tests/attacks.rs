//! A sign-flip attacker and an equivocating attacker join an open run that
//! three honest nodes founded. Both must be banned by every honest node,
//! the honest nodes must still learn, and their ledgers must say who was
//! rejected and why.

use std::time::Duration;

use meshtrain_tests::{audit, refused, results, spawn_node, spec_founded, verdicts_on, wait_all, wait_listen};

/// The sign-flipper is on probation (not a founder): its updates are judged,
/// and reputation bans after 8 counted verdicts, but rounds do not wait for
/// it and its late updates count only when refused outright (an honest late
/// joiner's late update, clipped against the next round's, must not). In 12
/// rounds it often had fewer than 8 counted: the test failed 1 run in 3
/// at 89c1766 and after it alike ("rejected 3, on probation 6", in the
/// 36-second runs where rounds closed fastest). 16 rounds leave it room.
const ROUNDS: u64 = 16;

#[test]
fn sign_flip_and_equivocating_attackers_are_banned() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Founded by the honest nodes 0..2 (until CI failed on it, the run had
    // no founders: node 0 merged another set than the others early, earned
    // votes for nobody else, and trained alone on its own anchor for all
    // 16 rounds). CenteredClip is the default aggregator. 20 local steps a round: at
    // 10, the honest nodes ended 12 rounds at 0.748 to 0.768 (3 runs, no
    // attacker's update merged), too close to the bar below to tell
    // learning from noise.
    let (spec, store) = spec_founded(tmp.path(), 3, &["--rounds", &ROUNDS.to_string(), "--local-steps", "20"]);
    let roles = [None, None, None, Some("sign-flip"), Some("equivocate")];
    let n = roles.len();
    let mut nodes = Vec::new();
    let mut boot = None;
    for (i, role) in roles.iter().enumerate() {
        let mut args = vec![
            "--wait-peers".to_string(),
            (n - 1).to_string(),
            "--drain-s".into(),
            "20".into(),
        ];
        if let Some(a) = role {
            args.extend(["--attack".to_string(), a.to_string()]);
        }
        if i == 0 {
            args.extend(["--data".to_string(), store.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let dir = tmp.path().join(format!("node-{i}"));
        nodes.push(spawn_node(&dir, &spec, &format!("{i}/{n}"), boot.as_deref(), &args));
        if i == 0 {
            boot = Some(wait_listen(&mut nodes[0], Duration::from_secs(120)).addr);
        }
    }
    let statuses = wait_all(&mut nodes, Duration::from_secs(600));
    let reports: Vec<_> = nodes.iter().map(|n| results(&n.dir)).collect();
    let flipper = reports[3].author.clone();
    let liar = reports[4].author.clone();

    for (i, r) in reports.iter().enumerate() {
        eprintln!(
            "node {i} ({:?}): accuracy {:.4}, {} rounds, {:.1} s, merged {}, clipped {}, rejected {} {:?}, repaired at {:?}, joined at {:?}; flipper merged {:?} clipped {:?} rejected {:?} on probation {:?}",
            r.attack,
            r.final_test_acc,
            r.rounds_completed,
            r.wall_s,
            r.updates_merged,
            r.updates_clipped,
            r.updates_rejected,
            r.rejected_by_reason,
            r.repaired_at,
            r.joined_at,
            r.merged_by_author.get(&flipper),
            r.clipped_by_author.get(&flipper),
            r.rejected_by_author.get(&flipper),
            r.probation_by_author.get(&flipper),
        );
    }
    for (i, r) in reports.iter().enumerate().take(3) {
        assert!(statuses[i].success(), "honest node {i} failed");
        assert_eq!(r.rounds_completed, ROUNDS, "honest node {i} kept training");
        assert!(r.final_test_acc > 0.75, "honest node {i} accuracy {}", r.final_test_acc);
        assert!(
            r.banned.contains(&flipper),
            "node {i} did not ban the sign-flipper: rejected {:?}, clipped {:?}, on probation {:?}, merged {:?}; log:\n{}",
            r.rejected_by_author.get(&flipper),
            r.clipped_by_author.get(&flipper),
            r.probation_by_author.get(&flipper),
            r.merged_by_author.get(&flipper),
            nodes[i].log_tail()
        );
        assert!(r.banned.contains(&liar), "node {i} did not ban the equivocator");
        // What the flipper sent was refused (on probation: judged below
        // full weight; or ignored once it was banned), and the ledger says so.
        let on_flipper = verdicts_on(&nodes[i].dir, &flipper);
        assert!(
            on_flipper.iter().any(refused),
            "node {i}'s ledger never refused the sign-flipper: {on_flipper:?}"
        );
        assert_eq!(
            r.merged_by_author.get(&flipper).copied().unwrap_or(0),
            0,
            "node {i} merged a sign-flipped update at full weight"
        );
        for honest in reports.iter().take(3) {
            assert!(!r.banned.contains(&honest.author), "node {i} banned an honest node");
        }

        let (a, status) = audit(&nodes[i].dir);
        assert!(status.success() && a.ok, "node {i} audit: {:?}", a.problems);
        // The equivocator's second record is refused as an equivocation, or
        // as banned when the gossiped proof came first (a banned author's
        // records are not stored): the proof is what the ledger keeps.
        assert!(a.proofs >= 1, "node {i} keeps the equivocation proof");
    }
}
