//! Handshakes in progress per remote IP address. libp2p's connection limits
//! count pending connections in all; without a share per address, one host
//! holding [`Limits::PENDING`](crate::Limits::PENDING) raw TCP connections
//! that never finish a handshake would keep every other peer out.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, ListenFailure, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Refuses an inbound connection while its address already has `max`
/// handshakes in progress.
pub struct PendingPerIp {
    max: u32,
    by_ip: HashMap<IpAddr, u32>,
    pending: HashMap<ConnectionId, IpAddr>,
}

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("{ip} already has {max} handshakes in progress")]
pub struct TooManyPending {
    pub ip: IpAddr,
    pub max: u32,
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

impl PendingPerIp {
    pub fn new(max: u32) -> Self {
        Self {
            max,
            by_ip: HashMap::new(),
            pending: HashMap::new(),
        }
    }

    /// Handshakes in progress from `ip`.
    pub fn pending_from(&self, ip: &IpAddr) -> u32 {
        self.by_ip.get(ip).copied().unwrap_or(0)
    }

    /// Counts a handshake in, unless its address has no share left.
    fn admit(&mut self, id: ConnectionId, remote: &Multiaddr) -> Result<(), TooManyPending> {
        let Some(ip) = ip_of(remote) else {
            return Ok(());
        };
        let n = self.by_ip.entry(ip).or_default();
        if *n >= self.max {
            return Err(TooManyPending { ip, max: self.max });
        }
        *n += 1;
        self.pending.insert(id, ip);
        Ok(())
    }

    /// The handshake ended (established, failed, timed out or denied
    /// elsewhere); idempotent.
    fn release(&mut self, id: ConnectionId) {
        let Some(ip) = self.pending.remove(&id) else { return };
        if let Some(n) = self.by_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_ip.remove(&ip);
            }
        }
    }
}

impl NetworkBehaviour for PendingPerIp {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.admit(connection_id, remote).map_err(ConnectionDenied::new)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _peer: PeerId,
        _local: &Multiaddr,
        _remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.release(connection_id);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => self.release(connection_id),
            FromSwarm::ConnectionEstablished(e) => self.release(e.connection_id),
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _peer: PeerId, _id: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: &str) -> Multiaddr {
        format!("/ip4/{ip}/tcp/4000").parse().expect("multiaddr")
    }

    #[test]
    fn each_address_gets_its_share_and_gets_it_back() {
        let mut p = PendingPerIp::new(2);
        let ids: Vec<ConnectionId> = (0..4).map(ConnectionId::new_unchecked).collect();
        assert!(p.admit(ids[0], &addr("10.0.0.1")).is_ok());
        assert!(p.admit(ids[1], &addr("10.0.0.1")).is_ok());
        let refused = p.admit(ids[2], &addr("10.0.0.1")).expect_err("third from one address");
        assert_eq!(refused.to_string(), "10.0.0.1 already has 2 handshakes in progress");
        assert!(
            p.admit(ids[3], &addr("10.0.0.2")).is_ok(),
            "another address is not held up"
        );
        p.release(ids[0]);
        p.release(ids[0]);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        assert_eq!(p.pending_from(&ip), 1, "released once, however often told");
        assert!(p.admit(ids[2], &addr("10.0.0.1")).is_ok());
    }
}
