use anyhow::{Context as _, anyhow};

/// Builds the eBPF programs (nightly + bpf-linker) and leaves the object in OUT_DIR, where
/// `loader.rs` embeds it.
///
/// With `AYA_BUILD_SKIP=1` (as aya-build reads it) the programs are not built and an empty
/// object stands in: `cargo check`, clippy and unit tests then need no nightly toolchain, and
/// an agent built that way refuses to load anything (`LoadError::NoPrograms`).
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
        let stub = std::path::Path::new(&out_dir).join("egress");
        std::fs::write(&stub, []).with_context(|| format!("writing {}", stub.display()))?;
        println!("cargo:warning=AYA_BUILD_SKIP is set: this agent holds no eBPF programs");
        return Ok(());
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("egress-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    let package = aya_build::Package {
        name: "egress-ebpf",
        root_dir: root,
        ..Default::default()
    };
    // aya-build relays every line the nested cargo writes to stderr as a build-script
    // warning ("Compiling ...", "Finished ..."), dozens of lines on every build; a quiet
    // nested cargo still reports the eBPF crate's own errors and warnings.
    // SAFETY: the build script is single-threaded here; nothing reads the environment at once.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
        .context("building the eBPF programs (run scripts/bootstrap.sh if bpf-linker or nightly rust-src is missing)")
}
