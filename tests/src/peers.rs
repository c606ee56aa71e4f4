//! nginx and HAProxy doing proxypilot's job, for the relay benchmark's peer
//! columns (issue 20): terminate TLS for api.anthropic.com with a
//! certificate from the test CA, set the credential header, log each
//! request to a file (the audit line's counterpart), and forward over TLS,
//! verifying the upstream against the test CA, on a keep-alive pool.
//!
//! Both come from Debian (`cargo xtask bench` installs them) and run in the
//! caller's network namespace, dialling the fake upstream by address with
//! api.anthropic.com as the TLS name.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::upstream::{FakeInternet, ANTHROPIC};

/// The upstream's address (see `upstream::standard_hosts`).
const UPSTREAM: &str = "203.0.113.11:443";

/// A running peer proxy.
pub struct Peer {
    pub name: &'static str,
    pub port: u16,
    /// What it was started with, for the report (the key is elided).
    pub invocation: String,
    child: Child,
    dir: PathBuf,
}

impl Peer {
    /// The processes doing the work (nginx: the master and its workers),
    /// whose CPU and RSS the bench sums.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.child.id()];
        let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.child.id()))
            .unwrap_or_default();
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
        pids
    }

    /// nginx with two workers, `proxy_set_header`, an upstream keep-alive
    /// pool of 64 and `proxy_ssl_verify on`.
    pub fn nginx(net: &FakeInternet, real_key: &str) -> Result<Peer, String> {
        let nginx = which("nginx", &["/usr/sbin/nginx"])?;
        let (dir, port) = prepare(net, "nginx")?;
        let conf = format!(
            r#"worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {dir}/access.log;
    # The bench's clients keep their connections for the whole run.
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream api {{
        server {UPSTREAM};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {dir}/leaf.pem;
        ssl_certificate_key {dir}/leaf.key;
        location / {{
            proxy_pass https://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {ANTHROPIC};
            proxy_set_header x-api-key "{real_key}";
            proxy_ssl_server_name on;
            proxy_ssl_name {ANTHROPIC};
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {dir}/upstream-ca.pem;
            proxy_ssl_session_reuse on;
            proxy_buffering off;
        }}
    }}
}}
"#,
            dir = dir.display()
        );
        fs::write(dir.join("nginx.conf"), &conf).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&nginx);
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off; master_process on;"]);
        let invocation = format!(
            "nginx {} -g 'daemon off;' with: {}",
            dir.join("nginx.conf").display(),
            conf.replace(real_key, "<key>")
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        );
        Peer::spawn("nginx", cmd, dir, port, invocation)
    }

    /// HAProxy with two threads, `http-request set-header`, `http-reuse
    /// always` and `ssl verify required`.
    pub fn haproxy(net: &FakeInternet, real_key: &str) -> Result<Peer, String> {
        let haproxy = which("haproxy", &["/usr/sbin/haproxy"])?;
        let (dir, port) = prepare(net, "haproxy")?;
        // HAProxy wants the certificate and its key in one file.
        let both = fs::read_to_string(dir.join("leaf.pem")).map_err(|e| e.to_string())?
            + &fs::read_to_string(dir.join("leaf.key")).map_err(|e| e.to_string())?;
        fs::write(dir.join("leaf-and-key.pem"), both).map_err(|e| e.to_string())?;
        let conf = format!(
            r#"global
    nbthread 2
    # Two descriptors a connection must fit the bench's open-files limit.
    maxconn 8000
    log stdout format raw local0 info
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend relay
    bind 127.0.0.1:{port} ssl crt {dir}/leaf-and-key.pem
    http-request set-header x-api-key "{real_key}"
    http-request set-header Host {ANTHROPIC}
    default_backend api
backend api
    http-reuse always
    server api {UPSTREAM} ssl verify required ca-file {dir}/upstream-ca.pem sni str({ANTHROPIC}) verifyhost {ANTHROPIC} pool-max-conn 64
"#,
            dir = dir.display()
        );
        fs::write(dir.join("haproxy.cfg"), &conf).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&haproxy);
        cmd.arg("-db").arg("-f").arg(dir.join("haproxy.cfg"));
        let invocation = format!(
            "haproxy -db -f {} with: {}",
            dir.join("haproxy.cfg").display(),
            conf.replace(real_key, "<key>")
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        );
        Peer::spawn("haproxy", cmd, dir, port, invocation)
    }

    fn spawn(
        name: &'static str,
        mut cmd: Command,
        dir: PathBuf,
        port: u16,
        invocation: String,
    ) -> Result<Peer, String> {
        // HAProxy's access log goes to stdout: to a file, like nginx's.
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("access-stdout.log")).map_err(|e| e.to_string())?)
            .stderr(fs::File::create(dir.join("stderr.log")).map_err(|e| e.to_string())?);
        let mut child = cmd.spawn().map_err(|e| format!("starting {name}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "{name} exited ({st}): {}",
                    fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
                ));
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("{name} did not listen on {port} in 15 s"));
            }
            thread::sleep(Duration::from_millis(50));
        }
        let peer = Peer {
            name,
            port,
            invocation,
            child,
            dir,
        };
        // nginx forks its workers after it listens: wait for them.
        let deadline = Instant::now() + Duration::from_secs(5);
        while name == "nginx" && peer.pids().len() < 3 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        Ok(peer)
    }

    /// Lines in its access log (a check that it did the audit work).
    pub fn logged_requests(&self) -> usize {
        ["access.log", "access-stdout.log"]
            .iter()
            .map(|f| {
                fs::read_to_string(self.dir.join(f))
                    .map(|s| s.lines().count())
                    .unwrap_or(0)
            })
            .sum()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // nginx's master stops its workers on SIGTERM (kill would orphan them).
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory with the leaf for api.anthropic.com (from the test
/// CA, which the bench client trusts) and the CA the peer verifies the
/// upstream with; and a free port.
fn prepare(net: &FakeInternet, name: &str) -> Result<(PathBuf, u16), String> {
    let dir = net.dir.0.join(format!("peer-{name}"));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let leaf = net.apis.ca().issue(&[ANTHROPIC]);
    fs::write(dir.join("leaf.pem"), &leaf.cert_pem).map_err(|e| e.to_string())?;
    fs::write(dir.join("leaf.key"), &leaf.key_pem).map_err(|e| e.to_string())?;
    fs::copy(net.apis.ca_pem_path(), dir.join("upstream-ca.pem")).map_err(|e| e.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    Ok((dir, port))
}

fn which(name: &str, candidates: &[&str]) -> Result<PathBuf, String> {
    candidates
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            format!("{name} is not installed (`cargo xtask bench` installs it from Debian)")
        })
}
