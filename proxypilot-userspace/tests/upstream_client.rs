//! The pooled upstream client under cancellation: clients that go away
//! mid-response make the relay drop upstream streams, and the one shared
//! HTTP/2 connection to the API must survive any number of them.
//!
//! Found by the soak: with h2's defaults, DATA frames arriving for streams
//! the relay had cancelled counted as "local error resets", and after 1,024
//! of them h2 closed the connection (GOAWAY ENHANCE_YOUR_CALM,
//! too_many_internal_resets), failing every request in flight on it with 502.

mod tokenizer_support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxypilot::tokenizer::UpstreamClient;
use tokenizer_support::{test_pki, UPSTREAM_HOST};

/// An HTTPS upstream whose every response streams a chunk each
/// millisecond until the client resets the stream.
async fn endless_upstream() -> (std::net::SocketAddr, String) {
    let (ca_pem, cert, key) = test_pki(&[UPSTREAM_HOST]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    let chunks = futures_util::stream::unfold(0u64, |n| async move {
                        if n > 0 {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        let frame = Frame::data(Bytes::from(vec![b'x'; 512]));
                        Some((Ok::<_, Infallible>(frame), n + 1))
                    });
                    Ok::<_, Infallible>(Response::new(StreamBody::new(chunks)))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, ca_pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_cancelled_streams_do_not_kill_the_shared_connection() {
    let (addr, ca_pem) = endless_upstream().await;
    let client = UpstreamClient::new(&proxypilot::tokenizer::UpstreamClientConfig {
        system_roots: false,
        extra_ca_pem: vec![ca_pem],
        resolve: [(format!("{UPSTREAM_HOST}:443"), addr)].into(),
        ..Default::default()
    })
    .unwrap();

    // 64 at a time, 3,000 in all: each reads its first chunk, then drops
    // the response, as the relay does when its client goes away.
    const TOTAL: usize = 3000;
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (client, next, failures) = (client.clone(), next.clone(), failures.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < TOTAL {
                    let req = Request::get(format!("https://{UPSTREAM_HOST}/stream"))
                        .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
                        .unwrap();
                    let result = match client.send(req).await {
                        Ok(resp) => match resp.into_body().frame().await {
                            Some(Ok(_)) => Ok(()),
                            Some(Err(e)) => Err(format!("first chunk: {e}")),
                            None => Err("empty body".to_string()),
                        },
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = result {
                        failures.lock().unwrap().push(e);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {TOTAL} requests failed; first: {:?}",
        failures.len(),
        failures.first()
    );
}
