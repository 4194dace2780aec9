//! What a testnet summarises (`OUT/summary.json`). The nodes' own files
//! ([`NodeReport`], [`RoundRecord`], ...) are `meshtrain-report`'s.

use std::collections::BTreeMap;

use meshtrain_report::lossy_f32;
use meshtrain_report::nan;
use serde::{Deserialize, Serialize};

pub use meshtrain_report::{ListenFile, NodeReport, Progress, RoundRecord, RoundTimes, TaskFigures, STAGES};

/// One row of the testnet summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub index: usize,
    pub peer_id: String,
    pub honest: bool,
    pub attack: Option<String>,
    #[serde(with = "lossy_f32")]
    pub final_test_acc: f32,
    #[serde(with = "lossy_f32", default = "nan")]
    pub final_test_loss: f32,
    #[serde(default)]
    pub final_task: TaskFigures,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Gossip messages sent (own and forwarded, each copy) and their
    /// bytes, and copies received of messages already had.
    #[serde(default)]
    pub gossip_sent: u64,
    #[serde(default)]
    pub gossip_sent_bytes: u64,
    #[serde(default)]
    pub gossip_duplicates: u64,
    pub updates_merged: u64,
    pub updates_rejected: u64,
    pub updates_clipped: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub rounds_completed: u64,
    /// Authors (hex) this node banned.
    pub banned: Vec<String>,
    pub label_histogram: Vec<u64>,
    pub data_fetch_ms: Option<u64>,
    pub audit_ok: bool,
    pub audit_records: u64,
    pub audit_first_problem: Option<String>,
    pub exit_code: Option<i32>,
    /// The anchor the node ended on (hex), from its last verdict block.
    #[serde(default)]
    pub final_anchor: Option<String>,
    /// Times the node moved onto an anchor the votes decided (repairs,
    /// catch-ups, reverts), from its ledger's join records.
    #[serde(default)]
    pub anchor_repairs: u64,
    /// `--hosts netns`: the node's address and link rate.
    #[serde(default)]
    pub host_addr: Option<String>,
    #[serde(default)]
    pub link: Option<String>,
    /// Seconds from the node's start to its first evaluation at or above
    /// `--target-acc`.
    #[serde(default)]
    pub time_to_target_s: Option<f64>,
    /// Updates the node published, and how many times the other honest
    /// nodes merged one of them (at most published x their number).
    #[serde(default)]
    pub updates_published: u64,
    #[serde(default)]
    pub merged_by_peers: u64,
    /// Mean seconds per round after the first (which includes fetching
    /// the shard), from the node's round history.
    #[serde(default)]
    pub round_s: Option<f64>,
}

/// One round of the anchor agreement, over the honest nodes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnchorRound {
    pub round: u64,
    /// Distinct anchors the honest nodes that closed this round trained it
    /// from (the base their verdict block names, after any repair): 1 is
    /// agreement.
    pub anchors: usize,
    /// Honest nodes that closed it.
    pub nodes: usize,
    /// Repairs (of any kind) honest nodes made onto this round's anchor.
    pub repairs: u64,
}

