//! `meshtrain node status`: a one-screen summary of a running node, read
//! from its Prometheus text (no I/O here, so it is tested on real encodings).

use std::collections::BTreeMap;
use std::fmt;

/// One sample: its labels (as written) and value.
type Samples = BTreeMap<String, Vec<(String, f64)>>;

#[derive(Debug, Default)]
pub struct Status {
    samples: Samples,
}

#[derive(Debug, thiserror::Error)]
#[error("no meshtrain_round sample in the metrics text")]
pub struct NotANode;

impl Status {
    /// Parses the text exposition format; comments and malformed lines are
    /// skipped, but the text must come from a meshtrain node.
    pub fn parse(text: &str) -> Result<Self, NotANode> {
        let mut samples = Samples::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, labels) = match key.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (key, ""),
            };
            samples
                .entry(name.to_string())
                .or_default()
                .push((labels.to_string(), value));
        }
        if !samples.contains_key("meshtrain_round") {
            return Err(NotANode);
        }
        Ok(Self { samples })
    }

    fn value(&self, name: &str) -> Option<f64> {
        self.samples.get(name).and_then(|v| v.first()).map(|(_, x)| *x)
    }

    fn sum_where(&self, name: &str, label: &str) -> f64 {
        self.samples
            .get(name)
            .map(|v| {
                v.iter()
                    .filter(|(l, _)| l.contains(label))
                    .fold(0.0, |acc, (_, x)| acc + x)
            })
            .unwrap_or(0.0)
    }

    /// Rejections by reason.
    fn rejected(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (labels, v) in self.samples.get("meshtrain_updates_total").into_iter().flatten() {
            if labels.contains("outcome=\"rejected\"") {
                let reason = labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("reason=\""))
                    .map(|r| r.trim_end_matches('"').to_string())
                    .unwrap_or_default();
                out.push((reason, *v));
            }
        }
        out
    }

    /// Mean seconds of a stage, from its histogram sum and count.
    fn stage_mean(&self, stage: &str) -> Option<(f64, f64)> {
        let label = format!("stage=\"{stage}\"");
        let count = self.sum_where("meshtrain_stage_seconds_count", &label);
        let sum = self.sum_where("meshtrain_stage_seconds_sum", &label);
        (count > 0.0).then(|| (sum / count, count))
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |x: Option<f64>| {
            x.filter(|v| v.is_finite())
                .map_or("-".to_string(), |v| format!("{:.2}%", v * 100.0))
        };
        let num = |x: Option<f64>| {
            x.filter(|v| v.is_finite())
                .map_or("-".to_string(), |v| format!("{v:.4}"))
        };
        writeln!(f, "round         {}", self.value("meshtrain_round").unwrap_or(0.0))?;
        writeln!(
            f,
            "test          accuracy {}, loss {}",
            pct(self.value("meshtrain_test_accuracy")),
            num(self.value("meshtrain_test_loss"))
        )?;
        writeln!(f, "train loss    {}", num(self.value("meshtrain_train_loss")))?;
        writeln!(f, "peers         {}", self.value("meshtrain_peers").unwrap_or(0.0))?;
        writeln!(
            f,
            "updates       received {}, merged {}, clipped {}, rejected {}",
            self.value("meshtrain_updates_received_total").unwrap_or(0.0),
            self.sum_where("meshtrain_updates_total", "outcome=\"merged\""),
            self.sum_where("meshtrain_updates_total", "outcome=\"clipped\""),
            self.sum_where("meshtrain_updates_total", "outcome=\"rejected\""),
        )?;
        for (reason, n) in self.rejected() {
            writeln!(f, "  rejected    {n} x {reason}")?;
        }
        writeln!(
            f,
            "network       in {}, out {}",
            mib(self.value("meshtrain_bytes_in").unwrap_or(0.0)),
            mib(self.value("meshtrain_bytes_out").unwrap_or(0.0))
        )?;
        writeln!(
            f,
            "ledger        {} records, {}",
            self.value("meshtrain_ledger_records").unwrap_or(0.0),
            mib(self.value("meshtrain_ledger_bytes").unwrap_or(0.0))
        )?;
        for stage in meshtrain_report::STAGES {
            if let Some((mean, count)) = self.stage_mean(stage) {
                writeln!(f, "time {stage:<13} {:.2} ms mean over {count}", mean * 1000.0)?;
            }
        }
        writeln!(
            f,
            "process       cpu {:.1} s, rss {}",
            self.value("meshtrain_process_cpu_seconds").unwrap_or(0.0),
            mib(self.value("meshtrain_process_resident_bytes").unwrap_or(0.0))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::NodeMetrics;
    use prometheus_client::registry::Registry;
    use std::time::Duration;

    #[test]
    fn summarises_a_real_registry() {
        let mut registry = Registry::default();
        let m = NodeMetrics::register(&mut registry);
        m.round.set(7);
        m.test_acc.set(0.8512);
        m.peers.set(3);
        m.outcome("merged", "");
        m.outcome("merged", "");
        m.outcome("rejected", "bad-signature");
        m.stage("train", Duration::from_millis(40));
        m.stage("train", Duration::from_millis(60));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let s = Status::parse(&text).unwrap();
        let shown = s.to_string();
        assert!(shown.contains("round         7"), "{shown}");
        assert!(shown.contains("accuracy 85.12%"), "{shown}");
        assert!(shown.contains("merged 2, clipped 0, rejected 1"), "{shown}");
        assert!(shown.contains("1 x bad-signature"), "{shown}");
        assert!(shown.contains("time train         50.00 ms mean over 2"), "{shown}");
    }

    #[test]
    fn refuses_text_from_something_else() {
        assert!(Status::parse("# HELP up\nup 1\n").is_err());
        assert!(Status::parse("<html>not metrics</html>").is_err());
    }
}
