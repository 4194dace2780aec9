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
    /// Relocated orthogonal perturbation (Özfatura et al. 2023, against
    /// clipping around a reference): the honest mean plus a perturbation
    /// orthogonal to a reference that follows the last rounds (0.9 × the
    /// previous round's honest mean + 0.1 × this one's, the published λ),
    /// at the published 90°, along the all-ones direction, every round the
    /// same way; its length Z × the honest updates' median distance from
    /// their mean (colluding).
    Rop(f32),
    /// Knows the aggregator: places its update just inside CenteredClip's
    /// radius (TAU, or the adaptive one the aggregator would take) around
    /// the centre it would find, pointing as far against that centre as
    /// the cosine check lets it, every round (colluding).
    ClipAware(Option<f32>),
    /// Pushes honest nodes apart where a broadcast mesh lets it: a
    /// clip-aware update, its payload served at once to half the mesh and
    /// only after the round's longest wait to the other half, so the two
    /// halves aggregate different inputs (colluding).
    Dissensus,
    /// Publishes its (honest) update just before the honest nodes' round
    /// deadline, every round, following that deadline as updates arrive
    /// (the whole wait until a quorum is in, then the quorum's grace):
    /// nothing to reject, but every round waits for it.
    Late,
}

/// A `late` attacker publishes this far into what is left of the honest
/// nodes' wait (the deadline falls at the whole of it).
pub const LATE_SHARE: f64 = 0.9;

