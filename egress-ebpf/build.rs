use which::which;

/// Rebuild the programs when bpf-linker changes: cargo does not track linkers.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
