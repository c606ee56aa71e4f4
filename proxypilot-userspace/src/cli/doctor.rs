//! `proxypilot doctor`: print each host check with its fix.

use std::process::ExitCode;

use anyhow::Result;

use crate::doctor;

pub fn run() -> Result<ExitCode> {
    let checks = doctor::run_checks();
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
