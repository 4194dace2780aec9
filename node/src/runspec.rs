//! The `RunSpec`: everything nodes must agree on to train together.
//!
//! `run_id = blake3(canonical bytes)`, where the canonical bytes are the
//! spec's JSON with fields in declaration order. Local choices (where the
//! data lives, ports, threads) are not part of it.

use std::path::Path;

use meshtrain_ledger::RunId;
use meshtrain_model::{AggregatorSpec, Arch, CodecSpec, Manifest, Schema};
use serde::{Deserialize, Serialize};

use crate::NodeError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// A label for humans; part of the run id.
    pub name: String,
    pub seed: u64,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub train: TrainSpec,
    pub exchange: ExchangeSpec,
    pub rounds: RoundSpec,
    /// Who may contribute, and whose vote counts.
    #[serde(default)]
    pub admission: Admission,
}

/// Who may contribute to a run. Every count the protocol takes (votes on
/// anchors, the updates a round waits for, block placement) counts the
/// voting power this gives, never raw peers or keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Admission {
    /// Only these author keys (hex ed25519 public keys, as `meshtrain
    /// identity show` prints them) take part, one vote each. Records,
    /// requests and connections of anyone else are refused.
    Permissioned { members: Vec<String> },
    /// Anyone may contribute, through the robust aggregator; a key gets a
    /// vote once its updates were merged in `earn_rounds` rounds, and no key
    /// has more than one. Until then all unearned keys together weigh as
    /// much as one member in the aggregate. `founders` (hex author keys)
    /// have a vote from round 0, so that anchors are agreed from the start;
    /// without founders nothing is decided until keys earn their votes.
    Open {
        earn_rounds: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        founders: Vec<String>,
    },
}

/// Why an open run must name founders. Measured: `meshtrain sim
/// --admission open --no-founders --seeds 200` ended with honest nodes on
/// different anchors in 164 of 200 seeds without crashes or partitions
/// (195 with them; 0 with no message lost), and `tests/attacks.rs`, then
/// founderless, failed in CI with one honest node alone on its own anchor
/// for all 16 rounds.
pub const NO_FOUNDERS: &str = "admission.founders is empty: an open run needs founders, the keys that \
     vote from round 0 (`spec new --founders FILE`; `meshtrain identity show DIR --key-only` prints a \
     node's key). Without them nobody has a vote in the first rounds, every node earns votes for the \
     keys it merged itself, and a node that merged another set early stays on its own anchor for good";

impl Default for Admission {
    fn default() -> Self {
        Admission::Open {
            earn_rounds: 3,
            founders: Vec::new(),
        }
    }
}

impl Admission {
    /// The roster of a permissioned run.
    pub fn roster(&self) -> Result<Option<std::collections::BTreeSet<meshtrain_ledger::AuthorId>>, String> {
        match self {
            Admission::Open { .. } => Ok(None),
            Admission::Permissioned { members } => keys("admission.members", members).map(Some),
        }
    }

    /// The founders of an open run (none for a permissioned one).
    pub fn founders(&self) -> Result<std::collections::BTreeSet<meshtrain_ledger::AuthorId>, String> {
        match self {
            Admission::Open { founders, .. } => keys("admission.founders", founders),
            Admission::Permissioned { .. } => Ok(Default::default()),
        }
    }
}

fn keys(field: &str, list: &[String]) -> Result<std::collections::BTreeSet<meshtrain_ledger::AuthorId>, String> {
    let mut set = std::collections::BTreeSet::new();
    for m in list {
        let a: meshtrain_ledger::AuthorId = m
            .trim()
            .parse()
            .map_err(|_| format!("{field}: `{m}` is not an author key (64 hex digits)"))?;
        if !set.insert(a) {
            return Err(format!("{field}: `{m}` is listed twice"));
        }
    }
    Ok(set)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub arch: Arch,
    /// Autoencoder: the class treated as the anomaly (never trained on,
    /// scored as positive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly_class: Option<usize>,
    /// `arch = "torchscript"`: the user's module, by the hash of its file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<ScriptSpec>,
}

/// A TorchScript module file, named by content: nodes that lack it fetch it
/// from peers by this hash (as they fetch data blocks) and check it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptSpec {
    /// The file's hash (a data block's hash: blake3, 64 hex digits).
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// `classify`, `reconstruct` or `next-token`.
    pub task: String,
}

