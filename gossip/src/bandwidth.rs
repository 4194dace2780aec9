//! Reading libp2p's own byte counters back out of the metrics registry.

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// Bytes received and sent on all connections so far, as counted by
/// libp2p-metrics' bandwidth transport (payload bytes above the muxer),
/// and gossipsub's own message counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteCounts {
    pub inbound: u64,
    pub outbound: u64,
    pub gossip: GossipCounts,
}

/// Gossip messages (records, votes, proofs) so far, from gossipsub's own
/// counters: what this node published, what it sent (its own and those it
/// forwarded, each copy counted) and their bytes, and what it received
/// (new, and copies of ones it had).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GossipCounts {
    pub published: u64,
    pub sent: u64,
    pub sent_bytes: u64,
    pub received: u64,
    pub duplicates: u64,
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
    let mut unfiltered = 0;
    for line in text.lines() {
        // gossipsub's counters: one series per topic (a run has one).
        let gossip = [
            ("gossipsub_topic_msg_published_total{", &mut counts.gossip.published),
            ("gossipsub_topic_msg_sent_counts_total{", &mut counts.gossip.sent),
            ("gossipsub_topic_msg_sent_bytes_total{", &mut counts.gossip.sent_bytes),
            ("gossipsub_topic_msg_recv_counts_total{", &mut counts.gossip.received),
            ("gossipsub_topic_msg_recv_counts_unfiltered_total{", &mut unfiltered),
        ];
        for (name, slot) in gossip {
            if let Some((_, value)) = series(line, name) {
                *slot += value as u64;
            }
        }
        let Some((labels, value)) = series(line, "libp2p_bandwidth_bytes_total{") else {
            continue;
        };
        if labels.contains("direction=\"Inbound\"") {
            counts.inbound += value as u64;
        } else if labels.contains("direction=\"Outbound\"") {
            counts.outbound += value as u64;
        }
    }
    counts.gossip.duplicates = unfiltered.saturating_sub(counts.gossip.received);
    counts
}

/// A sample line of the series `name` (given with its opening brace): its
/// labels and value.
fn series<'a>(line: &'a str, name: &str) -> Option<(&'a str, f64)> {
    let (labels, value) = line.strip_prefix(name)?.rsplit_once("} ")?;
    Some((labels, value.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gossipsub_counters() {
        let text = "gossipsub_topic_msg_published_total{hash=\"t\"} 4\n\
                    gossipsub_topic_msg_sent_counts_total{hash=\"t\"} 12\n\
                    gossipsub_topic_msg_sent_bytes_total{partial=\"false\",topic_hash=\"t\"} 6000\n\
                    gossipsub_topic_msg_recv_counts_total{hash=\"t\"} 9\n\
                    gossipsub_topic_msg_recv_counts_unfiltered_total{hash=\"t\"} 20\n\
                    gossipsub_topic_msg_recv_bytes_total{hash=\"t\"} 777\n";
        assert_eq!(
            parse_byte_counts(text).gossip,
            GossipCounts {
                published: 4,
                sent: 12,
                sent_bytes: 6000,
                received: 9,
                duplicates: 11,
            }
        );
    }

    #[test]
    fn parses_the_exposition_format() {
        let text = "# HELP x\nlibp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp/p2p\",direction=\"Inbound\"} 120\n\
                    libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp\",direction=\"Inbound\"} 5\n\
                    libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp/p2p\",direction=\"Outbound\"} 77\n";
        assert_eq!(
            parse_byte_counts(text),
            ByteCounts {
                inbound: 125,
                outbound: 77,
                gossip: GossipCounts::default(),
            }
        );
    }
}
