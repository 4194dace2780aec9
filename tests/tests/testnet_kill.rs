//! A testnet's node processes die with it: SIGKILL the `testnet run`
//! process (which can clean nothing up) and no node it started is left
//! running.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshtrain_tests::meshtrain_bin;

/// Pids of live processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // A zombie has exited; only its parent's wait is missing.
            let zombie = state
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'));
            !zombie && String::from_utf8_lossy(&cmd).contains(needle)
        })
        .collect()
}

fn nodes_listening(out: &Path, n: usize) -> bool {
    (0..n).all(|i| out.join(format!("node-{i}/listen.json")).exists())
}

#[test]
fn sigkilled_testnet_leaves_no_node_running() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("net");
    let mut testnet = Command::new(meshtrain_bin())
        .args(["testnet", "run", "--nodes", "3", "--rounds", "500", "--out"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start testnet run");
    let start = Instant::now();
    while !nodes_listening(&out, 3) {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the testnet's nodes did not all listen within 180 s"
        );
        if let Ok(Some(s)) = testnet.try_wait() {
            panic!("testnet run ended early: {s}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let needle = out.to_string_lossy().to_string();
    // The testnet's own command line names the out dir too.
    let nodes: Vec<u32> = processes_mentioning(&needle)
        .into_iter()
        .filter(|p| *p != testnet.id())
        .collect();
    assert_eq!(nodes.len(), 3, "three node processes run under {needle}: {nodes:?}");

    testnet.kill().expect("SIGKILL the testnet");
    testnet.wait().expect("reap the testnet");
    let killed = Instant::now();
    loop {
        let left = processes_mentioning(&needle);
        if left.is_empty() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "node processes {left:?} still run 10 s after their testnet was killed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
