//! The pooled upstream client under cancellation: clients that go away
//! mid-response make the relay drop upstream streams, and the one shared
//! HTTP/2 connection to the API must survive any number of them.
//!
//! Found by the soak: with h2's defaults, DATA frames arriving for streams
//! the relay had cancelled counted as "local error resets", and after 1,024
//! of them h2 closed the connection (GOAWAY ENHANCE_YOUR_CALM,
//! too_many_internal_resets), failing every request in flight on it with 502.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::Request;
use http_body_util::{BodyExt, Empty};
use proxypilot::tokenizer::{ClientConn, UpstreamClient};
use proxypilot_tests::loopback::LoopbackUpstream;

const UPSTREAM_HOST: &str = "api.example.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_cancelled_streams_do_not_kill_the_shared_connection() {
    // Every response of `/endless` streams a chunk each millisecond until
    // the client resets the stream.
    let upstream = LoopbackUpstream::start(&[UPSTREAM_HOST]).await;
    let client = UpstreamClient::new(&upstream.client_config(true)).unwrap();

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
                    let req = Request::get(format!("https://{UPSTREAM_HOST}/endless"))
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
    assert!(
        upstream
            .seen()
            .iter()
            .all(|r| r.version == http::Version::HTTP_2),
        "the streams must share one HTTP/2 connection"
    );
}

/// An HTTP/1.1 upstream needs a connection per request in flight; a fan-out
/// of streams must not become as many upstream connections (issue 21).
/// Twenty concurrent requests under a cap of four: while the first four
/// hold their responses, the upstream has four connections and the others
/// wait; once they let go, every request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_upstream_gets_at_most_the_cap_of_connections_under_fan_out() {
    let upstream = LoopbackUpstream::start(&[UPSTREAM_HOST]).await;
    let mut cfg = upstream.client_config(false);
    cfg.max_connections_per_host = 4;
    let client = UpstreamClient::new(&cfg).unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (client, started, release) = (client.clone(), started.clone(), release.clone());
            tokio::spawn(async move {
                let req = Request::get(format!("https://{UPSTREAM_HOST}/endless"))
                    .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
                    .unwrap();
                let resp = client.send(req).await.map_err(|e| e.to_string())?;
                let mut body = resp.into_body();
                body.frame()
                    .await
                    .ok_or("empty body")?
                    .map_err(|e| e.to_string())?;
                started.fetch_add(1, Ordering::SeqCst);
                // Hold the response until the test lets go.
                release.acquire().await.unwrap().forget();
                Ok::<_, String>(())
            })
        })
        .collect();
    // Wait for the cap's worth to be answered however loaded the machine
    // is, then a little longer: past the cap, more would be answered too.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while started.load(Ordering::SeqCst) < 4 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (open, served) = (upstream.open_connections(), started.load(Ordering::SeqCst));
    release.add_permits(20);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        (open, served),
        (4, 4),
        "connections open, requests answered"
    );
    assert_eq!(started.load(Ordering::SeqCst), 20);
}

/// One client connection holds at most half of an upstream HTTP/2
/// connection's streams (issue 21: one client's long requests took every
/// stream the API allows, and the others queued behind them). With one
/// connection allowed to a host whose peer allows 4 streams, client A asks
/// for 4 endless downloads: 2 are answered and 2 wait for A's own streams;
/// client B's request, sent after them, is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_connection_holds_at_most_half_of_an_upstream_connections_streams() {
    let upstream = LoopbackUpstream::start_with_h2_max_streams(&[UPSTREAM_HOST], Some(4)).await;
    let mut cfg = upstream.client_config(true);
    cfg.max_connections_per_host = 1;
    let client = UpstreamClient::new(&cfg).unwrap();
    let get = |path: &str, from: Option<ClientConn>| {
        let mut req = Request::get(format!("https://{UPSTREAM_HOST}{path}"))
            .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
            .unwrap();
        if let Some(c) = from {
            req.extensions_mut().insert(c);
        }
        req
    };
    // The first exchange carries the peer's SETTINGS (its stream limit).
    // The pool's copy of the limit is stored when the connection task's
    // poll that read them returns, which can be just after the answer
    // woke this task on the other worker: a second exchange needs a later
    // poll, so after it the limit is known.
    client.send(get("/warm", None)).await.unwrap();
    client.send(get("/warm", None)).await.unwrap();
    let (a, b) = (ClientConn::next(), ClientConn::next());
    let started = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let held: Vec<_> = (0..4)
        .map(|_| {
            let (client, started, release) = (client.clone(), started.clone(), release.clone());
            let req = get("/endless", Some(a));
            tokio::spawn(async move {
                let mut body = client.send(req).await.unwrap().into_body();
                body.frame().await.unwrap().unwrap();
                started.fetch_add(1, Ordering::SeqCst);
                release.acquire().await.unwrap().forget();
            })
        })
        .collect();
    // Wait for A's share to be answered however loaded the machine is, then
    // a little longer: without the share, A's other two would start too.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while started.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let a_streams = started.load(Ordering::SeqCst);
    let b_answer = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.send(get("/echo", Some(b))),
    )
    .await;
    release.add_permits(4);
    for t in held {
        t.await.unwrap();
    }
    assert_eq!(a_streams, 2, "client A's streams answered at once");
    let b_answer = b_answer.expect("client B waited behind client A's streams");
    assert_eq!(b_answer.unwrap().status(), 200);
    assert_eq!(started.load(Ordering::SeqCst), 4);
    assert_eq!(upstream.open_connections(), 1);
}

/// A request abandoned while its connection is being dialled gives the
/// dial's slot back: the next request dials again rather than waiting
/// forever for a dial nobody finishes, even under a cap of one connection.
/// The upstream accepts TCP and never answers the TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_abandoned_mid_dial_gives_its_slot_back() {
    let upstream = LoopbackUpstream::start(&[UPSTREAM_HOST]).await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = upstream.client_config(true);
    cfg.max_connections_per_host = 1;
    cfg.resolve
        .insert(format!("{UPSTREAM_HOST}:443"), silent.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(tcp);
        }
    });
    let client = UpstreamClient::new(&cfg).unwrap();
    for _ in 0..2 {
        let req = Request::get(format!("https://{UPSTREAM_HOST}/"))
            .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
            .unwrap();
        let sent =
            tokio::time::timeout(std::time::Duration::from_millis(300), client.send(req)).await;
        assert!(sent.is_err(), "the silent upstream answered");
    }
    holder.abort();
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the second request did not dial"
    );
}
