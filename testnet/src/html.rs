//! `OUT/report.html`: one self-contained page (inline SVG, no scripts, no
//! external files) with what a testnet did, plus PNG copies of its plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::style::RGBColor;

use crate::plot::{bars_png, bars_svg, lines_png, lines_svg, palette, Bars, Lines};
use crate::report::{NodeReport, Summary};

const ATTACKER: RGBColor = RGBColor(214, 39, 40);

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn node_label(i: usize, r: &NodeReport) -> String {
    match &r.attack {
        Some(a) => format!("node {i} ({a})"),
        None => format!("node {i}"),
    }
}

/// A per-round curve for every node; attackers drawn in red.
fn curves(
    reports: &[Option<NodeReport>],
    title: &str,
    y: &str,
    value: impl Fn(&crate::report::RoundRecord) -> f32,
) -> Lines {
    let series = reports
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)))
        .map(|(i, r)| {
            let pts: Vec<(f64, f64)> = r
                .history
                .iter()
                .map(|h| (h.round as f64, f64::from(value(h))))
                .filter(|(_, v)| v.is_finite())
                .collect();
            // The shared palette has no red: red is kept for attackers.
            let colour = if r.honest { palette(i) } else { ATTACKER };
            (node_label(i, r), pts, colour)
        })
        .collect();
    Lines {
        title: title.to_string(),
        x_label: "round".into(),
        y_label: y.into(),
        series,
    }
}

