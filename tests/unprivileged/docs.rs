//! The README is the manual: every flag `proxypilot sidecar --help` lists
//! has a row in its configuration table (and no row names a flag that is
//! gone), and every `proxypilot run` flag is documented, so the two cannot
//! drift apart silently.

use std::collections::BTreeSet;
use std::process::Command;

use proxypilot_tests::proxypilot_bin;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap()
}

/// The long flags a subcommand's `--help` lists, without clap's own.
fn help_flags(sub: &str) -> BTreeSet<String> {
    let out = Command::new(proxypilot_bin())
        .args([sub, "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("-")
                .map_or(l, |_| l.split_once(", ").map_or(l, |(_, r)| r));
            let flag = l.strip_prefix("--")?;
            let name: String = flag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            Some(format!("--{name}"))
        })
        .filter(|f| f != "--help" && f != "--version")
        .collect()
}

#[test]
fn every_sidecar_flag_has_a_row_in_the_readme_table_and_no_row_is_stale() {
    let rows: BTreeSet<String> = readme()
        .lines()
        .filter_map(|l| l.strip_prefix("| `--"))
        .map(|l| {
            let name: String = l
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            format!("--{name}")
        })
        .collect();
    let flags = help_flags("sidecar");
    let undocumented: Vec<_> = flags.difference(&rows).collect();
    let stale: Vec<_> = rows.difference(&flags).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "README's sidecar table and `proxypilot sidecar --help` differ: \
         flags without a row {undocumented:?}, rows without a flag {stale:?}"
    );
}

#[test]
fn every_run_flag_is_documented_in_the_readme() {
    let text = readme();
    let missing: Vec<String> = help_flags("run")
        .into_iter()
        .filter(|f| !text.contains(&format!("`{f}")))
        .collect();
    assert!(
        missing.is_empty(),
        "`proxypilot run` flags the README never names: {missing:?}"
    );
}
