//! Kills a ledger writer with SIGKILL at random points, hundreds of times.
//! Every time, the store must reopen with every chain intact: no half-written
//! record, no head pointing past its record, a sound verdict chain.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use meshtrain_ledger::{audit, Ledger};
use rand::Rng;

fn writer() -> PathBuf {
    // target/<profile>/deps/crash-<hash> -> target/<profile>/examples/ledger_writer
    let exe = std::env::current_exe().expect("test path");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("examples").join("ledger_writer"))
        .expect("target dir");
    assert!(bin.exists(), "{} not built (cargo test builds examples)", bin.display());
    bin
}

#[test]
fn sigkill_never_breaks_a_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger");
    let bin = writer();
    let mut rng = rand::rng();
    let mut last_records = 0;
    let kills = 200;
    // Kills in a row that found no new record: on a loaded machine the
    // writer may not get past opening the store within the usual window,
    // so the window widens until it makes progress again.
    let mut stalls = 0u32;
    for i in 0..kills {
        let mut cmd = Command::new(&bin);
        cmd.arg(&path).stdout(Stdio::null()).stderr(Stdio::null());
        if i % 2 == 1 {
            cmd.arg("--sync");
        }
        let mut child = cmd.spawn().expect("spawn writer");
        // The first kills land early, inside store creation too.
        let max_ms: u64 = (if i < 20 { 12 } else { 60 }) << (stalls / 2).min(6);
        std::thread::sleep(Duration::from_millis(rng.random_range(1..max_ms)));
        child.kill().expect("SIGKILL");
        let _ = child.wait();

        if !path.join("CURRENT").exists() {
            stalls += 1;
            continue; // killed before RocksDB created the store
        }
        let ledger = match Ledger::open_read_only(&path) {
            Ok(l) => l,
            // Killed while RocksDB was creating the store, before any meta
            // was written: nothing was lost, and the next writer finishes it.
            Err(meshtrain_ledger::LedgerError::NotALedger { .. }) if last_records == 0 => {
                stalls += 1;
                continue;
            }
            Err(e) => panic!("kill {i}: the store does not reopen: {e}"),
        };
        let report = audit::audit(&ledger).expect("audit runs");
        assert!(report.ok, "kill {i}: {:?}", report.problems);
        assert!(report.records >= last_records, "kill {i}: records were lost");
        stalls = if report.records == last_records { stalls + 1 } else { 0 };
        last_records = report.records;
    }
    eprintln!("{kills} SIGKILLs, {last_records} records survived, every audit clean");
    assert!(
        last_records > 200,
        "the writer made too little progress to test anything ({last_records})"
    );
}
