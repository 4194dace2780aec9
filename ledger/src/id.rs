//! Newtypes for the 32-byte values that flow through the ledger.
//!
//! Each is a distinct type so that a payload hash can never be passed where a
//! record hash is expected. All of them print as lowercase hex.

use std::fmt;
use std::str::FromStr;

use bincode::{Decode, Encode};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::LedgerError;

/// Domain-separated blake3: every hash in meshtrain names what it hashes.
pub(crate) fn hash_in(context: &str, parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(context);
    for part in parts {
        hasher.update(part);
    }
    *hasher.finalize().as_bytes()
}

macro_rules! bytes32 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// First 8 hex digits, for logs.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }

            pub fn from_slice(bytes: &[u8]) -> Result<Self, LedgerError> {
                let arr: [u8; 32] = bytes.try_into().map_err(|_| LedgerError::Malformed {
                    what: stringify!($name),
                    detail: format!("expected 32 bytes, got {}", bytes.len()),
                })?;
                Ok(Self(arr))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = LedgerError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let bytes = hex::decode(s).map_err(|e| LedgerError::Malformed {
                    what: stringify!($name),
                    detail: format!("not hex: {e}"),
                })?;
                Self::from_slice(&bytes)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&hex::encode(self.0))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

bytes32!(
    /// Identifies a run: the blake3 hash of its canonical `RunSpec` bytes.
    RunId
);
bytes32!(
    /// An author's ed25519 public key. The libp2p `PeerId` derives from the
    /// same key, so a ledger author and a network peer are the same thing.
    AuthorId
);
bytes32!(
    /// The hash of a record's signed body; `prev` links are made of these.
    RecordHash
);
bytes32!(
    /// The hash of an encoded delta payload.
    PayloadHash
);
bytes32!(
    /// The hash of a flat weight vector (little-endian f32 bytes).
    WeightsHash
);
bytes32!(
    /// The hash of a verdict block's signed body.
    VerdictHash
);

impl RunId {
    /// `run_id = blake3(canonical bytes of RunSpec)`.
    pub fn of_spec(canonical_spec: &[u8]) -> Self {
        Self(hash_in("meshtrain run-spec v1", &[canonical_spec]))
    }
}

impl PayloadHash {
    pub fn of(payload: &[u8]) -> Self {
        Self(hash_in("meshtrain payload v1", &[payload]))
    }
}

impl WeightsHash {
    /// Hashes the little-endian bytes of a weight vector.
    pub fn of_f32(values: &[f32]) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key("meshtrain weights v1");
        // The little-endian bytes of the values: on a little-endian machine
        // that is the slice's own memory, hashed in place (a node hashes its
        // anchor twice a round, on the event loop).
        #[cfg(target_endian = "little")]
        {
            // SAFETY: an f32 is four initialised bytes without padding, and
            // u8 has no alignment to keep; the slice borrows `values`.
            let bytes =
                unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) };
            hasher.update(bytes);
        }
        #[cfg(not(target_endian = "little"))]
        {
            let mut buf = Vec::with_capacity(4 * 4096);
            for chunk in values.chunks(4096) {
                buf.clear();
                for v in chunk {
                    buf.extend_from_slice(&v.to_le_bytes());
                }
                hasher.update(&buf);
            }
        }
        Self(*hasher.finalize().as_bytes())
    }
}

impl RecordHash {
    /// The `prev` of every author's first record: it ties each chain to the
    /// run and to the genesis weights that every node derives from the seed.
    pub fn genesis(run_id: &RunId, genesis_weights: &WeightsHash) -> Self {
        Self(hash_in("meshtrain genesis v1", &[&run_id.0, &genesis_weights.0]))
    }
}

impl RecordHash {
    /// The first sixteen bytes, which name a record among a round's: two
    /// records with one tag take some 2^64 tries even for an attacker who
    /// makes both (eight bytes took 2^32, a few seconds, and showing each
    /// half of the mesh one of the pair would make them rebuild apart).
    pub fn tag(&self) -> RecordTag {
        let mut t = [0u8; 16];
        t.copy_from_slice(&self.0[..16]);
        RecordTag(t)
    }
}

/// A short name of an update record: the first sixteen bytes of its hash.
/// Records list the updates their author merged by these (eight records'
/// worth is 128 bytes where full hashes would be 256).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Encode, Decode, Serialize, Deserialize)]
pub struct RecordTag(pub [u8; 16]);

impl std::fmt::Display for RecordTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl VerdictHash {
    /// The `prev` of a node's first verdict block.
    pub fn genesis(run_id: &RunId, owner: &AuthorId) -> Self {
        Self(hash_in("meshtrain verdict genesis v1", &[&run_id.0, &owner.0]))
    }
}

/// An author's position in its own chain, counting up by one from 0.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Encode, Decode, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A 64-byte ed25519 signature, kept as raw bytes until verified.
#[derive(Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct SignatureBytes(pub [u8; 64]);

impl fmt::Debug for SignatureBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..4]))
    }
}

impl Serialize for SignatureBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for SignatureBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = hex::decode(&s).map_err(serde::de::Error::custom)?;
        let arr: [u8; 64] = bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("signature must be 64 bytes"))?;
        Ok(Self(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_hash_is_of_the_little_endian_bytes() {
        // What ledgers written so far hold: the hash of the values'
        // little-endian bytes, whatever the machine.
        let values: Vec<f32> = (0..10_007).map(|i| (i as f32 * 0.37).sin() * 1e-3 - 2.5).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let expected = blake3::Hasher::new_derive_key("meshtrain weights v1")
            .update(&bytes)
            .finalize();
        assert_eq!(WeightsHash::of_f32(&values).0, *expected.as_bytes());
        assert_ne!(WeightsHash::of_f32(&values[1..]), WeightsHash::of_f32(&values));
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let h = PayloadHash::of(b"abc");
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<PayloadHash>().unwrap(), h);
        assert!("zz".parse::<PayloadHash>().is_err());
        assert!("abcd".parse::<PayloadHash>().is_err());
    }

    #[test]
    fn domains_separate_hashes() {
        assert_ne!(PayloadHash::of(b"x").0, RunId::of_spec(b"x").0);
    }

    #[test]
    fn weights_hash_depends_on_every_value() {
        let mut w = vec![0.5f32; 10_000];
        let a = WeightsHash::of_f32(&w);
        w[9_999] = 0.25;
        assert_ne!(a, WeightsHash::of_f32(&w));
    }
}
