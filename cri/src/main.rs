//! `vcrid serve | check | --version`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "vcrid",
    version,
    about = "The virtcontainers CRI server: every pod a VM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the CRI on a unix socket until SIGTERM or SIGINT (pods keep running).
    Serve {
        /// Config file (default /etc/vcrid/config.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// unix:///path of the socket (overrides the config's `listen`).
        #[arg(long)]
        listen: Option<String>,
        /// State directory (overrides the config's `state_dir`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Run directory (overrides the config's `run_dir`).
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// Report whether this host can run pods; non-zero when something required is missing.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not in a log file or journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("vcrid: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("vcrid: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            state_dir,
            run_dir,
        } => {
            let mut config = cri::Config::load(config.as_deref())?;
            if let Some(listen) = listen {
                config.listen = listen;
                config.socket_path().map_err(anyhow::Error::msg)?;
            }
            if let Some(dir) = state_dir {
                config.state_dir = dir;
            }
            if let Some(dir) = run_dir {
                config.run_dir = dir;
            }
            let server = cri::Cri::new(config).await.context("start")?;
            cri::serve(server, shutdown_signal()).await?;
            tracing::info!("vcrid stopped; pods keep running");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let config = cri::Config::load(config.as_deref())?;
            let report = cri::check::check(&config);
            print!("{}", report.table());
            Ok(if report.ok() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers only SIGKILL stops us; serve anyway.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
