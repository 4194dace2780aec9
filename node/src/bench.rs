//! `meshtrain bench ...`: benchmarks that print figures (never timed tests).

use std::path::Path;
use std::time::{Duration, Instant};

use meshtrain_ledger::{
    AuthorKey, Head, Ledger, PayloadHash, RunId, RunMeta, Seq, StoreOptions, UpdateRecord, VerifiedRecord, WeightsHash,
    RECORD_VERSION,
};
use serde::Serialize;

use crate::NodeError;

/// Peak resident memory of this process so far (VmHWM), in MiB.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[derive(Debug, Serialize)]
pub struct LedgerBench {
    pub records: u64,
    pub authors: u64,
    /// One WriteBatch per record, as the node's inbox writes them; sync off.
    pub append_records_per_s: f64,
    /// The same with every batch fsynced (measured on `sync_sample` records).
    pub append_sync_records_per_s: f64,
    pub sync_sample: u64,
    /// The node's whole receive path per record: signature, chain link,
    /// one WriteBatch (measured on `verify_sample` records, one thread).
    pub verify_and_append_records_per_s: f64,
    pub verify_sample: u64,
    /// `meshtrain ledger audit` over all records, signatures included.
    pub audit_records_per_s: f64,
    pub audit_s: f64,
    /// One-at-a-time strict verification time over batch verification time,
    /// one thread, batches of 512.
    pub batch_verify_speedup: f64,
    /// Peak RSS of the audit process for the full ledger and for one a tenth
    /// of its size: flat if the audit streams.
    pub audit_peak_rss_mb: f64,
    pub audit_peak_rss_mb_tenth: f64,
    pub ledger_bytes_on_disk: u64,
}

fn meta() -> RunMeta {
    let spec = b"bench-ledger".to_vec();
    RunMeta {
        run_id: RunId::of_spec(&spec),
        owner: AuthorKey::from_secret([1; 32]).author(),
        genesis_weights: WeightsHash([0; 32]),
        run_spec: spec,
    }
}

