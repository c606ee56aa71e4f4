//! `cargo xtask demo`: the original proxypilot README's transcript, offline.
//!
//! In a private network namespace it starts fake api.anthropic.com,
//! api.openai.com and api.github.com servers (behind a test CA, named by a
//! stub DNS), then runs the original's example scripts with dummy keys
//! under `proxypilot run`, and shows what each upstream received.

use std::process::{ExitCode, Stdio};

use proxypilot_tests::{shapes::local_run, support_dir, upstream::FakeInternet};

fn main() -> ExitCode {
    if !proxypilot_tests::privileged() {
        eprintln!("the demo needs root: it attaches eBPF programs and makes a network namespace");
        return ExitCode::FAILURE;
    }
    let net = FakeInternet::start();
    let clients = support_dir().join("clients");
    let script = format!(
        "set -e; cd {dir}; \
         echo '$ env | egrep \"TOKEN|KEY\"'; env | egrep '^(ANTHROPIC_API_KEY|OPENAI_API_KEY|GH_TOKEN)=' | sort; \
         echo; echo '$ ./anthropic.sh'; sh anthropic.sh; echo; \
         echo; echo '$ ./openai.sh'; sh openai.sh; echo; \
         echo; echo '$ gh auth status'; gh auth status 2>&1",
        dir = clients.display()
    );
    let gh_dir = net.dir.0.join("gh");
    std::fs::create_dir_all(&gh_dir).unwrap();
    println!("# proxypilot run --secret ANTHROPIC_API_KEY --secret OPENAI_API_KEY --secret GH_TOKEN -- sh");
    println!("# (the real keys are in proxypilot's environment only)\n");
    let status = local_run(&net, &[], &["sh", "-c", &script])
        .env("GH_CONFIG_DIR", &gh_dir)
        .env("GH_NO_UPDATE_NOTIFIER", "1")
        .command()
        .stdin(Stdio::null())
        .status()
        .expect("start proxypilot run");
    println!("\n# What the upstream APIs received:");
    let keys = net.apis.keys();
    let mut real_keys_seen = 0;
    for r in net.apis.requests() {
        for h in ["x-api-key", "authorization"] {
            if let Some(v) = r.header(h) {
                let real = [&keys.anthropic, &keys.openai, &keys.github]
                    .iter()
                    .any(|k| v.contains(k.as_str()));
                real_keys_seen += usize::from(real);
                println!(
                    "  {} {} {}  {h}: {}",
                    r.host,
                    r.method,
                    r.path,
                    if real {
                        "<the real key>"
                    } else {
                        "<NOT the real key>"
                    }
                );
            }
        }
    }
    if status.success() && real_keys_seen >= 3 {
        println!("\ndemo ok: every request reached its API with the real key; the shell only ever saw `dummy`.");
        ExitCode::SUCCESS
    } else {
        println!("\ndemo FAILED (status {status}, {real_keys_seen} requests with the real key)");
        ExitCode::FAILURE
    }
}
