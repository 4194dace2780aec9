//! The hostile-peer soak (a benchmark, not a test): the same honest MLP
//! mesh twice, once alone and once with the hostile peer of
//! `meshtrain_tests::hostile` attacking node 0 at full rate from the first
//! round to the last, and the figures side by side: every node's peak
//! resident memory, mean round time and final accuracy, and what node 0
//! served the hostile peer against its byte budget.
//!
//! `hostile-soak [--nodes N] [--rounds R] [--local-steps H] [--out DIR]`
//! (scripts/bench-hostile.sh runs it; size R so that a run lasts as long as
//! the soak should).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshtrain_tests::hostile::{self, rss, Mischief, Target};
use meshtrain_tests::{import_fashion_mnist, results, roster, spawn_node, spec_for, wait_listen, NodeProc};

/// Payloads kept for the last 20 rounds only: kept for every round, eight
/// nodes wrote 24 GB of ledgers in 1000 rounds and filled the disk.
const KEEP: &str = "--keep-payload-rounds";

struct Args {
    nodes: usize,
    rounds: u64,
    local_steps: u64,
    out: PathBuf,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        nodes: 8,
        rounds: 400,
        local_steps: 10,
        out: PathBuf::from("out/hostile-soak"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--nodes" => a.nodes = value()?.parse().map_err(|e| format!("--nodes: {e}"))?,
            "--rounds" => a.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--local-steps" => a.local_steps = value()?.parse().map_err(|e| format!("--local-steps: {e}"))?,
            "--out" => a.out = PathBuf::from(value()?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.nodes < 2 || a.rounds < 3 {
        return Err("at least 2 nodes and 3 rounds".into());
    }
    Ok(a)
}

/// One run's figures, per node.
#[derive(Default)]
struct Run {
    wall_s: f64,
    peak_rss: Vec<u64>,
    round_ms: Vec<f64>,
    accuracy: Vec<f32>,
    rounds: Vec<u64>,
    served_bytes: Vec<u64>,
    refused_over_budget: Vec<u64>,
    params: u64,
    ok: Vec<bool>,
    mischief: Option<Mischief>,
}

fn run(args: &Args, root: &Path, spec: &Path, store: &Path, keys: &[PathBuf], attack: bool) -> Run {
    let name = if attack { "hostile" } else { "alone" };
    let dirs: Vec<PathBuf> = (0..args.nodes)
        .map(|i| root.join(name).join(format!("node-{i}")))
        .collect();
    for (dir, key) in dirs.iter().zip(keys) {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| fail(&format!("creating {}", dir.display()), e));
        std::fs::copy(key, dir.join("identity.key"))
            .unwrap_or_else(|e| fail(&format!("copying {} into {}", key.display(), dir.display()), e));
    }
    let n = args.nodes;
    let wait = (n - 1).to_string();
    let shard = |i: usize| format!("{i}/{n}");
    let store = utf8(store);
    let mut nodes: Vec<NodeProc> = vec![spawn_node(
        &dirs[0],
        spec,
        &shard(0),
        None,
        &[KEEP, "20", "--wait-peers", &wait, "--drain-s", "10", "--data", store],
    )];
    let info = wait_listen(&mut nodes[0], Duration::from_secs(120));
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        nodes.push(spawn_node(
            dir,
            spec,
            &shard(i),
            Some(&info.addr),
            &[KEEP, "20", "--wait-peers", &wait, "--drain-s", "10"],
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = attack.then(|| {
        let target = Target {
            addr: info.addr.parse().unwrap_or_else(|e| fail("node 0's listen address", e)),
            node: info.peer_id.parse().unwrap_or_else(|e| fail("node 0's peer id", e)),
            run_hex: info.run_id.clone(),
            rounds: args.rounds,
            blocks: hostile::block_hashes(Path::new(store)),
        };
        hostile::spawn(target, stop.clone())
    });
    let started = Instant::now();
    let mut r = Run {
        peak_rss: vec![0; n],
        ..Default::default()
    };
    let mut exited = vec![None; n];
    let mut last_print = Instant::now();
    while exited.iter().any(Option::is_none) {
        for (i, node) in nodes.iter_mut().enumerate() {
            if exited[i].is_some() {
                continue;
            }
            if let Some(b) = rss(node.child.id()) {
                r.peak_rss[i] = r.peak_rss[i].max(b);
            }
            if let Ok(Some(s)) = node.child.try_wait() {
                exited[i] = Some(s);
            }
        }
        if last_print.elapsed() > Duration::from_secs(60) {
            last_print = Instant::now();
            let round = meshtrain_tests::progress_round(&dirs[0]);
            eprintln!(
                "[{name}] {:.0} s: node 0 at round {round} of {}, peak RSS so far {:?} MiB",
                started.elapsed().as_secs_f64(),
                args.rounds,
                r.peak_rss.iter().map(|b| b >> 20).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    r.wall_s = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    r.mischief = attacker.map(|h| h.join().expect("hostile peer thread"));
    for (i, node) in nodes.iter().enumerate() {
        let ok = exited[i].is_some_and(|s| s.success());
        if !ok {
            eprintln!(
                "hostile-soak: [{name}] node {i} failed ({:?}):\n{}",
                exited[i],
                node.log_tail()
            );
            std::process::exit(1);
        }
        let rep = results(&node.dir);
        r.ok.push(ok);
        r.round_ms.push(rep.stages.round_ms);
        r.accuracy.push(rep.final_test_acc);
        r.rounds.push(rep.rounds_completed);
        r.served_bytes.push(rep.served_bytes);
        r.refused_over_budget.push(rep.refused_over_budget);
        r.params = rep.param_count;
    }
    r
}

/// Stops the soak with what went wrong (exit status 2).
fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("hostile-soak: {what}: {e}");
    std::process::exit(2);
}

/// A path as the node's command line takes it.
fn utf8(path: &Path) -> &str {
    path.to_str().unwrap_or_else(|| {
        fail(
            &format!("{} is not UTF-8", path.display()),
            "paths are passed to nodes as text",
        )
    })
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hostile-soak: {e}");
            std::process::exit(2);
        }
    };
    let out = args.out.display().to_string();
    std::fs::create_dir_all(&args.out).unwrap_or_else(|e| fail(&format!("creating {out}"), e));
    let root = std::fs::canonicalize(&args.out).unwrap_or_else(|e| fail(&format!("resolving {out}"), e));
    let _ = std::fs::remove_dir_all(root.join("alone"));
    let _ = std::fs::remove_dir_all(root.join("hostile"));
    let key_dirs: Vec<PathBuf> = (0..args.nodes)
        .map(|i| root.join("keys").join(format!("node-{i}")))
        .collect();
    let founders = roster(&root, &key_dirs);
    let keys: Vec<PathBuf> = key_dirs.iter().map(|d| d.join("identity.key")).collect();
    let store = if root.join("dataset").exists() {
        root.join("dataset")
    } else {
        import_fashion_mnist(&root)
    };
    let spec = spec_for(
        &root,
        &store,
        &[
            "--model",
            "mlp",
            "--rounds",
            &args.rounds.to_string(),
            "--local-steps",
            &args.local_steps.to_string(),
            "--admission",
            "open",
            "--founders",
            utf8(&founders),
        ],
    );
    eprintln!(
        "hostile soak: {} nodes, {} rounds of {} steps, in {}",
        args.nodes,
        args.rounds,
        args.local_steps,
        root.display()
    );
    let alone = run(&args, &root, &spec, &store, &keys, false);
    let attacked = run(&args, &root, &spec, &store, &keys, true);

    println!(
        "\n{} honest MLP nodes, {} rounds; node 0 attacked by the hostile peer in the second run",
        args.nodes, args.rounds
    );
    println!(
        "wall: {:.1} s alone, {:.1} s attacked ({:.2}x)",
        alone.wall_s,
        attacked.wall_s,
        attacked.wall_s / alone.wall_s
    );
    println!("| node | peak RSS MiB alone / attacked | ratio | round ms alone / attacked | ratio | accuracy alone / attacked | points |");
    println!("|---|---|---|---|---|---|---|");
    let mut worst = (0f64, 0f64, f64::INFINITY);
    for i in 0..args.nodes {
        let rss_ratio = attacked.peak_rss[i] as f64 / alone.peak_rss[i].max(1) as f64;
        let ms_ratio = attacked.round_ms[i] / alone.round_ms[i].max(1e-9);
        let points = 100.0 * f64::from(attacked.accuracy[i] - alone.accuracy[i]);
        worst = (worst.0.max(rss_ratio), worst.1.max(ms_ratio), worst.2.min(points));
        println!(
            "| {i} | {:.0} / {:.0} | {rss_ratio:.2} | {:.0} / {:.0} | {ms_ratio:.2} | {:.2}% / {:.2}% | {points:+.2} |",
            mib(alone.peak_rss[i]),
            mib(attacked.peak_rss[i]),
            alone.round_ms[i],
            attacked.round_ms[i],
            100.0 * alone.accuracy[i],
            100.0 * attacked.accuracy[i],
        );
    }
    let m = attacked.mischief.clone().unwrap_or_default();
    let bound = hostile::serving_bound(m.secs, attacked.params);
    println!(
        "hostile peer: {} gap records, {} requests ({} refused, {} answered), {} payload requests stalled, {} lying answers",
        m.gap_records, m.requests, m.refused, m.answers, m.stalled, m.lied
    );
    println!(
        "node 0 served it {:.1} MiB in {:.0} s ({:.2} MiB/s); its bound: {} MiB of payloads and blocks + {} MiB overshoot + {} anchors of {:.2} MiB per 10 s, {:.0} MiB over the run{}; node 0 refused {} requests over budget",
        mib(m.bytes_served),
        m.secs,
        mib(m.bytes_served) / m.secs.max(1e-9),
        hostile::BYTES_PER_WINDOW >> 20,
        hostile::OVERSHOOT >> 20,
        hostile::ANCHORS_PER_WINDOW,
        mib(hostile::anchor_bytes(attacked.params)),
        mib(bound),
        if m.bytes_served <= bound { "" } else { " (EXCEEDED)" },
        attacked.refused_over_budget[0]
    );
    println!(
        "worst node: peak RSS {:.2}x (target <= 1.25), round time {:.2}x (target <= 1.20), accuracy {:+.2} points (target >= -0.5)",
        worst.0, worst.1, worst.2
    );
    let all_ok = alone.ok.iter().chain(&attacked.ok).all(|ok| *ok);
    let summary = serde_json::json!({
        "nodes": args.nodes,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "alone": { "wall_s": alone.wall_s, "peak_rss": alone.peak_rss, "round_ms": alone.round_ms,
                   "accuracy": alone.accuracy, "rounds_completed": alone.rounds, "ok": alone.ok },
        "attacked": { "wall_s": attacked.wall_s, "peak_rss": attacked.peak_rss, "round_ms": attacked.round_ms,
                      "accuracy": attacked.accuracy, "rounds_completed": attacked.rounds, "ok": attacked.ok,
                      "served_bytes": attacked.served_bytes, "refused_over_budget": attacked.refused_over_budget },
        "hostile": { "secs": m.secs, "serving_bound": bound, "gap_records": m.gap_records, "requests": m.requests, "refused": m.refused,
                     "answers": m.answers, "bytes_served": m.bytes_served, "stalled": m.stalled, "lied": m.lied },
        "worst": { "rss_ratio": worst.0, "round_time_ratio": worst.1, "accuracy_points": worst.2 },
    });
    let path = root.join("soak.json");
    let json = serde_json::to_vec_pretty(&summary).unwrap_or_else(|e| fail("encoding soak.json", e));
    std::fs::write(&path, json).unwrap_or_else(|e| fail(&format!("writing {}", path.display()), e));
    println!("figures in {}", path.display());
    if !all_ok {
        eprintln!("hostile-soak: a node failed (logs under {})", root.display());
        std::process::exit(1);
    }
    if m.bytes_served > bound {
        eprintln!("hostile-soak: node 0 served the hostile peer more than its bound");
        std::process::exit(1);
    }
}
