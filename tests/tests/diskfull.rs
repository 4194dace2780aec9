//! A full disk mid-run. Node 2 of a 3-node mesh keeps its data dir on a
//! small tmpfs (mounted here: the suite runs as root, as CI does) that is
//! filled to the last byte while it trains, and kept full. It must stop
//! with one error naming what it could not write, leave no half-written file, keep a
//! ledger that audits clean, and, once space is back, restart from that
//! ledger, continue its chain and end on the mesh's model.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use meshtrain_tests::{
    audit, author_of, chain_of, file_tail, ledger_compare, results, spawn_node, spawn_node_logging_to,
    spec_with_roster, wait_all_clean, wait_listen, wait_round,
};

const ROUNDS: u64 = 80;

/// A tmpfs mounted for the test, unmounted however the test ends.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} (the suite runs as root): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Appends zeros to PATH until the filesystem has no byte left.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("filler file");
    let chunk = vec![0u8; 64 << 10];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // The last partial page too, byte by byte at most one chunk long.
    while f.write(&[0u8]).is_ok_and(|n| n == 1) {
        written += 1;
    }
    written
}

/// Every file under DIR whose name ends in `.tmp` (a half-written file).
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".tmp") {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn a_node_whose_disk_fills_stops_cleanly_and_resumes_once_space_is_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = Tmpfs::mount(&tmp.path().join("disk"), "256m");
    let (spec, store) = spec_with_roster(tmp.path(), 3, &["--rounds", &ROUNDS.to_string(), "--local-steps", "50"]);
    let args = ["--wait-peers", "2", "--drain-s", "20", "--checkpoint-every", "2"];
    let seed_args = [&args[..], &["--data", store.to_str().expect("utf-8 path")]].concat();
    let mut nodes = vec![spawn_node(&tmp.path().join("node-0"), &spec, "0/3", None, &seed_args)];
    let boot = wait_listen(&mut nodes[0], Duration::from_secs(120)).addr;
    nodes.push(spawn_node(&tmp.path().join("node-1"), &spec, "1/3", Some(&boot), &args));
    // Node 2's data dir is the tmpfs's; `roster` made its key in node-2.
    let victim = disk.0.join("node-2");
    std::fs::create_dir_all(&victim).expect("node 2 dir");
    std::fs::copy(
        tmp.path().join("node-2").join("identity.key"),
        victim.join("identity.key"),
    )
    .expect("copy node 2's key onto the tmpfs");
    let log = tmp.path().join("node-2.log");
    let mut n2 = spawn_node_logging_to(&victim, &log, &spec, "2/3", Some(&boot), &args);
    wait_listen(&mut n2, Duration::from_secs(120));
    let author = author_of(&victim);

    // Fill the disk mid-run.
    wait_round(&victim, 3);
    let filler = disk.0.join("filler");
    let mut filled = fill(&filler);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = n2.child.try_wait().expect("wait") {
            break s;
        }
        // Kept full: space RocksDB frees (an old WAL file deleted after a
        // flush) is taken again at once, so the node cannot write its way
        // on through the run on space it happens to free.
        filled += fill(&filler);
        // Its first ledger write that fails stops it: a round at most.
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "node 2 still runs 60 s after its disk filled ({filled} bytes of filler):\n{}",
            file_tail(&log)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!(
        "node 2 stopped {:.1} s after the disk filled ({status}); its last lines:\n{}",
        started.elapsed().as_secs_f64(),
        file_tail(&log)
    );
    assert!(!status.success(), "node 2 exited 0 on a full disk");
    assert!(!text.contains("panicked"), "node 2 panicked:\n{}", file_tail(&log));
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    assert!(
        last.contains("No space left on device") && last.contains(&*victim.to_string_lossy()),
        "node 2's last line does not say the disk is full, and where: {last}"
    );
    assert_eq!(
        leftovers(&victim),
        Vec::<PathBuf>::new(),
        "half-written files left behind"
    );

    // Its ledger is whole (the audit itself runs on the still-full disk).
    let (report, audited) = audit(&victim);
    assert!(
        audited.success() && report.ok,
        "node 2's ledger after the full disk: {:?}",
        report.problems
    );
    let before = chain_of(&victim, &author);
    assert!(
        before.len() >= 3,
        "node 2 signed {} records before the disk filled",
        before.len()
    );

    // Space back: it restarts from its ledger and goes on with the mesh,
    // which must still be running for that.
    for (i, n) in nodes.iter_mut().enumerate() {
        if let Some(s) = n.child.try_wait().expect("wait") {
            panic!(
                "node {i} ended ({s}) before node 2 could rejoin, {:.1} s after the disk filled:\n{}",
                started.elapsed().as_secs_f64(),
                n.log_tail()
            );
        }
    }
    std::fs::remove_file(&filler).expect("free the disk");
    let restart_log = tmp.path().join("node-2.restart.log");
    let mut n2 = spawn_node_logging_to(&victim, &restart_log, &spec, "2/3", Some(&boot), &args);
    wait_listen(&mut n2, Duration::from_secs(120));
    nodes.push(n2);
    wait_all_clean(&mut nodes, Duration::from_secs(400));

    let after = chain_of(&victim, &author);
    for (seq, hash) in &before {
        assert_eq!(
            after.get(seq),
            Some(hash),
            "node 2 lost or rewrote its record at seq {seq}"
        );
    }
    assert!(
        after.len() > before.len(),
        "node 2 signed nothing after its restart: {} records before, {} after\n{}",
        before.len(),
        after.len(),
        file_tail(&restart_log)
    );
    let seqs: Vec<u64> = after.keys().copied().collect();
    assert_eq!(
        seqs,
        (0..seqs.len() as u64).collect::<Vec<_>>(),
        "node 2's chain has gaps"
    );
    let r2 = results(&victim);
    eprintln!(
        "node 2: {} records before the disk filled, {} at the end; {} rounds closed after the restart",
        before.len(),
        after.len(),
        r2.rounds_completed
    );
    assert!(r2.restarted, "node 2 reports its restart");
    for i in [1, 2] {
        let (same, text) = ledger_compare(&nodes[0].dir, &nodes[i].dir);
        assert!(same, "node-0 and node-{i} differ:\n{text}");
    }
    let r0 = results(&nodes[0].dir);
    assert_eq!(
        (r2.final_test_acc, r2.final_test_loss),
        (r0.final_test_acc, r0.final_test_loss),
        "node 2 ends on another model than node 0"
    );
    drop(disk);
}
