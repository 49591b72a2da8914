// Build script: owns the link arguments (linker script, static non-PIE output). It uses
// CARGO_MANIFEST_DIR so the build does not depend on the current directory.
use std::env;

fn main() {
    let dir = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let target = env::var("TARGET").unwrap_or_default();
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    if target != "x86_64-unknown-none" {
        // main.rs refuses to compile for other targets with a clear message.
        return;
    }
    println!("cargo:rustc-link-arg=-T{dir}/linker.ld");
    // The target defaults to static PIE; the guest is linked at a fixed physical address instead.
    // lld takes the last of -pie/--no-pie, and these arguments come after rustc's own.
    println!("cargo:rustc-link-arg=--no-pie");
    println!("cargo:rustc-link-arg=-zmax-page-size=4096");
    println!("cargo:rustc-link-arg=--build-id=none");
}
