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

/// Each flag's `[default: …]` text in `proxypilot sidecar --help`.
fn help_defaults(sub: &str) -> Vec<(String, String)> {
    let out = Command::new(proxypilot_bin())
        .args([sub, "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut found = Vec::new();
    let mut flag: Option<String> = None;
    let mut description = String::new();
    let mut flush = |flag: &Option<String>, description: &str| {
        if let (Some(f), Some(start)) = (flag, description.find("[default: ")) {
            let rest = &description[start + "[default: ".len()..];
            if let Some(end) = rest.find(']') {
                found.push((f.clone(), rest[..end].to_string()));
            }
        }
    };
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(f) = t.strip_prefix("--") {
            flush(&flag, &description);
            let name: String = f
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            flag = Some(format!("--{name}"));
            description.clear();
        } else {
            description.push(' ');
            description.push_str(t);
        }
    }
    flush(&flag, &description);
    found
        .into_iter()
        .map(|(f, d)| (f, d.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect()
}

/// A default is written in the code once; the help text and the README's
/// table must say the same, so a changed default cannot leave either stale.
#[test]
fn every_default_the_help_states_is_the_codes_and_the_readmes() {
    use proxypilot::settings::{DEFAULT_INFO_PORT, DEFAULT_STATE_DIR};
    let limits = proxypilot::relay::Limits::default();
    let secs = |d: std::time::Duration| format!("{}s", d.as_secs());
    let in_code: Vec<(&str, String)> = vec![
        ("--state-dir", DEFAULT_STATE_DIR.to_string()),
        ("--info-port", DEFAULT_INFO_PORT.to_string()),
        ("--max-connections", limits.max_connections.to_string()),
        ("--max-header-bytes", limits.max_header_bytes.to_string()),
        ("--handshake-timeout", secs(limits.handshake_timeout)),
        ("--header-read-timeout", secs(limits.header_read_timeout)),
        ("--idle-timeout", secs(limits.idle_timeout)),
        ("--stream-idle-timeout", secs(limits.stream_idle_timeout)),
        ("--response-timeout", secs(limits.response_timeout)),
        ("--stall-timeout", secs(limits.stall_timeout)),
    ];
    assert_eq!(
        (
            proxypilot::relay::PROCESS_SHARE,
            limits.max_connections_per_process
        ),
        (4, limits.max_connections / 4),
        "--help and the README say the per-process default is a quarter of --max-connections"
    );
    let help = help_defaults("sidecar");
    let readme = readme();
    let mut wrong = Vec::new();
    // The kernel flags' defaults are clap's `default_values_t`, rendered
    // from the constants; only the README can drift from them.
    let port = proxypilot::cli::kernel_args::DEFAULT_LISTEN_PORT;
    let readme_only = [
        ("--listen", format!("`127.0.0.1:{port}`, `[::1]:{port}`")),
        ("--intercept-port", "`443`".to_string()),
    ];
    for (flag, value) in &readme_only {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{flag} ")));
        let readme_default = row.and_then(|r| r.split('|').nth(3)).map(str::trim);
        if readme_default != Some(value.as_str()) {
            wrong.push(format!(
                "{flag}: the code's default is {value}, the README's table says {readme_default:?}"
            ));
        }
    }
    for (flag, value) in &in_code {
        match help.iter().find(|(f, _)| f == flag) {
            Some((_, said)) if said == value => {}
            other => wrong.push(format!(
                "{flag}: the code's default is {value}, --help says {other:?}"
            )),
        }
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{flag} ")));
        let readme_default = row.and_then(|r| r.split('|').nth(3)).map(str::trim);
        if readme_default != Some(format!("`{value}`").as_str()) {
            wrong.push(format!(
                "{flag}: the code's default is {value}, the README's table says {readme_default:?}"
            ));
        }
    }
    // Every numeric default the help states is one of those checked here.
    for (flag, said) in &help {
        let checked =
            in_code.iter().any(|(f, _)| f == flag) || readme_only.iter().any(|(f, _)| f == flag);
        if !checked && said.starts_with(|c: char| c.is_ascii_digit() || c == '/') {
            wrong.push(format!(
                "{flag}: --help states default {said:?}, which no check covers"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "defaults drifted:\n  {}",
        wrong.join("\n  ")
    );
}
