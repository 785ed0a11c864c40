//! The `chorusd` binary: parse the configuration, start the node, stop it cleanly on SIGTERM
//! or ctrl-c.

use std::process::ExitCode;

use chorus_server::config::{CaCommand, Cli, Command, GenCertArgs};
use chorus_server::{node, peer_tls, tls};
use clap::Parser;
use tracing::Instrument;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::GenCert(args)) => gen_cert(args),
        Some(Command::Ca(command)) => ca(command),
        None => run(cli.run),
    }
}

fn ca(command: CaCommand) -> ExitCode {
    let (result, done) = match &command {
        CaCommand::Init { dir } => (peer_tls::ca_init(dir), format!("made a cluster CA in {}", dir.display())),
        CaCommand::Issue { dir, node_id, out } => (
            peer_tls::issue(dir, *node_id, out),
            format!("issued node {node_id}'s peer certificate into {}", out.display()),
        ),
    };
    match result {
        Ok(()) => {
            eprintln!("chorusd ca: {done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chorusd ca: {e}");
            ExitCode::FAILURE
        }
    }
}

fn gen_cert(args: GenCertArgs) -> ExitCode {
    match tls::generate_self_signed(&args.out, &args.sans) {
        Ok(fingerprint) => {
            println!("{fingerprint}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chorusd gen-cert: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: chorus_server::config::RunArgs) -> ExitCode {
    let config = match args.resolve() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("chorusd: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log).unwrap_or_else(|e| {
        eprintln!("chorusd: bad log filter {:?} ({e}); using \"info\"", config.log);
        tracing_subscriber::EnvFilter::new("info")
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("chorusd").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chorusd: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let span = tracing::info_span!("node", id = config.node_id);
    runtime.block_on(
        async move {
            let running = match node::start(config).await {
                Ok(running) => running,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("chorusd: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            let code = tokio::select! {
                _ = wait_for_shutdown_signal() => ExitCode::SUCCESS,
                _ = running.failed() => {
                    eprintln!("chorusd: the node cannot go on (a shard replica or a background task stopped); see the log. Exiting so that it restarts.");
                    ExitCode::FAILURE
                }
            };
            running.shutdown().await;
            code
        }
        .instrument(span),
    )
}

async fn wait_for_shutdown_signal() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; stop with ctrl-c");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
}
