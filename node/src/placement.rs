//! Where blocks live, computed the same way by every node (no name node).
//!
//! IID: rendezvous (highest random weight) hashing with bounded loads. The
//! unit of training is a [`Slice`]: a whole block, or, when a dataset has
//! fewer blocks than the mesh has members, a record range of one. Each slice
//! goes to its highest-ranked member that is still under its fair share, so
//! every member trains on within one slice of `slices / members` (plain
//! rendezvous left some members with none: 2 of 16 on 47 blocks). The
//! members that train on a block hold it, and the block's top-ranked other
//! members hold replicas up to `r` copies.
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

/// The part of a block one member trains on: records
/// `[start, start + records)`. A whole block is the one part of itself; a
/// dataset with fewer blocks than members has its blocks cut into record
/// ranges, so that every member still gets data to train on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Slice {
    pub hash: String,
    pub start: u64,
    pub records: u64,
}

impl Slice {
    /// The share of the block's records this slice holds.
    pub fn share(&self, block_records: u64) -> f64 {
        self.records as f64 / block_records.max(1) as f64
    }
}

/// The placement of one split: for each block, its holders (the members
/// that train on a part of it first), and what each member trains on.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub holders: BTreeMap<String, Vec<AuthorId>>,
    pub primaries: BTreeMap<AuthorId, Vec<Slice>>,
}

/// How many parts each block is cut into so that there are at least as many
/// parts as members (never more parts than a block has records).
fn parts_per_block(blocks: &[BlockInfo], members: usize) -> Vec<u64> {
    let n = blocks.len().max(1) as u64;
    let want = (members as u64).div_ceil(n).max(1);
    blocks.iter().map(|b| want.min(b.records).max(1)).collect()
}

/// The record ranges of a block cut into `parts` near-equal parts.
fn cut(block: &BlockInfo, parts: u64) -> Vec<Slice> {
    (0..parts)
        .map(|i| {
            let start = block.records * i / parts;
            let end = block.records * (i + 1) / parts;
            Slice {
                hash: block.hash.clone(),
                start,
                records: end - start,
            }
        })
        .collect()
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
        let mut primaries: BTreeMap<AuthorId, Vec<Slice>> = BTreeMap::new();
        let mut trainers: BTreeMap<String, Vec<AuthorId>> = BTreeMap::new();
        match (partition, members.is_empty()) {
            (_, true) => {}
            (Partition::Dirichlet(alpha), false) => {
                // Label skew is the point here: whole blocks, dealt by class.
                for (hash, primary) in dirichlet_primaries(blocks, &members, alpha, seed) {
                    if let Some(b) = blocks.iter().find(|b| b.hash == hash) {
                        primaries.entry(primary).or_default().push(cut(b, 1).remove(0));
                        trainers.entry(hash).or_default().push(primary);
                    }
                }
            }
            (Partition::Iid, false) => {
                let parts = parts_per_block(blocks, members.len());
                let slices: Vec<Slice> = blocks.iter().zip(parts).flat_map(|(b, p)| cut(b, p)).collect();
                for (slice, member) in bounded_rendezvous(&slices, &members) {
                    trainers.entry(slice.hash.clone()).or_default().push(member);
                    primaries.entry(member).or_default().push(slice);
                }
            }
        }
        let holders = blocks
            .iter()
            .map(|b| {
                let mut h: Vec<AuthorId> = trainers.remove(&b.hash).unwrap_or_default();
                h.dedup();
                let want = r.max(h.len());
                for m in rank(&b.hash, &members) {
                    if h.len() >= want {
                        break;
                    }
                    if !h.contains(&m) {
                        h.push(m);
                    }
                }
                (b.hash.clone(), h)
            })
            .collect();
        for s in primaries.values_mut() {
            s.sort();
        }
        Self { holders, primaries }
    }

    /// Blocks `me` holds (as a trainer or a replica).
    pub fn held_by(&self, me: &AuthorId) -> Vec<String> {
        self.holders
            .iter()
            .filter(|(_, h)| h.contains(me))
            .map(|(b, _)| b.clone())
            .collect()
    }

    /// The slices `me` trains on.
    pub fn primary_of(&self, me: &AuthorId) -> Vec<Slice> {
        self.primaries.get(me).cloned().unwrap_or_default()
    }
}

/// Rendezvous hashing with bounded loads: each slice goes to the
/// highest-ranked member that still has room, where room is the fair share
/// (`n / members`, and one more for `n % members` of them). Every member
/// ends within one slice of its fair share, and slices still mostly stay
/// put when a member leaves or joins.
fn bounded_rendezvous(slices: &[Slice], members: &[AuthorId]) -> Vec<(Slice, AuthorId)> {
    let m = members.len();
    if m == 0 {
        return Vec::new();
    }
    let q = slices.len() / m;
    let mut extra = slices.len() % m;
    let key = |s: &Slice| format!("{}/{}", s.hash, s.start);
    // A fixed order every node computes alike, independent of membership.
    let mut order: Vec<(u64, &Slice)> = slices.iter().map(|s| (score(&key(s), &AuthorId([0; 32])), s)).collect();
    order.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(b.1)));
    let mut load: BTreeMap<AuthorId, usize> = BTreeMap::new();
    let mut out = Vec::with_capacity(slices.len());
    for (_, s) in order {
        for member in rank(&key(s), members) {
            let l = load.entry(member).or_default();
            if *l < q || (*l == q && extra > 0) {
                if *l == q {
                    extra -= 1;
                }
                *l += 1;
                out.push((s.clone(), member));
                break;
            }
        }
    }
    out
}

