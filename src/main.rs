//! `artifactfs` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = artifactfs::cli::Cli::parse();
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(artifactfs::cli::default_log_filter(&cli)),
    )
    .init();
    match artifactfs::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("artifactfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}
