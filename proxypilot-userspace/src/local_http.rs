//! The accept loop of proxypilot's small local HTTP/1.1 servers (the info
//! port, `/metrics`): each connection on its own task, a 5 s limit on a
//! request's headers and 30 s on the whole connection, so a stuck client
//! costs one task for at most that long.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Serves `respond` on `listener` forever; `what` names the server in logs.
pub async fn serve<F>(listener: TcpListener, what: &'static str, respond: F)
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let respond = Arc::new(respond);
    crate::accept::serve(
        listener,
        what,
        crate::accept::every(move |stream, _| {
            let respond = respond.clone();
            async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let respond = respond.clone();
                    async move { Ok::<_, Infallible>(respond(&req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5))
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            }
        }),
    )
    .await
}