/// ROP's perturbation length, in honest spreads, when none is given.
pub const DEFAULT_ROP_Z: f32 = 1.0;
/// ROP's reference: this much of the previous round's honest mean (λ).
const ROP_LAMBDA: f64 = 0.9;
/// CenteredClip's adaptive radius, as the aggregator takes it (a multiple
/// of the median distance from the centre).
const CLIP_RADIUS_FACTOR: f64 = 1.5;
/// A clip-aware update sits this far into the radius.
const CLIP_AWARE_SHARE: f64 = 0.95;
/// ... and keeps this share of the centre's length along the centre, so
/// that it does not point against it (CenteredClip rejects those).
const CLIP_AWARE_KEEP: f64 = 0.1;

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

    /// The colluding attacks: the poisoned delta from the honest deltas of
    /// the round (ALIE and IPM from their coordinate-wise mean μ and
    /// standard deviation σ). `own` is used when no honest delta has been
    /// seen; `previous` is the last round's honest mean (ROP's reference).
    pub fn collude(&self, honest: &[&[f32]], own: &[f32], previous: Option<&[f32]>) -> Vec<f32> {
        if honest.is_empty() {
            return own.to_vec();
        }
        match *self {
            Attack::Mimic => return honest[0].to_vec(),
            Attack::Rop(z) => return rop(honest, previous, z as f64),
            Attack::ClipAware(tau) => return clip_aware(honest, tau.map(f64::from)),
            Attack::Dissensus => return clip_aware(honest, None),
            _ => {}
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
        matches!(
            self,
            Attack::Alie(_)
                | Attack::Ipm(_)
                | Attack::Mimic
                | Attack::Rop(_)
                | Attack::ClipAware(_)
                | Attack::Dissensus
        )
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

/// The coordinate-wise mean of `vs` (in f64).
pub fn mean_of(vs: &[&[f32]]) -> Vec<f64> {
    let n = vs.len().max(1) as f64;
    let dim = vs.first().map_or(0, |v| v.len());
    let mut acc = vec![0f64; dim];
    for v in vs {
        for (a, x) in acc.iter_mut().zip(v.iter()) {
            *a += *x as f64;
        }
    }
    acc.iter_mut().for_each(|a| *a /= n);
    acc
}

/// The median of what `xs` yields.
fn median(xs: impl Iterator<Item = f64>) -> f64 {
    meshtrain_model::aggregate::median_of(&mut xs.collect::<Vec<f64>>())
}

fn dist(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `v` less its projection on `onto`, scaled to length 1 (`None` if
/// nothing is left).
fn orthogonal_unit(mut v: Vec<f64>, onto: &[f64]) -> Option<Vec<f64>> {
    let oo = dot(onto, onto);
    if oo > 0.0 {
        let k = dot(&v, onto) / oo;
        v.iter_mut().zip(onto).for_each(|(x, o)| *x -= k * o);
    }
    let len = dot(&v, &v).sqrt();
    (len > 1e-12 && len.is_finite()).then(|| v.into_iter().map(|x| x / len).collect())
}

/// ROP: μ + Z·s·p, p ⟂ the reference λ·previous + (1 − λ)·μ, from the
/// all-ones direction; s the honest updates' median distance from μ.
fn rop(honest: &[&[f32]], previous: Option<&[f32]>, z: f64) -> Vec<f32> {
    let mu = mean_of(honest);
    let reference: Vec<f64> = match previous.filter(|p| p.len() == mu.len()) {
        Some(p) => p
            .iter()
            .zip(&mu)
            .map(|(p, m)| ROP_LAMBDA * *p as f64 + (1.0 - ROP_LAMBDA) * m)
            .collect(),
        None => mu.clone(),
    };
    let spread = median(honest.iter().map(|h| dist(h, &mu)));
    let p = orthogonal_unit(vec![1.0; mu.len()], &reference).unwrap_or_else(|| vec![0.0; mu.len()]);
    mu.iter().zip(&p).map(|(m, p)| (m + z * spread * p) as f32).collect()
}

/// Clip-aware: c + ρ(−a·ĉ + b·ô) with c the coordinate-wise median (the
/// aggregator's first centre), ρ just inside the radius, a as large as
/// keeps the update along c, ô the direction of −σ away from c.
fn clip_aware(honest: &[&[f32]], tau: Option<f64>) -> Vec<f32> {
    let dim = honest[0].len();
    let centre: Vec<f64> = (0..dim).map(|j| median(honest.iter().map(|h| h[j] as f64))).collect();
    let radius = tau.unwrap_or_else(|| CLIP_RADIUS_FACTOR * median(honest.iter().map(|h| dist(h, &centre))));
    let rho = CLIP_AWARE_SHARE * radius;
    let c_len = dot(&centre, &centre).sqrt();
    if rho.is_nan() || rho <= 0.0 || rho.is_infinite() {
        return centre.iter().map(|c| *c as f32).collect();
    }
    let mu = mean_of(honest);
    let minus_sigma: Vec<f64> = (0..dim)
        .map(|j| {
            let var = honest.iter().map(|h| (h[j] as f64 - mu[j]).powi(2)).sum::<f64>() / honest.len() as f64;
            -var.sqrt()
        })
        .collect();
    let side = orthogonal_unit(minus_sigma, &centre).unwrap_or_else(|| vec![0.0; dim]);
    let (a, c_hat) = if c_len > 0.0 {
        let a = ((1.0 - CLIP_AWARE_KEEP) * c_len / rho).min(1.0);
        (a, centre.iter().map(|c| c / c_len).collect::<Vec<f64>>())
    } else {
        (0.0, vec![0.0; dim])
    };
    let b = (1.0 - a * a).max(0.0).sqrt();
    (0..dim)
        .map(|j| (centre[j] + rho * (-a * c_hat[j] + b * side[j])) as f32)
        .collect()
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
            "rop" => match arg {
                None => Ok(Attack::Rop(DEFAULT_ROP_Z)),
                Some(_) => {
                    let z = num("a perturbation length Z")?;
                    if z <= 0.0 {
                        return Err("rop: Z must be positive".into());
                    }
                    Ok(Attack::Rop(z))
                }
            },
            "clip-aware" => match arg {
                None | Some("auto") => Ok(Attack::ClipAware(None)),
                Some(_) => {
                    let tau = num("a clipping radius TAU")?;
                    if tau <= 0.0 {
                        return Err("clip-aware: TAU must be positive".into());
                    }
                    Ok(Attack::ClipAware(Some(tau)))
                }
            },
            "dissensus" => plain(Attack::Dissensus),
            "late" => plain(Attack::Late),
            _ => Err(format!(
                "unknown attack `{s}`; known: sign-flip, scale:L, noise:SIGMA, alie:Z, ipm:EPS, label-flip, free-rider, replay, equivocate, malformed, sybil:K, anchor-hijack[:K], split, mimic, late, rop[:Z], clip-aware[:TAU], dissensus"
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
            Attack::Rop(z) => write!(f, "rop:{z}"),
            Attack::ClipAware(None) => f.write_str("clip-aware"),
            Attack::ClipAware(Some(t)) => write!(f, "clip-aware:{t}"),
            Attack::Dissensus => f.write_str("dissensus"),
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
            "rop:1",
            "rop:2.5",
            "clip-aware",
            "clip-aware:0.5",
            "dissensus",
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
            "rop:0",
            "rop:x",
            "clip-aware:-1",
            "dissensus:3",
        ] {
            assert!(s.parse::<Attack>().is_err(), "{s}");
        }
    }

    #[test]
    fn colluding_attacks_follow_the_honest_statistics() {
        let a = [1.0f32, 2.0];
        let b = [3.0f32, 2.0];
        let honest: Vec<&[f32]> = vec![&a, &b];
        assert_eq!(Attack::Alie(1.0).collude(&honest, &[0.0, 0.0], None), vec![1.0, 2.0]);
        assert_eq!(Attack::Ipm(0.5).collude(&honest, &[0.0, 0.0], None), vec![-1.0, -1.0]);
        assert_eq!(Attack::Alie(1.0).collude(&[], &[7.0], None), vec![7.0]);
        // Mimic sends one honest update as its own.
        assert_eq!(Attack::Mimic.collude(&honest, &[0.0, 0.0], None), vec![1.0, 2.0]);
        assert!(Attack::Mimic.colludes() && !Attack::Late.colludes());
    }

    /// ROP: the honest mean moved orthogonally to the reference, by Z
    /// honest spreads, the same way whatever the round.
    #[test]
    fn rop_moves_orthogonally_to_the_reference_by_z_spreads() {
        let a = [1.0f32, 0.0, 0.0];
        let b = [3.0f32, 0.0, 0.0];
        let honest: Vec<&[f32]> = vec![&a, &b];
        // μ = (2, 0, 0), spread 1; the reference is μ (no history): the
        // perturbation is (0, 1, 1)/√2, orthogonal to it.
        let out = Attack::Rop(2.0).collude(&honest, &[0.0; 3], None);
        let h = 2.0 / 2f32.sqrt();
        for (o, e) in out.iter().zip([2.0, h, h]) {
            assert!((o - e).abs() < 1e-6, "{out:?}");
        }
        // With history the reference is mostly last round's mean.
        let previous = [0.0f32, 1.0, 0.0];
        let out = Attack::Rop(1.0).collude(&honest, &[0.0; 3], Some(&previous));
        let pert: Vec<f64> = out.iter().zip([2.0, 0.0, 0.0]).map(|(o, m)| *o as f64 - m).collect();
        let reference = [0.2, 0.9, 0.0];
        assert!(dot(&pert, &reference).abs() < 1e-6, "{pert:?}");
        assert!((dot(&pert, &pert).sqrt() - 1.0).abs() < 1e-6);
    }

    /// Clip-aware: just inside the radius around the centre, and never
    /// pointing against it.
    #[test]
    fn clip_aware_sits_inside_the_radius_along_the_centre() {
        let vs: Vec<Vec<f32>> = (0..6)
            .map(|i| {
                (0..50)
                    .map(|j| 1.0 + 0.3 * ((i * 50 + j) as f32 * 0.37).sin())
                    .collect()
            })
            .collect();
        let honest: Vec<&[f32]> = vs.iter().map(|v| v.as_slice()).collect();
        let centre: Vec<f64> = (0..50).map(|j| median(honest.iter().map(|h| h[j] as f64))).collect();
        let radius = CLIP_RADIUS_FACTOR * median(honest.iter().map(|h| dist(h, &centre)));
        for (attack, r) in [(Attack::ClipAware(None), radius), (Attack::ClipAware(Some(0.5)), 0.5)] {
            let out = attack.collude(&honest, &[0.0; 50], None);
            let d = dist(&out, &centre);
            assert!(d < r && d > 0.9 * r, "{attack}: {d} against a radius of {r}");
            let out64: Vec<f64> = out.iter().map(|x| *x as f64).collect();
            assert!(dot(&out64, &centre) > 0.0, "{attack} points against the centre");
        }
        // A small radius: straight against the centre, shortening it.
        let out = Attack::ClipAware(Some(0.5)).collude(&honest, &[0.0; 50], None);
        let out64: Vec<f64> = out.iter().map(|x| *x as f64).collect();
        assert!(dot(&out64, &centre) < dot(&centre, &centre));
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
