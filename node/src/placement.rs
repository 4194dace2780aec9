//! Where blocks live, computed the same way by every node (no name node).
//!
//! IID: rendezvous (highest random weight) hashing. Each member scores each
//! block by a hash of (block, member); the top `r` members hold it and the
//! first is its primary, which trains on it. When a member leaves, only its
//! blocks move, to the next in their ranking.
//!
//! Dirichlet(α): for label-skewed experiments, the primaries of each class's
//! blocks follow proportions drawn from Dirichlet(α) per class (seeded, so
//! every node draws the same); replicas still follow rendezvous ranks.

use std::collections::BTreeMap;

use meshtrain_ledger::AuthorId;
use meshtrain_model::{BlockInfo, Manifest};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

/// How training blocks are spread over members.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Partition {
    Iid,
    Dirichlet(f64),
}

impl std::str::FromStr for Partition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "iid" => Ok(Partition::Iid),
            Some(("dirichlet", a)) => {
                let alpha: f64 = a
                    .parse()
                    .map_err(|_| format!("partition `{s}`: `{a}` is not a number"))?;
                if !(alpha > 0.0 && alpha.is_finite()) {
                    return Err(format!("partition `{s}`: α must be positive"));
                }
                Ok(Partition::Dirichlet(alpha))
            }
            _ => Err(format!("unknown partition `{s}` (iid or dirichlet:ALPHA)")),
        }
    }
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Partition::Iid => f.write_str("iid"),
            Partition::Dirichlet(a) => write!(f, "dirichlet:{a}"),
        }
    }
}

fn score(block: &str, member: &AuthorId) -> u64 {
    let h = blake3::Hasher::new_derive_key("meshtrain placement v1")
        .update(block.as_bytes())
        .update(&member.0)
        .finalize();
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

/// Members ranked for `block`, best first.
pub fn rank(block: &str, members: &[AuthorId]) -> Vec<AuthorId> {
    let mut ranked: Vec<(u64, AuthorId)> = members.iter().map(|m| (score(block, m), *m)).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked.into_iter().map(|(_, m)| m).collect()
}

/// The placement of one split: for each block, its holders (primary first).
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub holders: BTreeMap<String, Vec<AuthorId>>,
}

impl Placement {
    pub fn compute(
        manifest: &Manifest,
        split: &str,
        members: &[AuthorId],
        replication: usize,
        partition: Partition,
        seed: u64,
    ) -> Self {
        let mut members = members.to_vec();
        members.sort();
        members.dedup();
        let r = replication.clamp(1, members.len().max(1));
        let blocks = manifest.blocks(split);
        let mut holders: BTreeMap<String, Vec<AuthorId>> = blocks
            .iter()
            .map(|b| (b.hash.clone(), rank(&b.hash, &members).into_iter().take(r).collect()))
            .collect();
        if let (Partition::Dirichlet(alpha), false) = (partition, members.is_empty()) {
            for (hash, primary) in dirichlet_primaries(blocks, &members, alpha, seed) {
                if let Some(h) = holders.get_mut(&hash) {
                    h.retain(|m| *m != primary);
                    h.insert(0, primary);
                    h.truncate(r);
                }
            }
        }
        Self { holders }
    }

    /// Blocks `me` holds (as primary or replica).
    pub fn held_by(&self, me: &AuthorId) -> Vec<String> {
        self.holders
            .iter()
            .filter(|(_, h)| h.contains(me))
            .map(|(b, _)| b.clone())
            .collect()
    }

    /// Blocks `me` trains on.
    pub fn primary_of(&self, me: &AuthorId) -> Vec<String> {
        self.holders
            .iter()
            .filter(|(_, h)| h.first() == Some(me))
            .map(|(b, _)| b.clone())
            .collect()
    }
}

/// The class a block mostly holds.
fn dominant_class(b: &BlockInfo) -> usize {
    b.label_histogram
        .iter()
        .enumerate()
        .max_by_key(|(i, n)| (**n, std::cmp::Reverse(*i)))
        .map_or(0, |(i, _)| i)
}

