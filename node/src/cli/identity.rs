//! `meshtrain identity`: a node's key, as a permissioned run's roster names it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use meshtrain_node::identity::Identity;

#[derive(Subcommand)]
pub(super) enum IdentityCommand {
    /// Print the node's author key (64 hex digits) and peer id, creating the
    /// key in DIR if there is none yet.
    Show {
        /// The node's data dir (where `node run --data-dir` keeps its key).
        dir: PathBuf,
        /// Print only the author key, for a roster file.
        #[arg(long)]
        key_only: bool,
    },
}

pub(super) fn run(cmd: IdentityCommand) -> Result<ExitCode> {
    match cmd {
        IdentityCommand::Show { dir, key_only } => {
            let id = Identity::load_or_create(&dir)?;
            if key_only {
                println!("{}", id.author.author());
            } else {
                println!("author {}", id.author.author());
                println!("peer   {}", id.keypair.public().to_peer_id());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
