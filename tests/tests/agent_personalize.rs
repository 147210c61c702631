//! Personalize (API 8) in a real guest: a request with a bad field changes
//! nothing; a good one reseeds the RNG, sets the clock, writes the machine
//! ID and rotates the agent's secret, after which new connections need the
//! new secret while the one that personalized keeps working. Over hybrid
//! vsock (many connections) and the serial port (one at a time). `virtc`
//! makes and removes the sandbox: its connection ends with its process, so
//! the serial port is free for the test's.
//!
//! And the serial port's host replaced before the guest saw it go.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{sync::Arc, time::Duration};

use agent::AgentSecret;
use hypervisor::VsockChannel;
use podsandbox::{
    agent::{AgentClient, AgentCode, AgentDialer, Personalization},
    TtrpcDialer,
};
use tests::TestEnv;

const CHECK: Duration = Duration::from_secs(10);

/// `virtc sandbox <args>` with `config`, expected to succeed.
fn virtc(config: &std::path::Path, args: &[&str]) {
    let args: Vec<&str> = std::iter::once("sandbox")
        .chain(args.iter().copied())
        .collect();
    tests::virtc_ok(config, &args);
}

/// The VM's channel and secret, from the sandbox's record.
fn vm_access(env: &TestEnv, id: &str) -> (VsockChannel, AgentSecret) {
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.state_dir(id).join("state.json")).expect("record"),
    )
    .expect("record parses");
    let channel = serde_json::from_value(record["vm"]["vsock"].clone()).expect("the VM's channel");
    let secret = AgentSecret::from_hex(record["vm"]["agent_secret"].as_str().expect("a secret"))
        .expect("64 hex digits");
    (channel, secret)
}

/// A connection made with `secret`, checked: served by the first dial (on
/// the serial port too, right after the previous host went).
async fn served(channel: &VsockChannel, secret: &AgentSecret) -> Arc<dyn AgentClient> {
    let client = match TtrpcDialer.dial(channel, Some(secret)).await {
        Ok(client) => client,
        Err(err) => panic!("not served: {err}\n{}", console(channel)),
    };
    if let Err(err) = client.check(CHECK).await {
        panic!("dialled but not served: {err}\n{}", console(channel));
    }
    client
}

/// The guest's console log, for a serial channel (next to its socket).
fn console(channel: &VsockChannel) -> String {
    match channel {
        VsockChannel::Serial { uds } => {
            std::fs::read_to_string(uds.with_file_name("console.log")).unwrap_or_default()
        }
        _ => String::new(),
    }
}

/// A connection made with `secret` gets no answer.
async fn refused(channel: &VsockChannel, secret: &AgentSecret) {
    // Serial: the agent closes the port without its OK, so the dial fails;
    // hybrid: the dial only writes, and the first call fails.
    if let Ok(client) = TtrpcDialer.dial(channel, Some(secret)).await {
        assert!(
            client.check(CHECK).await.is_err(),
            "served with a replaced secret"
        );
    }
}

async fn personalize_and_rotate(vsock: &str, id: &str) {
    tests::become_subreaper();
    let env = TestEnv::new();
    let config = env.write_config();
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replacen(
        "[hypervisor]\n",
        &format!("[hypervisor]\nvsock = {vsock:?}\n"),
        1,
    );
    std::fs::write(&config, text).expect("config");
    virtc(&config, &["create", id]);
    let (channel, original) = vm_access(&env, id);
    let client = served(&channel, &original).await;

    // A bad field: refused by name, and nothing applied (the secret in it
    // is not taken).
    let unused = AgentSecret::generate().expect("random");
    let mut bad = Personalization::generate(unused.clone()).expect("generate");
    bad.machine_id = "not-hex".into();
    let err = client
        .personalize(&bad)
        .await
        .expect_err("a bad machine id");
    assert_eq!(err.code, Some(AgentCode::InvalidArgument), "{err}");
    assert!(err.detail.contains("machine_id"), "{err}");
    bad = Personalization::generate(unused.clone()).expect("generate");
    bad.entropy.truncate(8);
    let err = client
        .personalize(&bad)
        .await
        .expect_err("too little entropy");
    assert!(err.detail.contains("entropy"), "{err}");

    let rotated = AgentSecret::generate().expect("random");
    let p = Personalization::generate(rotated.clone()).expect("generate");
    client.personalize(&p).await.expect("personalize");
    // The connection that personalized stays authenticated.
    client
        .check(CHECK)
        .await
        .expect("the old connection still serves");
    drop(client);

    refused(&channel, &original).await;
    refused(&channel, &unused).await;
    let client = served(&channel, &rotated).await;
    client
        .guest_details(CHECK)
        .await
        .expect("details over the new secret");

    // Back to the secret the record holds, so the runtime can stop the VM.
    client
        .personalize(&Personalization::generate(original.clone()).expect("generate"))
        .await
        .expect("personalize back");
    drop(client);
    refused(&channel, &rotated).await;
    if let VsockChannel::Serial { uds } = &channel {
        // A refused dial times out either way: the agent's log says it
        // refused the line (rather than missing it).
        let log = std::fs::read_to_string(uds.with_file_name("console.log")).expect("console");
        assert!(
            log.contains("refused a serial connection without the VM's secret"),
            "{log}"
        );
    }
    virtc(&config, &["stop", id]);
    virtc(&config, &["delete", id]);
    env.assert_nothing_left(id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personalize_rotates_the_secret_over_hybrid_vsock() {
    personalize_and_rotate("hybrid", "pz-hybrid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personalize_rotates_the_secret_over_the_serial_port() {
    personalize_and_rotate("serial", "pz-serial").await;
}

/// A serial host can be replaced before the guest saw the old one go (here
/// both happen while the VM is paused): the new host's auth line then
/// arrives on the old connection, which ends and hands the line over to the
/// listener. The first dial is served (it used to wait for its handshake
/// to time out while the old connection read its line as a frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_host_replaced_unseen_is_served_at_once() {
    tests::become_subreaper();
    let env = TestEnv::new();
    let id = "pz-replaced";
    let config = env.write_config();
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replacen("[hypervisor]\n", "[hypervisor]\nvsock = \"serial\"\n", 1);
    std::fs::write(&config, text).expect("config");
    virtc(&config, &["create", id]);
    virtc(&config, &["start", id]);
    let (channel, secret) = vm_access(&env, id);
    let client = served(&channel, &secret).await;

    virtc(&config, &["pause", id]);
    drop(client);
    let dial = {
        let (channel, secret) = (channel.clone(), secret.clone());
        tokio::spawn(async move { TtrpcDialer.dial(&channel, Some(&secret)).await })
    };
    // The new host's line waits in QEMU while the guest is paused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    virtc(&config, &["resume", id]);
    let client = match dial.await.expect("join") {
        Ok(client) => client,
        Err(err) => panic!("the first dial after the host was replaced: {err}"),
    };
    client
        .guest_details(CHECK)
        .await
        .expect("the new host is served");
    let VsockChannel::Serial { uds } = &channel else {
        panic!("not a serial channel: {channel:?}");
    };
    let log = std::fs::read_to_string(uds.with_file_name("console.log")).expect("console");
    assert!(
        log.contains("a new host connected before the old one was seen to go"),
        "the guest did not see the old connection replaced: {log}"
    );
    drop(client);
    virtc(&config, &["stop", id]);
    virtc(&config, &["delete", id]);
    env.assert_nothing_left(id);
}
