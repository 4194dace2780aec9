//! The deterministic simulator: many node cores in one process, driven by a
//! seeded scheduler over a simulated network that delays, reorders, drops
//! and duplicates messages, partitions and heals, and crashes and restarts
//! nodes (a restart rebuilds the core from what its ledger and checkpoint
//! hold, through the same [`crate::core::resume::resume`] a node uses).
//! Training is a cheap stand-in ([`standin`]); everything else (the core,
//! the inbox, chains, signatures, the codec, aggregation) is the real code.
//!
//! After each run the [`check`]s name any broken invariant, and the seed
//! replays it exactly: `meshtrain sim --seed-from SEED --seeds 1`.
//! FoundationDB's simulation testing and TigerBeetle's VOPR are the models.

pub mod check;
pub mod standin;
mod sybil;
mod world;

use std::ops::Range;

use meshtrain_model::{AggregatorSpec, CodecSpec};
use serde::Serialize;

use crate::attack::Attack;
pub use check::Violation;
pub use world::World;

/// One scenario, run under many seeds.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Honest nodes.
    pub nodes: usize,
    /// Attacking nodes (after the honest ones), running `attack`.
    pub byzantine: usize,
    pub attack: Option<Attack>,
    pub rounds: u64,
    /// Parameters of the stand-in model.
    pub params: usize,
    pub codec: CodecSpec,
    pub aggregator: AggregatorSpec,
    /// Simulated training time per round.
    pub train_ms: u64,
    pub checkpoint_every: u64,
    /// Nodes (the last honest ones) that start a third of the way in.
    pub late_join: usize,
    /// While faults last: message loss, duplication, and delay range.
    pub drop: f64,
    pub dup: f64,
    pub delay_ms: (u64, u64),
    pub partitions: bool,
    pub crashes: bool,
    pub admission: SimAdmission,
    /// Identities one attacker runs besides the nodes (Sybils): each signs
    /// a poisoned update every round and votes for a poisoned anchor.
    pub sybils: usize,
    /// The Sybils also claim their poisoned anchor as the base of their
    /// records and offer it, self-attested, to anyone who asks.
    pub hijack: bool,
    /// Every node but the first spends this much longer on its first
    /// round: it fetches its shard over a slow link from node 0, which
    /// holds the data and is ready at once.
    pub slow_first_ms: u64,
    /// The loss-scoring stage (on the stand-in's held-out loss).
    pub score: Option<crate::runspec::ScoreSpec>,
}

/// How the simulated run admits nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimAdmission {
    /// A roster of the honest and Byzantine nodes (not the Sybils).
    Permissioned,
    /// Anyone; votes earned by merged rounds. `founded`: the nodes that
    /// start the run have a vote from round 0 (else nobody has one until
    /// it is earned, as in a spec without `founders`).
    Open { earn_rounds: u64, founded: bool },
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 8,
            byzantine: 0,
            attack: None,
            rounds: 30,
            params: 16,
            codec: CodecSpec::Dense,
            aggregator: AggregatorSpec::CenteredClip { tau: None },
            train_ms: 100,
            checkpoint_every: 5,
            late_join: 0,
            drop: 0.02,
            dup: 0.02,
            delay_ms: (1, 80),
            partitions: true,
            crashes: true,
            admission: SimAdmission::Permissioned,
            sybils: 0,
            hijack: false,
            slow_first_ms: 0,
            score: None,
        }
    }
}

/// What one seed did.
#[derive(Clone, Debug, Serialize)]
pub struct SeedOutcome {
    pub seed: u64,
    pub violations: Vec<Violation>,
    /// Simulated milliseconds until every honest node finished.
    pub sim_ms: u64,
    /// ... until the last honest node evaluated its final anchor (the
    /// run's result; draining follows, for members still behind).
    pub result_ms: u64,
    /// ... from the last honest close of round 0 to the result: the rounds
    /// after the first, which waits for every member (shards may still be
    /// coming).
    pub after_first_ms: u64,
    pub crashes: u64,
    pub partitions: u64,
    /// Rounds honest nodes closed once the network was quiet, and how many
    /// of those were lost (see `check::progress`), summed over the nodes;
    /// and the largest share one node lost.
    pub closed_after_quiet: u64,
    pub lost_after_quiet: u64,
    pub worst_lost_share: f64,
}

