//! Attack modes for testnets and tests (DESIGN §6). A node running one says
//! so loudly in its logs and its results; honest operators never set one.
//! `Attacker` poisons a node's own updates; `sybil::Sybils` signs for the
//! extra identities of `sybil:K` and `anchor-hijack:K`.

pub mod sybil;

use std::fmt;
use std::str::FromStr;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// What a malicious node does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Attack {
    /// Sends −Δ.
    SignFlip,
    /// Sends λΔ.
    Scale(f32),
    /// Sends Δ + N(0, σ²).
    Noise(f32),
    /// "A little is enough": μ − zσ of the honest updates (colluding).
    Alie(f32),
    /// Inner-product manipulation: −ε μ of the honest updates (colluding).
    Ipm(f32),
    /// Trains on flipped labels.
    LabelFlip,
    /// Sends a zero update (claims work it did not do).
    FreeRider,
    /// Re-sends its first payload in every later round.
    Replay,
    /// Signs two different records at each seq, to different peers.
    Equivocate,
    /// Sends payloads that do not decode.
    Malformed,
    /// One attacker, K identities: besides its own honest update (so that
    /// nobody bans it), K more keys of its own each sign a copy of that
    /// update, sign-flipped, every round.
    Sybil(u32),
    /// K Sybil identities claim a poisoned anchor as their base (a vote for
    /// it), and the attacker (its own update honest) offers that anchor,
    /// self-attested and claimed rounds ahead, to whoever asks where the
    /// mesh is.
    AnchorHijack(u32),
    /// Splits the mesh in time: its (honest) update goes out by hash only,
    /// and half the peers get the payload at once, the other half only
    /// after the round's longest wait, so they close the round without it.
    Split,
    /// Copies one honest update of the round as its own (colluding): that
    /// node's shard counts twice, tilting the mean towards it.
    Mimic,
    /// Publishes its (honest) update just before the honest nodes' round
    /// deadline, every round, following that deadline as updates arrive
    /// (the whole wait until a quorum is in, then the quorum's grace):
    /// nothing to reject, but every round waits for it.
    Late,
}

/// A `late` attacker publishes this far into what is left of the honest
/// nodes' wait (the deadline falls at the whole of it).
pub const LATE_SHARE: f64 = 0.9;

/// Most identities one attacking node runs.
pub const MAX_SYBILS: u32 = 1000;

/// Identities of an `anchor-hijack` given without a count.
pub const DEFAULT_HIJACK_SYBILS: u32 = 40;

impl Attack {
    /// The delta-level attacks act on the trainer's output directly.
    pub fn corrupt_delta(&self, delta: &mut [f32], round: u64) {
        match *self {
            Attack::SignFlip => delta.iter_mut().for_each(|d| *d = -*d),
            Attack::Scale(l) => delta.iter_mut().for_each(|d| *d *= l),
            Attack::Noise(sigma) => {
                let mut rng = ChaCha8Rng::seed_from_u64(0xbad ^ round);
                if let Ok(n) = Normal::new(0.0f32, sigma) {
                    delta.iter_mut().for_each(|d| *d += n.sample(&mut rng));
                }
            }
            Attack::FreeRider => delta.iter_mut().for_each(|d| *d = 0.0),
            _ => {}
        }
    }

    /// ALIE and IPM: the poisoned delta from the honest deltas of the round
    /// (their coordinate-wise mean μ and standard deviation σ). `own` is used
    /// when no honest delta has been seen.
    pub fn collude(&self, honest: &[&[f32]], own: &[f32]) -> Vec<f32> {
        if honest.is_empty() {
            return own.to_vec();
        }
        if *self == Attack::Mimic {
            return honest[0].to_vec();
        }
        let n = honest.len() as f64;
        (0..own.len())
            .map(|j| {
                let mean = honest.iter().map(|d| d[j] as f64).sum::<f64>() / n;
                let var = honest.iter().map(|d| (d[j] as f64 - mean).powi(2)).sum::<f64>() / n;
                match *self {
                    Attack::Alie(z) => (mean - z as f64 * var.sqrt()) as f32,
                    Attack::Ipm(eps) => (-(eps as f64) * mean) as f32,
                    _ => own[j],
                }
            })
            .collect()
    }

    /// The `malformed` and `replay` attacks act on the encoded payload:
    /// garbage bytes, a wrong parameter count, NaN values, or the first
    /// payload again. `first` is this node's first payload.
    pub fn corrupt_payload(&self, round: u64, payload: Vec<u8>, params: usize, first: Option<&Vec<u8>>) -> Vec<u8> {
        use meshtrain_model::{codec, CodecSpec};
        match self {
            Attack::Malformed => match round % 3 {
                0 => payload.iter().rev().map(|b| b ^ 0x5a).collect(),
                1 => codec::encode(CodecSpec::Dense, &vec![0.01; params + 1]),
                _ => {
                    let mut v = vec![0.001f32; params];
                    v[params / 2] = f32::NAN;
                    codec::encode(CodecSpec::Dense, &v)
                }
            },
            Attack::Replay => first.cloned().unwrap_or(payload),
            _ => payload,
        }
    }

