//! `proxypilot run`: sandbox one command.

use std::{ffi::OsString, net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::Args;

use crate::{
    kernel::{AllowRule, UnixPath},
    run::{self, secrets::SecretSpec, RunOptions},
    settings::RelayArgs,
    sidecar::KernelOptions,
};

/// Run CMD with its HTTPS calls to the secrets' hosts carrying the real
/// keys, while CMD itself only ever sees dummies. Everything else CMD tries
/// on the network is denied in the kernel unless allowed.
///
/// Example:
///   ANTHROPIC_API_KEY=sk-ant-... proxypilot run --secret ANTHROPIC_API_KEY -- python3 agent.py
#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: CMD's own (128+N when a signal N killed it); 1 when proxypilot itself fails."
)]
pub struct RunArgs {
    /// A secret to keep out of CMD: VAR for a preset (ANTHROPIC_API_KEY,
    /// OPENAI_API_KEY, GH_TOKEN, GITHUB_TOKEN) or VAR=HOST[:HEADER[:FORMAT]].
    /// CMD sees VAR=dummy; requests to HOST carry the real value. Repeatable.
    #[arg(long = "secret", value_name = "SPEC")]
    pub secrets: Vec<SecretSpec>,

    /// Allow only matching requests to HOST (a --secret's or --target's
    /// host): METHOD or `*`, PATH a glob (`*` one segment, `**` any
    /// number), e.g. 'api.github.com GET /repos/acme/**'. Repeatable; a
    /// host without permits allows everything, others get 403.
    #[arg(long = "permit", value_name = "HOST METHOD PATH")]
    pub permits: Vec<String>,

    /// HTTPS host CMD may reach untouched (exact name, or *.suffix). Repeatable.
    #[arg(long = "allow", value_name = "HOST")]
    pub allow: Vec<String>,

    /// Destination CMD may reach directly over TCP, as CIDR[:PORT]. Repeatable.
    #[arg(long = "allow-cidr", value_name = "CIDR[:PORT]")]
    pub allow_cidrs: Vec<AllowRule>,

    /// Upstream DNS server proxypilot asks for CMD (repeatable) [default:
    /// the nameservers of /etc/resolv.conf]. CMD's DNS, to any address, is
    /// answered by proxypilot.
    #[arg(long = "dns", value_name = "ADDR")]
    pub dns: Vec<std::net::IpAddr>,

    /// Name CMD may resolve besides the --secret, --target and --allow
    /// hosts: exact, or *.suffix (repeatable). Other names get NXDOMAIN.
    #[arg(long = "allow-dns", value_name = "NAME", value_parser = crate::cli::kernel_args::parse_dns_name)]
    pub allow_dns: Vec<crate::policy::HostPattern>,

    /// Unix socket path CMD may connect or send to (repeatable); every
    /// other unix socket outside the sandbox, and every abstract name, is
    /// refused (Linux 6.7+).
    #[arg(long = "allow-unix", value_name = "PATH")]
    pub allow_unix: Vec<UnixPath>,

    /// TCP destination port whose connections are intercepted (repeatable).
    #[arg(long = "intercept-port", value_name = "PORT", default_values_t = [443u16])]
    pub intercept_ports: Vec<u16>,

    /// Extra CA (PEM) trusted for the upstream APIs, on top of the system
    /// roots (never CMD's trust store). Repeatable.
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,

    /// Use this remote tokenizer with pre-sealed secrets (--target) instead
    /// of the embedded one.
    #[arg(long, value_name = "URL", requires = "targets")]
    pub tokenizer: Option<String>,

    /// With --tokenizer: HOST's sealed secret is in ENVVAR. Repeatable.
    #[arg(long = "target", value_name = "HOST=ENVVAR", requires = "tokenizer")]
    pub targets: Vec<String>,

    /// With --tokenizer: environment variable holding the tokenizer's
    /// Proxy-Authorization bearer token.
    #[arg(long, value_name = "VAR", requires = "tokenizer")]
    pub tokenizer_auth_env: Option<String>,

    /// Run CMD as this existing user instead of a uid of its own. Refused
    /// for root, and while any other process runs as that user (a shared
    /// uid can signal and trace it). Without --user, CMD is root of its own
    /// user namespace, mapped to a uid nothing else on the host uses.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9464), outside the
    /// sandbox's reach; off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    #[command(flatten)]
    pub limits: crate::settings::LimitArgs,

    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

pub async fn run(args: RunArgs) -> Result<ExitCode> {
    if args.secrets.is_empty() && args.targets.is_empty() {
        tracing::warn!("no --secret given: CMD runs sandboxed, but no key is injected");
    }
    let dns = if args.dns.is_empty() {
        resolv_conf_nameservers()
    } else {
        args.dns.clone()
    };
    let kernel = KernelOptions {
        // Ephemeral ports, so several runs can share a host.
        listen: vec![
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)),
        ],
        intercept_ports: args.intercept_ports.clone(),
        allow_cidrs: args.allow_cidrs.clone(),
        dns,
        allow_dns: args.allow_dns.clone(),
        allow_unix: args.allow_unix.clone(),
    };
    // The relay's part, validated as the sidecar's is (RelayArgs::resolve_for_run).
    let relay = RelayArgs {
        targets: args.targets,
        allow: args.allow,
        permits: args.permits,
        tokenizer: args.tokenizer,
        tokenizer_auth_env: args.tokenizer_auth_env,
        upstream_ca: args.upstream_ca,
        metrics_listen: args.metrics_listen,
        limits: args.limits,
        ..Default::default()
    };
    run::run(RunOptions {
        secrets: args.secrets,
        relay,
        kernel,
        user: args.user,
        command: args.command,
    })
    .await
}

/// The resolvers CMD would use: `nameserver` lines of /etc/resolv.conf.
fn resolv_conf_nameservers() -> Vec<std::net::IpAddr> {
    crate::dns::upstream::resolv_conf_nameservers(
        &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    )
}
