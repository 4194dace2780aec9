//! Who may take part. In a permissioned run a node whose key is not on the
//! roster is refused: its connections are closed and nothing it signs is
//! merged. With a private network key (`--psk-file`), a node without the
//! key cannot even complete a handshake. Either way the members train on
//! among themselves and end on one model.

use std::path::Path;
use std::time::Duration;

use meshtrain_tests::{results, spawn_node, spec_with_roster, wait_all, wait_listen, NodeProc};

const ROUNDS: u64 = 3;

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
}

fn author(dir: &Path) -> String {
    let out = std::process::Command::new(meshtrain_tests::meshtrain_bin())
        .args(["identity", "show", "--key-only"])
        .arg(dir)
        .output()
        .expect("identity show");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs two members (node-0, node-1) and one other node (node-x, started
/// with `outsider_args`) until both members finish; returns the members.
fn run(tmp: &Path, roster: usize, member_args: &[&str], outsider_args: &[&str]) -> (Vec<NodeProc>, NodeProc) {
    let (spec, store) = spec_with_roster(tmp, roster, &["--rounds", &ROUNDS.to_string(), "--local-steps", "10"]);
    let base = ["--wait-peers", "1", "--drain-s", "5"];
    let store = store.to_str().expect("utf-8 path");
    let a0: Vec<&str> = base
        .iter()
        .chain(member_args)
        .copied()
        .chain(["--data", store])
        .collect();
    let mut members = vec![spawn_node(&tmp.join("node-0"), &spec, "0/2", None, &a0)];
    let boot = wait_listen(&mut members[0], Duration::from_secs(120)).addr;
    let a1: Vec<&str> = base.iter().chain(member_args).copied().collect();
    members.push(spawn_node(&tmp.join("node-1"), &spec, "1/2", Some(&boot), &a1));
    let ax: Vec<&str> = base.iter().chain(outsider_args).copied().collect();
    let outsider = spawn_node(&tmp.join("node-x"), &spec, "1/2", Some(&boot), &ax);
    (members, outsider)
}

fn check_members(members: &mut [NodeProc], outsider: &mut NodeProc) -> String {
    let statuses = wait_all(members, Duration::from_secs(300));
    let _ = outsider.child.kill();
    let _ = outsider.child.wait();
    let other = author(&outsider.dir);
    let reports: Vec<_> = members.iter().map(|m| results(&m.dir)).collect();
    for (i, (s, r)) in statuses.iter().zip(&reports).enumerate() {
        assert!(s.success(), "member {i} failed:\n{}", members[i].log_tail());
        assert_eq!(r.rounds_completed, ROUNDS, "member {i} finished every round");
        assert!(
            !r.merged_by_author.contains_key(&other),
            "member {i} merged an update of the outsider"
        );
        let peer = &reports[1 - i].author;
        assert!(
            r.merged_by_author.get(peer).copied().unwrap_or(0) >= 1,
            "member {i} merged nothing of the other member: {:?}",
            r.merged_by_author
        );
    }
    assert!(
        reports[0].final_test_acc == reports[1].final_test_acc
            && reports[0].final_test_loss == reports[1].final_test_loss,
        "the members did not end on one model"
    );
    other
}

#[test]
fn a_key_off_the_roster_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The roster admits node-0 and node-1; node-x has a key of its own.
    let (mut members, mut outsider) = run(tmp.path(), 2, &[], &[]);
    check_members(&mut members, &mut outsider);
    let refused = members
        .iter()
        .any(|m| log(&m.dir).contains("refusing a connection from a peer that is not a member of this run"));
    assert!(
        refused,
        "no member logged refusing the outsider:\n{}",
        members[0].log_tail()
    );
}

#[test]
fn a_node_without_the_network_key_cannot_connect() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let key = tmp.path().join("swarm.key");
    std::fs::write(
        &key,
        "/key/swarm/psk/1.0.0/\n/base16/\n0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n",
    )
    .expect("write the network key");
    let key = key.to_str().expect("utf-8 path").to_string();
    // All three are on the roster, node-x with node-2's identity: only the
    // key keeps it out.
    let (mut members, mut outsider) = {
        let with_key = ["--psk-file", key.as_str()];
        std::fs::create_dir_all(tmp.path().join("node-x")).expect("dir");
        let roster_dirs: Vec<_> = (0..3).map(|i| tmp.path().join(format!("node-{i}"))).collect();
        meshtrain_tests::roster(tmp.path(), &roster_dirs);
        std::fs::copy(
            tmp.path().join("node-2").join("identity.key"),
            tmp.path().join("node-x").join("identity.key"),
        )
        .expect("copy node-2's identity");
        run(tmp.path(), 3, &with_key, &[])
    };
    check_members(&mut members, &mut outsider);
    let text = log(&outsider.dir);
    assert!(
        !text.contains("peer joined the run"),
        "the node without the key joined:\n{}",
        outsider.log_tail()
    );
    let outsider_peer = short_peer(&outsider.dir);
    for m in &members {
        let joined = log(&m.dir)
            .lines()
            .any(|l| l.contains("peer joined the run") && l.contains(&outsider_peer));
        assert!(!joined, "a member let the node without the key join");
    }
}

/// The last 8 characters of the peer id in DIR/listen.json (as logs show it).
fn short_peer(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("listen.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let id = v["peer_id"].as_str().unwrap_or("-none-").to_string();
    id[id.len().saturating_sub(8)..].to_string()
}