    /// Whether the attack needs the honest updates of the round.
    pub fn colludes(&self) -> bool {
        matches!(self, Attack::Alie(_) | Attack::Ipm(_) | Attack::Mimic)
    }

    pub fn is_label_flip(&self) -> bool {
        matches!(self, Attack::LabelFlip)
    }

    /// The extra identities this attack signs for, and whether they hijack.
    pub fn sybils(&self) -> Option<(u32, bool)> {
        match *self {
            Attack::Sybil(k) => Some((k, false)),
            Attack::AnchorHijack(k) => Some((k, true)),
            _ => None,
        }
    }
}

/// What an attacker's trainer hands the node for one round.
pub struct Update {
    /// The payload as it goes on the wire (empty when colluding: the node
    /// crafts it once it has seen the round's honest updates).
    pub payload: Vec<u8>,
    /// The delta the payload stands for (the raw delta when colluding).
    pub decoded: Vec<f32>,
    /// An equivocating attacker's second payload for the same seq.
    pub twin: Option<Vec<u8>>,
}

/// An attack with the state it keeps across rounds (its first payload, for
/// replays). Used by the node's trainer and by the simulator's, so both
/// attack alike.
pub struct Attacker {
    attack: Attack,
    first_payload: Option<Vec<u8>>,
}

impl Attacker {
    pub fn new(attack: Attack) -> Self {
        Self {
            attack,
            first_payload: None,
        }
    }

    /// Turns one round's honest delta into what this attacker sends.
    pub fn make_update(
        &mut self,
        round: u64,
        mut delta: Vec<f32>,
        encoder: &mut meshtrain_model::DeltaEncoder,
    ) -> Result<Update, meshtrain_model::ModelError> {
        if self.attack.colludes() {
            return Ok(Update {
                payload: Vec::new(),
                decoded: delta,
                twin: None,
            });
        }
        self.attack.corrupt_delta(&mut delta, round);
        let params = delta.len();
        let encoded = encoder.encode(&delta)?;
        let payload = self
            .attack
            .corrupt_payload(round, encoded.bytes, params, self.first_payload.as_ref());
        if self.first_payload.is_none() {
            self.first_payload = Some(payload.clone());
        }
        let twin = (self.attack == Attack::Equivocate).then(|| {
            let negated: Vec<f32> = encoded.decoded.iter().map(|v| -v).collect();
            meshtrain_model::codec::encode(encoder.spec(), &negated)
        });
        Ok(Update {
            payload,
            decoded: encoded.decoded,
            twin,
        })
    }
}

