//! `vc-agent`: PID 1 of every pod VM.
//!
//! Boot order: mount the API filesystems, point stdio at the console, load the
//! kernel modules the image lists, start reaping orphans, then serve the agent
//! API with ttrpc on vsock port 1024 (or, with `vc.channel=serial`, on a
//! virtio-serial port: `serial.rs`) until asked to power off.
//!
//! Run as anything but PID 1 it refuses to touch the system (it would mount
//! over the host's /proc), so it is safe to execute by mistake on a host.
//! Run as `modprobe` (the initramfs's `/sbin/modprobe` links here) it is the
//! kernel's module loader helper instead (`modprobe.rs`). Run as `vc-exec`
//! (argv[0], by the agent itself) it enters a container for ExecProcess
//! (`exec_helper.rs`).

mod auth;
mod container;
mod container_kill;
mod exec_helper;
mod forward;
mod fw_cfg;
mod hotplug;
mod init;
mod modprobe;
mod modules;
mod modules_disk;
mod network;
mod notify;
mod personalize;
mod pidns;
mod reaper;
#[cfg(test)]
mod request_fuzz;
mod serial;
mod service;
mod startup;
mod stdio;
mod storage;

use std::{process::ExitCode, sync::Arc, time::Duration};

use agent::protocol::agent_ttrpc;

fn main() -> ExitCode {
    // Before the PID 1 check: the kernel's usermode helper is not PID 1.
    if modprobe::invoked() {
        return modprobe::main();
    }
    // ExecProcess's helper (exec_helper.rs), started by the agent.
    if exec_helper::invoked() {
        return exec_helper::main();
    }
    if matches!(std::env::args().nth(1).as_deref(), Some(pidns::HOLDER_ARG)) {
        return pidns::run_holder();
    }
    if std::process::id() != 1 {
        eprintln!("vc-agent: must run as PID 1 inside a VM (the guest image's /init)");
        return ExitCode::from(2);
    }
    if let Err(err) = init::early() {
        // Without /proc and the console there is little to report through.
        eprintln!("vc-agent: early init failed: {err:#}");
    }
    if let Err(err) = modules_disk::disable_modprobe() {
        eprintln!("vc-agent: {err:#}");
    }
    // Log to the console through a handle of our own, not fd 2: processes
    // forked by libcontainer inherit the subscriber, and their fd 2 is the
    // container's stderr, which must carry only the container's output.
    let console = std::fs::OpenOptions::new().write(true).open("/dev/console");
    let writer = tracing_subscriber::fmt::writer::BoxMakeWriter::new(match console {
        Ok(file) => {
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(file))
        }
        Err(_) => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    });
    // Lean by default (every byte crosses the emulated UART); an explicit
    // `vc.log=` is someone debugging: then uptime stamps and targets too.
    let (filter, explicit) = log_filter();
    let fmt = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(filter)
        .with_ansi(false);
    if explicit {
        fmt.with_timer(tracing_subscriber::fmt::time::uptime())
            .init();
    } else {
        fmt.without_time().with_target(false).init();
    }

    // Before any other thread exists: the read needs this thread's I/O
    // port permission, which it drops again.
    let secret = match auth::secret_from_host() {
        Ok(secret) => secret,
        Err(err) => {
            tracing::error!("no agent secret, serving nobody: {err:#}");
            init::power_off();
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            tracing::error!("cannot start the async runtime: {err}");
            init::power_off();
        }
    };
    if let Err(err) = runtime.block_on(run(secret)) {
        tracing::error!("agent failed: {err:#}");
    }
    // PID 1 must never return: that panics the kernel. Power off instead so
    // the host sees the VM exit and reads the reason from the console.
    init::power_off();
}

/// What the agent logs to the console: `vc.log=<filter>` on the kernel
/// command line (tracing's EnvFilter syntax), else the agent's own info and
/// everyone's errors. The console is an emulated UART: a chatty library
/// (libcontainer logs several lines per container and exec) costs
/// milliseconds per call. Also whether the filter was asked for.
fn log_filter() -> (tracing_subscriber::EnvFilter, bool) {
    const DEFAULT: &str = "error,vc_agent=info";
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let wanted = cmdline
        .split_whitespace()
        .find_map(|p| p.strip_prefix("vc.log="));
    match wanted.map(tracing_subscriber::EnvFilter::try_new) {
        Some(Ok(filter)) => (filter, true),
        _ => (tracing_subscriber::EnvFilter::new(DEFAULT), false),
    }
}

