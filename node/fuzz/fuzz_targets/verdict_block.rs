//! A signed verdict block (a vote, an anchor's attestation), as any peer
//! can gossip or serve one.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtrain_ledger::SignedVerdictBlock;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = SignedVerdictBlock::from_bytes(data) {
        let _ = b.verify_signature();
        let bytes = b.to_bytes();
        let again = SignedVerdictBlock::from_bytes(&bytes).expect("a decoded verdict block decodes again");
        assert_eq!(again.to_bytes(), bytes);
    }
});
