//! `meshtrain ledger audit|compare|export|replay`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use meshtrain_ledger::{audit, Ledger};

#[derive(Subcommand)]
pub(super) enum LedgerCommand {
    /// Verify every signature, link, verdict, payload and proof.
    Audit {
        /// A node's data dir (or its ledger dir).
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check that two ledgers agree on every chain they share.
    Compare { left: PathBuf, right: PathBuf },
    /// Print records and verdicts as JSON lines.
    Export { dir: PathBuf },
    /// Recompute the anchor weights from genesis and the retained payloads,
    /// checking every anchor hash in the verdict chain.
    Replay {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
        /// The block store holding the run's TorchScript module, if it
        /// trains one (default: DIR/blocks, a node's own store).
        #[arg(long)]
        blocks: Option<PathBuf>,
    },
}

fn ledger_dir(dir: &Path) -> PathBuf {
    let inner = dir.join("ledger");
    if inner.join("CURRENT").exists() {
        inner
    } else {
        dir.to_path_buf()
    }
}

pub(super) fn run(cmd: LedgerCommand) -> Result<ExitCode> {
    match cmd {
        LedgerCommand::Audit { dir, json } => {
            let path = ledger_dir(&dir);
            let ledger = Ledger::open_read_only(&path)?;
            let report = audit::audit(&ledger)?;
            if json {
                let mut value = serde_json::to_value(&report)?;
                value["peak_rss_mb"] = serde_json::json!(meshtrain_node::bench::peak_rss_mb());
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else if report.ok {
                println!(
                    "ledger {} is sound: {} records by {} authors ({} signatures in {} batches), {} verdict blocks ({} merged, {} clipped, {} rejected), {} payloads, {} proofs",
                    path.display(),
                    report.records,
                    report.authors,
                    report.signatures_verified,
                    report.signature_batches,
                    report.verdict_blocks,
                    report.merged,
                    report.clipped,
                    report.rejected,
                    report.payloads_checked,
                    report.proofs
                );
            } else {
                println!("ledger {} FAILED its audit:", path.display());
                for p in &report.problems {
                    println!("  {p}");
                }
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        LedgerCommand::Compare { left, right } => {
            let a = Ledger::open_read_only(&ledger_dir(&left))?;
            let b = Ledger::open_read_only(&ledger_dir(&right))?;
            let report = audit::compare(&a, &b)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        LedgerCommand::Replay { dir, json, blocks } => {
            let path = ledger_dir(&dir);
            let ledger = Ledger::open_read_only(&path)?;
            let blocks = blocks.or_else(|| Some(dir.join("blocks")).filter(|b| b.is_dir()));
            let store = blocks
                .map(|b| meshtrain_node::blockstore::BlockStore::open(&b))
                .transpose()?;
            let report = meshtrain_node::replay::replay(&ledger, store.as_ref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if report.ok {
                println!(
                    "replayed {} rounds ({} deltas) from genesis: every anchor hash matches; final anchor {}",
                    report.blocks, report.deltas, report.final_anchor
                );
            } else {
                println!(
                    "replay FAILED after {} rounds: {}",
                    report.blocks,
                    report.problem.as_deref().unwrap_or("unknown")
                );
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        LedgerCommand::Export { dir } => {
            let ledger = Ledger::open_read_only(&ledger_dir(&dir))?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            audit::export(&ledger, &mut out)?;
            std::io::Write::flush(&mut out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