/// The mesh as seen by its nodes: who connected to whom.
fn mesh_svg(reports: &[Option<NodeReport>]) -> String {
    let n = reports.len().max(1);
    let (w, h, radius) = (420.0, 420.0, 160.0);
    let pos: Vec<(f64, f64)> = (0..n)
        .map(|i| {
            let a = std::f64::consts::TAU * i as f64 / n as f64 - std::f64::consts::FRAC_PI_2;
            (w / 2.0 + radius * a.cos(), h / 2.0 + radius * a.sin())
        })
        .collect();
    let index: BTreeMap<&str, usize> = reports
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().map(|r| (r.author.as_str(), i)))
        .collect();
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" class="mesh">"#
    );
    let mut edges = std::collections::BTreeSet::new();
    for (i, r) in reports.iter().enumerate() {
        for p in r.iter().flat_map(|r| &r.peers_seen) {
            if let Some(&j) = index.get(p.as_str()).filter(|j| **j != i) {
                edges.insert((i.min(j), i.max(j)));
            }
        }
    }
    for (a, b) in &edges {
        let _ = write!(
            svg,
            r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#999" stroke-width="1"/>"##,
            pos[*a].0, pos[*a].1, pos[*b].0, pos[*b].1
        );
    }
    for (i, r) in reports.iter().enumerate() {
        let (x, y) = pos[i];
        let (fill, label) = match r {
            Some(r) if r.honest => ("#1f77b4", format!("{i}")),
            Some(r) => ("#d62728", format!("{i} {}", r.attack.clone().unwrap_or_default())),
            None => ("#ccc", format!("{i} (no report)")),
        };
        let _ = write!(
            svg,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="14" fill="{fill}"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-family="sans-serif" font-size="12" fill="white">{}</text>"#,
            y + 4.0,
            escape(label.split(' ').next().unwrap_or_default())
        );
        if label.contains(' ') {
            let _ = write!(
                svg,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle" font-family="sans-serif" font-size="11">{}</text>"#,
                y + 30.0,
                escape(&label)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// The plots of a report, for SVG and PNG alike.
struct Plots {
    accuracy: Lines,
    loss: Lines,
    bytes: Bars,
    rejected_author: Bars,
    rejected_reason: Bars,
}

fn plots(reports: &[Option<NodeReport>]) -> Plots {
    let accuracy = curves(reports, "Test accuracy", "accuracy", |h| h.test_acc);
    let loss = curves(reports, "Test loss", "loss", |h| h.test_loss);
    let bytes = Bars {
        title: "MiB sent per node".into(),
        labels: (0..reports.len()).map(|i| i.to_string()).collect(),
        values: reports
            .iter()
            .map(|r| r.as_ref().map_or(0.0, |r| r.bytes_sent as f64 / 1048576.0))
            .collect(),
    };
    // Rejections summed over the honest nodes that made them.
    let short: BTreeMap<String, String> = reports
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().map(|r| (r.author.clone(), format!("node {i}"))))
        .collect();
    let mut by_author: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for r in reports.iter().flatten().filter(|r| r.honest) {
        for (a, n) in &r.rejected_by_author {
            *by_author
                .entry(short.get(a).cloned().unwrap_or_else(|| a.chars().take(8).collect()))
                .or_default() += n;
        }
        for (why, n) in &r.rejected_by_reason {
            *by_reason.entry(why.clone()).or_default() += n;
        }
    }
    let rejected_author = Bars {
        title: "Updates rejected by honest nodes, by author".into(),
        labels: by_author.keys().cloned().collect(),
        values: by_author.values().map(|v| *v as f64).collect(),
    };
    let rejected_reason = Bars {
        title: "Updates rejected by honest nodes, by reason".into(),
        labels: by_reason.keys().cloned().collect(),
        values: by_reason.values().map(|v| *v as f64).collect(),
    };

    Plots {
        accuracy,
        loss,
        bytes,
        rejected_author,
        rejected_reason,
    }
}

/// The first honest node's final evaluation: the confusion matrix as a
/// heat map with per-class scores for classifiers, the operating point for
/// the autoencoder, nats per character for language models.
fn final_eval_html(reports: &[Option<NodeReport>]) -> String {
    let Some((r, eval)) = reports
        .iter()
        .flatten()
        .filter(|r| r.honest)
        .find_map(|r| Some((r, r.final_eval.as_ref()?)))
    else {
        return String::new();
    };
    let mut html = String::from(r#"<h2>Final evaluation (held-out split)</h2><div id="final-eval">"#);
    if let Some(p) = r.final_task.perplexity {
        let _ = write!(
            html,
            "<p>{:.4} nats per character, perplexity {p:.2}.</p>",
            r.final_test_loss
        );
    }
    if let Some(d) = eval.get("detection").filter(|d| !d.is_null()) {
        let f = |k: &str| d.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        let _ = write!(
            html,
            "<p>Anomaly ROC-AUC {:.4}. At threshold {:.5} (95th percentile of normal error): recall {:.1}%, precision {:.1}%, false-positive rate {:.1}%.</p>",
            r.final_task.roc_auc.unwrap_or(f32::NAN),
            f("threshold"),
            100.0 * f("recall"),
            100.0 * f("precision"),
            100.0 * f("false_positive_rate")
        );
    }
    let matrix: Vec<Vec<u64>> = eval
        .pointer("/confusion/matrix")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    let scores = eval
        .get("per_class")
        .and_then(|v| v.as_array())
        .cloned()
        .unwrap_or_default();
    if !matrix.is_empty() {
        html.push_str(r#"<table id="confusion"><tr><th>true \ predicted</th>"#);
        for c in 0..matrix.len() {
            let _ = write!(html, "<th>{c}</th>");
        }
        html.push_str("<th>precision</th><th>recall</th><th>F1</th></tr>");
        for (t, row) in matrix.iter().enumerate() {
            let total = row.iter().sum::<u64>().max(1) as f64;
            let _ = write!(html, "<tr><th>{t}</th>");
            for &n in row {
                // Shade by the share of the true class: the diagonal is recall.
                let alpha = n as f64 / total;
                let _ = write!(html, r#"<td style="background:rgba(31,119,180,{alpha:.2})">{n}</td>"#);
            }
            let s = |k: &str| {
                scores
                    .get(t)
                    .and_then(|v| v.get(k))
                    .and_then(|v| v.as_f64())
                    .unwrap_or(f64::NAN)
            };
            let _ = write!(
                html,
                "<td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>",
                s("precision"),
                s("recall"),
                s("f1")
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</div>");
    html
}

/// Writes OUT/report.html and OUT/plots/*.png.
pub fn write_report(out: &Path, summary: &Summary, reports: &[Option<NodeReport>]) -> Result<(), String> {
    let p = plots(reports);
    let dir = out.join("plots");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    lines_png(&dir.join("accuracy.png"), &p.accuracy)?;
    lines_png(&dir.join("loss.png"), &p.loss)?;
    bars_png(&dir.join("bytes.png"), std::slice::from_ref(&p.bytes))?;
    bars_png(
        &dir.join("rejected.png"),
        &[p.rejected_author.clone(), p.rejected_reason.clone()],
    )?;
    let html = render(summary, reports, None)?;
    let path = out.join("report.html");
    std::fs::write(&path, html).map_err(|e| format!("{}: {e}", path.display()))
}

/// The page. With `live = Some(seconds)` it reloads itself that often and
/// shows audits as pending (they run once the nodes have stopped).
/// Whether the honest nodes trained each round from one anchor: distinct
/// anchors per round (1 is agreement) and the repairs made onto each.
fn agreement_html(summary: &Summary) -> Result<String, String> {
    if summary.anchor_rounds.is_empty() {
        return Ok(String::new());
    }
    let points = |f: &dyn Fn(&crate::report::AnchorRound) -> f64| -> Vec<(f64, f64)> {
        summary.anchor_rounds.iter().map(|r| (r.round as f64, f(r))).collect()
    };
    let chart = Lines {
        title: format!(
            "Anchor agreement {:.3}: distinct honest anchors and repairs per round",
            summary.anchor_agreement.unwrap_or(f64::NAN)
        ),
        x_label: "round".into(),
        y_label: "count".into(),
        series: vec![
            ("distinct anchors".into(), points(&|r| r.anchors as f64), palette(0)),
            ("repairs".into(), points(&|r| r.repairs as f64), palette(3)),
        ],
    };
    Ok(format!(
        r#"<h2>Agreement</h2><p>Anchor agreement: <b>{:.3}</b>; repairs: {}; first split: {}.</p><figure id="agreement">{}</figure>"#,
        summary.anchor_agreement.unwrap_or(f64::NAN),
        summary.anchor_repairs,
        summary
            .first_anchor_split
            .map_or("none".to_string(), |r| format!("round {r}")),
        lines_svg(&chart)?
    ))
}

pub fn render(summary: &Summary, reports: &[Option<NodeReport>], live: Option<u32>) -> Result<String, String> {
    let Plots {
        accuracy,
        loss,
        bytes,
        rejected_author,
        rejected_reason,
    } = plots(reports);
    let refresh = live.map_or(String::new(), |s| {
        format!(r#"<meta http-equiv="refresh" content="{s}">"#)
    });
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!doctype html><html><head><meta charset="utf-8">{refresh}<title>meshtrain testnet report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}figure{{display:inline-block;margin:0.5em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}.bad{{color:#d62728;font-weight:bold}}</style>
</head><body><h1>meshtrain testnet</h1>
<p>{} nodes, model {}, codec {}, aggregator {}, H = {}, {} rounds, {:.1} s. Honest test accuracy: mean {:.2}%, min {:.2}%.
Audit failures: <b>{}</b>. Restarts: {}. Records lost across kills: {}.</p>"#,
        summary.nodes_total,
        escape(&summary.model),
        escape(&summary.codec),
        escape(&summary.aggregator),
        summary.local_steps,
        summary.rounds,
        summary.wall_s,
        100.0 * summary.honest_mean_acc,
        100.0 * summary.honest_min_acc,
        summary.audit_failures,
        summary.restarts,
        summary.lost_records,
    );
    html.push_str(r#"<h2>Learning</h2><figure id="accuracy">"#);
    html.push_str(&lines_svg(&accuracy)?);
    html.push_str(r#"</figure><figure id="loss">"#);
    html.push_str(&lines_svg(&loss)?);
    html.push_str("</figure>");
    html.push_str(&final_eval_html(reports));
    html.push_str(&agreement_html(summary)?);
    html.push_str(r#"<h2>Network</h2><figure id="bytes">"#);
    html.push_str(&bars_svg(&bytes)?);
    html.push_str(
        r#"</figure><figure id="mesh"><figcaption>Mesh: who connected to whom (red: attackers)</figcaption>"#,
    );
    html.push_str(&mesh_svg(reports));
    html.push_str(r#"</figure><h2>Poisoning defences</h2><figure id="rejected-author">"#);
    html.push_str(&bars_svg(&rejected_author)?);
    html.push_str(r#"</figure><figure id="rejected-reason">"#);
    html.push_str(&bars_svg(&rejected_reason)?);
    html.push_str("</figure><h2>Ledger audits</h2><table id=\"audits\"><tr><th>node</th><th>role</th><th>test acc</th><th>records</th><th>audit</th></tr>");
    for n in &summary.nodes {
        let role = n.attack.clone().unwrap_or_else(|| "honest".into());
        let audit = if live.is_some() {
            "pending (runs at the end)".to_string()
        } else if n.audit_ok {
            "ok".to_string()
        } else {
            format!(
                r#"<span class="bad">FAILED: {}</span>"#,
                escape(n.audit_first_problem.as_deref().unwrap_or("no audit"))
            )
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{:.2}%</td><td>{}</td><td>{}</td></tr>",
            n.index,
            escape(&role),
            100.0 * n.final_test_acc,
            n.audit_records,
            audit
        );
    }
    html.push_str("</table></body></html>\n");
    Ok(html)
}
