//! vcrid end to end, driven only through the CRI (the k8s-cri client): a
//! real vcrid process, a real registry on loopback, real CNI plugins on a
//! bridge of the test's own, real pod VMs.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use tests::registry as support;

use std::{collections::HashMap, io::Read as _, time::Duration};

use k8s_cri::v1 as cri;
use tests::cri::{create_started, http_get, run_pod, wait_for_log, CriEnv, Images, Runtime};
use tonic::Code;

fn pod_config(env: &CriEnv, name: &str, host_port: i32) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: env.dir.path().join("logs").join(name).display().to_string(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        port_mappings: if host_port > 0 {
            vec![cri::PortMapping {
                protocol: cri::Protocol::Tcp as i32,
                container_port: 80,
                host_port,
                host_ip: String::new(),
            }]
        } else {
            Vec::new()
        },
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        annotations: HashMap::from([(
            "io.virtcontainers.memory_mib".to_string(),
            "384".to_string(),
        )]),
        ..Default::default()
    }
}

fn container_config(image: &str, name: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: HashMap::from([("role".to_string(), name.to_string())]),
        ..Default::default()
    }
}

async fn exec(rt: &mut Runtime, id: &str, cmd: &[&str]) -> cri::ExecSyncResponse {
    rt.exec_sync(cri::ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: 60,
    })
    .await
    .expect("ExecSync")
    .into_inner()
}

async fn pod_ip(rt: &mut Runtime, pod: &str) -> String {
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: pod.into(),
        verbose: false,
    })
    .await
    .expect("PodSandboxStatus")
    .into_inner()
    .status
    .and_then(|s| s.network)
    .map(|n| n.ip)
    .expect("a pod IP")
}

