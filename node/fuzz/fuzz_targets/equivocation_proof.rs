//! An equivocation proof, as any peer can gossip one: decoding and the
//! proof's own checks give a value or an error, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtrain_ledger::EquivocationProof;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = EquivocationProof::from_bytes(data) {
        let _ = p.verify();
        let _ = (p.author(), p.seq(), p.kind());
        let bytes = p.to_bytes();
        let again = EquivocationProof::from_bytes(&bytes).expect("a decoded proof decodes again");
        assert_eq!(again.to_bytes(), bytes);
    }
});
