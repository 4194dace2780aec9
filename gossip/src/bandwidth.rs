//! Reading libp2p's own byte counters back out of the metrics registry.

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// Bytes received and sent on all connections so far, as counted by
/// libp2p-metrics' bandwidth transport (payload bytes above the muxer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteCounts {
    pub inbound: u64,
    pub outbound: u64,
}

/// Sums the `libp2p_bandwidth_bytes_total` series by direction.
pub fn byte_counts(registry: &Registry) -> ByteCounts {
    let mut text = String::new();
    if encode(&mut text, registry).is_err() {
        return ByteCounts::default();
    }
    parse_byte_counts(&text)
}

fn parse_byte_counts(text: &str) -> ByteCounts {
    let mut counts = ByteCounts::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("libp2p_bandwidth_bytes_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        if labels.contains("direction=\"Inbound\"") {
            counts.inbound += value as u64;
        } else if labels.contains("direction=\"Outbound\"") {
            counts.outbound += value as u64;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_exposition_format() {
        let text = "# HELP x\nlibp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp/p2p\",direction=\"Inbound\"} 120\n\
                    libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp\",direction=\"Inbound\"} 5\n\
                    libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp/p2p\",direction=\"Outbound\"} 77\n";
        assert_eq!(
            parse_byte_counts(text),
            ByteCounts {
                inbound: 125,
                outbound: 77
            }
        );
    }
}