/// The largest module file a run may name (a fetch answer must hold it).
pub const MAX_SCRIPT_BYTES: u64 = 96 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// A label for humans.
    pub dataset: String,
    /// The dataset id: the hash of its manifest. Nodes fetch the manifest
    /// and their blocks from peers by hash, and check both.
    pub manifest: String,
    /// How training blocks are spread over members: `iid` or
    /// `dirichlet:ALPHA` (label skew).
    pub partition: String,
    /// Members holding each block.
    pub replication: usize,
    /// The record layout (so a node can build its model before it has any
    /// data).
    pub schema: Schema,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    pub batch_size: usize,
    /// Inner Adam learning rate.
    pub lr: f64,
    /// H: local steps between exchanges.
    pub local_steps: usize,
    /// Train a classifier on logits shifted by its shard's log label prior
    /// (balanced softmax), so label-skewed shards pull the shared model
    /// apart less. Local to each node: nothing exchanged changes. New specs
    /// have it on; a spec without the field (older ones) has it off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub label_prior: bool,
}

/// Bounds on what a spec may ask, so that no deadline or window computed
/// from it overflows, and a node never waits on a peer for days.
pub const MAX_ROUNDS: u64 = 100_000_000;
pub const MAX_WAIT_MS: u64 = 3_600_000;
pub const MAX_STALENESS: u64 = 64;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeSpec {
    pub codec: CodecSpec,
    pub aggregator: AggregatorSpec,
    pub outer_lr: f32,
    pub outer_momentum: f32,
    pub nesterov: bool,
    /// Deltas up to this many rounds late are still merged, down-weighted.
    pub staleness: u64,
    /// Weight multiplier per round of lateness.
    pub staleness_decay: f32,
    /// The optional loss-scoring stage before the aggregator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<ScoreSpec>,
}

/// Loss scoring: every candidate update of a round is scored by the loss on
/// a fixed sample of the held-out split (every node holds it, so every node
/// scores alike) with and without it (leave one out); one whose presence
/// raises it past the round's robust limit is refused before the
/// aggregator.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreSpec {
    /// Held-out records each candidate is scored on.
    pub records: usize,
    /// No update whose presence raises the loss by less than this (above
    /// the round's median) is refused, however alike the others scored.
    pub tolerance: f32,
}

/// Most records a scoring sample may have (every candidate is evaluated on
/// all of them, every round).
pub const MAX_SCORE_RECORDS: usize = 4096;

impl ScoreSpec {
    pub const DEFAULT_TOLERANCE: f32 = 0.01;

    fn check(&self) -> Result<(), String> {
        if !(1..=MAX_SCORE_RECORDS).contains(&self.records) {
            return Err(format!(
                "exchange.score.records must be between 1 and {MAX_SCORE_RECORDS}"
            ));
        }
        if !(self.tolerance >= 0.0 && self.tolerance.is_finite()) {
            return Err("exchange.score.tolerance must be a finite loss rise of 0 or more".into());
        }
        Ok(())
    }
}

impl std::str::FromStr for ScoreSpec {
    type Err = String;
    /// `RECORDS` or `RECORDS:TOLERANCE`, e.g. `256` or `256:0.01`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (records, tolerance) = match s.split_once(':') {
            Some((r, t)) => (r, Some(t)),
            None => (s, None),
        };
        let records = records
            .parse()
            .map_err(|_| format!("score `{s}`: `{records}` is not a number of records (e.g. `256` or `256:0.01`)"))?;
        let tolerance = match tolerance {
            Some(t) => t
                .parse()
                .map_err(|_| format!("score `{s}`: `{t}` is not a loss tolerance"))?,
            None => Self::DEFAULT_TOLERANCE,
        };
        let spec = ScoreSpec { records, tolerance };
        spec.check()?;
        Ok(spec)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundSpec {
    /// Total rounds of the run.
    pub count: u64,
    /// Upper bound on how long a round waits for peers after the node's own
    /// update is ready.
    pub max_wait_ms: u64,
    /// Lower bound of the adaptive wait.
    pub min_wait_ms: u64,
    /// Early stopping: end the run once this many evaluations in a row have
    /// not improved the validation loss. Every node evaluates the same
    /// anchor on the same held-out split, so all stop at the same round
    /// without asking each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patience: Option<u64>,
}

