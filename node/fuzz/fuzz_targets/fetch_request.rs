//! A request-response request, as any connected peer can send it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtrain_gossip::FetchRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = FetchRequest::from_bytes(data) {
        let bytes = r.to_bytes();
        let again = FetchRequest::from_bytes(&bytes).expect("a decoded request decodes again");
        assert_eq!(again, r);
    }
});
