//! The RuntimeService: one file per RPC (or per small family of them); this
//! file only dispatches, turning every error into a gRPC status in the one
//! place that does that (`CriError` → `tonic::Status`).

pub(crate) mod container_config;
mod container_create;
mod container_exec_sync;
mod container_remove;
mod container_security;
mod container_start;
pub(crate) mod container_status;
mod container_stop;
mod container_update;
mod metrics;
mod runtime_status;
pub(crate) mod sandbox_remove;
pub(crate) mod sandbox_run;
mod sandbox_size;
pub(crate) mod sandbox_status;
mod sandbox_stop;
mod seccomp;
pub(crate) mod stats;
#[cfg(test)]
mod step_failures;
mod streaming_calls;

use k8s_cri::v1::{self as cri, runtime_service_server::RuntimeService};
use tonic::{Request, Response, Status};

pub use runtime_status::{RUNTIME_API_VERSION, RUNTIME_NAME};

use crate::server::{to_completion, Cri};

type Reply<T> = Result<Response<T>, Status>;

fn reply<T>(r: crate::error::Result<T>) -> Reply<T> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl RuntimeService for Cri {
    async fn version(&self, r: Request<cri::VersionRequest>) -> Reply<cri::VersionResponse> {
        Ok(Response::new(Cri::version(self, r.into_inner())))
    }
    async fn run_pod_sandbox(
        &self,
        r: Request<cri::RunPodSandboxRequest>,
    ) -> Reply<cri::RunPodSandboxResponse> {
        let (cri, r) = (self.clone(), r.into_inner());
        reply(to_completion(async move { Cri::run_pod_sandbox(&cri, r).await }).await)
    }
    async fn stop_pod_sandbox(
        &self,
        r: Request<cri::StopPodSandboxRequest>,
    ) -> Reply<cri::StopPodSandboxResponse> {
        let (cri, r) = (self.clone(), r.into_inner());
        reply(to_completion(async move { Cri::stop_pod_sandbox(&cri, r).await }).await)
    }
    async fn remove_pod_sandbox(
        &self,
        r: Request<cri::RemovePodSandboxRequest>,
    ) -> Reply<cri::RemovePodSandboxResponse> {
        let (cri, r) = (self.clone(), r.into_inner());
        reply(to_completion(async move { Cri::remove_pod_sandbox(&cri, r).await }).await)
    }
    async fn pod_sandbox_status(
        &self,
        r: Request<cri::PodSandboxStatusRequest>,
    ) -> Reply<cri::PodSandboxStatusResponse> {
        reply(Cri::pod_sandbox_status(self, r.into_inner()).await)
    }
    async fn list_pod_sandbox(
        &self,
        r: Request<cri::ListPodSandboxRequest>,
    ) -> Reply<cri::ListPodSandboxResponse> {
        reply(Cri::list_pod_sandbox(self, r.into_inner()).await)
    }
    async fn create_container(
        &self,
        r: Request<cri::CreateContainerRequest>,
    ) -> Reply<cri::CreateContainerResponse> {
        let (cri, r) = (self.clone(), r.into_inner());
        reply(to_completion(async move { Box::pin(Cri::create_container(&cri, r)).await }).await)
    }
    async fn start_container(
        &self,
        r: Request<cri::StartContainerRequest>,
    ) -> Reply<cri::StartContainerResponse> {
        let (cri, r) = (self.clone(), r.into_inner());
        reply(to_completion(async move { Cri::start_container(&cri, r).await }).await)
    }
    async fn stop_container(
        &self,
        r: Request<cri::StopContainerRequest>,
    ) -> Reply<cri::StopContainerResponse> {
        let (cri, r) = (self.clone(), r.into_inner());
        reply(to_completion(async move { Cri::stop_container(&cri, r).await }).await)
    }
    async fn remove_container(
        &self,
        r: Request<cri::RemoveContainerRequest>,
    ) -> Reply<cri::RemoveContainerResponse> {
        let (cri, r) = (self.clone(), r.into_inner());
        reply(to_completion(async move { Cri::remove_container(&cri, r).await }).await)
    }
    async fn list_containers(
        &self,
        r: Request<cri::ListContainersRequest>,
    ) -> Reply<cri::ListContainersResponse> {
        reply(Cri::list_containers(self, r.into_inner()).await)
    }
    async fn container_status(
        &self,
        r: Request<cri::ContainerStatusRequest>,
    ) -> Reply<cri::ContainerStatusResponse> {
        reply(Cri::container_status(self, r.into_inner()).await)
    }
    async fn update_container_resources(
        &self,
        r: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Reply<cri::UpdateContainerResourcesResponse> {
        reply(Cri::update_container_resources(self, r.into_inner()).await)
    }
    async fn reopen_container_log(
        &self,
        r: Request<cri::ReopenContainerLogRequest>,
    ) -> Reply<cri::ReopenContainerLogResponse> {
        reply(Cri::reopen_container_log(self, r.into_inner()).await)
    }
    async fn exec_sync(&self, r: Request<cri::ExecSyncRequest>) -> Reply<cri::ExecSyncResponse> {
        reply(Cri::exec_sync(self, r.into_inner()).await)
    }
    async fn exec(&self, r: Request<cri::ExecRequest>) -> Reply<cri::ExecResponse> {
        reply(Cri::exec_url(self, r.into_inner()).await)
    }
    async fn attach(&self, r: Request<cri::AttachRequest>) -> Reply<cri::AttachResponse> {
        reply(Cri::attach_url(self, r.into_inner()).await)
    }
    async fn port_forward(
        &self,
        r: Request<cri::PortForwardRequest>,
    ) -> Reply<cri::PortForwardResponse> {
        reply(Cri::port_forward_url(self, r.into_inner()).await)
    }
    async fn container_stats(
        &self,
        r: Request<cri::ContainerStatsRequest>,
    ) -> Reply<cri::ContainerStatsResponse> {
        reply(Cri::container_stats(self, r.into_inner()).await)
    }
    async fn list_container_stats(
        &self,
        r: Request<cri::ListContainerStatsRequest>,
    ) -> Reply<cri::ListContainerStatsResponse> {
        reply(Cri::list_container_stats(self, r.into_inner()).await)
    }
    async fn pod_sandbox_stats(
        &self,
        r: Request<cri::PodSandboxStatsRequest>,
    ) -> Reply<cri::PodSandboxStatsResponse> {
        reply(Cri::pod_sandbox_stats(self, r.into_inner()).await)
    }
    async fn list_pod_sandbox_stats(
        &self,
        r: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Reply<cri::ListPodSandboxStatsResponse> {
        reply(Cri::list_pod_sandbox_stats(self, r.into_inner()).await)
    }
    async fn update_runtime_config(
        &self,
        r: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Reply<cri::UpdateRuntimeConfigResponse> {
        Ok(Response::new(Cri::update_runtime_config(
            self,
            r.into_inner(),
        )))
    }
    async fn status(&self, r: Request<cri::StatusRequest>) -> Reply<cri::StatusResponse> {
        reply(Cri::status(self, r.into_inner()).await)
    }
    async fn checkpoint_container(
        &self,
        _r: Request<cri::CheckpointContainerRequest>,
    ) -> Reply<cri::CheckpointContainerResponse> {
        reply(Cri::checkpoint_container(self))
    }

    type GetContainerEventsStream = runtime_status::EventStream;

    async fn get_container_events(
        &self,
        _r: Request<cri::GetEventsRequest>,
    ) -> Reply<Self::GetContainerEventsStream> {
        Ok(Response::new(Cri::container_events(self)))
    }
    async fn list_metric_descriptors(
        &self,
        _r: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Reply<cri::ListMetricDescriptorsResponse> {
        Ok(Response::new(metrics::descriptors()))
    }
    async fn list_pod_sandbox_metrics(
        &self,
        _r: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Reply<cri::ListPodSandboxMetricsResponse> {
        Ok(Response::new(self.pod_sandbox_metrics().await))
    }
    async fn runtime_config(
        &self,
        _r: Request<cri::RuntimeConfigRequest>,
    ) -> Reply<cri::RuntimeConfigResponse> {
        Ok(Response::new(Cri::runtime_config(self)))
    }
}
