//! Build script: builds the guest agent (`images/agent`) for x86_64-unknown-linux-musl with the
//! workspace's `agent` profile and leaves it at `$OUT_DIR/skiff-agent`, where
//! `src/exec/initramfs.rs` embeds it with `include_bytes!`. The nested build has its own target
//! directory (`target/agent`), so it never waits on the outer build's lock.
//!
//! `SKIFF_AGENT_BIN=PATH` embeds a prebuilt agent instead. Targets other than Linux get an
//! empty file (they have no `skiff exec`).
//!
//! It also hands the `skiff` binary's link `start-path.order` (see [`start_path_order`]).
use std::path::{Path, PathBuf};
use std::process::Command;

const AGENT_TARGET: &str = "x86_64-unknown-linux-musl";

/// The functions a short `skiff run` executes (`scripts/start-path-order` writes the list) go
/// first in `.text`, together: the kernel maps file pages in 64 KiB blocks around each fault
/// (fault-around), so a start path spread over the whole `.text` maps nearly all of it. Only with
/// LLD, the linker rustc uses for x86_64-unknown-linux-gnu since 1.90 (`--symbol-ordering-file`
/// is LLD's); another linker gets the default layout.
fn start_path_order(manifest_dir: &Path) {
    let order = manifest_dir.join("start-path.order");
    println!("cargo:rerun-if-changed={}", order.display());
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    if std::env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu") || !order.is_file() {
        return;
    }
    // A chosen linker, or one rustc is told to use instead of its LLD, may not know the option.
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if std::env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_some()
        || flags.contains("linker")
        || flags.contains("link-self-contained")
        || !rustc_links_with_lld()
    {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bin=skiff=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    // Names the build does not have (the list is from an older build) are skipped quietly.
    println!("cargo:rustc-link-arg-bin=skiff=-Wl,--no-warn-symbol-ordering");
}

/// Whether rustc is 1.90 or newer (LLD by default on x86_64-unknown-linux-gnu).
fn rustc_links_with_lld() -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("-V").output() else {
        return false;
    };
    let version = String::from_utf8_lossy(&out.stdout);
    let mut numbers = version
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}

fn main() {
    start_path_order(Path::new(env!("CARGO_MANIFEST_DIR")));
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
