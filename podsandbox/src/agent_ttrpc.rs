//! [`AgentClient`] over ttrpc: the one place protocol types become domain types.

use std::{sync::Arc, time::Duration};

use agent::{
    protocol::{agent as pb, agent_ttrpc},
    ttrpc,
};
use async_trait::async_trait;
use hypervisor::VsockChannel;

use crate::{
    agent::{
        AgentClient, AgentCode, AgentDialer, AgentError, ForwardedStream, GuestDetails,
        GuestRootfs, Personalization,
    },
    container::ProcessInfo,
    container_exec::ExecConfig,
    container_log::Stream,
    network::{NetInterface, NetNeighbor, NetRoute, SandboxFiles},
};

/// Network calls run netlink round trips in the guest.
const NETWORK_CALL: Duration = Duration::from_secs(20);

/// Containers' calls block (wait, read) as long as the container runs; the
/// transport's deadline must not cut them short.
const NO_DEADLINE: Duration = Duration::from_secs(365 * 24 * 3600);
/// Container management calls (create runs the guest's OCI runtime).
const CONTAINER_CALL: Duration = Duration::from_secs(60);
/// A signal is one kill(2) in the guest: a guest that does not answer in
/// this long is hung, and a stop must not wait for it longer.
const SIGNAL_CALL: Duration = Duration::from_secs(10);
/// Personalize is a few syscalls in the guest; it is on a claim's path,
/// so a clone that does not answer in this long is not waited for.
const PERSONALIZE_CALL: Duration = Duration::from_secs(10);
/// Bytes per ReadStdout/ReadStderr round trip (the guest's pipes hold 1 MiB).
const READ_CHUNK: u32 = 1 << 20;

/// The agent's port on the VM's vsock channel.
fn endpoint(channel: &VsockChannel) -> agent::Endpoint {
    match channel {
        VsockChannel::Hybrid { uds } => agent::Endpoint::Hybrid {
            uds: uds.clone(),
            port: agent::AGENT_VSOCK_PORT,
        },
        VsockChannel::Kernel { cid } => agent::Endpoint::Vsock {
            cid: *cid,
            port: agent::AGENT_VSOCK_PORT,
        },
        VsockChannel::Serial { uds } => agent::Endpoint::Serial { uds: uds.clone() },
    }
}

/// Dials the agent port through the VM's vsock channel.
#[derive(Debug, Default, Clone, Copy)]
pub struct TtrpcDialer;

#[async_trait]
impl AgentDialer for TtrpcDialer {
    async fn dial(
        &self,
        channel: &VsockChannel,
        secret: Option<&agent::AgentSecret>,
    ) -> Result<Arc<dyn AgentClient>, AgentError> {
        let socket = agent::dial(&endpoint(channel), secret)
            .await
            .map_err(|e| AgentError::new(error_chain(&e)))?;
        let client = ttrpc::asynchronous::Client::new(socket);
        Ok(Arc::new(TtrpcAgent {
            health: agent_ttrpc::HealthClient::new(client.clone()),
            agent: agent_ttrpc::AgentClient::new(client),
        }))
    }

    async fn wait_ready(
        &self,
        channel: &VsockChannel,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        match channel {
            VsockChannel::Hybrid { uds } => {
                agent::wait_ready_hybrid(uds, timeout).await.map_err(|e| {
                    AgentError::new(format!(
                        "waiting for the agent's readiness notice: {}",
                        error_chain(&e)
                    ))
                })
            }
            // Kernel vsock has no device to upset, and the serial port's
            // answer to the auth line is the notice: the caller polls.
            VsockChannel::Kernel { .. } | VsockChannel::Serial { .. } => Ok(()),
        }
    }

    async fn dial_port_forward(
        &self,
        channel: &VsockChannel,
        secret: Option<&agent::AgentSecret>,
        port: u16,
    ) -> Result<ForwardedStream, AgentError> {
        let socket = agent::dial_forward(&endpoint(channel), secret, port)
            .await
            .map_err(|e| AgentError::new(error_chain(&e)))?;
        Ok(Box::new(socket))
    }
}

#[derive(Clone)]
struct TtrpcAgent {
    health: agent_ttrpc::HealthClient,
    agent: agent_ttrpc::AgentClient,
}

impl std::fmt::Debug for TtrpcAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TtrpcAgent")
    }
}

fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX))
}

