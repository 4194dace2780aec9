//! `meshtrain bench ...`: benchmarks that print figures.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use meshtrain_model::CodecSpec;

use super::spec::FASHION_MNIST_IDX;

#[derive(Subcommand)]
pub(super) enum BenchCommand {
    /// Append, audit and verification throughput of the ledger.
    Ledger {
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        #[arg(long, default_value_t = 64)]
        authors: u64,
        /// Where the benchmark ledgers go (removed afterwards).
        #[arg(long, default_value = "out/bench")]
        work: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Import throughput: Fashion-MNIST and a generated CSV.
    Data {
        /// Size of the generated CSV, in MB.
        #[arg(long, default_value_t = 1000)]
        csv_mb: u64,
        #[arg(long, default_value = "out/bench")]
        work: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Block fetch throughput between two nodes' swarms over loopback.
    Fetch {
        /// Bytes per block.
        #[arg(long, default_value_t = 1 << 20)]
        block_bytes: usize,
        #[arg(long, default_value_t = 512)]
        blocks: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 8)]
        in_flight: usize,
        #[arg(long)]
        json: bool,
    },
    /// Peer discovery: meshes grown from one bootstrap address per node,
    /// timed until every node is connected to every other.
    Discovery {
        #[arg(long, default_value_t = 100)]
        trials: usize,
        #[arg(long, default_value_t = 8)]
        nodes: usize,
        /// Seconds a trial may take before it counts as a split mesh.
        #[arg(long, default_value_t = 30)]
        limit_s: u64,
        #[arg(long)]
        json: bool,
    },
    /// Where a round's time goes: a testnet (the same flags as `testnet
    /// run`), then an honest node's round taken apart, stage by stage.
    Round {
        #[command(flatten)]
        run: Box<super::testnet::TestnetArgs>,
        /// Print the summary's breakdown as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Time of one aggregation by each rule (one core), as a node runs it
    /// when it closes a round.
    Aggregate {
        /// Parameters per delta (the default is the MLP's).
        #[arg(long, default_value_t = 235_146)]
        params: usize,
        /// Deltas aggregated at once (of three or more, the last one is
        /// sign-flipped).
        #[arg(long, default_value_t = 4)]
        inputs: usize,
        /// Rules to measure (default: all).
        #[arg(long)]
        aggregator: Vec<meshtrain_model::AggregatorSpec>,
        #[arg(long)]
        json: bool,
    },
    /// Encode and decode throughput of every codec mode (one core).
    Codec {
        /// Parameters in the benchmark vector.
        #[arg(long, default_value_t = 1_000_000)]
        params: usize,
        /// Modes to measure (default: all).
        #[arg(long)]
        codec: Vec<CodecSpec>,
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn run(command: BenchCommand) -> Result<ExitCode> {
    match command {
        BenchCommand::Ledger {
            records,
            authors,
            work,
            json,
        } => {
            if records == 0 || authors == 0 {
                bail!("--records and --authors must be at least 1");
            }
            std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
            let bin = std::env::current_exe().context("locating the meshtrain binary")?;
            let b = meshtrain_node::bench::ledger(records, authors, &bin, &work)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!("ledger benchmark: {} records from {} authors", b.records, b.authors);
                println!("  append, sync off          {:>10.0} records/s", b.append_records_per_s);
                println!(
                    "  append, fsync per batch   {:>10.0} records/s ({} records)",
                    b.append_sync_records_per_s, b.sync_sample
                );
                println!(
                    "  verify + append (inbox)   {:>10.0} records/s ({} records, 1 thread)",
                    b.verify_and_append_records_per_s, b.verify_sample
                );
                println!(
                    "  audit incl. signatures    {:>10.0} records/s ({:.1} s)",
                    b.audit_records_per_s, b.audit_s
                );
                println!("  batch verify speed-up     {:>10.2}x", b.batch_verify_speedup);
                println!(
                    "  audit peak RSS            {:>10.1} MiB (a tenth of the ledger: {:.1} MiB)",
                    b.audit_peak_rss_mb, b.audit_peak_rss_mb_tenth
                );
                println!(
                    "  ledger on disk            {:>10.1} MiB",
                    b.ledger_bytes_on_disk as f64 / 1048576.0
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Aggregate {
            params,
            inputs,
            aggregator,
            json,
        } => {
            if params == 0 || inputs == 0 {
                bail!("--params and --inputs must be at least 1");
            }
            let specs = if aggregator.is_empty() {
                [
                    "mean",
                    "median",
                    "trimmed-mean",
                    "multi-krum",
                    "centered-clip",
                    "clipped-gossip",
                ]
                .iter()
                .map(|s| s.parse())
                .collect::<Result<Vec<meshtrain_model::AggregatorSpec>, _>>()?
            } else {
                aggregator
            };
            let rows = meshtrain_node::bench::aggregate(params, inputs, &specs);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let flipped = if inputs > 2 { " (the last sign-flipped)" } else { "" };
                println!("aggregate benchmark: {inputs} deltas of {params} parameters{flipped}, one thread");
                println!("{:<20} {:>10} {:>9}", "aggregator", "ms", "rejected");
                for r in rows {
                    println!("{:<20} {:>10.2} {:>9}", r.aggregator, r.ms, r.rejected);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Round { run, json } => {
            let summary = super::testnet::run_one(*run)?;
            let Some(stages) = &summary.stages else {
                bail!("no honest node closed two rounds: nothing to take apart");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(stages)?);
            } else {
                print!("{}", meshtrain_testnet::stage_table(&summary));
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Data { csv_mb, work, json } => {
            std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
            let b = meshtrain_node::bench::data(&work, csv_mb * 1_000_000, Path::new(FASHION_MNIST_IDX))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!(
                    "import: Fashion-MNIST {} records in {:.2} s ({:.0} records/s, {:.1} MB/s of gzipped source); CSV {:.0} MB, {} rows in {:.1} s ({:.1} MB/s, {:.0} rows/s)",
                    b.idx_records, b.idx_seconds, b.idx_records_per_s, b.idx_source_mb_per_s,
                    b.csv_bytes as f64 / 1e6, b.csv_rows, b.csv_seconds, b.csv_mb_per_s, b.csv_rows_per_s
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Fetch {
            block_bytes,
            blocks,
            in_flight,
            json,
        } => {
            if block_bytes == 0 || blocks == 0 || in_flight == 0 {
                bail!("--block-bytes, --blocks and --in-flight must be positive");
            }
            let rt = super::runtime()?;
            let b = rt.block_on(meshtrain_node::bench::fetch(block_bytes, blocks, in_flight))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!(
                    "fetched {} blocks of {} bytes ({} in flight) in {:.2} s: {:.0} MB/s",
                    b.blocks, b.block_bytes, b.in_flight, b.seconds, b.mb_per_s
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Discovery {
            trials,
            nodes,
            limit_s,
            json,
        } => {
            if trials == 0 || nodes < 2 {
                bail!("--trials must be positive and --nodes at least 2");
            }
            let rt = super::runtime()?;
            let b = rt.block_on(meshtrain_node::bench::discovery(
                trials,
                nodes,
                Duration::from_secs(limit_s),
            ))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!(
                    "{} trials of {} nodes, one bootstrap address each: {} incomplete meshes; full mesh after {:.2} s median, {:.2} s worst",
                    b.trials, b.nodes, b.incomplete, b.seconds_median, b.seconds_max
                );
            }
            Ok(if b.incomplete == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        BenchCommand::Codec { params, codec, json } => {
            if params == 0 {
                bail!("--params must be at least 1");
            }
            let specs = if codec.is_empty() {
                [
                    "dense",
                    "fp16",
                    "bf16",
                    "topk-int8:0.01",
                    "topk-int8:0.1",
                    "topk-sign:0.01",
                    "topk-sign:0.1",
                ]
                .iter()
                .map(|s| s.parse())
                .collect::<Result<Vec<CodecSpec>, _>>()?
            } else {
                codec
            };
            let rows = meshtrain_node::bench::codec(params, &specs);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("codec benchmark: {params} parameters, one thread, MB/s of fp32 input");
                println!(
                    "{:<16} {:>10} {:>9} {:>11} {:>11} {:>11} {:>9}",
                    "codec", "bytes", "ratio", "encode", "decode", "encode+EF", "rel err"
                );
                for r in rows {
                    println!(
                        "{:<16} {:>10} {:>8.1}x {:>11.0} {:>11.0} {:>11.0} {:>9.4}",
                        r.codec, r.bytes, r.ratio, r.encode_mb_s, r.decode_mb_s, r.encode_ef_mb_s, r.rel_error
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
