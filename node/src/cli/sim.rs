//! `meshtrain sim`: the deterministic simulator over many seeds.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use meshtrain_model::{AggregatorSpec, CodecSpec};
use meshtrain_node::attack::Attack;
use meshtrain_node::sim::{run_seeds, SimAdmission, SimConfig};

#[derive(Args)]
pub(super) struct SimArgs {
    /// Honest nodes.
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    /// Attacking nodes besides them (with --attack).
    #[arg(long, default_value_t = 0)]
    byzantine: usize,
    #[arg(long)]
    attack: Option<Attack>,
    #[arg(long, default_value_t = 30)]
    rounds: u64,
    /// How many seeds to run.
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// The first seed (replay one failure with --seed-from S --seeds 1).
    #[arg(long, default_value_t = 0)]
    seed_from: u64,
    /// While faults last: share of messages lost ...
    #[arg(long, default_value_t = 0.02)]
    drop: f64,
    /// ... and duplicated.
    #[arg(long, default_value_t = 0.02)]
    dup: f64,
    /// While faults last: link delay range, MIN:MAX milliseconds.
    #[arg(long, default_value = "1:80")]
    delay_ms: String,
    /// Split the mesh in two for a few rounds, then heal.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    partitions: bool,
    /// Crash nodes and restart them from their ledger and checkpoint.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    crashes: bool,
    /// Honest nodes that start a third of the way through.
    #[arg(long, default_value_t = 0)]
    late_join: usize,
    #[arg(long, default_value = "dense")]
    codec: CodecSpec,
    #[arg(long, default_value = "centered-clip")]
    aggregator: AggregatorSpec,
    /// Who may contribute: `permissioned` (a roster of the nodes) or
    /// `open` (anyone; a key earns its vote after --earn-rounds merged rounds).
    #[arg(long, default_value = "permissioned")]
    admission: String,
    /// In open admission, merged rounds before a key has a vote.
    #[arg(long, default_value_t = 3)]
    earn_rounds: u64,
    /// In open admission, nobody founds the run: no key has a vote until
    /// it earns one (as in a spec without `founders`). By default the
    /// nodes that start the run are its founders.
    #[arg(long)]
    no_founders: bool,
    /// Identities one attacker runs besides the nodes; each signs a poisoned
    /// update every round and votes for a poisoned anchor.
    #[arg(long, default_value_t = 0)]
    sybils: usize,
    /// The Sybils claim their poisoned anchor as their base and offer it,
    /// self-attested, to anyone who asks (needs --sybils).
    #[arg(long)]
    hijack: bool,
    /// Every node but node 0 spends this many milliseconds more on its
    /// first round (fetching its shard over a slow link).
    #[arg(long, default_value_t = 0)]
    slow_first_ms: u64,
    /// Milliseconds each node's local steps take (the stand-in's training
    /// time, before jitter).
    #[arg(long, default_value_t = 100)]
    train_ms: u64,
    /// Loss scoring before the aggregator (on the stand-in's held-out
    /// loss): `RECORDS[:TOLERANCE]`, e.g. `1`.
    #[arg(long)]
    score: Option<meshtrain_node::runspec::ScoreSpec>,
    /// Threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Print every failed seed's violations.
    #[arg(long)]
    verbose: bool,
    /// The summary as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_delay(s: &str) -> Result<(u64, u64)> {
    let Some((a, b)) = s.split_once(':') else {
        bail!("--delay-ms takes MIN:MAX, got `{s}`")
    };
    let (a, b): (u64, u64) = (a.trim().parse()?, b.trim().parse()?);
    if a == 0 || a > b {
        bail!("--delay-ms {s}: need 0 < MIN <= MAX");
    }
    Ok((a, b))
}

pub(super) fn run(a: SimArgs) -> Result<ExitCode> {
    if a.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    if a.byzantine > 0 && a.attack.is_none() {
        bail!("--byzantine {} needs --attack MODE", a.byzantine);
    }
    if !(0.0..1.0).contains(&a.drop) || !(0.0..1.0).contains(&a.dup) {
        bail!("--drop and --dup must be in [0, 1)");
    }
    if a.rounds == 0 || a.seeds == 0 {
        bail!("--rounds and --seeds must be at least 1");
    }
    if a.no_founders && a.admission != "open" {
        bail!("--no-founders is for --admission open");
    }
    if a.hijack && a.sybils == 0 {
        bail!("--hijack needs --sybils K");
    }
    let admission = match a.admission.as_str() {
        "permissioned" => SimAdmission::Permissioned,
        "open" => SimAdmission::Open {
            earn_rounds: a.earn_rounds,
            founded: !a.no_founders,
        },
        other => bail!("--admission takes `permissioned` or `open`, got `{other}`"),
    };
    let cfg = SimConfig {
        nodes: a.nodes,
        byzantine: a.byzantine,
        attack: a.attack,
        rounds: a.rounds,
        codec: a.codec,
        aggregator: a.aggregator,
        late_join: a.late_join,
        drop: a.drop,
        dup: a.dup,
        delay_ms: parse_delay(&a.delay_ms)?,
        partitions: a.partitions,
        crashes: a.crashes,
        admission,
        sybils: a.sybils,
        hijack: a.hijack,
        slow_first_ms: a.slow_first_ms,
        train_ms: a.train_ms,
        score: a.score,
        ..SimConfig::default()
    };
    let threads = a.threads.unwrap_or_else(meshtrain_node::cores);
    let seeds = a.seed_from..a.seed_from.saturating_add(a.seeds);
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        Some(indicatif::ProgressBar::new(a.seeds))
    } else {
        None
    };
    let summary = run_seeds(&cfg, seeds.clone(), threads, |done| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{}", summary.line(&seeds));
        if a.verbose || a.seeds == 1 {
            for f in &summary.failed {
                for v in &f.violations {
                    println!("  seed {}: {v}", f.seed);
                }
            }
        }
    }
    Ok(if summary.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