/// Primaries under Dirichlet(α) label skew: each class's blocks are dealt to
/// members in proportions p ~ Dir(α), drawn per class from the run seed.
fn dirichlet_primaries(blocks: &[BlockInfo], members: &[AuthorId], alpha: f64, seed: u64) -> Vec<(String, AuthorId)> {
    let mut by_class: BTreeMap<usize, Vec<&BlockInfo>> = BTreeMap::new();
    for b in blocks {
        by_class.entry(dominant_class(b)).or_default().push(b);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd1c1);
    let gamma = Gamma::new(alpha, 1.0).ok();
    let mut out = Vec::new();
    for (_, mut class_blocks) in by_class {
        class_blocks.sort_by(|a, b| a.hash.cmp(&b.hash));
        let draws: Vec<f64> = members
            .iter()
            .map(|_| gamma.as_ref().map_or(1.0, |g| g.sample(&mut rng)).max(1e-12))
            .collect();
        let total: f64 = draws.iter().sum();
        // Largest-remainder rounding of the block counts.
        let n = class_blocks.len();
        let exact: Vec<f64> = draws.iter().map(|d| d / total * n as f64).collect();
        let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
        let mut rest: Vec<usize> = (0..members.len()).collect();
        rest.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
        for &i in rest.iter().take(n - counts.iter().sum::<usize>()) {
            counts[i] += 1;
        }
        let mut it = class_blocks.into_iter();
        for (m, c) in members.iter().zip(counts) {
            for b in it.by_ref().take(c) {
                out.push((b.hash.clone(), *m));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtrain_model::Schema;

    fn manifest(blocks: usize, classes: usize) -> Manifest {
        let mut m = Manifest::new(
            "t",
            Schema::Image {
                channels: 1,
                height: 1,
                width: 1,
                classes,
            },
        );
        let list = (0..blocks)
            .map(|i| {
                let mut h = vec![0u64; classes];
                h[i % classes] = 10;
                BlockInfo {
                    hash: format!("{:064x}", i * 7919 + 1),
                    bytes: 20,
                    records: 10,
                    label_histogram: h,
                }
            })
            .collect();
        m.splits.insert("train".into(), list);
        m
    }

    fn members(n: u8) -> Vec<AuthorId> {
        (1..=n).map(|i| AuthorId([i; 32])).collect()
    }

    #[test]
    fn every_block_has_r_distinct_holders_and_one_primary() {
        let m = manifest(200, 10);
        let ms = members(4);
        let p = Placement::compute(&m, "train", &ms, 3, Partition::Iid, 1);
        for h in p.holders.values() {
            assert_eq!(h.len(), 3);
            let mut d = h.clone();
            d.dedup();
            assert_eq!(d.len(), 3);
        }
        let primaries: usize = ms.iter().map(|me| p.primary_of(me).len()).sum();
        assert_eq!(primaries, 200, "each record is trained on exactly once per epoch");
        // roughly balanced
        for me in &ms {
            let n = p.primary_of(me).len();
            assert!((30..70).contains(&n), "{n}");
        }
    }

    #[test]
    fn a_leaving_member_only_moves_its_own_blocks() {
        let m = manifest(300, 10);
        let ms = members(5);
        let before = Placement::compute(&m, "train", &ms, 3, Partition::Iid, 1);
        let gone = ms[2];
        let after = Placement::compute(
            &m,
            "train",
            &ms.iter().copied().filter(|x| *x != gone).collect::<Vec<_>>(),
            3,
            Partition::Iid,
            1,
        );
        for (b, h) in &before.holders {
            let h2 = &after.holders[b];
            if !h.contains(&gone) {
                assert_eq!(h, h2, "block {b} moved though its holders stayed");
            } else {
                // the next replica takes over as primary if the primary left
                let survivors: Vec<_> = h.iter().filter(|x| **x != gone).copied().collect();
                assert_eq!(&h2[..survivors.len()], &survivors[..]);
            }
        }
    }

    #[test]
    fn dirichlet_skews_labels_more_for_small_alpha() {
        let m = manifest(400, 10);
        let ms = members(4);
        let skew = |alpha: f64| {
            let p = Placement::compute(&m, "train", &ms, 1, Partition::Dirichlet(alpha), 7);
            let mut worst = 0f64;
            for me in &ms {
                let mut h = [0u64; 10];
                for b in p.primary_of(me) {
                    let info = m.blocks("train").iter().find(|x| x.hash == b).unwrap();
                    h[dominant_class(info)] += 1;
                }
                let tot: u64 = h.iter().sum();
                let max = *h.iter().max().unwrap() as f64 / tot.max(1) as f64;
                worst = worst.max(max);
            }
            worst
        };
        assert!(skew(0.1) > skew(100.0), "{} vs {}", skew(0.1), skew(100.0));
        let p = Placement::compute(&m, "train", &ms, 2, Partition::Dirichlet(0.5), 7);
        let total: usize = ms.iter().map(|me| p.primary_of(me).len()).sum();
        assert_eq!(total, 400);
        assert_eq!("dirichlet:0.5".parse::<Partition>().unwrap(), Partition::Dirichlet(0.5));
        assert!("dirichlet:-1".parse::<Partition>().is_err());
    }
}