fn rpc_error(err: ttrpc::Error) -> AgentError {
    match err {
        ttrpc::Error::RpcStatus(status) => {
            let code = match status.code() {
                ttrpc::Code::INVALID_ARGUMENT => AgentCode::InvalidArgument,
                ttrpc::Code::NOT_FOUND => AgentCode::NotFound,
                ttrpc::Code::ALREADY_EXISTS => AgentCode::AlreadyExists,
                ttrpc::Code::FAILED_PRECONDITION => AgentCode::FailedPrecondition,
                _ => AgentCode::Other,
            };
            AgentError {
                detail: status.message().to_string(),
                code: Some(code),
            }
        }
        other => AgentError::new(other.to_string()),
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[async_trait]
impl AgentClient for TtrpcAgent {
    async fn check(&self, timeout: Duration) -> Result<(), AgentError> {
        let resp = self
            .health
            .check(ctx(timeout), &pb::CheckRequest::new())
            .await
            .map_err(rpc_error)?;
        match resp.status.enum_value() {
            Ok(pb::check_response::ServingStatus::SERVING) => Ok(()),
            other => Err(AgentError::new(format!("agent is not serving: {other:?}"))),
        }
    }

    async fn guest_details(&self, timeout: Duration) -> Result<GuestDetails, AgentError> {
        let r = self
            .agent
            .get_guest_details(ctx(timeout), &pb::GuestDetailsRequest::new())
            .await
            .map_err(rpc_error)?;
        Ok(guest_details(r))
    }

    async fn online_resources(
        &self,
        cpus: u32,
        wait: Duration,
    ) -> Result<GuestDetails, AgentError> {
        let mut req = pb::OnlineResourcesRequest::new();
        req.cpus = cpus;
        req.timeout_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
        let r = self
            .agent
            .online_resources(ctx(wait + crate::sandbox::AGENT_CALL_TIMEOUT), &req)
            .await
            .map_err(rpc_error)?;
        Ok(guest_details(r))
    }

    async fn shutdown(&self, timeout: Duration) -> Result<(), AgentError> {
        self.agent
            .shutdown(ctx(timeout), &pb::ShutdownRequest::new())
            .await
            .map_err(rpc_error)
            .map(drop)
    }

    async fn create_container(
        &self,
        id: &str,
        oci_spec: &crate::oci::Spec,
        rootfs: &GuestRootfs,
        options: &crate::agent::CreateOptions,
    ) -> Result<(), AgentError> {
        let mut req = pb::CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec = serde_json::to_vec(oci_spec)
            .map_err(|e| AgentError::new(format!("cannot encode the OCI spec: {e}")))?;
        match rootfs {
            GuestRootfs::Shared(rel) => req.rootfs_shared_path = rel.clone(),
            GuestRootfs::Disk { address, fstype } => {
                let mut disk = pb::BlockRootfs::new();
                disk.scsi_target = address.target;
                disk.scsi_lun = address.lun;
                disk.fstype = fstype.clone();
                req.rootfs_block = Some(disk).into();
            }
        }
        req.stdin = options.stdin;
        req.sandbox_pidns = options.sandbox_pidns;
        req.sandbox_ipcns = options.sandbox_ipcns;
        req.all_devices = options.all_devices;
        self.agent
            .create_container(ctx(CONTAINER_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(drop)
    }

    async fn start_container(&self, id: &str) -> Result<(), AgentError> {
        let mut req = pb::ContainerRequest::new();
        req.container_id = id.into();
        self.agent
            .start_container(ctx(CONTAINER_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(drop)
    }

    async fn signal_container(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let mut req = pb::SignalProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.signal = signal;
        req.all = all;
        self.agent
            .signal_process(ctx(SIGNAL_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(drop)
    }

    async fn wait_container(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(i32, Option<String>), AgentError> {
        let mut req = pb::ContainerRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        let resp = self
            .agent
            .wait_process(ctx(NO_DEADLINE), &req)
            .await
            .map_err(rpc_error)?;
        Ok((
            resp.exit_status,
            Some(resp.reason).filter(|r| !r.is_empty()),
        ))
    }

    async fn stats_container(
        &self,
        id: &str,
    ) -> Result<crate::container::ContainerStats, AgentError> {
        let mut req = pb::ContainerRequest::new();
        req.container_id = id.into();
        let r = self
            .agent
            .stats_container(ctx(CONTAINER_CALL), &req)
            .await
            .map_err(rpc_error)?;
        Ok(crate::container::ContainerStats {
            cpu_usage_usec: r.cpu_usage_usec,
            memory_usage_bytes: r.memory_usage_bytes,
            memory_anon_bytes: r.memory_anon_bytes,
            memory_file_bytes: r.memory_file_bytes,
            memory_limit_bytes: r.memory_limit_bytes,
            pids_current: r.pids_current,
            io_read_bytes: r.io_read_bytes,
            io_write_bytes: r.io_write_bytes,
        })
    }

    async fn freeze_container(&self, id: &str, pause: bool) -> Result<(), AgentError> {
        let mut req = pb::ContainerRequest::new();
        req.container_id = id.into();
        let done = if pause {
            self.agent.pause_container(ctx(CONTAINER_CALL), &req).await
        } else {
            self.agent.resume_container(ctx(CONTAINER_CALL), &req).await
        };
        done.map_err(rpc_error).map(drop)
    }

    async fn remove_container(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let mut req = pb::RemoveContainerRequest::new();
        req.container_id = id.into();
        req.force = force;
        self.agent
            .remove_container(ctx(CONTAINER_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(drop)
    }

    async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process: &ExecConfig,
    ) -> Result<(), AgentError> {
        let mut req = pb::ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.args = process.args.clone();
        req.env = process.env.clone();
        req.cwd = process.cwd.clone().unwrap_or_default();
        req.terminal = process.tty;
        req.stdin = process.stdin;
        self.agent
            .exec_process(ctx(CONTAINER_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(drop)
    }

    async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stream: Stream,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        let mut req = pb::ReadStreamRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.max_bytes = READ_CHUNK;
        let resp = match stream {
            Stream::Stdout => self.agent.read_stdout(ctx(NO_DEADLINE), &req).await,
            Stream::Stderr => self.agent.read_stderr(ctx(NO_DEADLINE), &req).await,
        }
        .map_err(rpc_error)?;
        Ok(if resp.eof && resp.data.is_empty() {
            None
        } else {
            Some(resp.data)
        })
    }

    async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<(), AgentError> {
        // Large writes go in pieces: a ttrpc message has a size limit.
        for chunk in data.chunks(READ_CHUNK as usize) {
            let mut req = pb::WriteStreamRequest::new();
            req.container_id = id.into();
            req.exec_id = exec_id.into();
            req.data = chunk.to_vec();
            // Blocks while the process does not read: no deadline.
            self.agent
                .write_stdin(ctx(NO_DEADLINE), &req)
                .await
                .map_err(rpc_error)?;
        }
        Ok(())
    }

    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let mut req = pb::ContainerRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        self.agent
            .close_stdin(ctx(CONTAINER_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(drop)
    }

    async fn resize_terminal(
        &self,
        id: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> Result<(), AgentError> {
        let mut req = pb::TtyWinResizeRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.rows = rows.into();
        req.cols = cols.into();
        self.agent
            .tty_win_resize(ctx(CONTAINER_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(drop)
    }

    async fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>, AgentError> {
        let mut req = pb::ContainerRequest::new();
        req.container_id = id.into();
        let resp = self
            .agent
            .list_processes(ctx(CONTAINER_CALL), &req)
            .await
            .map_err(rpc_error)?;
        Ok(resp
            .processes
            .into_iter()
            .map(|p| ProcessInfo {
                pid: p.pid,
                args: p.args,
                uid: p.uid,
            })
            .collect())
    }

    async fn update_container(&self, id: &str, resources: Vec<u8>) -> Result<(), AgentError> {
        let mut req = pb::UpdateContainerRequest::new();
        req.container_id = id.into();
        req.resources = resources;
        self.agent
            .update_container(ctx(CONTAINER_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(drop)
    }

    async fn update_interface(&self, nic: &NetInterface) -> Result<NetInterface, AgentError> {
        let mut iface = pb::Interface::new();
        iface.name = nic.name.clone();
        iface.hw_addr = nic.mac.clone();
        iface.current_hw_addr = nic.current_mac.clone().unwrap_or_default();
        iface.mtu = nic.mtu;
        for ip in &nic.ips {
            let (address, len) = ip.split_once('/').unwrap_or((ip.as_str(), ""));
            let mut a = pb::IPAddress::new();
            a.address = address.to_string();
            a.prefix_len = len
                .parse()
                .map_err(|_| AgentError::new(format!("address {ip:?} has no prefix length")))?;
            iface.ip_addresses.push(a);
        }
        let mut req = pb::UpdateInterfaceRequest::new();
        req.interface = Some(iface).into();
        self.agent
            .update_interface(ctx(NETWORK_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(|i| interface_from(&i))
    }

    async fn update_routes(&self, routes: &[NetRoute]) -> Result<Vec<NetRoute>, AgentError> {
        let mut req = pb::UpdateRoutesRequest::new();
        req.routes = routes
            .iter()
            .map(|r| {
                let mut route = pb::Route::new();
                route.dest = r.dest.clone();
                route.gateway = r.gateway.clone();
                route.device = r.device.clone();
                route.source = r.source.clone();
                route
            })
            .collect();
        self.agent
            .update_routes(ctx(NETWORK_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(|r| r.routes.iter().map(route_from).collect())
    }

    async fn list_interfaces(&self) -> Result<Vec<NetInterface>, AgentError> {
        self.agent
            .list_interfaces(ctx(NETWORK_CALL), &pb::Empty::new())
            .await
            .map_err(rpc_error)
            .map(|r| r.interfaces.iter().map(interface_from).collect())
    }

    async fn list_routes(&self) -> Result<Vec<NetRoute>, AgentError> {
        self.agent
            .list_routes(ctx(NETWORK_CALL), &pb::Empty::new())
            .await
            .map_err(rpc_error)
            .map(|r| r.routes.iter().map(route_from).collect())
    }

    async fn add_neighbors(&self, neighbors: &[NetNeighbor]) -> Result<(), AgentError> {
        let mut req = pb::AddArpNeighborsRequest::new();
        req.neighbors = neighbors
            .iter()
            .map(|n| {
                let mut a = pb::ArpNeighbor::new();
                a.ip_address = n.ip.clone();
                a.hw_addr = n.mac.clone();
                a.device = n.device.clone();
                a
            })
            .collect();
        self.agent
            .add_arp_neighbors(ctx(NETWORK_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(drop)
    }

    async fn set_sandbox_files(&self, files: &SandboxFiles) -> Result<(), AgentError> {
        let mut req = pb::SetSandboxFilesRequest::new();
        req.hostname = files.hostname.clone();
        req.hosts = files.hosts.clone();
        req.resolv_conf = files.resolv_conf.clone();
        self.agent
            .set_sandbox_files(ctx(NETWORK_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(drop)
    }

    async fn set_sysctls(
        &self,
        sysctls: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), AgentError> {
        let mut req = pb::SetSysctlsRequest::new();
        req.sysctls = sysctls
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.agent
            .set_sysctls(ctx(NETWORK_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(drop)
    }

    async fn personalize(&self, p: &Personalization) -> Result<(), AgentError> {
        let mut req = pb::PersonalizeRequest::new();
        req.entropy = p.entropy.clone();
        req.realtime_ns = p.realtime_ns;
        req.machine_id = p.machine_id.clone();
        req.secret = p.secret.to_hex();
        self.agent
            .personalize(ctx(PERSONALIZE_CALL), &req)
            .await
            .map_err(rpc_error)
            .map(drop)
    }
}

fn interface_from(i: &pb::Interface) -> NetInterface {
    NetInterface {
        name: i.name.clone(),
        mac: i.hw_addr.clone(),
        mtu: i.mtu,
        ips: i
            .ip_addresses
            .iter()
            .map(|a| format!("{}/{}", a.address, a.prefix_len))
            .collect(),
        ..Default::default()
    }
}

fn route_from(r: &pb::Route) -> NetRoute {
    NetRoute {
        dest: r.dest.clone(),
        gateway: r.gateway.clone(),
        device: r.device.clone(),
        source: r.source.clone(),
    }
}

fn guest_details(r: pb::GuestDetailsResponse) -> GuestDetails {
    GuestDetails {
        kernel_release: r.kernel_release,
        mem_total_kib: r.mem_total_kib,
        mem_available_kib: r.mem_available_kib,
        online_cpus: r.online_cpus,
        agent_version: r.agent_version,
        uptime_ms: r.uptime_ms,
        agent_ready_ms: r.agent_ready_ms,
        machine_id: r.machine_id,
        settled: r.settled,
    }
}
