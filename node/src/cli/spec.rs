//! `meshtrain spec new`, and the dataset a spec names by default.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use meshtrain_model::{AggregatorSpec, CodecSpec};
use meshtrain_node::model_file::{default_task, store_module, ModelChoice};
use meshtrain_node::runspec::Admission;
use meshtrain_node::RunSpec;

#[derive(Subcommand)]
pub(super) enum SpecCommand {
    /// Print a run spec for the given choices.
    New(SpecArgs),
}

#[derive(Args)]
pub(super) struct SpecArgs {
    /// A built-in model (mlp, cnn, lstm, autoencoder, char-transformer) or
    /// your own TorchScript module: `torchscript:FILE` (saved with
    /// `torch.jit.save`; the spec names it by hash and the data's block
    /// store keeps it, so peers fetch it from there).
    #[arg(long, default_value = "mlp")]
    pub(super) model: ModelChoice,
    /// What a TorchScript module learns: `classify`, `reconstruct` or
    /// `next-token` (default: classify for images, next-token for text).
    #[arg(long)]
    pub(super) task: Option<String>,
    /// A block store holding the dataset (see `data import`). By default
    /// Fashion-MNIST, imported into out/datasets/fashion-mnist on first use.
    #[arg(long)]
    pub(super) data: Option<PathBuf>,
    /// Which dataset of the store, when it holds several.
    #[arg(long)]
    pub(super) dataset: Option<String>,
    /// `iid`, or `dirichlet:ALPHA` for label-skewed shards.
    #[arg(long, default_value = "iid")]
    pub(super) partition: String,
    /// Members holding each block.
    #[arg(long, default_value_t = 3)]
    pub(super) replication: usize,
    #[arg(long, conflicts_with = "epochs")]
    pub(super) rounds: Option<u64>,
    /// Passes over the training set, summed over `--nodes` nodes.
    #[arg(long)]
    pub(super) epochs: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub(super) nodes: usize,
    #[arg(long, default_value_t = 10)]
    pub(super) local_steps: usize,
    #[arg(long, default_value_t = 64)]
    pub(super) batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub(super) lr: f64,
    /// How deltas are compressed (`dense` sends them whole).
    #[arg(long, default_value = CodecSpec::DEFAULT_NAME)]
    pub(super) codec: CodecSpec,
    /// Robust aggregation rule (CenteredClip by default).
    #[arg(long, default_value = "centered-clip")]
    pub(super) aggregator: AggregatorSpec,
    #[command(flatten)]
    pub(super) outer: OuterArgs,
    #[arg(long, default_value_t = 42)]
    pub(super) seed: u64,
    /// Autoencoder: the class it never trains on and scores as the anomaly.
    #[arg(long)]
    pub(super) anomaly_class: Option<usize>,
    /// Loss scoring before the aggregator: `RECORDS[:TOLERANCE]` held-out
    /// records every update is scored on, and the least loss rise that may
    /// be refused (0.01 by default), e.g. `256`.
    #[arg(long)]
    pub(super) score: Option<meshtrain_node::runspec::ScoreSpec>,
    /// Train on logits shifted by the shard's log label prior (balanced
    /// softmax): label-skewed shards pull the shared model apart less. On
    /// by default; `--label-prior false` trains on the plain loss.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(super) label_prior: bool,
    /// Stop once this many evaluations in a row did not improve the
    /// held-out loss (early stopping).
    #[arg(long)]
    pub(super) patience: Option<u64>,
    /// Who may contribute: `open` (anyone; influence is earned; implied by
    /// --founders) or `permissioned` (only the keys in --members; implied
    /// by --members). One of --members and --founders is required.
    #[arg(long)]
    pub(super) admission: Option<String>,
    /// Open admission: rounds a key's updates must be merged in before it
    /// has a vote.
    #[arg(long, default_value_t = 3)]
    pub(super) earn_rounds: u64,
    /// Permissioned admission: a file of author keys, one per line (as
    /// `meshtrain identity show DIR --key-only` prints them; `#` comments).
    /// Implies --admission permissioned.
    #[arg(long)]
    pub(super) members: Option<PathBuf>,
    /// Open admission: a file of author keys (same format as --members)
    /// that have a vote from round 0, so that anchors are agreed from the
    /// start. Implies --admission open; an open run needs at least one.
    #[arg(long, conflicts_with = "members")]
    pub(super) founders: Option<PathBuf>,
    /// Write here instead of standard output.
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
}

