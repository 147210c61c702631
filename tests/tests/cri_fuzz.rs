//! Every CRI RPC of a real vcrid fed ~10,000 mutated and random requests:
//! realistic requests encoded with prost, then bits flipped, bytes cut,
//! inserted, duplicated, random fields (any field number and wire type,
//! lengths that lie) appended or spliced in — sent raw over gRPC.
//!
//! vcrid must stay up and answer every one with OK or a proper gRPC code —
//! never a dropped connection, a panic or Internal (other than the protobuf
//! decode error gRPC itself prescribes INTERNAL for). The counts per RPC and
//! code are printed, and each RPC must have had requests that got past
//! decoding, so the test cannot pass by fuzzing nothing.
//!
//! No VM may boot and nothing may leave the machine: the CNI dir is empty
//! (a RunPodSandbox that passes validation fails at the network step, after
//! its netns was made and removed), docker.io's only endpoint is a closed
//! loopback port, vcrid's HTTP goes through a proxy on a closed loopback
//! port, and a PullImage naming any other registry is not sent.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use bytes::Bytes;
use cri::grpc_authority::fake::BytesCodec;
use k8s_cri::v1 as cri_api;
use prost::Message;
use tests::cri::CriEnv;
use tests::fuzz::{mutate, mutate_structure, random_message, Rng};
use tonic::{codegen::http::uri::PathAndQuery, Code};

const SEED: u64 = 0x5eed_0079;
const PER_RPC: usize = 300;
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// A closed loopback port: every registry and proxy connection is refused.
const NOWHERE: &str = "http://127.0.0.1:1";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Unary,
    ServerStreaming,
}

struct Rpc {
    path: &'static str,
    kind: Kind,
    seeds: Vec<Vec<u8>>,
}

fn id(c: char) -> String {
    std::iter::repeat_n(c, 64).collect()
}

fn resources() -> cri_api::LinuxContainerResources {
    cri_api::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 50_000,
        cpu_shares: 512,
        memory_limit_in_bytes: 256 << 20,
        oom_score_adj: 100,
        cpuset_cpus: "0-1".into(),
        cpuset_mems: "0".into(),
        unified: HashMap::from([("memory.high".to_string(), "200000000".to_string())]),
        ..Default::default()
    }
}

fn pod_config(env: &CriEnv) -> cri_api::PodSandboxConfig {
    let mut c = tests::cri::pod_config(env, "fuzzpod", "fuzz");
    c.dns_config = Some(cri_api::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["fuzz.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    c.port_mappings = vec![cri_api::PortMapping {
        protocol: cri_api::Protocol::Tcp as i32,
        container_port: 80,
        host_port: 8080,
        host_ip: "127.0.0.1".into(),
    }];
    c.labels = HashMap::from([("app".to_string(), "fuzz".to_string())]);
    c.annotations = HashMap::from([(
        "io.virtcontainers.memory_mib".to_string(),
        "384".to_string(),
    )]);
    c.linux = Some(cri_api::LinuxPodSandboxConfig {
        cgroup_parent: env.cgroup_parent("fuzzpod"),
        sysctls: HashMap::from([("net.ipv4.ip_forward".to_string(), "1".to_string())]),
        security_context: Some(cri_api::LinuxSandboxSecurityContext {
            namespace_options: Some(cri_api::NamespaceOption::default()),
            ..Default::default()
        }),
        resources: Some(resources()),
        ..Default::default()
    });
    c
}

fn container_config() -> cri_api::ContainerConfig {
    let mut c = tests::cri::container_config(
        "127.0.0.1:1/busybox:fuzz",
        "fuzzctr",
        &["/bin/sh", "-c", "echo hi"],
    );
    c.args = vec!["--flag".into()];
    c.working_dir = "/work".into();
    c.envs = vec![cri_api::KeyValue {
        key: "A".into(),
        value: "b".into(),
    }];
    c.mounts = vec![cri_api::Mount {
        container_path: "/data".into(),
        host_path: "/tmp".into(),
        readonly: true,
        ..Default::default()
    }];
    c.devices = vec![cri_api::Device {
        container_path: "/dev/fuse".into(),
        host_path: "/dev/fuse".into(),
        permissions: "rwm".into(),
    }];
    c.labels = HashMap::from([("app".to_string(), "fuzz".to_string())]);
    c.linux = Some(cri_api::LinuxContainerConfig {
        resources: Some(resources()),
        security_context: Some(cri_api::LinuxContainerSecurityContext {
            capabilities: Some(cri_api::Capability {
                add_capabilities: vec!["NET_ADMIN".into()],
                drop_capabilities: vec!["ALL".into()],
                ..Default::default()
            }),
            run_as_user: Some(cri_api::Int64Value { value: 1000 }),
            readonly_rootfs: true,
            no_new_privs: true,
            masked_paths: vec!["/proc/kcore".into()],
            ..Default::default()
        }),
    });
    c
}

