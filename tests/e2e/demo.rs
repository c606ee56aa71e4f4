//! `cargo xtask demo` runs in CI as a test, bounded in time, checking its
//! own output.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use proxypilot_tests::*;

#[test]
fn the_offline_demo_reproduces_the_original_transcript() {
    require_root!();
    let demo = proxypilot_bin().with_file_name("demo");
    assert!(
        demo.exists(),
        "{} is missing; `cargo build --bins` builds it",
        demo.display()
    );
    let mut child = Command::new(&demo)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the demo took more than 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "ANTHROPIC_API_KEY=dummy",
        "GH_TOKEN=dummy",
        "OPENAI_API_KEY=dummy",
        r#""type":"message""#,
        r#""object":"response""#,
        "Logged in to github.com as proxypilot-test (GH_TOKEN)",
        "api.anthropic.com POST /v1/messages  x-api-key: <the real key>",
        "api.openai.com POST /v1/responses  authorization: <the real key>",
        "demo ok",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert!(!stdout.contains("NOT the real key"), "{stdout}");
}
