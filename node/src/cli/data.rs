//! `meshtrain data import` and `data inspect`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub(super) enum DataCommand {
    /// Parse sources into fixed-size blocks of whole records plus a manifest.
    Import(ImportArgs),
    /// Verify every block and print the dataset's statistics.
    Inspect {
        /// A block store (the --out of an import).
        dir: PathBuf,
        /// Which dataset, when the store holds several.
        #[arg(long)]
        dataset: Option<String>,
        /// Draw the class balance, brightness and contrast histograms.
        #[arg(long)]
        plot: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(super) struct ImportArgs {
    #[arg(long, value_enum)]
    pub(super) format: meshtrain_node::data::Format,
    /// Source files (or, for IDX, directories holding them).
    #[arg(required = true)]
    pub(super) sources: Vec<PathBuf>,
    /// The block store to write.
    #[arg(long)]
    pub(super) out: PathBuf,
    /// Block size in bytes (whole records only); 4 MiB by default.
    #[arg(long, default_value_t = meshtrain_model::blocks::DEFAULT_BLOCK_SIZE)]
    pub(super) block_size: usize,
    /// CSV: the column holding the class.
    #[arg(long)]
    pub(super) label_column: Option<String>,
    #[arg(long)]
    pub(super) name: Option<String>,
    /// Order records by class before packing (for Dirichlet partitions).
    #[arg(long)]
    pub(super) sort_by_label: bool,
    /// CSV, text, and image sources that hold one split only: the share
    /// held out as the test split.
    #[arg(long, default_value_t = 0.1)]
    pub(super) test_fraction: f64,
    /// Text: bytes per record.
    #[arg(long, default_value_t = 256)]
    pub(super) seq_len: usize,
    #[arg(long)]
    pub(super) json: bool,
}

pub(super) fn run(command: DataCommand) -> Result<ExitCode> {
    match command {
        DataCommand::Import(a) => data_import(a),
        DataCommand::Inspect {
            dir,
            dataset,
            plot,
            json,
        } => data_inspect(&dir, dataset.as_deref(), plot.as_deref(), json),
    }
}

fn data_import(a: ImportArgs) -> Result<ExitCode> {
    if !(0.0..1.0).contains(&a.test_fraction) {
        bail!("--test-fraction must be in [0, 1)");
    }
    let report = meshtrain_node::data::import(&meshtrain_node::data::ImportOptions {
        format: a.format,
        sources: a.sources,
        out: a.out,
        block_size: a.block_size,
        name: a.name,
        label_column: a.label_column,
        sort_by_label: a.sort_by_label,
        test_fraction: a.test_fraction,
        seq_len: a.seq_len,
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "imported {} as dataset {}: {} records in {} blocks ({:.1} MB) in {:.2} s ({:.1} MB/s of source); manifest {}",
            report.name,
            report.dataset_id,
            report.records.iter().map(|(s, n)| format!("{n} {s}")).collect::<Vec<_>>().join(" + "),
            report.blocks,
            report.bytes as f64 / 1e6,
            report.seconds,
            report.mb_per_s,
            report.manifest.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn data_inspect(dir: &Path, dataset: Option<&str>, plot: Option<&Path>, json: bool) -> Result<ExitCode> {
    let r = meshtrain_node::data::inspect(dir, dataset)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("dataset {} ({}): {}", r.name, r.dataset_id, r.schema);
        println!("blocks checked: {}, bad: {}", r.blocks_checked, r.bad_blocks.len());
        for b in &r.bad_blocks {
            println!("  BAD BLOCK {b}");
        }
        for (split, n) in &r.records {
            println!(
                "{split}: {n} records, class balance {:?}",
                r.class_balance.get(split).cloned().unwrap_or_default()
            );
        }
        for (c, (m, s)) in r.channel_stats.iter().enumerate() {
            println!("channel {c}: mean {m:.4}, std {s:.4}");
        }
        println!(
            "brightness histogram (per-image mean, 0..1): {:?}",
            r.brightness_histogram
        );
        println!("contrast histogram (per-image std, 0..0.5): {:?}", r.contrast_histogram);
        let (lo, mean, hi) = r.records_per_block;
        println!("records per block: min {lo}, mean {mean:.1}, max {hi}");
    }
    if let Some(path) = plot {
        use meshtrain_testnet::plot::{bars_png, Bars};
        let bins = |n: usize, top: f64| (0..n).map(|i| format!("{:.2}", top * i as f64 / n as f64)).collect();
        let mut charts = Vec::new();
        for (split, balance) in &r.class_balance {
            charts.push(Bars {
                title: format!("class balance ({split})"),
                labels: (0..balance.len()).map(|i| i.to_string()).collect(),
                values: balance.iter().map(|v| *v as f64).collect(),
            });
        }
        if r.brightness_histogram.iter().any(|v| *v > 0) {
            charts.push(Bars {
                title: "brightness: per-image mean pixel (train)".into(),
                labels: bins(r.brightness_histogram.len(), 1.0),
                values: r.brightness_histogram.iter().map(|v| *v as f64).collect(),
            });
            charts.push(Bars {
                title: "contrast: per-image pixel std (train)".into(),
                labels: bins(r.contrast_histogram.len(), 0.5),
                values: r.contrast_histogram.iter().map(|v| *v as f64).collect(),
            });
        }
        bars_png(path, &charts).map_err(|e| anyhow::anyhow!("plotting {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(if r.bad_blocks.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