/// `OUT/summary.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub nodes_total: usize,
    pub model: String,
    pub codec: String,
    pub aggregator: String,
    pub local_steps: usize,
    pub rounds: u64,
    pub param_count: u64,
    pub honest_mean_acc: f32,
    pub honest_min_acc: f32,
    /// Mean over honest nodes of the final held-out loss (nats per
    /// character for language models).
    #[serde(with = "lossy_f32", default = "nan")]
    pub honest_mean_loss: f32,
    /// Means over honest nodes of their task figures.
    #[serde(default)]
    pub honest_mean_task: TaskFigures,
    /// Early stopping: the latest round an honest node stopped at.
    #[serde(default)]
    pub stopped_early_at: Option<u64>,
    pub bytes_per_update_mean: f64,
    pub compression_ratio: f64,
    /// Share of attacker updates that honest nodes did not merge at full
    /// weight: rejected, clipped, or ignored once the attacker was banned.
    pub malicious_rejected_or_clipped_share: Option<f64>,
    /// Whether every honest node banned every attacker.
    pub attackers_banned_by_all_honest: Option<bool>,
    /// Share of honest updates that honest nodes rejected.
    pub honest_rejected_share: f64,
    pub audit_failures: u64,
    pub complete_chains: bool,
    /// Processes restarted by `--churn`.
    pub restarts: u64,
    /// Worst rounds a restarted or late node took to come within a point of
    /// the others.
    pub catch_up_rounds_max: Option<u64>,
    /// Best minus worst honest final accuracy.
    pub final_acc_gap: f32,
    /// Equivocation proofs against honest authors in honest ledgers.
    pub proofs_against_honest: u64,
    /// Records a killed node had signed that are missing (or different)
    /// at the end, on itself or on a peer that finished.
    pub lost_records: u64,
    /// Killed nodes' chain heads checked for `lost_records`, times ledgers.
    pub killed_heads_checked: u64,
    /// Seconds from a late joiner's start to the close of its first round
    /// (the round in which it and its peers merge its first update); the
    /// slowest joiner.
    pub late_join_first_merge_s: Option<f64>,
    pub wall_s: f64,
    /// The slowest honest node's own run time, start to exit (the testnet's
    /// `wall_s` also waits for attackers, which may hang on after a ban).
    #[serde(default)]
    pub honest_wall_s: Option<f64>,
    /// Share of rounds after which every honest node trained the next
    /// round from the same anchor (a repair before aggregating counts as
    /// agreement), the final anchor counted as one more round.
    #[serde(default)]
    pub anchor_agreement: Option<f64>,
    /// Repairs, catch-ups and reverts of honest nodes.
    #[serde(default)]
    pub anchor_repairs: u64,
    /// The first round honest nodes trained from different anchors.
    #[serde(default)]
    pub first_anchor_split: Option<u64>,
    #[serde(default)]
    pub anchor_rounds: Vec<AnchorRound>,
    /// Sybil attacks: identities the attackers ran and records they signed;
    /// how the honest nodes treated those records (summed over honest
    /// nodes; records refused outright are in `rejected_by_reason`); and
    /// how many honest nodes ever trained from, ended on or joined the
    /// anchor a hijack pushed.
    #[serde(default)]
    pub sybil_identities: u64,
    #[serde(default)]
    pub sybil_records: u64,
    #[serde(default)]
    pub sybil_merged: u64,
    #[serde(default)]
    pub sybil_clipped: u64,
    #[serde(default)]
    pub sybil_rejected: u64,
    #[serde(default)]
    pub sybil_probation: u64,
    #[serde(default)]
    pub hijacked_nodes: Option<u64>,
    /// `loopback` or `netns`.
    #[serde(default)]
    pub hosts: String,
    #[serde(default)]
    pub target_acc: Option<f32>,
    /// Seconds until every honest node had reached `target_acc` (from each
    /// node's start); None when one never did.
    #[serde(default)]
    pub time_to_target_s: Option<f64>,
    /// Bytes an honest node sent per round, on average.
    #[serde(default)]
    pub bytes_sent_per_node_round: f64,
    /// Of those, gossip: messages (records, votes, proofs; own and
    /// forwarded, each copy) and their bytes an honest node sent per
    /// round, and copies it received of messages it had.
    #[serde(default)]
    pub gossip_sent_per_node_round: f64,
    #[serde(default)]
    pub gossip_bytes_per_node_round: f64,
    #[serde(default)]
    pub gossip_duplicates_per_node_round: f64,
    /// The honest nodes' round, taken apart (their means).
    #[serde(default)]
    pub stages: Option<StageSummary>,
    pub nodes: Vec<NodeSummary>,
}

/// Where an honest node's round went, averaged over the honest nodes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    /// Wall-clock milliseconds per round.
    pub round_ms: f64,
    /// Milliseconds per round in each stage (stages on other threads, like
    /// verify or checkpoint_write, overlap the round's critical path).
    pub per_round_ms: BTreeMap<String, f64>,
    /// `1 - train / round`: the node's own share of a round.
    pub overhead_share: f64,
}

impl StageSummary {
    /// The mean of the nodes' figures (None without a node that closed two
    /// rounds).
    pub fn mean<'a>(times: impl Iterator<Item = &'a RoundTimes>) -> Option<StageSummary> {
        let times: Vec<&RoundTimes> = times.filter(|t| t.rounds > 1).collect();
        if times.is_empty() {
            return None;
        }
        let n = times.len() as f64;
        let mut per_round_ms = BTreeMap::new();
        for stage in STAGES {
            if times.iter().any(|t| t.stages.contains_key(stage)) {
                per_round_ms.insert(
                    stage.to_string(),
                    times.iter().map(|t| t.per_round_ms(stage)).sum::<f64>() / n,
                );
            }
        }
        Some(StageSummary {
            round_ms: times.iter().map(|t| t.round_ms).sum::<f64>() / n,
            per_round_ms,
            overhead_share: times.iter().map(|t| t.overhead_share).sum::<f64>() / n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(round_ms: f64, train_total: f64, rounds: u64) -> RoundTimes {
        let mut t = RoundTimes {
            rounds,
            round_ms,
            ..Default::default()
        };
        let s = t.stages.entry("train".into()).or_default();
        s.count = rounds;
        s.total_ms = train_total;
        t.overhead_share = 1.0 - t.per_round_ms("train") / round_ms;
        t
    }

    #[test]
    fn stage_summary_is_the_mean_of_nodes_that_closed_rounds() {
        // 10 rounds of 100 ms with 60 ms of steps; 10 of 200 ms with 100;
        // a node that closed one round has no round time and is left out.
        let nodes = [times(100.0, 600.0, 10), times(200.0, 1000.0, 10), times(0.0, 50.0, 1)];
        let s = StageSummary::mean(nodes.iter()).unwrap();
        assert_eq!(s.round_ms, 150.0);
        assert_eq!(s.per_round_ms["train"], 80.0);
        assert!((s.overhead_share - 0.45).abs() < 1e-9, "{}", s.overhead_share);
        assert!(!s.per_round_ms.contains_key("aggregate"));
        assert_eq!(StageSummary::mean(nodes[2..].iter()), None);
    }
}
