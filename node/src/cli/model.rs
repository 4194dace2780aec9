//! `meshtrain model export`: a node's final model, for PyTorch.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use meshtrain_ledger::Ledger;
use meshtrain_node::RunSpec;

#[derive(Subcommand)]
pub(super) enum ModelCommand {
    /// Write the anchor a node ended its run on as safetensors, with the
    /// parameter names and shapes PyTorch uses (load it into the original
    /// module with `load_state_dict`).
    Export {
        /// The node's directory (its ledger and final-anchor.safetensors).
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn run(cmd: ModelCommand) -> Result<ExitCode> {
    let ModelCommand::Export { dir, out, json } = cmd;
    let ledger_dir = dir.join("ledger");
    let spec = {
        let ledger = Ledger::open_read_only(&ledger_dir)
            .with_context(|| format!("{} is not a node's directory (no ledger)", dir.display()))?;
        RunSpec::from_canonical(&ledger.meta().run_spec)?
    };
    let done = meshtrain_node::export::export(&dir, &out, &spec)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        println!(
            "wrote {}: {} tensors, {} values of {} (anchor {}, run {}, after round {})",
            done.out.display(),
            done.tensors,
            done.values,
            done.model,
            &done.anchor[..16],
            &done.run_id[..16],
            done.round
        );
    }
    Ok(ExitCode::SUCCESS)
}
