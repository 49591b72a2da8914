//! Build script: builds the guest agent (`images/agent`) for x86_64-unknown-linux-musl with the
//! workspace's `agent` profile and leaves it at `$OUT_DIR/skiff-agent`, where
//! `src/exec/initramfs.rs` embeds it with `include_bytes!`. The nested build has its own target
//! directory (`target/agent`), so it never waits on the outer build's lock.
//!
//! `SKIFF_AGENT_BIN=PATH` embeds a prebuilt agent instead. Targets other than Linux get an
//! empty file (they have no `skiff exec`).
use std::path::{Path, PathBuf};
use std::process::Command;

const AGENT_TARGET: &str = "x86_64-unknown-linux-musl";

fn main() {
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("skiff-agent");
    println!("cargo:rerun-if-env-changed=SKIFF_AGENT_BIN");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        std::fs::write(&out, b"").expect("write the empty agent");
        return;
    }
    if let Some(prebuilt) = std::env::var_os("SKIFF_AGENT_BIN") {
        println!("cargo:rerun-if-changed={}", Path::new(&prebuilt).display());
        std::fs::copy(&prebuilt, &out)
            .unwrap_or_else(|e| panic!("SKIFF_AGENT_BIN={}: {e}", Path::new(&prebuilt).display()));
        return;
    }
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let workspace = manifest_dir
        .parent()
        .expect("vmm sits in the workspace")
        .to_path_buf();
    for p in [
        "images/agent/src",
        "images/agent/Cargo.toml",
        "images/agent/protocol/src",
        "images/agent/protocol/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(p).display());
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("agent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args([
            "build",
            "--quiet",
            "-p",
            "skiff-agent",
            "--profile",
            "agent",
            "--target",
            AGENT_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer build's flags and wrappers (clippy's driver, coverage flags) are for the
        // host crates, not for the agent.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .expect("run cargo to build the guest agent");
    if !status.success() {
        panic!(
            "building the guest agent for {AGENT_TARGET} failed ({status}); run scripts/setup \
             (it adds the target with `rustup target add {AGENT_TARGET}`), or set SKIFF_AGENT_BIN"
        );
    }
    let built = target_dir
        .join(AGENT_TARGET)
        .join("agent")
        .join("skiff-agent");
    std::fs::copy(&built, &out).unwrap_or_else(|e| panic!("{}: {e}", built.display()));
}
