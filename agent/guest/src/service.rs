//! The ttrpc services of the agent: Health and Agent.

use std::{sync::Arc, time::Duration};

use agent::protocol::{agent as pb, agent_ttrpc};
use async_trait::async_trait;
use tokio::sync::Notify;
use ttrpc::asynchronous::TtrpcContext;

use crate::{
    auth::SharedSecret,
    container::{Containers, Failure},
    network, personalize,
    startup::Startup,
};

/// One state shared by both services.
#[derive(Clone, Debug)]
pub struct AgentService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    containers: Containers,
    /// What the listeners check new connections against (Personalize).
    secret: SharedSecret,
    shutdown: Notify,
    /// Uptime when the API started serving, in ms.
    ready_ms: std::sync::OnceLock<u64>,
    /// The start-up work after serving: settled, personalized.
    startup: Startup,
}

impl AgentService {
    pub fn new(containers: Containers, secret: SharedSecret, startup: Startup) -> Self {
        Self {
            inner: Arc::new(Inner {
                containers,
                secret,
                shutdown: Notify::new(),
                ready_ms: std::sync::OnceLock::new(),
                startup,
            }),
        }
    }

    pub fn mark_ready(&self) -> anyhow::Result<()> {
        let now = uptime()?;
        let _ = self.inner.ready_ms.set(now.as_millis() as u64);
        Ok(())
    }

    pub async fn wait_shutdown(&self) {
        self.inner.shutdown.notified().await;
    }
}

/// Runs a blocking (netlink, file) job off the async workers.
async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> ttrpc::Result<T> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(internal)?
        .map_err(status)
}

fn internal(err: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INTERNAL, err.to_string()))
}

