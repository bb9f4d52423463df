//! A fault-injecting TCP proxy between agents and the broker.
//!
//! Modes, switchable at any time: pass traffic through, cut every open connection (new ones are accepted),
//! *blackhole* (accept and read, forward nothing), *refuse* (accept and close at once), and a per-chunk
//! delay. It is bounded by its cancellation token and stops by itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Pass = 0,
    Blackhole = 1,
    Refuse = 2,
}

struct Control {
    mode: AtomicU8,
    delay_ms: AtomicU64,
    cuts: AtomicU64,
    accepted: AtomicU64,
    generation: watch::Sender<u64>,
}

/// A running proxy.
#[derive(Clone)]
pub struct FaultProxy {
    addr: SocketAddr,
    ctl: Arc<Control>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` until `cancel` fires.
    pub async fn start(upstream: SocketAddr, cancel: CancellationToken) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (generation, _) = watch::channel(0u64);
        let ctl = Arc::new(Control {
            mode: AtomicU8::new(0),
            delay_ms: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            generation,
        });
        let c = ctl.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                c.accepted.fetch_add(1, Ordering::Relaxed);
                if c.mode.load(Ordering::Relaxed) == Mode::Refuse as u8 {
                    drop(client);
                    continue;
                }
                tokio::spawn(connection(client, upstream, c.clone(), cancel.clone()));
            }
        });
        Ok(FaultProxy { addr, ctl })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection now.
    pub fn cut_all(&self) {
        self.ctl.cuts.fetch_add(1, Ordering::Relaxed);
        self.ctl.generation.send_modify(|g| *g += 1);
    }

    pub fn set_mode(&self, mode: Mode) {
        self.ctl.mode.store(mode as u8, Ordering::Relaxed);
    }

    pub fn set_delay(&self, d: Duration) {
        self.ctl.delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn cuts(&self) -> u64 {
        self.ctl.cuts.load(Ordering::Relaxed)
    }

    pub fn accepted(&self) -> u64 {
        self.ctl.accepted.load(Ordering::Relaxed)
    }
}

async fn connection(client: TcpStream, upstream: SocketAddr, ctl: Arc<Control>, cancel: CancellationToken) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut gen = ctl.generation.subscribe();
    gen.mark_unchanged();
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = gen.changed() => {}
        _ = pump(cr, sw, &ctl) => {}
        _ = pump(sr, cw, &ctl) => {}
    }
}

async fn pump(mut from: impl AsyncReadExt + Unpin, mut to: impl AsyncWriteExt + Unpin, ctl: &Control) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if ctl.mode.load(Ordering::Relaxed) != Mode::Pass as u8 {
            continue; // blackholed: read and dropped
        }
        let delay = ctl.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