fn image(name: &str) -> Option<cri_api::ImageSpec> {
    Some(cri_api::ImageSpec {
        image: name.into(),
        annotations: HashMap::from([("a".to_string(), "b".to_string())]),
        ..Default::default()
    })
}

fn enc<M: Message>(m: M) -> Vec<u8> {
    m.encode_to_vec()
}

/// Every RuntimeService and ImageService RPC with realistic requests.
fn rpcs(env: &CriEnv) -> Vec<Rpc> {
    use Kind::{ServerStreaming, Unary};
    let ctr = id('c');
    let pod = id('p');
    let u = |path, seeds| Rpc {
        path,
        kind: Unary,
        seeds,
    };
    let rs = "/runtime.v1.RuntimeService/";
    let is = "/runtime.v1.ImageService/";
    let p = |prefix: &str, name: &str| -> &'static str {
        Box::leak(format!("{prefix}{name}").into_boxed_str())
    };
    let container_filter = cri_api::ContainerFilter {
        id: ctr.clone(),
        state: Some(cri_api::ContainerStateValue { state: 1 }),
        pod_sandbox_id: pod.clone(),
        label_selector: HashMap::from([("app".to_string(), "fuzz".to_string())]),
    };
    vec![
        u(
            p(rs, "Version"),
            vec![enc(cri_api::VersionRequest {
                version: "v1".into(),
            })],
        ),
        u(
            p(rs, "RunPodSandbox"),
            vec![
                enc(cri_api::RunPodSandboxRequest {
                    config: Some(pod_config(env)),
                    runtime_handler: String::new(),
                }),
                enc(cri_api::RunPodSandboxRequest {
                    config: Some(tests::cri::pod_config(env, "plain", "fuzz")),
                    runtime_handler: "virtcontainers".into(),
                }),
            ],
        ),
        u(
            p(rs, "StopPodSandbox"),
            vec![enc(cri_api::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })],
        ),
        u(
            p(rs, "RemovePodSandbox"),
            vec![enc(cri_api::RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })],
        ),
        u(
            p(rs, "PodSandboxStatus"),
            vec![enc(cri_api::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: true,
            })],
        ),
        u(
            p(rs, "ListPodSandbox"),
            vec![enc(cri_api::ListPodSandboxRequest {
                filter: Some(cri_api::PodSandboxFilter {
                    id: pod[..12].into(),
                    state: Some(cri_api::PodSandboxStateValue { state: 0 }),
                    label_selector: HashMap::from([("app".to_string(), "fuzz".to_string())]),
                }),
            })],
        ),
        u(
            p(rs, "CreateContainer"),
            vec![enc(cri_api::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config()),
                sandbox_config: Some(pod_config(env)),
            })],
        ),
        u(
            p(rs, "StartContainer"),
            vec![enc(cri_api::StartContainerRequest {
                container_id: ctr.clone(),
            })],
        ),
        u(
            p(rs, "StopContainer"),
            vec![enc(cri_api::StopContainerRequest {
                container_id: ctr.clone(),
                timeout: 10,
            })],
        ),
        u(
            p(rs, "RemoveContainer"),
            vec![enc(cri_api::RemoveContainerRequest {
                container_id: ctr.clone(),
            })],
        ),
        u(
            p(rs, "ListContainers"),
            vec![enc(cri_api::ListContainersRequest {
                filter: Some(container_filter.clone()),
            })],
        ),
        u(
            p(rs, "ContainerStatus"),
            vec![enc(cri_api::ContainerStatusRequest {
                container_id: ctr.clone(),
                verbose: true,
            })],
        ),
        u(
            p(rs, "UpdateContainerResources"),
            vec![enc(cri_api::UpdateContainerResourcesRequest {
                container_id: ctr.clone(),
                linux: Some(resources()),
                ..Default::default()
            })],
        ),
        u(
            p(rs, "ReopenContainerLog"),
            vec![enc(cri_api::ReopenContainerLogRequest {
                container_id: ctr.clone(),
            })],
        ),
        u(
            p(rs, "ExecSync"),
            vec![enc(cri_api::ExecSyncRequest {
                container_id: ctr.clone(),
                cmd: vec!["/bin/sh".into(), "-c".into(), "true".into()],
                timeout: 5,
            })],
        ),
        u(
            p(rs, "Exec"),
            vec![enc(cri_api::ExecRequest {
                container_id: ctr.clone(),
                cmd: vec!["/bin/sh".into()],
                tty: true,
                stdin: true,
                stdout: true,
                stderr: false,
            })],
        ),
        u(
            p(rs, "Attach"),
            vec![enc(cri_api::AttachRequest {
                container_id: ctr.clone(),
                stdin: true,
                tty: false,
                stdout: true,
                stderr: true,
            })],
        ),
        u(
            p(rs, "PortForward"),
            vec![enc(cri_api::PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: vec![80, 8080],
            })],
        ),
        u(
            p(rs, "ContainerStats"),
            vec![enc(cri_api::ContainerStatsRequest {
                container_id: ctr.clone(),
            })],
        ),
        u(
            p(rs, "ListContainerStats"),
            vec![enc(cri_api::ListContainerStatsRequest {
                filter: Some(cri_api::ContainerStatsFilter {
                    id: ctr.clone(),
                    pod_sandbox_id: pod.clone(),
                    label_selector: HashMap::from([("app".to_string(), "fuzz".to_string())]),
                }),
            })],
        ),
        u(
            p(rs, "PodSandboxStats"),
            vec![enc(cri_api::PodSandboxStatsRequest {
                pod_sandbox_id: pod.clone(),
            })],
        ),
        u(
            p(rs, "ListPodSandboxStats"),
            vec![enc(cri_api::ListPodSandboxStatsRequest {
                filter: Some(cri_api::PodSandboxStatsFilter {
                    id: pod.clone(),
                    label_selector: HashMap::from([("app".to_string(), "fuzz".to_string())]),
                }),
            })],
        ),
        u(
            p(rs, "UpdateRuntimeConfig"),
            vec![enc(cri_api::UpdateRuntimeConfigRequest {
                runtime_config: Some(cri_api::RuntimeConfig {
                    network_config: Some(cri_api::NetworkConfig {
                        pod_cidr: "10.211.79.0/24".into(),
                    }),
                }),
            })],
        ),
        u(
            p(rs, "Status"),
            vec![enc(cri_api::StatusRequest { verbose: true })],
        ),
        u(
            p(rs, "CheckpointContainer"),
            vec![enc(cri_api::CheckpointContainerRequest {
                container_id: ctr.clone(),
                location: "/tmp/checkpoint.tar".into(),
                timeout: 5,
            })],
        ),
        Rpc {
            path: p(rs, "GetContainerEvents"),
            kind: ServerStreaming,
            seeds: vec![enc(cri_api::GetEventsRequest {})],
        },
        u(
            p(rs, "ListMetricDescriptors"),
            vec![enc(cri_api::ListMetricDescriptorsRequest {})],
        ),
        u(
            p(rs, "ListPodSandboxMetrics"),
            vec![enc(cri_api::ListPodSandboxMetricsRequest {})],
        ),
        u(
            p(rs, "RuntimeConfig"),
            vec![enc(cri_api::RuntimeConfigRequest {})],
        ),
        u(
            p(is, "ListImages"),
            vec![enc(cri_api::ListImagesRequest {
                filter: Some(cri_api::ImageFilter {
                    image: image("busybox:fuzz"),
                }),
            })],
        ),
        u(
            p(is, "ImageStatus"),
            vec![enc(cri_api::ImageStatusRequest {
                image: image("127.0.0.1:1/busybox:fuzz"),
                verbose: true,
            })],
        ),
        u(
            p(is, "PullImage"),
            vec![
                enc(cri_api::PullImageRequest {
                    image: image("127.0.0.1:1/busybox:fuzz"),
                    auth: Some(cri_api::AuthConfig {
                        username: "user".into(),
                        password: "secret".into(),
                        ..Default::default()
                    }),
                    sandbox_config: Some(pod_config(env)),
                }),
                enc(cri_api::PullImageRequest {
                    image: image(&format!("busybox@sha256:{}", id('a'))),
                    auth: None,
                    sandbox_config: None,
                }),
            ],
        ),
        u(
            p(is, "RemoveImage"),
            vec![enc(cri_api::RemoveImageRequest {
                image: image("127.0.0.1:1/busybox:fuzz"),
            })],
        ),
        u(
            p(is, "ImageFsInfo"),
            vec![enc(cri_api::ImageFsInfoRequest {})],
        ),
    ]
}

