//! The clients people actually use, unmodified, in both deployment shapes:
//! curl scripts, the Anthropic and OpenAI SDKs (Python and Node), Python
//! requests and httpx, and gh. Each scenario is its own test, named
//! `<shape>_<client>_<scenario>`, so the test output lists every one.
//!
//! - local: `proxypilot run` with the embedded tokenizer;
//! - fly: a separate cgroup, `proxypilot sidecar` with sealed secrets, and
//!   the standalone `proxypilot tokenizer` as the remote tokenizer.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    sync::OnceLock,
};

use proxypilot_tests::{
    sandbox::SandboxCommand,
    shapes::{local_run, FlyShape, Tokenizer},
    upstream::{FakeInternet, Gate, GITHUB_LOGIN, REPLY_TEXT},
    *,
};
use serde_json::Value;

#[derive(Clone, Copy, Debug)]
enum Shape {
    Local,
    Fly,
}

/// The Python interpreter the SDKs were installed for, by absolute path
/// (pyenv's shims need a HOME the sandbox does not have).
fn python() -> &'static str {
    static PY: OnceLock<String> = OnceLock::new();
    PY.get_or_init(|| {
        let out = run_ok(
            std::process::Command::new("python3").args(["-c", "import sys; print(sys.executable)"]),
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

fn client(name: &str) -> String {
    support_dir()
        .join("clients")
        .join(name)
        .display()
        .to_string()
}

/// What the scenario runs, as argv.
fn argv(client_kind: &str, scenario: &str) -> Vec<String> {
    match client_kind {
        "python" => vec![python().into(), client("sdk_clients.py"), scenario.into()],
        "node" => vec!["node".into(), client("sdk_clients.mjs"), scenario.into()],
        "curl" => vec!["sh".into(), client(scenario)],
        "gh" => {
            let mut v = vec!["gh".to_string()];
            v.extend(scenario.split(' ').map(String::from));
            v
        }
        other => panic!("unknown client {other}"),
    }
}

/// Runs one scenario in one shape; with `gate`, streamed events are held
/// by the upstream until the client has shown the first one.
fn run_scenario(
    shape: Shape,
    client_kind: &str,
    scenario: &str,
    streaming: bool,
) -> (Vec<String>, String) {
    let net = FakeInternet::start();
    let argv = argv(client_kind, scenario);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let gh_dir = net.dir.0.join("gh");
    std::fs::create_dir_all(&gh_dir).unwrap();
    let with_gh_env = |c: SandboxCommand| {
        c.env("GH_CONFIG_DIR", &gh_dir)
            .env("GH_NO_UPDATE_NOTIFIER", "1")
            .env("GH_PROMPT_DISABLED", "1")
    };
    let fly;
    let cmd = match shape {
        Shape::Local => with_gh_env(local_run(&net, &[], &argv)),
        Shape::Fly => {
            fly = FlyShape::start(&net, "clients", Tokenizer::Remote, &[]);
            with_gh_env(fly.sandbox(&net, argv[0]).args(&argv[1..]))
        }
    };
    let gate = streaming.then(|| {
        let g = Gate::new(1);
        net.apis.set_gate(Some(g.clone()));
        g
    });
    let mut child = cmd
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    if let Some(gate) = &gate {
        let mut first = String::new();
        reader.read_line(&mut first).unwrap();
        assert!(
            first.contains(r#""kind": "event""#) || first.contains(r#""kind":"event""#),
            "first line: {first:?}"
        );
        assert_eq!(
            gate.sent(),
            1,
            "the client saw its first event only after the upstream sent more"
        );
        lines.push(first.trim_end().to_string());
        gate.open();
    }
    lines.extend(reader.lines().map(Result::unwrap));
    let stderr = read_all(child.stderr.take().unwrap());
    let status = child.wait().unwrap();
    assert!(status.success(), "{shape:?} {client_kind} {scenario} failed ({status}):\nstdout: {lines:?}\nstderr: {stderr}");
    check_upstream_saw_only_real_keys(&net);
    (lines, stderr)
}

/// Every credential header that reached an upstream holds the real key:
/// no dummy, and no Proxy-* header.
fn check_upstream_saw_only_real_keys(net: &FakeInternet) {
    let reqs = net.apis.requests();
    assert!(!reqs.is_empty(), "no request reached the upstream");
    for r in reqs {
        assert!(
            r.headers_starting_with("proxy-").is_empty(),
            "{:?}",
            r.headers
        );
        for h in ["authorization", "x-api-key"] {
            if let Some(v) = r.header(h) {
                assert!(!v.contains("dummy"), "a dummy reached {}: {h}", r.host);
            }
        }
        assert!(
            r.status < 400,
            "{} {} answered {}: {:?}",
            r.method,
            r.path,
            r.status,
            r.headers
        );
    }
}

fn result(lines: &[String]) -> Value {
    let last = lines
        .iter()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON in {lines:?}"));
    serde_json::from_str(last).unwrap()
}

fn events(lines: &[String]) -> usize {
    lines.iter().filter(|l| l.contains("\"event\"")).count()
}

macro_rules! scenario {
    ($name:ident, $shape:ident, $client:literal, $scenario:literal, streaming = $streaming:literal, |$lines:ident, $stderr:ident| $check:block) => {
        #[test]
        fn $name() {
            require_root!();
            #[allow(unused_variables)]
            let ($lines, $stderr) = run_scenario(Shape::$shape, $client, $scenario, $streaming);
            $check
        }
    };
}

macro_rules! both_shapes {
    ($local:ident, $fly:ident, $client:literal, $scenario:literal, streaming = $streaming:literal, |$lines:ident, $stderr:ident| $check:block) => {
        scenario!(
            $local,
            Local,
            $client,
            $scenario,
            streaming = $streaming,
            |$lines, $stderr| $check
        );
        scenario!(
            $fly,
            Fly,
            $client,
            $scenario,
            streaming = $streaming,
            |$lines, $stderr| $check
        );
    };
}

both_shapes!(
    local_curl_anthropic_sh,
    fly_curl_anthropic_sh,
    "curl",
    "anthropic.sh",
    streaming = false,
    |lines, stderr| {
        let v: Value = serde_json::from_str(&lines.join("")).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["content"][0]["text"], REPLY_TEXT);
    }
);

both_shapes!(
    local_curl_openai_sh,
    fly_curl_openai_sh,
    "curl",
    "openai.sh",
    streaming = false,
    |lines, stderr| {
        let v: Value = serde_json::from_str(&lines.join("")).unwrap();
        assert_eq!(v["object"], "response");
    }
);

both_shapes!(
    local_python_anthropic_create,
    fly_python_anthropic_create,
    "python",
    "anthropic-create",
    streaming = false,
    |lines, stderr| {
        let r = result(&lines);
        assert_eq!(
            (r["type"].as_str(), r["text"].as_str()),
            (Some("message"), Some(REPLY_TEXT))
        );
    }
);

both_shapes!(
    local_python_anthropic_stream,
    fly_python_anthropic_stream,
    "python",
    "anthropic-stream",
    streaming = true,
    |lines, stderr| {
        assert!(events(&lines) >= 5, "{lines:?}");
        assert_eq!(result(&lines)["text"], REPLY_TEXT);
    }
);

both_shapes!(
    local_python_openai_responses,
    fly_python_openai_responses,
    "python",
    "openai-responses",
    streaming = false,
    |lines, stderr| {
        assert_eq!(result(&lines)["text"], REPLY_TEXT);
    }
);

both_shapes!(
    local_python_openai_chat_stream,
    fly_python_openai_chat_stream,
    "python",
    "openai-chat-stream",
    streaming = true,
    |lines, stderr| {
        assert!(events(&lines) >= 3, "{lines:?}");
        assert_eq!(result(&lines)["text"], REPLY_TEXT);
    }
);

both_shapes!(
    local_node_anthropic_create,
    fly_node_anthropic_create,
    "node",
    "anthropic-create",
    streaming = false,
    |lines, stderr| {
        let r = result(&lines);
        assert_eq!(
            (r["type"].as_str(), r["text"].as_str()),
            (Some("message"), Some(REPLY_TEXT))
        );
    }
);

both_shapes!(
    local_node_anthropic_stream,
    fly_node_anthropic_stream,
    "node",
    "anthropic-stream",
    streaming = true,
    |lines, stderr| {
        assert!(events(&lines) >= 5, "{lines:?}");
        assert_eq!(result(&lines)["text"], REPLY_TEXT);
    }
);

both_shapes!(
    local_node_openai_responses,
    fly_node_openai_responses,
    "node",
    "openai-responses",
    streaming = false,
    |lines, stderr| {
        assert_eq!(result(&lines)["text"], REPLY_TEXT);
    }
);

both_shapes!(
    local_node_openai_chat_stream,
    fly_node_openai_chat_stream,
    "node",
    "openai-chat-stream",
    streaming = true,
    |lines, stderr| {
        assert!(events(&lines) >= 3, "{lines:?}");
        assert_eq!(result(&lines)["text"], REPLY_TEXT);
    }
);

both_shapes!(
    local_python_requests_certifi,
    fly_python_requests_certifi,
    "python",
    "requests-github",
    streaming = false,
    |lines, stderr| {
        let r = result(&lines);
        assert_eq!(
            (r["status"].as_u64(), r["login"].as_str()),
            (Some(200), Some(GITHUB_LOGIN))
        );
    }
);

both_shapes!(
    local_python_httpx_certifi,
    fly_python_httpx_certifi,
    "python",
    "httpx-github",
    streaming = false,
    |lines, stderr| {
        let r = result(&lines);
        assert_eq!(
            (r["status"].as_u64(), r["login"].as_str()),
            (Some(200), Some(GITHUB_LOGIN))
        );
    }
);

both_shapes!(
    local_gh_api_user,
    fly_gh_api_user,
    "gh",
    "api user",
    streaming = false,
    |lines, stderr| {
        let v: Value = serde_json::from_str(&lines.join("")).unwrap();
        assert_eq!(v["login"], GITHUB_LOGIN);
    }
);

both_shapes!(
    local_gh_auth_status,
    fly_gh_auth_status,
    "gh",
    "auth status",
    streaming = false,
    |lines, stderr| {
        // gh prints its status on stderr.
        assert!(
            stderr.contains("Logged in to github.com as proxypilot-test"),
            "{stderr}"
        );
        assert!(stderr.contains("GH_TOKEN"), "{stderr}");
    }
);
