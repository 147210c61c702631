//! Generates the rust-protobuf messages and async ttrpc services from
//! `protos/agent.proto` into OUT_DIR.

use std::{fs, io, path::PathBuf};

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=protos/agent.proto");
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(io::Error::other)?);
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
        .run()?;
    // The generated files carry inner attributes that cannot be `include!`d;
    // strip them so lib.rs can wrap each file in a module.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = fs::read_to_string(&path)?;
        let cleaned: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("#![") && !l.trim_start().starts_with("//!"))
            .collect::<Vec<_>>()
            .join("\n");
        fs::write(&path, cleaned)?;
    }
    Ok(())
}
