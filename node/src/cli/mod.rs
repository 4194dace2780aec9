//! The `meshtrain` command line: clap types and one module per command.
//! Every command that needs async I/O runs on the one runtime [`runtime`]
//! builds.

mod bench;
mod data;
mod identity;

mod ledger;
mod model;
mod node;
mod sim;
mod spec;
mod testnet;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "meshtrain",
    version,
    about = "Decentralized, poisoning-robust, auditable peer-to-peer training"
)]
struct Cli {
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Run a local testnet of node processes.
    #[command(subcommand)]
    Testnet(testnet::TestnetCommand),
    /// Check, compare or export a node's ledger.
    #[command(subcommand)]
    Ledger(ledger::LedgerCommand),
    /// Write run specs.
    #[command(subcommand)]
    Spec(spec::SpecCommand),
    /// Take a node's trained model home (safetensors with PyTorch's names).
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// A node's key, as a permissioned run's roster names it.
    #[command(subcommand)]
    Identity(identity::IdentityCommand),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Import datasets into content-addressed blocks, and check them.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// The node's config file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run many simulated nodes in one process under seeded faults and
    /// check the protocol's invariants (prints the seeds that broke one).
    Sim(sim::SimArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print every `node run` setting with its default, as a config file.
    Default,
}

/// The async runtime of every command that needs one: two workers, as the
/// machines we run on have few cores and training keeps its own thread.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `node run`'s clap command.
fn node_run_command() -> clap::Command {
    let mut cli = Cli::command();
    cli.build();
    cli.find_subcommand("node")
        .and_then(|n| n.find_subcommand("run"))
        .cloned()
        .unwrap_or_else(|| clap::Command::new("run"))
}

/// Parses the command line with `node run`'s settings also read from
/// MESHTRAIN_<KEY> variables and from `--config FILE`.
fn parse_cli() -> Result<Cli> {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let run_at = argv
        .windows(2)
        .position(|w| w[0] == "node" && w[1] == "run")
        .map(|i| i + 2);
    if let Some(at) = run_at {
        let mut config = None;
        for (i, a) in argv.iter().enumerate().skip(at) {
            let a = a.to_string_lossy();
            if let Some(path) = a.strip_prefix("--config=") {
                config = Some(PathBuf::from(path));
            } else if a == "--config" {
                config = argv.get(i + 1).map(PathBuf::from);
            }
        }
        if let Some(path) = config {
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("cannot read the config {}", path.display()))?;
            let file = path.display().to_string();
            let args = meshtrain_node::config::file_args(&file, &text, &node_run_command(), |k| {
                std::env::var_os(k).is_some()
            })?;
            argv.splice(at..at, args.into_iter().map(Into::into));
        }
    }
    let cmd = Cli::command().mut_subcommand("node", |n| {
        n.mut_subcommand("run", |r| {
            r.mut_args(|a| {
                let id = a.get_id().as_str().to_string();
                if matches!(id.as_str(), "help" | "config" | "log_format") {
                    a
                } else {
                    a.env(meshtrain_node::config::env_name(&id))
                }
            })
        })
    });
    let matches = cmd.try_get_matches_from(argv).unwrap_or_else(|e| e.exit());
    Ok(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

/// Logs go to stderr, filtered by MESHTRAIN_LOG. The simulator's nodes are
/// silent unless asked: thousands of runs would drown the summary.
fn init_tracing(format: LogFormat, quiet: bool) {
    let default = if quiet {
        "off"
    } else {
        "info,libp2p_gossipsub=warn,libp2p_kad=error,libp2p_swarm=warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHTRAIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn main() -> ExitCode {
    // Exit quietly when a reader of our output goes away (`| head`),
    // instead of panicking on the failed write.
    // SAFETY: restoring the default disposition of one signal at start-up,
    // before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_tracing(cli.log_format, matches!(cli.command, Command::Sim(_)));
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_message(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, each said once: many errors
/// already print their source (`path: No space left on device`), and
/// anyhow's `{:#}` would repeat it.
fn one_message(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Node(cmd) => node::run(cmd),
        Command::Config(ConfigCommand::Default) => {
            print!("{}", meshtrain_node::config::default_toml(&node_run_command()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Testnet(cmd) => testnet::run(cmd),
        Command::Ledger(cmd) => ledger::run(cmd),
        Command::Spec(spec::SpecCommand::New(args)) => spec::spec_new(args),
        Command::Model(cmd) => model::run(cmd),
        Command::Identity(cmd) => identity::run(cmd),
        Command::Data(cmd) => data::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Sim(args) => sim::run(args),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_and_its_causes_are_each_said_once() {
        let io = std::io::Error::from_raw_os_error(28);
        let e = meshtrain_node::NodeError::Io {
            path: "/data/results.json".into(),
            source: io,
        };
        let e = anyhow::Error::new(e).context("the node stopped");
        assert_eq!(
            super::one_message(&e),
            "the node stopped: /data/results.json: No space left on device (os error 28)"
        );
    }
}
