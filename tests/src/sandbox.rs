//! Running a command "as the sandbox": in a private mount namespace where
//! /etc/resolv.conf points at the test's stub DNS, optionally inside a
//! cgroup and as an unprivileged user, with exactly the environment the test
//! gives it.
//!
//! The same wrapper without a cgroup runs the sidecar and the tokenizer, so
//! they too resolve api.* names through the stub DNS. /etc/hosts is never
//! touched: the product must work without hosts edits.
//!
//! Shape of the resulting command:
//! `unshare --mount --propagation private -- /bin/sh -c SCRIPT sandbox [values..] PROGRAM ARGS..`
//! The script bind-mounts the resolv.conf, joins the cgroup, then execs the
//! program (through `setpriv` when a user is set). Values travel as
//! positional parameters, never spliced into the script, so no quoting bugs.

use std::{
    ffi::{OsStr, OsString},
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

/// Builder for a sandboxed [`Command`].
#[derive(Clone, Debug)]
pub struct SandboxCommand {
    program: OsString,
    args: Vec<OsString>,
    resolv_conf: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    user: Option<(u32, u32)>,
    env: Vec<(OsString, OsString)>,
    clear_env: bool,
    cwd: Option<PathBuf>,
    from_root_home: Vec<PathBuf>,
}

impl SandboxCommand {
    /// `program` with a cleared environment except `PATH`, which is copied
    /// from the test process so installed tools are found. Add what the
    /// sandbox should see with [`SandboxCommand::env`].
    pub fn new(program: impl AsRef<OsStr>) -> SandboxCommand {
        let mut env = Vec::new();
        if let Some(path) = std::env::var_os("PATH") {
            env.push(("PATH".into(), path));
        }
        SandboxCommand {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            resolv_conf: None,
            cgroup: None,
            user: None,
            env,
            clear_env: true,
            cwd: None,
            from_root_home: Vec::new(),
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Bind-mounts `path` over /etc/resolv.conf for this command only.
    pub fn resolv_conf(mut self, path: impl AsRef<Path>) -> Self {
        self.resolv_conf = Some(path.as_ref().to_owned());
        self
    }

    /// Joins the cgroup (its directory) before exec, so everything the
    /// program does happens inside it.
    pub fn cgroup(mut self, path: impl AsRef<Path>) -> Self {
        self.cgroup = Some(path.as_ref().to_owned());
        self
    }

    /// Drops to `uid`/`gid` (supplementary groups cleared) after the mount
    /// and the cgroup join, which need root.
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// Sets (or replaces) one environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, val: impl AsRef<OsStr>) -> Self {
        let key = key.as_ref().to_owned();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, val.as_ref().to_owned()));
        self
    }

    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.env.retain(|(k, _)| k != key.as_ref());
        self
    }

    /// Keeps the test process's environment (plus what [`Self::env`] sets)
    /// instead of clearing it. Meant for the sidecar/tokenizer, not the sandbox.
    pub fn inherit_env(mut self) -> Self {
        self.clear_env = false;
        self
    }

    /// Makes `dir` (inside /root, which is 0700) usable by any uid in this
    /// mount namespace: /root is covered by an empty tmpfs (mode 0755) and
    /// only `dir` is bind-mounted back, at the same path. The test
    /// machine's Python lives in /root/.pyenv; an unprivileged sandbox
    /// (`proxypilot run`'s own uid) could not run it otherwise.
    pub fn from_root_home(mut self, dir: impl AsRef<Path>) -> Self {
        self.from_root_home.push(dir.as_ref().to_owned());
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// The std [`Command`]; stdio, further env and spawning are up to the caller.
    pub fn command(&self) -> Command {
        let mut script = String::from("set -e\n");
        let mut values: Vec<OsString> = Vec::new();
        let param = |values: &mut Vec<OsString>, v: OsString| {
            values.push(v);
            format!("${{{}}}", values.len())
        };
        if let Some(rc) = &self.resolv_conf {
            let p = param(&mut values, rc.clone().into());
            script += &format!("{} --bind \"{p}\" /etc/resolv.conf\n", tool("mount"));
        }
        if !self.from_root_home.is_empty() {
            let mut stashes = Vec::new();
            for (i, dir) in self.from_root_home.iter().enumerate() {
                let p = param(&mut values, dir.clone().into());
                script += &format!(
                    "s{i}=$(mktemp -d)\n{m} --rbind \"{p}\" \"$s{i}\"\n",
                    m = tool("mount")
                );
                stashes.push((i, p));
            }
            script += &format!(
                "{} -t tmpfs -o mode=0755 proxypilot-test /root\n",
                tool("mount")
            );
            for (i, p) in stashes {
                script += &format!(
                    "mkdir -p \"{p}\"\n{m} --move \"$s{i}\" \"{p}\"\nrmdir \"$s{i}\"\n",
                    m = tool("mount")
                );
            }
        }
        if let Some(cg) = &self.cgroup {
            let p = param(&mut values, cg.clone().into());
            script += &format!("echo $$ > \"{p}/cgroup.procs\"\n");
        }
        script += &format!("shift {}\n", values.len());
        match self.user {
            Some((uid, gid)) => {
                script += &format!(
                    "exec {} --reuid={uid} --regid={gid} --clear-groups -- \"$@\"\n",
                    tool("setpriv")
                )
            }
            None => script += "exec \"$@\"\n",
        }

        let mut cmd = Command::new(tool("unshare"));
        cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(script)
            .arg("sandbox")
            .args(values)
            .arg(&self.program)
            .args(&self.args);
        if self.clear_env {
            cmd.env_clear();
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        cmd
    }
}

/// Absolute path of a system tool, so the wrapper works whatever PATH the
/// sandbox is given.
fn tool(name: &str) -> String {
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p.display().to_string();
        }
    }
    panic!("{name} not found (util-linux / mount are needed)");
}

/// Writes `dir/resolv.conf` naming `nameserver` (port 53 is implied: libc,
/// Go and c-ares all ignore ports here) with a short timeout, and returns
/// its path.
pub fn write_resolv_conf(dir: &Path, nameserver: IpAddr) -> PathBuf {
    let path = dir.join("resolv.conf");
    fs::write(
        &path,
        format!("nameserver {nameserver}\noptions timeout:2 attempts:2\n"),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}
