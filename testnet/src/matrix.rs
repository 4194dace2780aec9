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
    /// Netns link rates (every node's); empty: the base options' link.
    pub links: Vec<crate::netns::Rate>,
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
    /// Every node's link rate (netns), when shaped.
    #[serde(default)]
    pub link: Option<String>,
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
    /// The slowest honest node's run time.
    #[serde(default)]
    pub honest_wall_s: Option<f64>,
    /// Wall-clock seconds until every honest node reached the target
    /// accuracy (`--target-acc`), if it did.
    #[serde(default)]
    pub time_to_target_s: Option<f64>,
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
            link: None,
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
            honest_wall_s: s.honest_wall_s,
            time_to_target_s: s.time_to_target_s,
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
    let links: Vec<Option<crate::netns::Rate>> = if axes.links.is_empty() {
        vec![base.link.clone()]
    } else {
        axes.links.iter().cloned().map(Some).collect()
    };
    let mut grid = Vec::new();
    for m in &axes.models {
        for a in &axes.attacks {
            for g in &axes.aggregators {
                for l in &links {
                    for c in &axes.codecs {
                        for h in &axes.local_steps {
                            grid.push((m.clone(), c.clone(), *h, g.clone(), a.clone(), l.clone()));
                        }
                    }
                }
            }
        }
    }
    let total = grid.len();
    let mut rows = Vec::with_capacity(total);
    for (i, (model, codec, h, aggregator, attack, link)) in grid.into_iter().enumerate() {
        let byzantine = if attack.is_some() { base.byzantine } else { 0 };
        let mut name = format!(
            "{model}-{}-h{h}-{}-{}",
            slug(&codec),
            slug(&aggregator),
            attack.as_deref().map(slug).unwrap_or_else(|| "clean".into())
        );
        if !axes.links.is_empty() {
            if let Some(l) = &link {
                name = format!("{name}-{}", slug(&l.to_string()));
            }
        }
        let opts = TestnetOptions {
            model: model.clone(),
            codec: codec.clone(),
            local_steps: h,
            aggregator: aggregator.clone(),
            attack: attack.clone(),
            byzantine,
            link: link.clone(),
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
        let mut row = match result {
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
        row.link = link.map(|l| l.to_string());
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
    std::fs::write(&md, markdown(rows)).map_err(|source| TestnetError::Io { path: md, source })?;
    if let Some(chart) = time_to_target_chart(rows) {
        // A missing font costs the picture, not the table.
        let png = out.join("time-to-target.png");
        if let Err(e) = crate::plot::lines_png(&png, &chart) {
            tracing::warn!(path = %png.display(), "cannot draw the time-to-target chart: {e}");
        }
    }
    Ok(())
}

/// Time to the target accuracy against link rate, one line per model,
/// codec and H: where compression pays in wall-clock time. `None` when no
/// row has both a link and a time.
pub fn time_to_target_chart(rows: &[MatrixRow]) -> Option<crate::plot::Lines> {
    let mut series: Vec<crate::plot::Series> = Vec::new();
    for r in rows {
        let (Some(link), Some(t)) = (r.link.as_deref(), r.time_to_target_s) else {
            continue;
        };
        let Ok(rate) = link.parse::<crate::netns::Rate>() else {
            continue;
        };
        let mbit = rate.bits_per_s as f64 / 1e6;
        let name = format!("{} {} H={}", r.model, r.codec, r.local_steps);
        let point = (mbit.log10(), t);
        match series.iter_mut().find(|(n, _, _)| *n == name) {
            Some((_, points, _)) => points.push(point),
            None => {
                let color = crate::plot::palette(series.len());
                series.push((name, vec![point], color));
            }
        }
    }
    if series.is_empty() {
        return None;
    }
    for (_, points, _) in &mut series {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Some(crate::plot::Lines {
        title: "time to the target accuracy".into(),
        x_label: "link rate, log10 Mbit/s (1 = 10, 3 = 1000)".into(),
        y_label: "seconds".into(),
        series,
    })
}

fn pct(v: f64) -> String {
    format!("{:.2}%", 100.0 * v)
}

/// A markdown table of the grid.
pub fn markdown(rows: &[MatrixRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| model | codec | H | aggregator | attack | rounds | honest acc (mean / min) | bytes / update | x smaller per exchange | x vs dense every step | MiB sent / node | attackers rejected or clipped | honest rejected | audits | link | wall s | honest s | to target s |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        if let Some(e) = &r.error {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | failed: {} ||||||||||||",
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
            "| {} | {} | {} | {} | {} | {} | {} / {} | {:.0} | {:.1} | {:.0} | {:.1} | {} | {} | {} | {} | {:.1} | {} | {} |",
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
            r.link.as_deref().unwrap_or("-"),
            r.wall_s,
            r.honest_wall_s
                .map(|t| format!("{t:.1}"))
                .unwrap_or_else(|| "-".into()),
            r.time_to_target_s
                .map(|t| format!("{t:.1}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(codec: &str, link: &str, t: Option<f64>) -> MatrixRow {
        MatrixRow {
            model: "mlp".into(),
            codec: codec.into(),
            local_steps: 10,
            aggregator: "trimmed-mean:0.2".into(),
            link: Some(link.into()),
            time_to_target_s: t,
            ..Default::default()
        }
    }

    #[test]
    fn time_to_target_is_charted_per_codec_against_link_rate() {
        let rows = vec![
            row("dense", "1gbit", Some(40.0)),
            row("dense", "10mbit", Some(400.0)),
            row("topk-int8:0.01", "10mbit", Some(45.0)),
            row("topk-int8:0.01", "1gbit", None),
        ];
        let chart = time_to_target_chart(&rows).expect("a chart");
        assert_eq!(chart.series.len(), 2);
        let (name, points, _) = &chart.series[0];
        assert_eq!(name, "mlp dense H=10");
        // Sorted by rate: 10 Mbit/s is log10 1, 1 Gbit/s is log10 3.
        assert_eq!(points.len(), 2);
        assert!((points[0].0 - 1.0).abs() < 1e-9 && points[0].1 == 400.0);
        assert!((points[1].0 - 3.0).abs() < 1e-9 && points[1].1 == 40.0);
        // A run that never reached the target is not a point.
        assert_eq!(chart.series[1].1.len(), 1);
        let md = markdown(&rows);
        assert!(md.contains("| 10mbit | 0.0 | - | 400.0 |"), "{md}");
        assert!(md.contains("| 1gbit | 0.0 | - | - |"), "{md}");
        // No links, no chart.
        let plain = MatrixRow {
            link: None,
            ..row("dense", "1gbit", Some(1.0))
        };
        assert!(time_to_target_chart(&[plain]).is_none());
    }
}
