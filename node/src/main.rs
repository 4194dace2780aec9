//! `meshtrain`: run a node, a local testnet, or audit a ledger.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use meshtrain_gossip::libp2p::Multiaddr;
use meshtrain_gossip::MeshConfig;
use meshtrain_ledger::{audit, Ledger};
use meshtrain_model::{AggregatorSpec, Arch, CodecSpec};
use meshtrain_node::attack::Attack;
use meshtrain_node::node::{default_data_path, load_data};
use meshtrain_node::{Node, NodeOptions, RunSpec};

#[derive(Parser)]
#[command(name = "meshtrain", version, about = "Decentralized, poisoning-robust, auditable peer-to-peer training")]
struct Cli {
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Run a local testnet of node processes.
    #[command(subcommand)]
    Testnet(TestnetCommand),
    /// Check, compare or export a node's ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Write run specs.
    #[command(subcommand)]
    Spec(SpecCommand),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Append, audit and verification throughput of the ledger.
    Ledger {
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        #[arg(long, default_value_t = 64)]
        authors: u64,
        /// Where the benchmark ledgers go (removed afterwards).
        #[arg(long, default_value = "out/bench")]
        work: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Encode and decode throughput of every codec mode (one core).
    Codec {
        /// Parameters in the benchmark vector.
        #[arg(long, default_value_t = 1_000_000)]
        params: usize,
        /// Modes to measure (default: all).
        #[arg(long)]
        codec: Vec<CodecSpec>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Join (or start) a training mesh.
    Run(NodeRunArgs),
}

#[derive(Args)]
struct NodeRunArgs {
    /// Keeps the identity key, the ledger and the results.
    #[arg(long)]
    data_dir: PathBuf,
    /// Multiaddr to listen on (repeatable).
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
    listen: Vec<Multiaddr>,
    /// Multiaddr of a peer already in the mesh, with /p2p/<peer id> (repeatable).
    #[arg(long)]
    bootstrap: Vec<Multiaddr>,
    /// The run spec (TOML) every node of the mesh shares.
    #[arg(long)]
    run: PathBuf,
    /// Override the spec's codec (every node of the mesh must do the same:
    /// the run id changes).
    #[arg(long)]
    codec: Option<CodecSpec>,
    /// Override the spec's local steps per round (H); same caveat.
    #[arg(long)]
    local_steps: Option<usize>,
    /// Override the spec's aggregator; same caveat.
    #[arg(long)]
    aggregator: Option<AggregatorSpec>,
    /// Which shard of the training set to train on, as I/N.
    #[arg(long, default_value = "0/1")]
    shard: String,
    /// Directory of the dataset (default: by dataset name).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Peers to wait for before the first round.
    #[arg(long, default_value_t = 0)]
    wait_peers: usize,
    /// Start anyway after this many seconds without enough peers.
    #[arg(long, default_value_t = 120)]
    wait_peers_timeout_s: u64,
    /// libtorch threads for this node.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Testnet and tests only: behave as an attacker (see DESIGN §6).
    #[arg(long)]
    attack: Option<Attack>,
    /// Seconds to linger after the last round, serving peers.
    #[arg(long, default_value_t = 30)]
    drain_s: u64,
    /// fsync every ledger write (own records are always synced).
    #[arg(long)]
    sync_writes: bool,
    /// Evaluate the anchor on the test set every N rounds (always at the end).
    #[arg(long, default_value_t = 1)]
    eval_every: u64,
    /// Ban an author whose smoothed badness (0 merged .. 1 rejected) exceeds this.
    #[arg(long, default_value_t = 0.5)]
    ban_threshold: f32,
    /// Ban an author after this many protocol offences.
    #[arg(long, default_value_t = 2)]
    max_offences: u32,
    /// Keep payloads of only the last N rounds (default: all, which a
    /// replay audit needs).
    #[arg(long)]
    keep_payload_rounds: Option<u64>,
    /// Keep at most this many MiB of payloads, oldest rounds dropped first.
    #[arg(long)]
    keep_payload_mib: Option<u64>,
    /// Discover peers on the LAN by mDNS.
    #[arg(long)]
    mdns: bool,
}

#[derive(Subcommand)]
enum TestnetCommand {
    /// Start N node processes on loopback, wait for them, report.
    Run(TestnetArgs),
    /// Run a grid of testnets (lists are comma-separated) and tabulate them.
    Matrix(MatrixArgs),
}

/// What every testnet of a run or a matrix shares.
#[derive(Args)]
struct CommonTestnetArgs {
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Rounds to run (or give --epochs).
    #[arg(long, conflicts_with = "epochs")]
    rounds: Option<u64>,
    /// Passes over the whole training set, summed over nodes.
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long, default_value = "out/testnet")]
    out: PathBuf,
    #[command(flatten)]
    outer: OuterArgs,
    /// Inner (Adam) learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// How many nodes (the last ones) attack, when an attack is given.
    #[arg(long, default_value_t = 0)]
    byzantine: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long)]
    data: Option<PathBuf>,
    /// Give up on a testnet after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout_s: u64,
    /// Nodes evaluate on the test set every N rounds (always at the end).
    #[arg(long, default_value_t = 1)]
    eval_every: u64,
}

