//! `meshtrain`: run a node, a local testnet, or audit a ledger.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use meshtrain_gossip::libp2p::Multiaddr;
use meshtrain_gossip::MeshConfig;
use meshtrain_ledger::{audit, Ledger};
use meshtrain_model::{AggregatorSpec, Arch, CodecSpec};
use meshtrain_node::attack::Attack;
use meshtrain_node::{Node, NodeOptions, RunSpec};

#[derive(Parser)]
#[command(
    name = "meshtrain",
    version,
    about = "Decentralized, poisoning-robust, auditable peer-to-peer training"
)]
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
    /// Import datasets into content-addressed blocks, and check them.
    #[command(subcommand)]
    Data(DataCommand),
    /// The node's config file.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print every `node run` setting with its default, as a config file.
    Default,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Parse sources into fixed-size blocks of whole records plus a manifest.
    Import(ImportArgs),
    /// Verify every block and print the dataset's statistics.
    Inspect {
        /// A block store (the --out of an import).
        dir: PathBuf,
        /// Which dataset, when the store holds several.
        #[arg(long)]
        dataset: Option<String>,
        /// Draw the class balance, brightness and contrast histograms.
        #[arg(long)]
        plot: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ImportArgs {
    #[arg(long, value_enum)]
    format: meshtrain_node::data::Format,
    /// Source files (or, for IDX, directories holding them).
    #[arg(required = true)]
    sources: Vec<PathBuf>,
    /// The block store to write.
    #[arg(long)]
    out: PathBuf,
    /// Block size in bytes (whole records only); HDFS's 64 MiB by default.
    #[arg(long, default_value_t = meshtrain_model::blocks::DEFAULT_BLOCK_SIZE)]
    block_size: usize,
    /// CSV: the column holding the class.
    #[arg(long)]
    label_column: Option<String>,
    #[arg(long)]
    name: Option<String>,
    /// Order records by class before packing (for Dirichlet partitions).
    #[arg(long)]
    sort_by_label: bool,
    /// CSV, text, and image sources that hold one split only: the share
    /// held out as the test split.
    #[arg(long, default_value_t = 0.1)]
    test_fraction: f64,
    /// Text: bytes per record.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long)]
    json: bool,
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
    /// Import throughput: Fashion-MNIST and a generated CSV.
    Data {
        /// Size of the generated CSV, in MB.
        #[arg(long, default_value_t = 1000)]
        csv_mb: u64,
        #[arg(long, default_value = "out/bench")]
        work: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Block fetch throughput between two nodes' swarms over loopback.
    Fetch {
        /// Bytes per block.
        #[arg(long, default_value_t = 1 << 20)]
        block_bytes: usize,
        #[arg(long, default_value_t = 512)]
        blocks: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 8)]
        in_flight: usize,
        #[arg(long)]
        json: bool,
    },
    /// Peer discovery: meshes grown from one bootstrap address per node,
    /// timed until every node is connected to every other.
    Discovery {
        #[arg(long, default_value_t = 100)]
        trials: usize,
        #[arg(long, default_value_t = 8)]
        nodes: usize,
        /// Seconds a trial may take before it counts as a split mesh.
        #[arg(long, default_value_t = 30)]
        limit_s: u64,
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
    #[command(args_override_self = true)]
    Run(NodeRunArgs),
    /// One screen on a running node, read from its metrics endpoint.
    Status {
        /// The node's metrics URL (as `node run --metrics` prints it), or HOST:PORT.
        #[arg(long)]
        metrics: String,
    },
}

#[derive(Args)]
struct NodeRunArgs {
    /// A TOML config whose keys are these flags' names with `_` for `-`
    /// (`meshtrain config default` lists them); flags and MESHTRAIN_<KEY>
    /// environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
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
    /// The node's block store (default: DATA_DIR/blocks). Blocks and the
    /// manifest it lacks are fetched from peers.
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
    /// Where the model trains: auto (CUDA when libtorch sees a GPU), cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    device: String,
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
    /// Write a checkpoint every N rounds (0: never).
    #[arg(long, default_value_t = 5)]
    checkpoint_every: u64,
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
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// Refuse the peer ids listed in FILE (one per line). The file is
    /// re-read when it changes; peers taken off it are dialled again.
    #[arg(long)]
    deny_peers: Option<PathBuf>,
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
    /// A block store with the dataset (default: Fashion-MNIST, imported
    /// into OUT/dataset). Node 0 seeds it; the others fetch their shards.
    #[arg(long)]
    data: Option<PathBuf>,
    /// `iid`, or `dirichlet:ALPHA` for label-skewed shards.
    #[arg(long, default_value = "iid")]
    partition: String,
    /// Members holding each block.
    #[arg(long, default_value_t = 3)]
    replication: usize,
    /// Give up on a testnet after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout_s: u64,
    /// Nodes evaluate on the test set every N rounds (always at the end).
    #[arg(long, default_value_t = 1)]
    eval_every: u64,
    /// `kill:EVERY_S:DOWN_S`: SIGKILL a random node every EVERY_S seconds
    /// and restart it DOWN_S seconds later, for the whole run.
    #[arg(long)]
    churn: Option<String>,
    /// Nodes that join a third of the way through the run.
    #[arg(long, default_value_t = 0)]
    late_join: usize,
    /// Autoencoder: the class it never trains on and scores as the anomaly.
    #[arg(long)]
    anomaly_class: Option<usize>,
    /// Early stopping: evaluations without a better held-out loss.
    #[arg(long)]
    patience: Option<u64>,
}

fn parse_churn(s: &str) -> Result<(u64, u64)> {
    let parts: Vec<&str> = s.split(':').collect();
    match parts.as_slice() {
        ["kill", every, down] => {
            let every: u64 = every
                .parse()
                .with_context(|| format!("--churn {s}: EVERY_S is not a number"))?;
            let down: u64 = down
                .parse()
                .with_context(|| format!("--churn {s}: DOWN_S is not a number"))?;
            if every == 0 {
                bail!("--churn {s}: EVERY_S must be positive");
            }
            Ok((every, down))
        }
        _ => bail!("--churn takes kill:EVERY_S:DOWN_S, got `{s}`"),
    }
}

#[derive(Args)]
struct TestnetArgs {
    #[command(flatten)]
    common: CommonTestnetArgs,
    /// Serve the report live at http://ADDR/ while the testnet runs.
    #[arg(long)]
    dashboard: Option<std::net::SocketAddr>,
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
    /// Keep every node's ledger (removed after each run by default).
    #[arg(long)]
    keep_ledgers: bool,
    /// Reuse the summaries of runs finished by an earlier invocation.
    #[arg(long)]
    resume: bool,
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
    /// A block store holding the dataset (see `data import`). By default
    /// Fashion-MNIST, imported into out/datasets/fashion-mnist on first use.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which dataset of the store, when it holds several.
    #[arg(long)]
    dataset: Option<String>,
    /// `iid`, or `dirichlet:ALPHA` for label-skewed shards.
    #[arg(long, default_value = "iid")]
    partition: String,
    /// Members holding each block.
    #[arg(long, default_value_t = 3)]
    replication: usize,
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
    /// Autoencoder: the class it never trains on and scores as the anomaly.
    #[arg(long)]
    anomaly_class: Option<usize>,
    /// Stop once this many evaluations in a row did not improve the
    /// held-out loss (early stopping).
    #[arg(long)]
    patience: Option<u64>,
    /// Write here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// `node run`'s clap command.
fn node_run_command() -> clap::Command {
    let mut cli = Cli::command();
    cli.build();
    cli.find_subcommand("node")
        .and_then(|n| n.find_subcommand("run"))
        .cloned()
        .unwrap_or_else(|| clap::Command::new("run"))
}

/// Parses the command line with `node run`'s settings also read from
/// MESHTRAIN_<KEY> variables and from `--config FILE`.
fn parse_cli() -> Result<Cli> {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let run_at = argv
        .windows(2)
        .position(|w| w[0] == "node" && w[1] == "run")
        .map(|i| i + 2);
    if let Some(at) = run_at {
        let mut config = None;
        for (i, a) in argv.iter().enumerate().skip(at) {
            let a = a.to_string_lossy();
            if let Some(path) = a.strip_prefix("--config=") {
                config = Some(PathBuf::from(path));
            } else if a == "--config" {
                config = argv.get(i + 1).map(PathBuf::from);
            }
        }
        if let Some(path) = config {
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("cannot read the config {}", path.display()))?;
            let file = path.display().to_string();
            let args = meshtrain_node::config::file_args(&file, &text, &node_run_command(), |k| {
                std::env::var_os(k).is_some()
            })?;
            argv.splice(at..at, args.into_iter().map(Into::into));
        }
    }
    let cmd = Cli::command().mut_subcommand("node", |n| {
        n.mut_subcommand("run", |r| {
            r.mut_args(|a| {
                let id = a.get_id().as_str().to_string();
                if matches!(id.as_str(), "help" | "config" | "log_format") {
                    a
                } else {
                    a.env(meshtrain_node::config::env_name(&id))
                }
            })
        })
    });
    let matches = cmd.try_get_matches_from(argv).unwrap_or_else(|e| e.exit());
    Ok(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHTRAIN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,libp2p_gossipsub=warn,libp2p_kad=error,libp2p_swarm=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    // Exit quietly when a reader of our output goes away (`| head`),
    // instead of panicking on the failed write.
    // SAFETY: restoring the default disposition of one signal at start-up,
    // before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
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
        Command::Node(NodeCommand::Status { metrics }) => node_status(&metrics),
        Command::Config(ConfigCommand::Default) => {
            print!("{}", meshtrain_node::config::default_toml(&node_run_command()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Testnet(TestnetCommand::Run(args)) => testnet_run(args),
        Command::Testnet(TestnetCommand::Matrix(args)) => testnet_matrix(args),
        Command::Ledger(cmd) => ledger(cmd),
        Command::Spec(SpecCommand::New(args)) => spec_new(args),
        Command::Data(DataCommand::Import(a)) => data_import(a),
        Command::Data(DataCommand::Inspect {
            dir,
            dataset,
            plot,
            json,
        }) => data_inspect(&dir, dataset.as_deref(), plot.as_deref(), json),
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
                println!(
                    "  append, fsync per batch   {:>10.0} records/s ({} records)",
                    b.append_sync_records_per_s, b.sync_sample
                );
                println!(
                    "  verify + append (inbox)   {:>10.0} records/s ({} records, 1 thread)",
                    b.verify_and_append_records_per_s, b.verify_sample
                );
                println!(
                    "  audit incl. signatures    {:>10.0} records/s ({:.1} s)",
                    b.audit_records_per_s, b.audit_s
                );
                println!("  batch verify speed-up     {:>10.2}x", b.batch_verify_speedup);
                println!(
                    "  audit peak RSS            {:>10.1} MiB (a tenth of the ledger: {:.1} MiB)",
                    b.audit_peak_rss_mb, b.audit_peak_rss_mb_tenth
                );
                println!(
                    "  ledger on disk            {:>10.1} MiB",
                    b.ledger_bytes_on_disk as f64 / 1048576.0
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Data { csv_mb, work, json }) => {
            std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
            let b = meshtrain_node::bench::data(&work, csv_mb * 1_000_000, Path::new(FASHION_MNIST_IDX))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!(
                    "import: Fashion-MNIST {} records in {:.2} s ({:.0} records/s, {:.1} MB/s of gzipped source); CSV {:.0} MB, {} rows in {:.1} s ({:.1} MB/s, {:.0} rows/s)",
                    b.idx_records, b.idx_seconds, b.idx_records_per_s, b.idx_source_mb_per_s,
                    b.csv_bytes as f64 / 1e6, b.csv_rows, b.csv_seconds, b.csv_mb_per_s, b.csv_rows_per_s
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Fetch {
            block_bytes,
            blocks,
            in_flight,
            json,
        }) => {
            if block_bytes == 0 || blocks == 0 || in_flight == 0 {
                bail!("--block-bytes, --blocks and --in-flight must be positive");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let b = rt.block_on(meshtrain_node::bench::fetch(block_bytes, blocks, in_flight))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!(
                    "fetched {} blocks of {} bytes ({} in flight) in {:.2} s: {:.0} MB/s",
                    b.blocks, b.block_bytes, b.in_flight, b.seconds, b.mb_per_s
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Discovery {
            trials,
            nodes,
            limit_s,
            json,
        }) => {
            if trials == 0 || nodes < 2 {
                bail!("--trials must be positive and --nodes at least 2");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let b = rt.block_on(meshtrain_node::bench::discovery(
                trials,
                nodes,
                Duration::from_secs(limit_s),
            ))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!(
                    "{} trials of {} nodes, one bootstrap address each: {} incomplete meshes; full mesh after {:.2} s median, {:.2} s worst",
                    b.trials, b.nodes, b.incomplete, b.seconds_median, b.seconds_max
                );
            }
            Ok(if b.incomplete == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Bench(BenchCommand::Codec { params, codec, json }) => {
            if params == 0 {
                bail!("--params must be at least 1");
            }
            let specs = if codec.is_empty() {
                [
                    "dense",
                    "fp16",
                    "bf16",
                    "topk-int8:0.01",
                    "topk-int8:0.1",
                    "topk-sign:0.01",
                    "topk-sign:0.1",
                ]
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
                println!(
                    "{:<16} {:>10} {:>9} {:>11} {:>11} {:>11} {:>9}",
                    "codec", "bytes", "ratio", "encode", "decode", "encode+EF", "rel err"
                );
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

fn node_status(url: &str) -> Result<ExitCode> {
    let url = if url.starts_with("http://") {
        url.to_string()
    } else {
        format!("http://{url}/metrics")
    };
    let text = ureq::get(&url)
        .call()
        .with_context(|| format!("cannot read {url}"))?
        .body_mut()
        .read_to_string()
        .with_context(|| format!("cannot read the body of {url}"))?;
    let status = meshtrain_node::status::Status::parse(&text)
        .with_context(|| format!("{url} does not look like a meshtrain node's metrics"))?;
    print!("{status}");
    Ok(ExitCode::SUCCESS)
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
        data: args.data,
        wait_peers: args.wait_peers,
        wait_peers_timeout: Duration::from_secs(args.wait_peers_timeout_s),
        threads: args.threads,
        device: meshtrain_model::device(&args.device)?,
        attack: args.attack,
        drain: Duration::from_secs(args.drain_s),
        sync_writes: args.sync_writes,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
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
        metrics: args.metrics,
        deny_peers: args.deny_peers,
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
    let mut task = String::new();
    if let Some(p) = report.final_task.perplexity {
        task.push_str(&format!(
            ", {:.4} nats/char (perplexity {p:.2})",
            report.final_test_loss
        ));
    }
    if let Some(a) = report.final_task.roc_auc {
        task.push_str(&format!(", anomaly ROC-AUC {a:.4}"));
    }
    if let Some(f) = report.final_task.macro_f1 {
        task.push_str(&format!(", macro F1 {f:.4}"));
    }
    println!(
        "final test accuracy {:.4}{task} after {} rounds; sent {} B, received {} B",
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
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        LedgerCommand::Compare { left, right } => {
            let a = Ledger::open_read_only(&ledger_dir(&left))?;
            let b = Ledger::open_read_only(&ledger_dir(&right))?;
            let report = audit::compare(&a, &b)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
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
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
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

/// The default dataset: Fashion-MNIST from Debian's package, imported
/// into content-addressed blocks (1 MiB, so that a mesh has blocks to
/// spread) on first use.
const DEFAULT_STORE: &str = "out/datasets/fashion-mnist";
const FASHION_MNIST_IDX: &str = "/usr/share/datasets/fashion-mnist";

fn default_store() -> Result<PathBuf> {
    let store = PathBuf::from(DEFAULT_STORE);
    let has_manifest = meshtrain_node::blockstore::BlockStore::open(&store)
        .map(|s| !s.manifest_ids().is_empty())
        .unwrap_or(false);
    if !has_manifest {
        let src = PathBuf::from(FASHION_MNIST_IDX);
        if !src.exists() {
            bail!("{FASHION_MNIST_IDX} is missing: install Debian's dataset-fashion-mnist (scripts/setup.sh does), or pass --data STORE");
        }
        let r = meshtrain_node::data::import(&meshtrain_node::data::ImportOptions {
            format: meshtrain_node::data::Format::Idx,
            sources: vec![src],
            out: store.clone(),
            block_size: 1 << 20,
            name: Some("fashion-mnist".into()),
            label_column: None,
            sort_by_label: false,
            test_fraction: 0.0,
            seq_len: 1,
        })?;
        eprintln!(
            "imported Fashion-MNIST into {} as dataset {}",
            store.display(),
            r.dataset_id
        );
    }
    Ok(store)
}

/// The manifest a spec or a testnet names: the only one in the store, or
/// the one given.
fn pick_manifest(store_dir: &Path, dataset: Option<&str>) -> Result<meshtrain_model::Manifest> {
    let store = meshtrain_node::blockstore::BlockStore::open(store_dir)?;
    let id = match (dataset, store.manifest_ids().as_slice()) {
        (Some(id), _) => id.to_string(),
        (None, [one]) => one.clone(),
        (None, []) => bail!(
            "{} holds no dataset; run `meshtrain data import` first",
            store_dir.display()
        ),
        (None, _) => bail!("{} holds several datasets; pass --dataset ID", store_dir.display()),
    };
    store
        .manifest(&id)?
        .with_context(|| format!("{} has no manifest {id}", store_dir.display()))
}

fn spec_new(args: SpecArgs) -> Result<ExitCode> {
    let store = match &args.data {
        Some(d) => d.clone(),
        None => default_store()?,
    };
    let manifest = pick_manifest(&store, args.dataset.as_deref())?;
    let mut spec = RunSpec::default_for(args.model, &manifest);
    spec.seed = args.seed;
    spec.train.local_steps = args.local_steps;
    spec.train.batch_size = args.batch_size;
    spec.train.lr = args.lr;
    spec.exchange.codec = args.codec;
    spec.exchange.aggregator = args.aggregator;
    spec.exchange.outer_lr = args.outer.outer_lr;
    spec.exchange.outer_momentum = args.outer.outer_momentum;
    spec.exchange.nesterov = args.outer.nesterov;
    spec.data.partition = args
        .partition
        .parse::<meshtrain_node::placement::Partition>()
        .map_err(|e| anyhow::anyhow!(e))?
        .to_string();
    spec.data.replication = args.replication.max(1);
    spec.model.anomaly_class = args.anomaly_class;
    spec.rounds.patience = args.patience;
    spec.rounds.count = match (args.rounds, args.epochs) {
        (Some(r), _) => r,
        (None, Some(e)) => {
            if !(e > 0.0) || args.nodes == 0 {
                bail!("--epochs must be positive and --nodes at least 1");
            }
            let samples = e * manifest.records("train") as f64;
            let per_round = (args.nodes * args.local_steps * args.batch_size) as f64;
            (samples / per_round).ceil().max(1.0) as u64
        }
        (None, None) => spec.rounds.count,
    };
    spec.check()
        .map_err(|e| anyhow::anyhow!("the spec is not valid: {e}"))?;
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
    if let Some(a) = c.anomaly_class {
        spec_args.extend(["--anomaly-class".to_string(), a.to_string()]);
    }
    if let Some(p) = c.patience {
        spec_args.extend(["--patience".to_string(), p.to_string()]);
    }
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
        partition: c
            .partition
            .parse::<meshtrain_node::placement::Partition>()
            .map_err(|e| anyhow::anyhow!(e))?
            .to_string(),
        replication: c.replication.max(1),
        timeout: Duration::from_secs(c.timeout_s),
        spec_args,
        node_args: vec!["--eval-every".to_string(), c.eval_every.to_string()],
        churn: c.churn.as_deref().map(parse_churn).transpose()?,
        late_join: c.late_join,
        dashboard: None,
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
        dashboard: args.dashboard,
        ..base_options(&args.common, args.attack.map(|a| a.to_string()))?
    };
    let summary = meshtrain_testnet::run(&opts)?;
    print!("{}", meshtrain_testnet::table(&summary));
    Ok(if summary.audit_failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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
    let policy = meshtrain_testnet::matrix::MatrixPolicy {
        keep_ledgers: args.keep_ledgers,
        resume: args.resume,
    };
    let rows = meshtrain_testnet::matrix::run_matrix(&base, &axes, &out, policy, |i, n, r| {
        eprintln!(
            "[{i}/{n}] {} {} H={} {} {}: honest mean {:.2}%{}",
            r.model,
            r.codec,
            r.local_steps,
            r.aggregator,
            r.attack.as_deref().unwrap_or("clean"),
            100.0 * r.honest_mean_acc,
            r.error
                .as_deref()
                .map(|e| format!(" (failed: {e})"))
                .unwrap_or_default()
        );
    })?;
    print!("{}", meshtrain_testnet::matrix::markdown(&rows));
    eprintln!(
        "tables: {} and {}",
        out.join("matrix.md").display(),
        out.join("matrix.json").display()
    );
    Ok(ExitCode::SUCCESS)
}

fn data_import(a: ImportArgs) -> Result<ExitCode> {
    if !(0.0..1.0).contains(&a.test_fraction) {
        bail!("--test-fraction must be in [0, 1)");
    }
    let report = meshtrain_node::data::import(&meshtrain_node::data::ImportOptions {
        format: a.format,
        sources: a.sources,
        out: a.out,
        block_size: a.block_size,
        name: a.name,
        label_column: a.label_column,
        sort_by_label: a.sort_by_label,
        test_fraction: a.test_fraction,
        seq_len: a.seq_len,
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "imported {} as dataset {}: {} records in {} blocks ({:.1} MB) in {:.2} s ({:.1} MB/s of source); manifest {}",
            report.name,
            report.dataset_id,
            report.records.iter().map(|(s, n)| format!("{n} {s}")).collect::<Vec<_>>().join(" + "),
            report.blocks,
            report.bytes as f64 / 1e6,
            report.seconds,
            report.mb_per_s,
            report.manifest.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn data_inspect(dir: &Path, dataset: Option<&str>, plot: Option<&Path>, json: bool) -> Result<ExitCode> {
    let r = meshtrain_node::data::inspect(dir, dataset)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("dataset {} ({}): {}", r.name, r.dataset_id, r.schema);
        println!("blocks checked: {}, bad: {}", r.blocks_checked, r.bad_blocks.len());
        for b in &r.bad_blocks {
            println!("  BAD BLOCK {b}");
        }
        for (split, n) in &r.records {
            println!(
                "{split}: {n} records, class balance {:?}",
                r.class_balance.get(split).cloned().unwrap_or_default()
            );
        }
        for (c, (m, s)) in r.channel_stats.iter().enumerate() {
            println!("channel {c}: mean {m:.4}, std {s:.4}");
        }
        println!(
            "brightness histogram (per-image mean, 0..1): {:?}",
            r.brightness_histogram
        );
        println!("contrast histogram (per-image std, 0..0.5): {:?}", r.contrast_histogram);
        let (lo, mean, hi) = r.records_per_block;
        println!("records per block: min {lo}, mean {mean:.1}, max {hi}");
    }
    if let Some(path) = plot {
        use meshtrain_testnet::plot::{bars_png, Bars};
        let bins = |n: usize, top: f64| (0..n).map(|i| format!("{:.2}", top * i as f64 / n as f64)).collect();
        let mut charts = Vec::new();
        for (split, balance) in &r.class_balance {
            charts.push(Bars {
                title: format!("class balance ({split})"),
                labels: (0..balance.len()).map(|i| i.to_string()).collect(),
                values: balance.iter().map(|v| *v as f64).collect(),
            });
        }
        if r.brightness_histogram.iter().any(|v| *v > 0) {
            charts.push(Bars {
                title: "brightness: per-image mean pixel (train)".into(),
                labels: bins(r.brightness_histogram.len(), 1.0),
                values: r.brightness_histogram.iter().map(|v| *v as f64).collect(),
            });
            charts.push(Bars {
                title: "contrast: per-image pixel std (train)".into(),
                labels: bins(r.contrast_histogram.len(), 0.5),
                values: r.contrast_histogram.iter().map(|v| *v as f64).collect(),
            });
        }
        bars_png(path, &charts).map_err(|e| anyhow::anyhow!("plotting {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(if r.bad_blocks.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
