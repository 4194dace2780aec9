//! Signed update records: what an author claims to have contributed.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::key::verify_one;
use crate::wire::{decode_exact, encode};
use crate::{
    id::hash_in, AuthorId, AuthorKey, LedgerError, PayloadHash, RecordHash, RecordTag, RunId, Seq, SignatureBytes,
    WeightsHash,
};

/// The version written into every record; a newer one is refused, not guessed at.
pub const RECORD_VERSION: u16 = 4;

/// Most merged updates one record may list (a round has one per member).
pub const MAX_MERGED: usize = 4096;

const RECORD_SIGNING_CONTEXT: &[u8] = b"meshtrain/update-record/v1";

/// One author's claim: "in `round`, starting from weights `base_hash`, I trained
/// on `n_samples` samples and my encoded delta is `payload_hash`".
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct UpdateRecord {
    pub version: u16,
    pub run_id: RunId,
    pub author: AuthorId,
    pub seq: Seq,
    /// Hash of the author's record at `seq - 1`, or the genesis link at seq 0.
    pub prev: RecordHash,
    pub round: u64,
    /// Hash of the anchor weights the delta was trained from.
    pub base_hash: WeightsHash,
    /// Hash of the outer optimiser's state that came with them. With
    /// `base_hash` it is the author's signed vote for the anchor it closed
    /// round `round - 1` on (see the node's agreement rule).
    pub base_outer: WeightsHash,
    /// The anchor (weights and outer state) its author aggregated round
    /// `round - 1` onto to make `base_hash`, and the updates it merged doing
    /// so (16-byte tags, sorted): every node can then tell which anchor more than
    /// half the voting power built on and which updates it merged, and
    /// rebuild that round from them when no anchor was decided. Zero and
    /// empty when it took `base_hash` over instead of making it.
    pub made_from: WeightsHash,
    pub made_outer: WeightsHash,
    pub merged: Vec<RecordTag>,
    /// One bit per `merged` tag, in its order (bit `i % 8` of byte `i /
    /// 8`): set where that update came in the later half of the
    /// stragglers' grace or after it, so the round waited for it. Signed, so every node judges alike
    /// which members habitually make rounds wait (and stops waiting for
    /// them); arrival times seen locally differ from node to node.
    pub waited: Vec<u8>,
    pub payload_hash: PayloadHash,
    pub payload_len: u64,
    pub n_samples: u64,
    pub train_loss: f32,
}

impl UpdateRecord {
    /// The canonical bytes that are signed and hashed.
    pub fn body_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn hash(&self) -> RecordHash {
        body_hash(&self.body_bytes())
    }

