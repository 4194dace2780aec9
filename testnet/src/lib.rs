//! Local testnets: starts N real `meshtrain node run` processes on loopback,
//! each with its own data dir and shard (some of them attackers, if asked),
//! waits for them, audits every ledger (as `meshtrain ledger audit` does, in
//! this process and all at once), and writes `summary.json` and a table.
//!
//! It drives the node binary from outside, as an operator would, and shares
//! only the report schema ([`report`]) with the node.
//!
//! Main types: [`TestnetOptions`], [`report::Summary`], [`report::NodeReport`].

pub mod dashboard;
pub mod html;
pub mod matrix;
pub mod netns;
pub mod plot;
pub mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshtrain_ledger::audit::AuditReport;
use meshtrain_ledger::{AuthorId, Ledger, RecordHash, Seq, WeightsHash};
use report::{NodeReport, NodeSummary, Summary, STAGES};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum TestnetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`meshtrain spec new` failed: {0}")]
    Spec(String),
    #[error("node {index} exited before it listened (status {status}); its log ends:\n{log_tail}")]
    EarlyExit {
        index: usize,
        status: String,
        log_tail: String,
    },
    #[error("node {index} stopped before it closed a round (status {status}); the testnet stopped the others; its log ends:\n{log_tail}")]
    FailedBeforeTraining {
        index: usize,
        status: String,
        log_tail: String,
    },
    #[error("node {index} did not report its listen address within {secs} s")]
    NoListenAddr { index: usize, secs: u64 },
    #[error("the testnet ran past its {0} s timeout; nodes were stopped")]
    Timeout(u64),
    #[error("{path}: {detail}")]
    BadReport { path: PathBuf, detail: String },
    #[error("network namespaces: {0}")]
    Netns(String),
    #[error("interrupted; nodes stopped and namespaces removed")]
    Interrupted,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct TestnetOptions {
    /// The `meshtrain` binary.
    pub binary: PathBuf,
    pub nodes: usize,
    pub rounds: Option<u64>,
    /// Passes over the training set, summed over nodes (used when `rounds` is None).
    pub epochs: Option<f64>,
    pub model: String,
    pub out: PathBuf,
    pub local_steps: usize,
    pub codec: String,
    pub aggregator: String,
    /// The last `byzantine` nodes attack: `attack` names one mode, or
    /// several separated by commas, given to the attackers in turn.
    pub byzantine: usize,
    pub attack: Option<String>,
    pub seed: u64,
    /// A block store holding the dataset; by default Fashion-MNIST is
    /// imported into `out/dataset`. Node 0 starts with this store (the seed);
    /// every other node starts empty and fetches its shard from peers.
    pub data: Option<PathBuf>,
    /// `iid` or `dirichlet:ALPHA`.
    pub partition: String,
    pub replication: usize,
    pub timeout: Duration,
    /// Further `meshtrain spec new` flags (learning rates, batch size, ...).
    pub spec_args: Vec<String>,
    /// Further `meshtrain node run` flags, for every node.
    pub node_args: Vec<String>,
    /// Kill a random node every `.0` seconds and restart it `.1` seconds
    /// later (from its data dir), for the whole run.
    pub churn: Option<(u64, u64)>,
    /// Nodes that join once the mesh is a third of the way through.
    pub late_join: usize,
    /// Serve the report live at http://ADDR/ while the run goes on.
    pub dashboard: Option<std::net::SocketAddr>,
    /// `permissioned`: the run admits exactly the testnet's nodes (their
    /// keys are made first and written to `out/members.txt`); `open`:
    /// anyone, influence earned.
    pub admission: String,
    /// Where the nodes run: all on loopback, or each in its own network
    /// namespace behind a shaped link.
    pub hosts: Hosts,
    /// Netns: every node's link rate (unshaped when None).
    pub link: Option<netns::Rate>,
    /// Netns: some nodes' links at another rate.
    pub slow: Vec<(usize, netns::Rate)>,
    /// Netns: a partition by re-wiring links.
    pub cut: Option<netns::Cut>,
    /// The summary says when every honest node first reached this test
    /// accuracy.
    pub target_acc: Option<f32>,
    /// libtorch threads per node (None: the machine's cores divided among
    /// the nodes, at least one each).
    pub threads: Option<usize>,
}

/// Where a testnet's nodes run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Hosts {
    /// One host: every node on 127.0.0.1.
    #[default]
    Loopback,
    /// A network namespace, address and shaped link per node
    /// ([`netns`]).
    Netns,
}

impl std::str::FromStr for Hosts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "loopback" => Ok(Hosts::Loopback),
            "netns" => Ok(Hosts::Netns),
            _ => Err(format!("--hosts `{s}`: loopback or netns")),
        }
    }
}

impl std::fmt::Display for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hosts::Loopback => "loopback",
            Hosts::Netns => "netns",
        })
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TestnetError + '_ {
    move |source| TestnetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

struct Running {
    index: usize,
    dir: PathBuf,
    child: Child,
    attack: Option<String>,
    status: Option<std::process::ExitStatus>,
}

/// How long attackers may outlive the honest nodes before the testnet
/// stops them.
const ATTACKER_GRACE: Duration = Duration::from_secs(5);

const FASHION_MNIST_IDX: &str = "/usr/share/datasets/fashion-mnist";

