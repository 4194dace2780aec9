//! A mesh split in two and healed. The split is made with each node's
//! deny-list (`--deny-peers`), which blocks the other half at the libp2p
//! layer (on loopback, so that the test runs anywhere; the namespace testbed
//! shapes real links). While split, neither half holds more than half of the
//! voting power, so neither decides an anchor: each gives its rounds up onto
//! the last decided one rather than run ahead on its own. After the heal the
//! votes decide again, every node ends on the same anchor, and `ledger
//! compare` across the halves finds no divergence and one final anchor.

use std::process::Command;
use std::time::Duration;

use meshtrain_tests::{
    ledger_compare, log_tail, meshtrain_bin, results, spawn_node, spec_with_roster, wait_all_clean, wait_listen,
    wait_round,
};

const ROUNDS: u64 = 40;

#[test]
fn halves_converge_after_a_partition_heals() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (spec, store) = spec_with_roster(tmp.path(), 4, &["--rounds", &ROUNDS.to_string(), "--local-steps", "50"]);
    let deny = |i: usize| tmp.path().join(format!("deny-{i}.txt"));
    let args = |i: usize| -> Vec<String> {
        let mut a: Vec<String> = ["--wait-peers", "3", "--drain-s", "20"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["--deny-peers".to_string(), deny(i).to_string_lossy().into_owned()]);
        if i == 0 {
            a.extend(["--data".to_string(), store.to_string_lossy().into_owned()]);
            a.extend(["--metrics".to_string(), "127.0.0.1:0".to_string()]);
        }
        a
    };
    let spawn = |i: usize, boot: Option<&str>| {
        let a = args(i);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        spawn_node(
            &tmp.path().join(format!("node-{i}")),
            &spec,
            &format!("{i}/4"),
            boot,
            &a,
        )
    };
    let mut nodes = vec![spawn(0, None)];
    let boot = wait_listen(&mut nodes[0], Duration::from_secs(120));
    let mut ids = vec![boot.peer_id.clone()];
    for i in 1..4 {
        nodes.push(spawn(i, Some(&boot.addr)));
        ids.push(wait_listen(nodes.last_mut().expect("node"), Duration::from_secs(120)).peer_id);
    }

    // Split {0, 1} | {2, 3} for a stretch of rounds, then heal.
    wait_round(&nodes[0].dir, 4);
    for i in 0..4 {
        let other: Vec<&str> = (0..4).filter(|j| (j / 2) != (i / 2)).map(|j| ids[j].as_str()).collect();
        std::fs::write(deny(i), other.join("\n")).expect("write deny-list");
    }
    // The split starts when every node has read its list (each looks once a
    // second, and a round can take less): the last round any of them was in
    // when it did.
    let split_at = (0..4)
        .map(|i| deny_applied_at(&nodes[i].dir))
        .max()
        .expect("four nodes");

    // An operator's view of node 0 meanwhile: `node status` on its metrics.
    let listen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(nodes[0].dir.join("listen.json")).expect("listen.json"))
            .expect("json");
    let url = listen["metrics"]
        .as_str()
        .expect("listen.json names the metrics URL")
        .to_string();
    let status = Command::new(meshtrain_bin())
        .args(["node", "status", "--metrics", &url])
        .output()
        .expect("node status");
    let screen = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "node status: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        screen.contains("round") && screen.contains("updates       received"),
        "{screen}"
    );
    wait_round(&nodes[0].dir, split_at + 8);
    wait_round(&nodes[2].dir, split_at + 8);
    for i in 0..4 {
        std::fs::write(deny(i), "").expect("clear deny-list");
    }

    wait_all_clean(&mut nodes, Duration::from_secs(400));
    // The split was real: each side closed rounds without the other half.
    let r0 = results(&nodes[0].dir);
    let during: Vec<u64> = r0
        .history
        .iter()
        .filter(|h| h.round > split_at + 1 && h.round < split_at + 7)
        .map(|h| h.merged)
        .collect();
    assert!(
        !during.is_empty() && during.iter().all(|m| *m <= 2),
        "node 0 merged {during:?} updates per round while split"
    );

    // `ledger compare` also requires both to end on one anchor.
    for (a, b) in [(0, 1), (0, 2), (1, 3), (0, 3)] {
        let (ok, text) = ledger_compare(&nodes[a].dir, &nodes[b].dir);
        assert!(ok, "ledger compare node-{a} node-{b}:\n{text}");
    }
    let finals: Vec<(f32, f32)> = (0..4)
        .map(|i| {
            let r = results(&nodes[i].dir);
            (r.final_test_acc, r.final_test_loss)
        })
        .collect();
    assert!(
        finals.iter().all(|f| *f == finals[0]),
        "the halves did not end on one model: final (accuracy, loss) {finals:?}"
    );
}

/// The round the node in DIR was in when it applied its deny-list (its
/// `deny-list changed` log line); waits up to 60 s for it.
fn deny_applied_at(dir: &std::path::Path) -> u64 {
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
        let line = text.lines().find(|l| l.contains("deny-list changed")).map(|l| {
            // Without the terminal colours: `round=N`.
            let mut plain = String::new();
            let mut escape = false;
            for c in l.chars() {
                match (escape, c) {
                    (false, '\u{1b}') => escape = true,
                    (true, 'm') => escape = false,
                    (true, _) => {}
                    (false, c) => plain.push(c),
                }
            }
            plain
        });
        if let Some(line) = line {
            return line
                .split("round=")
                .nth(1)
                .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no round in {line:?}"));
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} never applied its deny-list:\n{}",
            dir.display(),
            log_tail(dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
