use anyhow::{Context as _, anyhow};

/// Builds the eBPF programs (nightly + bpf-linker) and leaves the object in OUT_DIR, where
/// `loader.rs` embeds it.
fn main() -> anyhow::Result<()> {
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
