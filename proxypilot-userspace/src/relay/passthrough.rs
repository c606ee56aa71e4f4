//! Pass-through: splice the client to the real server without reading it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::policy::{Dial, Policy};
use crate::tls::hello::ClientHello;

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("resolving {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("{0}")]
    Internal(String),
    #[error("connecting to {target} ({addrs:?}) failed: {detail}")]
    Connect {
        target: String,
        addrs: Vec<SocketAddr>,
        detail: String,
    },
    #[error("relaying: {0}")]
    Io(#[from] std::io::Error),
}

/// Dials `dial` (resolving names ourselves: the client's chosen IP is never
/// used for a named host, and internal addresses it resolves to are not
/// dialled unless `--allow-cidr` allows them: see
/// [`Policy::check_resolved`]), replays the ClientHello and copies both ways.
/// Names are resolved through `dns` (the servers the sandbox's DNS is
/// answered from, so the relay dials what the sandbox was told), else
/// through the host's resolver.
/// Returns (bytes client→server including the ClientHello, server→client).
pub async fn pass_through(
    mut client: TcpStream,
    hello: &ClientHello,
    dial: &Dial,
    policy: &Policy,
    dns: Option<&crate::dns::Upstreams>,
    connect_timeout: Duration,
) -> Result<(u64, u64), PassError> {
    let (target, addrs) = match dial {
        Dial::Host { host, port } => {
            let lookup = async {
                match dns {
                    Some(upstreams) => upstreams.lookup_host(host, *port).await,
                    None => tokio::net::lookup_host((host.as_str(), *port))
                        .await
                        .map(Iterator::collect),
                }
            };
            let addrs: Vec<SocketAddr> = tokio::time::timeout(connect_timeout, lookup)
                .await
                .map_err(|_| PassError::Resolve {
                    host: host.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "DNS lookup timed out",
                    ),
                })?
                .map_err(|source| PassError::Resolve {
                    host: host.clone(),
                    source,
                })?;
            if addrs.is_empty() {
                return Err(PassError::NoAddress { host: host.clone() });
            }
            let mut refused = None;
            let addrs: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match policy.check_resolved(host, *a) {
                    Ok(()) => true,
                    Err(why) => {
                        refused.get_or_insert(why);
                        false
                    }
                })
                .collect();
            if let (true, Some(why)) = (addrs.is_empty(), refused) {
                return Err(PassError::Internal(why));
            }
            (format!("{host}:{port}"), addrs)
        }
        Dial::Addr(a) => (a.to_string(), vec![*a]),
    };
    let mut last = String::new();
    let mut upstream = None;
    for addr in &addrs {
        match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                upstream = Some(s);
                break;
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: timed out after {connect_timeout:?}"),
        }
    }
    let Some(mut upstream) = upstream else {
        return Err(PassError::Connect {
            target,
            addrs,
            detail: last,
        });
    };
    let _ = upstream.set_nodelay(true);
    upstream.write_all(&hello.raw).await?;
    let (up, down) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok((up + hello.raw.len() as u64, down))
}