/// Signed, pre-verified chains: `per_author` records for each author, in
/// round-major order (every author's seq 0, then every seq 1, ...).
fn generate(meta: &RunMeta, authors: usize, per_author: u64) -> Vec<VerifiedRecord> {
    let keys: Vec<AuthorKey> = (0..authors)
        .map(|i| {
            let mut s = [7u8; 32];
            s[..8].copy_from_slice(&(i as u64).to_le_bytes());
            AuthorKey::from_secret(s)
        })
        .collect();
    let workers = crate::cores();
    let chains: Vec<Vec<VerifiedRecord>> = std::thread::scope(|scope| {
        let handles: Vec<_> = keys
            .chunks(authors.div_ceil(workers))
            .map(|group| {
                scope.spawn(move || {
                    group
                        .iter()
                        .map(|k| {
                            let mut head: Option<Head> = None;
                            (0..per_author)
                                .map(|seq| {
                                    let prev = head.map_or(meta.genesis_link(), |h| h.hash);
                                    let signed = UpdateRecord {
                                        version: RECORD_VERSION,
                                        run_id: meta.run_id,
                                        author: k.author(),
                                        seq: Seq(seq),
                                        prev,
                                        round: seq,
                                        base_hash: WeightsHash([3; 32]),
                                        base_outer: WeightsHash([4; 32]),
                                        made_from: WeightsHash([0; 32]),
                                        made_outer: WeightsHash([0; 32]),
                                        merged: Vec::new(),
                                        waited: Vec::new(),
                                        payload_hash: PayloadHash::of(&seq.to_le_bytes()),
                                        payload_len: 4096,
                                        n_samples: 640,
                                        train_loss: 0.25,
                                    }
                                    .sign(k);
                                    let v = VerifiedRecord::extend(signed, &meta.run_id, head, meta.genesis_link())
                                        .expect("generated records extend their chains");
                                    head = Some(v.head());
                                    v
                                })
                                .collect::<Vec<_>>()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    let mut iters: Vec<_> = chains.into_iter().map(|c| c.into_iter()).collect();
    let mut out = Vec::with_capacity(authors * per_author as usize);
    for _ in 0..per_author {
        for it in iters.iter_mut() {
            if let Some(v) = it.next() {
                out.push(v);
            }
        }
    }
    out
}

fn append_all(path: &Path, meta: &RunMeta, records: &[VerifiedRecord], sync: bool) -> Result<f64, NodeError> {
    let ledger = Ledger::open_or_create(path, meta, StoreOptions { sync_writes: sync })?;
    let start = Instant::now();
    for v in records {
        let mut event = ledger.begin();
        event.append(v)?;
        event.commit()?;
    }
    Ok(records.len() as f64 / start.elapsed().as_secs_f64())
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// Runs `meshtrain ledger audit --json` on `path` in a child process and
/// returns (seconds, records, peak RSS in MiB).
fn audit_child(binary: &Path, path: &Path) -> Result<(f64, u64, f64), NodeError> {
    let start = Instant::now();
    let out = std::process::Command::new(binary)
        .args(["ledger", "audit", "--json"])
        .arg(path)
        .output()
        .map_err(|source| NodeError::Io {
            path: binary.to_path_buf(),
            source,
        })?;
    let secs = start.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| NodeError::Bench(format!("audit output: {e}: {}", String::from_utf8_lossy(&out.stderr))))?;
    if v["ok"] != serde_json::Value::Bool(true) {
        return Err(NodeError::Bench(format!(
            "the benchmark ledger failed its audit: {}",
            v["problems"]
        )));
    }
    Ok((
        secs,
        v["records"].as_u64().unwrap_or(0),
        v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
    ))
}

fn batch_speedup(records: &[VerifiedRecord]) -> f64 {
    use ed25519_dalek::{Signature, VerifyingKey};
    let sample: Vec<&VerifiedRecord> = records.iter().take(32_768).collect();
    let msgs: Vec<Vec<u8>> = sample.iter().map(|v| v.signed().signed_message()).collect();
    let sigs: Vec<Signature> = sample
        .iter()
        .map(|v| Signature::from_bytes(&v.signed().signature.0))
        .collect();
    let keys: Vec<VerifyingKey> = sample
        .iter()
        .filter_map(|v| VerifyingKey::from_bytes(&v.signed().record.author.0).ok())
        .collect();
    let start = Instant::now();
    let mut ok = 0;
    for ((m, s), k) in msgs.iter().zip(&sigs).zip(&keys) {
        ok += k.verify_strict(m, s).is_ok() as usize;
    }
    let single = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for ((m, s), k) in msgs.chunks(512).zip(sigs.chunks(512)).zip(keys.chunks(512)) {
        let refs: Vec<&[u8]> = m.iter().map(|x| x.as_slice()).collect();
        ok += ed25519_dalek::verify_batch(&refs, s, k).is_ok() as usize;
    }
    let batched = start.elapsed().as_secs_f64();
    debug_assert!(ok > 0);
    single / batched
}

/// The ledger benchmark of issue 3. `binary` is `meshtrain` itself.
pub fn ledger(records: u64, authors: u64, binary: &Path, work: &Path) -> Result<LedgerBench, NodeError> {
    let meta = meta();
    let per_author = records.div_ceil(authors);
    eprintln!(
        "generating {} signed records from {authors} authors ...",
        per_author * authors
    );
    let all = generate(&meta, authors as usize, per_author);

    let main = work.join("bench-ledger");
    let _ = std::fs::remove_dir_all(&main);
    eprintln!("appending (one WriteBatch per record, sync off) ...");
    let append = append_all(&main, &meta, &all, false)?;

    let sync_sample = all.len().min(5_000);
    let sync_dir = work.join("bench-ledger-sync");
    let _ = std::fs::remove_dir_all(&sync_dir);
    eprintln!("appending {sync_sample} records with fsync per batch ...");
    let append_sync = append_all(&sync_dir, &meta, &all[..sync_sample], true)?;
    let _ = std::fs::remove_dir_all(&sync_dir);

    let verify_sample = all.len().min(100_000);
    let verify_dir = work.join("bench-ledger-verify");
    let _ = std::fs::remove_dir_all(&verify_dir);
    eprintln!("verify and append {verify_sample} records (the inbox path) ...");
    let verify_append = {
        let ledger = Ledger::open_or_create(&verify_dir, &meta, StoreOptions::default())?;
        let start = Instant::now();
        for v in &all[..verify_sample] {
            let signed = v.signed().clone();
            let author = signed.record.author;
            let placed = meshtrain_ledger::chain::place(
                signed,
                &meta.run_id,
                ledger.head(&author),
                meta.genesis_link(),
                |_| None,
            )?;
            if let meshtrain_ledger::Placement::Next(verified) = placed {
                let mut event = ledger.begin();
                event.append(&verified)?;
                event.commit()?;
            }
        }
        verify_sample as f64 / start.elapsed().as_secs_f64()
    };
    let _ = std::fs::remove_dir_all(&verify_dir);

    let tenth = work.join("bench-ledger-tenth");
    let _ = std::fs::remove_dir_all(&tenth);
    append_all(&tenth, &meta, &all[..all.len() / 10], false)?;
    eprintln!("batch verification speed-up ...");
    let speedup = batch_speedup(&all);
    let n = all.len() as u64;
    drop(all);

    eprintln!("auditing {n} records in a child process ...");
    let (audit_s, audited, rss) = audit_child(binary, &main)?;
    let (_, _, rss_tenth) = audit_child(binary, &tenth)?;
    let disk = dir_size(&main);
    let _ = std::fs::remove_dir_all(&tenth);
    let _ = std::fs::remove_dir_all(&main);
    Ok(LedgerBench {
        records: n,
        authors,
        append_records_per_s: append,
        append_sync_records_per_s: append_sync,
        sync_sample: sync_sample as u64,
        verify_and_append_records_per_s: verify_append,
        verify_sample: verify_sample as u64,
        audit_records_per_s: audited as f64 / audit_s,
        audit_s,
        batch_verify_speedup: speedup,
        audit_peak_rss_mb: rss,
        audit_peak_rss_mb_tenth: rss_tenth,
        ledger_bytes_on_disk: disk,
    })
}

#[derive(Debug, Serialize)]
pub struct CodecBenchRow {
    pub codec: String,
    pub params: usize,
    pub bytes: usize,
    /// Dense fp32 bytes over encoded bytes.
    pub ratio: f64,
    /// MB/s of fp32 input (4 bytes per parameter), one thread.
    pub encode_mb_s: f64,
    pub decode_mb_s: f64,
    /// Encode with error feedback (residual add, encode, decode, residual update).
    pub encode_ef_mb_s: f64,
    /// Relative L2 error of one encode/decode: |x − decode(encode(x))| / |x|.
    pub rel_error: f64,
}

/// Seconds of the fastest of F's runs over about a second of running it:
/// the figure of a warmed, undisturbed core.
fn best_of(f: &mut dyn FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    let mut total = 0.0;
    while total < 1.0 || best == f64::INFINITY {
        let start = Instant::now();
        f();
        let t = start.elapsed().as_secs_f64();
        best = best.min(t);
        total += t;
    }
    best
}

/// Encode and decode throughput of every codec mode on a vector shaped like
/// a real delta (Gaussian, with heavier-tailed coordinates mixed in).
pub fn codec(params: usize, specs: &[meshtrain_model::CodecSpec]) -> Vec<CodecBenchRow> {
    use meshtrain_model::{codec, DeltaEncoder};
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let normal = Normal::new(0.0f32, 1e-3).expect("valid normal");
    let x: Vec<f32> = (0..params)
        .map(|i| {
            let v = normal.sample(&mut rng);
            if i % 97 == 0 {
                v * 20.0
            } else {
                v
            }
        })
        .collect();
    let mb = 4.0 * params as f64 / 1e6;
    let norm = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    specs
        .iter()
        .map(|&spec| {
            let bytes = codec::encode(spec, &x);
            let decoded = codec::decode(&bytes, params).unwrap_or_default();
            let err = x
                .iter()
                .zip(&decoded)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let enc = best_of(&mut || {
                std::hint::black_box(codec::encode(spec, std::hint::black_box(&x)));
            });
            let dec = best_of(&mut || {
                std::hint::black_box(codec::decode(std::hint::black_box(&bytes), params).ok());
            });
            let mut ef = DeltaEncoder::new(spec, params);
            let enc_ef = best_of(&mut || {
                std::hint::black_box(ef.encode(&x).ok());
            });
            CodecBenchRow {
                codec: spec.to_string(),
                params,
                bytes: bytes.len(),
                ratio: 4.0 * params as f64 / bytes.len() as f64,
                encode_mb_s: mb / enc,
                decode_mb_s: mb / dec,
                encode_ef_mb_s: mb / enc_ef,
                rel_error: err / norm,
            }
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct AggregateBenchRow {
    pub aggregator: String,
    pub inputs: usize,
    pub params: usize,
    /// Best of repeated runs, one thread.
    pub ms: f64,
    /// Inputs the rule rejected (of three or more, the last one is
    /// sign-flipped).
    pub rejected: usize,
}

/// Time of one aggregation of `inputs` deltas of `params` parameters by
/// each rule, as a node runs it when it closes a round: honest deltas
/// sharing a direction plus noise, the last one sign-flipped (of three or
/// more).
pub fn aggregate(params: usize, inputs: usize, specs: &[meshtrain_model::AggregatorSpec]) -> Vec<AggregateBenchRow> {
    use meshtrain_model::{aggregate::aggregate as run, AggInput, AggVerdict};
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let normal = Normal::new(0.0f32, 1e-3).expect("valid normal");
    let common: Vec<f32> = (0..params).map(|_| normal.sample(&mut rng)).collect();
    let deltas: Vec<Vec<f32>> = (0..inputs)
        .map(|k| {
            let sign = if k + 1 == inputs && inputs > 2 { -1.0 } else { 1.0 };
            common
                .iter()
                .map(|c| sign * (c + 0.5 * normal.sample(&mut rng)))
                .collect()
        })
        .collect();
    let agg_inputs: Vec<AggInput<'_>> = deltas.iter().map(|d| AggInput { delta: d, weight: 1.0 }).collect();
    specs
        .iter()
        .map(|&spec| {
            let out = run(spec, &agg_inputs);
            let rejected = out
                .verdicts
                .iter()
                .filter(|v| matches!(v, AggVerdict::Rejected { .. }))
                .count();
            let best = best_of(&mut || {
                std::hint::black_box(run(spec, std::hint::black_box(&agg_inputs)));
            });
            AggregateBenchRow {
                aggregator: spec.to_string(),
                inputs,
                params,
                ms: best * 1e3,
                rejected,
            }
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct DataBench {
    pub idx_records: u64,
    pub idx_seconds: f64,
    pub idx_records_per_s: f64,
    pub idx_source_mb_per_s: f64,
    pub csv_bytes: u64,
    pub csv_rows: u64,
    pub csv_seconds: f64,
    pub csv_mb_per_s: f64,
    pub csv_rows_per_s: f64,
}

/// Writes a CSV of about `bytes` bytes: 20 numeric features and a binary
/// label, like a fraud or sensor log.
fn write_csv(path: &Path, bytes: u64) -> Result<u64, NodeError> {
    use rand::{Rng, SeedableRng};
    use std::io::Write;
    let io = |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut header: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    header.insert(7, "label".into());
    writeln!(w, "{}", header.join(",")).map_err(io)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut written = 0u64;
    let mut rows = 0u64;
    let mut line = String::with_capacity(256);
    while written < bytes {
        line.clear();
        for i in 0..21 {
            if i > 0 {
                line.push(',');
            }
            if i == 7 {
                line.push(if rng.random_bool(0.1) { '1' } else { '0' });
            } else {
                use std::fmt::Write as _;
                let _ = write!(line, "{:.5}", rng.random::<f32>() * 100.0 - 50.0);
            }
        }
        line.push('\n');
        w.write_all(line.as_bytes()).map_err(io)?;
        written += line.len() as u64;
        rows += 1;
    }
    w.flush().map_err(io)?;
    Ok(rows)
}

/// Import throughput: Fashion-MNIST's IDX files, and a generated CSV.
pub fn data(work: &Path, csv_bytes: u64, idx_dir: &Path) -> Result<DataBench, NodeError> {
    use crate::data::{import, Format, ImportOptions};
    let opts = |format, sources: Vec<std::path::PathBuf>, out: std::path::PathBuf| ImportOptions {
        format,
        sources,
        out,
        block_size: meshtrain_model::blocks::DEFAULT_BLOCK_SIZE,
        name: None,
        label_column: Some("label".into()),
        sort_by_label: false,
        test_fraction: 0.1,
        seq_len: 256,
    };
    let idx_out = work.join("bench-idx");
    let _ = std::fs::remove_dir_all(&idx_out);
    eprintln!("importing {} ...", idx_dir.display());
    let idx = import(&opts(Format::Idx, vec![idx_dir.to_path_buf()], idx_out.clone()))?;
    let _ = std::fs::remove_dir_all(&idx_out);

    let csv = work.join("bench.csv");
    eprintln!("writing a {} MB CSV ...", csv_bytes / 1_000_000);
    let rows = write_csv(&csv, csv_bytes)?;
    let real = std::fs::metadata(&csv).map(|m| m.len()).unwrap_or(csv_bytes);
    let csv_out = work.join("bench-csv");
    let _ = std::fs::remove_dir_all(&csv_out);
    eprintln!("importing it ...");
    let c = import(&opts(Format::Csv, vec![csv.clone()], csv_out.clone()))?;
    let _ = std::fs::remove_dir_all(&csv_out);
    let _ = std::fs::remove_file(&csv);
    let idx_records: u64 = idx.records.values().sum();
    Ok(DataBench {
        idx_records,
        idx_seconds: idx.seconds,
        idx_records_per_s: idx_records as f64 / idx.seconds,
        idx_source_mb_per_s: idx.mb_per_s,
        csv_bytes: real,
        csv_rows: rows,
        csv_seconds: c.seconds,
        csv_mb_per_s: real as f64 / 1e6 / c.seconds,
        csv_rows_per_s: rows as f64 / c.seconds,
    })
}

#[derive(Debug, Serialize)]
pub struct FetchBench {
    pub block_bytes: usize,
    pub blocks: usize,
    pub in_flight: usize,
    pub seconds: f64,
    pub mb_per_s: f64,
}

/// A swarm with a fresh identity, listening on a loopback port, and the
/// address it got.
async fn loopback_swarm(
    cfg: &meshtrain_gossip::MeshConfig,
    topic: &meshtrain_gossip::libp2p::gossipsub::IdentTopic,
    reg: &mut prometheus_client::registry::Registry,
) -> Result<
    (
        meshtrain_gossip::libp2p::Swarm<meshtrain_gossip::MeshBehaviour>,
        meshtrain_gossip::libp2p::Multiaddr,
    ),
    NodeError,
> {
    use futures::StreamExt;
    use meshtrain_gossip::libp2p::swarm::SwarmEvent;
    let mut swarm = meshtrain_gossip::build_swarm(
        meshtrain_gossip::libp2p::identity::Keypair::generate_ed25519(),
        cfg,
        topic,
        reg,
    )?;
    let listen: meshtrain_gossip::libp2p::Multiaddr = "/ip4/127.0.0.1/tcp/0"
        .parse()
        .map_err(|e| NodeError::Bench(format!("{e}")))?;
    swarm.listen_on(listen).map_err(|e| NodeError::Bench(e.to_string()))?;
    loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            return Ok((swarm, address));
        }
    }
}

/// Block fetch throughput between two real libp2p swarms on loopback
/// (TCP, noise, yamux, the fetch protocol): one serves blocks from memory,
/// the other requests them by hash, `in_flight` at a time.
pub async fn fetch(block_bytes: usize, blocks: usize, in_flight: usize) -> Result<FetchBench, NodeError> {
    use futures::StreamExt;
    use meshtrain_gossip::libp2p::identity;
    use meshtrain_gossip::libp2p::request_response::{Event, Message};
    use meshtrain_gossip::libp2p::swarm::SwarmEvent;
    use meshtrain_gossip::{build_swarm, run_topic, FetchRequest, FetchResponse, MeshBehaviourEvent, MeshConfig};

    let topic = run_topic("bench");
    let cfg = MeshConfig::default();
    let mut reg = prometheus_client::registry::Registry::default();
    let (mut server, addr) = loopback_swarm(&cfg, &topic, &mut reg).await?;
    let mut client = build_swarm(identity::Keypair::generate_ed25519(), &cfg, &topic, &mut reg)?;
    let server_id = *server.local_peer_id();
    let payload: Vec<u8> = (0..block_bytes).map(|i| (i * 31 % 251) as u8).collect();
    tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(MeshBehaviourEvent::Fetch(Event::Message {
                message: Message::Request { channel, .. },
                ..
            })) = server.select_next_some().await
            {
                let _ = server
                    .behaviour_mut()
                    .fetch
                    .send_response(channel, FetchResponse::Block(payload.clone()));
            }
        }
    });
    client.dial(addr).map_err(|e| NodeError::Bench(e.to_string()))?;
    loop {
        if let SwarmEvent::ConnectionEstablished { .. } = client.select_next_some().await {
            break;
        }
    }
    let start = Instant::now();
    let (mut sent, mut got) = (0usize, 0usize);
    while sent < in_flight.min(blocks) {
        client
            .behaviour_mut()
            .fetch
            .send_request(&server_id, FetchRequest::Block { hash: [sent as u8; 32] });
        sent += 1;
    }
    while got < blocks {
        match client.select_next_some().await {
            SwarmEvent::Behaviour(MeshBehaviourEvent::Fetch(Event::Message {
                message:
                    Message::Response {
                        response: FetchResponse::Block(b),
                        ..
                    },
                ..
            })) => {
                if b.len() != block_bytes {
                    return Err(NodeError::Bench("short block".into()));
                }
                got += 1;
                if sent < blocks {
                    client
                        .behaviour_mut()
                        .fetch
                        .send_request(&server_id, FetchRequest::Block { hash: [sent as u8; 32] });
                    sent += 1;
                }
            }
            SwarmEvent::Behaviour(MeshBehaviourEvent::Fetch(Event::OutboundFailure { error, .. })) => {
                return Err(NodeError::Bench(format!("fetch failed: {error}")));
            }
            _ => {}
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(FetchBench {
        block_bytes,
        blocks,
        in_flight,
        seconds,
        mb_per_s: (block_bytes * blocks) as f64 / 1e6 / seconds,
    })
}

#[derive(Debug, Serialize)]
pub struct DiscoveryBench {
    pub trials: usize,
    pub nodes: usize,
    /// Trials in which some node had not connected to every other within
    /// the time limit (a split or partial mesh).
    pub incomplete: usize,
    pub seconds_median: f64,
    pub seconds_max: f64,
}

/// Grows meshes of `nodes` real swarms on loopback, each node given one
/// bootstrap address (a random earlier node), and times how long until
/// every node is connected to every other, with the node's own discovery
/// policy (identify feeds Kademlia, Kademlia's finds are dialled).
pub async fn discovery(trials: usize, nodes: usize, limit: Duration) -> Result<DiscoveryBench, NodeError> {
    use futures::StreamExt;
    use meshtrain_gossip::libp2p::{Multiaddr, PeerId};
    use meshtrain_gossip::{discovery, run_topic, MeshConfig};
    use rand::{Rng, SeedableRng};

    let nodes = nodes.max(2);
    let topic = run_topic("discovery-bench");
    let cfg = MeshConfig::default();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut times = Vec::with_capacity(trials);
    let mut incomplete = 0;
    for trial in 0..trials {
        let mut reg = prometheus_client::registry::Registry::default();
        let mut swarms = Vec::with_capacity(nodes);
        let mut policies: Vec<discovery::Discovery> = (0..nodes).map(|_| Default::default()).collect();
        let mut addrs: Vec<(PeerId, Multiaddr)> = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let (mut s, addr) = loopback_swarm(&cfg, &topic, &mut reg).await?;
            let me = *s.local_peer_id();
            if i > 0 {
                // As `node run --bootstrap ADDR` does.
                let (peer, boot) = addrs[rng.random_range(0..i)].clone();
                s.behaviour_mut().kad.add_address(&peer, boot.clone());
                s.dial(boot).map_err(|e| NodeError::Bench(e.to_string()))?;
            }
            addrs.push((me, addr.with(meshtrain_gossip::libp2p::multiaddr::Protocol::P2p(me))));
            swarms.push(s);
        }
        let started = Instant::now();
        let all: Vec<PeerId> = swarms.iter().map(|s| *s.local_peer_id()).collect();
        let full = |swarms: &[meshtrain_gossip::libp2p::Swarm<meshtrain_gossip::MeshBehaviour>]| {
            swarms.iter().all(|s| {
                all.iter()
                    .filter(|p| *p != s.local_peer_id())
                    .all(|p| s.is_connected(p))
            })
        };
        let mut done = false;
        while started.elapsed() < limit {
            // Drive every swarm a little; each reacts with the node's policy.
            let next = {
                let step = futures::future::select_all(swarms.iter_mut().map(|s| Box::pin(s.select_next_some())));
                tokio::time::timeout(Duration::from_millis(50), step)
                    .await
                    .ok()
                    .map(|(event, i, rest)| {
                        drop(rest);
                        (event, i)
                    })
            };
            if let Some((event, i)) = next {
                policies[i].on_event(&mut swarms[i], &event, |_| true, |_| true, Instant::now());
            }
            for (s, p) in swarms.iter_mut().zip(&mut policies) {
                p.on_wake(s, |_| true, Instant::now());
            }
            if full(&swarms) {
                done = true;
                break;
            }
        }
        let took = started.elapsed().as_secs_f64();
        if done {
            times.push(took);
        } else {
            incomplete += 1;
            tracing::warn!(trial, nodes, "the mesh did not close within the limit");
        }
        if (trial + 1) % 10 == 0 {
            tracing::info!(trials = trial + 1, incomplete, "discovery trials");
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(DiscoveryBench {
        trials,
        nodes,
        incomplete,
        seconds_median: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
        seconds_max: times.last().copied().unwrap_or(f64::NAN),
    })
}