impl FromStr for Attack {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let num = |what: &str| -> Result<f32, String> {
            let a = arg.ok_or_else(|| format!("attack `{name}` needs {what}, e.g. `{name}:1.0`"))?;
            let v: f32 = a.parse().map_err(|_| format!("attack `{s}`: `{a}` is not a number"))?;
            if !v.is_finite() {
                return Err(format!("attack `{s}`: {what} must be finite"));
            }
            Ok(v)
        };
        let count = |default: Option<u32>| -> Result<u32, String> {
            let k = match (arg, default) {
                (None, Some(d)) => d,
                (None, None) => {
                    return Err(format!(
                        "attack `{name}` needs a number of identities, e.g. `{name}:40`"
                    ))
                }
                (Some(a), _) => a
                    .parse()
                    .map_err(|_| format!("attack `{s}`: `{a}` is not a whole number"))?,
            };
            if !(1..=MAX_SYBILS).contains(&k) {
                return Err(format!("attack `{s}`: between 1 and {MAX_SYBILS} identities"));
            }
            Ok(k)
        };
        let plain = |a: Attack| match arg {
            None => Ok(a),
            Some(_) => Err(format!("attack `{name}` takes no argument")),
        };
        match name {
            "sign-flip" => plain(Attack::SignFlip),
            "scale" => Ok(Attack::Scale(num("a factor λ")?)),
            "noise" => {
                let sigma = num("a standard deviation σ")?;
                if sigma <= 0.0 {
                    return Err("noise: σ must be positive".into());
                }
                Ok(Attack::Noise(sigma))
            }
            "alie" => Ok(Attack::Alie(num("z")?)),
            "ipm" => Ok(Attack::Ipm(num("ε")?)),
            "label-flip" => plain(Attack::LabelFlip),
            "free-rider" => plain(Attack::FreeRider),
            "replay" => plain(Attack::Replay),
            "equivocate" => plain(Attack::Equivocate),
            "malformed" => plain(Attack::Malformed),
            "sybil" => Ok(Attack::Sybil(count(None)?)),
            "anchor-hijack" => Ok(Attack::AnchorHijack(count(Some(DEFAULT_HIJACK_SYBILS))?)),
            "split" => plain(Attack::Split),
            "mimic" => plain(Attack::Mimic),
            "late" => plain(Attack::Late),
            _ => Err(format!(
                "unknown attack `{s}`; known: sign-flip, scale:L, noise:SIGMA, alie:Z, ipm:EPS, label-flip, free-rider, replay, equivocate, malformed, sybil:K, anchor-hijack[:K], split, mimic, late"
            )),
        }
    }
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attack::SignFlip => f.write_str("sign-flip"),
            Attack::Scale(l) => write!(f, "scale:{l}"),
            Attack::Noise(s) => write!(f, "noise:{s}"),
            Attack::Alie(z) => write!(f, "alie:{z}"),
            Attack::Ipm(e) => write!(f, "ipm:{e}"),
            Attack::LabelFlip => f.write_str("label-flip"),
            Attack::FreeRider => f.write_str("free-rider"),
            Attack::Replay => f.write_str("replay"),
            Attack::Equivocate => f.write_str("equivocate"),
            Attack::Malformed => f.write_str("malformed"),
            Attack::Sybil(k) => write!(f, "sybil:{k}"),
            Attack::AnchorHijack(k) => write!(f, "anchor-hijack:{k}"),
            Attack::Split => f.write_str("split"),
            Attack::Mimic => f.write_str("mimic"),
            Attack::Late => f.write_str("late"),
        }
    }
}

impl Serialize for Attack {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Attack {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [
            "sign-flip",
            "scale:-4",
            "noise:0.5",
            "alie:1.5",
            "ipm:0.1",
            "label-flip",
            "free-rider",
            "replay",
            "equivocate",
            "malformed",
            "sybil:40",
            "anchor-hijack:7",
            "split",
            "mimic",
            "late",
        ] {
            let a: Attack = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        assert_eq!(
            "anchor-hijack".parse::<Attack>(),
            Ok(Attack::AnchorHijack(DEFAULT_HIJACK_SYBILS))
        );
        for s in [
            "scale",
            "noise:-1",
            "sign-flip:2",
            "alie:x",
            "nuke",
            "sybil",
            "sybil:0",
            "sybil:1.5",
            "sybil:5000",
            "split:2",
            "late:1",
        ] {
            assert!(s.parse::<Attack>().is_err(), "{s}");
        }
    }

    #[test]
    fn colluding_attacks_follow_the_honest_statistics() {
        let a = [1.0f32, 2.0];
        let b = [3.0f32, 2.0];
        let honest: Vec<&[f32]> = vec![&a, &b];
        assert_eq!(Attack::Alie(1.0).collude(&honest, &[0.0, 0.0]), vec![1.0, 2.0]);
        assert_eq!(Attack::Ipm(0.5).collude(&honest, &[0.0, 0.0]), vec![-1.0, -1.0]);
        assert_eq!(Attack::Alie(1.0).collude(&[], &[7.0]), vec![7.0]);
        // Mimic sends one honest update as its own.
        assert_eq!(Attack::Mimic.collude(&honest, &[0.0, 0.0]), vec![1.0, 2.0]);
        assert!(Attack::Mimic.colludes() && !Attack::Late.colludes());
    }

    #[test]
    fn malformed_payloads_never_decode() {
        use meshtrain_model::{codec, CodecSpec};
        let good = codec::encode(CodecSpec::Dense, &[0.5; 16]);
        for round in 0..3 {
            let bad = Attack::Malformed.corrupt_payload(round, good.clone(), 16, None);
            assert!(codec::decode(&bad, 16).is_err(), "round {round}");
        }
        let first = vec![1, 2, 3];
        assert_eq!(Attack::Replay.corrupt_payload(5, good, 16, Some(&first)), first);
    }

    #[test]
    fn delta_attacks() {
        let mut d = vec![1.0, -2.0];
        Attack::SignFlip.corrupt_delta(&mut d, 0);
        assert_eq!(d, vec![-1.0, 2.0]);
        Attack::Scale(3.0).corrupt_delta(&mut d, 0);
        assert_eq!(d, vec![-3.0, 6.0]);
        Attack::FreeRider.corrupt_delta(&mut d, 0);
        assert_eq!(d, vec![0.0, 0.0]);
    }
}
