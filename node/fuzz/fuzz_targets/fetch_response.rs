//! An answer to one of our requests, as the peer we asked can make it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtrain_gossip::FetchResponse;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = FetchResponse::from_bytes(data) {
        let bytes = r.to_bytes();
        let again = FetchResponse::from_bytes(&bytes).expect("a decoded response decodes again");
        assert_eq!(again, r);
        let _ = r.carried_bytes();
    }
});
