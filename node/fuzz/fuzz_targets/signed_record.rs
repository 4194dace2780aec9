//! A signed update record, from gossip, a records answer or the ledger:
//! decoding and the signature check give a value or an error, never a
//! panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtrain_ledger::SignedRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = SignedRecord::from_bytes(data) {
        let _ = r.verify_signature();
        let _ = (r.hash(), r.author(), r.seq());
        let bytes = r.to_bytes();
        let again = SignedRecord::from_bytes(&bytes).expect("a decoded record decodes again");
        assert_eq!(again.to_bytes(), bytes);
        assert_eq!(again.hash(), r.hash());
    }
});
