//! PortForward: a connection to a TCP port on the pod's localhost, made by
//! the guest agent (so ports bound only to the guest's loopback are
//! reachable, as in a runc pod's network namespace).

use hypervisor::VsockChannel;

use crate::{
    agent::ForwardedStream,
    sandbox::{check_id, Runtime},
    state::SandboxState,
    Error, Result,
};

impl Runtime {
    /// Whether the sandbox's ports can be forwarded now: it runs, and its
    /// VM's agent channel has a forwarder (a virtio-serial one has not).
    /// For callers that hand out a forwarding URL before anyone connects.
    pub async fn can_port_forward(&self, sandbox_id: &str) -> Result<()> {
        self.forward_channel(sandbox_id).await.map(|_| ())
    }

    pub async fn port_forward(&self, sandbox_id: &str, port: u16) -> Result<ForwardedStream> {
        if port == 0 {
            return Err(Error::InvalidNetwork {
                detail: "port 0 cannot be forwarded to".into(),
            });
        }
        let (channel, secret) = self.forward_channel(sandbox_id).await?;
        self.inner
            .dialer
            .dial_port_forward(&channel, secret.as_ref(), port)
            .await
            .map_err(|e| Error::Agent {
                id: sandbox_id.into(),
                call: "port forward",
                detail: e.to_string(),
            })
    }

    /// The channel (and secret) a forwarded connection is dialled on. The
    /// lock only to read the VM: a forwarded connection lives long.
    async fn forward_channel(
        &self,
        sandbox_id: &str,
    ) -> Result<(VsockChannel, Option<agent::AgentSecret>)> {
        check_id(sandbox_id)?;
        let s = self.locked(sandbox_id).await?;
        if !matches!(s.record.state, SandboxState::Ready | SandboxState::Running) {
            return Err(Error::WrongState {
                id: sandbox_id.into(),
                action: "forward a port of",
                state: s.record.state,
                hint: "",
            });
        }
        let vm = s.vm()?;
        let channel = vm.vsock().ok_or_else(|| Error::Agent {
            id: sandbox_id.into(),
            call: "port forward",
            detail: "the VM has no vsock channel".into(),
        })?;
        if matches!(channel, VsockChannel::Serial { .. }) {
            return Err(Error::NotSupported {
                id: sandbox_id.into(),
                what: "port forwarding",
                why: "its VM's agent channel is a virtio-serial port (hypervisor.vsock = \"serial\"), which carries the agent's API only",
            });
        }
        let secret = crate::agent::agent_secret(vm.as_ref());
        Ok((channel, secret))
    }
}
