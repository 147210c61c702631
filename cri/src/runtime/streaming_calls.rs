//! Exec, Attach and PortForward answer with a URL of the streaming server,
//! where the client then upgrades to SPDY or WebSocket.

use k8s_cri::v1 as cri;

use crate::{
    error::{CriError, Result},
    server::Cri,
    streaming,
};

impl Cri {
    fn streaming(&self) -> Result<&streaming::Server> {
        self.inner.streaming.get().ok_or_else(|| {
            CriError::FailedPrecondition("the streaming server is not running".into())
        })
    }

    pub(crate) async fn exec_url(&self, req: cri::ExecRequest) -> Result<cri::ExecResponse> {
        let c = self.container_meta(&req.container_id)?;
        let url = self.streaming()?.get_exec(streaming::ExecRequest {
            container_id: c.id,
            cmd: req.cmd,
            tty: req.tty,
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
        })?;
        Ok(cri::ExecResponse { url })
    }

    pub(crate) async fn attach_url(&self, req: cri::AttachRequest) -> Result<cri::AttachResponse> {
        let c = self.container_meta(&req.container_id)?;
        let url = self.streaming()?.get_attach(streaming::AttachRequest {
            container_id: c.id,
            tty: req.tty,
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
        })?;
        Ok(cri::AttachResponse { url })
    }

    pub(crate) async fn port_forward_url(
        &self,
        req: cri::PortForwardRequest,
    ) -> Result<cri::PortForwardResponse> {
        let id = self.pod_id(&req.pod_sandbox_id)?;
        // Refused here, not when the client connects to the URL.
        self.inner.runtime.can_port_forward(&id).await?;
        let url = self
            .streaming()?
            .get_port_forward(streaming::PortForwardRequest {
                pod_sandbox_id: id,
                ports: req.port,
            })?;
        Ok(cri::PortForwardResponse { url })
    }
}
