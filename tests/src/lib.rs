//! Helpers for the end-to-end tests: they run the real `meshtrain` binary as
//! separate processes on loopback, as an operator would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use meshtrain_ledger::audit::AuditReport;
use meshtrain_testnet::report::NodeReport;

pub mod hostile;

/// The checkout the tests were built from (scripts/, .venv, README.md).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the repository")
        .to_path_buf()
}

/// The `meshtrain` binary: `$MESHTRAIN_BIN`, or next to the test executable.
pub fn meshtrain_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MESHTRAIN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/meshtrain
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("meshtrain"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/setup.sh --tests first",
        bin.display()
    );
    bin
}

/// `meshtrain data import ARGS --out DIR/dataset`, as an operator seeding
/// a mesh would; returns the store.
pub fn import(dir: &Path, args: &[&str]) -> PathBuf {
    let store = dir.join("dataset");
    let out = Command::new(meshtrain_bin())
        .args(["data", "import"])
        .args(args)
        .arg("--out")
        .arg(&store)
        .output()
        .expect("run meshtrain data import");
    assert!(
        out.status.success(),
        "data import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    store
}

/// Imports Fashion-MNIST into DIR/dataset (1 MiB blocks).
pub fn import_fashion_mnist(dir: &Path) -> PathBuf {
    import(
        dir,
        &[
            "--format",
            "idx",
            "/usr/share/datasets/fashion-mnist",
            "--name",
            "fashion-mnist",
            "--block-size",
            "1048576",
        ],
    )
}

/// `meshtrain spec new ARGS --data STORE --out DIR/run.toml`.
pub fn spec_for(dir: &Path, store: &Path, args: &[&str]) -> PathBuf {
    let path = dir.join("run.toml");
    let out = spec_new_cmd(store, args)
        .arg("--out")
        .arg(&path)
        .output()
        .expect("run meshtrain spec new");
    assert!(
        out.status.success(),
        "spec new failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// `meshtrain spec new ARGS --data STORE`, which must be refused: its
/// error output.
pub fn spec_refused(store: &Path, args: &[&str]) -> String {
    let out = spec_new_cmd(store, args).output().expect("run meshtrain spec new");
    assert!(!out.status.success(), "spec new {args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn spec_new_cmd(store: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(meshtrain_bin());
    cmd.args(["spec", "new"]).args(args).arg("--data").arg(store);
    cmd
}

/// Makes the keys of the nodes that will run in DIRS (`meshtrain identity
/// show`, which creates a key where none is) and writes their author keys to
/// DIR/members.txt: a permissioned run's roster, for `spec new --members`.
pub fn roster(dir: &Path, node_dirs: &[PathBuf]) -> PathBuf {
    let mut keys = String::new();
    for d in node_dirs {
        let out = Command::new(meshtrain_bin())
            .args(["identity", "show", "--key-only"])
            .arg(d)
            .output()
            .expect("run meshtrain identity show");
        assert!(
            out.status.success(),
            "identity show: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        keys.push_str(String::from_utf8_lossy(&out.stdout).trim());
        keys.push('\n');
    }
    let path = dir.join("members.txt");
    std::fs::write(&path, keys).expect("write the roster");
    path
}

/// A permissioned run spec over a freshly imported Fashion-MNIST store,
/// admitting the nodes of DIR/node-0 .. DIR/node-{N-1}.
pub fn spec_with_roster(dir: &Path, nodes: usize, args: &[&str]) -> (PathBuf, PathBuf) {
    spec_keyed(dir, nodes, "--members", roster, args)
}

/// An open run spec over a freshly imported Fashion-MNIST store, founded by
/// the nodes of DIR/node-0 .. DIR/node-{FOUNDERS-1} (their keys are made
/// now); other nodes earn their votes.
pub fn spec_founded(dir: &Path, founders: usize, args: &[&str]) -> (PathBuf, PathBuf) {
    spec_keyed(dir, founders, "--founders", founders_file, args)
}

/// `spec_new` with FLAG naming the file KEYS writes of the first N nodes'
/// keys.
fn spec_keyed(
    dir: &Path,
    n: usize,
    flag: &str,
    keys: fn(&Path, &[PathBuf]) -> PathBuf,
    args: &[&str],
) -> (PathBuf, PathBuf) {
    let dirs: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("node-{i}"))).collect();
    let file = keys(dir, &dirs);
    let file = file.to_str().expect("utf-8 path").to_string();
    let args: Vec<&str> = args.iter().copied().chain([flag, file.as_str()]).collect();
    spec_new(dir, &args)
}

/// The keys of the nodes that will run in DIRS, written to
/// DIR/founders.txt for `spec new --founders`.
pub fn founders_file(dir: &Path, node_dirs: &[PathBuf]) -> PathBuf {
    let members = roster(dir, node_dirs);
    let path = dir.join("founders.txt");
    std::fs::rename(&members, &path).expect("name the founders file");
    path
}

/// A run spec over a freshly imported Fashion-MNIST store: returns the spec
/// and the store (which node 0 should seed with `--data`). ARGS must say who
/// takes part (`--members` or `--founders`; see [`spec_founded`]).
pub fn spec_new(dir: &Path, args: &[&str]) -> (PathBuf, PathBuf) {
    let store = import_fashion_mnist(dir);
    (spec_for(dir, &store, args), store)
}

pub struct NodeProc {
    pub dir: PathBuf,
    /// Where its stdout and stderr go (DIR/node.log unless moved off a
    /// data dir that may fill).
    pub log: PathBuf,
    pub child: Child,
}

impl NodeProc {
    /// The last lines of this node's own log, wherever it goes.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log)
    }
}

/// Starts `meshtrain node run` with its log in DIR/node.log, on one
/// libtorch thread unless EXTRA says otherwise (tests run several nodes, and
/// several tests, on one machine).
pub fn spawn_node(dir: &Path, spec: &Path, shard: &str, bootstrap: Option<&str>, extra: &[&str]) -> NodeProc {
    let log = dir.join("node.log");
    keep_log(dir, &log);
    spawn_node_logging_to(dir, &log, spec, shard, bootstrap, extra)
}

/// With `MESHTRAIN_TEST_LOGS=DIR` set, a node's log is written in DIR
/// (named by its temp dir and node dir; a restart's gets a number) and
/// LOG links to it, so that it outlives the test's temp dir: a test that
/// fails one run in ten leaves every node's whole log behind.
fn keep_log(dir: &Path, log: &Path) {
    let Some(keep) = std::env::var_os("MESHTRAIN_TEST_LOGS").map(PathBuf::from) else {
        return;
    };
    std::fs::create_dir_all(&keep).expect("MESHTRAIN_TEST_LOGS dir");
    std::fs::create_dir_all(dir).expect("node dir");
    let name: Vec<String> = dir
        .components()
        .rev()
        .take(2)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let name: Vec<&str> = name.iter().rev().map(|n| n.trim_start_matches('.')).collect();
    let name = name.join("-");
    let kept = (0..)
        .map(|n| {
            keep.join(if n == 0 {
                format!("{name}.log")
            } else {
                format!("{name}-{n}.log")
            })
        })
        .find(|p| !p.exists())
        .expect("a free log name");
    std::fs::write(&kept, b"").expect("kept log");
    let _ = std::fs::remove_file(log);
    std::os::unix::fs::symlink(&kept, log).expect("link the kept log");
}

/// [`spawn_node`] with its log in LOG (kept off a data dir that may fill).
pub fn spawn_node_logging_to(
    dir: &Path,
    log: &Path,
    spec: &Path,
    shard: &str,
    bootstrap: Option<&str>,
    extra: &[&str],
) -> NodeProc {
    std::fs::create_dir_all(dir).expect("node dir");
    let log_path = log.to_path_buf();
    let log = std::fs::File::create(log).expect("log file");
    let mut cmd = Command::new(meshtrain_bin());
    cmd.args(["node", "run", "--listen", "/ip4/127.0.0.1/tcp/0", "--shard", shard])
        .arg("--data-dir")
        .arg(dir)
        .arg("--run")
        .arg(spec)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    if !extra.contains(&"--threads") {
        cmd.args(["--threads", "1"]);
    }
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    NodeProc {
        dir: dir.to_path_buf(),
        log: log_path,
        child: cmd.spawn().expect("spawn node"),
    }
}

/// What a node writes to DIR/listen.json once it listens.
pub struct ListenInfo {
    pub peer_id: String,
    pub run_id: String,
    pub addr: String,
}

pub fn wait_listen(node: &mut NodeProc, within: Duration) -> ListenInfo {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(text) = std::fs::read_to_string(node.dir.join("listen.json")) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(addr) = v["addrs"][0].as_str() {
                    return ListenInfo {
                        peer_id: v["peer_id"].as_str().unwrap_or_default().to_string(),
                        run_id: v["run_id"].as_str().unwrap_or_default().to_string(),
                        addr: addr.to_string(),
                    };
                }
            }
        }
        if let Ok(Some(s)) = node.child.try_wait() {
            panic!("node exited early ({s}):\n{}", node.log_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("node did not listen within {within:?}:\n{}", node.log_tail());
}

pub fn log_tail(dir: &Path) -> String {
    file_tail(&dir.join("node.log"))
}

/// The last 30 lines of the file at PATH (empty if unreadable).
pub fn file_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Waits for every node to exit; kills them all and panics on timeout.
pub fn wait_all(nodes: &mut [NodeProc], within: Duration) -> Vec<ExitStatus> {
    let start = Instant::now();
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; nodes.len()];
    while statuses.iter().any(Option::is_none) {
        for (n, s) in nodes.iter_mut().zip(statuses.iter_mut()) {
            if s.is_none() {
                *s = n.child.try_wait().expect("wait");
            }
        }
        if start.elapsed() > within {
            for n in nodes.iter_mut() {
                let _ = n.child.kill();
            }
            let logs: Vec<String> = nodes.iter().map(NodeProc::log_tail).collect();
            panic!("nodes still running after {within:?}:\n{}", logs.join("\n----\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    statuses.into_iter().map(|s| s.expect("status")).collect()
}

pub fn results(dir: &Path) -> NodeReport {
    let bytes =
        std::fs::read(dir.join("results.json")).unwrap_or_else(|e| panic!("{}: {e}\n{}", dir.display(), log_tail(dir)));
    serde_json::from_slice(&bytes).expect("results.json parses")
}

/// `meshtrain ledger audit DIR --json`, with its exit status.
pub fn audit(dir: &Path) -> (AuditReport, ExitStatus) {
    let out = Command::new(meshtrain_bin())
        .args(["ledger", "audit", "--json"])
        .arg(dir)
        .output()
        .expect("run ledger audit");
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("audit output: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    (report, out.status)
}

/// The round a node reports in DIR/progress.json (0 before its first).
pub fn progress_round(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("progress.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["round"].as_u64())
        .unwrap_or(0)
}

/// Waits until the node in DIR has reached ROUND (panics after 3 minutes).
pub fn wait_round(dir: &Path, round: u64) {
    let start = Instant::now();
    while progress_round(dir) < round {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "never reached round {round}:\n{}",
            log_tail(dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for every node to exit, then checks each exited 0, audits clean
/// and holds no equivocation proof.
pub fn wait_all_clean(nodes: &mut [NodeProc], within: Duration) {
    let statuses = wait_all(nodes, within);
    for (i, s) in statuses.iter().enumerate() {
        assert!(s.success(), "node {i} failed ({s}):\n{}", nodes[i].log_tail());
        let (report, status) = audit(&nodes[i].dir);
        assert!(status.success() && report.ok, "node {i} audit: {:?}", report.problems);
        assert_eq!(report.proofs, 0, "node {i} holds an equivocation proof");
    }
}

/// `meshtrain ledger compare A B`: whether it passed, and what it printed.
pub fn ledger_compare(a: &Path, b: &Path) -> (bool, String) {
    let out = Command::new(meshtrain_bin())
        .args(["ledger", "compare"])
        .arg(a)
        .arg(b)
        .output()
        .expect("run ledger compare");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ledger export DIR`, one JSON value a line.
pub fn export(dir: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(meshtrain_bin())
        .args(["ledger", "export"])
        .arg(dir)
        .output()
        .expect("run ledger export");
    assert!(
        out.status.success(),
        "export {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("export line is JSON"))
        .collect()
}

/// `ledger export DIR`: AUTHOR's records, seq -> record hash (a seq listed
/// twice fails the test).
pub fn chain_of(dir: &Path, author: &str) -> std::collections::BTreeMap<u64, String> {
    let mut chain = std::collections::BTreeMap::new();
    for v in export(dir) {
        if v["type"] == "record" && v["record"]["author"] == author {
            let seq = v["record"]["seq"].as_u64().expect("seq");
            let hash = v["hash"].as_str().expect("hash").to_string();
            assert!(chain.insert(seq, hash).is_none(), "seq {seq} listed twice");
        }
    }
    chain
}

/// `ledger export DIR`: the verdicts DIR's node recorded on AUTHOR's
/// updates, as exported (`{"verdict": "probation", "factor": 0.0}`, ...).
pub fn verdicts_on(dir: &Path, author: &str) -> Vec<serde_json::Value> {
    let mut verdicts = Vec::new();
    for v in export(dir).iter().filter(|v| v["type"] == "verdict") {
        let entries = v["block"]["entries"]
            .as_array()
            .expect("a verdict block lists its entries");
        verdicts.extend(
            entries
                .iter()
                .filter(|e| e["author"] == author)
                .map(|e| e["verdict"].clone()),
        );
    }
    verdicts
}

/// Whether an exported verdict refused the update (or cut it): rejected,
/// clipped, or on probation below full weight.
pub fn refused(verdict: &serde_json::Value) -> bool {
    match verdict["verdict"].as_str() {
        Some("rejected" | "clipped") => true,
        Some("probation") => verdict["factor"].as_f64().is_some_and(|f| f < 1.0),
        _ => false,
    }
}

/// The author id (hex) of the node in DIR, from the listen.json it wrote.
pub fn author_of(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("listen.json")).expect("listen.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("listen.json parses");
    v["author"].as_str().expect("listen.json names the author").to_string()
}
