//! A node given one bootstrap address finds the whole mesh: the discovery
//! benchmark's trials (real swarms on loopback, the node's own policy) all
//! close into a full mesh. `meshtrain bench discovery` runs 100 of them.

use std::process::Command;

use meshtrain_tests::meshtrain_bin;

#[test]
fn meshes_grown_from_one_bootstrap_address_never_split() {
    let out = Command::new(meshtrain_bin())
        .args([
            "bench",
            "discovery",
            "--trials",
            "10",
            "--nodes",
            "6",
            "--limit-s",
            "30",
            "--json",
        ])
        .output()
        .expect("run meshtrain bench discovery");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bench output: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(report["trials"], 10);
    assert_eq!(report["incomplete"], 0, "some meshes did not close: {report}");
    assert!(out.status.success());
}
