//! The crates' module graphs stay acyclic (issue 14: `settings` and
//! `relay`, and the tokenizer's `body` and `processor`, imported each other,
//! which made every module a reader had to hold in mind at once). A new
//! import that closes a cycle fails here, naming the modules in it.

use std::process::Command;

fn cycles(krate: &str, depth: u32) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new("python3")
        .arg(format!("{root}/tests/support/module_cycles.py"))
        .arg(format!("{root}/{krate}"))
        .arg(depth.to_string())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    let mut found = Vec::new();
    for krate in [
        "proxypilot-common",
        "proxypilot-kernel",
        "proxypilot-tokenizer",
        "proxypilot-userspace",
    ] {
        for depth in [1, 2] {
            let report = cycles(krate, depth);
            if !report.ends_with("cycles: none") {
                found.push(format!("{krate} (depth {depth}): {report}"));
            }
        }
    }
    assert!(found.is_empty(), "import cycles:\n  {}", found.join("\n  "));
}