/// Container failures as ttrpc statuses: the one mapping of the agent.
fn status(failure: Failure) -> ttrpc::Error {
    let (code, msg) = match failure {
        Failure::InvalidArgument(m) => (ttrpc::Code::INVALID_ARGUMENT, m),
        Failure::NotFound(m) => (ttrpc::Code::NOT_FOUND, m),
        Failure::AlreadyExists(m) => (ttrpc::Code::ALREADY_EXISTS, m),
        Failure::FailedPrecondition(m) => (ttrpc::Code::FAILED_PRECONDITION, m),
        Failure::Internal(m) => (ttrpc::Code::INTERNAL, m),
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

#[async_trait]
impl agent_ttrpc::Health for AgentService {
    async fn check(
        &self,
        _: &TtrpcContext,
        _: pb::CheckRequest,
    ) -> ttrpc::Result<pb::CheckResponse> {
        let mut resp = pb::CheckResponse::new();
        resp.status = pb::check_response::ServingStatus::SERVING.into();
        Ok(resp)
    }

    async fn version(
        &self,
        _: &TtrpcContext,
        _: pb::VersionRequest,
    ) -> ttrpc::Result<pb::VersionResponse> {
        let mut resp = pb::VersionResponse::new();
        resp.agent_version = env!("CARGO_PKG_VERSION").to_string();
        resp.api_version = agent::API_VERSION;
        Ok(resp)
    }
}

#[async_trait]
impl agent_ttrpc::Agent for AgentService {
    async fn update_interface(
        &self,
        _: &TtrpcContext,
        r: pb::UpdateInterfaceRequest,
    ) -> ttrpc::Result<pb::Interface> {
        let want = r.interface.into_option().unwrap_or_default();
        blocking(move || network::update_interface(&want)).await
    }

    async fn update_routes(
        &self,
        _: &TtrpcContext,
        r: pb::UpdateRoutesRequest,
    ) -> ttrpc::Result<pb::Routes> {
        let routes = blocking(move || network::update_routes(&r.routes)).await?;
        let mut resp = pb::Routes::new();
        resp.routes = routes;
        Ok(resp)
    }

    async fn list_interfaces(
        &self,
        _: &TtrpcContext,
        _: pb::Empty,
    ) -> ttrpc::Result<pb::Interfaces> {
        let mut resp = pb::Interfaces::new();
        resp.interfaces = blocking(network::list_interfaces).await?;
        Ok(resp)
    }

    async fn list_routes(&self, _: &TtrpcContext, _: pb::Empty) -> ttrpc::Result<pb::Routes> {
        let mut resp = pb::Routes::new();
        resp.routes = blocking(network::list_routes).await?;
        Ok(resp)
    }

    async fn add_arp_neighbors(
        &self,
        _: &TtrpcContext,
        r: pb::AddArpNeighborsRequest,
    ) -> ttrpc::Result<pb::Empty> {
        blocking(move || network::add_neighbors(&r.neighbors)).await?;
        Ok(pb::Empty::new())
    }

    async fn set_sandbox_files(
        &self,
        _: &TtrpcContext,
        r: pb::SetSandboxFilesRequest,
    ) -> ttrpc::Result<pb::Empty> {
        blocking(move || network::set_sandbox_files(&r)).await?;
        Ok(pb::Empty::new())
    }

    async fn set_sysctls(
        &self,
        _: &TtrpcContext,
        r: pb::SetSysctlsRequest,
    ) -> ttrpc::Result<pb::Empty> {
        blocking(move || network::set_sysctls(&r.sysctls)).await?;
        Ok(pb::Empty::new())
    }

    async fn get_guest_details(
        &self,
        _: &TtrpcContext,
        _: pb::GuestDetailsRequest,
    ) -> ttrpc::Result<pb::GuestDetailsResponse> {
        self.guest_details()
    }

    async fn online_resources(
        &self,
        _: &TtrpcContext,
        r: pb::OnlineResourcesRequest,
    ) -> ttrpc::Result<pb::GuestDetailsResponse> {
        // At most 60 s: the host's own call deadline is shorter anyway.
        let timeout = Duration::from_millis(u64::from(r.timeout_ms.min(60_000)));
        blocking(move || Ok(crate::hotplug::online_resources(r.cpus, timeout))).await?;
        self.guest_details()
    }

    async fn personalize(
        &self,
        _: &TtrpcContext,
        r: pb::PersonalizeRequest,
    ) -> ttrpc::Result<pb::Empty> {
        // All of it is checked before any of it is applied.
        let identity = personalize::validate(r).map_err(status)?;
        let secret = self.inner.secret.clone();
        blocking(move || personalize::apply(identity, &secret)).await?;
        self.inner.startup.mark_personalized();
        Ok(pb::Empty::new())
    }

    async fn shutdown(
        &self,
        _: &TtrpcContext,
        _: pb::ShutdownRequest,
    ) -> ttrpc::Result<pb::ShutdownResponse> {
        self.inner.shutdown.notify_one();
        Ok(pb::ShutdownResponse::new())
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        r: pb::CreateContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let c = &self.inner.containers;
        c.create(
            &r.container_id,
            &r.oci_spec,
            &r.rootfs_shared_path,
            r.rootfs_block.as_ref(),
            crate::container::CreateOptions {
                stdin: r.stdin,
                sandbox_pidns: r.sandbox_pidns,
                sandbox_ipcns: r.sandbox_ipcns,
                all_devices: r.all_devices,
            },
        )
        .await
        .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        r: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.inner
            .containers
            .start(&r.container_id)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        r: pb::ExecProcessRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.inner
            .containers
            .exec(&r.container_id.clone(), r)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        r: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::StatsContainerResponse> {
        self.inner.containers.stats(&r.container_id).map_err(status)
    }

    async fn pause_container(
        &self,
        _: &TtrpcContext,
        r: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.inner
            .containers
            .freeze(&r.container_id, true)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn resume_container(
        &self,
        _: &TtrpcContext,
        r: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.inner
            .containers
            .freeze(&r.container_id, false)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        r: pb::SignalProcessRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.inner
            .containers
            .signal(&r.container_id, &r.exec_id, r.signal, r.all)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        r: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::WaitProcessResponse> {
        let exit = self
            .inner
            .containers
            .wait(&r.container_id, &r.exec_id)
            .await
            .map_err(status)?;
        let mut resp = pb::WaitProcessResponse::new();
        resp.exit_status = exit;
        if r.exec_id.is_empty() && self.inner.containers.oom_killed(&r.container_id) {
            resp.reason = "OOMKilled".into();
        }
        Ok(resp)
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        r: pb::RemoveContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.inner
            .containers
            .remove(&r.container_id, r.force)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        r: pb::ReadStreamRequest,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        self.read_stream(r, false).await
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        r: pb::ReadStreamRequest,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        self.read_stream(r, true).await
    }

    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        r: pb::WriteStreamRequest,
    ) -> ttrpc::Result<pb::WriteStreamResponse> {
        self.inner
            .containers
            .write_stdin(&r.container_id, &r.exec_id, &r.data)
            .await
            .map_err(status)?;
        let mut resp = pb::WriteStreamResponse::new();
        resp.len = u32::try_from(r.data.len()).unwrap_or(u32::MAX);
        Ok(resp)
    }

    async fn close_stdin(
        &self,
        _: &TtrpcContext,
        r: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.inner
            .containers
            .close_stdin(&r.container_id, &r.exec_id)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn tty_win_resize(
        &self,
        _: &TtrpcContext,
        r: pb::TtyWinResizeRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.inner
            .containers
            .resize(&r.container_id, &r.exec_id, r.rows, r.cols)
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        r: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::ListProcessesResponse> {
        let mut resp = pb::ListProcessesResponse::new();
        resp.processes = self
            .inner
            .containers
            .processes(&r.container_id)
            .map_err(status)?;
        Ok(resp)
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        r: pb::UpdateContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.inner
            .containers
            .update(&r.container_id, &r.resources)
            .map_err(status)?;
        Ok(pb::Empty::new())
    }
}

impl AgentService {
    async fn read_stream(
        &self,
        r: pb::ReadStreamRequest,
        stderr: bool,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        let max = usize::try_from(r.max_bytes).unwrap_or(usize::MAX);
        let (data, eof) = self
            .inner
            .containers
            .read(&r.container_id, &r.exec_id, stderr, max)
            .await
            .map_err(status)?;
        let mut resp = pb::ReadStreamResponse::new();
        resp.data = data;
        resp.eof = eof;
        Ok(resp)
    }

    /// What the guest looks like from inside now.
    fn guest_details(&self) -> ttrpc::Result<pb::GuestDetailsResponse> {
        let uname = nix::sys::utsname::uname().map_err(internal)?;
        let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(internal)?;
        let mut resp = pb::GuestDetailsResponse::new();
        resp.kernel_release = uname.release().to_string_lossy().into_owned();
        resp.mem_total_kib = meminfo_field(&meminfo, "MemTotal").unwrap_or(0);
        resp.mem_available_kib = meminfo_field(&meminfo, "MemAvailable").unwrap_or(0);
        resp.online_cpus = crate::hotplug::online_cpus();
        resp.agent_version = env!("CARGO_PKG_VERSION").to_string();
        resp.uptime_ms = uptime().map_err(internal)?.as_millis() as u64;
        resp.agent_ready_ms = self.inner.ready_ms.get().copied().unwrap_or(0);
        resp.machine_id = std::fs::read_to_string("/etc/machine-id")
            .map(|id| id.trim().to_string())
            .unwrap_or_default();
        resp.settled = self.inner.startup.settled();
        Ok(resp)
    }
}

/// A `Name:   1234 kB` line of /proc/meminfo, in KiB.
fn meminfo_field(meminfo: &str, name: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

pub fn uptime() -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string("/proc/uptime")?;
    let secs: f64 = text
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/uptime: {text:?}"))?;
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_parse() {
        let text = "MemTotal:         482000 kB\nMemFree:  1 kB\nMemAvailable:     450123 kB\n";
        assert_eq!(meminfo_field(text, "MemTotal"), Some(482000));
        assert_eq!(meminfo_field(text, "MemAvailable"), Some(450123));
        assert_eq!(meminfo_field(text, "Mem"), None);
        assert_eq!(meminfo_field(text, "SwapTotal"), None);
    }
}
