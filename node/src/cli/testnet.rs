//! `meshtrain testnet run|matrix`: local meshes of node processes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use meshtrain_model::{AggregatorSpec, Arch, CodecSpec};
use meshtrain_node::attack::Attack;

use super::spec::OuterArgs;

#[derive(Subcommand)]
pub(super) enum TestnetCommand {
    /// Start N node processes (on loopback, or each in its own network
    /// namespace), wait for them, report.
    Run(TestnetArgs),
    /// Run a grid of testnets (lists are comma-separated) and tabulate them.
    Matrix(MatrixArgs),
}

/// What every testnet of a run or a matrix shares.
#[derive(Args)]
pub(super) struct CommonTestnetArgs {
    #[arg(long, default_value_t = 4)]
    pub(super) nodes: usize,
    /// Rounds to run (or give --epochs).
    #[arg(long, conflicts_with = "epochs")]
    pub(super) rounds: Option<u64>,
    /// Passes over the whole training set, summed over nodes.
    #[arg(long)]
    pub(super) epochs: Option<f64>,
    #[arg(long, default_value = "out/testnet")]
    pub(super) out: PathBuf,
    #[command(flatten)]
    pub(super) outer: OuterArgs,
    /// Inner (Adam) learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub(super) lr: f64,
    #[arg(long, default_value_t = 64)]
    pub(super) batch_size: usize,
    /// How many nodes (the last ones) attack, when an attack is given.
    #[arg(long, default_value_t = 0)]
    pub(super) byzantine: usize,
    #[arg(long, default_value_t = 42)]
    pub(super) seed: u64,
    /// A block store with the dataset (default: Fashion-MNIST, imported
    /// into OUT/dataset). Node 0 seeds it; the others fetch their shards.
    #[arg(long)]
    pub(super) data: Option<PathBuf>,
    /// `iid`, or `dirichlet:ALPHA` for label-skewed shards.
    #[arg(long, default_value = "iid")]
    pub(super) partition: String,
    /// Members holding each block.
    #[arg(long, default_value_t = 3)]
    pub(super) replication: usize,
    /// `permissioned` (the default: the run admits exactly the testnet's
    /// nodes, whose keys go to OUT/members.txt) or `open` (anyone may join;
    /// a key earns its vote by merged rounds).
    #[arg(long, default_value = "permissioned", value_parser = ["permissioned", "open"])]
    pub(super) admission: String,
    /// Give up on a testnet after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub(super) timeout_s: u64,
    /// Nodes evaluate on the test set every N rounds (always at the end).
    #[arg(long, default_value_t = 1)]
    pub(super) eval_every: u64,
    /// `kill:EVERY_S:DOWN_S`: SIGKILL a random node every EVERY_S seconds
    /// and restart it DOWN_S seconds later, for the whole run.
    #[arg(long)]
    pub(super) churn: Option<String>,
    /// Nodes that join a third of the way through the run.
    #[arg(long, default_value_t = 0)]
    pub(super) late_join: usize,
    /// Autoencoder: the class it never trains on and scores as the anomaly.
    #[arg(long)]
    pub(super) anomaly_class: Option<usize>,
    /// Early stopping: evaluations without a better held-out loss.
    #[arg(long)]
    pub(super) patience: Option<u64>,
    /// Loss scoring before the aggregator: `RECORDS[:TOLERANCE]`, e.g. `256`
    /// (see `spec new --score`).
    #[arg(long)]
    pub(super) score: Option<meshtrain_node::runspec::ScoreSpec>,
    /// Train with logit adjustment by each shard's label prior (see `spec
    /// new --label-prior`; on by default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(super) label_prior: bool,
    /// `loopback` (every node on 127.0.0.1) or `netns` (each node in its
    /// own network namespace with its own address, on a bridge; needs
    /// root). Netns nodes find each other only through one bootstrap
    /// address and Kademlia.
    #[arg(long, default_value = "loopback")]
    pub(super) hosts: meshtrain_testnet::Hosts,
    /// Netns: every node's link rate, both directions, shaped with tbf
    /// (e.g. 20mbit, 500kbit, 1gbit). Unshaped without it.
    #[arg(long)]
    pub(super) link: Option<meshtrain_testnet::netns::Rate>,
    /// Netns: `NODES:RATE` for a few slower (or faster) hosts, e.g.
    /// `7:2mbit` or `2,4-5:10mbit`. Repeatable.
    #[arg(long)]
    pub(super) slow: Vec<String>,
    /// Netns: `AT_ROUND:ROUNDS:GROUPS`: from round AT_ROUND, for ROUNDS
    /// rounds, the nodes are split into GROUPS contiguous groups whose
    /// links cannot reach each other. (`--partition` is the data's.)
    #[arg(long)]
    pub(super) cut: Option<meshtrain_testnet::netns::Cut>,
    /// Report when every honest node first reached this test accuracy
    /// (a fraction, e.g. 0.86).
    #[arg(long)]
    pub(super) target_acc: Option<f32>,
    /// libtorch threads per node (default: the machine's cores divided
    /// among the nodes, at least one each).
    #[arg(long)]
    pub(super) threads: Option<usize>,
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
pub(super) struct TestnetArgs {
    #[command(flatten)]
    pub(super) common: CommonTestnetArgs,
    /// Serve the report live at http://ADDR/ while the testnet runs.
    #[arg(long)]
    pub(super) dashboard: Option<std::net::SocketAddr>,
    /// A built-in model, or `torchscript:FILE` (see `spec new --model`).
    #[arg(long, default_value = "mlp")]
    pub(super) model: meshtrain_node::model_file::ModelChoice,
    /// H: local steps per round.
    #[arg(long, default_value_t = 10)]
    pub(super) local_steps: usize,
    /// How deltas are compressed (`dense` sends them whole).
    #[arg(long, default_value = CodecSpec::DEFAULT_NAME)]
    pub(super) codec: CodecSpec,
    /// Robust aggregation rule (CenteredClip by default).
    #[arg(long, default_value = "centered-clip")]
    pub(super) aggregator: AggregatorSpec,
    /// What the attackers do: one mode, or a list given to the attackers in
    /// turn (`--byzantine 3 --attack sign-flip,alie:1.5,label-flip`).
    #[arg(long, value_delimiter = ',')]
    pub(super) attack: Vec<Attack>,
}

#[derive(Args)]
pub(super) struct MatrixArgs {
    #[command(flatten)]
    pub(super) common: CommonTestnetArgs,
    #[arg(long, value_delimiter = ',', default_value = "mlp")]
    pub(super) models: Vec<Arch>,
    #[arg(long, value_delimiter = ',', default_value = "10")]
    pub(super) local_steps: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = CodecSpec::DEFAULT_NAME)]
    pub(super) codecs: Vec<CodecSpec>,
    #[arg(long, value_delimiter = ',', default_value = "centered-clip")]
    pub(super) aggregators: Vec<AggregatorSpec>,
    /// Attacks (`none` for the clean run; `a+b+c` gives the modes to the
    /// --byzantine attackers in turn), each row with --byzantine attackers.
    #[arg(long, value_delimiter = ',', default_value = "none")]
    pub(super) attacks: Vec<String>,
    /// Netns link rates to compare (every node's link; overrides --link),
    /// e.g. `10mbit,50mbit,1gbit`.
    #[arg(long, value_delimiter = ',')]
    pub(super) links: Vec<meshtrain_testnet::netns::Rate>,
    /// Keep every node's ledger (removed after each run by default).
    #[arg(long)]
    pub(super) keep_ledgers: bool,
    /// Reuse the summaries of runs finished by an earlier invocation.
    #[arg(long)]
    pub(super) resume: bool,
}

