//! The deterministic simulator over a few hundred seeds per scenario: the
//! agreement and safety invariants hold under drops, duplicates, delays,
//! partitions and crashes, in both admission modes, with and without an
//! attacker running twenty identities. A failure names the seed and the
//! command that replays it. (Long sweeps are `meshtrain sim --seeds 10000`.)

use meshtrain_node::sim::{run_seeds, SimAdmission, SimConfig};

const SEEDS: u64 = 150;

fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn sweep(name: &str, cfg: SimConfig, flags: &str) {
    let seeds = 0..SEEDS;
    let summary = run_seeds(&cfg, seeds.clone(), threads(), |_| {});
    eprintln!("{name}: {}", summary.line(&seeds));
    let report: Vec<String> = summary
        .failed
        .iter()
        .map(|f| {
            let v: Vec<String> = f.violations.iter().map(|v| v.to_string()).collect();
            format!(
                "seed {} (replay: meshtrain sim {flags} --seed-from {} --seeds 1 --verbose): {}",
                f.seed,
                f.seed,
                v.join("; ")
            )
        })
        .collect();
    assert!(report.is_empty(), "{name}: invariants broken:\n{}", report.join("\n"));
}

#[test]
fn permissioned_under_faults() {
    sweep("permissioned", SimConfig::default(), "");
}

#[test]
fn open_under_faults() {
    let cfg = SimConfig {
        admission: SimAdmission::Open { earn_rounds: 3 },
        ..SimConfig::default()
    };
    sweep("open", cfg, "--admission open");
}

#[test]
fn permissioned_with_sybils_hijacking() {
    let cfg = SimConfig {
        sybils: 20,
        hijack: true,
        ..SimConfig::default()
    };
    sweep("permissioned + sybils", cfg, "--sybils 20 --hijack");
}

#[test]
fn open_with_sybils_hijacking() {
    let cfg = SimConfig {
        admission: SimAdmission::Open { earn_rounds: 3 },
        sybils: 20,
        hijack: true,
        ..SimConfig::default()
    };
    sweep("open + sybils", cfg, "--admission open --sybils 20 --hijack");
}