async fn run(secret: agent::AgentSecret) -> anyhow::Result<()> {
    let loaded = init::load_modules(init::BOOT_MODULES)?;
    tracing::debug!(loaded, "boot modules loaded");
    if let Err(err) = init::loopback_up() {
        tracing::warn!("loopback: {err:#}");
    }
    let reaper = reaper::Reaper::spawn()?;
    let (modules_done, modules_loaded) = tokio::sync::watch::channel(false);
    let storage = storage::Storage::new(modules_loaded);
    let containers = container::Containers::new(storage.clone(), reaper);

    // One cell for every listener and the service: Personalize replaces
    // the secret that connections made after it must present.
    let secret = auth::SharedSecret::new(secret);
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let serial = serial::selected(&cmdline);
    let listener = if serial {
        // No vsock: the API only, on the virtio-serial port; the host
        // learns readiness from the port's answer, not from a notice.
        let loaded = init::load_modules(init::SERIAL_MODULES)?;
        tracing::debug!(loaded, "serial modules loaded");
        serial::listen(secret.clone()).await?
    } else {
        let listener = auth::listen(agent::AGENT_VSOCK_PORT, secret.clone()).await?;
        forward::spawn(auth::listen(agent::FORWARD_VSOCK_PORT, secret.clone()).await?);
        listener
    };
    let startup = startup::Startup::new(&cmdline);
    let services = service::AgentService::new(containers.clone(), secret, startup.clone());
    let health = agent_ttrpc::create_health(Arc::new(services.clone()));
    let api = agent_ttrpc::create_agent(Arc::new(services.clone()));
    let mut server = ttrpc::asynchronous::Server::new()
        .add_listener(listener)
        .register_service(health)
        .register_service(api);
    server.start().await?;
    services.mark_ready()?;
    if serial {
        tracing::info!(port = agent::SERIAL_PORT_NAME, "vc-agent serving");
    } else {
        notify::spawn();
        tracing::info!(port = agent::AGENT_VSOCK_PORT, "vc-agent serving");
    }
    // Storage and network modules are not needed to answer the host; load
    // them off the critical path. RPCs that attach such devices (later
    // issues) must wait for this to finish.
    let modules = tokio::task::spawn_blocking(move || {
        match init::load_modules(init::LATER_MODULES) {
            Ok(n) => tracing::debug!(loaded = n, "later modules loaded"),
            Err(err) => tracing::error!("loading modules: {err:#}"),
        }
        let _ = modules_done.send(true);
        // Last: nothing on the way to a first container needs it.
        match modules_disk::mount_and_enable() {
            Ok(Some(at)) => tracing::info!(
                at = %at.display(),
                uptime_ms = service::uptime().map(|u| u.as_millis()).unwrap_or(0),
                "modules disk mounted, modprobe on"
            ),
            Ok(None) => tracing::info!("no modules disk: only the image's own modules load"),
            Err(err) => tracing::error!("modules disk: {err:#}"),
        }
    });
    // Mount the shared filesystem as soon as its module is there (a
    // template's clone: once personalized), off the first CreateContainer's
    // path (which would otherwise mount it).
    let mount_startup = startup.clone();
    let shared = tokio::spawn(async move {
        mount_startup.may_mount_shared().await;
        if let Err(err) = storage.shared().await {
            tracing::debug!("early shared filesystem mount: {err}");
        }
    });
    // A template VM must not mount it (its clones do, once personalized):
    // settled without it. Any other VM is settled once it is mounted, so
    // a warm VM's first CreateContainer does not wait for it.
    let shared = (!startup.is_template()).then_some(shared);
    // The pod's PID and IPC namespaces too (a fork and an exec), and the
    // cgroup controllers containers use (~50 ms under TCG).
    let namespaces = containers.make_namespaces_ahead();
    let controllers = tokio::task::spawn_blocking(container::enable_controllers);
    // Settled: what a template VM waits for before it is saved, and a
    // booted warm VM before it joins the pool.
    tokio::spawn(async move {
        let shared = async move {
            if let Some(shared) = shared {
                let _ = shared.await;
            }
        };
        let _ = tokio::join!(modules, namespaces, controllers, shared);
        startup.mark_settled();
        tracing::debug!(
            uptime_ms = service::uptime().map(|u| u.as_millis()).unwrap_or(0),
            "settled"
        );
    });

    services.wait_shutdown().await;
    tracing::info!("shutdown requested");
    // Let the reply to Shutdown leave before the VM goes away.
    tokio::time::sleep(Duration::from_millis(20)).await;
    server.shutdown().await.ok();
    Ok(())
}
