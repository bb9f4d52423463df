//! Serving the operator API: the accept loop, TLS, and the bounds that keep idle or slow clients from holding
//! the control plane's file descriptors.
//!
//! - At most [`Limits::max_connections`] connections are open at once. At the cap the loop stops accepting,
//!   so further clients wait in the kernel's listen queue and cost the process no descriptor.
//! - A TLS handshake, and every request's header, must arrive within [`Limits::header_read_timeout`]; that
//!   deadline also closes a kept-alive connection that sends no next request.
//! - A connection on which nothing is read or written for [`Limits::idle_timeout`] is closed, whatever it is
//!   doing (a client that stops reading a download, or stops sending a body).
//! - An accept that fails (out of descriptors, say) is retried after a back-off that grows to a second; it
//!   never ends the loop.
//!
//! Each connection runs in its own task; HTTP/1.1 only (the TLS listener offers only `http/1.1`).

use crate::metrics::Metrics;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The API's bounds on connections (`[api]` in `control-plane.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deadline for the TLS handshake and for each request's header, counted from when the server starts
    /// waiting for it (so it also closes idle kept-alive connections).
    pub header_read_timeout: Duration,
    /// A connection with no byte read or written for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Artifact downloads served at once (they need no token).
    pub max_downloads: usize,
    /// How long a download waits for one of those slots before it is answered 503.
    pub download_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 512,
            max_downloads: 32,
            download_wait: Duration::from_secs(10),
        }
    }
}

/// How long shutdown lets open requests finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// Serves `app` on `listener` (over TLS with `tls`) until `cancel` fires, then lets open requests finish
/// for a few seconds.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let conns = TaskTracker::new();
    let mut backoff = Backoff::default();
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed
            },
        };
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let (sock, peer) = match accepted {
            Ok(x) => {
                backoff.reset();
                x
            }
            Err(e) => {
                metrics.api_refused("accept_failed");
                let (wait, failures) = backoff.failed();
                if failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, retry_in = ?wait, "API: accepting a connection failed");
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        };
        conns.spawn(connection(sock, peer, tls.clone(), app.clone(), limits, cancel.clone(), permit));
    }
    conns.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, conns.wait()).await.is_err() {
        tracing::warn!("API: some connections were still open at shutdown; closed");
    }
}

/// Accept back-off: 10 ms after the first failure in a row, doubling to 1 s.
#[derive(Debug, Default)]
struct Backoff {
    failures: u64,
}

impl Backoff {
    /// The wait before the next try, and how many failures in a row there have been.
    fn failed(&mut self) -> (Duration, u64) {
        self.failures += 1;
        let ms = 10u64.saturating_mul(1 << (self.failures - 1).min(7)).min(1000);
        (Duration::from_millis(ms), self.failures)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

async fn connection(
    sock: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    cancel: CancellationToken,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let _ = sock.set_nodelay(true);
    let activity = Activity::new();
    let io = Watched { inner: sock, activity: activity.clone() };
    match tls {
        None => http(io, peer, app, limits, activity, cancel).await,
        Some(acceptor) => match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(io)).await {
            Ok(Ok(tls)) => http(tls, peer, app, limits, activity, cancel).await,
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "API: TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "API: TLS handshake took too long; closed"),
        },
    }
}

/// Runs HTTP/1.1 on one connection until the client closes it, a deadline passes, or shutdown.
async fn http<I>(io: I, peer: SocketAddr, app: Router, limits: Limits, activity: Activity, cancel: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        async move { tower_service::Service::call(&mut app, req).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let quiet_until = activity.last() + limits.idle_timeout;
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "API: connection ended");
                }
                return;
            }
            _ = tokio::time::sleep_until(quiet_until) => {
                if activity.last() + limits.idle_timeout <= tokio::time::Instant::now() {
                    tracing::debug!(%peer, "API: connection idle too long; closed");
                    return;
                }
            }
            _ = cancel.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// When a connection last moved a byte.
#[derive(Clone)]
struct Activity {
    base: tokio::time::Instant,
    /// Milliseconds after `base`.
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Activity {
        Activity { base: tokio::time::Instant::now(), last_ms: Arc::new(AtomicU64::new(0)) }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A socket that notes each read and write that moves bytes.
struct Watched {
    inner: TcpStream,
    activity: Activity,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_grows_to_a_second_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..10).map(|_| b.failed().0.as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.failed(), (Duration::from_millis(10), 1));
    }
}
