//! A minimal HTTP/1.1 client (`Connection: close`) for the operator API. Enough for tests, the demo and
//! tools; not a general client.

use anyhow::Context;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A response: status, headers (names lower-cased) and body bytes.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Bearer tokens per server, added to every request to that server that does not set its own
/// `Authorization` header (like a netrc file for the operator API).
static TOKENS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<SocketAddr, String>>> =
    std::sync::OnceLock::new();

/// Sends `token` as the bearer token on later requests to `addr`.
pub fn authorize(addr: SocketAddr, token: &str) {
    let map = TOKENS.get_or_init(Default::default);
    map.lock().unwrap_or_else(|p| p.into_inner()).insert(addr, token.trim().to_string());
}

fn token_for(addr: SocketAddr) -> Option<String> {
    TOKENS.get()?.lock().unwrap_or_else(|p| p.into_inner()).get(&addr).cloned()
}

type TlsMap = std::collections::HashMap<SocketAddr, std::sync::Arc<rustls::ClientConfig>>;
static TLS: std::sync::OnceLock<std::sync::Mutex<TlsMap>> = std::sync::OnceLock::new();

/// Speaks HTTPS to `addr` from now on, trusting only the CA in `ca_pem`.
pub fn trust(addr: SocketAddr, ca_pem: &[u8]) -> anyhow::Result<()> {
    let cfg = edgeloop_common::tls::client_config(ca_pem)?;
    TLS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner()).insert(addr, std::sync::Arc::new(cfg));
    Ok(())
}

/// Speaks plain HTTP to `addr` again (a port reused by a server without TLS).
pub fn forget_tls(addr: SocketAddr) {
    if let Some(m) = TLS.get() {
        m.lock().unwrap_or_else(|p| p.into_inner()).remove(&addr);
    }
}

fn tls_for(addr: SocketAddr) -> Option<std::sync::Arc<rustls::ClientConfig>> {
    TLS.get()?.lock().unwrap_or_else(|p| p.into_inner()).get(&addr).cloned()
}

/// The base URL of a server: `https://` once [`trust`] was called for it.
pub fn base_url(addr: SocketAddr) -> String {
    if tls_for(addr).is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// Sends one request. `body` is sent as JSON when present.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> anyhow::Result<Response> {
    let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    let mut s: Box<dyn Stream> = match tls_for(addr) {
        Some(cfg) => {
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS to {addr}"))?;
            Box::new(tls)
        }
        None => Box::new(tcp),
    };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("authorization")) {
        if let Some(t) = token_for(addr) {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    if let Some(b) = body {
        s.write_all(b).await?;
    }
    let mut buf = Vec::new();
    if let Err(e) = s.read_to_end(&mut buf).await {
        // A TLS peer that closes without close_notify after a complete response is not an error here.
        if e.kind() != std::io::ErrorKind::UnexpectedEof || buf.is_empty() {
            return Err(e.into());
        }
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").context("response has no header end")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let raw = &buf[end + 4..];
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("response has no status code")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(raw)? } else { raw.to_vec() };
    Ok(Response { status, headers, body })
}

/// Sends `GET path` and returns the status code and body text.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let r = request(addr, "GET", path, &[], None).await?;
    Ok((r.status, r.text()))
}

/// GET and parse JSON, failing on a non-2xx status.
pub async fn get_json<T: serde::de::DeserializeOwned>(addr: SocketAddr, path: &str) -> anyhow::Result<T> {
    let (status, body) = get(addr, path).await?;
    anyhow::ensure!((200..300).contains(&status), "GET {path}: status {status}: {body}");
    serde_json::from_str(&body).with_context(|| format!("GET {path}: body is not the expected JSON"))
}

/// POSTs a JSON value; returns the status and body text.
pub async fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> anyhow::Result<(u16, String)> {
    let r = request(addr, "POST", path, &[], Some(body.to_string().as_bytes())).await?;
    Ok((r.status, r.text()))
}

fn dechunk(mut s: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = s.windows(2).position(|w| w == b"\r\n").context("bad chunk header")?;
        let size = std::str::from_utf8(&s[..line_end]).context("bad chunk header")?;
        let n = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        let rest = &s[line_end + 2..];
        out.extend_from_slice(rest.get(..n).context("short chunk")?);
        s = rest.get(n + 2..).context("short chunk")?;
    }
}
