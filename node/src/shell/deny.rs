//! The operator's deny-list (`node run --deny-peers FILE`): peer ids, one
//! per line, that this node refuses to talk to. The file is re-read when it
//! changes, so a partition can be made and healed while nodes run; peers
//! taken off the list are dialled again.

use std::collections::HashSet;
use std::path::Path;
use std::time::SystemTime;

use meshtrain_gossip::libp2p::PeerId;
use tracing::{info, warn};

use super::Node;
use crate::core::start::short as short_peer;

/// Parses a deny-list: one peer id per line; blank lines and `#` comments
/// are skipped. A line that is not a peer id is reported, not fatal.
pub fn parse(text: &str, file: &Path) -> HashSet<PeerId> {
    let mut peers = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match line.parse::<PeerId>() {
            Ok(p) => {
                peers.insert(p);
            }
            Err(e) => {
                warn!(file = %file.display(), line = n + 1, error = %e, "deny-list line is not a peer id; skipped")
            }
        }
    }
    peers
}

pub struct DenyList {
    pub file: std::path::PathBuf,
    pub modified: Option<SystemTime>,
    pub peers: HashSet<PeerId>,
}

impl DenyList {
    pub fn new(file: std::path::PathBuf) -> Self {
        Self {
            file,
            modified: None,
            peers: HashSet::new(),
        }
    }
}

impl Node {
    /// Re-reads the deny-list if it changed; blocks added peers (closing
    /// their connections) and unblocks and redials removed ones.
    pub(super) fn refresh_deny_list(&mut self) {
        let Some(deny) = self.deny.as_mut() else {
            return;
        };
        let modified = std::fs::metadata(&deny.file).and_then(|m| m.modified()).ok();
        if modified == deny.modified {
            return;
        }
        deny.modified = modified;
        let now = match std::fs::read_to_string(&deny.file) {
            Ok(text) => parse(&text, &deny.file),
            // A missing file is an empty list.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => {
                warn!(file = %deny.file.display(), error = %e, "cannot read the deny-list; keeping the old one");
                return;
            }
        };
        let added: Vec<PeerId> = now.difference(&deny.peers).copied().collect();
        let removed: Vec<PeerId> = deny.peers.difference(&now).copied().collect();
        deny.peers = now;
        for p in &added {
            self.swarm.behaviour_mut().blocked.block_peer(*p);
        }
        for p in &removed {
            self.swarm.behaviour_mut().blocked.unblock_peer(*p);
            if !self.core.is_banned_peer(p) {
                let _ = self.swarm.dial(*p);
            }
        }
        if !added.is_empty() || !removed.is_empty() {
            let show = |v: &[PeerId]| v.iter().map(short_peer).collect::<Vec<_>>();
            info!(round = self.core.round(), denied = ?show(&added), allowed = ?show(&removed), "deny-list changed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_and_skips_comments_and_junk() {
        let a = PeerId::random();
        let b = PeerId::random();
        let text = format!("# partition\n{a}\n\n  {b}  # the other half\nnot-a-peer\n");
        let peers = parse(&text, Path::new("deny.txt"));
        assert_eq!(peers, HashSet::from([a, b]));
    }
}
