//! `proxypilot detach`: remove the programs pinned for a cgroup.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::kernel_args::CgroupArg;
use crate::kernel;

#[derive(Args, Debug)]
pub struct DetachArgs {
    #[command(flatten)]
    pub cgroup: CgroupArg,
}

pub fn run(args: DetachArgs) -> Result<ExitCode> {
    let path = &args.cgroup.cgroup;
    if kernel::detach(path)? {
        println!("detached proxypilot from {}", path.display());
    } else {
        println!("nothing of proxypilot was attached to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
