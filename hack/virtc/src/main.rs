//! `virtc`: drive the podsandbox library from the command line, one process
//! per call — the sandbox's VM lives on between calls and each call finds it
//! again from the persisted state.
#![forbid(unsafe_code)]

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use podsandbox::{Runtime, RuntimeConfig, SandboxConfig, SandboxStatus};

/// `println!` that does not panic when stdout is gone (`virtc ... | head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod container;

#[derive(Debug, Parser)]
#[command(
    name = "virtc",
    version,
    about = "Pod sandboxes as VMs, one CLI call at a time"
)]
struct Cli {
    /// Runtime config (TOML); default /etc/vcrid/config.toml if present.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Overrides the config's state_dir.
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Overrides the config's run_dir.
    #[arg(long, global = true)]
    run_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sandbox lifecycle.
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// Containers in a sandbox.
    #[command(subcommand)]
    Container(container::ContainerCmd),
    /// The VM template sandboxes are cloned from (`[factory] template = true`).
    #[command(subcommand)]
    Factory(FactoryCmd),
}

#[derive(Debug, Subcommand)]
enum FactoryCmd {
    /// Boot a VM of the default size and save it as the template (any
    /// saved one is replaced); `sandbox create` then clones it.
    Init,
    /// The saved template, if any.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Remove the saved template (sandboxes cloned from it keep running).
    Destroy,
}

#[derive(Debug, Subcommand)]
enum SandboxCmd {
    /// Boot a VM and wait for its agent: state `ready`.
    Create {
        id: String,
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
        memory: Option<u32>,
    },
    /// `ready` → `running`.
    Start { id: String },
    /// `running` → `paused` (vCPUs frozen).
    Pause { id: String },
    /// `paused` → `running`.
    Resume { id: String },
    /// Shut the VM down: `stopped`.
    Stop { id: String },
    /// Remove a stopped (or ready) sandbox and everything of it.
    Delete { id: String },
    /// State, VM and guest details.
    Status {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// All sandboxes.
    List {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("virtc: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            // One line: multi-line details (console tails) are joined.
            let text = format!("{err:#}");
            let one_line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("virtc: {}", one_line.join(" | "));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    // What a helper process (a container's monitor) needs to find the same runtime.
    let mut passthrough = Vec::new();
    for (flag, value) in [
        ("--config", &cli.config),
        ("--state-dir", &cli.state_dir),
        ("--run-dir", &cli.run_dir),
    ] {
        if let Some(v) = value {
            passthrough.push(flag.to_string());
            passthrough.push(v.display().to_string());
        }
    }
    let mut config = RuntimeConfig::load(cli.config.as_deref()).map_err(chain)?;
    if let Some(dir) = cli.state_dir {
        config.state_dir = dir;
    }
    if let Some(dir) = cli.run_dir {
        config.run_dir = dir;
    }
    let rt = Runtime::new(config).map_err(chain)?;
    // One process per call: others write the state dir between our calls.
    rt.monitor_externally();
    let cmd = match cli.command {
        Command::Sandbox(cmd) => cmd,
        Command::Container(cmd) => return container::run(&rt, cmd, &passthrough).await,
        Command::Factory(cmd) => return factory(&rt, cmd).await,
    };
    match cmd {
        SandboxCmd::Create { id, vcpus, memory } => {
            let status = rt
                .create_sandbox(SandboxConfig {
                    id,
                    vcpus,
                    memory_mib: memory,
                    ..Default::default()
                })
                .await
                .map_err(chain)?;
            out!("{} {}", status.id, status.state);
        }
        SandboxCmd::Start { id } => print_state(rt.start_sandbox(&id).await.map_err(chain)?),
        SandboxCmd::Pause { id } => print_state(rt.pause_sandbox(&id).await.map_err(chain)?),
        SandboxCmd::Resume { id } => print_state(rt.resume_sandbox(&id).await.map_err(chain)?),
        SandboxCmd::Stop { id } => print_state(rt.stop_sandbox(&id).await.map_err(chain)?),
        SandboxCmd::Delete { id } => {
            rt.delete_sandbox(&id).await.map_err(chain)?;
            out!("{id} deleted");
        }
        SandboxCmd::Status { id, json } => {
            let status = rt.status_sandbox(&id).await.map_err(chain)?;
            if json {
                out!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
        SandboxCmd::List { json } => {
            let all = rt.list_sandboxes().await.map_err(chain)?;
            if json {
                out!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                out!(
                    "{:<24} {:<9} {:<6} {:<5} {:>8}",
                    "ID",
                    "STATE",
                    "ACCEL",
                    "VCPUS",
                    "MEM MiB"
                );
                for s in all {
                    out!(
                        "{:<24} {:<9} {:<6} {:<5} {:>8}",
                        s.id,
                        s.state,
                        s.accel,
                        s.vcpus,
                        s.memory_mib
                    );
                }
            }
        }
    }
    Ok(0)
}

async fn factory(rt: &Runtime, cmd: FactoryCmd) -> anyhow::Result<u8> {
    match cmd {
        FactoryCmd::Init => {
            if !rt.config().factory.template {
                anyhow::bail!(
                    "factory.template is off in the config: sandboxes would not be cloned from a template (set [factory] template = true)"
                );
            }
            let t = rt.save_vm_template().await.map_err(chain)?;
            out!("{} saved", t.id);
        }
        FactoryCmd::Status { json } => {
            let all = rt.vm_templates();
            if json {
                out!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(0);
            }
            if all.is_empty() {
                out!("no template saved (sandboxes boot, or save one when first cloned)");
            }
            for t in all {
                out!("template:   {}", t.id);
                out!("dir:        {}", t.dir.display());
                out!("size:       {} vCPU, {} MiB", t.vcpus, t.memory_mib);
                out!(
                    "files:      memory {} MiB allocated, device state {} KiB",
                    t.memory_allocated_bytes >> 20,
                    t.state_bytes >> 10
                );
            }
        }
        FactoryCmd::Destroy => {
            rt.destroy_vm_templates().await;
            out!("templates removed");
        }
    }
    Ok(0)
}

fn chain(err: podsandbox::Error) -> anyhow::Error {
    anyhow::anyhow!(err.chain())
}

fn print_state(status: SandboxStatus) {
    out!("{} {}", status.id, status.state);
}

fn print_status(s: &SandboxStatus) {
    out!("id:         {}", s.id);
    out!("state:      {}", s.state);
    out!("hypervisor: {} ({}, {})", s.hypervisor, s.machine, s.accel);
    out!("vm from:    {}", s.origin);
    out!("vcpus:      {}", s.vcpus);
    out!("memory:     {} MiB", s.memory_mib);
    if let Some(pid) = s.pid {
        out!("pid:        {pid}");
    }
    if let Some(reason) = &s.reason {
        out!("reason:     {reason}");
    }
    if let Some(g) = &s.guest {
        out!(
            "guest:      kernel {}, {} CPUs, {} KiB memory ({} available)",
            g.kernel_release,
            g.online_cpus,
            g.mem_total_kib,
            g.mem_available_kib
        );
        out!(
            "agent:      vc-agent {}, up {} ms, serving since {} ms",
            g.agent_version,
            g.uptime_ms,
            g.agent_ready_ms
        );
    }
}
