//! `virtc factory init|status|destroy`: one process saves a VM template
//! (`[factory] template = true`, the agent over virtio-serial, 9p), each
//! later `virtc sandbox create` clones it — its RAM file mapped private,
//! its device state loaded, no boot — and personalizes the clone, so two
//! sandboxes are two machines. Removing the template leaves its clones
//! running; nothing is left at the end.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use serde_json::Value;
use tests::TestEnv;

struct Virtc {
    config: std::path::PathBuf,
}

impl Virtc {
    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        tests::virtc_ok(&self.config, args)
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("JSON")
    }
}

#[test]
fn virtc_saves_a_template_and_clones_each_sandbox_from_it() {
    tests::become_subreaper();
    let env = TestEnv::new();
    let config = env.write_config();
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replacen(
        "[hypervisor]\n",
        "[hypervisor]\nvsock = \"serial\"\nshared_fs = \"virtio-9p\"\n",
        1,
    );
    std::fs::write(&config, format!("{text}\n[factory]\ntemplate = true\n")).expect("config");
    let v = Virtc { config };
    assert!(
        v.ok(&["factory", "status"]).contains("no template saved"),
        "a fresh run dir has none"
    );
    let saved = v.ok(&["factory", "init"]);
    assert!(
        saved.starts_with("template-") && saved.trim_end().ends_with(" saved"),
        "{saved}"
    );
    let templates = v.json(&["factory", "status", "--json"]);
    let t = &templates[0];
    assert_eq!(templates.as_array().map(Vec::len), Some(1), "{templates}");
    assert_eq!(
        (t["vcpus"].as_u64(), t["memory_mib"].as_u64()),
        (Some(1), Some(256))
    );
    let allocated = t["memory_allocated_bytes"].as_u64().expect("allocated");
    assert!(
        allocated > 0 && allocated <= 256 << 20,
        "the memory file holds what the guest touched: {t}"
    );
    assert!(t["state_bytes"].as_u64().is_some_and(|b| b > 0), "{t}");
    let dir = std::path::PathBuf::from(t["dir"].as_str().expect("dir"));
    println!("template: {t}");

    let ids = ["clone-a", "clone-b"];
    let mut machine_ids = Vec::new();
    for id in ids {
        assert_eq!(
            v.ok(&["sandbox", "create", id]).trim(),
            format!("{id} ready")
        );
        let status = v.json(&["sandbox", "status", id, "--json"]);
        assert_eq!(status["origin"], "template", "{status}");
        let pid = status["pid"].as_i64().expect("pid");
        let cmdline = tests::cmdline(pid);
        assert!(cmdline.contains("-incoming defer"), "{cmdline}");
        assert!(
            cmdline.contains(&format!(
                "mem-path={},share=off",
                dir.join("memory").display()
            )),
            "the clone maps the template's memory private: {cmdline}"
        );
        let machine_id = status["guest"]["machine_id"].as_str().unwrap_or_default();
        assert_eq!(machine_id.len(), 32, "{status}");
        machine_ids.push(machine_id.to_string());
        println!("{id}: PSS of its QEMU {} KiB", tests::cri::pss_kib(pid));
    }
    assert_ne!(
        machine_ids[0], machine_ids[1],
        "two clones, two machine-ids"
    );
    // Both came from the one template: none was saved again.
    let again = v.json(&["factory", "status", "--json"]);
    assert_eq!(again[0]["id"], t["id"], "{again}");

    // Removing the template leaves its clones running and answering.
    assert_eq!(v.ok(&["factory", "destroy"]).trim(), "templates removed");
    assert_eq!(
        v.json(&["factory", "status", "--json"]),
        serde_json::json!([])
    );
    assert!(!dir.exists());
    let status = v.json(&["sandbox", "status", ids[0], "--json"]);
    assert_eq!(status["state"], "ready", "{status}");
    assert_eq!(
        status["guest"]["machine_id"].as_str(),
        Some(machine_ids[0].as_str())
    );

    for id in ids {
        v.ok(&["sandbox", "stop", id]);
        v.ok(&["sandbox", "delete", id]);
    }
    for id in ids {
        env.assert_nothing_left(id);
    }
    assert!(!env.config.run_dir.join("_templates").exists());
}
