//! Attack modes for testnets and tests (DESIGN §6). A node running one says
//! so loudly in its logs and its results; honest operators never set one.

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
}

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

    /// Whether the attack needs the honest updates of the round.
    pub fn colludes(&self) -> bool {
        matches!(self, Attack::Alie(_) | Attack::Ipm(_))
    }

    pub fn is_label_flip(&self) -> bool {
        matches!(self, Attack::LabelFlip)
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
            _ => Err(format!(
                "unknown attack `{s}`; known: sign-flip, scale:L, noise:SIGMA, alie:Z, ipm:EPS, label-flip, free-rider, replay, equivocate, malformed"
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
        for s in ["sign-flip", "scale:-4", "noise:0.5", "alie:1.5", "ipm:0.1", "label-flip", "free-rider", "replay", "equivocate", "malformed"] {
            let a: Attack = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        for s in ["scale", "noise:-1", "sign-flip:2", "alie:x", "nuke"] {
            assert!(s.parse::<Attack>().is_err(), "{s}");
        }
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
