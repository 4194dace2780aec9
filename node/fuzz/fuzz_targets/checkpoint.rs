//! A checkpoint file, as a crash, a full disk or a flipped bit can leave
//! it. The first byte picks the input: raw bytes, or a real checkpoint
//! built from the rest and then truncated or with one byte changed (raw
//! bytes rarely get past safetensors' header to the checks after it).

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtrain_ledger::RunId;
use meshtrain_model::AdamState;
use meshtrain_node::checkpoint::Checkpoint;

const RUN: RunId = RunId([7; 32]);

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// A checkpoint's contents, floats by their bits (NaN is not equal to
/// itself; safetensors writes metadata in no fixed order).
fn canonical(cp: &Checkpoint) -> (u64, u64, Vec<Vec<u32>>) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect();
    let a = &cp.adam;
    let tensors = vec![bits(&cp.anchor), bits(&cp.velocity), bits(&cp.residual), bits(&a.m), bits(&a.v)];
    (cp.round, a.step, tensors)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode < 128 {
        if let Ok(cp) = Checkpoint::from_bytes(rest, &RUN) {
            let bytes = cp.to_bytes().expect("a decoded checkpoint encodes");
            let again = Checkpoint::from_bytes(&bytes, &RUN).expect("a decoded checkpoint decodes again");
            assert_eq!(canonical(&again), canonical(&cp));
        }
        return;
    }
    // [at: u32][byte][values...]: a real checkpoint, then one change.
    if rest.len() < 5 {
        return;
    }
    let at = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let byte = rest[4];
    let values = floats(&rest[5..]);
    let n = values.len() / 2;
    let cp = Checkpoint {
        run_id: RUN,
        round: u64::from(byte),
        anchor: values[..n].to_vec(),
        velocity: values[n..].to_vec(),
        residual: values[..n / 2].to_vec(),
        adam: AdamState {
            step: at as u64,
            m: values[n / 2..n].to_vec(),
            v: values[..n / 3].to_vec(),
        },
    };
    let Ok(mut bytes) = cp.to_bytes() else {
        return;
    };
    assert!(Checkpoint::from_bytes(&bytes, &RUN).is_ok(), "a fresh checkpoint decodes");
    if mode & 1 == 0 {
        bytes.truncate(at % (bytes.len() + 1));
    } else {
        let i = at % bytes.len();
        bytes[i] ^= byte.max(1);
    }
    let _ = Checkpoint::from_bytes(&bytes, &RUN);
});