/// Runs one seed and checks it.
pub fn run_seed(cfg: &SimConfig, seed: u64) -> SeedOutcome {
    let mut world = World::new(cfg.clone(), seed);
    let limit = cfg.rounds * (cfg.train_ms + 3000) * 4 + 60_000 + cfg.slow_first_ms;
    world.run(limit);
    let honest = || world.nodes.iter().filter(|n| n.honest());
    let result_ms = honest().filter_map(|n| n.evaluated_at).max().unwrap_or(world.now());
    let first_close = honest()
        .filter_map(|n| n.closed.get(&0).map(|c| c.at))
        .max()
        .unwrap_or(0);
    let progress = check::progress(&world);
    SeedOutcome {
        seed,
        closed_after_quiet: progress.iter().map(|p| p.2).sum(),
        lost_after_quiet: progress.iter().map(|p| p.1).sum(),
        worst_lost_share: progress
            .iter()
            .map(|p| p.1 as f64 / p.2.max(1) as f64)
            .fold(0.0, f64::max),
        violations: check::check(&world),
        sim_ms: world.now(),
        result_ms,
        after_first_ms: result_ms.saturating_sub(first_close),
        crashes: world.crashes,
        partitions: world.partitions,
    }
}

/// Seeds run, and those that broke an invariant.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub seeds: u64,
    pub failed: Vec<SeedOutcome>,
    pub wall_s: f64,
    pub seeds_per_s: f64,
    /// Failures per invariant.
    pub by_invariant: std::collections::BTreeMap<String, u64>,
    /// Rounds closed and lost after the faults, over every seed (see
    /// `SeedOutcome`), and the seeds where a node lost over a quarter.
    pub closed_after_quiet: u64,
    pub lost_after_quiet: u64,
    pub seeds_losing_a_quarter: u64,
}

impl Summary {
    /// The one line the `sim` command prints.
    pub fn line(&self, seeds: &Range<u64>) -> String {
        let failed: Vec<String> = self.failed.iter().map(|f| f.seed.to_string()).collect();
        format!(
            "sim: {} seeds ({}..{}) in {:.1} s ({:.0} seeds/s); rounds lost after the faults {:.1}% ({} seeds with a node losing over a quarter); {} failed{}{}",
            self.seeds,
            seeds.start,
            seeds.end,
            self.wall_s,
            self.seeds_per_s,
            100.0 * self.lost_after_quiet as f64 / self.closed_after_quiet.max(1) as f64,
            self.seeds_losing_a_quarter,
            self.failed.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(
                    ": seeds {}",
                    failed.iter().take(20).cloned().collect::<Vec<_>>().join(", ")
                )
            },
            if self.by_invariant.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    self.by_invariant
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )
    }
}

/// Runs `seeds` on `threads` threads (each seed on one thread, so each
/// replays alike whatever the thread count), calling `progress` after each.
pub fn run_seeds(cfg: &SimConfig, seeds: Range<u64>, threads: usize, progress: impl Fn(u64) + Sync) -> Summary {
    let started = std::time::Instant::now();
    let next = std::sync::atomic::AtomicU64::new(seeds.start);
    let done = std::sync::atomic::AtomicU64::new(0);
    let failed = std::sync::Mutex::new(Vec::new());
    // (closed, lost, seeds losing a quarter)
    let progress_sum = std::sync::Mutex::new((0u64, 0u64, 0u64));
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                meshtrain_ledger::memoize_signature_checks(true);
                loop {
                    let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if seed >= seeds.end {
                        break;
                    }
                    let outcome = run_seed(cfg, seed);
                    {
                        let mut p = progress_sum.lock().unwrap_or_else(|p| p.into_inner());
                        p.0 += outcome.closed_after_quiet;
                        p.1 += outcome.lost_after_quiet;
                        p.2 += u64::from(outcome.worst_lost_share > 0.25);
                    }
                    if !outcome.violations.is_empty() {
                        failed.lock().unwrap_or_else(|p| p.into_inner()).push(outcome);
                    }
                    progress(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
                }
                meshtrain_ledger::memoize_signature_checks(false);
            });
        }
    });
    let mut failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
    failed.sort_by_key(|f| f.seed);
    let mut by_invariant = std::collections::BTreeMap::new();
    for f in &failed {
        let kinds: std::collections::BTreeSet<&str> = f.violations.iter().map(|v| v.invariant()).collect();
        for k in kinds {
            *by_invariant.entry(k.to_string()).or_default() += 1;
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let n = seeds.end.saturating_sub(seeds.start);
    let (closed_after_quiet, lost_after_quiet, seeds_losing_a_quarter) =
        progress_sum.into_inner().unwrap_or_else(|p| p.into_inner());
    Summary {
        seeds: n,
        failed,
        wall_s,
        seeds_per_s: n as f64 / wall_s.max(1e-9),
        by_invariant,
        closed_after_quiet,
        lost_after_quiet,
        seeds_losing_a_quarter,
    }
}
