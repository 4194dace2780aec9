//! A gossiped message (the envelope and what it carries), as any peer on
//! the topic can send it: a value or a clear error, never a panic; what
//! decodes encodes back to bytes that decode to the same encoding.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtrain_gossip::GossipMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = GossipMessage::from_bytes(data) {
        let bytes = m.to_bytes();
        let again = GossipMessage::from_bytes(&bytes).expect("a decoded message decodes again");
        assert_eq!(again.to_bytes(), bytes);
    }
});
