//! ExecSync: run a command in a container, collect its output, bounded by
//! the request's timeout (0: none).

use std::time::Duration;

use k8s_cri::v1 as cri;

use crate::{
    error::{CriError, Result},
    server::Cri,
};

/// Output kept per stream, like containerd's limit (kubelet probes read little).
const MAX_OUTPUT: usize = 16 << 20;

impl Cri {
    pub(crate) async fn exec_sync(
        &self,
        req: cri::ExecSyncRequest,
    ) -> Result<cri::ExecSyncResponse> {
        let c = self.container_meta(&req.container_id)?;
        if req.cmd.is_empty() {
            return Err(CriError::invalid("cmd", "must not be empty"));
        }
        if req.timeout < 0 {
            return Err(CriError::invalid("timeout", "must not be negative"));
        }
        let timeout = (req.timeout > 0).then(|| Duration::from_secs(req.timeout as u64));
        let out = self
            .inner
            .runtime
            .exec_sync(&c.sandbox_id, &c.id, req.cmd, timeout)
            .await?;
        let mut stdout = out.stdout;
        let mut stderr = out.stderr;
        stdout.truncate(MAX_OUTPUT);
        stderr.truncate(MAX_OUTPUT);
        Ok(cri::ExecSyncResponse {
            stdout,
            stderr,
            exit_code: out.exit_code,
        })
    }
}