pub(super) fn run(command: TestnetCommand) -> Result<ExitCode> {
    match command {
        TestnetCommand::Run(args) => testnet_run(args),
        TestnetCommand::Matrix(args) => testnet_matrix(args),
    }
}

fn base_options(c: &CommonTestnetArgs, attack: Option<String>) -> Result<meshtrain_testnet::TestnetOptions> {
    let bin = std::env::current_exe().context("locating the meshtrain binary")?;
    if c.byzantine >= c.nodes {
        bail!("--byzantine must leave at least one honest node");
    }
    if c.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if c.hosts != meshtrain_testnet::Hosts::Netns && (c.link.is_some() || !c.slow.is_empty() || c.cut.is_some()) {
        bail!("--link, --slow and --cut shape the links between hosts: they need --hosts netns");
    }
    if let Some(t) = c.target_acc {
        if !(t > 0.0 && t <= 1.0) {
            bail!("--target-acc {t}: give a fraction in (0, 1], e.g. 0.86");
        }
    }
    let mut slow = Vec::new();
    for s in &c.slow {
        slow.extend(meshtrain_testnet::netns::parse_slow(s).map_err(|e| anyhow::anyhow!(e))?);
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
    if let Some(s) = c.score {
        spec_args.extend(["--score".to_string(), format!("{}:{}", s.records, s.tolerance)]);
    }
    spec_args.extend(["--label-prior".to_string(), c.label_prior.to_string()]);
    Ok(meshtrain_testnet::TestnetOptions {
        binary: bin,
        nodes: c.nodes,
        rounds: c.rounds,
        epochs: c.epochs.or(if c.rounds.is_none() { Some(1.0) } else { None }),
        model: Arch::Mlp.to_string(),
        out: c.out.clone(),
        local_steps: 10,
        codec: CodecSpec::DEFAULT.to_string(),
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
        admission: c.admission.clone(),
        hosts: c.hosts,
        link: c.link.clone(),
        slow,
        cut: c.cut,
        target_acc: c.target_acc,
        threads: c.threads,
    })
}

/// The testnet's form of an attack list: modes separated by commas, given
/// to the attackers in turn.
fn join_attacks(list: &[Attack]) -> String {
    list.iter().map(Attack::to_string).collect::<Vec<_>>().join(",")
}

/// Runs one testnet as `testnet run` does (`bench round` too).
pub(super) fn run_one(args: TestnetArgs) -> Result<meshtrain_testnet::report::Summary> {
    if args.common.byzantine > 0 && args.attack.is_empty() {
        bail!("--byzantine {} needs --attack MODE", args.common.byzantine);
    }
    let attack = (!args.attack.is_empty()).then(|| join_attacks(&args.attack));
    let opts = meshtrain_testnet::TestnetOptions {
        model: match &args.model {
            // spec new runs as a child process: give it a path that does
            // not depend on where it runs.
            meshtrain_node::model_file::ModelChoice::Script(p) => {
                format!("torchscript:{}", std::path::absolute(p)?.display())
            }
            m => m.to_string(),
        },
        local_steps: args.local_steps,
        codec: args.codec.to_string(),
        aggregator: args.aggregator.to_string(),
        dashboard: args.dashboard,
        ..base_options(&args.common, attack)?
    };
    Ok(meshtrain_testnet::run(&opts)?)
}

fn testnet_run(args: TestnetArgs) -> Result<ExitCode> {
    let summary = run_one(args)?;
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
            // `a+b+c`: a row of mixed attackers, given the modes in turn.
            let parsed = a
                .split('+')
                .map(|m| m.parse::<Attack>().map_err(|e: String| anyhow::anyhow!(e)))
                .collect::<Result<Vec<_>>>()?;
            attacks.push(Some(join_attacks(&parsed)));
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
        links: args.links.clone(),
    };
    if !args.links.is_empty() && args.common.hosts != meshtrain_testnet::Hosts::Netns {
        bail!("--links shapes the links between hosts: it needs --hosts netns");
    }
    let out = args.common.out.clone();
    let policy = meshtrain_testnet::matrix::MatrixPolicy {
        keep_ledgers: args.keep_ledgers,
        resume: args.resume,
    };
    let rows = meshtrain_testnet::matrix::run_matrix(&base, &axes, &out, policy, |i, n, r| {
        eprintln!(
            "[{i}/{n}] {} {} H={} {} {}{}: honest mean {:.2}%{}{}",
            r.model,
            r.codec,
            r.local_steps,
            r.aggregator,
            r.attack.as_deref().unwrap_or("clean"),
            r.link.as_deref().map(|l| format!(" at {l}")).unwrap_or_default(),
            100.0 * r.honest_mean_acc,
            r.time_to_target_s
                .map(|t| format!(", target in {t:.1} s"))
                .unwrap_or_default(),
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