/// Whether a PullImage request may be sent: it does not decode (vcrid's
/// prost fails the same way), or its reference does not parse, or it names
/// a loopback registry or docker.io (configured to a closed loopback port).
fn pull_stays_local(body: &[u8]) -> bool {
    let Ok(req) = cri_api::PullImageRequest::decode(body) else {
        return true;
    };
    let name = req.image.map(|i| i.image).unwrap_or_default();
    match imagestore::Reference::parse(&name) {
        Err(_) => true,
        Ok(r) => r.registry == "docker.io" || imagestore::is_loopback(&r.registry),
    }
}

/// What one request got back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Ok,
    /// The protobuf decode error (INTERNAL, as gRPC's status code table says).
    DecodeError,
    Code(String),
}

/// The acceptable codes of a server's answer.
const ALLOWED: &[Code] = &[
    Code::InvalidArgument,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::AlreadyExists,
    Code::Unimplemented,
    Code::OutOfRange,
    Code::Unavailable,
    Code::DeadlineExceeded,
    Code::ResourceExhausted,
];

fn judge(status: &tonic::Status) -> Result<Outcome, String> {
    // A status the server sent comes with its response headers; one the
    // client made up (a broken connection, a reset stream) has none.
    if status.metadata().get("content-type").is_none() {
        return Err(format!("no answer from the server: {status:?}"));
    }
    if status.code() == Code::Internal
        && status
            .message()
            .starts_with("failed to decode Protobuf message")
    {
        return Ok(Outcome::DecodeError);
    }
    if ALLOWED.contains(&status.code()) {
        return Ok(Outcome::Code(format!("{:?}", status.code())));
    }
    Err(format!("code {:?}: {}", status.code(), status.message()))
}