#[derive(Args)]
struct TestnetArgs {
    #[command(flatten)]
    common: CommonTestnetArgs,
    #[arg(long, default_value = "mlp")]
    model: Arch,
    /// H: local steps per round.
    #[arg(long, default_value_t = 10)]
    local_steps: usize,
    #[arg(long, default_value = "dense")]
    codec: CodecSpec,
    /// Robust aggregation rule (CenteredClip by default).
    #[arg(long, default_value = "centered-clip")]
    aggregator: AggregatorSpec,
    #[arg(long)]
    attack: Option<Attack>,
}

#[derive(Args)]
struct MatrixArgs {
    #[command(flatten)]
    common: CommonTestnetArgs,
    #[arg(long, value_delimiter = ',', default_value = "mlp")]
    models: Vec<Arch>,
    #[arg(long, value_delimiter = ',', default_value = "10")]
    local_steps: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "dense")]
    codecs: Vec<CodecSpec>,
    #[arg(long, value_delimiter = ',', default_value = "centered-clip")]
    aggregators: Vec<AggregatorSpec>,
    /// Attacks (`none` for the clean run), each with --byzantine attackers.
    #[arg(long, value_delimiter = ',', default_value = "none")]
    attacks: Vec<String>,
}

/// The DiLoCo-style outer step.
#[derive(Args, Clone, Copy)]
struct OuterArgs {
    /// Outer learning rate applied to the aggregate (1 with momentum 0 is
    /// plain averaging).
    #[arg(long, default_value_t = 0.7)]
    outer_lr: f32,
    /// Outer momentum, as in DiLoCo.
    #[arg(long, default_value_t = 0.9)]
    outer_momentum: f32,
    /// Nesterov (true) or heavy-ball (false) outer momentum.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    nesterov: bool,
}

