//! `testnet run --hosts netns`: every node in its own network namespace,
//! with its own address and a tbf-shaped link, finding the others through
//! one bootstrap address and Kademlia; links cut into groups and healed;
//! and nothing left behind, whether the run ends, is interrupted, or is
//! killed (the next run sweeps what a killed one left).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshtrain_testnet::report::Summary;
use meshtrain_tests::meshtrain_bin;

fn namespaces_of(pid: u32) -> Vec<String> {
    meshtrain_testnet::netns::leftover_namespaces(pid)
}

fn testnet(out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(meshtrain_bin());
    c.args(["testnet", "run", "--hosts", "netns", "--out"])
        .arg(out)
        .args(extra)
        .stdin(Stdio::null());
    c
}

#[test]
fn nodes_on_their_own_hosts_train_through_shaped_and_cut_links() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("net");
    let child = testnet(
        &out,
        &[
            "--nodes",
            "4",
            "--rounds",
            "10",
            "--link",
            "1gbit",
            "--slow",
            "3:100mbit",
            "--codec",
            "topk-int8:0.01",
            "--cut",
            "3:2:2",
            "--target-acc",
            "0.5",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start the testnet");
    let pid = child.id();
    let run = child.wait_with_output().expect("run the testnet");
    let text = String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "testnet failed:\n{text}");
    let summary: Summary =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary.json")).expect("summary");
    assert_eq!(summary.hosts, "netns");
    assert_eq!(summary.audit_failures, 0, "{text}");
    let addrs: Vec<String> = summary.nodes.iter().filter_map(|n| n.host_addr.clone()).collect();
    assert_eq!(addrs, ["10.99.0.1", "10.99.0.2", "10.99.0.3", "10.99.0.4"]);
    let links: Vec<Option<String>> = summary.nodes.iter().map(|n| n.link.clone()).collect();
    assert_eq!(
        links,
        [
            Some("1gbit".into()),
            Some("1gbit".into()),
            Some("1gbit".into()),
            Some("100mbit".into())
        ]
    );
    // Nodes listened on their own addresses, never on loopback.
    for i in 0..4 {
        let listen = std::fs::read_to_string(out.join(format!("node-{i}/listen.json"))).expect("listen.json");
        assert!(listen.contains(&format!("/ip4/10.99.0.{}/tcp/4001", i + 1)), "{listen}");
        assert!(!listen.contains("127.0.0.1"), "{listen}");
    }
    let log = std::fs::read_to_string(out.join("node-0/node.log")).unwrap_or_default();
    assert!(summary.rounds >= 10, "{text}");
    let short: Vec<usize> = (0..summary.nodes.len())
        .filter(|&i| summary.nodes[i].rounds_completed < 10)
        .collect();
    assert!(
        short.is_empty(),
        "every node trained every round; these did not: {}\n{text}",
        short
            .iter()
            .map(|&i| format!("\nnode-{i}:\n{}", round_story(&out.join(format!("node-{i}/node.log")))))
            .collect::<String>()
    );
    // Every honest node ended on the same anchor after the cut healed.
    let finals: std::collections::BTreeSet<_> = summary.nodes.iter().map(|n| n.final_anchor.clone()).collect();
    assert_eq!(finals.len(), 1, "final anchors {finals:?}\n{text}\nnode-0:\n{log}");
    assert!(summary.honest_min_acc > 0.5, "{text}");
    assert!(summary.time_to_target_s.is_some(), "{text}");
    assert!(text.contains("links cut") && text.contains("links healed"), "{text}");
    assert!(summary.bytes_sent_per_node_round > 0.0);
    assert!(
        namespaces_of(pid).is_empty(),
        "the run removed its namespaces: {:?}",
        namespaces_of(pid)
    );
}

/// How a node's rounds went (what a lag is made of): the log lines that
/// close, give up, skip or repair a round, and what the links did.
fn round_story(log: &Path) -> String {
    const EVENTS: [&str; 10] = [
        "round closed",
        "round deadline passed",
        "skipping to its round",
        "going back to the last decided one",
        "fetching its anchor",
        "fetched the decided anchor",
        "did not arrive in time",
        "starting to train",
        "deny",
        "cut off",
    ];
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| EVENTS.iter().any(|e| l.contains(e)))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn an_interrupted_or_killed_run_leaves_no_namespace_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let wait_listening = |out: &Path, child: &mut std::process::Child| {
        let start = Instant::now();
        while !out.join("node-1/listen.json").exists() {
            assert!(start.elapsed() < Duration::from_secs(180), "nodes never listened");
            if let Ok(Some(s)) = child.try_wait() {
                panic!("testnet ended early: {s}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // Ctrl-C: the run stops its nodes and removes its namespaces.
    let out = tmp.path().join("int");
    let mut child = testnet(&out, &["--nodes", "2", "--rounds", "500"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    wait_listening(&out, &mut child);
    let pid = child.id();
    assert_eq!(namespaces_of(pid).len(), 3, "two hosts and the switch");
    let sent = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let output = child.wait_with_output().expect("wait");
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("interrupted"), "{err}");
    assert!(namespaces_of(pid).is_empty(), "{:?}", namespaces_of(pid));

    // SIGKILL: nothing can clean up, so the next run sweeps it.
    let out = tmp.path().join("kill");
    let mut child = testnet(&out, &["--nodes", "2", "--rounds", "500"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    wait_listening(&out, &mut child);
    let pid = child.id();
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert_eq!(namespaces_of(pid).len(), 3, "a killed run cannot clean up");
    let next = testnet(&tmp.path().join("next"), &["--nodes", "2", "--rounds", "1"])
        .output()
        .expect("next run");
    assert!(next.status.success(), "{}", String::from_utf8_lossy(&next.stderr));
    assert!(
        namespaces_of(pid).is_empty(),
        "the next run swept {:?}",
        namespaces_of(pid)
    );
}
