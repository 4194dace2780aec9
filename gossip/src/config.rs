//! Limits and timings of the mesh protocols.

use std::time::Duration;

/// Everything a node may tune about its networking. The defaults keep gossip
/// small (records and small inline payloads) and move big payloads over
/// request-response.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// Largest gossipsub message, sent or accepted.
    pub max_gossip_bytes: usize,
    /// Largest payload accepted inline with its record.
    pub max_inline_payload: usize,
    /// Our own payloads up to this size ride inline; larger ones go by
    /// hash over request-response. Small, because gossipsub relays every
    /// message through the mesh: 5 KiB top-k payloads inline took a
    /// 2 Mbit/s host's whole link in an 8-node mesh (each arrived some
    /// 2.7 times, and it relayed them on), and its own shard never came.
    pub send_inline_payload: usize,
    /// Largest request-response request.
    pub max_request_bytes: usize,
    /// Largest request-response response (one payload, block or anchor).
    pub max_response_bytes: usize,
    pub request_timeout: Duration,
    pub heartbeat: Duration,
    /// Close connections idle this long (peers in the mesh are never idle).
    pub idle_timeout: Duration,
    /// Ping every connection this often; one that misses two pings in a
    /// row by `ping_timeout` is closed and its peer redialled (see
    /// [`crate::discovery`]): a dark link is noticed within about
    /// interval + 2 x timeout. The timeout is generous because a ping
    /// queues behind whatever the connection is already sending, and a
    /// slow host may be sending a whole anchor.
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// Discover peers on the LAN by mDNS (opt-in).
    pub mdns: bool,
    /// A libp2p private network key: only peers holding it complete a
    /// handshake (pnet over TCP, under noise).
    pub psk: Option<libp2p::pnet::PreSharedKey>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            max_gossip_bytes: 64 * 1024,
            max_inline_payload: 48 * 1024,
            send_inline_payload: 1024,
            max_request_bytes: 16 * 1024,
            max_response_bytes: 128 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(120),
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(10),
            mdns: false,
            psk: None,
        }
    }
}
