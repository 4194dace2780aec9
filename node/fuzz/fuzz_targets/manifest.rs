//! A dataset manifest, as a peer serves it (it must hash to the run's
//! dataset id, but it is parsed first) or as a disk holds it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtrain_model::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::from_bytes(data, "fuzz input") {
        let _ = m.id();
        for split in m.splits.keys() {
            let _ = (m.records(split), m.label_histogram(split));
        }
        let bytes = m.to_bytes();
        let again = Manifest::from_bytes(&bytes, "re-encoded").expect("a decoded manifest decodes again");
        assert_eq!(again.to_bytes(), bytes);
    }
});
