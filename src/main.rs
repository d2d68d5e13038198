//! `artifactfs` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Invoked as /sbin/mount.fuse.artifactfs by mount(8) and /etc/fstab: translate.
    let args = match artifactfs::cli::mount_helper_args(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("mount.fuse.artifactfs: {e}");
            return ExitCode::from(1);
        }
    };
    let cli = artifactfs::cli::Cli::parse_from(args);
    if !matches!(cli.command, artifactfs::cli::Cmd::Mount(_)) {
        // `artifactfs models show … | head`: end quietly when the reader goes away.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
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
