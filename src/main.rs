//! `mailpod-operator`: one binary for the operator, the in-pod agent, snapshot/restore jobs and offline tools.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mailpod-operator",
    version,
    about = "Kubernetes operator for highly-available mail service (MailPod, StorageLUN, SiteFailover)",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (MailPod, StorageLUN, SiteFailover) as multi-document YAML.
    Crds,
    /// Run as PID 1 of a mail pod: render, supervise and hot-reload Postfix/Dovecot for one role.
    Agent(Box<mailpod_operator::agent::AgentArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => {
            print!("{}", mailpod_operator::crd::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Agent(args) => mailpod_operator::agent::main(*args),
    }
}
