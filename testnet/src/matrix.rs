//! Runs a grid of testnets (models x codecs x H x aggregators x attacks) and
//! tabulates their summaries: the benchmark tables of the docs come from here.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::report::Summary;
use crate::{run, TestnetError, TestnetOptions};

/// The values each axis takes; every combination is one testnet.
#[derive(Clone, Debug)]
pub struct Axes {
    pub models: Vec<String>,
    pub codecs: Vec<String>,
    pub local_steps: Vec<usize>,
    pub aggregators: Vec<String>,
    /// `None` is the clean run (no attackers).
    pub attacks: Vec<Option<String>>,
}

/// One testnet of the grid.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MatrixRow {
    pub model: String,
    pub codec: String,
    pub local_steps: usize,
    pub aggregator: String,
    pub attack: Option<String>,
    pub byzantine: usize,
    pub rounds: u64,
    pub param_count: u64,
    pub honest_mean_acc: f32,
    pub honest_min_acc: f32,
    pub bytes_per_update: f64,
    /// Dense fp32 bytes over bytes per update (per exchange).
    pub compression_ratio: f64,
    /// Against dense fp32 exchanged after every local step: ratio x H.
    pub ratio_vs_dense_every_step: f64,
    /// libp2p bytes sent, mean over nodes.
    pub bytes_sent_per_node: f64,
    pub malicious_rejected_or_clipped_share: Option<f64>,
    pub honest_rejected_share: f64,
    pub audit_failures: u64,
    pub complete_chains: bool,
    pub wall_s: f64,
    /// Set when the testnet itself failed.
    pub error: Option<String>,
}

impl MatrixRow {
    fn from_summary(s: &Summary, attack: Option<String>, byzantine: usize) -> Self {
        let sent: f64 = s.nodes.iter().map(|n| n.bytes_sent as f64).sum::<f64>() / s.nodes.len().max(1) as f64;
        Self {
            model: s.model.clone(),
            codec: s.codec.clone(),
            local_steps: s.local_steps,
            aggregator: s.aggregator.clone(),
            attack,
            byzantine,
            rounds: s.rounds,
            param_count: s.param_count,
            honest_mean_acc: s.honest_mean_acc,
            honest_min_acc: s.honest_min_acc,
            bytes_per_update: s.bytes_per_update_mean,
            compression_ratio: s.compression_ratio,
            ratio_vs_dense_every_step: s.compression_ratio * s.local_steps as f64,
            bytes_sent_per_node: sent,
            malicious_rejected_or_clipped_share: s.malicious_rejected_or_clipped_share,
            honest_rejected_share: s.honest_rejected_share,
            audit_failures: s.audit_failures,
            complete_chains: s.complete_chains,
            wall_s: s.wall_s,
            error: None,
        }
    }
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' })
        .collect()
}

/// What to keep between runs of a grid.
#[derive(Clone, Copy, Debug, Default)]
pub struct MatrixPolicy {
    /// Keep every node's ledger (by default they are removed once the run is
    /// summarised and audited: a grid of dense runs fills a disk otherwise).
    pub keep_ledgers: bool,
    /// Reuse the summary of a run that finished in an earlier invocation.
    pub resume: bool,
}

fn drop_ledgers(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let ledger = e.path().join("ledger");
            if ledger.is_dir() {
                let _ = std::fs::remove_dir_all(ledger);
            }
        }
    }
}

