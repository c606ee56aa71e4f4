//! `proxypilot doctor`: print each host check with its fix.

use std::process::ExitCode;

use anyhow::Result;

use crate::kernel::doctor;

pub fn run() -> Result<ExitCode> {
    let mut checks = doctor::run_checks();
    checks.push(open_files());
    for c in &checks {
        let mark = if c.ok { "pass" } else { "FAIL" };
        println!("{mark}  {:<13} {}", c.name, c.detail);
        if let Some(fix) = &c.fix {
            println!("      {:<13} fix: {fix}", "");
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed == 0 {
        println!("\nproxypilot can run on this host.");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("\n{failed} check(s) failed; fix them and run `proxypilot doctor` again.");
        Ok(ExitCode::FAILURE)
    }
}

/// Descriptors a relay at the default `--max-connections` needs: a client
/// and an upstream socket per connection, plus some for everything else.
const FDS_NEEDED: u64 = 2 * 4096 + 256;

/// The open-files limit (proxypilot raised its soft limit to the hard one
/// at start, in `main`).
fn open_files() -> doctor::Check {
    let (soft, hard) = crate::fdlimit::get().unwrap_or((0, 0));
    let inherited = crate::fdlimit::inherited_soft().unwrap_or(soft);
    let detail = format!(
        "soft {inherited} as started, raised to {soft}; hard {hard} (the relay needs about {FDS_NEEDED} at --max-connections 4096)"
    );
    let ok = soft >= FDS_NEEDED;
    doctor::Check {
        name: "open files",
        ok,
        detail,
        fix: (!ok).then(|| {
            "raise the hard limit: `ulimit -Hn 65536` in the starting shell, LimitNOFILE=65536 \
             in a systemd unit, `--ulimit nofile=65536:65536` for docker; or lower --max-connections"
                .to_string()
        }),
    }
}