async fn send(
    channel: &tonic::transport::Channel,
    rpc: &Rpc,
    body: Vec<u8>,
) -> Result<Outcome, String> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| format!("channel not ready: {e}"))?;
    let path = PathAndQuery::from_static(rpc.path);
    let mut req = tonic::Request::new(Bytes::from(body));
    req.set_timeout(CALL_TIMEOUT);
    let call = async {
        match rpc.kind {
            Kind::Unary => grpc.unary(req, path, BytesCodec).await.map(|_| ()),
            // The event stream stays open: its start is the answer.
            Kind::ServerStreaming => grpc
                .server_streaming(req, path, BytesCodec)
                .await
                .map(|_| ()),
        }
    };
    match tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(5), call).await {
        Err(_) => Err(format!("no answer in {CALL_TIMEOUT:?}")),
        Ok(Ok(())) => Ok(Outcome::Ok),
        Ok(Err(status)) => judge(&status),
    }
}

fn pid_alive(pid: u32) -> bool {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_mutated_cri_requests_get_proper_codes() {
    tests::become_subreaper();
    let extra = format!(
        "\n[images.registries.hosts.\"docker.io\"]\nmirrors = [\"{NOWHERE}\"]\nskip_upstream = true\n"
    );
    let mut env = CriEnv::with_config(79, &extra);
    // No network config: a RunPodSandbox that passes validation stops at
    // the CNI step (FailedPrecondition) — no VM boots.
    std::fs::remove_file(env.dir.path().join("cni/10-test.conflist")).expect("rm conflist");
    env.start_with_env(&[
        ("HTTPS_PROXY", NOWHERE),
        ("https_proxy", NOWHERE),
        ("HTTP_PROXY", NOWHERE),
        ("http_proxy", NOWHERE),
        ("ALL_PROXY", NOWHERE),
        ("all_proxy", NOWHERE),
        ("NO_PROXY", ""),
        ("no_proxy", ""),
    ])
    .await;
    let pid = env.pid().expect("vcrid runs");
    let channel = tests::cri::unix_channel(&env.socket)
        .await
        .expect("connect to vcrid");
    let rpcs = rpcs(&env);
    assert_eq!(rpcs.len(), 34, "every CRI v1 RPC of k8s-cri 0.11");

    let mut rng = Rng::new(SEED);
    let mut counts: BTreeMap<&str, BTreeMap<Outcome, usize>> = BTreeMap::new();
    let mut by_outcome: BTreeMap<Outcome, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut not_sent = 0usize;
    let start = Instant::now();
    for n in 0..PER_RPC * rpcs.len() {
        let rpc = &rpcs[n % rpcs.len()];
        let seed = &rpc.seeds[rng.below(rpc.seeds.len())];
        let body = match rng.below(20) {
            0 => seed.clone(),
            1 | 2 => {
                let len = rng.below(200);
                rng.bytes(len)
            }
            3 | 4 => random_message(&mut rng),
            5..=11 => mutate(&mut rng, seed),
            _ => mutate_structure(&mut rng, seed),
        };
        if rpc.path.ends_with("/PullImage") && !pull_stays_local(&body) {
            not_sent += 1;
            continue;
        }
        match send(&channel, rpc, body.clone()).await {
            Ok(outcome) => {
                *by_outcome.entry(outcome.clone()).or_default() += 1;
                *counts
                    .entry(rpc.path)
                    .or_default()
                    .entry(outcome)
                    .or_default() += 1;
            }
            Err(why) => failures.push(format!(
                "request {n} {}: {why} (body of {} bytes, from {:02x?})",
                rpc.path,
                body.len(),
                &body[..body.len().min(48)]
            )),
        }
        if n % 1000 == 999 {
            assert!(pid_alive(pid), "vcrid died by request {n}: {}", env.log());
        }
        if failures.len() > 20 {
            break;
        }
    }
    let elapsed = start.elapsed();

    println!("{:<50} outcomes", "RPC");
    for (path, outcomes) in &counts {
        println!("{path:<50} {outcomes:?}");
    }
    println!("all: {by_outcome:?}; {not_sent} PullImage requests naming a remote registry not sent; {elapsed:?}");

    // vcrid still up and answering.
    assert!(pid_alive(pid), "vcrid died: {}", env.log());
    let mut rt = env.runtime().await;
    let v = rt
        .version(cri_api::VersionRequest::default())
        .await
        .expect("Version after the fuzzing")
        .into_inner();
    assert_eq!(v.runtime_name, ::cri::RUNTIME_NAME);
    let log = env.log();
    assert!(
        !log.contains("panicked"),
        "vcrid panicked: {}",
        log.lines()
            .filter(|l| l.contains("panicked"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        failures.is_empty(),
        "{} bad answers:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The fuzzing reached past decoding on every RPC.
    for rpc in &rpcs {
        let outcomes = counts.get(rpc.path).cloned().unwrap_or_default();
        let past_decoding: usize = outcomes
            .iter()
            .filter(|(o, _)| **o != Outcome::DecodeError)
            .map(|(_, n)| n)
            .sum();
        assert!(
            past_decoding >= PER_RPC / 10,
            "{}: only {past_decoding} requests got past decoding: {outcomes:?}",
            rpc.path
        );
    }
    // ...and into RunPodSandbox's validation (InvalidArgument) and beyond
    // it, to the network step the empty CNI dir fails.
    let run = &counts["/runtime.v1.RuntimeService/RunPodSandbox"];
    assert!(
        run.contains_key(&Outcome::Code("InvalidArgument".into())),
        "{run:?}"
    );
    assert!(
        run.contains_key(&Outcome::Code("FailedPrecondition".into())),
        "{run:?}"
    );
    assert!(!run.contains_key(&Outcome::Ok), "a pod was made: {run:?}");

    let pods = rt
        .list_pod_sandbox(cri_api::ListPodSandboxRequest { filter: None })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert!(pods.is_empty(), "pods left: {pods:?}");
    tests::cri::remove_all_pods_blocking(&env.socket);
    env.assert_no_pods_left();
}

#[test]
fn only_pulls_from_loopback_or_docker_io_are_sent() {
    let pull = |name: &str| {
        cri_api::PullImageRequest {
            image: image(name),
            ..Default::default()
        }
        .encode_to_vec()
    };
    assert!(pull_stays_local(&pull("127.0.0.1:1/busybox:fuzz")));
    assert!(pull_stays_local(&pull("localhost:5000/x")));
    assert!(pull_stays_local(&pull("busybox")));
    assert!(pull_stays_local(&pull("Not A Reference")));
    assert!(pull_stays_local(&[0xff, 0xff]));
    assert!(!pull_stays_local(&pull("127.0.0.a:1/busybox:fuzz")));
    assert!(!pull_stays_local(&pull("registry.k8s.io/pause:3.9")));
}
