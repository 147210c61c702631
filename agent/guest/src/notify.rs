//! Tells the host that the agent serves: a connection to the host's vsock
//! port [`agent::AGENT_READY_PORT`] carrying [`agent::READY_MESSAGE`].
//!
//! The host may not listen yet (it starts listening right after QEMU is up,
//! long before a guest gets here, but nothing guarantees it), so this retries
//! for a while; a host that never listens (kernel vsock, which polls instead)
//! costs nothing but the retries.

use std::{os::fd::AsRawFd, time::Duration};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

/// The host's context ID.
const VMADDR_CID_HOST: u32 = 2;
const RETRY: Duration = Duration::from_millis(20);
const ATTEMPTS: u32 = 1500; // 30 s

pub fn spawn() {
    let spawned = std::thread::Builder::new()
        .name("ready-notify".into())
        .spawn(|| {
            for _ in 0..ATTEMPTS {
                match notify_once() {
                    Ok(()) => {
                        tracing::debug!("told the host we are ready");
                        return;
                    }
                    Err(_) => std::thread::sleep(RETRY),
                }
            }
            tracing::debug!("no host listened for the readiness notice");
        });
    if let Err(err) = spawned {
        tracing::warn!("cannot start the readiness notifier: {err}");
    }
}

fn notify_once() -> nix::Result<()> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(
        fd.as_raw_fd(),
        &VsockAddr::new(VMADDR_CID_HOST, agent::AGENT_READY_PORT),
    )?;
    let mut sent = 0;
    while sent < agent::READY_MESSAGE.len() {
        sent += nix::unistd::write(&fd, &agent::READY_MESSAGE[sent..])?;
    }
    Ok(())
}