async fn container_state(rt: &mut Runtime, id: &str) -> cri::ContainerStatus {
    rt.container_status(cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .expect("ContainerStatus")
    .into_inner()
    .status
    .expect("status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_serve_talk_and_leave_nothing() {
    tests::become_subreaper();
    let registry = support::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "latest").await;
    let mut env = CriEnv::new(41);
    env.start().await;
    let mut rt = env.runtime().await;
    let mut images: Images = env.images().await;

    // Version and Status.
    let v = rt
        .version(cri::VersionRequest::default())
        .await
        .expect("Version")
        .into_inner();
    assert_eq!(
        (v.runtime_name.as_str(), v.runtime_api_version.as_str()),
        ("vcrid", "v1")
    );
    let status = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .expect("Status")
        .into_inner();
    let conditions = status.status.expect("conditions").conditions;
    assert!(conditions.iter().all(|c| c.status), "{conditions:?}");

    // Images.
    let pulled = env.pull(&image).await;
    assert!(pulled.starts_with("sha256:"), "{pulled}");
    let listed = images
        .list_images(cri::ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner();
    assert!(
        listed
            .images
            .iter()
            .any(|i| i.id == pulled && i.repo_tags.contains(&image)),
        "{listed:?}"
    );

    // Pod A serves HTTP on port 80, mapped to a host port.
    let host_port = 18000 + i32::from(env.subnet_octet);
    let a_cfg = pod_config(&env, "web-a", host_port);
    let a = run_pod(&mut rt, a_cfg.clone()).await;
    // The same name again is reserved.
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(a_cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("duplicate name");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains(&a), "{}", err.message());

    let a_ip = pod_ip(&mut rt, &a).await;
    assert!(
        a_ip.starts_with(&format!("10.211.{}.", env.subnet_octet)),
        "{a_ip}"
    );
    let web = Box::pin(create_started(
        &mut rt,
        &a,
        &a_cfg,
        container_config(&image, "httpd", &["/bin/sh", "-c", "mkdir -p /www && echo hello-from-a > /www/index.html && echo serving && exec httpd -f -p 80 -h /www"]),
    ))
    .await;
    let log = env.dir.path().join("logs/web-a/httpd/0.log");
    let text = wait_for_log(&log, "serving").await;
    assert!(text.contains(" stdout F serving"), "{text}");
    let running = container_state(&mut rt, &web).await;
    assert_eq!(running.state, cri::ContainerState::ContainerRunning as i32);
    assert!(running.started_at > running.created_at && running.created_at > 0);
    assert_eq!(running.image_ref, pulled);
    assert_eq!(running.log_path, log.display().to_string());

    // The host reaches the pod by its IP, and through the hostPort mapping.
    assert!(http_get(&format!("{a_ip}:80")).contains("hello-from-a"));
    assert!(http_get(&format!("{}:{host_port}", env.gateway())).contains("hello-from-a"));

    // The pod's own files: hostname, hosts, resolv.conf from the DNS config.
    let out = exec(
        &mut rt,
        &web,
        &["cat", "/etc/hostname", "/etc/resolv.conf", "/etc/hosts"],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert!(text.starts_with("web-a\n"), "{text}");
    assert!(
        text.contains("nameserver 10.96.0.10\nsearch default.svc.cluster.local\noptions ndots:5"),
        "{text}"
    );
    assert!(text.contains(&format!("{a_ip}\tweb-a")), "{text}");
    let out = exec(&mut rt, &web, &["sh", "-c", "echo oops >&2; exit 3"]).await;
    assert_eq!(
        (out.exit_code, out.stderr.as_slice()),
        (3, b"oops\n".as_slice())
    );

    // The pod reaches the host: a listener on the bridge's address.
    let listener = std::net::TcpListener::bind(format!("{}:0", env.gateway())).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let accept = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut got = String::new();
        s.read_to_string(&mut got).ok();
        got
    });
    let out = exec(
        &mut rt,
        &web,
        &[
            "sh",
            "-c",
            &format!("echo from-pod | nc {} {port}", env.gateway()),
        ],
    )
    .await;
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(accept.join().expect("join").trim(), "from-pod");

    // Pod B reaches pod A.
    let b_cfg = pod_config(&env, "client-b", 0);
    let b = run_pod(&mut rt, b_cfg.clone()).await;
    let client = Box::pin(create_started(
        &mut rt,
        &b,
        &b_cfg,
        container_config(&image, "client", &["sleep", "3600"]),
    ))
    .await;
    let out = exec(
        &mut rt,
        &client,
        &["wget", "-q", "-O", "-", &format!("http://{a_ip}/")],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello-from-a",
        "{out:?}"
    );

    // Lists and filters.
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                label_selector: HashMap::from([("app".to_string(), "client-b".to_string())]),
                ..Default::default()
            }),
        })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert_eq!(
        pods.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        [b.as_str()]
    );
    let in_a = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: a.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    assert_eq!(
        in_a.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        [web.as_str()]
    );

    // Stats: the container's cgroup, and the pod's VM as the host sees it.
    let stats = rt
        .container_stats(cri::ContainerStatsRequest {
            container_id: web.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("stats");
    assert!(
        stats
            .memory
            .and_then(|m| m.usage_bytes)
            .map(|u| u.value)
            .unwrap_or(0)
            > 0
    );
    let pod_stats = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: a.clone(),
        })
        .await
        .expect("PodSandboxStats")
        .into_inner()
        .stats
        .and_then(|s| s.linux)
        .expect("linux stats");
    let vm_rss = pod_stats
        .memory
        .and_then(|m| m.rss_bytes)
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(
        vm_rss > 50 << 20,
        "the VM's own memory is counted: {vm_rss}"
    );
    assert_eq!(pod_stats.containers.len(), 1);
    // Pod A served HTTP above: its eth0 counted the traffic both ways.
    let eth0 = pod_stats
        .network
        .and_then(|n| n.default_interface)
        .expect("the pod's default interface");
    assert_eq!(eth0.name, "eth0");
    let bytes = |v: Option<cri::UInt64Value>| v.map(|v| v.value).unwrap_or(0);
    assert!(
        bytes(eth0.rx_bytes) > 0 && bytes(eth0.tx_bytes) > 0,
        "{eth0:?}"
    );

    // Events: stopping a container is seen on the stream.
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .expect("GetContainerEvents")
        .into_inner();
    rt.stop_container(cri::StopContainerRequest {
        container_id: client.clone(),
        timeout: 1,
    })
    .await
    .expect("StopContainer");
    let event = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let e = events.message().await.expect("event").expect("stream open");
            if e.container_id == client
                && e.container_event_type == cri::ContainerEventType::ContainerStoppedEvent as i32
            {
                return e;
            }
        }
    })
    .await
    .expect("a STOPPED event");
    assert_eq!(event.pod_sandbox_status.map(|p| p.id), Some(b.clone()));
    let exited = container_state(&mut rt, &client).await;
    assert_eq!(exited.state, cri::ContainerState::ContainerExited as i32);
    assert!(matches!(exited.exit_code, 137 | 143), "{exited:?}");
    assert!(exited.finished_at >= exited.started_at);

    // Teardown through the CRI, twice (idempotent), then nothing is left.
    for pod in [&a, &b] {
        for _ in 0..2 {
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.to_string(),
            })
            .await
            .expect("StopPodSandbox");
        }
        let st = rt
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.to_string(),
                verbose: false,
            })
            .await
            .expect("status")
            .into_inner()
            .status
            .expect("status");
        assert_eq!(st.state, cri::PodSandboxState::SandboxNotready as i32);
        for _ in 0..2 {
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.to_string(),
            })
            .await
            .expect("RemovePodSandbox");
        }
    }
    let err = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: web.clone(),
            verbose: false,
        })
        .await
        .expect_err("removed with its pod");
    assert_eq!(err.code(), Code::NotFound);
    images
        .remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: pulled.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("RemoveImage");
    let gone = images
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: pulled,
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    assert!(gone.image.is_none());
    env.assert_no_pods_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_codes() {
    let mut env = CriEnv::new(42);
    env.start().await;
    let mut rt = env.runtime().await;
    let mut images = env.images().await;
    let good = pod_config(&env, "bad", 0);

    let check = |r: Result<tonic::Response<cri::RunPodSandboxResponse>, tonic::Status>,
                 code: Code,
                 field: &str| {
        let err = r.expect_err(field);
        assert_eq!(err.code(), code, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    };
    check(
        rt.run_pod_sandbox(cri::RunPodSandboxRequest::default())
            .await,
        Code::InvalidArgument,
        "config",
    );
    let mut c = good.clone();
    c.metadata.as_mut().unwrap().name.clear();
    check(
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(c),
            runtime_handler: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "config.metadata.name",
    );
    let mut c = good.clone();
    c.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    check(
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(c),
            runtime_handler: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "namespace_options.network",
    );
    check(
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(good.clone()),
            runtime_handler: "runc".into(),
        })
        .await,
        Code::InvalidArgument,
        "runtime_handler",
    );
    let mut c = good.clone();
    c.annotations
        .insert("io.virtcontainers.vcpus".into(), "2".into());
    check(
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(c),
            runtime_handler: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "io.virtcontainers.vcpus",
    );
    // Nothing of those failed calls holds the name.
    assert!(rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items
        .is_empty());

    // Unknown IDs.
    let err = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: "feedbeef".into(),
            verbose: false,
        })
        .await
        .expect_err("unknown pod");
    assert_eq!(err.code(), Code::NotFound);
    let err = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: "feedbeef".into(),
            verbose: false,
        })
        .await
        .expect_err("unknown container");
    assert_eq!(err.code(), Code::NotFound);
    let err = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: "feedbeef".into(),
            config: Some(container_config("busybox", "c", &["true"])),
            sandbox_config: None,
        })
        .await
        .expect_err("unknown pod");
    assert_eq!(err.code(), Code::NotFound);
    let err = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: String::new(),
            cmd: vec!["true".into()],
            timeout: 0,
        })
        .await
        .expect_err("no id");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("container_id"), "{}", err.message());
    // Idempotent removals.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: "feedbeef".into(),
    })
    .await
    .expect("stop unknown pod");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: "feedbeef".into(),
    })
    .await
    .expect("remove unknown pod");
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: "feedbeef".into(),
    })
    .await
    .expect("remove unknown container");
    let err = rt
        .checkpoint_container(cri::CheckpointContainerRequest::default())
        .await
        .expect_err("checkpoint");
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(
        err.message().contains("CheckpointContainer"),
        "{}",
        err.message()
    );

    // Images.
    let err = images
        .pull_image(cri::PullImageRequest::default())
        .await
        .expect_err("no image");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("image.image"), "{}", err.message());
    let absent = images
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: "127.0.0.1:1/none:latest".into(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .expect("ImageStatus of an absent image")
        .into_inner();
    assert!(absent.image.is_none());
    images
        .remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: "127.0.0.1:1/none:latest".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("RemoveImage of an absent image");
    env.assert_no_pods_left();
}