impl RunSpec {
    /// A spec with the defaults used by the testnet, for `manifest`'s data.
    pub fn default_for(arch: Arch, manifest: &Manifest) -> Self {
        Self {
            name: format!("{arch}-{}", manifest.name),
            seed: 42,
            model: ModelSpec {
                arch,
                anomaly_class: None,
                script: None,
            },
            data: DataSpec {
                dataset: manifest.name.clone(),
                manifest: manifest.id(),
                partition: "iid".into(),
                replication: 3,
                schema: manifest.schema.clone(),
            },
            train: TrainSpec {
                batch_size: 64,
                lr: 1e-3,
                local_steps: 10,
                label_prior: true,
            },
            exchange: ExchangeSpec {
                codec: CodecSpec::DEFAULT,
                aggregator: AggregatorSpec::CenteredClip { tau: None },
                // DiLoCo's outer step; with H = 10 it gains about a point
                // over plain averaging on Fashion-MNIST (docs/figures.md).
                outer_lr: 0.7,
                outer_momentum: 0.9,
                nesterov: true,
                staleness: 1,
                staleness_decay: 0.5,
                score: None,
            },
            rounds: RoundSpec {
                count: 50,
                max_wait_ms: 30_000,
                min_wait_ms: 1_000,
                patience: None,
            },
            admission: Admission::default(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, NodeError> {
        let text = std::fs::read_to_string(path).map_err(|source| NodeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let spec: RunSpec = toml::from_str(&text).map_err(|e| NodeError::RunSpec {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        spec.check().map_err(|detail| NodeError::RunSpec {
            path: path.to_path_buf(),
            detail,
        })?;
        Ok(spec)
    }

    pub fn partition(&self) -> crate::placement::Partition {
        self.data.partition.parse().unwrap_or(crate::placement::Partition::Iid)
    }

    pub fn to_toml(&self) -> Result<String, NodeError> {
        toml::to_string_pretty(self).map_err(|e| NodeError::RunSpec {
            path: "<in memory>".into(),
            detail: e.to_string(),
        })
    }

    /// Whether the spec's values make a run (`load` checks this).
    pub fn check(&self) -> Result<(), String> {
        if self.train.batch_size == 0 {
            return Err("train.batch_size must be at least 1".into());
        }
        if !(self.train.lr > 0.0 && self.train.lr.is_finite()) {
            return Err("train.lr must be positive".into());
        }
        if self.train.local_steps == 0 {
            return Err("train.local_steps must be at least 1".into());
        }
        if self.rounds.count == 0 {
            return Err("rounds.count must be at least 1".into());
        }
        if self.rounds.min_wait_ms > self.rounds.max_wait_ms {
            return Err("rounds.min_wait_ms exceeds rounds.max_wait_ms".into());
        }
        if self.rounds.count > MAX_ROUNDS {
            return Err(format!("rounds.count is at most {MAX_ROUNDS}"));
        }
        if self.rounds.max_wait_ms > MAX_WAIT_MS {
            return Err(format!("rounds.max_wait_ms is at most {MAX_WAIT_MS} (one hour)"));
        }
        if self.exchange.staleness > MAX_STALENESS {
            return Err(format!("exchange.staleness is at most {MAX_STALENESS} rounds"));
        }
        if !(self.exchange.outer_lr > 0.0 && self.exchange.outer_lr.is_finite()) {
            return Err("exchange.outer_lr must be positive".into());
        }
        if !(0.0..1.0).contains(&self.exchange.outer_momentum) {
            return Err("exchange.outer_momentum must be in [0, 1)".into());
        }
        if !(0.0..=1.0).contains(&self.exchange.staleness_decay) {
            return Err("exchange.staleness_decay must be in [0, 1]".into());
        }
        if let Some(score) = &self.exchange.score {
            score.check()?;
        }
        if hex::decode(&self.data.manifest).map(|b| b.len()) != Ok(32) {
            return Err("data.manifest must be a dataset id (64 hex digits)".into());
        }
        self.data
            .partition
            .parse::<crate::placement::Partition>()
            .map_err(|e| format!("data.partition: {e}"))?;
        if self.data.replication == 0 {
            return Err("data.replication must be at least 1".into());
        }
        match (&self.model.script, self.model.arch) {
            (Some(script), Arch::Script) => {
                if hex::decode(&script.file).map(|b| b.len()) != Ok(32) {
                    return Err("model.script.file must be a file hash (64 hex digits)".into());
                }
                if script.bytes == 0 || script.bytes > MAX_SCRIPT_BYTES {
                    return Err(format!(
                        "model.script.bytes must be between 1 and {MAX_SCRIPT_BYTES} (the largest file a peer can send)"
                    ));
                }
                meshtrain_model::Task::named(&script.task, &self.data.schema)
                    .map_err(|e| format!("model.script.task: {e}"))?;
            }
            (None, Arch::Script) => return Err("model.arch torchscript needs model.script (its file and task)".into()),
            (Some(_), _) => return Err("model.script is for model.arch torchscript only".into()),
            (None, arch) => {
                arch.task(&self.data.schema).map_err(|e| format!("model.arch: {e}"))?;
            }
        }
        match (self.model.anomaly_class, self.data.schema.classes()) {
            (Some(_), _) if self.model.arch != Arch::Autoencoder => {
                return Err("model.anomaly_class is for the autoencoder only".into())
            }
            (Some(c), Some(k)) if c >= k => {
                return Err(format!("model.anomaly_class {c} is not one of the {k} classes"))
            }
            (None, _) if self.model.arch == Arch::Autoencoder => {
                return Err("the autoencoder needs model.anomaly_class (the class it never trains on)".into())
            }
            _ => {}
        }
        if self.rounds.patience == Some(0) {
            return Err("rounds.patience must be at least 1".into());
        }
        match &self.admission {
            Admission::Open { earn_rounds: 0, .. } => return Err("admission.earn_rounds must be at least 1".into()),
            Admission::Open { founders, .. } if founders.is_empty() => return Err(NO_FOUNDERS.into()),
            Admission::Permissioned { members } if members.is_empty() => {
                return Err("admission.members: a permissioned run needs at least one member".into())
            }
            _ => {}
        }
        self.admission.roster()?;
        self.admission.founders()?;
        Ok(())
    }

    /// The bytes the run id hashes: JSON in declaration order.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Plain structs of strings and numbers always serialise.
        serde_json::to_vec(self).expect("a RunSpec always serialises to JSON")
    }

    pub fn run_id(&self) -> RunId {
        RunId::of_spec(&self.canonical_bytes())
    }

    pub fn from_canonical(bytes: &[u8]) -> Result<Self, NodeError> {
        serde_json::from_slice(bytes).map_err(|e| NodeError::RunSpec {
            path: "<ledger meta>".into(),
            detail: e.to_string(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The default spec for ARCH, with one founder (an open run needs
    /// some).
    pub(crate) fn founded(arch: Arch) -> RunSpec {
        let mut s = RunSpec::default_for(arch, &manifest());
        s.admission = Admission::Open {
            earn_rounds: 3,
            founders: vec![meshtrain_ledger::AuthorKey::from_secret([1; 32]).author().to_string()],
        };
        s
    }

    pub(crate) fn manifest() -> Manifest {
        Manifest::new(
            "fashion-mnist",
            Schema::Image {
                channels: 1,
                height: 28,
                width: 28,
                classes: 10,
            },
        )
    }

    #[test]
    fn an_open_run_without_founders_is_refused() {
        let s = RunSpec::default_for(Arch::Mlp, &manifest());
        assert_eq!(s.check().unwrap_err(), NO_FOUNDERS);
        founded(Arch::Mlp).check().unwrap();
    }

    #[test]
    fn toml_round_trip_and_stable_id() {
        let s = founded(Arch::Mlp);
        let back: RunSpec = toml::from_str(&s.to_toml().unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.run_id(), s.run_id());
        let mut other = s.clone();
        other.train.local_steps = 11;
        assert_ne!(other.run_id(), s.run_id());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.toml");
        let s = founded(Arch::Mlp);
        std::fs::write(&p, s.to_toml().unwrap().replace("[train]", "[train]\nmomentum = 3")).unwrap();
        let err = RunSpec::load(&p).unwrap_err().to_string();
        assert!(err.contains("momentum"), "{err}");
        let codec = format!("codec = \"{}\"", CodecSpec::DEFAULT_NAME);
        assert!(s.to_toml().unwrap().contains(&codec));
        std::fs::write(&p, s.to_toml().unwrap().replace(&codec, "codec = \"zip\"")).unwrap();
        let err = RunSpec::load(&p).unwrap_err().to_string();
        assert!(err.contains("zip"), "{err}");
        std::fs::write(&p, s.to_toml().unwrap().replace("local_steps = 10", "local_steps = 0")).unwrap();
        let err = RunSpec::load(&p).unwrap_err().to_string();
        assert!(err.contains("local_steps"), "{err}");
    }

    #[test]
    fn model_and_data_must_fit() {
        let mut s = founded(Arch::CharTransformer);
        assert!(s.check().unwrap_err().contains("model.arch"));
        s = founded(Arch::Autoencoder);
        assert!(s.check().unwrap_err().contains("anomaly_class"));
        s.model.anomaly_class = Some(10);
        assert!(s.check().unwrap_err().contains("not one of the 10 classes"));
        s.model.anomaly_class = Some(0);
        s.check().unwrap();
        s.rounds.patience = Some(0);
        assert!(s.check().unwrap_err().contains("patience"));
        // Left out when unset, so specs written before these fields keep
        // their run ids.
        let plain = String::from_utf8(founded(Arch::Mlp).canonical_bytes()).unwrap();
        assert!(!plain.contains("patience") && !plain.contains("anomaly_class") && !plain.contains("script"));
    }

    #[test]
    fn a_torchscript_model_names_its_file_and_task() {
        let mut s = founded(Arch::Script);
        assert!(s.check().unwrap_err().contains("needs model.script"));
        let script = ScriptSpec {
            file: "ab".repeat(32),
            bytes: 1000,
            task: "classify".into(),
        };
        s.model.script = Some(script.clone());
        s.check().unwrap();
        // The run id commits to the file.
        let mut other = s.clone();
        other.model.script = Some(ScriptSpec {
            file: "cd".repeat(32),
            ..script.clone()
        });
        assert_ne!(s.run_id(), other.run_id());
        let bad = |f: &dyn Fn(&mut ScriptSpec)| {
            let mut t = s.clone();
            f(t.model.script.as_mut().unwrap());
            t.check().unwrap_err()
        };
        assert!(bad(&|x| x.file = "zz".into()).contains("model.script.file"));
        assert!(bad(&|x| x.bytes = MAX_SCRIPT_BYTES + 1).contains("model.script.bytes"));
        assert!(bad(&|x| x.task = "next-token".into()).contains("text records"));
        assert!(bad(&|x| x.task = "regress".into()).contains("unknown task"));
        let mut t = founded(Arch::Mlp);
        t.model.script = Some(script);
        assert!(t.check().unwrap_err().contains("for model.arch torchscript only"));
        // It survives the TOML round trip operators edit.
        let back: RunSpec = toml::from_str(&s.to_toml().unwrap()).unwrap();
        assert_eq!(back, s);
    }

    /// New specs train with the label prior; a spec written before the
    /// field reads as without it, and keeps its run id.
    #[test]
    fn the_label_prior_is_on_for_new_specs_and_off_for_old_ones() {
        let s = founded(Arch::Mlp);
        assert!(s.train.label_prior);
        let text = s.to_toml().unwrap();
        assert!(text.contains("label_prior = true"), "{text}");
        let old: RunSpec = toml::from_str(&text.replace("label_prior = true\n", "")).unwrap();
        assert!(!old.train.label_prior);
        let mut off = s.clone();
        off.train.label_prior = false;
        assert_eq!(old, off);
        assert!(!String::from_utf8(off.canonical_bytes())
            .unwrap()
            .contains("label_prior"));
        assert_ne!(off.run_id(), s.run_id());
    }

    #[test]
    fn waits_windows_and_round_counts_are_bounded() {
        let s = founded(Arch::Mlp);
        s.check().unwrap();
        let mut t = s.clone();
        t.rounds.max_wait_ms = u64::MAX;
        assert!(t.check().unwrap_err().contains("max_wait_ms"));
        let mut t = s.clone();
        t.exchange.staleness = u64::MAX;
        assert!(t.check().unwrap_err().contains("staleness"));
        let mut t = s.clone();
        t.rounds.count = u64::MAX;
        assert!(t.check().unwrap_err().contains("rounds.count"));
    }
}