impl OuterArgs {
    fn to_args(self) -> Vec<String> {
        let mut v = vec![
            "--outer-lr".to_string(),
            self.outer_lr.to_string(),
            "--outer-momentum".to_string(),
            self.outer_momentum.to_string(),
        ];
        v.extend(["--nesterov".to_string(), self.nesterov.to_string()]);
        v
    }
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Verify every signature, link, verdict, payload and proof.
    Audit {
        /// A node's data dir (or its ledger dir).
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check that two ledgers agree on every chain they share.
    Compare { left: PathBuf, right: PathBuf },
    /// Print records and verdicts as JSON lines.
    Export { dir: PathBuf },
    /// Recompute the anchor weights from genesis and the retained payloads,
    /// checking every anchor hash in the verdict chain.
    Replay {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SpecCommand {
    /// Print a run spec for the given choices.
    New(SpecArgs),
}

#[derive(Args)]
struct SpecArgs {
    #[arg(long, default_value = "mlp")]
    model: Arch,
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, conflicts_with = "epochs")]
    rounds: Option<u64>,
    /// Passes over the training set, summed over `--nodes` nodes.
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    #[arg(long, default_value_t = 10)]
    local_steps: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value = "dense")]
    codec: CodecSpec,
    /// Robust aggregation rule (CenteredClip by default).
    #[arg(long, default_value = "centered-clip")]
    aggregator: AggregatorSpec,
    #[command(flatten)]
    outer: OuterArgs,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHTRAIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p_gossipsub=warn,libp2p_kad=warn,libp2p_swarm=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Node(NodeCommand::Run(args)) => node_run(args),
        Command::Testnet(TestnetCommand::Run(args)) => testnet_run(args),
        Command::Testnet(TestnetCommand::Matrix(args)) => testnet_matrix(args),
        Command::Ledger(cmd) => ledger(cmd),
        Command::Spec(SpecCommand::New(args)) => spec_new(args),
        Command::Bench(BenchCommand::Ledger {
            records,
            authors,
            work,
            json,
        }) => {
            if records == 0 || authors == 0 {
                bail!("--records and --authors must be at least 1");
            }
            std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
            let bin = std::env::current_exe().context("locating the meshtrain binary")?;
            let b = meshtrain_node::bench::ledger(records, authors, &bin, &work)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!("ledger benchmark: {} records from {} authors", b.records, b.authors);
                println!("  append, sync off          {:>10.0} records/s", b.append_records_per_s);
                println!("  append, fsync per batch   {:>10.0} records/s ({} records)", b.append_sync_records_per_s, b.sync_sample);
                println!("  verify + append (inbox)   {:>10.0} records/s ({} records, 1 thread)", b.verify_and_append_records_per_s, b.verify_sample);
                println!("  audit incl. signatures    {:>10.0} records/s ({:.1} s)", b.audit_records_per_s, b.audit_s);
                println!("  batch verify speed-up     {:>10.2}x", b.batch_verify_speedup);
                println!("  audit peak RSS            {:>10.1} MiB (a tenth of the ledger: {:.1} MiB)", b.audit_peak_rss_mb, b.audit_peak_rss_mb_tenth);
                println!("  ledger on disk            {:>10.1} MiB", b.ledger_bytes_on_disk as f64 / 1048576.0);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Codec { params, codec, json }) => {
            if params == 0 {
                bail!("--params must be at least 1");
            }
            let specs = if codec.is_empty() {
                ["dense", "fp16", "bf16", "topk-int8:0.01", "topk-int8:0.1", "topk-sign:0.01", "topk-sign:0.1"]
                    .iter()
                    .map(|s| s.parse())
                    .collect::<Result<Vec<CodecSpec>, _>>()?
            } else {
                codec
            };
            let rows = meshtrain_node::bench::codec(params, &specs);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("codec benchmark: {params} parameters, one thread, MB/s of fp32 input");
                println!("{:<16} {:>10} {:>9} {:>11} {:>11} {:>11} {:>9}", "codec", "bytes", "ratio", "encode", "decode", "encode+EF", "rel err");
                for r in rows {
                    println!(
                        "{:<16} {:>10} {:>8.1}x {:>11.0} {:>11.0} {:>11.0} {:>9.4}",
                        r.codec, r.bytes, r.ratio, r.encode_mb_s, r.decode_mb_s, r.encode_ef_mb_s, r.rel_error
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || meshtrain_node::NodeError::Shard(s.to_string());
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let i: usize = i.trim().parse().map_err(|_| bad())?;
    let n: usize = n.trim().parse().map_err(|_| bad())?;
    if n == 0 || i >= n {
        return Err(bad().into());
    }
    Ok((i, n))
}

fn node_run(args: NodeRunArgs) -> Result<ExitCode> {
    let mut spec = RunSpec::load(&args.run)?;
    if let Some(c) = args.codec {
        spec.exchange.codec = c;
    }
    if let Some(h) = args.local_steps {
        if h == 0 {
            bail!("--local-steps must be at least 1");
        }
        spec.train.local_steps = h;
    }
    if let Some(a) = args.aggregator {
        spec.exchange.aggregator = a;
    }
    let shard = parse_shard(&args.shard)?;
    let opts = NodeOptions {
        data_dir: args.data_dir,
        listen: args.listen,
        bootstrap: args.bootstrap,
        spec,
        shard,
        data_path: args.data,
        wait_peers: args.wait_peers,
        wait_peers_timeout: Duration::from_secs(args.wait_peers_timeout_s),
        threads: args.threads,
        attack: args.attack,
        drain: Duration::from_secs(args.drain_s),
        sync_writes: args.sync_writes,
        eval_every: args.eval_every,
        reputation: meshtrain_node::reputation::ReputationConfig {
            ban_threshold: args.ban_threshold,
            max_offences: args.max_offences.max(1),
            ..Default::default()
        },
        retention: meshtrain_ledger::Retention {
            rounds: args.keep_payload_rounds,
            bytes: args.keep_payload_mib.map(|m| m << 20),
        },
        mesh: MeshConfig {
            mdns: args.mdns,
            ..Default::default()
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(async move {
        let node = Node::start(opts).await?;
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        node.run(shutdown).await
    })?;
    println!(
        "final test accuracy {:.4} after {} rounds; sent {} B, received {} B",
        report.final_test_acc, report.rounds_completed, report.bytes_sent, report.bytes_received
    );
    Ok(ExitCode::SUCCESS)
}

fn ledger_dir(dir: &Path) -> PathBuf {
    let inner = dir.join("ledger");
    if inner.join("CURRENT").exists() {
        inner
    } else {
        dir.to_path_buf()
    }
}

fn ledger(cmd: LedgerCommand) -> Result<ExitCode> {
    match cmd {
        LedgerCommand::Audit { dir, json } => {
            let path = ledger_dir(&dir);
            let ledger = Ledger::open_read_only(&path)?;
            let report = audit::audit(&ledger)?;
            if json {
                let mut value = serde_json::to_value(&report)?;
                value["peak_rss_mb"] = serde_json::json!(meshtrain_node::bench::peak_rss_mb());
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else if report.ok {
                println!(
                    "ledger {} is sound: {} records by {} authors ({} signatures in {} batches), {} verdict blocks ({} merged, {} clipped, {} rejected), {} payloads, {} proofs",
                    path.display(),
                    report.records,
                    report.authors,
                    report.signatures_verified,
                    report.signature_batches,
                    report.verdict_blocks,
                    report.merged,
                    report.clipped,
                    report.rejected,
                    report.payloads_checked,
                    report.proofs
                );
            } else {
                println!("ledger {} FAILED its audit:", path.display());
                for p in &report.problems {
                    println!("  {p}");
                }
            }
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        LedgerCommand::Compare { left, right } => {
            let a = Ledger::open_read_only(&ledger_dir(&left))?;
            let b = Ledger::open_read_only(&ledger_dir(&right))?;
            let report = audit::compare(&a, &b)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        LedgerCommand::Replay { dir, json } => {
            let path = ledger_dir(&dir);
            let ledger = Ledger::open_read_only(&path)?;
            let report = meshtrain_node::replay::replay(&ledger)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if report.ok {
                println!(
                    "replayed {} rounds ({} deltas) from genesis: every anchor hash matches; final anchor {}",
                    report.blocks, report.deltas, report.final_anchor
                );
            } else {
                println!(
                    "replay FAILED after {} rounds: {}",
                    report.blocks,
                    report.problem.as_deref().unwrap_or("unknown")
                );
            }
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        LedgerCommand::Export { dir } => {
            let ledger = Ledger::open_read_only(&ledger_dir(&dir))?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            audit::export(&ledger, &mut out)?;
            std::io::Write::flush(&mut out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn spec_new(args: SpecArgs) -> Result<ExitCode> {
    let data_path = args.data.clone().or_else(|| default_data_path(&args.dataset));
    let Some(data_path) = data_path else {
        bail!("no default location for dataset `{}`; pass --data DIR", args.dataset);
    };
    let splits = meshtrain_model::DataSplits::idx_dir(&args.dataset, &data_path)
        .with_context(|| format!("reading dataset {} from {}", args.dataset, data_path.display()))?;
    let mut spec = RunSpec::default_for(args.model, &args.dataset, splits.fingerprint());
    spec.seed = args.seed;
    spec.train.local_steps = args.local_steps;
    spec.train.batch_size = args.batch_size;
    spec.train.lr = args.lr;
    spec.exchange.codec = args.codec;
    spec.exchange.aggregator = args.aggregator;
    spec.exchange.outer_lr = args.outer.outer_lr;
    spec.exchange.outer_momentum = args.outer.outer_momentum;
    spec.exchange.nesterov = args.outer.nesterov;
    spec.rounds.count = match (args.rounds, args.epochs) {
        (Some(r), _) => r,
        (None, Some(e)) => {
            if !(e > 0.0) || args.nodes == 0 {
                bail!("--epochs must be positive and --nodes at least 1");
            }
            let samples = e * splits.train.len() as f64;
            let per_round = (args.nodes * args.local_steps * args.batch_size) as f64;
            (samples / per_round).ceil().max(1.0) as u64
        }
        (None, None) => spec.rounds.count,
    };
    // Check the spec the way a node will read it.
    let _ = load_data(&spec, Some(&data_path))?;
    let text = spec.to_toml()?;
    match args.out {
        Some(path) => std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn base_options(c: &CommonTestnetArgs, attack: Option<String>) -> Result<meshtrain_testnet::TestnetOptions> {
    let bin = std::env::current_exe().context("locating the meshtrain binary")?;
    if c.byzantine >= c.nodes {
        bail!("--byzantine must leave at least one honest node");
    }
    if c.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let mut spec_args = c.outer.to_args();
    spec_args.extend(["--lr".to_string(), c.lr.to_string()]);
    spec_args.extend(["--batch-size".to_string(), c.batch_size.to_string()]);
    Ok(meshtrain_testnet::TestnetOptions {
        binary: bin,
        nodes: c.nodes,
        rounds: c.rounds,
        epochs: c.epochs.or(if c.rounds.is_none() { Some(1.0) } else { None }),
        model: Arch::Mlp.to_string(),
        out: c.out.clone(),
        local_steps: 10,
        codec: CodecSpec::Dense.to_string(),
        aggregator: AggregatorSpec::CenteredClip { tau: None }.to_string(),
        byzantine: if attack.is_some() { c.byzantine } else { 0 },
        attack,
        seed: c.seed,
        data: c.data.clone(),
        timeout: Duration::from_secs(c.timeout_s),
        spec_args,
        node_args: vec!["--eval-every".to_string(), c.eval_every.to_string()],
    })
}

fn testnet_run(args: TestnetArgs) -> Result<ExitCode> {
    if args.common.byzantine > 0 && args.attack.is_none() {
        bail!("--byzantine {} needs --attack MODE", args.common.byzantine);
    }
    let opts = meshtrain_testnet::TestnetOptions {
        model: args.model.to_string(),
        local_steps: args.local_steps,
        codec: args.codec.to_string(),
        aggregator: args.aggregator.to_string(),
        ..base_options(&args.common, args.attack.map(|a| a.to_string()))?
    };
    let summary = meshtrain_testnet::run(&opts)?;
    print!("{}", meshtrain_testnet::table(&summary));
    Ok(if summary.audit_failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn testnet_matrix(args: MatrixArgs) -> Result<ExitCode> {
    let mut attacks = Vec::new();
    for a in &args.attacks {
        if a == "none" {
            attacks.push(None);
        } else {
            let parsed: Attack = a.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            attacks.push(Some(parsed.to_string()));
        }
    }
    if attacks.iter().any(Option::is_some) && args.common.byzantine == 0 {
        bail!("attacks need --byzantine K");
    }
    let mut base = base_options(&args.common, None)?;
    base.byzantine = args.common.byzantine;
    let axes = meshtrain_testnet::matrix::Axes {
        models: args.models.iter().map(|m| m.to_string()).collect(),
        codecs: args.codecs.iter().map(|c| c.to_string()).collect(),
        local_steps: args.local_steps.clone(),
        aggregators: args.aggregators.iter().map(|a| a.to_string()).collect(),
        attacks,
    };
    let out = args.common.out.clone();
    let rows = meshtrain_testnet::matrix::run_matrix(&base, &axes, &out, |i, n, r| {
        eprintln!(
            "[{i}/{n}] {} {} H={} {} {}: honest mean {:.2}%{}",
            r.model,
            r.codec,
            r.local_steps,
            r.aggregator,
            r.attack.as_deref().unwrap_or("clean"),
            100.0 * r.honest_mean_acc,
            r.error.as_deref().map(|e| format!(" (failed: {e})")).unwrap_or_default()
        );
    })?;
    print!("{}", meshtrain_testnet::matrix::markdown(&rows));
    eprintln!("tables: {} and {}", out.join("matrix.md").display(), out.join("matrix.json").display());
    Ok(ExitCode::SUCCESS)
}