/// The block store the testnet seeds: the one given, or Fashion-MNIST
/// imported into `out/dataset` (label-sorted for Dirichlet partitions, so
/// that blocks are label-skewed).
fn dataset_store(opts: &TestnetOptions) -> Result<PathBuf, TestnetError> {
    if let Some(d) = &opts.data {
        return Ok(d.clone());
    }
    let sorted = opts.partition.starts_with("dirichlet");
    let store = opts.out.join(if sorted { "dataset-sorted" } else { "dataset" });
    if store
        .join("manifests")
        .read_dir()
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
    {
        return Ok(store);
    }
    let mut cmd = Command::new(&opts.binary);
    cmd.args([
        "data",
        "import",
        "--format",
        "idx",
        FASHION_MNIST_IDX,
        "--name",
        "fashion-mnist",
    ])
    .arg("--out")
    .arg(&store)
    // Small blocks, so that a handful of nodes has blocks to spread.
    .args(["--block-size", if sorted { "131072" } else { "1048576" }]);
    if sorted {
        cmd.arg("--sort-by-label");
    }
    let out = cmd.output().map_err(|source| TestnetError::Spawn {
        what: "meshtrain data import".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(TestnetError::Spec(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    Ok(store)
}

/// Makes every node's key (in its data dir, where the node will find it)
/// and writes their author keys to `out/members.txt`: a permissioned run's
/// roster (every node), or an open run's founders (the nodes that start it;
/// late joiners earn their votes).
fn write_roster(opts: &TestnetOptions) -> Result<PathBuf, TestnetError> {
    let mut keys = String::new();
    let listed = if opts.admission == "open" {
        opts.nodes
    } else {
        opts.nodes + opts.late_join
    };
    for i in 0..listed {
        let dir = opts.out.join(format!("node-{i}"));
        let out = Command::new(&opts.binary)
            .args(["identity", "show", "--key-only"])
            .arg(&dir)
            .output()
            .map_err(|source| TestnetError::Spawn {
                what: "meshtrain identity show".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(TestnetError::Spec(format!(
                "identity of node {i}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        keys.push_str(&format!(
            "{}  # node-{i}\n",
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    let path = opts.out.join("members.txt");
    std::fs::write(&path, keys).map_err(io_err(&path))?;
    Ok(path)
}

/// Writes the run spec by asking the binary (which reads the manifest).
fn write_spec(opts: &TestnetOptions, store: &Path, path: &Path, roster: &Path) -> Result<(), TestnetError> {
    let mut cmd = Command::new(&opts.binary);
    cmd.args(["spec", "new", "--model", &opts.model])
        .arg("--data")
        .arg(store)
        .args(["--partition", &opts.partition])
        .args(["--replication", &opts.replication.to_string()])
        .args(["--local-steps", &opts.local_steps.to_string()])
        .args(["--codec", &opts.codec, "--aggregator", &opts.aggregator])
        .args(["--seed", &opts.seed.to_string()])
        .args(&opts.spec_args)
        .arg("--out")
        .arg(path);
    if opts.admission == "open" {
        cmd.args(["--admission", "open", "--founders"]).arg(roster);
    } else {
        cmd.arg("--members").arg(roster);
    }
    match (opts.rounds, opts.epochs) {
        (Some(r), _) => {
            cmd.args(["--rounds", &r.to_string()]);
        }
        (None, Some(e)) => {
            cmd.args(["--epochs", &e.to_string(), "--nodes", &opts.nodes.to_string()]);
        }
        (None, None) => {}
    }
    let out = cmd.output().map_err(|source| TestnetError::Spawn {
        what: "meshtrain spec new".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(TestnetError::Spec(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    Ok(())
}

/// The attack node `index` of `nodes` runs: the last `byzantine` take the
/// modes of the comma-separated `attack` in turn.
pub fn attack_of(nodes: usize, byzantine: usize, attack: Option<&str>, index: usize) -> Option<String> {
    let k = index.checked_sub(nodes.checked_sub(byzantine)?)?;
    let modes: Vec<&str> = attack?.split(',').filter(|m| !m.is_empty()).collect();
    (!modes.is_empty()).then(|| modes[k % modes.len()].to_string())
}

fn spawn_node(
    opts: &TestnetOptions,
    index: usize,
    spec: &Path,
    bootstrap: &[String],
    seed_store: Option<&Path>,
    wait_peers: usize,
    net: Option<&netns::Net>,
) -> Result<Running, TestnetError> {
    let dir = opts.out.join(format!("node-{index}"));
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let log_path = dir.join("node.log");
    // Appended to: a restarted node keeps one log.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err(&log_path))?;
    let log2 = log.try_clone().map_err(io_err(&log_path))?;
    let attack = attack_of(opts.nodes, opts.byzantine, opts.attack.as_deref(), index);
    let (mut cmd, listen) = match net.and_then(|n| Some((n.hosts.get(index)?, n.listen_addr(index)?))) {
        Some((host, listen)) => {
            // `ip netns exec` execs the node in place: same pid, and the
            // parent-death signal set below survives the exec.
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &host.ns]).arg(&opts.binary);
            (c, listen)
        }
        None => (Command::new(&opts.binary), "/ip4/127.0.0.1/tcp/0".to_string()),
    };
    cmd.args(["node", "run", "--listen", &listen])
        .arg("--data-dir")
        .arg(&dir)
        .arg("--run")
        .arg(spec)
        .args(["--shard", &format!("{index}/{}", opts.nodes + opts.late_join)])
        .args(["--wait-peers", &wait_peers.to_string()])
        .args(["--wait-peers-timeout-s", "60"])
        .args(["--drain-s", "30"])
        .args(["--threads", &node_threads(opts).to_string()])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    for b in bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    if let Some(a) = &attack {
        cmd.args(["--attack", a]);
    }
    cmd.args(&opts.node_args);
    if let Some(store) = seed_store {
        cmd.arg("--data").arg(store);
    }
    die_with_parent(&mut cmd);
    let child = cmd.spawn().map_err(|source| TestnetError::Spawn {
        what: format!("node {index}"),
        source,
    })?;
    Ok(Running {
        index,
        dir,
        child,
        attack,
        status: None,
    })
}

/// libtorch threads for each node: the nodes share the machine's cores.
fn node_threads(opts: &TestnetOptions) -> usize {
    opts.threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / (opts.nodes + opts.late_join).max(1)).max(1)
    })
}

/// Makes the node process die with the testnet, even when the testnet is
/// killed with SIGKILL and cannot clean up: the kernel sends the child
/// SIGKILL when the thread that spawned it exits (nodes are spawned from
/// the testnet's main thread, which lives as long as the run).
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The testnet may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Waits for a node's `listen.json` and returns its first address.
fn listen_addr(node: &mut Running, within: Duration) -> Result<String, TestnetError> {
    let path = node.dir.join("listen.json");
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(a) = v["addrs"].get(0).and_then(|a| a.as_str()) {
                    return Ok(a.to_string());
                }
            }
        }
        if let Ok(Some(status)) = node.child.try_wait() {
            return Err(TestnetError::EarlyExit {
                index: node.index,
                status: status.to_string(),
                log_tail: tail(&node.dir.join("node.log"), 20),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(TestnetError::NoListenAddr {
        index: node.index,
        secs: within.as_secs(),
    })
}

/// What the testnet reads from one node's ledger once the node is gone.
#[derive(Default)]
struct LedgerCheck {
    /// `None` when the ledger would not open or the audit could not run.
    audit: Option<AuditReport>,
    /// Authors of the equivocation proofs the ledger holds.
    proof_authors: Vec<AuthorId>,
}

fn check_ledger(dir: &Path) -> LedgerCheck {
    let Ok(ledger) = Ledger::open_read_only(&dir.join("ledger")) else {
        return LedgerCheck::default();
    };
    LedgerCheck {
        audit: meshtrain_ledger::audit::audit(&ledger).ok(),
        proof_authors: ledger
            .proofs()
            .map(|ps| ps.iter().map(|p| p.author()).collect())
            .unwrap_or_default(),
    }
}

/// Audits every node's ledger, as many at once as there are cores: one
/// `ledger audit` process per node cost 0.2 s of start-up (libtorch) each,
/// one after the other, and with the proof exports that was most of a
/// small testnet's time after its nodes ended.
fn check_ledgers(nodes: &[Running]) -> Vec<LedgerCheck> {
    let at_once = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut checks = Vec::with_capacity(nodes.len());
    for group in nodes.chunks(at_once) {
        std::thread::scope(|scope| {
            let handles: Vec<_> = group.iter().map(|n| scope.spawn(|| check_ledger(&n.dir))).collect();
            for h in handles {
                checks.push(h.join().unwrap_or_default());
            }
        });
    }
    checks
}

/// Runs a whole testnet and returns (and writes) its summary.
pub fn run(opts: &TestnetOptions) -> Result<Summary, TestnetError> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
    for i in 0..opts.nodes + opts.late_join {
        // A stale ledger from an earlier testnet would belong to another run.
        let dir = opts.out.join(format!("node-{i}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
    }
    let report_page = opts.out.join("report.html");
    if report_page.exists() {
        std::fs::remove_file(&report_page).map_err(io_err(&report_page))?;
    }
    let store = dataset_store(opts)?;
    let spec = opts.out.join("run.toml");
    if !matches!(opts.admission.as_str(), "permissioned" | "open") {
        return Err(TestnetError::Spec(format!(
            "admission `{}`: expected `permissioned` or `open`",
            opts.admission
        )));
    }
    let roster = write_roster(opts)?;
    write_spec(opts, &store, &spec, &roster)?;
    info!(nodes = opts.nodes, out = %opts.out.display(), "starting testnet");
    if let Some(addr) = opts.dashboard {
        let board = dashboard::Board {
            out: opts.out.clone(),
            template: Summary {
                model: opts.model.clone(),
                codec: opts.codec.clone(),
                aggregator: opts.aggregator.clone(),
                local_steps: opts.local_steps,
                ..Default::default()
            },
            started,
            dirs: std::sync::Arc::new(std::sync::Mutex::new(
                (0..opts.nodes + opts.late_join)
                    .map(|i| opts.out.join(format!("node-{i}")))
                    .collect(),
            )),
        };
        dashboard::serve(addr, board).map_err(|e| TestnetError::Io {
            path: PathBuf::from(format!("dashboard {addr}")),
            source: e,
        })?;
    }

    netns::catch_interrupts();
    let mut net = match opts.hosts {
        Hosts::Loopback => None,
        Hosts::Netns => Some(netns::Net::create(
            opts.nodes + opts.late_join,
            opts.link.as_ref(),
            &opts.slow,
            opts.cut.map_or(1, |c| c.groups),
        )?),
    };
    if let Some(n) = &net {
        info!(
            hosts = n.hosts.len(),
            link = %opts.link.as_ref().map_or("unshaped".to_string(), |r| r.to_string()),
            "one network namespace per node"
        );
    }
    let mut nodes = Vec::with_capacity(opts.nodes + opts.late_join);
    let first = spawn_node(opts, 0, &spec, &[], Some(&store), opts.nodes - 1, net.as_ref())?;
    nodes.push(first);
    let boot = match listen_addr(&mut nodes[0], Duration::from_secs(120)) {
        Ok(a) => a,
        Err(e) => {
            stop_all(&mut nodes);
            return Err(e);
        }
    };
    for i in 1..opts.nodes {
        match spawn_node(
            opts,
            i,
            &spec,
            std::slice::from_ref(&boot),
            None,
            opts.nodes - 1,
            net.as_ref(),
        ) {
            Ok(n) => nodes.push(n),
            Err(e) => {
                stop_all(&mut nodes);
                return Err(e);
            }
        }
    }

    let rounds = std::fs::read_to_string(&spec)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("count = ").and_then(|v| v.trim().parse::<u64>().ok()))
        })
        .unwrap_or(u64::MAX);
    let mut restarts = 0u64;
    let mut killed_heads: Vec<(AuthorId, Seq, RecordHash)> = Vec::new();
    let mut rng_state = opts.seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next_kill = opts.churn.map(|(every, _)| Instant::now() + Duration::from_secs(every));
    let mut down: Vec<(usize, Instant)> = Vec::new();
    let mut late_started = opts.late_join == 0;
    let deadline = started + opts.timeout;
    let mut last_note = Instant::now();
    let mut honest_done_at: Option<Instant> = None;
    // Drawn only when stderr is a terminal; logs say the same otherwise.
    let bar = indicatif::ProgressBar::new(if rounds == u64::MAX { 0 } else { rounds }).with_style(
        indicatif::ProgressStyle::with_template("{spinner} round {pos}/{len} {wide_bar} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let progress = mesh_round(&nodes);
        if netns::interrupted() {
            bar.abandon();
            stop_all(&mut nodes);
            return Err(TestnetError::Interrupted);
        }
        if let (Some(n), Some(cut)) = (net.as_mut(), opts.cut) {
            let on = progress >= cut.at_round && progress < cut.at_round + cut.rounds;
            if on != n.is_cut() {
                if let Err(e) = n.set_cut(on) {
                    bar.abandon();
                    stop_all(&mut nodes);
                    return Err(e);
                }
                info!(
                    round = progress,
                    groups = cut.groups,
                    "links {}",
                    if on { "cut" } else { "healed" }
                );
            }
        }
        // No kills whose restart would come after the mesh has finished.
        let per_round = started.elapsed().as_secs_f64() / progress.max(1) as f64;
        let left_s = rounds.saturating_sub(progress) as f64 * per_round;
        let near_end = progress + 3 >= rounds || opts.churn.is_some_and(|(_, down)| left_s < (down + 15) as f64);
        // Churn: SIGKILL a random running node; bring it back later.
        if let (Some(at), Some((every, down_s))) = (next_kill, opts.churn) {
            if Instant::now() >= at && !near_end {
                let alive: Vec<usize> = nodes
                    .iter()
                    .filter(|n| n.status.is_none() && n.attack.is_none() && !down.iter().any(|(i, _)| *i == n.index))
                    .map(|n| n.index)
                    .collect();
                if alive.len() > 2 {
                    rng_state ^= rng_state << 13;
                    rng_state ^= rng_state >> 7;
                    rng_state ^= rng_state << 17;
                    let victim = alive[(rng_state % alive.len() as u64) as usize];
                    if let Some(n) = nodes.iter_mut().find(|n| n.index == victim) {
                        let _ = n.child.kill();
                        let _ = n.child.wait();
                        match own_head(&n.dir) {
                            Some(head) => killed_heads.push(head),
                            None => warn!(node = victim, "cannot read the killed node's ledger"),
                        }
                        info!(node = victim, round = progress, "churn: killed (SIGKILL)");
                        down.push((victim, Instant::now() + Duration::from_secs(down_s)));
                    }
                }
                next_kill = Some(Instant::now() + Duration::from_secs(every));
            }
        }
        let due: Vec<usize> = down
            .iter()
            .filter(|(_, t)| Instant::now() >= *t)
            .map(|(i, _)| *i)
            .collect();
        for i in due {
            down.retain(|(j, _)| *j != i);
            let mut boots = live_addrs(&nodes, i);
            if net.is_some() {
                // As on real hosts: one bootstrap address, Kademlia finds the rest.
                boots.truncate(1);
            }
            match spawn_node(
                opts,
                i,
                &spec,
                &boots,
                if i == 0 { Some(&store) } else { None },
                1,
                net.as_ref(),
            ) {
                Ok(n) => {
                    info!(node = i, round = progress, "churn: restarted from its data dir");
                    restarts += 1;
                    if let Some(slot) = nodes.iter_mut().find(|m| m.index == i) {
                        *slot = n;
                    }
                }
                Err(e) => warn!(node = i, error = %e, "churn: restart failed"),
            }
        }
        if !late_started && progress * 3 >= rounds {
            late_started = true;
            for k in 0..opts.late_join {
                let i = opts.nodes + k;
                // Its directory holds only the identity on the roster
                // (written, after cleaning, before anyone started).
                let mut boots = live_addrs(&nodes, i);
                if net.is_some() {
                    // As on real hosts: one bootstrap address, Kademlia finds the rest.
                    boots.truncate(1);
                }
                match spawn_node(opts, i, &spec, &boots, None, 1, net.as_ref()) {
                    Ok(n) => {
                        info!(node = i, round = progress, "late joiner started");
                        nodes.push(n);
                    }
                    Err(e) => warn!(node = i, error = %e, "late joiner failed to start"),
                }
            }
        }

        let mut running = 0;
        let mut failed_early = None;
        for n in nodes.iter_mut() {
            if n.status.is_none() {
                match n.child.try_wait() {
                    Ok(Some(s)) => {
                        if !s.success() {
                            warn!(node = n.index, status = %s, "node failed; see {}", n.dir.join("node.log").display());
                            // An honest node that stops before its first
                            // round (no data, a model that does not fit,
                            // no peers) will not come back: say why now,
                            // not when the testnet's timeout runs out.
                            let killed = down.iter().any(|(i, _)| *i == n.index);
                            if !killed && n.attack.is_none() && !n.dir.join("progress.json").exists() {
                                failed_early = Some((n.index, s.to_string(), tail(&n.dir.join("node.log"), 5)));
                            }
                        }
                        n.status = Some(s);
                    }
                    Ok(None) => running += 1,
                    Err(_) => n.status = Some(std::process::ExitStatus::default()),
                }
            }
        }
        if let Some((index, status, log_tail)) = failed_early {
            bar.abandon();
            stop_all(&mut nodes);
            return Err(TestnetError::FailedBeforeTraining {
                index,
                status,
                log_tail,
            });
        }
        if running == 0 && down.is_empty() && late_started {
            bar.finish_and_clear();
            break;
        }
        // Attackers banned by every honest node can wait out deadline after
        // deadline for updates that will not come: once the honest nodes are
        // done (and no churn or late joiner is pending), the run is over, and
        // attackers still running a while later are stopped.
        // (A testnet of attackers only has no honest nodes to be done.)
        let honest_done =
            nodes.iter().any(|n| n.attack.is_none()) && nodes.iter().all(|n| n.attack.is_some() || n.status.is_some());
        if honest_done && down.is_empty() && late_started {
            let since = *honest_done_at.get_or_insert_with(Instant::now);
            if since.elapsed() > ATTACKER_GRACE {
                info!(
                    running,
                    "the honest nodes are done: stopping the attackers still running"
                );
                stop_gently(&mut nodes);
                bar.finish_and_clear();
                break;
            }
        }
        if Instant::now() > deadline {
            bar.abandon();
            stop_all(&mut nodes);
            return Err(TestnetError::Timeout(opts.timeout.as_secs()));
        }
        bar.set_position(mesh_round(&nodes));
        bar.set_message(format!("{running} nodes running"));
        if bar.is_hidden() && last_note.elapsed() > Duration::from_secs(30) {
            info!(
                running,
                elapsed_s = started.elapsed().as_secs(),
                "testnet still running"
            );
            last_note = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut summary = summarise(opts, &nodes, started.elapsed())?;
    summary.restarts = restarts;
    summary.hosts = opts.hosts.to_string();
    if let Some(n) = &net {
        for row in &mut summary.nodes {
            if let Some(h) = n.hosts.get(row.index) {
                row.host_addr = Some(h.addr.to_string());
                row.link = h.rate.as_ref().map(|r| r.to_string());
            }
        }
    }
    drop(net);
    let finished: Vec<&Path> = nodes
        .iter()
        .filter(|n| n.status.is_some_and(|s| s.success()))
        .map(|n| n.dir.as_path())
        .collect();
    for (author, seq, hash) in &killed_heads {
        for dir in &finished {
            summary.killed_heads_checked += 1;
            if !holds_record(dir, author, *seq, hash) {
                warn!(dir = %dir.display(), author = %author.short(), seq = seq.0, "a record signed before a kill is missing");
                summary.lost_records += 1;
            }
        }
    }
    let path = opts.out.join("summary.json");
    let text = serde_json::to_vec_pretty(&summary).map_err(|e| TestnetError::BadReport {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    std::fs::write(&path, text).map_err(io_err(&path))?;
    match html::write_report(&opts.out, &summary, &load_reports(&nodes)) {
        Ok(()) => info!(report = %opts.out.join("report.html").display(), "wrote the report"),
        Err(e) => warn!(error = %e, "cannot write the report"),
    }
    Ok(summary)
}

/// The round the mesh is in, as node 0 (or the furthest node) reports it.
fn mesh_round(nodes: &[Running]) -> u64 {
    nodes
        .iter()
        .filter_map(|n| std::fs::read_to_string(n.dir.join("progress.json")).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter_map(|v| v["round"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Listen addresses of the running nodes other than `except`.
fn live_addrs(nodes: &[Running], except: usize) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.index != except && n.status.is_none())
        .filter_map(|n| std::fs::read_to_string(n.dir.join("listen.json")).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter_map(|v| v["addrs"].get(0).and_then(|a| a.as_str()).map(String::from))
        .collect()
}

/// Interrupts every node still running (as Ctrl-C does: it writes its
/// results and closes its ledger), and kills those still there after
/// `ATTACKER_GRACE`.
fn stop_gently(nodes: &mut [Running]) {
    for n in nodes.iter().filter(|n| n.status.is_none()) {
        if let Ok(pid) = libc::pid_t::try_from(n.child.id()) {
            // SAFETY: kill(2) on our own child's pid, which we have not
            // reaped yet (its status is unknown), so the pid is still it.
            unsafe {
                libc::kill(pid, libc::SIGINT);
            }
        }
    }
    let until = Instant::now() + ATTACKER_GRACE;
    for n in nodes.iter_mut().filter(|n| n.status.is_none()) {
        while Instant::now() < until {
            if let Ok(Some(s)) = n.child.try_wait() {
                n.status = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if n.status.is_none() {
            let _ = n.child.kill();
            n.status = n.child.wait().ok();
        }
    }
}

fn stop_all(nodes: &mut [Running]) {
    for n in nodes.iter_mut() {
        let _ = n.child.kill();
        let _ = n.child.wait();
    }
}

/// Each node's results.json (None where it wrote none).
fn load_reports(nodes: &[Running]) -> Vec<Option<NodeReport>> {
    nodes
        .iter()
        .map(|n| {
            std::fs::read(n.dir.join("results.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        })
        .collect()
}

fn summarise(opts: &TestnetOptions, nodes: &[Running], wall: Duration) -> Result<Summary, TestnetError> {
    let reports = load_reports(nodes);
    let mut summary = Summary {
        nodes_total: nodes.len(),
        model: opts.model.clone(),
        codec: opts.codec.clone(),
        aggregator: opts.aggregator.clone(),
        local_steps: opts.local_steps,
        wall_s: wall.as_secs_f64(),
        honest_wall_s: reports
            .iter()
            .flatten()
            .filter(|r| r.honest)
            .map(|r| r.wall_s)
            .reduce(f64::max),
        ..Default::default()
    };
    let authors: BTreeMap<usize, (String, u64, bool)> = reports
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            r.as_ref()
                .map(|r| (i, (r.author.clone(), r.updates_published, r.honest)))
        })
        .collect();
    let mut complete = true;
    // Per node: how many of its updates the other honest nodes merged.
    let mut merged_of: BTreeMap<usize, u64> = BTreeMap::new();
    let (mut mal_seen, mut mal_hit, mut hon_seen, mut hon_rejected) = (0u64, 0u64, 0u64, 0u64);
    let mut all_banned = true;
    let mut payload_sum = 0f64;
    let mut payload_n = 0u64;
    let mut checks = check_ledgers(nodes);
    let audits: Vec<Option<AuditReport>> = checks.iter_mut().map(|c| c.audit.take()).collect();
    // Each author's chain as its own ledger holds it (its counters restart
    // with the process, its ledger does not).
    let own_chain: BTreeMap<String, u64> = reports
        .iter()
        .zip(&audits)
        .filter_map(|(r, a)| {
            let r = r.as_ref()?;
            Some((
                r.author.clone(),
                a.as_ref()?.chain_lengths.get(&r.author).copied().unwrap_or(0),
            ))
        })
        .collect();
    for ((n, report), audit) in nodes.iter().zip(&reports).zip(audits) {
        let mut row = NodeSummary {
            index: n.index,
            honest: n.attack.is_none(),
            attack: n.attack.clone(),
            exit_code: n.status.and_then(|s| s.code()),
            ..Default::default()
        };
        if let Some(a) = &audit {
            row.audit_ok = a.ok;
            row.audit_records = a.records;
            row.audit_first_problem = a.first_problem().map(|p| p.to_string());
        }
        if !row.audit_ok {
            summary.audit_failures += 1;
        }
        if let Some(r) = report {
            row.peer_id = r.peer_id.clone();
            row.final_test_acc = r.final_test_acc;
            row.final_test_loss = r.final_test_loss;
            row.final_task = r.final_task;
            if r.honest {
                summary.stopped_early_at = summary.stopped_early_at.max(r.stopped_early_at);
            }
            row.bytes_sent = r.bytes_sent;
            row.bytes_received = r.bytes_received;
            row.gossip_sent = r.gossip_sent;
            row.gossip_sent_bytes = r.gossip_sent_bytes;
            row.gossip_duplicates = r.gossip_duplicates;
            row.updates_merged = r.updates_merged;
            row.updates_rejected = r.updates_rejected;
            row.updates_clipped = r.updates_clipped;
            row.rejected_by_reason = r.rejected_by_reason.clone();
            row.rounds_completed = r.rounds_completed;
            row.banned = r.banned.clone();
            row.label_histogram = r.label_histogram.clone();
            row.data_fetch_ms = r.data_fetch_ms;
            row.round_s = match (r.history.first(), r.history.last()) {
                (Some(a), Some(b)) if b.round > a.round => {
                    Some(b.at_ms.saturating_sub(a.at_ms) as f64 / 1000.0 / (b.round - a.round) as f64)
                }
                _ => None,
            };
            row.time_to_target_s = opts.target_acc.and_then(|t| {
                r.history
                    .iter()
                    .find(|h| h.test_acc.is_finite() && h.test_acc >= t)
                    .map(|h| h.at_ms as f64 / 1000.0)
            });
            summary.param_count = r.param_count;
            summary.rounds = summary.rounds.max(r.rounds_completed);
            if r.updates_published > 0 {
                payload_sum += r.payload_bytes_mean * r.updates_published as f64;
                payload_n += r.updates_published;
            }
            if r.honest {
                // Verdicts of honest nodes about everyone else.
                for (j, (author, published, honest)) in &authors {
                    if *j == n.index {
                        continue;
                    }
                    let rejected = r.rejected_by_author.get(author).copied().unwrap_or(0);
                    let clipped = r.clipped_by_author.get(author).copied().unwrap_or(0);
                    let merged = r.merged_by_author.get(author).copied().unwrap_or(0);
                    *merged_of.entry(*j).or_default() += merged;
                    if *honest {
                        hon_seen += rejected + clipped + merged;
                        hon_rejected += rejected;
                    } else {
                        // Every attacker update not merged at full weight
                        // counts, including those ignored after a ban.
                        mal_seen += *published;
                        mal_hit += published.saturating_sub(merged);
                        if !r.banned.contains(author) {
                            all_banned = false;
                        }
                    }
                    // Every honest ledger must hold every other honest chain whole.
                    if *honest {
                        let held = audit
                            .as_ref()
                            .and_then(|a| a.chain_lengths.get(author).copied())
                            .unwrap_or(0);
                        if held != own_chain.get(author).copied().unwrap_or(*published) {
                            complete = false;
                        }
                    }
                }
            }
        } else {
            complete = false;
        }
        summary.nodes.push(row);
    }
    for row in &mut summary.nodes {
        row.updates_published = authors.get(&row.index).map_or(0, |a| a.1);
        row.merged_by_peers = merged_of.get(&row.index).copied().unwrap_or(0);
    }
    summary.stages = report::StageSummary::mean(reports.iter().flatten().filter(|r| r.honest).map(|r| &r.stages));
    let honest: Vec<&NodeSummary> = summary.nodes.iter().filter(|n| n.honest).collect();
    summary.target_acc = opts.target_acc;
    // Every honest node there: the slowest one's time.
    summary.time_to_target_s = opts.target_acc.and_then(|_| {
        honest
            .iter()
            .map(|n| n.time_to_target_s)
            .try_fold(0f64, |a, t| t.map(|t| a.max(t)))
    });
    let node_rounds: u64 = honest.iter().map(|n| n.rounds_completed).sum();
    let per_node_round = |f: &dyn Fn(&NodeSummary) -> u64| {
        if node_rounds > 0 {
            honest.iter().map(|n| f(n)).sum::<u64>() as f64 / node_rounds as f64
        } else {
            0.0
        }
    };
    summary.bytes_sent_per_node_round = per_node_round(&|n| n.bytes_sent);
    summary.gossip_sent_per_node_round = per_node_round(&|n| n.gossip_sent);
    summary.gossip_bytes_per_node_round = per_node_round(&|n| n.gossip_sent_bytes);
    summary.gossip_duplicates_per_node_round = per_node_round(&|n| n.gossip_duplicates);
    if !honest.is_empty() {
        summary.honest_mean_acc = honest.iter().map(|n| n.final_test_acc).sum::<f32>() / honest.len() as f32;
        summary.honest_min_acc = honest.iter().map(|n| n.final_test_acc).fold(f32::INFINITY, f32::min);
        summary.honest_mean_loss = honest.iter().map(|n| n.final_test_loss).sum::<f32>() / honest.len() as f32;
        summary.honest_mean_task = report::TaskFigures::mean(honest.iter().map(|n| &n.final_task));
    }
    summary.bytes_per_update_mean = if payload_n > 0 {
        payload_sum / payload_n as f64
    } else {
        0.0
    };
    summary.compression_ratio = if summary.bytes_per_update_mean > 0.0 {
        4.0 * summary.param_count as f64 / summary.bytes_per_update_mean
    } else {
        0.0
    };
    summary.malicious_rejected_or_clipped_share = (mal_seen > 0).then(|| mal_hit as f64 / mal_seen as f64);
    summary.attackers_banned_by_all_honest = (opts.byzantine > 0).then_some(all_banned);
    summary.honest_rejected_share = if hon_seen > 0 {
        hon_rejected as f64 / hon_seen as f64
    } else {
        0.0
    };
    summary.complete_chains = complete;
    if !honest.is_empty() {
        let max = honest.iter().map(|n| n.final_test_acc).fold(f32::MIN, f32::max);
        summary.final_acc_gap = max - summary.honest_min_acc;
    }
    summary.catch_up_rounds_max = catch_up_rounds(&reports);
    summary.late_join_first_merge_s = nodes
        .iter()
        .zip(&reports)
        .filter(|(n, _)| n.index >= opts.nodes)
        .filter_map(|(_, r)| r.as_ref()?.history.first().map(|h| h.at_ms as f64 / 1000.0))
        .reduce(f64::max);
    summary.proofs_against_honest = proofs_against_honest(nodes, &checks, &reports);
    sybil_figures(&mut summary, &reports);
    let poisoned: BTreeSet<String> = reports
        .iter()
        .flatten()
        .filter_map(|r| r.poisoned_anchor.clone())
        .collect();
    anchor_agreement(&mut summary, nodes, &poisoned);
    Ok(summary)
}

/// What the honest nodes made of the attackers' Sybil identities.
fn sybil_figures(summary: &mut Summary, reports: &[Option<NodeReport>]) {
    let sybils: BTreeSet<&String> = reports.iter().flatten().flat_map(|r| &r.sybil_authors).collect();
    summary.sybil_identities = sybils.len() as u64;
    summary.sybil_records = reports.iter().flatten().map(|r| r.sybil_records).sum();
    for r in reports.iter().flatten().filter(|r| r.honest) {
        let sum = |m: &BTreeMap<String, u64>| sybils.iter().filter_map(|a| m.get(*a)).sum::<u64>();
        summary.sybil_merged += sum(&r.merged_by_author);
        summary.sybil_clipped += sum(&r.clipped_by_author);
        summary.sybil_rejected += sum(&r.rejected_by_author);
        summary.sybil_probation += sum(&r.probation_by_author);
    }
}

/// Reads every honest node's verdict blocks and join records: whether the
/// honest nodes trained each round from one anchor, and ended on one.
fn anchor_agreement(summary: &mut Summary, nodes: &[Running], poisoned: &BTreeSet<String>) {
    let mut per_node = Vec::new();
    let mut hijacked = 0u64;
    for (n, row) in nodes.iter().zip(summary.nodes.iter_mut()) {
        if n.attack.is_some() {
            continue;
        }
        let Ok(ledger) = Ledger::open_read_only(&n.dir.join("ledger")) else {
            continue;
        };
        let Ok(closed) = meshtrain_ledger::audit::closed_rounds(&ledger) else {
            continue;
        };
        let joins = ledger.joins().unwrap_or_default();
        let repairs: Vec<u64> = joins
            .iter()
            .filter(|j| j.kind != meshtrain_ledger::JoinKind::Start)
            .map(|j| j.round)
            .collect();
        let took_poison = closed
            .values()
            .any(|c| poisoned.contains(&c.base.to_string()) || poisoned.contains(&c.anchor.to_string()))
            || joins.iter().any(|j| poisoned.contains(&j.anchor.to_string()));
        hijacked += u64::from(took_poison);
        // A repair onto the decided final anchor comes after the last
        // close: it is the anchor the node ended on.
        let last_closed = closed.keys().next_back().copied();
        let final_join = joins
            .iter()
            .rev()
            .find(|j| Some(j.round) == last_closed.map(|r| r + 1))
            .map(|j| j.anchor);
        row.final_anchor = final_join
            .or_else(|| closed.values().next_back().map(|c| c.anchor))
            .map(|a| a.to_string());
        row.anchor_repairs = repairs.len() as u64;
        summary.anchor_repairs += repairs.len() as u64;
        per_node.push((closed, repairs, final_join));
    }
    if !poisoned.is_empty() {
        summary.hijacked_nodes = Some(hijacked);
    }
    if per_node.is_empty() {
        return;
    }
    let last = per_node
        .iter()
        .filter_map(|(c, _, _)| c.keys().next_back().copied())
        .max()
        .unwrap_or(0);
    let (mut agreed, mut counted) = (0u64, 0u64);
    // Round 0 starts from the genesis for everyone; from round 1 on, the
    // base each node aggregated onto is its anchor for that round.
    for round in 1..=last + 1 {
        let anchors: std::collections::BTreeSet<WeightsHash> = per_node
            .iter()
            .filter_map(|(c, _, final_join)| {
                if round > last {
                    final_join.or_else(|| c.get(&last).map(|x| x.anchor))
                } else {
                    c.get(&round).map(|x| x.base)
                }
            })
            .collect();
        let closers = per_node
            .iter()
            .filter(|(c, _, _)| c.contains_key(&round.min(last)))
            .count();
        if anchors.is_empty() {
            continue;
        }
        counted += 1;
        if anchors.len() == 1 {
            agreed += 1;
        } else if summary.first_anchor_split.is_none() {
            summary.first_anchor_split = Some(round);
        }
        summary.anchor_rounds.push(report::AnchorRound {
            round,
            anchors: anchors.len(),
            nodes: closers,
            repairs: per_node
                .iter()
                .map(|(_, r, _)| r.iter().filter(|x| **x == round).count() as u64)
                .sum(),
        });
    }
    summary.anchor_agreement = (counted > 0).then(|| agreed as f64 / counted as f64);
}

/// The owner's chain head of a (stopped) node's ledger.
fn own_head(dir: &Path) -> Option<(AuthorId, Seq, RecordHash)> {
    let ledger = Ledger::open_read_only(&dir.join("ledger")).ok()?;
    let owner = ledger.meta().owner;
    let head = ledger.head(&owner)?;
    Some((owner, head.seq, head.hash))
}

/// Whether DIR's ledger holds AUTHOR's record at SEQ with this hash.
fn holds_record(dir: &Path, author: &AuthorId, seq: Seq, hash: &RecordHash) -> bool {
    let Ok(ledger) = Ledger::open_read_only(&dir.join("ledger")) else {
        return false;
    };
    matches!(ledger.record(author, seq), Ok(Some(r)) if r.hash() == *hash)
}

/// For nodes that (re)joined, the rounds from joining until their test
/// accuracy is within a point of a node that never left, at the same round.
fn catch_up_rounds(reports: &[Option<NodeReport>]) -> Option<u64> {
    let reference = reports
        .iter()
        .flatten()
        .filter(|r| r.honest && !r.restarted && r.joined_at.is_empty())
        .max_by_key(|r| r.history.len())?;
    let acc_at: BTreeMap<u64, f32> = reference.history.iter().map(|h| (h.round, h.test_acc)).collect();
    let mut worst: Option<u64> = None;
    for r in reports.iter().flatten().filter(|r| r.honest) {
        let Some(&joined) = r.joined_at.first() else {
            continue;
        };
        let caught = r
            .history
            .iter()
            .filter(|h| h.round >= joined && h.test_acc.is_finite())
            .find(|h| {
                acc_at
                    .get(&h.round)
                    .is_some_and(|a| !a.is_finite() || (a - h.test_acc).abs() <= 0.01)
            })
            .map(|h| h.round - joined)
            .unwrap_or_else(|| r.history.last().map_or(0, |h| h.round.saturating_sub(joined)));
        worst = Some(worst.map_or(caught, |w: u64| w.max(caught)));
    }
    worst
}

/// Equivocation proofs that honest ledgers hold against honest authors (a
/// restarted node that signed twice at one seq would show up here).
fn proofs_against_honest(nodes: &[Running], checks: &[LedgerCheck], reports: &[Option<NodeReport>]) -> u64 {
    let honest: BTreeSet<&str> = reports
        .iter()
        .flatten()
        .filter(|r| r.honest)
        .map(|r| r.author.as_str())
        .collect();
    nodes
        .iter()
        .zip(checks)
        .filter(|(n, _)| n.attack.is_none())
        .flat_map(|(_, c)| &c.proof_authors)
        .filter(|a| honest.contains(a.to_string().as_str()))
        .count() as u64
}

/// An honest node's round taken apart, one line per stage (`bench round`).
pub fn stage_table(s: &Summary) -> String {
    let mut out = String::new();
    let Some(st) = &s.stages else {
        return out;
    };
    let _ = writeln!(
        out,
        "{} node(s), model {}, codec {}, H = {}: {} rounds, {:.1} ms per round",
        s.nodes_total, s.model, s.codec, s.local_steps, s.rounds, st.round_ms
    );
    let _ = writeln!(out, "{:<16} {:>10} {:>8}", "stage", "ms/round", "share");
    for stage in STAGES {
        if let Some(ms) = st.per_round_ms.get(stage) {
            let _ = writeln!(
                out,
                "{:<16} {:>10.2} {:>7.1}%",
                stage,
                ms,
                if st.round_ms > 0.0 {
                    100.0 * ms / st.round_ms
                } else {
                    0.0
                }
            );
        }
    }
    let _ = writeln!(
        out,
        "node overhead (round minus local steps): {:.2} ms, {:.1}% of a round",
        st.overhead_share * st.round_ms,
        100.0 * st.overhead_share
    );
    let _ = writeln!(
        out,
        "(verify, verdict_store and checkpoint_write run beside the round, on other threads; the others are on its path)"
    );
    out
}

/// The per-node table printed after a run.
pub fn table(s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} nodes, model {}, codec {}, aggregator {}, H = {}, {} rounds, {} parameters, {:.1} s{}",
        s.nodes_total,
        s.model,
        s.codec,
        s.aggregator,
        s.local_steps,
        s.rounds,
        s.param_count,
        s.wall_s,
        s.honest_wall_s
            .map(|h| format!(" (honest nodes {h:.1} s)"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "{:<5} {:<10} {:<12} {:>8} {:>12} {:>12} {:>7} {:>7} {:>7} {:<6}",
        "node", "peer", "role", "test acc", "sent", "received", "merged", "clipped", "reject", "audit"
    );
    for n in &s.nodes {
        let peer = &n.peer_id[n.peer_id.len().saturating_sub(8)..];
        let role = n.attack.clone().unwrap_or_else(|| "honest".into());
        let _ = writeln!(
            out,
            "{:<5} {:<10} {:<12} {:>7.2}% {:>12} {:>12} {:>7} {:>7} {:>7} {:<6}",
            n.index,
            peer,
            role,
            100.0 * n.final_test_acc,
            human_bytes(n.bytes_sent),
            human_bytes(n.bytes_received),
            n.updates_merged,
            n.updates_clipped,
            n.updates_rejected,
            if n.audit_ok { "ok" } else { "FAILED" }
        );
    }
    let _ = writeln!(
        out,
        "honest accuracy: mean {:.2}%, min {:.2}%; {:.0} B per update ({:.1}x smaller than dense fp32); chains complete: {}; audit failures: {}",
        100.0 * s.honest_mean_acc,
        100.0 * s.honest_min_acc,
        s.bytes_per_update_mean,
        s.compression_ratio,
        s.complete_chains,
        s.audit_failures
    );
    if s.bytes_sent_per_node_round > 0.0 {
        let _ = writeln!(
            out,
            "traffic per honest node per round: {} sent, of which gossip {} in {:.1} messages (own and forwarded); {:.1} copies received of messages it had",
            human_bytes(s.bytes_sent_per_node_round as u64),
            human_bytes(s.gossip_bytes_per_node_round as u64),
            s.gossip_sent_per_node_round,
            s.gossip_duplicates_per_node_round
        );
    }
    if let Some(st) = &s.stages {
        let _ = writeln!(
            out,
            "a round: {:.1} ms, of which local steps {:.1} ms, node overhead {:.1}% (`bench round` takes it apart)",
            st.round_ms,
            st.per_round_ms.get("train").copied().unwrap_or(0.0),
            100.0 * st.overhead_share
        );
    }
    let mut task = Vec::new();
    if s.honest_mean_loss.is_finite() {
        task.push(format!("held-out loss {:.4}", s.honest_mean_loss));
    }
    if let Some(p) = s.honest_mean_task.perplexity {
        task.push(format!("perplexity {p:.2}"));
    }
    if let Some(a) = s.honest_mean_task.roc_auc {
        task.push(format!("anomaly ROC-AUC {a:.4}"));
    }
    if let Some(f) = s.honest_mean_task.macro_f1 {
        task.push(format!("macro F1 {f:.4}"));
    }
    if let Some(r) = s.stopped_early_at {
        task.push(format!("stopped early at round {r}"));
    }
    if !task.is_empty() {
        let _ = writeln!(out, "honest means: {}", task.join("; "));
    }
    if s.restarts > 0 || s.catch_up_rounds_max.is_some() {
        let _ = writeln!(
            out,
            "restarts: {}; worst catch-up: {} rounds; final accuracy gap: {:.2} points; equivocation proofs against honest nodes: {}; records lost across kills: {} (of {} checked); late joiner's first merge after {}",
            s.restarts,
            s.catch_up_rounds_max.map_or("-".to_string(), |r| r.to_string()),
            100.0 * s.final_acc_gap,
            s.proofs_against_honest,
            s.lost_records,
            s.killed_heads_checked,
            s.late_join_first_merge_s.map_or("-".to_string(), |t| format!("{t:.1} s"))
        );
    }
    if s.hosts == "netns" {
        let links: BTreeSet<String> = s
            .nodes
            .iter()
            .map(|n| n.link.clone().unwrap_or_else(|| "unshaped".into()))
            .collect();
        let _ = writeln!(
            out,
            "hosts: one network namespace per node; links {}; {} sent per honest node per round",
            links.into_iter().collect::<Vec<_>>().join(", "),
            human_bytes(s.bytes_sent_per_node_round as u64)
        );
        let honest = s.nodes.iter().filter(|n| n.honest).count() as u64;
        for n in &s.nodes {
            // Each of the other honest nodes merges each update at most once.
            let peers = honest.saturating_sub(u64::from(n.honest));
            let _ = writeln!(
                out,
                "  node {} at {} on {}: {} s per round; its {} updates merged {} times by the {} other honest nodes (of {})",
                n.index,
                n.host_addr.as_deref().unwrap_or("?"),
                n.link.as_deref().unwrap_or("unshaped"),
                n.round_s.map_or("-".to_string(), |r| format!("{r:.2}")),
                n.updates_published,
                n.merged_by_peers,
                peers,
                n.updates_published * peers
            );
        }
    }
    if let Some(t) = s.target_acc {
        let _ = writeln!(
            out,
            "time to {:.1}% test accuracy (every honest node): {}",
            100.0 * t,
            s.time_to_target_s
                .map_or("not reached".to_string(), |x| format!("{x:.1} s"))
        );
    }
    if let Some(a) = s.anchor_agreement {
        let _ = writeln!(
            out,
            "anchor agreement: {a:.3} ({} repairs; first split: {})",
            s.anchor_repairs,
            s.first_anchor_split
                .map_or("none".to_string(), |r| format!("round {r}"))
        );
    }
    if s.sybil_identities > 0 {
        let _ = writeln!(
            out,
            "sybils: {} identities signed {} records; honest nodes merged {}, clipped {}, rejected or refused {}, judged on probation {} of them{}",
            s.sybil_identities,
            s.sybil_records,
            s.sybil_merged,
            s.sybil_clipped,
            s.sybil_rejected,
            s.sybil_probation,
            s.hijacked_nodes
                .map_or(String::new(), |h| format!("; honest nodes that took the hijacked anchor: {h}"))
        );
    }
    if let Some(m) = s.malicious_rejected_or_clipped_share {
        let _ = writeln!(
            out,
            "attacker updates rejected or clipped: {:.1}%; honest updates rejected: {:.1}%; attackers banned by every honest node: {}",
            100.0 * m,
            100.0 * s.honest_rejected_share,
            s.attackers_banned_by_all_honest.unwrap_or(false)
        );
    }
    out
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::attack_of;

    #[test]
    fn mixed_attackers_take_the_modes_in_turn() {
        let of = |i| attack_of(8, 3, Some("sign-flip,alie:1.5,label-flip"), i);
        let got: Vec<Option<String>> = (0..8).map(of).collect();
        assert!(got[..5].iter().all(Option::is_none));
        assert_eq!(got[5].as_deref(), Some("sign-flip"));
        assert_eq!(got[6].as_deref(), Some("alie:1.5"));
        assert_eq!(got[7].as_deref(), Some("label-flip"));
        // More attackers than modes: round again; one mode: all of them.
        assert_eq!(attack_of(4, 4, Some("a,b"), 2).as_deref(), Some("a"));
        assert_eq!(attack_of(4, 2, Some("late"), 3).as_deref(), Some("late"));
        assert_eq!(attack_of(4, 2, None, 3), None);
        assert_eq!(attack_of(2, 5, Some("a"), 0).as_deref(), None);
    }
}
