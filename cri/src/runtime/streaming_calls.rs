//! Exec, Attach and PortForward answer with a URL of the streaming server,
//! where the client then upgrades to SPDY or WebSocket.

use k8s_cri::v1 as cri;

use crate::{
    error::{CriError, Result},
    server::Cri,
};

impl Cri {
    pub(crate) async fn exec_url(&self, req: cri::ExecRequest) -> Result<cri::ExecResponse> {
        let _c = self.container_meta(&req.container_id)?;
        Err(CriError::Unimplemented(
            "Exec: the streaming server is not wired yet".into(),
        ))
    }

    pub(crate) async fn attach_url(&self, req: cri::AttachRequest) -> Result<cri::AttachResponse> {
        let _c = self.container_meta(&req.container_id)?;
        Err(CriError::Unimplemented(
            "Attach: the streaming server is not wired yet".into(),
        ))
    }

    pub(crate) async fn port_forward_url(
        &self,
        req: cri::PortForwardRequest,
    ) -> Result<cri::PortForwardResponse> {
        let _ = req;
        Err(CriError::Unimplemented(
            "PortForward: the streaming server is not wired yet".into(),
        ))
    }
}