    /// The `merged` tags whose `waited` bit is set.
    pub fn waited_for(&self) -> impl Iterator<Item = RecordTag> + '_ {
        self.merged
            .iter()
            .enumerate()
            .filter(|(i, _)| self.waited.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1))
            .map(|(_, t)| *t)
    }

    /// The `waited` bits for `merged`, set where `waited` holds the tag.
    pub fn waited_bits(merged: &[RecordTag], waited: &std::collections::BTreeSet<RecordTag>) -> Vec<u8> {
        let mut bits = vec![0u8; merged.len().div_ceil(8)];
        for (i, t) in merged.iter().enumerate() {
            if waited.contains(t) {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        bits
    }

    pub fn sign(self, key: &AuthorKey) -> SignedRecord {
        let signature = key.sign(&signing_message(&self.body_bytes()));
        SignedRecord {
            record: self,
            signature,
        }
    }
}

/// The record hash of already-encoded body bytes.
pub(crate) fn body_hash(body: &[u8]) -> RecordHash {
    RecordHash(hash_in("meshtrain update-record v1", &[body]))
}

pub(crate) fn signing_message(body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(RECORD_SIGNING_CONTEXT.len() + body.len());
    msg.extend_from_slice(RECORD_SIGNING_CONTEXT);
    msg.extend_from_slice(body);
    msg
}

/// An update record with its author's signature, not yet checked.
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct SignedRecord {
    pub record: UpdateRecord,
    pub signature: SignatureBytes,
}

impl SignedRecord {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes untrusted bytes: size-limited, no trailing bytes, known version.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LedgerError> {
        let signed: SignedRecord = decode_exact(bytes, "update record")?;
        if signed.record.version != RECORD_VERSION {
            return Err(LedgerError::Malformed {
                what: "update record",
                detail: format!("version {} (this build knows {RECORD_VERSION})", signed.record.version),
            });
        }
        if signed.record.merged.len() > MAX_MERGED {
            return Err(LedgerError::Malformed {
                what: "update record",
                detail: format!(
                    "it lists {} merged updates, over the {MAX_MERGED} a round can have",
                    signed.record.merged.len()
                ),
            });
        }
        let r = &signed.record;
        let bits_ok = r.waited.len() == r.merged.len().div_ceil(8)
            && r.waited
                .last()
                .is_none_or(|b| r.merged.len().is_multiple_of(8) || b >> (r.merged.len() % 8) == 0);
        if !bits_ok {
            return Err(LedgerError::Malformed {
                what: "update record",
                detail: format!(
                    "its waited-for bits ({} bytes) do not match its {} merged updates",
                    r.waited.len(),
                    r.merged.len()
                ),
            });
        }
        Ok(signed)
    }

    pub fn hash(&self) -> RecordHash {
        self.record.hash()
    }

    pub fn author(&self) -> AuthorId {
        self.record.author
    }

    pub fn seq(&self) -> Seq {
        self.record.seq
    }

    /// The exact bytes the author signed (domain prefix and body).
    pub fn signed_message(&self) -> Vec<u8> {
        signing_message(&self.record.body_bytes())
    }

    /// Checks the signature strictly against the record's author.
    pub fn verify_signature(&self) -> Result<(), LedgerError> {
        let msg = signing_message(&self.record.body_bytes());
        if verify_one(&self.record.author, &msg, &self.signature) {
            Ok(())
        } else {
            Err(LedgerError::BadSignature {
                what: "update record",
                author: self.record.author,
                seq: self.record.seq,
            })
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn key(n: u8) -> AuthorKey {
        AuthorKey::from_secret([n; 32])
    }

    pub(crate) fn record(key: &AuthorKey, seq: u64, prev: RecordHash) -> SignedRecord {
        UpdateRecord {
            version: RECORD_VERSION,
            run_id: RunId([7; 32]),
            author: key.author(),
            seq: Seq(seq),
            prev,
            round: seq,
            base_hash: WeightsHash([1; 32]),
            base_outer: WeightsHash([0; 32]),
            made_from: WeightsHash([0; 32]),
            made_outer: WeightsHash([0; 32]),
            merged: Vec::new(),
            waited: Vec::new(),
            payload_hash: PayloadHash::of(&seq.to_le_bytes()),
            payload_len: 8,
            n_samples: 64,
            train_loss: 0.5,
        }
        .sign(key)
    }

    #[test]
    fn waited_bits_follow_the_merged_list_and_are_checked() {
        let k = key(1);
        let mut r = record(&k, 0, RecordHash([0; 32])).record;
        r.merged = (0..10u8).map(|i| RecordTag([i; 16])).collect();
        let waited: std::collections::BTreeSet<_> = [RecordTag([1; 16]), RecordTag([9; 16])].into();
        r.waited = UpdateRecord::waited_bits(&r.merged, &waited);
        assert_eq!(r.waited, vec![0b10, 0b10]);
        assert_eq!(r.waited_for().collect::<std::collections::BTreeSet<_>>(), waited);
        let ok = r.clone().sign(&k);
        assert_eq!(SignedRecord::from_bytes(&ok.to_bytes()).unwrap(), ok);
        // A byte short, a byte over, a bit past the list: each refused.
        for bits in [vec![0b10], vec![0b10, 0b10, 0], vec![0b10, 0b110]] {
            let mut bad = r.clone();
            bad.waited = bits;
            let err = SignedRecord::from_bytes(&bad.sign(&k).to_bytes()).unwrap_err();
            assert!(err.to_string().contains("waited-for bits"), "{err}");
        }
    }

    #[test]
    fn sign_verify_and_round_trip() {
        let k = key(1);
        let r = record(&k, 0, RecordHash([0; 32]));
        r.verify_signature().unwrap();
        let bytes = r.to_bytes();
        let back = SignedRecord::from_bytes(&bytes).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.hash(), r.hash());
    }

    #[test]
    fn tampered_field_fails_signature() {
        let k = key(1);
        let mut r = record(&k, 3, RecordHash([0; 32]));
        r.record.n_samples += 1;
        assert!(matches!(r.verify_signature(), Err(LedgerError::BadSignature { .. })));
    }

    #[test]
    fn signature_by_other_key_fails() {
        let mut r = record(&key(1), 0, RecordHash([0; 32]));
        r.record.author = key(2).author();
        assert!(r.verify_signature().is_err());
    }

    #[test]
    fn trailing_and_truncated_bytes_are_rejected() {
        let r = record(&key(1), 0, RecordHash([0; 32]));
        let mut bytes = r.to_bytes();
        bytes.push(0);
        assert!(SignedRecord::from_bytes(&bytes).is_err());
        bytes.truncate(bytes.len() - 10);
        assert!(SignedRecord::from_bytes(&bytes).is_err());
        assert!(SignedRecord::from_bytes(&[]).is_err());
    }

    #[test]
    fn other_version_is_rejected() {
        let k = key(1);
        let mut r = record(&k, 0, RecordHash([0; 32]));
        r.record.version = 99;
        let r = r.record.sign(&k);
        let err = SignedRecord::from_bytes(&r.to_bytes()).unwrap_err();
        assert!(err.to_string().contains("version 99"), "{err}");
    }
}
