//! `--permit` rules end to end: real gh and curl inside `proxypilot run`,
//! the fake GitHub in a private network namespace. What the permits refuse
//! is answered 403 by the relay and never reaches the upstream, over
//! HTTP/1.1 and HTTP/2 alike.

use std::process::Stdio;

use proxypilot_tests::{
    shapes::{local_run_with, FlyShape, Tokenizer},
    upstream::{FakeInternet, GITHUB},
    *,
};
use serde_json::Value;

const PERMIT: &str = "api.github.com GET /repos/acme/**";

/// Paths a sandbox might try to slip past `/repos/acme/**`, as curl
/// sends them (`--path-as-is`: curl would otherwise resolve the dots).
const SLIPS: &[&str] = &[
    "/repos/acme/../other",
    "/repos/acme/%2e%2e/other",
    "/repos/acme/%2E%2E/other",
    "/repos/acme/.%2e/other",
    "/repos/acme/x%2f..%2f..%2fother",
    "/repos/acme/%252e%252e/other",
    "/repos/acme//x",
    "//repos/acme/x",
    "/repos/ACME/x",
    "/REPOS/acme/x",
];

/// One line per curl request: `curl VERSION METHOD PATH CODE HTTPVER BODY`.
fn script() -> String {
    let mut s = String::from(
        "exec 2>&1\n\
         b=$(mktemp -p \"$HOME\")\n\
         gh api repos/acme/x; r=$?; echo; echo gh-get=$r\n\
         gh api -X DELETE repos/acme/x; r=$?; echo; echo gh-delete=$r\n\
         probe() { code=$(curl -sS --path-as-is \"$1\" -X \"$2\" -o \"$b\" -w '%{http_code} %{http_version}' \
           -H \"authorization: token $GH_TOKEN\" \"https://api.github.com$3\"); \
           echo \"curl $1 $2 $3 $code $(cat \"$b\")\"; }\n",
    );
    for v in ["--http1.1", "--http2"] {
        s += &format!("probe {v} GET /repos/acme/x\n");
        s += &format!("probe {v} DELETE /repos/acme/x\n");
        s += &format!("probe {v} get /repos/acme/x\n");
        for p in SLIPS {
            s += &format!("probe {v} GET '{p}'\n");
        }
    }
    s
}

#[test]
fn permits_refuse_other_methods_and_normalisation_tricks_over_h1_and_h2() {
    require_root!();
    let net = FakeInternet::start();
    let gh_dir = net.dir.0.join("gh");
    std::fs::create_dir_all(&gh_dir).unwrap();
    let out = local_run_with(
        &net,
        &["--secret", "GH_TOKEN", "--permit", PERMIT],
        &["sh", "-c", &script()],
    )
    .env("GH_CONFIG_DIR", &gh_dir)
    .env("GH_NO_UPDATE_NOTIFIER", "1")
    .env("GH_PROMPT_DISABLED", "1")
    .env("PROXYPILOT_LOG", "warn,audit=info")
    .command()
    .stdin(Stdio::null())
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let all = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.status.success(), "{all}");

    // gh: the read passes, the delete is refused with the relay's 403.
    assert!(stdout.contains(r#""full_name":"acme/x""#), "{all}");
    assert!(stdout.contains("gh-get=0"), "{all}");
    assert!(stdout.contains("gh-delete=1"), "{all}");
    assert!(stdout.contains("HTTP 403"), "{all}");

    let mut probes = 0;
    for line in stdout.lines().filter(|l| l.starts_with("curl ")) {
        probes += 1;
        let mut f = line.splitn(7, ' ');
        let (_, version, method, path, code, http) = (
            f.next(),
            f.next().unwrap(),
            f.next().unwrap(),
            f.next().unwrap(),
            f.next().unwrap(),
            f.next().unwrap(),
        );
        let body = f.next().unwrap_or("");
        let want_http = if version == "--http2" { "2" } else { "1.1" };
        assert_eq!(http, want_http, "{line}\n{all}");
        if method == "GET" && path == "/repos/acme/x" {
            assert_eq!(code, "200", "{line}");
            continue;
        }
        assert_eq!(code, "403", "{line}");
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{line}"));
        let hint = v["hint"].as_str().unwrap_or_default();
        assert!(
            hint.contains("rule set of api.github.com") && hint.contains("GET /repos/acme/**"),
            "{line}"
        );
        assert!(v["error"].is_string(), "{line}");
    }
    assert_eq!(probes, 2 * (3 + SLIPS.len()), "{all}");

    // Only the three permitted reads reached GitHub.
    let seen: Vec<String> = net
        .apis
        .requests_to(GITHUB)
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(seen, vec!["GET /repos/acme/x"; 3], "{all}");

    // Each refusal has its audit line with the decision and the rule set.
    let refused = stderr
        .lines()
        .filter(|l| l.contains("audit") && l.contains("decision=refused"))
        .collect::<Vec<_>>();
    assert_eq!(refused.len(), 1 + 2 * (2 + SLIPS.len()), "{all}");
    assert!(
        refused
            .iter()
            .all(|l| l.contains("rule=permits of api.github.com") && l.contains("status=403")),
        "{all}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("decision=permitted") && l.contains("rule=GET /repos/acme/**")),
        "{all}"
    );
}

/// The sidecar takes the same rules from its TOML file (a target's
/// `permit` list).
#[test]
fn the_sidecar_applies_a_targets_permits_from_its_config_file() {
    require_root!();
    let net = FakeInternet::start();
    let config = net.dir.0.join("permits.toml");
    std::fs::write(
        &config,
        "[target]\n\"api.github.com\" = { secret = \"GH_SEALED\", permit = [\"GET /repos/acme/**\"] }\n",
    )
    .unwrap();
    let fly = FlyShape::start(
        &net,
        "permits",
        Tokenizer::Remote,
        &["--config", config.to_str().unwrap()],
    );
    let status = |method: &str, path: &str| -> String {
        let out = fly
            .sandbox(&net, "curl")
            .args([
                "-sS",
                "--path-as-is",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(["-X", method, "-H", "authorization: token dummy"])
            .arg(format!("https://api.github.com{path}"))
            .command()
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(status("GET", "/repos/acme/x"), "200");
    assert_eq!(status("DELETE", "/repos/acme/x"), "403");
    assert_eq!(status("GET", "/repos/acme/%2e%2e/other"), "403");
    assert_eq!(status("GET", "/user"), "403");
    let seen: Vec<String> = net
        .apis
        .requests_to(GITHUB)
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(seen, ["GET /repos/acme/x"]);
}

/// A permit for a host that is not intercepted, or with a path the
/// normalisation refuses, stops `proxypilot run` before the command
/// starts, saying why, and leaves nothing behind.
#[test]
fn run_refuses_bad_permits_before_starting_anything() {
    require_root!();
    let net = FakeInternet::start();
    let out = local_run_with(
        &net,
        &[
            "--secret",
            "GH_TOKEN",
            "--permit",
            "api.example.com GET /x",
            "--permit",
            "api.github.com GET /a/%2e%2e/b",
        ],
        &["sh", "-c", "echo the command ran"],
    )
    .command()
    .stdin(Stdio::null())
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stdout.contains("the command ran"), "{stdout}");
    assert!(
        stderr.contains("api.example.com is not an intercepted host")
            && stderr.contains("has a \"..\" segment"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&net.dir.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("proxypilot-run-")
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
