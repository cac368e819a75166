//! Every policy shipped in `policies/` parses; the presets can also be enforced as written.

use std::path::{Path, PathBuf};

use egress_policy::{load_file, unsupported_features};

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    for entry in entries {
        let path = match entry {
            Ok(entry) => entry.path(),
            Err(e) => panic!("{}: {e}", dir.display()),
        };
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            out.push(path);
        }
    }
}

#[test]
fn every_shipped_policy_parses() {
    let mut files = Vec::new();
    yaml_files(&policies_dir(), &mut files);
    files.sort();
    assert!(
        files.iter().any(|f| f.ends_with("mcp-net-02-example.yaml")),
        "the seed example is missing from {files:?}"
    );
    let failures: Vec<String> = files
        .iter()
        .filter_map(|f| load_file(f).err().map(|e| e.to_string()))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn presets_are_enforceable_as_written() {
    let mut files = Vec::new();
    yaml_files(&policies_dir().join("presets"), &mut files);
    assert!(!files.is_empty(), "no presets found");
    let doh = match egress_policy::doh::DohList::builtin() {
        Ok(doh) => doh,
        Err(e) => panic!("{e}"),
    };
    for file in files {
        let policy = match load_file(&file) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let unsupported = unsupported_features(&policy, &doh);
        assert!(
            unsupported.is_empty(),
            "{}: {unsupported:?}",
            file.display()
        );
    }
}