/// The share of a split's records that belong to their block's most common
/// class: 1 when every block holds one class, about 1/classes when blocks
/// mix them evenly; None without labels. A Dirichlet partition deals whole
/// blocks by their class, so it skews labels only as far as blocks do.
pub fn block_label_purity(manifest: &Manifest, split: &str) -> Option<f64> {
    let blocks = manifest.blocks(split);
    let (mut top, mut all) = (0u64, 0u64);
    for b in blocks {
        top += b.label_histogram.iter().copied().max().unwrap_or(0);
        all += b.label_histogram.iter().sum::<u64>();
    }
    (all > 0).then(|| top as f64 / all as f64)
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
    fn block_label_purity_tells_sorted_blocks_from_mixed_ones() {
        let sorted = manifest(20, 10);
        assert_eq!(block_label_purity(&sorted, "train"), Some(1.0));
        let mut mixed = sorted.clone();
        for b in mixed.splits.get_mut("train").into_iter().flatten() {
            b.label_histogram = vec![1; 10];
        }
        assert_eq!(block_label_purity(&mixed, "train"), Some(0.1));
        assert_eq!(block_label_purity(&sorted, "test"), None);
    }

    fn trained(p: &Placement, ms: &[AuthorId]) -> Vec<Slice> {
        let mut all: Vec<Slice> = ms.iter().flat_map(|me| p.primary_of(me)).collect();
        all.sort();
        all
    }

    #[test]
    fn every_block_has_r_distinct_holders_and_every_record_one_trainer() {
        let m = manifest(200, 10);
        let ms = members(4);
        let p = Placement::compute(&m, "train", &ms, 3, Partition::Iid, 1);
        for (b, h) in &p.holders {
            assert_eq!(h.len(), 3);
            let mut d = h.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3);
            for me in &ms {
                if p.primary_of(me).iter().any(|s| &s.hash == b) {
                    assert!(h.contains(me), "a trainer holds its block");
                }
            }
        }
        let all = trained(&p, &ms);
        assert_eq!(all.len(), 200, "each record is trained on exactly once per epoch");
        assert!(all.iter().all(|s| s.start == 0 && s.records == 10), "whole blocks");
        for me in &ms {
            assert_eq!(p.primary_of(me).len(), 50, "the fair share exactly");
        }
    }

    #[test]
    fn every_member_gets_within_one_slice_of_its_fair_share() {
        // The shape that left 2 of 16 nodes without data under plain
        // rendezvous: 47 blocks over 16 members, and more.
        for (blocks, n) in [(47, 16), (10, 4), (200, 7), (16, 16), (3, 3)] {
            let m = manifest(blocks, 10);
            let ms = members(n);
            let p = Placement::compute(&m, "train", &ms, 2, Partition::Iid, 1);
            let fair = blocks as f64 / n as f64;
            for me in &ms {
                let k = p.primary_of(me).len() as f64;
                assert!((k - fair).abs() < 1.0, "{blocks} blocks, {n} members: one has {k}");
            }
            assert_eq!(trained(&p, &ms).len(), blocks);
        }
    }

    #[test]
    fn fewer_blocks_than_members_cuts_blocks_into_record_ranges() {
        // Fashion-MNIST at 64 MiB blocks is one block; a 4-node mesh must
        // still train on all of it, a quarter each.
        let mut m = manifest(1, 10);
        m.splits.get_mut("train").unwrap()[0].records = 60_000;
        let ms = members(4);
        let p = Placement::compute(&m, "train", &ms, 2, Partition::Iid, 1);
        let all = trained(&p, &ms);
        assert_eq!(all.len(), 4);
        assert_eq!(all.iter().map(|s| s.records).sum::<u64>(), 60_000);
        let mut next = 0;
        for s in &all {
            assert_eq!(s.start, next, "ranges tile the block");
            next += s.records;
            assert_eq!(s.records, 15_000);
        }
        for me in &ms {
            assert_eq!(p.primary_of(me).len(), 1);
        }
        assert_eq!(
            p.holders.values().next().unwrap().len(),
            4,
            "every trainer holds the block"
        );
        // 3 blocks over 8 members: 3 parts each, 9 slices, 1 or 2 per member.
        let m = manifest(3, 10);
        let ms = members(8);
        let p = Placement::compute(&m, "train", &ms, 1, Partition::Iid, 1);
        assert!(ms.iter().all(|me| (1..=2).contains(&p.primary_of(me).len())));
        assert_eq!(trained(&p, &ms).iter().map(|s| s.records).sum::<u64>(), 30);
        // A block never cut into more parts than it has records.
        let m = manifest(1, 10);
        let ms = members(16);
        let p = Placement::compute(&m, "train", &ms, 1, Partition::Iid, 1);
        let all = trained(&p, &ms);
        assert_eq!((all.len(), all.iter().map(|s| s.records).sum::<u64>()), (10, 10));
    }

    #[test]
    fn a_leaving_member_moves_few_other_slices() {
        let m = manifest(300, 10);
        let ms = members(5);
        let before = Placement::compute(&m, "train", &ms, 3, Partition::Iid, 1);
        let gone = ms[2];
        let rest: Vec<_> = ms.iter().copied().filter(|x| *x != gone).collect();
        let after = Placement::compute(&m, "train", &rest, 3, Partition::Iid, 1);
        let mut moved = 0;
        for me in &rest {
            let b = before.primary_of(me);
            moved += b.iter().filter(|s| !after.primary_of(me).contains(s)).count();
        }
        // The leaver's 60 slices must move; of the others' 240, bounded
        // loads move some to make room, but only a fraction.
        assert!(moved <= 60, "{moved} of 240 slices of staying members moved");
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
                    let info = m.blocks("train").iter().find(|x| x.hash == b.hash).unwrap();
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
