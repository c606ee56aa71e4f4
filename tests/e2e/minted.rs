//! A GitHub App's installation token minted by the sidecar (issue 18):
//! the Fly shape with the embedded tokenizer, api.github.com's secret a
//! `github_app_processor` one, and `gh api user` in the sandbox with its
//! dummy token. The fake api.github.com verifies the app JWT (RS256 with
//! the app's public key, `iss`, `exp`), answers the installation-token
//! POST with 201, and accepts `Authorization: token <that token>` on /user.

use std::{path::Path, process::Output, time::Duration};

use proxypilot_tests::{
    shapes::{FlyShape, Tokenizer},
    upstream::{FakeInternet, GitHubApp, GITHUB, GITHUB_LOGIN},
    *,
};
use serde_json::Value;

const APP_ID: &str = "4711";
const INSTALLATION: &str = "99";
/// A test-only RSA key (PKCS#1), the seal tests' fixture.
const KEY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/github-app-test-key.pem"
);

fn gh_api_user(net: &FakeInternet, fly: &FlyShape) -> Output {
    let cfg = fly.dir.join("gh-config");
    std::fs::create_dir_all(&cfg).unwrap();
    fly.sandbox(net, "gh")
        .args(["api", "user"])
        .env("GH_CONFIG_DIR", &cfg)
        .env("GH_NO_UPDATE_NOTIFIER", "1")
        .env("GH_PROMPT_DISABLED", "1")
        .env("NO_COLOR", "1")
        .command()
        .output()
        .unwrap()
}

fn assert_login(out: &Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gh api user: {err}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["login"], GITHUB_LOGIN);
}

/// The embedded tokenizer: the sidecar opens the secret and sees it mints.
#[test]
fn gh_api_user_with_a_github_app_secret_mints_once_and_again_after_expiry() {
    mints_once_and_again(Tokenizer::Embedded, &[]);
}

/// A remote `proxypilot tokenizer`: `--mint` says the secret mints.
#[test]
fn with_a_remote_tokenizer_mint_says_the_secret_mints() {
    mints_once_and_again(
        Tokenizer::Remote,
        &[
            "--mint",
            "api.github.com=https://api.github.com/app/installations/99/access_tokens",
        ],
    );
}

/// Whether gh is here to drive the fake GitHub; CI must have it.
fn gh_installed() -> bool {
    if std::process::Command::new("gh")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "gh is not installed");
    eprintln!("skipping: gh is not installed");
    false
}

fn mints_once_and_again(mode: Tokenizer, extra: &[&str]) {
    require_root!();
    if !gh_installed() {
        return;
    }
    let net = FakeInternet::start();
    // 70 s: 10 s once the tokenizer takes off its 60 s margin; the sidecar
    // refreshes after three quarters of that.
    let pem = std::fs::read_to_string(KEY).unwrap();
    net.apis
        .set_github_app(GitHubApp::from_private_pem(APP_ID, &pem, 70));
    let fly = FlyShape::start_with_github_app(
        &net,
        &format!("ghapp-{mode:?}"),
        mode,
        (APP_ID, INSTALLATION, Path::new(KEY)),
        extra,
    );
    for _ in 0..3 {
        assert_login(&gh_api_user(&net, &fly));
    }
    let minted = net.apis.minted_tokens();
    assert_eq!(minted.len(), 1, "one mint for three gh runs");
    let log = net.apis.requests_to(GITHUB);
    let mints: Vec<_> = log
        .iter()
        .filter(|r| r.path.ends_with("/access_tokens"))
        .collect();
    assert_eq!(mints.len(), 1);
    assert_eq!(mints[0].path, "/app/installations/99/access_tokens");
    assert_eq!(mints[0].status, 201);
    let users: Vec<_> = log.iter().filter(|r| r.path == "/user").collect();
    assert_eq!(users.len(), 3);
    for r in &users {
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("authorization"),
            Some(format!("token {}", minted[0]).as_str())
        );
    }

    std::thread::sleep(Duration::from_millis(8000));
    assert_login(&gh_api_user(&net, &fly));
    let minted = net.apis.minted_tokens();
    assert_eq!(minted.len(), 2, "a second mint after expiry");
    let last = net
        .apis
        .requests_to(GITHUB)
        .into_iter()
        .rev()
        .find(|r| r.path == "/user")
        .unwrap();
    assert_eq!(
        last.header("authorization"),
        Some(format!("token {}", minted[1]).as_str())
    );
}

/// `mint` in the config file (a remote tokenizer, so nothing else says the
/// secret mints), and SIGHUP: a reload that changes nothing keeps the
/// cached token (no second mint); one that changes the sealed secret
/// mints afresh with it.
#[test]
fn mint_from_the_config_file_survives_a_reload_unless_the_secret_changed() {
    require_root!();
    if !gh_installed() {
        return;
    }
    let net = FakeInternet::start();
    let pem = std::fs::read_to_string(KEY).unwrap();
    net.apis
        .set_github_app(GitHubApp::from_private_pem(APP_ID, &pem, 3600));
    let config = net.dir.0.join("mint-reload.toml");
    let file = |var: &str| {
        format!(
            "mint = [\"api.github.com=https://api.github.com/app/installations/{INSTALLATION}/access_tokens\"]\n\
             [target]\n\"api.github.com\" = \"{var}\"\n"
        )
    };
    std::fs::write(&config, file("GH_SEALED")).unwrap();
    let fly = FlyShape::start_with_github_app_from_config(
        &net,
        "ghapp-reload",
        Tokenizer::Remote,
        (APP_ID, INSTALLATION, Path::new(KEY)),
        &["--config", config.to_str().unwrap()],
    );
    assert_login(&gh_api_user(&net, &fly));
    assert_eq!(net.apis.minted_tokens().len(), 1);

    // A reload that changed nothing: the token minted before is used.
    hangup(&fly);
    wait_for_log(&fly, "reloaded the configuration", 1);
    assert_login(&gh_api_user(&net, &fly));
    let minted = net.apis.minted_tokens();
    assert_eq!(
        minted.len(),
        1,
        "no second mint after a reload that changed nothing"
    );
    assert_eq!(
        last_user_authorization(&net),
        format!("token {}", minted[0])
    );

    // A reload that changed the sealed secret: a fresh mint, with it.
    std::fs::write(&config, file("GH_SEALED_ALT")).unwrap();
    hangup(&fly);
    wait_for_log(&fly, "reloaded the configuration", 2);
    assert_login(&gh_api_user(&net, &fly));
    let minted = net.apis.minted_tokens();
    assert_eq!(minted.len(), 2, "a second mint after the secret changed");
    assert_eq!(
        last_user_authorization(&net),
        format!("token {}", minted[1])
    );
}

fn last_user_authorization(net: &FakeInternet) -> String {
    net.apis
        .requests_to(GITHUB)
        .into_iter()
        .rev()
        .find(|r| r.path == "/user")
        .and_then(|r| r.header("authorization").map(str::to_string))
        .unwrap_or_default()
}

fn hangup(fly: &FlyShape) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fly.sidecar.child.id() as i32),
        nix::sys::signal::SIGHUP,
    )
    .unwrap();
}

/// Waits until the sidecar's log holds `needle` `n` times.
fn wait_for_log(fly: &FlyShape, needle: &str, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let log = fly.sidecar_log();
        if log.matches(needle).count() >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {needle:?} x{n} in:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
