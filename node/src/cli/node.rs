//! `meshtrain node run|status`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use meshtrain_gossip::libp2p::Multiaddr;
use meshtrain_gossip::MeshConfig;
use meshtrain_model::{AggregatorSpec, CodecSpec};
use meshtrain_node::attack::Attack;
use meshtrain_node::{Node, NodeOptions, RunSpec};

#[derive(Subcommand)]
pub(super) enum NodeCommand {
    /// Join (or start) a training mesh.
    #[command(args_override_self = true)]
    Run(Box<NodeRunArgs>),
    /// One screen on a running node, read from its metrics endpoint.
    Status {
        /// The node's metrics URL (as `node run --metrics` prints it), or HOST:PORT.
        #[arg(long)]
        metrics: String,
    },
}

#[derive(Args)]
pub(super) struct NodeRunArgs {
    /// A TOML config whose keys are these flags' names with `_` for `-`
    /// (`meshtrain config default` lists them); flags and MESHTRAIN_<KEY>
    /// environment variables override it.
    #[arg(long)]
    pub(super) config: Option<PathBuf>,
    /// Keeps the identity key, the ledger and the results.
    #[arg(long)]
    pub(super) data_dir: PathBuf,
    /// Multiaddr to listen on (repeatable).
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
    pub(super) listen: Vec<Multiaddr>,
    /// Multiaddr of a peer already in the mesh, with /p2p/<peer id> (repeatable).
    #[arg(long)]
    pub(super) bootstrap: Vec<Multiaddr>,
    /// The run spec (TOML) every node of the mesh shares.
    #[arg(long)]
    pub(super) run: PathBuf,
    /// Override the spec's codec (every node of the mesh must do the same:
    /// the run id changes).
    #[arg(long)]
    pub(super) codec: Option<CodecSpec>,
    /// Override the spec's local steps per round (H); same caveat.
    #[arg(long)]
    pub(super) local_steps: Option<usize>,
    /// Override the spec's aggregator; same caveat.
    #[arg(long)]
    pub(super) aggregator: Option<AggregatorSpec>,
    /// Which shard of the training set to train on, as I/N.
    #[arg(long, default_value = "0/1")]
    pub(super) shard: String,
    /// The node's block store (default: DATA_DIR/blocks). Blocks and the
    /// manifest it lacks are fetched from peers.
    #[arg(long)]
    pub(super) data: Option<PathBuf>,
    /// Peers to wait for before the first round.
    #[arg(long, default_value_t = 0)]
    pub(super) wait_peers: usize,
    /// Start anyway after this many seconds without enough peers.
    #[arg(long, default_value_t = 120)]
    pub(super) wait_peers_timeout_s: u64,
    /// libtorch threads for this node (default: every core; `testnet`
    /// divides the cores among the nodes it starts).
    #[arg(long)]
    pub(super) threads: Option<usize>,
    /// Where the model trains: auto (CUDA when libtorch sees a GPU), cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub(super) device: String,
    /// Testnet and tests only: behave as an attacker (see DESIGN §6).
    #[arg(long)]
    pub(super) attack: Option<Attack>,
    /// Seconds to linger after the last round, serving peers.
    #[arg(long, default_value_t = 30)]
    pub(super) drain_s: u64,
    /// fsync every ledger write (own records are always synced).
    #[arg(long)]
    pub(super) sync_writes: bool,
    /// Evaluate the anchor on the test set every N rounds (always at the end).
    #[arg(long, default_value_t = 1)]
    pub(super) eval_every: u64,
    /// Write a checkpoint every N rounds (0: never).
    #[arg(long, default_value_t = 5)]
    pub(super) checkpoint_every: u64,
    /// Ban an author whose smoothed badness (0 merged .. 1 rejected) exceeds this.
    #[arg(long, default_value_t = 0.5)]
    pub(super) ban_threshold: f32,
    /// Ban an author after this many protocol offences.
    #[arg(long, default_value_t = 2)]
    pub(super) max_offences: u32,
    /// Keep payloads of only the last N rounds (default: all, which a
    /// replay audit needs).
    #[arg(long)]
    pub(super) keep_payload_rounds: Option<u64>,
    /// Keep at most this many MiB of payloads, oldest rounds dropped first.
    #[arg(long)]
    pub(super) keep_payload_mib: Option<u64>,
    /// Discover peers on the LAN by mDNS.
    #[arg(long)]
    pub(super) mdns: bool,
    /// A libp2p private network key (the `/key/swarm/psk/1.0.0/` format,
    /// 64 hex digits): peers without it cannot complete a handshake.
    #[arg(long)]
    pub(super) psk_file: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100).
    #[arg(long)]
    pub(super) metrics: Option<std::net::SocketAddr>,
    /// Refuse the peer ids listed in FILE (one per line). The file is
    /// re-read when it changes; peers taken off it are dialled again.
    #[arg(long)]
    pub(super) deny_peers: Option<PathBuf>,
}

pub(super) fn run(command: NodeCommand) -> Result<ExitCode> {
    match command {
        NodeCommand::Run(args) => node_run(*args),
        NodeCommand::Status { metrics } => node_status(&metrics),
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
        threads: args.threads.unwrap_or_else(meshtrain_node::cores),
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
            psk: args.psk_file.as_deref().map(read_psk).transpose()?,
            ..Default::default()
        },
        metrics: args.metrics,
        deny_peers: args.deny_peers,
    };
    let runtime = super::runtime()?;
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
    // results.json holds this already: a closed or full stdout is no
    // reason to fail (println! would panic).
    let _ = writeln!(
        std::io::stdout(),
        "final test accuracy {:.4}{task} after {} rounds; sent {} B, received {} B",
        report.final_test_acc,
        report.rounds_completed,
        report.bytes_sent,
        report.bytes_received
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads a private network key file (the IPFS swarm.key format).
fn read_psk(path: &std::path::Path) -> Result<meshtrain_gossip::libp2p::pnet::PreSharedKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the network key {}", path.display()))?;
    text.parse().map_err(|e| {
        anyhow::anyhow!(
            "{}: not a private network key ({e}); expected `/key/swarm/psk/1.0.0/`, `/base16/` and 64 hex digits on three lines",
            path.display()
        )
    })
}
