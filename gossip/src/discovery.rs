//! How a node finds the rest of the mesh from one bootstrap address: peers'
//! identify reports feed Kademlia, and every peer Kademlia learns of is
//! dialled. Shared by the node and the discovery benchmark, so that the
//! benchmark measures the node's own policy.

use libp2p::swarm::SwarmEvent;
use libp2p::{identify, kad, PeerId, Swarm};

use crate::{MeshBehaviour, MeshBehaviourEvent};

/// Most connections a node opens on its own.
pub const MAX_DIALLED: usize = 64;

/// Acts on the discovery part of EVENT. `may_dial` vetoes peers (banned
/// ones, say).
pub fn on_event(
    swarm: &mut Swarm<MeshBehaviour>,
    event: &SwarmEvent<MeshBehaviourEvent>,
    may_dial: impl Fn(&PeerId) -> bool,
) {
    match event {
        SwarmEvent::Behaviour(MeshBehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
            for addr in &info.listen_addrs {
                swarm.behaviour_mut().kad.add_address(peer_id, addr.clone());
            }
        }
        SwarmEvent::Behaviour(MeshBehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. }))
            if !swarm.is_connected(peer) && may_dial(peer) && swarm.connected_peers().count() < MAX_DIALLED =>
        {
            let _ = swarm.dial(*peer);
        }
        _ => {}
    }
}