/// Runs every combination of `axes` on top of `base`, writing
/// `out/matrix.json` and `out/matrix.md` after each run so that partial
/// results survive an interruption.
pub fn run_matrix(
    base: &TestnetOptions,
    axes: &Axes,
    out: &Path,
    policy: MatrixPolicy,
    mut progress: impl FnMut(usize, usize, &MatrixRow),
) -> Result<Vec<MatrixRow>, TestnetError> {
    std::fs::create_dir_all(out).map_err(|source| TestnetError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let mut grid = Vec::new();
    for m in &axes.models {
        for a in &axes.attacks {
            for g in &axes.aggregators {
                for c in &axes.codecs {
                    for h in &axes.local_steps {
                        grid.push((m.clone(), c.clone(), *h, g.clone(), a.clone()));
                    }
                }
            }
        }
    }
    let total = grid.len();
    let mut rows = Vec::with_capacity(total);
    for (i, (model, codec, h, aggregator, attack)) in grid.into_iter().enumerate() {
        let byzantine = if attack.is_some() { base.byzantine } else { 0 };
        let name = format!(
            "{model}-{}-h{h}-{}-{}",
            slug(&codec),
            slug(&aggregator),
            attack.as_deref().map(slug).unwrap_or_else(|| "clean".into())
        );
        let opts = TestnetOptions {
            model: model.clone(),
            codec: codec.clone(),
            local_steps: h,
            aggregator: aggregator.clone(),
            attack: attack.clone(),
            byzantine,
            out: out.join(&name),
            ..base.clone()
        };
        let previous = policy
            .resume
            .then(|| std::fs::read(opts.out.join("summary.json")).ok())
            .flatten()
            .and_then(|b| serde_json::from_slice::<Summary>(&b).ok())
            .filter(|s| s.rounds > 0);
        let result = match previous {
            Some(s) => Ok(s),
            None => run(&opts),
        };
        if let Err(crate::TestnetError::Interrupted) = result {
            // Ctrl-C stops the whole grid, not just this cell.
            return Err(crate::TestnetError::Interrupted);
        }
        if !policy.keep_ledgers {
            drop_ledgers(&opts.out);
        }
        let row = match result {
            Ok(summary) => MatrixRow::from_summary(&summary, attack, byzantine),
            Err(e) => MatrixRow {
                model,
                codec,
                local_steps: h,
                aggregator,
                attack,
                byzantine,
                error: Some(e.to_string()),
                ..Default::default()
            },
        };
        progress(i + 1, total, &row);
        rows.push(row);
        write_outputs(out, &rows)?;
    }
    Ok(rows)
}

fn write_outputs(out: &Path, rows: &[MatrixRow]) -> Result<(), TestnetError> {
    let json = out.join("matrix.json");
    let text = serde_json::to_vec_pretty(rows).map_err(|e| TestnetError::BadReport {
        path: json.clone(),
        detail: e.to_string(),
    })?;
    std::fs::write(&json, text).map_err(|source| TestnetError::Io { path: json, source })?;
    let md = out.join("matrix.md");
    std::fs::write(&md, markdown(rows)).map_err(|source| TestnetError::Io { path: md, source })
}

fn pct(v: f64) -> String {
    format!("{:.2}%", 100.0 * v)
}

/// A markdown table of the grid.
pub fn markdown(rows: &[MatrixRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| model | codec | H | aggregator | attack | rounds | honest acc (mean / min) | bytes / update | x smaller per exchange | x vs dense every step | MiB sent / node | attackers rejected or clipped | honest rejected | audits |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        if let Some(e) = &r.error {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | failed: {} |||||||||",
                r.model,
                r.codec,
                r.local_steps,
                r.aggregator,
                r.attack.as_deref().unwrap_or("none"),
                e.lines().next().unwrap_or("")
            );
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} / {} | {:.0} | {:.1} | {:.0} | {:.1} | {} | {} | {} |",
            r.model,
            r.codec,
            r.local_steps,
            r.aggregator,
            r.attack
                .as_deref()
                .map(|a| format!("{a} ({} nodes)", r.byzantine))
                .unwrap_or_else(|| "none".into()),
            r.rounds,
            pct(r.honest_mean_acc as f64),
            pct(r.honest_min_acc as f64),
            r.bytes_per_update,
            r.compression_ratio,
            r.ratio_vs_dense_every_step,
            r.bytes_sent_per_node / 1048576.0,
            r.malicious_rejected_or_clipped_share
                .map(pct)
                .unwrap_or_else(|| "-".into()),
            pct(r.honest_rejected_share),
            if r.audit_failures == 0 {
                "clean".to_string()
            } else {
                format!("{} failed", r.audit_failures)
            },
        );
    }
    out
}
