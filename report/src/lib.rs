//! The files a node writes about itself, in one place so that the node, the
//! testnet and the tests read and write one schema:
//!
//! - `DIR/results.json` and `DIR/live.json`: [`NodeReport`] (the latter
//!   rewritten once a round while the node runs);
//! - `DIR/progress.json`: [`Progress`];
//! - `DIR/listen.json`: [`ListenFile`].
//!
//! It knows nothing of the node's internals: plain numbers and strings.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Losses can be NaN when a model diverges (an attack can cause that); JSON
/// has no NaN, so they are written as null and read back as NaN.
pub mod lossy_f32 {
    use super::*;

    pub fn serialize<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f32(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
    }
}

pub fn nan() -> f32 {
    f32::NAN
}

/// The figures only some tasks have (the held-out loss and accuracy are
/// reported for every task).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskFigures {
    /// Language models: `exp(loss in nats per character)`.
    pub perplexity: Option<f32>,
    /// Autoencoder: ROC-AUC of the reconstruction error as anomaly score.
    pub roc_auc: Option<f32>,
    /// Classifiers: unweighted mean F1 over classes.
    pub macro_f1: Option<f32>,
}

impl TaskFigures {
    /// The mean of each figure over the items that have it.
    pub fn mean<'a>(items: impl Iterator<Item = &'a TaskFigures> + Clone) -> TaskFigures {
        let mean = |f: fn(&TaskFigures) -> Option<f32>| {
            let v: Vec<f32> = items.clone().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f32>() / v.len() as f32)
        };
        TaskFigures {
            perplexity: mean(|t| t.perplexity),
            roc_auc: mean(|t| t.roc_auc),
            macro_f1: mean(|t| t.macro_f1),
        }
    }
}

/// One round as a node saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    /// Test loss and accuracy of the anchor weights this round started from.
    #[serde(with = "lossy_f32")]
    pub test_loss: f32,
    #[serde(with = "lossy_f32")]
    pub test_acc: f32,
    #[serde(with = "lossy_f32")]
    pub train_loss: f32,
    /// Contributions merged (or clipped) into this round's aggregate.
    pub merged: u64,
    pub rejected: u64,
    /// libp2p byte counters at the end of the round.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Wall-clock milliseconds since the node started.
    pub at_ms: u64,
    pub train_ms: u64,
    pub wait_ms: u64,
}

/// A finished node's results.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub peer_id: String,
    pub author: String,
    pub honest: bool,
    pub attack: Option<String>,
    pub shard: String,
    pub param_count: u64,
    pub rounds_completed: u64,
    #[serde(with = "lossy_f32")]
    pub final_test_acc: f32,
    #[serde(with = "lossy_f32")]
    pub final_test_loss: f32,
    /// The task's own figures for the final weights.
    #[serde(default)]
    pub final_task: TaskFigures,
    /// The model crate's full evaluation of the final weights (per-class
    /// scores and confusion matrix, or the anomaly operating point).
    #[serde(default)]
    pub final_eval: Option<serde_json::Value>,
    /// Early stopping: the round the run ended at, and the best round.
    #[serde(default)]
    pub stopped_early_at: Option<u64>,
    #[serde(default)]
    pub best_round: Option<u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub updates_published: u64,
    /// Mean size of this node's own encoded payloads.
    pub payload_bytes_mean: f64,
    pub updates_received: u64,
    pub updates_merged: u64,
    pub updates_clipped: u64,
    pub updates_rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Rejections and clips by the author they concern.
    pub rejected_by_author: BTreeMap<String, u64>,
    pub clipped_by_author: BTreeMap<String, u64>,
    pub merged_by_author: BTreeMap<String, u64>,
    /// Updates of keys without a vote yet, judged but not merged (open runs).
    #[serde(default)]
    pub probation_by_author: BTreeMap<String, u64>,
    pub banned: Vec<String>,
    pub peers_seen: Vec<String>,
    /// Records per class in the blocks this node trained on.
    pub label_histogram: Vec<u64>,
    pub primary_blocks: u64,
    pub held_blocks: u64,
    /// Blocks and bytes fetched from peers, and how long the whole shard
    /// took to arrive (from the end of gathering to round 0).
    pub blocks_fetched: u64,
    pub bytes_fetched: u64,
    pub data_fetch_ms: Option<u64>,
    /// This run of the node resumed from an existing data dir.
    pub restarted: bool,
    /// Rounds at which the node adopted the mesh's anchor from peers (at
    /// start, or when left rounds behind).
    pub joined_at: Vec<u64>,
    /// Rounds whose anchor the node repaired onto the one the votes decided
    /// (or gave up for the last decided one).
    #[serde(default)]
    pub repaired_at: Vec<u64>,
    /// An attacker running Sybil identities (`sybil:K`, `anchor-hijack:K`):
    /// their author keys, the records they signed, and the anchor a hijack
    /// pushes (hex), so the testnet can check that nobody took it.
    #[serde(default)]
    pub sybil_authors: Vec<String>,
    #[serde(default)]
    pub sybil_records: u64,
    #[serde(default)]
    pub poisoned_anchor: Option<String>,
    pub wall_s: f64,
    pub history: Vec<RoundRecord>,
}

/// `DIR/progress.json`: where a running node is, rewritten every round.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub round: u64,
    pub rounds: u64,
    /// The last finite test accuracy, if any evaluation was made.
    pub test_acc: Option<f32>,
    pub members: usize,
}

/// `DIR/listen.json`: how to reach a node, written once it listens.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ListenFile {
    pub peer_id: String,
    /// The node's ledger author (hex ed25519 key).
    pub author: String,
    /// `http://ADDR/metrics` when metrics are served.
    pub metrics: Option<String>,
    pub run_id: String,
    /// Multiaddrs with `/p2p/<peer id>`.
    pub addrs: Vec<String>,
}
