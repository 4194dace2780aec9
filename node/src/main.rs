//! `meshtrain`: run a node, a local testnet or a simulation, audit a ledger.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
