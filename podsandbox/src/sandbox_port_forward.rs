//! PortForward: a connection to a TCP port on the pod's localhost, made by
//! the guest agent (so ports bound only to the guest's loopback are
//! reachable, as in a runc pod's network namespace).

use crate::{
    agent::ForwardedStream,
    sandbox::{check_id, Runtime},
    state::SandboxState,
    Error, Result,
};

impl Runtime {
    pub async fn port_forward(&self, sandbox_id: &str, port: u16) -> Result<ForwardedStream> {
        check_id(sandbox_id)?;
        if port == 0 {
            return Err(Error::InvalidNetwork {
                detail: "port 0 cannot be forwarded to".into(),
            });
        }
        // The lock only to read the VM: a forwarded connection lives long.
        let channel = {
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
            (channel, crate::agent::agent_secret(vm.as_ref()))
        };
        let (channel, secret) = channel;
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
}