/// Reads a roster file: one author key per line, blank lines and `#`
/// comments ignored.
pub(super) fn read_roster(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the roster {}", path.display()))?;
    let mut members = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.parse::<meshtrain_ledger::AuthorId>().is_err() {
            bail!(
                "{}:{}: `{line}` is not an author key (64 hex digits)",
                path.display(),
                i + 1
            );
        }
        members.push(line.to_string());
    }
    if members.is_empty() {
        bail!("the roster {} names no member", path.display());
    }
    Ok(members)
}

/// The rounds a spec is capped at under `MESHTRAIN_QUICK`.
const QUICK_ROUNDS: u64 = 4;
/// Below this share of records in their block's most common class, blocks
/// mix classes too much for a Dirichlet partition to skew anything
/// (Fashion-MNIST imported unsorted: 0.11; sorted by label: near 1).
const DIRICHLET_MIN_PURITY: f64 = 0.5;

/// `MESHTRAIN_QUICK=1` (anything but empty or 0): every run is cut short,
/// so that the README's commands run as printed in a few minutes in tests.
fn quick() -> bool {
    std::env::var("MESHTRAIN_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The admission section from --admission, --earn-rounds and --members.
pub(super) fn admission(
    mode: Option<&str>,
    earn_rounds: u64,
    members: Option<&Path>,
    founders: Option<&Path>,
) -> Result<Admission> {
    let mode = match (mode, members, founders) {
        (Some(m), _, _) => m,
        (None, Some(_), _) => "permissioned",
        (None, None, Some(_)) => "open",
        (None, None, None) => bail!(
            "who may take part? --members FILE (a permissioned run: only these keys) or --founders FILE \
             (an open run: anyone may join and earn a vote; these keys vote from round 0). \
             `meshtrain identity show DIR --key-only` prints a node's key"
        ),
    };
    match (mode, members) {
        ("permissioned", _) if founders.is_some() => {
            bail!("--founders is for open runs; a permissioned run has --members")
        }
        ("permissioned", Some(path)) => Ok(Admission::Permissioned {
            members: read_roster(path)?,
        }),
        ("permissioned", None) => bail!("--admission permissioned needs --members FILE"),
        ("open", None) => match founders {
            Some(path) => Ok(Admission::Open {
                earn_rounds,
                founders: read_roster(path)?,
            }),
            None => bail!(
                "{}",
                meshtrain_node::runspec::NO_FOUNDERS
                    .replace("admission.founders is empty", "--founders FILE is missing")
            ),
        },
        ("open", Some(_)) => bail!("--members names a roster, which open admission has none of (see --founders)"),
        (other, _) => bail!("--admission takes `open` or `permissioned`, got `{other}`"),
    }
}

/// The DiLoCo-style outer step.
#[derive(Args, Clone, Copy)]
pub(super) struct OuterArgs {
    /// Outer learning rate applied to the aggregate (1 with momentum 0 is
    /// plain averaging).
    #[arg(long, default_value_t = 0.7)]
    pub(super) outer_lr: f32,
    /// Outer momentum, as in DiLoCo.
    #[arg(long, default_value_t = 0.9)]
    pub(super) outer_momentum: f32,
    /// Nesterov (true) or heavy-ball (false) outer momentum.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(super) nesterov: bool,
}

impl OuterArgs {
    pub(super) fn to_args(self) -> Vec<String> {
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

/// The default dataset: Fashion-MNIST from Debian's package, imported
/// into content-addressed blocks (1 MiB, so that a mesh has blocks to
/// spread) on first use.
pub(super) const DEFAULT_STORE: &str = "out/datasets/fashion-mnist";
pub(super) const FASHION_MNIST_IDX: &str = "/usr/share/datasets/fashion-mnist";

pub(super) fn default_store() -> Result<PathBuf> {
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
pub(super) fn pick_manifest(store_dir: &Path, dataset: Option<&str>) -> Result<meshtrain_model::Manifest> {
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

pub(super) fn spec_new(args: SpecArgs) -> Result<ExitCode> {
    let store = match &args.data {
        Some(d) => d.clone(),
        None => default_store()?,
    };
    let manifest = pick_manifest(&store, args.dataset.as_deref())?;
    let mut spec = RunSpec::default_for(args.model.arch(), &manifest);
    match (&args.model, &args.task) {
        (ModelChoice::Script(path), task) => {
            let task = task
                .clone()
                .unwrap_or_else(|| default_task(&manifest.schema).to_string());
            let bytes =
                std::fs::read(path).with_context(|| format!("reading the TorchScript module {}", path.display()))?;
            // Refuse a module that does not load or fit the data here, not
            // on every node.
            meshtrain_model::Network::script(path, &task, &manifest.schema, meshtrain_model::Device::Cpu)?;
            let blocks = meshtrain_node::blockstore::BlockStore::open(&store)?;
            spec.model.script = Some(store_module(&blocks, &bytes, &task)?);
        }
        (ModelChoice::Builtin(_), Some(_)) => {
            bail!("--task is for --model torchscript:FILE (a built-in model has its own task)")
        }
        (ModelChoice::Builtin(_), None) => {}
    }
    spec.seed = args.seed;
    spec.train.local_steps = args.local_steps;
    spec.train.batch_size = args.batch_size;
    spec.train.lr = args.lr;
    spec.exchange.codec = args.codec;
    spec.exchange.aggregator = args.aggregator;
    spec.exchange.score = args.score;
    spec.train.label_prior = args.label_prior;
    spec.exchange.outer_lr = args.outer.outer_lr;
    spec.exchange.outer_momentum = args.outer.outer_momentum;
    spec.exchange.nesterov = args.outer.nesterov;
    let partition = args
        .partition
        .parse::<meshtrain_node::placement::Partition>()
        .map_err(|e| anyhow::anyhow!(e))?;
    if let meshtrain_node::placement::Partition::Dirichlet(_) = partition {
        // Whole blocks are dealt by their class: blocks that mix classes
        // would give every node IID data under a label-skew name.
        match meshtrain_node::placement::block_label_purity(&manifest, "train") {
            None => bail!("--partition {partition} needs labelled training records; this dataset has none"),
            Some(p) if p < DIRICHLET_MIN_PURITY => bail!(
                "--partition {partition} deals whole blocks by their class, but this dataset's blocks mix \
                 classes (only {:.0}% of a block's records share its most common class): import it \
                 again with `meshtrain data import --sort-by-label`",
                p * 100.0
            ),
            Some(_) => {}
        }
    }
    spec.data.partition = partition.to_string();
    spec.data.replication = args.replication.max(1);
    spec.model.anomaly_class = args.anomaly_class;
    spec.rounds.patience = args.patience;
    spec.admission = admission(
        args.admission.as_deref(),
        args.earn_rounds,
        args.members.as_deref(),
        args.founders.as_deref(),
    )?;
    spec.rounds.count = match (args.rounds, args.epochs) {
        (Some(r), _) => r,
        (None, Some(e)) => {
            if e.is_nan() || e <= 0.0 || args.nodes == 0 {
                bail!("--epochs must be positive and --nodes at least 1");
            }
            let samples = e * manifest.records("train") as f64;
            let per_round = (args.nodes * args.local_steps * args.batch_size) as f64;
            (samples / per_round).ceil().max(1.0) as u64
        }
        (None, None) => spec.rounds.count,
    };
    if quick() && spec.rounds.count > QUICK_ROUNDS {
        eprintln!(
            "MESHTRAIN_QUICK: {QUICK_ROUNDS} rounds instead of {}",
            spec.rounds.count
        );
        spec.rounds.count = QUICK_ROUNDS;
    }
    spec.check()
        .map_err(|e| anyhow::anyhow!("the spec is not valid: {e}"))?;
    let text = spec.to_toml()?;
    match args.out {
        Some(path) => std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}
